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


def _run(steps: int, spoil: bool = False) -> Controller:
    """A small ResNet under static fp16 (emulated on the CPU), batches of 8, an interval of 20 steps; ``spoil``: every
    gradient of the head made infinite (a model whose fp16 gradients overflow at any scale)."""
    torch.manual_seed(0)
    model = SmallResNet(1, (2, 2, 2, 2), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if spoil:
        model.head.weight.register_hook(lambda grad: grad * float("inf"))
    x, y = torch.randn(steps * 8, 1, 8, 8), torch.randint(0, 10, (steps * 8,))
    ctl = Controller(model, optimizer, policy="static-fp16", config=ControllerConfig(interval_steps=20))
    for xb, yb in ctl.loader((x, y), batch_size=8, epochs=1):
        optimizer.zero_grad()
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(xb).float(), yb)
        ctl.step(loss)
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
