"""Deploy a controller in an ordinary PyTorch training loop (the five lines a user adds), on Fashion-MNIST."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from triaccel_rl.policies import make_policy

import triaccel_rl as ta
from triaccel_rl.data import load_fashion_mnist, to_float_images
from triaccel_rl.experiment import parse_args


@dataclass
class Args:
    """Command-line arguments (each field is a ``--flag``)."""

    policy: str = "heuristic"
    """fp32, bf16, fp16, heuristic, pretrained (the shipped policy), or a path to an SB3 policy zip."""
    epochs: int = 2
    """Passes over the training subset."""
    n_train: int = 10_000
    """Training samples used (a subset keeps the example quick on a CPU)."""
    batch_size: int = 128
    """Starting batch size; the controller may change it."""
    log_dir: str = "runs/controller_loop"
    """TensorBoard folder ('' for none)."""
    max_grad_norm: float = 5.0
    """Clip the gradient's total norm to this (``Controller(max_grad_norm=...)``)."""
    probe: int = 256
    """Held-out training samples (after the subset) for the estimator rounds (``Controller(probe=...)``); 0: none."""


def check(args: Args) -> None:
    """Raises ``SystemExit`` naming the first argument the example cannot run with, before any data is loaded."""
    for flag, value in (("--epochs", args.epochs), ("--n-train", args.n_train), ("--batch-size", args.batch_size)):
        if value < 1:
            raise SystemExit(f"{flag} {value} must be >= 1")
    if args.probe == 1 or args.probe < 0 or args.n_train + args.probe > 60_000:
        raise SystemExit(
            f"--probe {args.probe} must be 0 (no rounds) or >= 2, with --n-train + --probe within Fashion-MNIST's "
            "60000 training images"
        )
    if not (math.isfinite(args.max_grad_norm) and args.max_grad_norm > 0):
        raise SystemExit(f"--max-grad-norm {args.max_grad_norm} must be a positive finite number")
    try:
        policy = make_policy(args.policy)
    except (ValueError, TypeError) as error:  # an unknown name, a missing or unusable zip
        raise SystemExit(f"--policy: {error}") from None
    if hasattr(policy, "prepare"):  # as the Controller refuses it, but before the data loads
        raise SystemExit(
            f"--policy {args.policy}: a batch finder is a compare baseline that searches its batch on a TrainingRun, "
            "not a policy for your own loop; use a static policy (fp32, bf16, fp16), a heuristic or pretrained"
        )


def main(args: Args) -> float:
    check(args)
    data = load_fashion_mnist()
    images = (to_float_images(data.train_images[: args.n_train + args.probe]) - 0.286) / 0.353
    x, y = images[: args.n_train], data.train_labels[: args.n_train]
    # Held out of training: the estimator rounds (Hessian trace, gradient noise) measure the model on these
    probe = (
        (images[args.n_train :], data.train_labels[args.n_train : args.n_train + args.probe]) if args.probe else None
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # Your own LR schedule keeps working under the controller, which multiplies the LR it sets. The batch size may
    # change, so the schedule follows the samples seen rather than the step count.
    seen, total = 0, args.epochs * len(y)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 0.5 * (1 + math.cos(math.pi * seen / total)))

    # --- the controller: five lines in the loop -------------------------------------------------
    ctl = ta.Controller(
        model,
        optimizer,
        policy=args.policy,
        memory=ta.MemoryBudget(fraction=0.9),
        log_dir=args.log_dir or None,
        max_grad_norm=args.max_grad_norm,
        probe=probe,
        loss_fn=nn.functional.cross_entropy if probe is not None else None,
    )
    for xb, yb in ctl.loader((x, y), batch_size=args.batch_size, epochs=args.epochs):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(xb), yb)
        ctl.step(loss)
        seen += len(yb)
        scheduler.step()
    ctl.close()
    # ----------------------------------------------------------------------------------------------

    model.eval()
    with torch.no_grad():
        test_x = ((to_float_images(data.test_images) - 0.286) / 0.353).to(device)
        accuracy = (model(test_x).argmax(1).cpu() == data.test_labels).float().mean().item()
    final = ctl.decisions[-1] if ctl.decisions else None
    print(f"steps {ctl.steps}, decisions {len(ctl.decisions)}, test accuracy {100 * accuracy:.2f}%")
    if ctl.signals is not None:
        rounds, refused = ctl.signals.extra["rounds"], ctl.signals.extra["rounds_refused_for_budget"]
        print(
            f"estimator rounds {rounds} (refused for the overhead budget: {refused}), curvature from "
            f"{ctl.signals.extra['curvature_source']}"
        )
    if final is not None:
        print(
            f"final batch {final.batch_size}, LR scale {final.lr_scale}, "
            f"precisions {[p.name.lower() for p in final.precisions]}"
        )
    return accuracy


def parse(argv: list[str] | None = None) -> Args:
    return parse_args(Args, argv, description=__doc__)


if __name__ == "__main__":
    main(parse())
