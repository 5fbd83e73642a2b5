"""The per-layer precision map in TensorBoard: a scalar a controllable layer, written where the map changed."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from triaccel_rl.actions import encode
from triaccel_rl.compare import run_controller
from triaccel_rl.config import ControllerConfig
from triaccel_rl.controller import Controller
from triaccel_rl.tasks import get_task
from triaccel_rl.types import Action, BatchMove, Precision

# The layers: "blocks.in proj" (controllable; its space is no tag character), "blocks.norm" (a LayerNorm: fp32
# always, no tag), "blocks.head" (controllable).
TAGS = ["precision/0_blocks.in_proj", "precision/2_blocks.head"]


class _Net(nn.Module):
    def __init__(self, in_features, n_classes):
        super().__init__()
        self.blocks = nn.ModuleDict(
            {"in proj": nn.Linear(in_features, 16), "norm": nn.LayerNorm(16), "head": nn.Linear(16, n_classes)}
        )

    def forward(self, x):
        blocks = self.blocks
        return blocks["head"](torch.relu(blocks["norm"](blocks["in proj"](x.flatten(1)))))


class _Scripted:
    """An adaptive policy: decision k sets every group to ``codes[k]`` (the last code after), LR x1, batch kept."""

    def __init__(self, codes, config):
        self.codes, self._config, self.calls = codes, config, 0

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        code = self.codes[min(self.calls, len(self.codes) - 1)]
        self.calls += 1
        action = Action((Precision(code),) * self._config.n_groups, 1.0, BatchMove.KEEP)
        return encode(action, self._config), None


def _events(folder):
    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    return events


def _points(events, tag):
    return [(event.step, event.value) for event in events.Scalars(tag)]


def _expected(steps, maps):
    """Each tag's points for the maps (all layers) in force at ``steps``: the first, then those that changed."""
    written = [i for i, row in enumerate(maps) if i == 0 or row != maps[i - 1]]
    return {tag: [(steps[i], float(maps[i][layer])) for i in written] for tag, layer in zip(TAGS, (0, 2), strict=True)}


def test_compare_writes_each_controllable_layers_precision_where_the_trace_changed_it(tmp_path):
    """fp32 at the start, bf16 from the second decision, fp16 from the fourth: the trace holds the map in force over
    each interval (a decision's map from the next row on), TensorBoard the same at its first row and at each change."""
    config = ControllerConfig(interval_steps=2)
    task = replace(get_task("synthetic"), build_model=lambda: _Net(32, 10))
    policy = _Scripted([0, 1, 1, 2], config)
    result = run_controller(task, policy, 0, epochs=0.5, config=config, device="cpu", log_dir=tmp_path)
    maps = [row["precisions"] for row in result.trace]
    assert result.layer_names == ["blocks.in proj", "blocks.norm", "blocks.head"]
    assert [row[1] for row in maps] == [0] * len(maps)  # the norm stays fp32
    assert [row[0] for row in maps][:6] == [0, 0, 1, 1, 2, 2]  # a change is in force from the next row
    events = _events(tmp_path)
    steps = [step for step, _ in _points(events, "memory/peak_bytes")]  # a point at each trace row
    assert len(steps) == len(maps) >= 6
    assert sorted(tag for tag in events.Tags()["scalars"] if tag.startswith("precision/")) == TAGS
    expected = _expected(steps, maps)
    assert expected[TAGS[0]] == [(steps[0], 0.0), (steps[2], 1.0), (steps[4], 2.0)]
    for tag in TAGS:
        assert _points(events, tag) == expected[tag], tag


def test_a_static_compare_row_writes_its_map_once_and_its_heat_map_as_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    config = ControllerConfig(interval_steps=2)
    task = replace(get_task("synthetic"), build_model=lambda: _Net(32, 10))
    result = run_controller(task, "bf16", 0, epochs=0.5, config=config, device="cpu", log_dir=tmp_path)
    assert len(result.trace) > 2 and all(row["precisions"] == [1, 0, 1] for row in result.trace)
    events = _events(tmp_path)
    first = _points(events, "memory/peak_bytes")[0][0]
    for tag in TAGS:
        assert _points(events, tag) == [(first, 1.0)], tag
    (image,) = events.Images("precision/map")
    assert image.step == result.steps and image.width > 0 and image.height > 0


def _controller_run(tmp_path, policy, n_steps=24):
    """A Controller on ``_Net`` deciding every 2 steps over ``n_steps``; each decision's step and the map it left."""
    torch.manual_seed(0)
    model = _Net(8, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16 * n_steps, 8, generator=generator)
    y = (x[:, 0] > 0).long()
    ctl = Controller(model, optimizer, policy=policy, config=ControllerConfig(interval_steps=2), log_dir=tmp_path)
    decided = []
    for xb, yb in ctl.loader((x, y), batch_size=16, epochs=1):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(xb), yb)
        ctl.step(loss)
        if len(ctl.decisions) > len(decided):
            decided.append((ctl.steps, [int(p) for p in ctl.decisions[-1].precisions]))
    ctl.close()
    return decided


