"""Tests for triaccel_rl.tasks: the registry, each task against README and the model card, the data each task
loads (seeded subsets, disjoint splits), and the crop-and-flip augmentation."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from triaccel_rl import data as data_module
from triaccel_rl import tasks
from triaccel_rl.data import FASHION_MNIST_FILES
from triaccel_rl.tasks import (
    FRESH_HELD_OUT_TASKS,
    HELD_OUT_TASKS,
    TASKS,
    TRAINING_TASKS,
    Task,
    crop_flip,
    fashion_mnist_data,
    get_task,
    register_task,
    sequence_data,
    synthetic_data,
    task_names,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- registry


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        get_task("no-such-task")
    message = str(info.value)
    assert "unknown task 'no-such-task'" in message
    assert message.endswith("known tasks: " + ", ".join(sorted(TASKS)))
    assert task_names() == sorted(TASKS)
    assert len(TASKS) == 12


def test_registering_a_taken_name_is_refused_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, a second registration silently replaced the first: every comparison under the name changed."""
    monkeypatch.setattr(tasks, "TASKS", dict(TASKS))  # registrations here stay here
    original = tasks.TASKS["synthetic"]
    impostor = Task("synthetic", "another model", build_model=original.build_model, load_data=synthetic_data)
    with pytest.raises(ValueError, match=r"task 'synthetic' is already registered \(MLP 32-64-64-10 .*overwrite=True"):
        register_task(impostor)
    assert tasks.TASKS["synthetic"] is original
    assert register_task(impostor, overwrite=True) is impostor
    assert tasks.get_task("synthetic") is impostor
    fresh = Task("my-task", "mine", build_model=original.build_model, load_data=synthetic_data)
    assert register_task(fresh) is fresh and tasks.get_task("my-task") is fresh
    with pytest.raises(ValueError, match="register_task expects a Task, got str"):
        register_task("synthetic")  # type: ignore[arg-type]


def test_overrides_name_the_fields_and_are_checked() -> None:
    task = get_task("mlp-fmnist", n_train=1024, base_lr=1e-3)
    assert (task.n_train, task.base_lr, task.optimizer) == (1024, 1e-3, "adamw")
    assert get_task("mlp-fmnist").n_train == 12_000  # the registered task is untouched
    fields = r"overridden: description, build_model, load_data, optimizer, base_lr"
    with pytest.raises(
        ValueError, match=rf"task 'mlp-fmnist' has no field lr, n_samples; fields that can be .*{fields}"
    ):
        get_task("mlp-fmnist", lr=0.1, n_samples=5)
    # The name is the registry's key: it raised "got multiple values for argument 'name'", and was listed as a field.
    with pytest.raises(ValueError, match=r"task 'mlp-fmnist' has no field name; fields that can be overridden: desc"):
        get_task("mlp-fmnist", name="mine")
    with pytest.raises(ValueError, match=r"task 'mlp-fmnist': n_train=0 must be a positive integer or None"):
        get_task("mlp-fmnist", n_train=0)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"optimizer": "adam"}, r"optimizer 'adam' must be 'sgd' or 'adamw'"),
        ({"base_lr": 0.0}, r"base_lr=0.0 must be a positive finite number"),
        ({"base_lr": float("nan")}, r"base_lr=nan"),
        ({"weight_decay": -1e-4}, r"weight_decay=-0.0001 must be a finite number >= 0"),
        ({"base_batch_size": 0}, r"base_batch_size=0 must be a positive integer"),
        ({"base_batch_size": True}, r"base_batch_size=True"),
        ({"base_batch_size": 64.0}, r"base_batch_size=64.0"),
        ({"n_train": -5}, r"n_train=-5 must be a positive integer or None"),
        ({"n_test": 2.5}, r"n_test=2.5"),
        ({"target_metric": 84.0}, r"target_metric=84.0 must be an accuracy in \[0, 1\]"),
        ({"label_smoothing": 1.0}, r"label_smoothing=1.0 must be in \[0, 1\)"),
        ({"augment": "crop"}, r"augment='crop' must be callable or None"),
        ({"build_model": None}, r"build_model=None must be callable"),
        ({"description": None}, r"description None must be a string"),  # taken, and printed as None in --help
    ],
)
def test_task_refuses_bad_fields_by_name(overrides: dict, match: str) -> None:
    """Before, only the optimizer, base_lr > 0 and base_batch_size >= 1 were checked: a target of 84.0 (a
    percentage) could never be reached, n_train=-5 kept all but 5 samples, n_test=2.5 failed in slicing."""
    with pytest.raises(ValueError, match=match):
        get_task("synthetic", **overrides)


