"""Reference-path gradient statistics: one norm pass a step, values exactly as the two-pass computation gives them."""

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from triaccel_rl.config import ControllerConfig
from triaccel_rl.controller import Controller
from triaccel_rl.engine import StepEngine
from triaccel_rl.training import TrainingRun

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")  # WithEmpty's

CPU = torch.device("cpu")
MAX_GRAD_NORM = 0.5


def two_pass_stats(engine: StepEngine, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sq_sum``, ``abs_max`` and ``nonfinite`` as two ``_foreach_norm`` passes took them.

    The 2-norms, then the maxima; a gradient's elements are counted where its norm or its maximum is non-finite.
    """
    norms = torch.stack([norm.float() for norm in torch._foreach_norm(grads)])
    maxes = torch.stack(torch._foreach_norm([g if g.numel() else g.new_zeros(1) for g in grads], math.inf)).float()
    suspect = (~(torch.isfinite(norms) & torch.isfinite(maxes))).tolist()
    bad = torch.stack(
        [(~torch.isfinite(g)).sum().float() if s else torch.tensor(0.0) for g, s in zip(grads, suspect, strict=True)]
    )
    zeros, layer = torch.zeros(engine.n_layers), engine._layer_index
    return (
        zeros.index_add(0, layer, norms.square()),
        zeros.scatter_reduce(0, layer, maxes, "amax", include_self=True),
        zeros.index_add(0, layer, bad),
    )


def assert_identical(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).to(dtype)


def mixed() -> nn.Module:
    """float32 and float64 layers: two dtype groups for the clip, and norms of two dtypes in one stack."""
    model = mlp(torch.float32)
    model[2].double()
    return model


class WithEmpty(nn.Module):
    """A parameter of no elements: its maximum is a zero stand-in (an empty tensor has no infinity norm)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.empty = nn.Linear(6, 3), nn.Linear(0, 3)


def finite(grads: list[torch.Tensor]) -> None:
    """The seeded gradients as they are."""


def one_inf(grads: list[torch.Tensor]) -> None:
    grads[-1].view(-1)[1] = math.inf


def nan_and_minus_inf(grads: list[torch.Tensor]) -> None:
    grads[0].view(-1)[0] = math.nan
    grads[0].view(-1)[2] = -math.inf
    grads[1].view(-1)[0] = math.nan


def norm_overflows(grads: list[torch.Tensor]) -> None:
    """Finite elements whose 2-norm is infinite in float32 (1e40 squared sums): nothing is counted non-finite."""
    grads[0].fill_(1e20 if grads[0].dtype == torch.float32 else 1e200)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "float32": lambda: mlp(torch.float32),
    "float64": lambda: mlp(torch.float64),
    "mixed": mixed,
    "empty": WithEmpty,
}
EDITS = [finite, one_inf, nan_and_minus_inf, norm_overflows]


def set_gradients(model: nn.Module, edit: Callable[[list[torch.Tensor]], None]) -> list[torch.Tensor]:
    """Seeded gradients for every parameter, edited in place; returns copies of them."""
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
    edit([p.grad for p in model.parameters()])
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("clip", [False, True], ids=["no_clip", "clip"])
@pytest.mark.parametrize("track_abs_max", [True, False], ids=["abs_max", "no_abs_max"])
@pytest.mark.parametrize("edit", EDITS, ids=[e.__name__ for e in EDITS])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_step_statistics_equal_the_two_pass_computation(model_name, edit, track_abs_max, clip):
    model = MODELS[model_name]()
    plain = copy.deepcopy(model)
    engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), CPU)
    engine.track_abs_max = track_abs_max
    engine.max_grad_norm = MAX_GRAD_NORM if clip else None
    grads = set_gradients(model, edit)
    sq_sum, abs_max, nonfinite = two_pass_stats(engine, grads)

    stats, skipped = engine.step_after_backward(1.0)

    assert_identical(stats.sq_sum, sq_sum, "sq_sum")
    assert_identical(stats.nonfinite, nonfinite, "nonfinite")
    if track_abs_max:
        assert stats.abs_max is not None
        assert_identical(stats.abs_max, abs_max, "abs_max")
    else:
        assert stats.abs_max is None
    assert skipped == bool(nonfinite.sum() > 0)
    if edit is norm_overflows:  # finite elements: counted none, and the step is taken, as before
        assert not torch.isfinite(stats.sq_sum).all() and not skipped
    # The update, the clip's reuse of the norms included, is a plain loop's bit for bit
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for p, g in zip(plain.parameters(), grads, strict=True):
        p.grad = g.clone()
    if not skipped:
        if clip:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), MAX_GRAD_NORM)
        optimizer.step()
    for name, got in model.state_dict().items():
        assert torch.equal(got, plain.state_dict()[name]), f"{name} differs from a plain loop's"


@pytest.mark.parametrize("model_name", list(MODELS))
def test_grad_stats_keeps_abs_max_whatever_the_flag(model_name):
    model = MODELS[model_name]()
    engine = StepEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), CPU)
    engine.track_abs_max = False
    grads = set_gradients(model, nan_and_minus_inf)
    stats = engine.grad_stats()
    got_stats = (stats.sq_sum, stats.abs_max, stats.nonfinite)
    names = ("sq_sum", "abs_max", "nonfinite")
    for got, want, what in zip(got_stats, two_pass_stats(engine, grads), names, strict=True):
        assert got is not None
        assert_identical(got, want, what)


class NormCalls:
    """Counts ``torch._foreach_norm`` calls by their ord while on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counting, self.by_ord = False, {2.0: 0, math.inf: 0}
        original = torch._foreach_norm

        def counted(tensors, ord=2, dtype=None):
            if self.counting:
                self.by_ord[float(ord)] = self.by_ord.get(float(ord), 0) + 1
            return original(tensors, ord, dtype=dtype)

        monkeypatch.setattr(torch, "_foreach_norm", counted)


def test_controller_step_takes_no_infinity_norm_pass(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32", config=ControllerConfig())
    calls = NormCalls(monkeypatch)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    for _ in range(3):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        calls.counting = True
        ctl.step(loss)
        calls.counting = False
    ctl.close()
    assert calls.by_ord == {2.0: 3, math.inf: 0}, "the Controller reads no maxima: one 2-norm pass a step"


def test_training_run_takes_the_maxima_for_step_only(monkeypatch):
    run = TrainingRun("synthetic", seed=0, device="cpu")
    calls = NormCalls(monkeypatch)
    calls.counting = True
    run.train_interval(2)
    assert calls.by_ord[math.inf] == 0, "an interval reads no maxima"
    stats = run.step()
    assert calls.by_ord[math.inf] == 1
    assert stats.grad_abs_max.shape == (len(run.layers),) and (stats.grad_abs_max > 0).all()
