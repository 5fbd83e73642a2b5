"""fp16's loss scale backing off from 2**16 at a run's start is no overflow of the run's (``Controller``).

``GradScaler``'s first steps overflow until the scale has found the run's level. The Controller read those skips as
the run's overflow rate, and its shield moved a static fp16 run's layers to bf16 for the interval after (to fp32 on a
GPU without bf16). Until the first fp16 update goes in, up to 16 skips (2**16 down to 1) are left out of the rate.
"""

from __future__ import annotations

import torch
from torch import nn

from triaccel_rl.config import ControllerConfig
from triaccel_rl.controller import _SCALE_SEARCH_SKIPS, Controller
from triaccel_rl.models import SmallResNet
from triaccel_rl.types import Precision


def _run(
    steps: int, spoil: bool = False, spoil_at: frozenset[int] = frozenset(), nan_at: frozenset[int] = frozenset()
) -> Controller:
    """A small ResNet under static fp16 (emulated on the CPU), batches of 8, an interval of 20 steps. ``spoil``: every
    gradient of the head made infinite (a model whose fp16 gradients overflow at any scale); ``spoil_at``: only at
    those steps; ``nan_at``: the loss NaN at those steps."""
    torch.manual_seed(0)
    model = SmallResNet(1, (2, 2, 2, 2), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = [0]
    model.head.weight.register_hook(lambda grad: grad * float("inf") if spoil or step[0] in spoil_at else grad)
    x, y = torch.randn(steps * 8, 1, 8, 8), torch.randint(0, 10, (steps * 8,))
    ctl = Controller(model, optimizer, policy="static-fp16", config=ControllerConfig(interval_steps=20))
    for xb, yb in ctl.loader((x, y), batch_size=8, epochs=1):
        optimizer.zero_grad()
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(xb).float(), yb)
        ctl.step(loss * float("nan") if step[0] in nan_at else loss)
        step[0] += 1
    return ctl


def test_a_static_fp16_run_stays_in_fp16_through_its_scales_first_back_off():
    ctl = _run(60)
    assert ctl.steps == 60 and ctl.decision_count == 3
    assert 0 < ctl.skipped_steps <= _SCALE_SEARCH_SKIPS  # the back-off happened, and is counted
    for report in ctl.decisions:
        assert not report.refused, report.refused
        assert Precision.BF16 not in report.precisions
    assert Precision.FP16 in ctl.precisions and Precision.BF16 not in ctl.precisions
    ctl.close()


def test_skips_past_the_scales_search_are_the_runs_overflows():
    """Every step skipped: the search takes 16 of the first interval's 20 skips, and the other 4 (a rate of 0.2,
    over the 0.05 limit) move the fp16 layers out of fp16."""
    ctl = _run(40, spoil=True)
    assert ctl.skipped_steps == ctl.steps == 40
    first = ctl.decisions[0]
    assert any("out of fp16" in reason and "overflow rate 0.2 " in reason for reason in first.refused), first.refused
    assert Precision.FP16 not in first.precisions
    ctl.close()


def test_the_first_fp16_intervals_skips_are_the_search_and_a_later_intervals_the_runs():
    """Overflows at steps 10 and 11, after updates went in: in the interval of the first fp16 update they are taken
    for the scale's search (a scale that let one update through may still be above the run's level), so the run stays
    in fp16; the same two in the next interval are the run's (2 of 20, over the 0.05 limit), and it moves to bf16."""
    first = _run(40, spoil_at=frozenset({10, 11}))
    assert [bool(report.refused) for report in first.decisions] == [False, False]
    first.close()
    later = _run(40, spoil_at=frozenset({30, 31}))
    assert not later.decisions[0].refused
    assert any("out of fp16" in reason and "overflow rate 0.1 " in reason for reason in later.decisions[1].refused)
    later.close()


def test_a_rollback_to_a_copy_from_before_the_back_off_brings_its_allowance_back():
    """An interval of NaN losses rolls back to the starting copy, whose loss scale is 2**16 again: the back-off that
    follows is the scale's search again, not the run's overflows (before, the run moved to bf16 for it)."""
    ctl = _run(80, nan_at=frozenset(range(20, 40)))
    assert ctl.rollbacks == 1
    assert [bool(report.refused) for report in ctl.decisions] == [False, True, False, False]  # the NaN interval's
    assert Precision.BF16 not in ctl.decisions[-1].precisions
    ctl.close()


def test_a_resumed_run_takes_the_search_as_over_unless_its_scale_is_untouched():
    """The allowance is not in the checkpoint: a loaded scale still at 2**16 with no clean step (saved before any fp16
    step) has its whole back-off ahead; any other is taken as at the saved run's level."""

    def resumed(state: dict) -> Controller:
        torch.manual_seed(0)
        model = SmallResNet(1, (2, 2, 2, 2), 10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        ctl = Controller(model, optimizer, policy="static-fp16", config=ControllerConfig(interval_steps=20))
        ctl.load_state_dict(state)
        return ctl

    torch.manual_seed(0)
    model = SmallResNet(1, (2, 2, 2, 2), 10)
    fresh = Controller(model, torch.optim.SGD(model.parameters(), lr=0.01), policy="static-fp16")
    untouched = resumed(fresh.state_dict())  # saved before any step
    assert untouched._scale_search_left == _SCALE_SEARCH_SKIPS
    trained = _run(20)
    assert trained.skipped_steps > 0
    after = resumed(trained.state_dict())
    assert after._scale_search_left is None
    for ctl in (fresh, untouched, trained, after):
        ctl.close()
