"""Command-line plumbing for ``experiments/`` and the CLI: ``@dataclass Args`` → flags, number lists, the commit."""

from __future__ import annotations

import argparse
import ast
import inspect
import math
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, TypeVar

from triaccel_rl.types import LayerInfo, Precision

__all__ = [
    "PrecisionMapScalars",
    "check_log_dir",
    "command_line",
    "cpu_machine",
    "field_docstrings",
    "file_to_write",
    "git_commit",
    "parse_args",
    "parse_floats",
    "partial_path",
    "tqdm_disable",
    "write_bytes_atomic",
    "write_text_atomic",
]

T = TypeVar("T")
_TYPES: dict[str, type] = {"int": int, "float": float, "str": str}


def parse_args(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Builds ``cls`` (a dataclass of int, float, str and bool fields) from ``--field-name`` flags.

    A bool field that defaults to False is a flag that sets it (one that defaults to True has ``--no-...`` too); the
    others take a value and default to the field's default. Each flag's ``--help`` is the string literal under its
    field, with the default.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Args:
        ...     steps: int = 3
        ...     smoke: bool = False
        >>> parse_args(Args, ["--steps", "5", "--smoke"])
        Args(steps=5, smoke=True)
    """
    docs = field_docstrings(cls)
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    for f in fields(cls):  # type: ignore[arg-type]
        flag = f"--{f.name.replace('_', '-')}"
        kind = f.type.__name__ if isinstance(f.type, type) else str(f.type)  # with or without PEP 563 annotations
        doc = docs.get(f.name, "").replace("%", "%%")  # argparse %-formats help: "93% in" raised TypeError
        if kind == "bool":
            if (f.default_factory() if f.default_factory is not MISSING else f.default) is True:  # as command_line
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=True, help=doc or None)
            else:
                parser.add_argument(flag, action="store_true", help=doc or None)
        elif kind in _TYPES and f.default is MISSING and f.default_factory is MISSING:  # (MISSING when left out)
            parser.add_argument(flag, type=_TYPES[kind], required=True, help=doc or None)
        elif kind in _TYPES:  # a default_factory's value is the default, as command_line reads it
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            shown = f"(default: {default!r})".replace("%", "%%")
            parser.add_argument(flag, type=_TYPES[kind], default=default, help=f"{doc} {shown}".strip())
        else:
            raise TypeError(f"field {f.name!r} has type {kind}; allowed: bool, {', '.join(_TYPES)}")
    values: dict[str, Any] = vars(parser.parse_args(argv))
    return cls(**values)


def field_docstrings(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of the class ``cls``, whitespace collapsed.

    Attribute docstrings are not kept at run time, so they are read from the source; a class whose source cannot be
    read (defined in a REPL or a doctest) has none.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0]
    if not isinstance(body, ast.ClassDef):
        return {}
    docs = {}
    for node, following in zip(body.body, body.body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def parse_floats(text: str, option: str, positive: bool = False) -> tuple[float, ...]:
    """``text`` as comma-separated numbers (blanks ignored), for the command-line option ``option``.

    Example:
        >>> parse_floats(" 1, 2.5 ,", "--lr-scales")
        (1.0, 2.5)

    Raises:
        ValueError: no number at all, an item that is not one, or (``positive``) one that is not above 0; the message
            names the option, the text and the item.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{option} {text!r} is empty: give comma-separated numbers, e.g. 0.5,1,1.5")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{option} {text!r}: {item!r} is not a number (e.g. 0.5,1,1.5)") from None
        if not math.isfinite(value):  # float() takes "nan" and "inf"
            raise ValueError(f"{option} {text!r}: {item!r} is not a finite number")
        if positive and not value > 0:
            raise ValueError(f"{option} {text!r}: {item!r} must be positive")
        values.append(value)
    return tuple(values)


def away_from_results(flag: str, value: str, default: str) -> str:
    """A ``--smoke`` run's output path: ``value``, or where that is the default (the recorded results), a temp path.

    A plumbing check once replaced the issues' evidence: ``gpu_benchmark.py --smoke`` with its documented CPU example
    wrote 4 synthetic rows over the merged GPU table, ``transfer.py --smoke`` and ``bench_elastic.py --smoke`` their
    results files. Said on stderr. '' (no output) stays ''.

    Example:
        >>> away_from_results("--out", "mine.json", "experiments/results/x.json")
        'mine.json'
    """
    if value != default or not value:
        return value
    path = Path(tempfile.gettempdir()) / "triaccel-rl-smoke" / Path(default).name
    print(f"--smoke: {flag} {path} (not the recorded {default})", file=sys.stderr)
    return str(path)


