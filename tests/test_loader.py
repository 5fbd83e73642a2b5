"""Tests for triaccel_rl.loader.ElasticLoader: every sample once per epoch, whatever the batch sizes."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triaccel_rl.loader import Batch, ElasticLoader

N_EPOCHS = 3
_SETTINGS = settings(max_examples=60, deadline=None)

dataset_sizes = st.integers(min_value=1, max_value=200)
batch_size_lists = st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20)
seeds = st.integers(min_value=0, max_value=2**20)


def make_loader(n: int, seed: int) -> ElasticLoader:
    # Features carry the index so a batch's x and y can be checked against its indices.
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1) * torch.tensor([[1.0, -2.0]])
    y = torch.arange(n) + 1000
    return ElasticLoader(x, y, seed=seed)


def serve_epochs(loader: ElasticLoader, sizes: list[int], n_epochs: int) -> list[Batch]:
    """Cycles through ``sizes`` until ``n_epochs`` full epochs have been served."""
    batches: list[Batch] = []
    total = n_epochs * len(loader)
    i = 0
    while loader.samples_served < total:
        batches.append(loader.next(sizes[i % len(sizes)]))
        i += 1
    return batches


def order_by_epoch(batches: list[Batch]) -> dict[int, list[int]]:
    per_epoch: dict[int, list[int]] = defaultdict(list)
    for batch in batches:
        per_epoch[batch.epoch].extend(batch.indices.tolist())
    return dict(per_epoch)


@_SETTINGS
@given(n=dataset_sizes, sizes=batch_size_lists, seed=seeds)
def test_every_index_once_per_epoch(n: int, sizes: list[int], seed: int) -> None:
    loader = make_loader(n, seed)
    batches = serve_epochs(loader, sizes, N_EPOCHS)
    per_epoch = order_by_epoch(batches)
    assert sorted(per_epoch) == list(range(N_EPOCHS))
    for epoch, order in per_epoch.items():
        assert sorted(order) == list(range(n)), f"epoch {epoch} is not a permutation of range({n})"
    assert loader.samples_served == N_EPOCHS * n


@_SETTINGS
@given(n=dataset_sizes, sizes=batch_size_lists, seed=seeds)
def test_batches_have_requested_size_and_never_cross_epochs(n: int, sizes: list[int], seed: int) -> None:
    loader = make_loader(n, seed)
    served_in_epoch = 0
    epoch = 0
    i = 0
    while loader.samples_served < N_EPOCHS * n:
        asked = sizes[i % len(sizes)]
        i += 1
        batch = loader.next(asked)
        if batch.epoch != epoch:  # a new epoch starts only after the previous one was fully served
            assert served_in_epoch == n
            assert batch.epoch == epoch + 1
            epoch, served_in_epoch = batch.epoch, 0
        # A batch is the requested size unless the epoch ends inside it; then it is exactly the remainder. One more
        # where it would leave a single sample (a batch of one, which a batch norm refuses).
        left = n - served_in_epoch
        assert len(batch.y) == (left if asked >= 2 and left == asked + 1 else min(asked, left))
        served_in_epoch += len(batch.y)
        assert served_in_epoch <= n
        assert loader.epoch_progress == served_in_epoch / n
    assert epoch == N_EPOCHS - 1
    assert served_in_epoch == n


@_SETTINGS
@given(n=dataset_sizes, sizes=batch_size_lists, seed=seeds)
def test_batch_contents_match_indices(n: int, sizes: list[int], seed: int) -> None:
    loader = make_loader(n, seed)
    for batch in serve_epochs(loader, sizes, 2):
        assert torch.equal(batch.x, loader.x[batch.indices])
        assert torch.equal(batch.y, batch.indices + 1000)
        assert batch.x.shape == (len(batch.indices), 2)


@_SETTINGS
@given(n=dataset_sizes, sizes_a=batch_size_lists, sizes_b=batch_size_lists, seed=seeds)
def test_order_depends_only_on_seed_and_epoch(n: int, sizes_a: list[int], sizes_b: list[int], seed: int) -> None:
    order_a = order_by_epoch(serve_epochs(make_loader(n, seed), sizes_a, N_EPOCHS))
    order_b = order_by_epoch(serve_epochs(make_loader(n, seed), sizes_b, N_EPOCHS))
    assert order_a == order_b


def test_different_seeds_or_epochs_give_different_orders() -> None:
    n = 100
    orders = order_by_epoch(serve_epochs(make_loader(n, 0), [7], 2))
    other_seed = order_by_epoch(serve_epochs(make_loader(n, 1), [7], 2))
    # 100! orders: a coincidence has probability ~1e-158, so inequality is a property of the seeding.
    assert orders[0] != orders[1]
    assert orders[0] != other_seed[0]


@_SETTINGS
@given(
    n=dataset_sizes,
    seed=seeds,
    steps=st.lists(
        st.tuples(st.integers(min_value=1, max_value=64), st.integers(min_value=0, max_value=64)),
        min_size=1,
        max_size=30,
    ),
)
def test_take_back_reserves_identically(n: int, seed: int, steps: list[tuple[int, int]]) -> None:
    """Each step serves a batch, then gives back ``k`` of its samples (a step that was not applied).

    The applied samples must still form every index once per epoch, in the undisturbed order, and
    ``samples_served`` must count applied samples exactly.
    """
    loader = make_loader(n, seed)
    reference = order_by_epoch(serve_epochs(make_loader(n, seed), [n], N_EPOCHS))
    applied: dict[int, list[int]] = defaultdict(list)
    n_applied = 0
    i = 0
    while n_applied < N_EPOCHS * n:
        asked, give_back = steps[i % len(steps)]
        i += 1
        batch = loader.next(asked)
        served = batch.indices.tolist()
        k = min(give_back, len(served)) if i % 3 else 0  # every third step keeps its batch: progress is certain
        loader.take_back(k)
        applied[batch.epoch].extend(served[: len(served) - k])
        n_applied += len(served) - k
        assert loader.samples_served == n_applied
        if k:
            again = loader.next(k)
            # The given-back samples come back first, the same ones in the same order.
            assert again.epoch == batch.epoch
            assert again.indices.tolist() == served[len(served) - k :]
            applied[again.epoch].extend(again.indices.tolist())
            n_applied += k
            assert loader.samples_served == n_applied
    assert dict(applied) == reference


def test_take_back_whole_epoch_end_batch_stays_in_epoch() -> None:
    loader = make_loader(10, seed=3)
    first = loader.next(6)
    last = loader.next(6)  # the 4 remaining samples of epoch 0
    assert len(last.y) == 4
    loader.take_back(4)
    again = loader.next(8)
    assert again.epoch == 0
    assert torch.equal(again.indices, last.indices)
    assert loader.samples_served == 10
    assert sorted(first.indices.tolist() + again.indices.tolist()) == list(range(10))
    assert loader.next(1).epoch == 1


@pytest.mark.parametrize("bad", [-1, 11])
def test_take_back_more_than_served_raises(bad: int) -> None:
    loader = make_loader(20, seed=0)
    loader.next(10)
    with pytest.raises(ValueError, match=rf"cannot take back {bad} samples; 10 served this epoch"):
        loader.take_back(bad)
    assert loader.samples_served == 10


@pytest.mark.parametrize("bad", [2.0, True, "1"])
def test_take_back_of_no_whole_number_is_refused_and_the_place_kept(bad: object) -> None:
    """2.0 was taken: the cursor became a float, the next batch failed to slice and the state would not load."""
    loader = make_loader(20, seed=0)
    loader.next(10)
    with pytest.raises(ValueError, match=rf"n_samples={bad!r} must be a whole number of samples"):
        loader.take_back(bad)  # type: ignore[arg-type]
    assert (loader.cursor, loader.samples_served) == (10, 10)


@pytest.mark.parametrize("bad", [1.5, True, -1, "0", None])
def test_a_seed_that_is_no_whole_number_at_least_zero_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"seed={bad!r} must be a whole number >= 0"):
        ElasticLoader(torch.arange(10.0), torch.arange(10), seed=bad)  # type: ignore[arg-type]


def test_inputs_or_labels_that_are_not_tensors_are_refused_by_name() -> None:
    """A list of labels was taken, and the first batch failed indexing it ("only integer tensors of a single element
    can be converted to an index")."""
    with pytest.raises(ValueError, match=r"y must be a tensor \(torch.as_tensor converts a list\); got list"):
        ElasticLoader(torch.arange(4.0), [0, 1, 0, 1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"x must be a tensor .*; got ndarray"):
        ElasticLoader(torch.arange(4.0).numpy(), torch.arange(4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^x must have a sample dimension first; got a 0-d tensor \(3\.0\)$"):
        ElasticLoader(torch.tensor(3.0), torch.tensor(3))  # a bare "len() of a 0-d tensor" TypeError before
    with pytest.raises(ValueError, match=r"^y must have a sample dimension first; got a 0-d tensor \(3\)$"):
        ElasticLoader(torch.arange(1.0), torch.tensor(3))


def test_numpy_integers_and_huge_seeds_serve_batches() -> None:
    """np.int64 seeds and batch sizes failed (TypeError in the shuffle, a refusal in next); a seed past 9e12 overflowed
    manual_seed (seed x 1,000,003). Small seeds keep their orders."""
    import numpy as np

    plain, numpy_typed = make_loader(10, seed=3), ElasticLoader(torch.arange(10.0), torch.arange(10), seed=np.int64(3))
    assert torch.equal(plain.next(4).indices, numpy_typed.next(np.int64(4)).indices)
    assert numpy_typed.state_dict()["seed"] == 3 and type(numpy_typed.state_dict()["seed"]) is int
    huge = ElasticLoader(torch.arange(10.0), torch.arange(10), seed=2**45)
    assert sorted(huge.next(10).indices.tolist()) == list(range(10))
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003))
    assert torch.equal(make_loader(10, seed=3).next(10).indices, expected)  # the order of every seed before


def test_epoch_batches_yields_rest_of_epoch_only() -> None:
    loader = make_loader(23, seed=5)
    head = loader.next(5)
    rest = list(loader.epoch_batches(4))
    assert [len(b.y) for b in rest] == [4, 4, 4, 4, 2]
    assert all(b.epoch == 0 for b in rest)
    assert sorted(head.indices.tolist() + [i for b in rest for i in b.indices.tolist()]) == list(range(23))
    # At an epoch boundary it serves the whole next epoch.
    assert sum(len(b.y) for b in loader.epoch_batches(10)) == 23
    assert loader.epoch == 1
    assert loader.samples_served == 46


def test_docstring_example() -> None:
    loader = ElasticLoader(torch.arange(10.0), torch.arange(10), seed=0)
    assert [len(loader.next(4).y) for _ in range(3)] == [4, 4, 2]
    assert len(loader) == 10


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4", None])
def test_bad_batch_size_raises_naming_value(bad: object) -> None:
    loader = make_loader(10, seed=0)
    with pytest.raises(ValueError, match=r"must be a positive integer") as info:
        loader.next(bad)  # type: ignore[arg-type]
    assert f"batch_size={bad!r}" in str(info.value)
    assert loader.samples_served == 0


def test_mismatched_lengths_raise_naming_both() -> None:
    with pytest.raises(ValueError, match=r"inputs \(5\) and labels \(4\) must have the same length"):
        ElasticLoader(torch.zeros(5, 3), torch.zeros(4))


def test_empty_dataset_raises() -> None:
    with pytest.raises(ValueError, match=r"empty dataset"):
        ElasticLoader(torch.zeros(0, 3), torch.zeros(0))


@_SETTINGS
@given(n=dataset_sizes, sizes=batch_size_lists, seed=seeds, cut=st.integers(min_value=0, max_value=30))
def test_a_loader_resumed_from_its_state_serves_the_same_batches(n: int, sizes: list[int], seed: int, cut: int) -> None:
    """State taken after ``cut`` batches, loaded into a new loader over the same data: the same batches follow."""
    loader = make_loader(n, seed)
    served = [loader.next(sizes[i % len(sizes)]) for i in range(cut)]
    state = loader.state_dict()
    assert state == {"n": n, "seed": seed, "epoch": loader.epoch, "cursor": loader.cursor,
                     "samples_served": sum(len(b.y) for b in served)}  # fmt: skip
    resumed = make_loader(n, seed)
    resumed.load_state_dict(state)
    for i in range(cut, cut + 2 * len(sizes) + 3):
        a, b = loader.next(sizes[i % len(sizes)]), resumed.next(sizes[i % len(sizes)])
        assert (a.epoch, a.indices.tolist()) == (b.epoch, b.indices.tolist())
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert resumed.state_dict() == loader.state_dict()


_GOOD_STATE = {"n": 10, "seed": 3, "epoch": 2, "cursor": 4, "samples_served": 24}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epoch": None}, r"lacks 'epoch'"),
        ({"cursor": "4"}, r"'cursor' is '4', not a whole number"),
        ({"cursor": 4.0}, r"'cursor' is 4\.0, not a whole number"),  # once int()-ed silently
        ({"epoch": True}, r"'epoch' is True, not a whole number"),
        ({"samples_served": [24]}, r"'samples_served' is \[24\], not a whole number"),  # once half-loaded, then raised
        ({"epoch": -1, "samples_served": -6}, r"epoch -1 is negative"),
        ({"cursor": 11, "samples_served": 31}, r"cursor 11 is outside the dataset \(0\.\.10\)"),
        ({"samples_served": 25}, r"samples_served 25 is not epoch 2 x 10 samples \+ cursor 4 = 24"),
        ({"n": 12, "samples_served": 28}, r"of 12 samples with seed 3; this loader has 10 samples and seed 3"),
        ({"seed": 4}, r"of 10 samples with seed 4; this loader has 10 samples and seed 3"),
    ],
)
def test_a_bad_state_is_refused_by_name_and_leaves_the_loader_as_it_was(change: dict, message: str) -> None:
    state = {k: v for k, v in {**_GOOD_STATE, **change}.items() if v is not None}
    loader, control = make_loader(10, seed=3), make_loader(10, seed=3)
    loader.next(7)
    control.next(7)
    with pytest.raises(ValueError, match=message):
        loader.load_state_dict(state)
    assert loader.state_dict() == control.state_dict()
    assert torch.equal(loader.next(5).indices, control.next(5).indices)
    loader.load_state_dict(_GOOD_STATE)  # the control: the good state loads
    assert loader.state_dict() == _GOOD_STATE


