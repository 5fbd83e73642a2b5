"""The ``triaccel-rl`` command: ``compare`` controllers, ``train-policy`` with PPO, ``profile`` a GPU, ``tasks``."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

DEFAULT_CONTROLLERS = "fp32,bf16,fp16,heuristic"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what was run, for the results' records
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", handlers=[_AboveProgressBars()]
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # what was kept (train-policy's checkpoint, compare's .partial.json) is logged above
        print(f"triaccel-rl {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except (ValueError, OSError) as err:
        # Bad input (a file that cannot be read or written included): one clear line, no traceback from deep inside.
        print(f"triaccel-rl {args.command}: error: {_as_flags(str(err), vars(args))}", file=sys.stderr)
        return 2


def _as_flags(message: str, options: dict[str, Any]) -> str:
    """``message`` with the library's ``name=value`` of this command's options written as its flags, ``--name value``.

    The checks live in the library, whose messages name its arguments; on the command line the flag is what to fix.
    """
    flags = {name: name for name in options if name not in ("func", "command", "argv")}
    flags.update({library: flag for library, flag in _LIBRARY_NAMES.items() if flag in flags})
    names = "|".join(re.escape(name) for name in sorted(flags, key=len, reverse=True))
    # "(or None: ...)" is the library's: a flag left out is its None, and "None" cannot be typed for it.
    message = re.sub(r"\s*\(or None\b[^)]*\)", "", message)
    # A name that starts the message or follows a space, bracket or comma: not n_envs= in "n_steps*n_envs=256", nor
    # a call's keyword argument in a Python hint ("ControllerConfig(lr_scales=...)").
    after = r"(?:^|(?<=[\s\[,;])|(?<=(?<![\w.])\())"
    return re.sub(rf"{after}({names})=", lambda m: f"--{flags[m.group(1)].replace('_', '-')} ", message)


_LIBRARY_NAMES = {"total_timesteps": "timesteps", "warm_start_learning_rate": "warm_start_lr"}
"""The library's names for arguments whose flag is named otherwise (``train_policy(total_timesteps=...)``)."""


class _AboveProgressBars(logging.Handler):
    """The command's log handler: each record on stderr through ``tqdm.write``, a line of its own above the bars.

    Written to stderr beside a progress bar, a warning landed inside the bar's line, and the bar's next redraw ran on
    after it; ``tqdm.write`` clears the bars, writes the line and draws them again under it. The command's handler,
    not the library's: a library user's handlers are left as they are (``logging_redirect_tqdm`` on the package's
    logger added a handler beside root's, which printed each record a second time, into the bar; on root's, it
    replaced a user's console handlers for the bar's duration with ones at no level).
    """

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm  # the library's bars' class: its write clears those bars

        try:
            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except RecursionError:  # as logging.StreamHandler: a recursion is not a failure to write
            raise
        except Exception:
            self.handleError(record)


def _file_to_write(flag: str, path: str, example: str = "results.json") -> Path:
    """``path`` for a file written later, its folder made now: refused before minutes of work, not after."""
    from triaccel_rl.experiment import file_to_write  # the experiments scripts' check, one rule for both

    return file_to_write(flag, path, example)