def file_to_write(flag: str, path: str, example: str = "results.json") -> Path:
    """``path``, the file the command-line option ``flag`` names, checked writable and its folder made now.

    A script calls it with its other argument checks, so that an unusable path is refused before minutes of work,
    not when the results are written after them. An existing file keeps its contents.

    Example:
        >>> file_to_write("--out", "")
        Traceback (most recent call last):
        ...
        ValueError: --out '': is empty; give a file path such as results.json

    Raises:
        ValueError: ``path`` is empty or a folder (one that exists, or any path ending in a separator), names an
            existing file that is not a regular one (a device such as ``/dev/null``, a FIFO, a socket: the results,
            moved over it, would replace it), or its folder cannot be made or written in; the message names ``flag``,
            the path and what to give instead.
    """
    if not path.strip():
        raise ValueError(f"{flag} {path!r}: is empty; give a file path such as {example}")
    out = Path(path)  # (Path drops a trailing separator: "results/" was written as a file named results)
    if out.is_dir() or path.endswith(("/", os.sep)):
        raise ValueError(f"{flag} {path}: is a folder; give a file path such as {out / example}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create its folder ({err})") from err
    # The file a symlink names, whether it exists yet or not: for a dangling link the probe created the target through
    # it, and the link, not that empty file, was unlinked (the results then went into a plain file in its place).
    target = Path(os.path.realpath(out))
    existed = target.exists()
    # Checked before the probe below: opening a FIFO for writing waits for a reader, for ever.
    _check_regular(
        target, f"{flag} {path}", f"give a file path such as {example} ('' for none, where {flag} allows it)"
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # a dangling link's target folder, as the writer makes it
        with target.open("a"):  # appends nothing: an existing file keeps its contents
            pass
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot be written ({err})") from err
    if not existed:
        target.unlink()
    try:  # results are written to a temporary file beside the target, then moved over it
        tempfile.TemporaryFile(dir=out.resolve().parent).close()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write a file in its folder ({err})") from err
    return out


def check_log_dir(log_dir: object) -> None:
    """Refuses a TensorBoard ``log_dir`` that names no folder; None (no logging) passes.

    The Controller, ``run_controller`` and ``compare`` call it before anything runs.

    Raises:
        TypeError: ``log_dir`` is neither a str nor an ``os.PathLike`` (5 wrote to ``./5``, ``b"/x"`` to ``./b'/x'``).
        ValueError: ``log_dir`` is ``""`` (SummaryWriter's own ``./runs/<date>_<host>``, unasked) or an existing file.
    """
    if log_dir is None:
        return
    if not isinstance(log_dir, str | os.PathLike):
        raise TypeError(f"log_dir={log_dir!r} ({type(log_dir).__name__}) names no folder: give a str or a Path")
    if not str(log_dir):
        raise ValueError("log_dir='' names no folder: give one for the TensorBoard logs, or None for none")
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise ValueError(f"log_dir={str(log_dir)!r} is a file; give a folder for the TensorBoard logs")


def tqdm_disable(show: bool | None) -> bool | None:
    """The ``disable`` argument of tqdm for a progress option (``show_progress``, ``progress``, ``progress_bar``).

    The rule of every bar in the package: True draws it always (into a file too), False never, None only where stderr
    is a terminal (tqdm's own test, ``disable=None``): redirected to a file, every redraw was written to it.
    """
    return None if show is None else not show


def purge_tensorboard_after(file_writer: Any, step: int) -> None:
    """Writes into ``file_writer`` (TensorBoard's) the mark that ``SummaryWriter(purge_step=step + 1)`` writes.

    A ``SessionLog.START`` event at ``step + 1``: TensorBoard (its ``EventAccumulator``) drops every point read before
    it at ``step + 1`` or later and keeps those up to ``step``. A run resumed into its own log folder writes it first,
    so the replaced run's points past the resumed step are not shown beside the new ones. Nothing is deleted.
    """
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    file_writer.add_event(Event(session_log=SessionLog(status=SessionLog.START)), step=step + 1)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` and moves it over ``path``.

    An interrupted write leaves the file as it was, whole, never half of the new one (which ``--reuse`` could not
    parse). A symlink's file is written, as a plain write goes.

    Raises:
        ValueError: ``path`` is an existing file that is not a regular one (a device such as ``/dev/null``, a FIFO, a
            socket), which the move would replace with a regular file; nothing is written.
    """
    _write_atomic(path, lambda temporary: temporary.write_text(text))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """:func:`write_text_atomic` for bytes (a plot's PNG: a full disk left the kept plot empty, the old one gone)."""
    _write_atomic(path, lambda temporary: temporary.write_bytes(data))


def _write_atomic(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Calls ``write`` on a temporary file beside ``path``, then moves that over ``path``."""
    target = Path(os.path.realpath(path))
    _check_regular(target, str(path), "give a regular file's path")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)  # left only where the write or the move failed


def _check_regular(target: Path, named: str, instead: str) -> None:
    """Raises ``ValueError`` where ``target`` exists and is neither a regular file nor a folder.

    A file written beside it and moved over it (``os.replace``) replaces a device, a FIFO or a socket with a regular
    file: ``--out /dev/null`` run as root replaced the system's ``/dev/null``. (A folder the move refuses itself.)
    ``named`` says what was given (``--out PATH``), ``instead`` what to give.
    """
    if target.exists() and not (target.is_file() or target.is_dir()):
        raise ValueError(
            f"{named}: is not a regular file (a device, a FIFO or a socket), which writing would replace; {instead}"
        )


def partial_path(out: Path) -> Path:
    """Where a comparison or a benchmark job into ``out`` keeps its finished runs while it runs.

    ``results.json`` gives ``results.partial.json``; any other name has ``.partial.json`` added (``lr0.1`` gives
    ``lr0.1.partial.json``): ``Path.with_suffix`` gave a sweep's ``lr0.1`` and ``lr0.2`` the same ``lr0.partial.json``,
    and a comparison started while another ran moved that one's live file aside.
    """
    return out.with_name(out.stem + ".partial.json" if out.suffix == ".json" else out.name + ".partial.json")


def command_line(script: str, args: Any) -> str:
    """The command that reproduces ``args`` (a dataclass as :func:`parse_args` builds it).

    Only the flags that differ from their defaults, rebuilt from the values, so that a run started from Python (a
    test, another script) records a command too.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Args:
        ...     steps: int = 3
        ...     tasks: str = "a"
        ...     smoke: bool = False
        >>> command_line("experiments/x.py", Args(steps=5, tasks="a b", smoke=True))
        "python experiments/x.py --steps 5 --tasks 'a b' --smoke"
    """
    flags = []
    for f in fields(args):
        value, flag = getattr(args, f.name), f"--{f.name.replace('_', '-')}"
        # A field without a default (parse_args takes such) is always written; building the defaults as type(args)()
        # raised for one.
        default = f.default_factory() if f.default_factory is not MISSING else f.default  # (MISSING: none)
        if default is not MISSING and value == default:
            continue
        if isinstance(value, bool):  # store_true flags take no value; a True default is turned off by --no-...
            if value or default is True:
                flags.append(flag if value else f"--no-{flag[2:]}")
            # (False with no default: parse_args reads an absent store_true flag so, and refuses --no-...)
        elif str(value).startswith("-"):  # "--tag -x" reads -x as an option (a negative number too): --tag=-x
            flags.append(shlex.quote(f"{flag}={value}"))
        else:
            flags.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(["python", script, *flags])


def cpu_machine() -> str:
    """The CPU a run's numbers came from: model, cores, torch's threads and version.

    A CPU run's floating-point result depends on the host's kernels and thread count: the same commit's static rows
    moved by up to half a point between two hosts that both read "cpu (2 cores)" (2026-12-07).
    """
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:  # Linux: platform.processor() says only "x86_64" there
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu {model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), torch {torch.__version__}"


def git_commit(short: bool = True) -> str:
    """The checkout's commit; ``$TRIACCEL_COMMIT``, else ``$COMMIT``, where there is no git (a device copy).

    Only a git checkout whose top folder holds the package counts: an install inside another repository (a venv in
    the user's own project) gives the variable's commit, or ``"unknown"`` without one, not that repository's commit.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        commit = _git(root, "rev-parse", *(["--short"] if short else []), "HEAD")
        # Tracked files edited since that commit: the run's code is not the commit's, and the record says so (a run of
        # uncommitted code was credited to its parent).
        return commit + ("+dirty" if _git(root, "status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    # Read only without a checkout: a shell's or CI's own $COMMIT (a commit message, say) was recorded inside one.
    # scripts/device-visit.sh sets both for the package it installs outside the device's copy of the tree.
    return os.environ.get("TRIACCEL_COMMIT") or os.environ.get("COMMIT") or "unknown"


def _git(root: Path, *arguments: str) -> str:
    """The output of ``git arguments`` in the checkout whose top folder is ``root``, stripped.

    Raises:
        CalledProcessError: git fails, ``root`` not being the top of a checkout included.
    """
    # Git looks for a repository in root's parents too: a copy of the package in a venv inside the user's project
    # recorded the project's commit (and its edits as "+dirty"). The ceiling keeps the search to root itself.
    ceiling = {"GIT_CEILING_DIRECTORIES": str(root.parent)}
    return subprocess.run(
        ["git", *arguments], cwd=root, env={**os.environ, **ceiling}, capture_output=True, text=True, check=True
    ).stdout.strip()


class PrecisionMapScalars:
    """Writes the per-layer precision map to TensorBoard, a scalar a controllable layer, when the map has changed.

    Layer ``index`` (into the model's layers, in the order of ``Controller.precisions`` and of ``compare``'s trace)
    has the tag ``precision/<index>_<name>``: the index zero-padded, so that TensorBoard's alphabetical order of the
    tags is the map's, and the name with every character but letters, digits, ``_``, ``-`` and ``.`` as ``_``. The
    value is the precision's code: 0 fp32, 1 bf16, 2 fp16. A layer whose precision is not controlled (always fp32) has
    none. The map is written at the first call and then only where it differs from the last one written: TensorBoard
    draws each layer's line through the points it has, and a run that keeps one map writes it once. On the host, a
    write costs about 0.1 ms a layer (7 ms at EfficientNet-B0's 82 controllable layers, on 2 busy CPU cores), a map
    unchanged 10 µs, once a decision.

    Example:
        >>> from triaccel_rl.types import LayerInfo
        >>> scalars = PrecisionMapScalars([LayerInfo("fc1", 8, True), LayerInfo("norm", 4, False),
        ...                                LayerInfo("head out", 8, True)])
        >>> scalars.tags
        ['precision/0_fc1', 'precision/2_head_out']
        >>> class Printer:
        ...     def add_scalar(self, tag, value, step):
        ...         print(tag, value, step)
        >>> scalars.write(Printer(), [Precision.BF16, Precision.FP32, Precision.FP32], step=10)
        precision/0_fc1 1 10
        precision/2_head_out 0 10
        >>> scalars.write(Printer(), [Precision.BF16, Precision.FP32, Precision.FP32], step=20)  # the same map
    """

    def __init__(self, layers: Sequence[LayerInfo]) -> None:
        """Tags for ``layers``, the model's layers (``StepEngine.layers``, ``TrainingRun.layers``)."""
        width = len(str(max(len(layers) - 1, 0)))
        self._tags = {
            index: f"precision/{index:0{width}d}_{_tag_safe(info.name)}"
            for index, info in enumerate(layers)
            if info.controllable
        }
        self._written: list[int] | None = None

    @property
    def tags(self) -> list[str]:
        """The tags, one a controllable layer, in the map's order."""
        return list(self._tags.values())

    def write(self, writer: Any, precisions: Sequence[Precision | int], step: int) -> None:
        """Writes ``precisions`` (one a layer, all layers) at ``step`` with ``writer``, unless the last written."""
        codes = [int(precisions[index]) for index in self._tags]
        if codes == self._written:
            return
        for tag, code in zip(self._tags.values(), codes, strict=True):
            writer.add_scalar(tag, code, step)
        self._written = codes

    def forget(self) -> None:
        """Writes the map at the next call whatever it is (the points written so far were dropped from view)."""
        self._written = None


def _tag_safe(name: str) -> str:
    """``name`` in a TensorBoard tag: every character but letters, digits, ``_``, ``-`` and ``.`` as ``_``.

    TensorFlow's rule for tags; a ``/`` too, which would nest the layer's tag in a group of its own.
    """
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)