def test_task_refuses_an_empty_name() -> None:
    with pytest.raises(ValueError, match=r"task name '' must be a non-empty string"):
        Task("", "nameless", build_model=nn.Identity, load_data=synthetic_data)


def test_make_optimizer_is_what_the_docstring_says() -> None:
    model = nn.Linear(3, 2)
    sgd = get_task("cnn-fmnist").make_optimizer(model.parameters())
    assert isinstance(sgd, torch.optim.SGD)
    assert {k: sgd.defaults[k] for k in ("lr", "momentum", "nesterov", "weight_decay")} == {
        "lr": 0.05,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
    }
    adamw = get_task("mlp-fmnist").make_optimizer(model.parameters())
    assert type(adamw) is torch.optim.AdamW
    assert (adamw.defaults["lr"], adamw.defaults["weight_decay"], adamw.defaults["betas"]) == (2e-3, 1e-2, (0.9, 0.999))


def test_loss_is_mean_cross_entropy_with_the_tasks_label_smoothing() -> None:
    logits, labels = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    log_p = torch.log_softmax(logits, 1)[0]
    # Label smoothing ε spreads ε over the 3 classes: target (1 - ε + ε/3, ε/3, ε/3).
    smoothed = -((1 - 0.1 + 0.1 / 3) * log_p[0] + 0.1 / 3 * (log_p[1] + log_p[2]))
    torch.testing.assert_close(get_task("resnet18-fmnist").loss_fn(logits, labels), smoothed)
    torch.testing.assert_close(get_task("cnn-fmnist").loss_fn(logits, labels), -log_p[0])


# ---------------------------------------------------------------- each task against README and the model card