def _folder_to_write(flag: str, path: str) -> Path:
    """``path`` for a folder written later, made now."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create this folder ({err})") from err
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write in this folder ({err})") from err
    return folder


@contextlib.contextmanager
def _folders_kept_only_on_success(*paths: str) -> Iterator[None]:
    """Removes the folders made for ``paths`` (files or folders) inside the block if it raises, when still empty.

    The library checks some arguments only when it runs (``train_policy``'s sizes, ``measure_profile``'s batch); a
    command refused there left the folders made for its outputs behind.
    """
    made: list[Path] = []
    for path in filter(None, paths):
        # and those along a link's target (a dangling --out link: file_to_write makes its target's folder)
        # (a folder listed twice is tried twice: emptied by a later path's removal, it goes at its second turn)
        for spelled in (Path(path), Path(os.path.realpath(path))):
            made.extend(p for p in (spelled, *spelled.parents) if not p.exists())  # deepest first
    try:
        yield
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty (a checkpoint written), or not a folder: kept
                folder.rmdir()
        raise


def _apart(**paths: str) -> None:
    """Raises when two of the output ``paths`` (by flag) are one, or a folder is inside ``out`` (a file).

    Either way a results file was written where a folder goes, found after every run had trained. A file inside a
    folder flag's path is fine.
    """
    given = {flag: Path(path).resolve() for flag, path in paths.items() if path}
    for (a, path_a), (b, path_b) in itertools.combinations(given.items(), 2):
        if path_a == path_b:
            raise ValueError(
                f"--{a.replace('_', '-')} and --{b.replace('_', '-')} are both {paths[a]}: give each its own"
            )
    if "out" in given:
        for flag, path in given.items():
            if given["out"] in path.parents:
                raise ValueError(
                    f"--{flag.replace('_', '-')} {paths[flag]} is inside --out {paths['out']}, the results file: "
                    "give it a folder of its own"
                )


_NO_PROGRESS_HELP = "hide the progress bar (without it: shown where stderr is a terminal, not in a file or a pipe)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triaccel-rl",
        description="Controllers for PyTorch training runs: per-layer precision, LR scale and batch size.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    compare = sub.add_parser(
        "compare",
        help="run controllers × seeds on a task and print a results table",
        description="Train a task under each controller and seed; print a table, write JSON and TensorBoard runs.",
    )
    compare.add_argument(
        "--task", default="mlp-fmnist", help="registered task (see `triaccel-rl tasks`; default %(default)s)"
    )
    compare.add_argument(
        "--controllers",
        default=DEFAULT_CONTROLLERS,
        help=(
            "comma-separated: fp32, bf16, fp16 (static); heuristic; its ablations heuristic-precision "
            "(precision rule only), heuristic-elastic (batch rule only), heuristic-second-order (LR rule only, "
            "with curvature-scaled per-layer LR factors); batch-finder, batch-finder-bf16, batch-finder-fp16 "
            "(largest batch that fits, fixed); pretrained (the policy shipped with the package); SB3 .zip "
            "paths; or plain-fp32, plain-bf16, plain-fp16: your own PyTorch loop (torch.optim, autocast, GradScaler "
            f"for fp16; needs --cost-mode measured, the default on a GPU) (default {DEFAULT_CONTROLLERS})"
        ),
    )
    compare.add_argument("--seeds", type=int, default=2, help="number of seeds (0..N-1; default %(default)s)")
    compare.add_argument(
        "--epochs", type=float, default=3.0, help="training budget per run, in epochs (default %(default)g)"
    )
    compare.add_argument(
        "--interval-steps",
        type=int,
        default=None,
        help="optimizer steps between decisions (default: the preset's; 20 for default)",
    )
    compare.add_argument(
        "--preset",
        default="default",
        help="controller settings (ControllerConfig.preset): default, safe, aggressive, or anneal (the heuristic "
        "also anneals the LR on a late plateau, with a decision every interval) (default %(default)s)",
    )
    compare.add_argument(
        "--lr-scales",
        default=None,
        help="the LR multipliers the controllers may pick, comma-separated, 1 among them (default: the preset's; "
        "e.g. 0.25,0.5,0.75,1,1.25,1.5 lets --preset anneal cut on to x0.25). A policy zip is tied to its ladder",
    )
    compare.add_argument(
        "--eval-every", type=int, default=None, help="evaluate the test metric every N decisions (default 5)"
    )
    compare.add_argument(
        "--eval-every-steps",
        type=int,
        default=None,
        help="evaluate every N optimizer steps instead, in every row alike (decision intervals may stretch on a GPU)",
    )
    compare.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    compare.add_argument(
        "--profile",
        default=None,
        help="hardware-profile JSON (`triaccel-rl profile` writes one) that prices steps in modelled time (default: "
        "the H200 profile shipped with the package)",
    )
    compare.add_argument(
        "--cost-mode",
        choices=("measured", "profile"),
        default=None,
        help="time charged: measured, or from the hardware profile (default: measured on GPU, profile on CPU)",
    )
    compare.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clip every row's gradient norm to this (Controller(max_grad_norm=...); clip_grad_norm_ in plain rows)",
    )
    compare.add_argument(
        "--reference",
        default=None,
        help="row the time ratios are taken against, as the table names it (default: static-fp32 when it runs)",
    )
    compare.add_argument(
        "--log-dir", default="runs/compare", help="TensorBoard folder ('' for none; default %(default)s)"
    )
    compare.add_argument(
        "--out", default="runs/compare/results.json", help="JSON results file ('' for none; default %(default)s)"
    )
    compare.add_argument("--plots", default="", help="folder for PNG plots ('' for none; needs matplotlib)")
    compare.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS_HELP)
    compare.set_defaults(func=_compare)

    train = sub.add_parser(
        "train-policy",
        help="train a controller policy with PPO on vectorised TriAccel-v0 environments",
        description="Train an SB3 PPO policy on TriAccel-v0 over one or more tasks; saves a .zip.",
    )
    train.add_argument(
        "--tasks", default="synthetic", help="comma-separated tasks; envs cycle through them (default %(default)s)"
    )
    train.add_argument(
        "--timesteps",
        type=int,
        default=4096,
        help="environment steps (decisions) to train for, rounded up to whole rollouts of --n-steps x --n-envs; "
        "with --resume, steps more than the policy has trained (default %(default)s)",
    )
    train.add_argument("--n-envs", type=int, default=2, help="parallel environments (default %(default)s)")
    train.add_argument(
        "--vec", choices=("dummy", "subproc"), default="subproc", help="vectorisation backend (default %(default)s)"
    )
    train.add_argument(
        "--budget-intervals",
        type=float,
        default=16.0,
        help="episode time budget, in intervals of fp32 at the base batch (the return is the progress within it; "
        "default %(default)g)",
    )
    train.add_argument(
        "--max-decisions", type=int, default=None, help="safety cap on decisions per episode (default: 8 × budget)"
    )
    train.add_argument(
        "--interval-steps", type=int, default=20, help="optimizer steps per decision (default %(default)s)"
    )
    train.add_argument(
        "--n-steps", type=int, default=None, help="PPO rollout length per environment (default 128; --resume: its own)"
    )
    train.add_argument(
        "--batch-size", type=int, default=None, help="PPO minibatch size (default 64; --resume: the policy's own)"
    )
    train.add_argument(
        "--ent-coef",
        type=float,
        default=None,
        help="PPO's entropy bonus, >= 0 (default 0: none; --resume: the policy's own)",
    )
    train.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="PPO's Adam step size, > 0 (default 3e-4; --resume: the policy's own)",
    )
    train.add_argument("--seed", type=int, default=0, help="seeds PPO and the environments (default %(default)s)")
    train.add_argument(
        "--warm-start",
        default=None,
        help="a policy whose decisions PPO's policy first imitates, e.g. heuristic (default: none, PPO from scratch; "
        "ignored with --resume)",
    )
    train.add_argument(
        "--warm-start-steps",
        type=int,
        default=None,
        help="teacher decisions imitated by --warm-start, not counted in --timesteps (default 512)",
    )
    train.add_argument(
        "--warm-start-epochs", type=int, default=None, help="passes of the imitation over those decisions (default 200)"
    )
    train.add_argument(
        "--warm-start-lr",
        type=float,
        default=None,
        help="the imitation's own Adam step size, > 0, leaving PPO's optimizer untouched (default: PPO's optimizer, "
        "at --learning-rate)",
    )
    train.add_argument(
        "--out",
        default="runs/policy.zip",
        help="where to save the policy zip (its observation range goes beside it, .obs.json; give each policy a "
        "folder of its own: evaluations and checkpoints are written beside it; default %(default)s)",
    )
    train.add_argument("--log-dir", default="runs/ppo", help="TensorBoard folder ('' for none; default %(default)s)")
    train.add_argument("--eval-tasks", default="", help="comma-separated held-out tasks evaluated periodically")
    train.add_argument(
        "--eval-every", type=int, default=0, help="environment steps between evaluations (default 0: none)"
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="environment steps between checkpoints, written to checkpoints/<out stem>_<steps>_steps.zip beside --out "
        "with their .obs.json (default 0: none; Ctrl-C saves the last finished update's weights either way); --resume "
        "takes one",
    )
    train.add_argument("--resume", default=None, help="policy zip to continue training from")
    train.add_argument("--torch-threads", type=int, default=None, help="PyTorch threads per environment")
    train.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS_HELP)
    train.set_defaults(func=_train_policy)

    profile = sub.add_parser(
        "profile",
        help="measure this device's per-precision speed and memory factors into a hardware-profile JSON",
        description="Time a ResNet-18 training step in fp32, bf16 and fp16 and write a hardware profile.",
    )
    profile.add_argument("--out", default="profile.json", help="where to write the profile JSON (default %(default)s)")
    profile.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    profile.add_argument(
        "--batch-size", type=int, default=256, help="batch of the reference workload (default %(default)s)"
    )
    profile.add_argument(
        "--steps", type=int, default=20, help="timed steps per precision, their median taken (default %(default)s)"
    )
    profile.add_argument("--small", action="store_true", help="small ResNet instead of ResNet-18 (quick check)")
    profile.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS_HELP)
    profile.set_defaults(func=_profile)

    tasks = sub.add_parser("tasks", help="list the registered tasks", description="List the registered tasks.")
    tasks.set_defaults(func=_tasks)
    return parser


def _compare(args: argparse.Namespace) -> int:
    from triaccel_rl.compare import check_comparison, compare, format_table, row_names, summarize, write_json
    from triaccel_rl.config import ControllerConfig, HardwareProfile
    from triaccel_rl.experiment import parse_floats
    from triaccel_rl.tasks import get_task

    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds} must be >= 1")
    controllers = [c.strip() for c in args.controllers.split(",") if c.strip()]
    if not controllers:
        raise ValueError("--controllers is empty")
    twice = sorted({c for c in controllers if controllers.count(c) > 1})
    if twice:
        raise ValueError(f"--controllers lists {', '.join(twice)} more than once; each row runs every seed already")
    if args.eval_every is not None and args.eval_every_steps is not None:
        raise ValueError("--eval-every and --eval-every-steps both given: they are two spacings of one evaluation")
    task = get_task(args.task)  # before any folder is made
    _apart(out=args.out, plots=args.plots, log_dir=args.log_dir)
    if args.plots:
        try:
            import matplotlib  # noqa: F401  (plots are drawn after every run: missing, say so now)
        except ImportError:
            raise ValueError("--plots needs matplotlib: pip install matplotlib (or leave --plots out)") from None
    profile = HardwareProfile.load(args.profile) if args.profile else None
    overrides: dict[str, Any] = {} if args.interval_steps is None else {"interval_steps": args.interval_steps}
    if args.lr_scales is not None:
        overrides["lr_scales"] = parse_floats(args.lr_scales, "--lr-scales")
    config = ControllerConfig.preset(args.preset, **overrides)
    check_comparison(  # what compare() refuses before its first run (a bad --epochs, say), refused before any folder
        task,
        controllers,
        list(range(args.seeds)),
        epochs=args.epochs,
        config=config,
        cost_mode=args.cost_mode,
        device=args.device,
        eval_every=5 if args.eval_every is None else args.eval_every,
        eval_every_steps=args.eval_every_steps,
        max_grad_norm=args.max_grad_norm,
    )
    if profile is not None and not _modelled(args):  # said before the runs, not found out from the table after them
        print(
            f"triaccel-rl compare: note: --profile {args.profile} prices time only with --cost-mode profile; this "
            "comparison measures it (the profile still sizes the memory model)",
            file=sys.stderr,
        )
    names = row_names(controllers, config)
    if args.reference is not None and args.reference not in names:
        raise ValueError(
            f"--reference {args.reference!r} is not a row of this comparison; its rows: {', '.join(names)}"
        )
    # Made last: a comparison refused for its arguments leaves no folders behind, one refused for a later folder's
    # the earlier ones' neither.
    with _folders_kept_only_on_success(args.out, args.plots, args.log_dir):
        if args.out:
            _file_to_write("--out", args.out)
        if args.plots:
            _folder_to_write("--plots", args.plots)
        if args.log_dir:
            _folder_to_write("--log-dir", args.log_dir)
    if args.out and Path(args.out).is_file():  # replaced at the end: said before the runs, not found out after
        print(
            f"triaccel-rl compare: note: --out {args.out} exists; this comparison's results replace it when it ends "
            "(give another --out to keep it)",
            file=sys.stderr,
        )
    if args.log_dir and next(Path(args.log_dir).rglob("events.out.tfevents.*"), None) is not None:  # the user's: kept
        print(
            f"triaccel-rl compare: --log-dir {args.log_dir} holds an earlier comparison's TensorBoard runs; the "
            "new curves are written beside them, and runs of the same name overlay (give another --log-dir)",
            file=sys.stderr,
        )
    reference = args.reference if args.reference is not None else "static-fp32" if "static-fp32" in names else None
    command = "triaccel-rl " + shlex.join(args.argv)
    modelled = _modelled(args)
    # Modelled time is the profile's device's: the shipped H200 profile, or one the user measured (maybe on a CPU).
    modelled_on = (profile or HardwareProfile.load()).device.split(" (")[0]
    label = f"time (s, modelled {modelled_on})" if modelled else "time (s)"
    # What the times are to and what trained, in the file itself: an archived results.json whose task's target was
    # recalibrated since could not say what its times to target were measured against.
    meta = {
        "task": task.name,
        "model": task.description,
        "target_metric": task.target_metric,
        "epochs": args.epochs,
        "seeds": list(range(args.seeds)),
        # How the times were measured, where and against which row: a failed comparison's .partial.json, the only
        # record then, lacked them (modelled or measured seconds depend on the machine, which the command does not say)
        "time_mode": label,
        "reference": reference,
        "device": _device_name(args.device),
    }
    from triaccel_rl.experiment import partial_path

    partial = partial_path(Path(args.out)) if args.out else None
    if partial is not None and partial.exists():  # an earlier comparison's runs, maybe its only record: kept
        earlier = _set_aside(partial)
        print(f"triaccel-rl compare: an earlier comparison's finished runs moved to {earlier}", file=sys.stderr)

    def keep(done: list[Any]) -> None:  # the runs so far: a failure in a later run loses none of them
        if partial is not None:  # the ratios to the reference row once it has run (meta named it, the rows had none)
            # Summarized: the rows whose seeds have all run (a row still running was ranked and compared on the
            # seeds it had: one seed's time ranked first beside rows of two). Every run so far is kept in the file.
            finished = [r for r in done if sum(other.controller == r.controller for other in done) == args.seeds]
            ran = reference if reference in {result.controller for result in finished} else None
            fields = {**meta, "reference": ran}
            write_json(done, summarize(finished, reference=ran), partial, **fields, command=command, complete=False)

    start = time.perf_counter()
    try:
        results = compare(
            args.task,
            controllers,
            list(range(args.seeds)),
            epochs=args.epochs,
            config=config,
            cost_mode=args.cost_mode,
            device=args.device,
            log_dir=args.log_dir or None,
            show_progress=_progress(args),
            eval_every=5 if args.eval_every is None else args.eval_every,
            eval_every_steps=args.eval_every_steps,
            max_grad_norm=args.max_grad_norm,
            profile=profile,
            on_result=keep,
        )
    except BaseException:
        if partial is not None and partial.exists():
            print(f"triaccel-rl compare: the runs that finished are in {partial}", file=sys.stderr)
        raise
    rows = summarize(results, reference=reference)
    print()
    print(
        f"Task {task.name}: {task.description}; target accuracy {100 * task.target_metric:.1f}%, "
        f"{args.epochs:g} epochs, seeds 0..{args.seeds - 1}"
    )
    print(format_table(rows, time_label=label, reference=reference))
    print(
        f"\nwall time {time.perf_counter() - start:.1f} s" + (f"; TensorBoard: {args.log_dir}" if args.log_dir else "")
    )
    if args.out:
        # The row the ratios are to (None: no ratios) and where the runs trained, which the rows do not say.
        try:
            write_json(
                results,
                rows,
                args.out,
                **meta,
                command=command,
            )
        except BaseException:
            if partial is not None and partial.exists():
                print(f"triaccel-rl compare: the runs that finished are in {partial}", file=sys.stderr)
            raise
        if partial is not None:
            partial.unlink(missing_ok=True)
        print(f"results: {args.out}")
    if args.plots:
        from triaccel_rl.plots import plot_comparison

        paths = plot_comparison(
            results, args.plots, target=task.target_metric, time_label=label.split("(")[-1].rstrip(")")
        )
        print(f"plots: {', '.join(str(p) for p in paths)}")
    return 0


def _set_aside(path: Path) -> Path:
    """Renames ``path`` to the first free ``<stem>_2<suffix>``, ``<stem>_3<suffix>``, ...; returns the new path.

    A comparison deleted the ``.partial.json`` an earlier one had left (the runs that finished before a failure or a
    Ctrl-C, named as their only record) before its own first run.
    """
    n = 2
    while (target := path.with_name(f"{path.stem}_{n}{path.suffix}")).exists():
        n += 1
    path.rename(target)
    return target


def _train_policy(args: argparse.Namespace) -> int:

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError(
            f"--tasks {args.tasks!r} names no task: give one or more, comma-separated (`triaccel-rl tasks`)"
        )
    if Path(args.out).suffix != ".zip":
        raise ValueError(f"--out {args.out} must name a .zip file, such as runs/policy.zip")
    _apart(out=args.out, log_dir=args.log_dir)  # one path for both trained, then failed at the policy's save
    with _folders_kept_only_on_success(args.out, args.log_dir):
        path = _run_train_policy(args, tasks)
    print(f"saved policy: {path}")
    return 0


def _run_train_policy(args: argparse.Namespace, tasks: list[str]) -> Path:
    from triaccel_rl.rl import train_policy

    _file_to_write("--out", args.out, example="policy.zip")
    if args.log_dir:
        _folder_to_write("--log-dir", args.log_dir)
    # Left out, train_policy's own defaults (512 decisions, 200 passes): it takes no None for them
    warm_sizes = {
        name: value
        for name, value in (("warm_start_steps", args.warm_start_steps), ("warm_start_epochs", args.warm_start_epochs))
        if value is not None
    }
    return train_policy(
        tasks,
        total_timesteps=args.timesteps,
        n_envs=args.n_envs,
        vec=args.vec,
        budget_intervals=args.budget_intervals,
        max_decisions=args.max_decisions,
        interval_steps=args.interval_steps,
        n_steps=args.n_steps,
        batch_size=args.batch_size,
        ent_coef=args.ent_coef,
        learning_rate=args.learning_rate,
        seed=args.seed,
        out=Path(args.out),
        log_dir=args.log_dir or None,
        eval_tasks=[t.strip() for t in args.eval_tasks.split(",") if t.strip()],
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        progress_bar=_progress(args),
        torch_threads=args.torch_threads,
        warm_start=args.warm_start,
        warm_start_learning_rate=args.warm_start_lr,
        **warm_sizes,
    )


def _profile(args: argparse.Namespace) -> int:
    from triaccel_rl.profiling import measure_profile, profile_device
    from triaccel_rl.training import resolve_device

    with _folders_kept_only_on_success(args.out):
        out = _file_to_write("--out", args.out, example="profile.json")
        device = profile_device(resolve_device(args.device), args.batch_size, args.steps)  # refused before the note
        if device.type != "cuda":  # the file looked like a GPU's: nothing said its memory factors were never measured
            print(
                f"triaccel-rl profile: profiling {device} (no --device cuda): its times are this CPU's, and memory "
                "factors are not measured on a CPU (written as 1.0); profile the GPU you will train on. ResNet-18 "
                "takes minutes on a CPU (--small: seconds)",
                file=sys.stderr,
            )
        profile = measure_profile(device, args.batch_size, args.steps, args.small, progress=_progress(args))
        profile.save(out)
    factors = ", ".join(f"{k} ×{v:.3f}" for k, v in profile.time_factor.items())
    print(f"{profile.device}\nstep-time factors: {factors}; fixed {profile.fixed_ms:.3f} ms\nwrote {args.out}")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from triaccel_rl.tasks import TASKS

    width = max(map(len, TASKS))
    for name, task in sorted(TASKS.items()):
        print(f"{name:{width}s}  {task.description} (target accuracy {100 * task.target_metric:.1f}%)")
    return 0


def _device_name(device: str | None) -> str:
    """Where the runs trained, for the results: the GPU's name (as ``gpu_benchmark.py`` writes it), or the CPU's.

    On a CPU, ``experiment.cpu_machine()``'s model, cores and torch threads: they set a CPU run's rounding, and two
    hosts that both read "cpu" gave final accuracies half a point apart (2026-12-07).
    """
    import torch

    from triaccel_rl.experiment import cpu_machine
    from triaccel_rl.training import resolve_device

    resolved = resolve_device(device)
    return torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else cpu_machine()


def _progress(args: argparse.Namespace) -> bool | None:
    """The library's progress argument for ``--no-progress``: False, else None (a bar only where stderr is a terminal).

    Redirected to a file, a bar wrote every redraw into it, joined by carriage returns (7.8 KB for an 85-s compare).
    """
    return False if args.no_progress else None


def _modelled(args: argparse.Namespace) -> bool:
    """Whether a comparison charges modelled time: ``--cost-mode profile``, or the default on a CPU."""
    return args.cost_mode == "profile" or (args.cost_mode is None and not _cuda(args.device))


def _cuda(device: str | None) -> bool:
    import torch

    return torch.cuda.is_available() if device is None else device.startswith("cuda")


if __name__ == "__main__":
    raise SystemExit(main())