def test_a_static_controller_writes_its_map_once(tmp_path):
    decided = _controller_run(tmp_path, "bf16")
    assert len(decided) > 3 and all(precisions == [1, 0, 1] for _, precisions in decided)
    events = _events(tmp_path)
    assert [step for step, _ in _points(events, "controller/low_precision_share")] == [s for s, _ in decided]
    assert sorted(tag for tag in events.Tags()["scalars"] if tag.startswith("precision/")) == TAGS
    for tag in TAGS:
        assert _points(events, tag) == [(decided[0][0], 1.0)], tag


def test_a_controller_writes_its_map_where_a_decision_changed_it(tmp_path):
    config = ControllerConfig(interval_steps=2)
    decided = _controller_run(tmp_path, _Scripted([0, 0, 1, 1, 1, 2, 0], config))
    maps = [precisions for _, precisions in decided]
    assert [row[0] for row in maps] == [0, 0, 1, 1, 1, 2, *[0] * (len(maps) - 6)] and len(maps) >= 8
    events = _events(tmp_path)
    steps = [step for step, _ in decided]
    expected = _expected(steps, maps)
    assert expected[TAGS[1]] == [(steps[0], 0.0), (steps[2], 1.0), (steps[5], 2.0), (steps[6], 0.0)]
    for tag in TAGS:
        assert _points(events, tag) == expected[tag], tag
    assert np.all([row[1] == 0 for row in maps])  # the norm's fp32, never logged


def test_a_controller_rewound_to_a_checkpoint_writes_its_map_again(tmp_path):
    """Loading a checkpoint purges the log's later points, the map's among them: the map is written again at the next
    decision, though it is the one written last (a static run's, written once)."""
    torch.manual_seed(0)
    model = _Net(8, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(16 * 8, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    ctl = Controller(model, optimizer, policy="bf16", config=ControllerConfig(interval_steps=2), log_dir=tmp_path)
    start = ctl.state_dict()

    def train():
        for xb, yb in ctl.loader((x, y), batch_size=16, epochs=1):
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(xb), yb)
            ctl.step(loss)

    train()
    ctl.load_state_dict(start)  # back to step 0: the points after it are purged
    train()
    ctl.close()
    events = _events(tmp_path)
    for tag in TAGS:
        assert _points(events, tag) == [(2, 1.0)], tag


def test_a_compare_run_that_raises_closes_its_writer(tmp_path, monkeypatch):
    """Its event file is flushed and its handle let go: a run that raised left its writer open (and its last points
    unwritten) for as long as the process lived."""
    import triaccel_rl.compare as compare_module

    writers = []
    make_writer = compare_module._writer

    def kept(log_dir):
        writers.append(make_writer(log_dir))
        return writers[-1]

    monkeypatch.setattr(compare_module, "_writer", kept)
    config = ControllerConfig(interval_steps=2)
    task = replace(get_task("synthetic"), build_model=lambda: _Net(32, 10))

    class Failing(_Scripted):
        def predict(self, *args, **kwargs):
            if self.calls == 2:
                raise RuntimeError("the policy's third decision")
            return super().predict(*args, **kwargs)

    with pytest.raises(RuntimeError, match="third decision"):
        run_controller(task, Failing([1], config), 0, epochs=0.5, config=config, device="cpu", log_dir=tmp_path)
    (writer,) = writers
    assert writer.file_writer is None  # closed
    events = _events(tmp_path)
    assert [value for _, value in _points(events, TAGS[0])] == [0.0, 1.0]  # the points before the error, flushed


def test_a_heat_map_that_cannot_be_drawn_costs_the_run_nothing(tmp_path, monkeypatch, caplog):
    pytest.importorskip("matplotlib")
    import triaccel_rl.plots as plots_module

    def broken(run):
        raise ValueError("a figure too tall")

    monkeypatch.setattr(plots_module, "precision_map_image", broken)
    config = ControllerConfig(interval_steps=2)
    task = replace(get_task("synthetic"), build_model=lambda: _Net(32, 10))
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        result = run_controller(task, "bf16", 0, epochs=0.5, config=config, device="cpu", log_dir=tmp_path)
    assert result.steps > 0 and result.trace
    assert "the precision map's image for TensorBoard was not drawn (ValueError: a figure too tall)" in caplog.text
    events = _events(tmp_path)
    assert events.Tags()["images"] == [] and _points(events, TAGS[0])  # the scalars are there