def _readme_task_rows() -> dict[str, dict[str, str]]:
    """README's "Tasks" table: name -> {role, model, data, optimizer}."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Tasks", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name_cell, model, data, optimizer = cells
        match = re.fullmatch(r"`([a-z0-9-]+)`(?: \((.+)\))?", name_cell)
        assert match, name_cell
        rows[match[1]] = {"role": match[2] or "training", "model": model, "data": data, "optimizer": optimizer}
    return rows


def test_readme_task_table_matches_the_registry() -> None:
    rows = _readme_task_rows()
    assert sorted(rows) == sorted(TASKS)
    roles = {"training": TRAINING_TASKS, "held out": HELD_OUT_TASKS, "fresh held out": FRESH_HELD_OUT_TASKS}
    for role, names in roles.items():
        assert tuple(n for n, row in rows.items() if row["role"] == role) == names
    gpu = tuple(n for n, row in rows.items() if row["role"] == "GPU benchmark")
    assert gpu == ("resnet18-fmnist", "effnet-b0-fmnist")
    for name, row in rows.items():
        task = TASKS[name]
        assert {"SGD Nesterov": "sgd", "AdamW": "adamw"}[row["optimizer"]] == task.optimizer, name
        subset = re.search(r"\((\d+)k subset\)", row["data"])
        if "Fashion-MNIST" in row["data"]:
            assert task.load_data is fashion_mnist_data, name
            assert task.n_train == (int(subset[1]) * 1000 if subset else None), name
            assert task.n_test == (2_000 if subset else None), name
            assert (task.augment is crop_flip) == ("crop + flip" in row["data"]), name
        elif "Gaussian clusters" in row["data"]:
            assert task.load_data is synthetic_data, name
        else:
            assert row["data"] == "generated token sequences"
        # The description says the optimizer too.
        assert row["optimizer"] in task.description or (task.optimizer == "sgd" and name == "synthetic"), name


def test_the_models_are_what_the_descriptions_say() -> None:
    """Layer sizes and widths as README and the descriptions spell them (MLP a-b-c, N hidden layers of W, widths
    a-b-c, N-layer); every pattern is found in some description, so none is checked in name only."""
    matched: set[str] = set()
    for name, task in TASKS.items():
        model = task.build_model()
        n_classes = 4 if "token sequences" in task.description else 10
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        mlp = re.search(r"MLP ([\d-]+)", task.description)
        if mlp:
            matched.add("MLP a-b-c")
            sizes = [int(s) for s in mlp[1].split("-")]
            assert [(m.in_features, m.out_features) for m in linears] == list(itertools.pairwise(sizes)), name
        deep = re.search(r"MLP with (\d+) hidden layers of (\d+) \((\d+) Linear layers\)", task.description)
        if deep:
            matched.add("MLP with N hidden layers")
            n_hidden, width, n_linear = (int(group) for group in deep.groups())
            sizes = [_one_input(task).shape[1], *[width] * n_hidden, n_classes]
            assert len(linears) == n_linear, name
            assert [(m.in_features, m.out_features) for m in linears] == list(itertools.pairwise(sizes)), name
        widths = re.search(r"widths ([\d-]+)", task.description)
        if widths:
            matched.add("widths")
            expected = [int(w) for w in widths[1].split("-")]
            convs = [
                m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size != (1, 1)
            ]
            pointwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
            found = sorted({m.out_channels for m in convs + pointwise})
            assert found == expected, name
        layers = re.search(r"(\d+)-layer Transformer encoder \(dim (\d+)\)", task.description)
        if layers:
            matched.add("Transformer")
            assert len(model.encoder.layers) == int(layers[1]) and model.embed.embedding_dim == int(layers[2])
        stride2_stem = "stride-2 stem" in task.description
        stride1_stem = "stride-1 stem" in task.description
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if stride2_stem or stride1_stem:
            matched.add("stride-2 stem" if stride2_stem else "stride-1 stem")
            assert first_conv is not None and first_conv.stride == ((2, 2) if stride2_stem else (1, 1)), name
        if "1-channel stem" in task.description or "Fashion-MNIST" in task.description:
            matched.add("1-channel input")
            assert first_conv is None or first_conv.in_channels == 1, name
        assert model(_one_input(task)).shape == (2, n_classes), name
    assert matched == {
        "MLP a-b-c",
        "MLP with N hidden layers",
        "widths",
        "Transformer",
        "stride-2 stem",
        "stride-1 stem",
        "1-channel input",
    }


def _one_input(task: Task) -> torch.Tensor:
    if task.load_data is fashion_mnist_data:
        return torch.zeros(2, 1, 28, 28)
    if task.load_data is synthetic_data:
        return torch.zeros(2, 32)
    return torch.zeros(2, task.build_model().length)


def test_model_card_task_lists_match() -> None:
    card = (ROOT / "triaccel_rl" / "pretrained" / "MODEL_CARD.md").read_text()
    training = re.search(r"\| training tasks \| (.+?) \(", card)
    held_out = re.search(r"\| held-out tasks \(evaluation only\) \| (.+?) \|", card)
    assert training and held_out
    assert tuple(re.findall(r"`([a-z0-9-]+)`", training[1])) == TRAINING_TASKS
    assert tuple(re.findall(r"`([a-z0-9-]+)`", held_out[1])) == HELD_OUT_TASKS
    assert set(re.findall(r"^\| ([a-z0-9-]+) \| pretrained \|", card, re.MULTILINE)) == set(
        HELD_OUT_TASKS + FRESH_HELD_OUT_TASKS
    )


def test_targets_match_readme_and_the_calibration_rule() -> None:
    readme = (ROOT / "README.md").read_text()
    demo = re.search(r"Task mlp-fmnist: .*; target accuracy ([\d.]+)%", readme)
    assert demo and float(demo[1]) / 100 == get_task("mlp-fmnist").target_metric
    measured = re.search(r"ResNet-18 on Fashion-MNIST, \d+\s+epochs, target (\d+)%.*?EfficientNet-B0, \d+ epochs, "
                         r"target (\d+)%", readme, re.DOTALL)  # fmt: skip
    assert measured
    assert get_task("resnet18-fmnist").target_metric == int(measured[1]) / 100
    assert get_task("effnet-b0-fmnist").target_metric == int(measured[2]) / 100
    # BENCHMARKS.md's description of the GPU benchmark tasks' recipe.
    benchmarks = " ".join((ROOT / "BENCHMARKS.md").read_text().split())
    recipe = re.search(r"ResNet-18 \(CIFAR-style, 1-channel stem\) on Fashion-MNIST, \d+ epochs, target (\d+)%; "
                       r"EfficientNet-B0 \(our definition, stride-1 stem; .*?\), \d+ epochs, target (\d+)%\. Both: "
                       r"all data on the GPU with GPU-side crop and flip, SGD Nesterov, label smoothing ([\d.]+), "
                       r"warm-up then linear decay, batch (\d+)", benchmarks)  # fmt: skip
    assert recipe
    for name, target in (("resnet18-fmnist", recipe[1]), ("effnet-b0-fmnist", recipe[2])):
        task = get_task(name)
        assert task.target_metric == int(target) / 100
        assert (task.augment, task.optimizer, task.n_train) == (crop_flip, "sgd", None)
        assert (task.label_smoothing, task.base_batch_size) == (float(recipe[3]), int(recipe[4]))
    # The fresh held-out targets: floor(0.98 x static fp32's final accuracy on seed 100, to 0.005), as recorded.
    calibration = json.loads((ROOT / "experiments/results/fresh_held_out_calibration.json").read_text())
    assert sorted(calibration["tasks"]) == sorted(FRESH_HELD_OUT_TASKS)
    for name, entry in calibration["tasks"].items():
        rule = np.floor(0.98 * entry["final_metric"] / 0.005 + 1e-9) * 0.005
        assert get_task(name).target_metric == pytest.approx(rule, abs=1e-12) == entry["target_metric"], name


# ---------------------------------------------------------------- data: seeded subsets and disjoint splits


def _write_fake_fashion(folder: Path, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST files whose every image is distinct (its index is in its first pixels) and labelled i % 10."""
    folder.mkdir(parents=True)
    train = np.zeros((n_train, 28, 28), dtype=np.uint8)
    test = np.zeros((n_test, 28, 28), dtype=np.uint8)
    for images, split in ((train, 0), (test, 1)):
        for i in range(len(images)):
            images[i, 0, 0], images[i, 0, 1] = split, i  # which file, which image (n < 256)
            images[i, 1:] = (i * 7) % 256
    arrays = [train, (np.arange(n_train) % 10).astype(np.uint8), test, (np.arange(n_test) % 10).astype(np.uint8)]
    for name, array in zip(FASHION_MNIST_FILES, arrays, strict=True):
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
        (folder / name).write_bytes(gzip.compress(header + array.tobytes()))
    return train, test


