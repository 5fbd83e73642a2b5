"""CPU checks of the CUDA-graph plumbing: where graphs cannot run, the run says why (GPU tests replay them)."""

import re

import pytest
import torch
from torch import nn

from triaccel_rl.graphs import StepGraphs, graph_unsupported
from triaccel_rl.training import TrainingRun


def test_graphs_are_refused_off_cuda_and_for_cumulative_batch_norm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=None))
    assert graph_unsupported(model, torch.device("cpu")) == "CUDA graphs need a CUDA device; this run is on cpu"
    assert graph_unsupported(model, torch.device("cuda")) == (
        "batch norm '1' has momentum=None (a cumulative average is computed on the host)"
    )
    assert graph_unsupported(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), torch.device("cuda")) == ""
    with pytest.raises(ValueError, match="need a CUDA device"):
        StepGraphs(model, torch.device("cpu"))
    # Without running statistics, momentum=None reads nothing on the host: refused before. A device may be a string.
    stateless = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, momentum=None, track_running_stats=False))
    assert graph_unsupported(stateless, "cuda") == ""
    assert graph_unsupported(model, "cuda:0").startswith("batch norm '1' has momentum=None")


@pytest.mark.parametrize("bad", [0, -1, 2.5, float("nan"), "3", None, True])
def test_graph_limits_are_whole_numbers_named_when_not(monkeypatch, bad):
    """nan passed "< 1" and held graphs without limit; 2.5 failed at the first capture; "3" and None as a bare
    comparison TypeError naming nothing."""
    monkeypatch.setattr("triaccel_rl.graphs.graph_unsupported", lambda model, device: "")
    for name in ("max_graphs", "warmup_passes"):
        with pytest.raises(ValueError, match="^" + re.escape(f"{name}={bad!r} must be a whole number >= 1") + "$"):
            StepGraphs(nn.Linear(1, 1), torch.device("cpu"), **{name: bad})


def test_cuda_graphs_takes_a_bool_or_none_by_name():
    """ "no" was truthy: graphs on (and, off a GPU, an error naming cuda_graphs=True)."""
    for bad in ("no", "false", 0, 1):
        with pytest.raises(TypeError, match=rf"^cuda_graphs={bad!r} must be True, False or None"):
            TrainingRun("synthetic", device="cpu", cuda_graphs=bad)


def test_a_cpu_run_steps_eagerly_and_refuses_graphs_when_asked():
    assert TrainingRun("synthetic", device="cpu").graphs is None
    with pytest.raises(ValueError, match=r"cuda_graphs=True, but this run cannot capture its steps: CUDA graphs need"):
        TrainingRun("synthetic", device="cpu", cuda_graphs=True)


def test_a_probe_whose_capture_fails_runs_eagerly_and_is_not_captured_again(caplog):
    class FailingGraphs:  # what StepGraphs does when a capture raises (e.g. an op a graph cannot hold)
        calls = 0

        def run(self, *args, **kwargs):
            self.calls += 1
            raise RuntimeError("operation not permitted when stream is capturing")

    run = TrainingRun("synthetic", seed=0, device="cpu")
    eager = run.probe_loss()
    graphs = run.graphs = FailingGraphs()
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        assert [run.probe_loss(), run.probe_loss()] == [eager, eager]
    assert graphs.calls == 1 and "it runs eagerly in this configuration" in caplog.text
    run.set_precisions(["bf16"] * run.n_layers)  # another configuration: its capture is tried once
    run.probe_loss()
    assert graphs.calls == 2


class _Recorded:
    """Stands in for a captured CUDA graph on the CPU: a replay runs the body on the graph's static inputs."""

    def __init__(self, body, x, y, loss):
        self.body, self.x, self.y, self.loss = body, x, y, loss

    def replay(self):
        self.loss.copy_(self.body(self.x, self.y))


@pytest.fixture
def cpu_graphs(monkeypatch):
    """A ``StepGraphs`` on the CPU whose capture is ``_Recorded``: its keys, LRU and shared inputs are the real ones."""
    monkeypatch.setattr("triaccel_rl.graphs.graph_unsupported", lambda model, device: "")
    failures = []

    def record(self, x, y, body, zero_grad):
        if failures:
            raise failures.pop()
        loss = body(x, y).clone()
        return _Recorded(body, x, y, loss), loss, 0

    monkeypatch.setattr(StepGraphs, "_record", lambda self, x, y, body, zero_grad: record(self, x, y, body, zero_grad))
    graphs = StepGraphs(nn.Linear(1, 1), torch.device("cpu"), max_graphs=3)
    return graphs, failures


