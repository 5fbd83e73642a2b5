"""Localises where a run reading the fused step's 16-bit weight copies first departs from one casting its weights.

Usage (on a CUDA GPU): ``python scripts/check_weight_copies.py``. Two runs of the same task and seed, one with
``use_weight_copies`` (the default on the fused path) and one without, are stepped side by side. Before each
step it checks, bit for bit: the two runs' fp32 weights, the copies against ``weights.to(dtype)``, and, after the
step, the losses and the flat gradients. It prints the first quantity that differs, per task and precision.
"""

from __future__ import annotations

import torch

from triaccel_rl.training import TrainingRun


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _outputs(run: TrainingRun, x: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module name, first input, output) of every leaf module in one forward on ``x`` in the run's precisions."""
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = [
        module.register_forward_hook(
            lambda m, args, out, name=name: seen.append((name, args[0].detach().clone(), out.detach().clone()))
        )
        for name, module in run.model.named_modules()
        if not list(module.children())
    ]
    try:
        with torch.no_grad(), run.engine.precision.context():
            run.model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _first_module_apart(a: TrainingRun, b: TrainingRun) -> str:
    """The first leaf module whose output differs between the runs on the probe batch, and whether its input did."""
    x = a.probe_batch[0]
    for (name, in_a, out_a), (_, in_b, out_b) in zip(_outputs(a, x), _outputs(b, x), strict=True):
        if not torch.equal(out_a, out_b):
            same_input = torch.equal(in_a, in_b)
            return (
                f"first module apart: {name} ({out_a.dtype} out, {_max_diff(out_a, out_b):.3g}), its inputs "
                f"{'equal' if same_input else f'already differ by {_max_diff(in_a, in_b):.3g}'}"
            )
    return "one forward on the probe batch agrees in every module"


def check(task: str, precision: str, steps: int = 8, channels_last: bool = False) -> str:
    """Steps the two runs and returns the first difference found (or that there was none)."""
    runs = []
    for copies in (True, False):
        run = TrainingRun(task, seed=0, device="cuda", cuda_graphs=False, channels_last=channels_last)
        if not copies:
            run.engine.precision.use_weight_copies(None)
        run.set_precisions([precision] * run.n_layers)
        runs.append(run)
    with_copies, with_casts = runs
    store = with_copies.engine.store
    copy = store.fp16_copy if precision == "fp16" else store.bf16_copy
    dtype = copy.dtype
    for step in range(steps):
        a, b = store.params, with_casts.engine.store.params
        if not torch.equal(a, b):
            return f"step {step}: fp32 weights differ by {_max_diff(a, b):.3g} before the step"
        for layer in with_copies.engine.precision.controllable_indices:
            want = store.layer_segment(a, layer).to(dtype)
            got = store.layer_segment(copy, layer)
            if not torch.equal(want.view(torch.int16), got.view(torch.int16)):
                return f"step {step}: layer {layer}'s copy differs from its weights cast, by {_max_diff(want, got):.3g}"
        loss_a, loss_b = with_copies.step().loss, with_casts.step().loss
        if loss_a != loss_b:
            return (
                f"step {step}: losses differ ({loss_a!r} against {loss_b!r}) with equal weights and copies; "
                + _first_module_apart(with_copies, with_casts)
            )
    return f"no difference in {steps} steps"


def main() -> None:
    """Checks both tasks in bf16 and fp16 with deterministic cuDNN."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    for task, channels_last in (("synthetic", False), ("cnn-fmnist", True)):
        for precision in ("bf16", "fp16"):
            print(f"{task} {precision}: {check(task, precision, channels_last=channels_last)}", flush=True)


if __name__ == "__main__":
    main()