@pytest.fixture
def fake_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray]:
    images = _write_fake_fashion(tmp_path / "fashion", n_train=100, n_test=40)
    monkeypatch.setenv("TRIACCEL_DATA", str(tmp_path / "fashion"))
    monkeypatch.setattr(data_module, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "absent")
    return images


def _rows(x: torch.Tensor) -> list[bytes]:
    return [row.numpy().tobytes() for row in x]


def test_fashion_subsets_are_seeded_distinct_and_from_their_own_file(fake_fashion) -> None:
    train, test = fake_fashion
    normalise = lambda a: (torch.from_numpy(a).float().div(255).unsqueeze(1) - 0.2860) / 0.3530  # noqa: E731
    train_rows = _rows(normalise(train))
    test_rows = _rows(normalise(test))
    first = fashion_mnist_data(30, 10, seed=0)
    assert first.train_x.shape == (30, 1, 28, 28) and first.train_x.dtype == torch.float32
    picked = [train_rows.index(row) for row in _rows(first.train_x)]  # each is a training image, exactly
    assert len(set(picked)) == 30  # distinct
    assert first.train_y.tolist() == [i % 10 for i in picked]  # each keeps its own label
    picked_test = [test_rows.index(row) for row in _rows(first.test_x)]
    assert len(set(picked_test)) == 10 and first.test_y.tolist() == [i % 10 for i in picked_test]
    assert not set(_rows(first.train_x)) & set(_rows(first.test_x))  # the splits share no image

    again = fashion_mnist_data(30, 10, seed=0)
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.train_y, first.train_y)
    other = fashion_mnist_data(30, 10, seed=1)
    assert not torch.equal(other.train_x, first.train_x)  # the seed draws the training subset ...
    assert torch.equal(other.test_x, first.test_x)  # ... and not the test subset: one yardstick for every seed
    whole = fashion_mnist_data(None, 500, seed=3)  # None, or more than the file has: all of it, in file order
    assert _rows(whole.train_x) == train_rows and _rows(whole.test_x) == test_rows
    labels = whole.train_y.tolist()
    whole.train_y[:5] = 0  # a caller's in-place edit: it reached every later call's labels (the loader's cache)
    whole.test_y[:5] = 0
    fresh = fashion_mnist_data(None, None, seed=3)
    assert fresh.train_y.tolist() == labels and fresh.test_y.tolist() != whole.test_y.tolist()