def test_a_state_is_refused_when_it_is_not_a_dict() -> None:
    with pytest.raises(ValueError, match=r"a loader state is the dict ElasticLoader.state_dict\(\) returned; got str"):
        make_loader(10, seed=3).load_state_dict("epoch 2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "batch_size", "expected"),
    [
        (33, 16, [16, 17]),  # 2 x 16 + 1: the one left over joins the last batch
        (10, 3, [3, 3, 4]),
        (5, 2, [2, 3]),
        (10, 4, [4, 4, 2]),  # a remainder of 2 stays its own batch
        (3, 1, [1, 1, 1]),  # a batch of one was asked for
        (1, 4, [1]),  # the whole epoch is one sample
    ],
)
def test_an_epoch_never_ends_on_a_batch_of_one_sample(n: int, batch_size: int, expected: list[int]) -> None:
    """Before the fix an epoch of ``k * batch_size + 1`` samples ended on a batch of one, which a batch norm in training
    mode refuses: the step raised, the batch went back, and the same one came again. Every sample still once."""
    loader = ElasticLoader(torch.arange(float(n)), torch.arange(n), seed=3)
    sizes = []
    served = []
    for batch in loader.epoch_batches(batch_size):
        sizes.append(len(batch.y))
        served += batch.y.tolist()
    assert sizes == expected
    assert sorted(served) == list(range(n))
    assert loader.next(batch_size).epoch == 1


