"""CPU checks of the CUDA-graph plumbing: where graphs cannot run, the run says why (GPU tests replay them)."""

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