@pytest.mark.parametrize(
    ("load", "n_train", "n_test", "match"),
    [
        (fashion_mnist_data, -5, 10, r"fashion_mnist_data: n_train=-5 must be a positive integer"),
        (fashion_mnist_data, 10, 0, r"fashion_mnist_data: n_test=0"),
        (synthetic_data, 0, 10, r"synthetic_data: n_train=0"),
        (sequence_data, 10, -1, r"sequence_data: n_test=-1"),
        (synthetic_data, 2.5, 10, r"synthetic_data: n_train=2.5"),
    ],
)
def test_subset_sizes_are_checked(fake_fashion, load, n_train, n_test, match) -> None:
    """Before, fashion_mnist_data(-5, ...) kept all but the last 5 of a seeded permutation (randperm(n)[:-5])."""
    with pytest.raises(ValueError, match=match):
        load(n_train, n_test, 0)


def test_generated_data_is_seeded_and_train_test_disjoint() -> None:
    first, again, other = synthetic_data(64, 32, 0), synthetic_data(64, 32, 0), synthetic_data(64, 32, 1)
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_y, again.test_y)
    assert not torch.equal(first.train_x, other.train_x)
    assert not set(_rows(first.train_x)) & set(_rows(first.test_x))
    seqs, seqs_again, seqs_other = sequence_data(64, 32, 0), sequence_data(64, 32, 0), sequence_data(64, 32, 1)
    assert torch.equal(seqs.train_x, seqs_again.train_x) and torch.equal(seqs.test_y, seqs_again.test_y)
    assert not torch.equal(seqs.train_x, seqs_other.train_x)
    assert not set(_rows(seqs.train_x)) & set(_rows(seqs.test_x))
    tokens = seqs.train_x.long()
    assert torch.equal(tokens.float(), seqs.train_x) and int(tokens.min()) >= 0 and int(tokens.max()) < 16
    counts = torch.stack([(tokens == c).sum(1) for c in range(4)], 1)
    winners = counts.max(1).values
    label_counts = counts.gather(1, seqs.train_y[:, None])[:, 0]
    assert torch.equal(label_counts, winners)  # the label is a most frequent one of tokens 0..3 (ties at random)


def test_training_run_probe_is_held_out_of_the_batches() -> None:
    """The probe is the last n_probe training samples; the loader serves the rest, so no probe sample is trained on."""
    from triaccel_rl.training import TrainingRun

    run = TrainingRun(get_task("synthetic", n_train=256, n_test=64), seed=0, device="cpu", batch_size=8, n_probe=16)
    probe_x, _ = run.probe_batch
    assert len(probe_x) == 16 and len(run.loader) == 240
    assert not set(_rows(probe_x)) & set(_rows(run.loader.x))


# ---------------------------------------------------------------- crop_flip


def _labelled_images(n: int = 6, channels: int = 2, size: int = 5) -> torch.Tensor:
    """Image i holds the values 1000·(i + 1) + 100·c + 10·row + col: every pixel says where it came from."""
    i, c, r, k = torch.meshgrid(torch.arange(n), torch.arange(channels), torch.arange(size), torch.arange(size),
                                indexing="ij")  # fmt: skip
    return (1000 * (i + 1) + 100 * c + 10 * r + k).float()


def _crop_of(out: torch.Tensor, image: torch.Tensor, pad: int) -> tuple[int, int, bool] | None:
    """The (dy, dx, flipped) of the crop of ``image`` padded by ``pad`` that ``out`` is, or None if it is none.

    With labelled images (every pixel distinct and nonzero) at most one crop matches, so the draw is recovered exactly.
    """
    padded = nn.functional.pad(image, (pad, pad, pad, pad))
    h, w = image.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            for flipped in (False, True):
                if torch.equal(out, crop.flip(-1) if flipped else crop):
                    return dy, dx, flipped
    return None