def test_a_batch_taken_back_with_its_folded_sample_is_served_again_whole() -> None:
    """The last batch of 2 x 4 + 1 samples takes the sample left over (5): taken back, it comes again the same."""
    loader = ElasticLoader(torch.arange(9.0), torch.arange(9), seed=0)
    loader.next(4)
    last = loader.next(4)
    assert len(last.y) == 5 and loader.epoch_progress == 1.0
    loader.take_back(len(last.y))
    assert loader.next(4).y.tolist() == last.y.tolist()


def test_next_size_is_what_next_serves():
    """``next_size`` (what reads a step ahead of it counts with) against ``next`` itself, through epochs of
    ``k * batch + 1`` samples, batch changes, a batch of one and a take-back."""
    loader = ElasticLoader(torch.arange(33.0), torch.arange(33), seed=0)
    for batch_size in [16, 16, 5, 1, 7, 2, 31, 32, 33, 40, 3, 16, 17]:
        expected = loader.next_size(batch_size)
        assert len(loader.next(batch_size).y) == expected
    loader.take_back(3)
    assert loader.next_size(2) == 3 and len(loader.next(2).y) == 3  # the 3 taken back: no single one left behind


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_next_size_refuses_what_next_refuses(bad):
    """``next_size(0)`` read 0, ``-3`` -3 and ``2.5`` 2.5, where ``next`` refuses each by name."""
    loader = ElasticLoader(torch.arange(10.0), torch.arange(10), seed=0)
    for call in (loader.next_size, loader.next):
        with pytest.raises(ValueError, match=rf"^batch_size={bad!r} must be a positive integer$"):
            call(bad)