def _summed_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.sum(1) - y.to(x.dtype)).square().sum()  # a sum: four copies of one sample are not its loss


def test_a_key_replays_only_the_graph_of_its_inputs_layout(cpu_graphs):
    """Before the fix a key without the batch size (the probe's) replayed the graph of batch 4 on a batch of 1 copied
    into its inputs by broadcasting: the loss of four copies of that sample, silently."""
    graphs, _ = cpu_graphs
    x4, y4 = torch.arange(12.0).reshape(4, 3), torch.tensor([1, 2, 3, 4])
    assert graphs.run("same", x4, y4, _summed_loss, lambda: None) == _summed_loss(x4, y4)
    x1, y1 = torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([5])
    assert graphs.run("same", x1, y1, _summed_loss, lambda: None) == _summed_loss(x1, y1)
    assert graphs.run("same", x4.half(), y4, _summed_loss, lambda: None).dtype == torch.float16  # a dtype is its own
    assert graphs.run("same", x4.t().contiguous().t(), y4.int(), _summed_loss, lambda: None) == _summed_loss(x4, y4)
    assert graphs.captures == 4 and len(graphs) == 3  # four layouts, the first dropped (max_graphs=3)
    assert graphs.run("same", x1 + 1, y1, _summed_loss, lambda: None) == _summed_loss(x1 + 1, y1)  # replayed
    assert graphs.captures == 4 and graphs.replays == 5


def test_graphs_of_one_layout_share_inputs_which_go_with_the_last_of_them(cpu_graphs):
    graphs, failures = cpu_graphs
    x, y = torch.ones(2, 3), torch.zeros(2)
    for key in ("bf16", "fp16"):
        graphs.run(key, x, y, _summed_loss, lambda: None)
    assert len(graphs._inputs) == 1  # one static copy of (x, y) for both precision maps
    graphs.run("bf16", torch.ones(5, 3), torch.zeros(5), _summed_loss, lambda: None)
    graphs.run("bf16", torch.ones(6, 3), torch.zeros(6), _summed_loss, lambda: None)  # drops the first (2, 3) graph
    assert len(graphs._inputs) == 3  # the second (2, 3) graph still reads the shared inputs
    graphs.run("bf16", torch.ones(7, 3), torch.zeros(7), _summed_loss, lambda: None)  # drops it too
    assert sorted(layout[0] for layout in graphs._inputs) == [(5, 3), (6, 3), (7, 3)]
    failures.append(RuntimeError("operation not permitted when stream is capturing"))
    with pytest.raises(RuntimeError, match="not permitted"):
        graphs.run("bf16", torch.ones(8, 3), torch.zeros(8), _summed_loss, lambda: None)
    assert len(graphs) == 3 and len(graphs._inputs) == 3  # the failed capture's inputs are not kept


def test_a_fault_hook_set_after_building_runs_on_a_graphed_run(cpu_graphs, monkeypatch):
    """Graphs are off for a run built with a fault hook; one set later (as the OOM tests do) was skipped by every
    replayed step: an injection test on a GPU passed without injecting anything."""
    monkeypatch.setattr("triaccel_rl.training.graph_unsupported", lambda model, device: "")
    run = TrainingRun("synthetic", seed=0, device="cpu", cuda_graphs=True)
    run.step()
    assert run.graphs is not None and run.graphs.replays == 1
    points = []
    run.fault = points.append
    run.step()
    assert [point.phase for point in points] == ["forward", "backward"] and run.graphs.replays == 1  # eager
    run.fault = None
    run.step()
    assert run.graphs.replays == 2


def test_a_broadcast_batch_is_copied_into_a_dense_static_input(cpu_graphs):
    """One sample expanded to a batch (stride 0): a static buffer of its strides overlapped itself; copy_ refused."""
    graphs, _ = cpu_graphs
    x = torch.tensor([[1.0, 2.0, 3.0]]).expand(4, 3)
    y = torch.zeros(4)
    assert graphs.run("k", x, y, _summed_loss, lambda: None).item() == _summed_loss(x, y).item() == 144.0


def test_step_graphs_take_the_device_by_name_as_graph_unsupported_does(monkeypatch):
    monkeypatch.setattr("triaccel_rl.graphs.graph_unsupported", lambda model, device: "")
    graphs = StepGraphs(nn.Linear(1, 1), "cpu")  # was AttributeError: 'str' object has no attribute 'type'
    assert graphs.device == torch.device("cpu")