def test_crop_flip_keeps_each_sample_in_place_and_draws_from_the_seed() -> None:
    """Each output sample is a crop (or its mirror) of the same sample's padded image, so its label still fits;
    the same seed gives the same crops; shape, dtype and memory format are kept."""
    x = _labelled_images()
    torch.manual_seed(0)
    out = crop_flip(x, pad=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    for i in range(len(x)):
        assert _crop_of(out[i], x[i], pad=2) is not None, i
        assert set(torch.unique(out[i] // 1000).tolist()) <= {0, i + 1}  # nothing of another sample
    torch.manual_seed(0)
    assert torch.equal(crop_flip(x, pad=2), out)
    assert torch.equal(x, _labelled_images())  # the input is left alone
    channels_last = crop_flip(x.contiguous(memory_format=torch.channels_last))
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    import numpy as np

    assert crop_flip(x, pad=np.int64(2)).shape == x.shape  # a NumPy integer was refused as "no integer"
    flips_only = crop_flip(x, pad=0)
    assert all(torch.equal(flips_only[i], x[i]) or torch.equal(flips_only[i], x[i].flip(-1)) for i in range(len(x)))


def test_crop_flip_draws_every_shift_and_flips_about_half() -> None:
    """Every one of the (2·pad + 1)² shifts occurs over 256 samples, and about half the crops are mirrored.

    Before, a test only counted distinct outputs, which differ for every image even when nothing is cropped.
    """
    pad, images = 2, _labelled_images(n=256, channels=1)
    torch.manual_seed(0)
    out = crop_flip(images, pad=pad)
    draws = [_crop_of(out[i], images[i], pad) for i in range(len(images))]
    assert None not in draws
    shifts = {(dy, dx) for dy, dx, _ in draws}
    assert shifts == set(itertools.product(range(2 * pad + 1), repeat=2))
    flip_share = sum(flipped for _, _, flipped in draws) / len(draws)
    assert 0.35 <= flip_share <= 0.65, flip_share


@pytest.mark.parametrize(
    ("x", "pad", "match"),
    [
        (torch.zeros(2, 5, 5), 2, r"crop_flip expects images \[N, C, H, W\], got shape \(2, 5, 5\)"),
        (torch.zeros(1, 1, 5, 5), -1, r"crop_flip: pad=-1 must be an integer >= 0"),
        (torch.zeros(1, 1, 5, 5), 1.5, r"crop_flip: pad=1.5"),
    ],
)
def test_crop_flip_refuses_bad_input(x: torch.Tensor, pad, match: str) -> None:
    """Before, a 3-D batch raised an unpacking error and pad=-1 cropped out of range (an index error)."""
    with pytest.raises(ValueError, match=match):
        crop_flip(x, pad)


@pytest.mark.parametrize("seed", ["0", 1.5, None, True, -1, 2**64 - 1])
@pytest.mark.parametrize("loader", ["synthetic_data", "sequence_data", "fashion_mnist_data"])
def test_a_bad_seed_is_refused_by_name_by_every_loader(loader: str, seed: object) -> None:
    """'0' and None raised operand or manual_seed errors naming neither; True was seed 1 for the generated data and
    refused by Fashion-MNIST's; 2**64 - 1 overflowed in the generators (which add up to 20,000)."""
    with pytest.raises(ValueError, match=rf"{loader}: seed={re.escape(repr(seed))} must be a whole number"):
        getattr(tasks, loader)(8, 8, seed)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: synthetic_data(8, 8, 0, n_classes=0), r"synthetic_data: n_classes=0 must be a positive integer"),
        (lambda: synthetic_data(8, 8, 0, n_features=0), r"synthetic_data: n_features=0 must be a positive integer"),
        (lambda: sequence_data(8, 8, 0, length=0), r"sequence_data: length=0 must be a positive integer"),
        (lambda: sequence_data(8, 8, 0, vocab=2, n_classes=4), r"n_classes=4 must be <= vocab=2"),
    ],
)
def test_the_generators_refuse_shapes_that_make_no_task(call, message: str) -> None:
    """n_features=0 or length=0 made empty inputs; vocab=2 with 4 classes a 4-class task with labels 0 and 1 only."""
    with pytest.raises(ValueError, match=message):
        call()


def test_get_task_and_register_task_refuse_odd_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown task \['synthetic'\]; known tasks"):
        get_task(["synthetic"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"overwrite='no' must be True or False"):
        register_task(get_task("synthetic"), overwrite="no")  # type: ignore[arg-type]
    assert get_task("synthetic").description == TASKS["synthetic"].description  # not replaced
