"""Frozen, validated configuration: memory budget, hardware profile, heuristic thresholds, controller presets."""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triaccel_rl.errors import (
    ChoiceEnum,
    ConfigError,
    is_finite_real,
    require_bool,
    require_number,
    require_whole,
)
from triaccel_rl.experiment import write_text_atomic
from triaccel_rl.observation import OBS_HIGH
from triaccel_rl.types import Precision

if TYPE_CHECKING:
    from triaccel_rl.signals.config import SignalConfig

__all__ = [
    "ConfigError",
    "ControllerConfig",
    "CostMode",
    "ElasticConfig",
    "HardwareProfile",
    "HeuristicConfig",
    "LRRule",
    "MemoryBudget",
    "RewardConfig",
    "store_plain_numbers",
]


class CostMode(ChoiceEnum):
    """How the cost of a step (time, memory) is charged.

    ``MEASURED`` uses the clock and the allocator of the machine the run is on. ``PROFILE`` charges time
    and memory from a :class:`HardwareProfile` measured on the target GPU, because on a CPU without
    AVX512-BF16 a bf16 step is about 10× slower than fp32, the opposite of a GPU.
    """

    MEASURED = "measured"
    PROFILE = "profile"

    @classmethod
    def _unknown(cls, value: Any) -> str:
        return f"unknown cost mode {value!r}"


class LRRule(ChoiceEnum):
    """How the learning rate follows the effective batch size ``B`` (relative to a base batch ``B0``).

    The LR gain ``g(B)`` multiplies the scheduled LR (``triaccel_rl.elastic.lr_gain`` is the formula):

    - ``LINEAR``: ``g = B / B0`` (Goyal et al. 2017; SGD).
    - ``SQRT``: ``g = sqrt(B / B0)`` (keeps the update's noise constant; Adam-family optimizers).
    - ``ADASCALE``: ``g = (1 + B_noise / B0) / (1 + B_noise / B)``, the AdaScale gain (Johnson et al. 2020)
      written with the gradient-noise scale ``B_noise = tr(Sigma) / |G|^2``: linear while ``B << B_noise``,
      flat once ``B >> B_noise``.
    - ``NONE``: ``g = 1``.
    - ``AUTO``: ``LINEAR`` for SGD-family optimizers, ``SQRT`` for Adam-family ones.
    """

    LINEAR = "linear"
    SQRT = "sqrt"
    NONE = "none"
    ADASCALE = "adascale"
    AUTO = "auto"

    @classmethod
    def _unknown(cls, value: Any) -> str:
        return f"lr_rule={value!r}"


@dataclass(frozen=True)
class MemoryBudget:
    """How much memory the controller may use: an absolute byte count or a fraction of the device.

    Exactly one of ``bytes`` and ``fraction`` applies; ``bytes`` wins when both are given. On a CPU the
    fraction is taken of ``cpu_capacity_bytes`` (the run's own accounting has no device to ask), and ``bytes`` may
    not exceed it (raise ``cpu_capacity_bytes`` with it).

    Example:
        >>> MemoryBudget(fraction=0.5).resolve(capacity_bytes=8 << 30)
        4294967296
    """

    bytes: int | None = None
    fraction: float = 0.9
    cpu_capacity_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        if self.bytes is not None:
            require_whole("memory budget bytes", self.bytes, "> 0 (or None: the fraction applies)")
        require_number("memory budget fraction", self.fraction, "in (0, 1]")
        require_whole("cpu_capacity_bytes", self.cpu_capacity_bytes, "> 0")
        if self.bytes is not None and self.bytes <= 0:
            raise ConfigError(f"memory budget bytes={self.bytes} must be a positive integer")
        if not (0.0 < self.fraction <= 1.0):
            raise ConfigError(f"memory budget fraction={self.fraction} must be in (0, 1]")
        if self.cpu_capacity_bytes <= 0:
            raise ConfigError(f"cpu_capacity_bytes={self.cpu_capacity_bytes} must be positive")
        # resolve() multiplies by the fraction: 10 ** 400 passed here and raised an OverflowError there
        for name, value in (("memory budget bytes", self.bytes), ("cpu_capacity_bytes", self.cpu_capacity_bytes)):
            if value is not None and not is_finite_real(value):
                raise ConfigError(f"{name}={value} is too large (a float holds at most {sys.float_info.max:.3g})")
        store_plain_numbers(self)

    def resolve(self, capacity_bytes: int, device_type: str = "cuda") -> int:
        """Returns the budget in bytes for a device with ``capacity_bytes`` of memory.

        ``device_type`` ``"cpu"``: ``capacity_bytes`` is ``cpu_capacity_bytes``, which an error then names (the
        device's memory it is not: a user with 64 GB was told a 3-GB budget was "larger than the device's 2 GiB").

        Raises:
            ConfigError: the absolute budget is larger than the device (on a CPU, than ``cpu_capacity_bytes``).
        """
        if self.bytes is not None:
            if self.bytes > capacity_bytes:
                if device_type == "cpu":
                    raise ConfigError(
                        f"memory budget of {self.bytes} bytes is larger than cpu_capacity_bytes={capacity_bytes}, "
                        "the memory a CPU run's accounting assumes: raise MemoryBudget(cpu_capacity_bytes=...) too"
                    )
                raise ConfigError(
                    f"memory budget of {self.bytes} bytes is larger than the device's {capacity_bytes} bytes"
                )
            return int(self.bytes)
        return int(self.fraction * capacity_bytes)


def _f32(value: float) -> float:
    """``value`` as a float32 holds it: as the heuristic compares a threshold with the float32 observation."""
    with np.errstate(over="ignore"):  # beyond float32's range: inf, which no range holds
        return float(np.float32(value))


class _Factors(dict[str, float]):
    """A profile's factor table: a dict (JSON and ``dataclasses.asdict`` take it as one) that refuses edits."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a hardware profile's factors are read-only: build a new HardwareProfile with the ones wanted")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = __ior__ = _refuse  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]  # read-only, so hashable: HardwareProfile hashes its fields
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[Any, ...]:  # pickled to SubprocVecEnv's workers, deep-copied: built whole, not set
        return (_Factors, (dict(self),))


# The largest time or memory factor a profile may hold, a bound no precision comes near (the shipped H200's factors
# are 0.25 to 1; fp16 at 1/64 of fp32's rate on a Pascal card would be 64): a factor of 1e308 was taken, priced every
# step at inf and overflowed the memory accounting's int().
_MAX_FACTOR = 1e3


@dataclass(frozen=True)
class HardwareProfile:
    """Per-precision speed and memory factors of one GPU, used to charge cost on machines without it.

    A step's modelled time, in ms, is ``fixed_ms + 3 * batch * sum_l(mflops_l * time_factor[p_l]) * throughput_scale``,
    where ``mflops_l`` is layer ``l``'s forward MFLOPs per sample and the 3 counts the forward and the backward's two
    matmuls (``CostModel.step_ms``); its activation memory scales per layer by ``memory_factor[p_l]``.
    ``triaccel-rl profile`` writes one; the package ships one measured on an NVIDIA H200.

    Attributes:
        device: name of the GPU it was measured on.
        time_factor: step-time multiplier per precision name relative to fp32 (fp32 = 1.0), each in (0, 1e3]; fp16's
            includes the GradScaler's unscale and overflow check.
        memory_factor: activation-memory multiplier per precision name relative to fp32, each in (0, 1e3].
        fixed_ms: per-step overhead independent of batch size (launches, optimizer), in ms, in [0, 1e7].
        throughput_scale: fp32 GPU time of one MFLOP of a step's work, in ms (a sample's step is 3 × its forward
            MFLOPs; scales CPU-measured FLOPs to GPU time), in (0, 1e3].
    """

    device: str
    time_factor: Mapping[str, float]
    memory_factor: Mapping[str, float]
    fixed_ms: float = 1.0
    throughput_scale: float = 1.0e-4

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device.strip():  # JSON's 5 or null was taken as the name
            # The field quoted: the CLI writes a bare name=value of one of its options as the flag ("--device 5")
            raise ConfigError(
                f'hardware profile field "device"={self.device!r} must be the GPU\'s name, a non-empty string'
            )
        names = {p.name.lower() for p in Precision}
        for label, table in (("time_factor", self.time_factor), ("memory_factor", self.memory_factor)):
            if not isinstance(table, Mapping):
                raise ConfigError(f"hardware profile {label} must be a mapping of precision to factor; got {table!r}")
            missing, unknown = names - set(table), set(table) - names
            if missing or unknown:  # both named: keys "FP32", "BF16" were told only that fp32 and bf16 were missing
                wrong = " and ".join(
                    part
                    for part in (
                        f"lacks {sorted(missing)}" if missing else "",
                        f"has unknown precisions {sorted(map(str, unknown))}" if unknown else "",
                    )
                    if part
                )
                raise ConfigError(f"hardware profile {label} {wrong}; needs {sorted(names)}")
            for key, value in table.items():
                if not (is_finite_real(value) and 0 < value <= _MAX_FACTOR):
                    bound = f"a finite number > 0 and <= {_MAX_FACTOR:g}"
                    raise ConfigError(f"hardware profile {label}[{key!r}]={value!r} must be {bound}")
            if table["fp32"] != 1.0:
                raise ConfigError(
                    f"hardware profile {label}['fp32']={table['fp32']!r} must be 1.0: factors are relative to fp32"
                )
            # A read-only copy: the caller's dict, edited after the check, changed a frozen profile's factors (to -5,
            # say), and so did an edit through the profile's own table, which save() then wrote as load() refused.
            object.__setattr__(self, label, _Factors({key: float(value) for key, value in table.items()}))
        # The bounds above no GPU comes near (1e3 ms a sample-MFLOP is a millionth of an H200's speed; 1e7 ms is 2.8
        # hours a step): a throughput_scale of 1e308 was taken and priced every step at inf.
        for name, low, high in (("fixed_ms", 0.0, 1e7), ("throughput_scale", None, 1e3)):
            value = getattr(self, name)
            if not (is_finite_real(value) and (value >= 0 if low is not None else value > 0) and value <= high):
                kind = "a finite number >= 0" if low is not None else "a finite number > 0"
                raise ConfigError(f'hardware profile field "{name}"={value!r} must be {kind} and <= {high:g}')
            object.__setattr__(self, name, float(value))  # a NumPy number would not go into save()'s JSON

    def time(self, precision: Precision | str | int) -> float:
        """Step-time factor of ``precision`` (a ``Precision``, its name or its code) relative to fp32."""
        return self.time_factor[Precision.parse(precision).name.lower()]

    def memory(self, precision: Precision | str | int) -> float:
        """Activation-memory factor of ``precision`` (a ``Precision``, its name or its code) relative to fp32."""
        return self.memory_factor[Precision.parse(precision).name.lower()]

    @classmethod
    def resolve(
        cls, value: HardwareProfile | str | os.PathLike[str] | None, argument: str = "profile"
    ) -> HardwareProfile:
        """A profile from what a caller passed as ``argument``: a ``HardwareProfile``, a JSON's path, or None (shipped).

        Raises:
            TypeError: ``value`` is none of these (named, with ``argument``).
            ConfigError: as ``load`` raises for a path.
        """
        if value is None or isinstance(value, str | os.PathLike):
            return cls.load(value)
        if isinstance(value, HardwareProfile):
            return value
        raise TypeError(
            f"{argument}={value!r} must be a HardwareProfile, the path of a hardware-profile JSON, or None (the "
            "shipped H200 profile)"
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> HardwareProfile:
        """Reads a profile JSON; ``None`` loads the one shipped with the package.

        Raises:
            ConfigError: the file is missing, is not JSON, lacks a field or has one it does not know, or holds a value
                out of range (named in the message).
        """
        if path is None:
            text = resources.files("triaccel_rl").joinpath("profiles/h200.json").read_text()
            source = "the shipped profile profiles/h200.json"
        else:
            file = Path(path)
            if file.is_dir():
                raise ConfigError(f"hardware profile {str(file)!r} is a folder; give the profile's JSON file in it")
            if not file.exists():
                raise ConfigError(f"hardware profile {str(file)!r} does not exist")
            if not file.is_file():  # /dev/null was said not to exist
                raise ConfigError(f"hardware profile {str(file)!r} is not a regular file")
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:  # the CLI printed a bare "[Errno 13]" or a codec's message
                raise ConfigError(f"hardware profile {str(file)!r} cannot be read: {err}") from None
            source = str(file)
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as err:  # also an integer of over 4300 digits, or arrays nested too deep
            raise ConfigError(f"hardware profile {source} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"hardware profile {source} must be a JSON object; got {type(raw).__name__}")
        # Every field: the defaults of fixed_ms and throughput_scale (1 ms, 1e-4) describe no GPU (the shipped H200's
        # are 0.2 ms and 4.018e-5), so a file that left them out was priced as some other device without a word.
        missing = [f.name for f in fields(cls) if f.name not in raw]
        if missing:
            raise ConfigError(f"hardware profile {source} lacks the fields {missing}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:  # a misspelt field would silently fall back to its default
            raise ConfigError(f"hardware profile {source} has unknown fields {unknown}; its fields: {sorted(known)}")
        try:
            return cls(**raw)
        except ConfigError as err:  # the value's message, with the file it came from (the CLI names --profile)
            raise ConfigError(f"{err} (in {source})") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the profile as JSON.

        The file is written beside ``path`` and moved over it (``experiment.write_text_atomic``): a write cut short (a
        full disk) leaves the profile that was there whole.

        Raises:
            ValueError: ``path`` is an existing file that is not a regular one (a device, a FIFO), which the move
                would replace with a regular file; nothing is written.
        """
        write_text_atomic(path, json.dumps(asdict(self), indent=2) + "\n")


@dataclass(frozen=True)
class HeuristicConfig:
    """Thresholds of the hand-written Tri-Accel controller (``HeuristicPolicy``).

    Precision: a group is lowered (fp32 → bf16) when its sensitivity is low and raised when high; the
    gap between ``lower_below`` and ``raise_above`` is the hysteresis band, so a group whose signal
    hovers near one threshold does not flip back and forth. Sensitivity is the group's log10 of
    curvature × gradient variance relative to the median over groups (observation feature).

    LR multiplier: one rung down the ``ControllerConfig.lr_scales`` ladder when the probe loss rose by
    more than ``loss_rise_tolerance`` over an interval or the overflow rate was over ``max_overflow_rate``; one
    rung back up towards 1.0 (from under it) when it fell by more than as much; otherwise kept. Every threshold is
    strict (a value exactly at one keeps the setting) except the shares of the run, ``anneal_after`` and
    ``ramp_batch_after`` (from that share on) and ``ramp_batch_until`` (before it); ``policies/heuristic.py`` lists
    the edges.

    Start: every controllable layer begins in ``start_precision`` (bf16 by default: the static setting a
    careful user runs today, so the controller adapts from the strong baseline, not from fp32). On a GPU without bf16
    (a V100 or T4) a bf16 start, and lowering to bf16, are fp16 instead (``policies.run_without_bf16``): the format
    such a GPU runs fast, where the shield moves a layer that overflows to fp32; there is no speed trial there.

    Attributes:
        start_precision: the precision of every controllable layer before the first decision
            (``fp32``, ``bf16`` or ``fp16``; any form ``Precision.parse`` takes, such as ``Precision.BF16`` or
            ``"BF16"``, is stored as this lower-case name).
        lower_below: relative log-sensitivity under which a group may run in 16 bits; this and ``raise_above`` lie
            in (-10, 10), the observation's range.
        raise_above: relative log-sensitivity over which a group goes back to fp32; > lower_below. The
            default, 3.0 (1000x the median layer's sensitivity), is for extreme outliers only: on an H100
            (2026-11-22) 0.75 raised ResNet-18's early convolutions to fp32 at the first decision and made
            a step 1.8x slower; 1.5 still raised 6 of them, and with captured steps the run took 2x as
            long to reach 93% for the same final accuracy as static bf16 everywhere (94.54% vs 94.53%).
        max_overflow_rate: overflow (skipped-step) rate above which no group is lowered, fp16 groups
            fall back to bf16 and the LR takes a rung down, in [0, 1]. A rate equal to it is stable (1 step in 20 at
            the default 0.05).
        use_fp16: lower to fp16 instead of bf16 (only worth it where fp16 is faster, e.g. older GPUs).
        speed_trial: before the first decision, train ``speed_trial_steps`` steps (after 2 warm-up steps)
            in each 16-bit precision, every controllable layer alike, and lower to the faster one from then
            on (the start precision too, when it is 16-bit). Worth it where step time is measured on a GPU,
            whose fastest 16-bit format depends on the model and the device: on an H200 (2026-12-01,
            `c915e3b`) it chose fp16 on ResNet-18 (3.68 ms a step against bf16's 4.20) and EfficientNet-B0
            and was the fastest row of both jobs. None (the default): on wherever step time is measured on a
            GPU, or charged from a GPU's profile (``compare``'s CPU protocol: there the "trial" reads the profile's
            charge for a step in each format, trains nothing, and picks the cheaper one, as the trial on that
            GPU would: fp16 on the shipped H200 profile); never where a CPU's clock is the cost. True: always
            (e.g. a test with measured time on a CPU). False: never; lower to bf16 (fp16 with ``use_fp16``).
        speed_trial_steps: timed steps per precision in the speed trial; >= 1.
        loss_rise_tolerance: relative change of the probe loss over an interval that counts as a rise
            (instability) or, negated, as a steady fall; in [0, 1) (the observation clips the trend to [-1, 1]). The
            default, 0.1, is above the
            interval-to-interval noise of the probe loss late in training (a 2% tolerance made the
            2026-11-22 GPU pilot change the LR 45 times in 12 epochs, chasing noise).
        grow_below_usage: the batch may grow (when the noise scale or the ramp asks) only while memory use is under
            this share of the budget; in (0, ``shrink_above_usage``).
        shrink_above_usage: shrink the batch when memory use is over this share of the budget, whatever the noise
            scale asks; at most 1.5 (memory use reads up to 2).
        max_batch_over_noise: grow the batch only while batch / noise_scale is under this value. By
            McCandlish et al. (2018), a batch B needs ``1 + B / B_noise`` times the minimum number of
            samples, so 0.1 costs at most about 10% more samples for many fewer steps; in (1e-10, 1e6] (the
            observation reads noise / batch from 1e-6 to 1e10).
        anneal_plateau: None (the default): off. A number in (0, 1): the LR rule also *anneals*: once
            ``progress`` reaches ``anneal_after``, an interval whose probe loss fell by less than this share
            (a plateau: the steps bounce at the gradient noise's floor, which a smaller step lowers) takes the
            LR one rung down, and from then on the rule no longer climbs back up (each rung down is meant to stay;
            before ``anneal_after`` it is the plain rule, which climbs back after a rise). A
            reading of the H200 curves (2026-12-01): static fp16 on ResNet-18 sits at 92-92.5% test accuracy from
            about 40% to 65% of its 12-epoch schedule and reaches 93% only as the schedule's decay lowers the
            LR; time to target is set by the LR there, not by the step time. On the H200 (2026-12-02, 3 seeds)
            it made no difference: 6.89 s to 93% against the heuristic's 6.90 s (the probe loss still fell by
            more than 2% between the run's six decisions, so it fired once in three runs, after the target). On
            the CPU proxies (``experiments/batch_headroom.py --rows heuristic,heuristic-anneal --epochs 5``,
            constant LR, 10-step intervals) it was 0.97-1.03x the heuristic's time to target, within seed
            noise, and with the warm-up/decay schedule it cost dwcnn-fmnist 0.3-0.8 points: a plateau read
            over 10 steps is not one read over the ~110 steps of a GPU interval. It needs decisions close enough
            to act: with ``ControllerConfig.max_interval_factor=1`` (a decision every interval), the cheap signals
            and 0.05, on the H200 (2026-12-02, later) it reached 93% in 0.90x static fp16's time on ResNet-18 (5
            seeds; 0.86x in an earlier job) and 0.98x on EfficientNet-B0 (3 seeds; 0.87x earlier), ending 0.12
            and 0.14-0.43 points lower: off by default for that accuracy cost.
        anneal_by: what an annealing step lowers: ``"lr"`` (the default) takes the LR down the ladder; ``"batch"``
            doubles the batch instead while it may grow (under ``max_batch_growth`` and ``grow_below_usage``) and
            cuts the LR only once it may not: "don't decay the learning rate, increase the batch size" (Smith et al.,
            2018), read on the same plateau. A doubled batch at the same LR lowers the gradient noise as halving the
            LR does, over half as many steps, each using the GPU better; it needs the LR held across the change
            (``ElasticConfig.lr_rule="none"``, refused otherwise: the linear rule keeps the noise as it was). A
            doubling the executor refuses (``max_batch_size``, the data's largest batch, the memory model) leaves the
            batch where it was, and the next plateau at that batch cuts the LR.
        anneal_after: the share of the training budget (``progress``) before which ``anneal_plateau`` does
            nothing (the loss of a young run is noisy and its fall uneven), in [0, 1].
        anneal_release_after: None (the default): annealing's cuts hold to the end. A share of the training budget in
            (``anneal_after``, 1] (with ``anneal_plateau`` set): from then on the cuts are *released*: the LR rule
            climbs a rung a decision back to the 1.0 rung (the shield's bound still applies) and anneals no more, so
            the run ends on the task's own schedule (a warm restart, as in SGDR, Loshchilov and Hutter, 2017). The
            cuts bring the target sooner; what they cost is the final accuracy, and the run's end at the schedule's
            own LR is meant to win that back (measured: BENCHMARKS.md, "H200, 2026-12-02 (eighth session)").
        anneal_rungs: how many rungs of the ladder one annealing step asks for (1: ×0.75 from ×1 on the default
            ladder; 2: ×0.5), >= 1. The shield still moves the LR by at most ``ControllerConfig.max_lr_change`` a
            decision (×1.5 by default), so two rungs from ×1 land as ×0.67 then ×0.5 over two decisions; on the
            H200 (2026-12-02) that gained nothing over one rung (ResNet-18 0.83× static fp16, EfficientNet-B0
            1.04×, in one job of 3 and 2 seeds).
        ramp_batch_after: None (the default): off. A share of the training budget in [0, ``ramp_batch_until``): once
            ``progress`` reaches it, the batch rule grows the batch at every decision (up to ``max_batch_growth``,
            while memory allows) whatever the noise estimate says: "don't decay the learning rate, increase the batch
            size" (Smith et al., 2018). With the LR held (``ElasticConfig.lr_rule="none"``) a doubled batch
            halves the gradient noise as halving the LR would, and each sample costs less where a larger
            batch uses the GPU better; with the linear rule it keeps the noise and only buys throughput.
            A late ramp, not an early one: batch 512 from the start missed ResNet-18's target on 1 seed of 3
            (H100, 2026-11-22).
        ramp_batch_until: the share of the budget past which the ramp no longer grows the batch, in
            (``ramp_batch_after``, 1]: a batch changed that late has too little of the run left to repay the
            change's one-time cost (a new captured graph and cuDNN's tuning for the new shapes; measured:
            BENCHMARKS.md, "H200, 2026-12-02: a late batch ramp, and a stronger static row").
        max_batch_growth: grow the batch only up to this multiple of the task's base batch; in [1, 1024] (the
            observation reads a growth up to 2**10). A trust
            region on the noise-scale estimate: with batch norm, the micro-batch estimate overstates the
            noise (each micro-batch normalises with its own statistics), and in the 2026-11-22 GPU pilot
            the rule doubled ResNet-18's batch four times in four decisions (to 4096, the LR following
            linearly) and ended 11 points below static bf16.
    """

    start_precision: str = "bf16"
    lower_below: float = 0.25
    raise_above: float = 3.0
    max_overflow_rate: float = 0.05
    use_fp16: bool = False
    speed_trial: bool | None = None
    speed_trial_steps: int = 8
    loss_rise_tolerance: float = 0.1
    grow_below_usage: float = 0.45
    shrink_above_usage: float = 0.95
    max_batch_over_noise: float = 0.1
    max_batch_growth: float = 2.0
    anneal_plateau: float | None = None
    anneal_by: str = "lr"
    anneal_after: float = 0.3
    anneal_rungs: int = 1
    anneal_release_after: float | None = None
    ramp_batch_after: float | None = None
    ramp_batch_until: float = 0.75

    def __post_init__(self) -> None:
        for name, allowed in _HEURISTIC_NUMBERS.items():
            require_number(
                name,
                getattr(self, name),
                allowed,
                optional=name in ("anneal_plateau", "anneal_release_after", "ramp_batch_after"),
            )
        for name in ("speed_trial_steps", "anneal_rungs"):
            require_whole(name, getattr(self, name), "in [1, 16]" if name == "n_groups" else ">= 1")
        require_bool("use_fp16", self.use_fp16)
        require_bool("speed_trial", self.speed_trial, optional=True)
        try:  # any form the other precision inputs take (Precision.BF16, "BF16", 1), stored as the lower-case name
            start = Precision.parse(self.start_precision)
        except ValueError:
            raise ConfigError(
                f"start_precision={self.start_precision!r} must be one of 'fp32', 'bf16', 'fp16' (any case), "
                "or a Precision (or its value, 0 to 2)"
            ) from None
        object.__setattr__(self, "start_precision", start.name.lower())
        for name in ("lower_below", "raise_above"):
            if not is_finite_real(getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)} must be a finite number (relative log10 sensitivity)")
        # The ranges and bands of these thresholds are checked on their float32 images, as the heuristic compares
        # them with the float32 observation: raise_above=9.9999999999 passed a float64 check and is 10.0 there, which
        # no clipped sensitivity exceeds (as 1e-46 for grow_below_usage is 0.0, and a band 1.0 < 1.00000001 empty).
        for name in ("lower_below", "raise_above"):  # the observation clips every feature to +-OBS_HIGH
            if not -OBS_HIGH < _f32(getattr(self, name)) < OBS_HIGH:
                raise ConfigError(
                    f"{name}={getattr(self, name)} must be in ({-OBS_HIGH:g}, {OBS_HIGH:g}): the observation clips the "
                    "relative sensitivity it is compared with to that range, so a threshold past it never fires"
                )
        if not _f32(self.lower_below) < _f32(self.raise_above):
            raise ConfigError(
                f"lower_below={self.lower_below} must be below raise_above={self.raise_above} (hysteresis band)"
            )
        if not (0.0 <= self.max_overflow_rate <= 1.0):
            raise ConfigError(f"max_overflow_rate={self.max_overflow_rate} must be in [0, 1]")
        if self.speed_trial_steps < 1:
            raise ConfigError(f"speed_trial_steps={self.speed_trial_steps} must be >= 1")
        if not (
            is_finite_real(self.grow_below_usage)
            and is_finite_real(self.shrink_above_usage)  # (10 ** 400 raised an OverflowError in _f32)
            and 0.0 < _f32(self.grow_below_usage) < _f32(self.shrink_above_usage) <= 1.5
        ):
            raise ConfigError(
                f"need 0 < grow_below_usage={self.grow_below_usage} < shrink_above_usage="
                f"{self.shrink_above_usage} <= 1.5"
            )
        # The ranges below are checked on the thresholds' float32 images, which the heuristic compares with the float32
        # observation: 0.99999999 passed a float64 check and is 1.0 there.
        if not (is_finite_real(self.loss_rise_tolerance) and 0 <= _f32(self.loss_rise_tolerance) < 1):
            # The observation clips the loss trend to [-1, 1]: at 1 or more no rise ever cut the LR, silently.
            raise ConfigError(
                f"loss_rise_tolerance={self.loss_rise_tolerance} must be a number in [0, 1) (the observation clips "
                "the loss trend to [-1, 1], so a tolerance of 1 or more never fires)"
            )
        if not (is_finite_real(self.max_batch_growth) and 1 <= self.max_batch_growth <= 2**OBS_HIGH):
            # The rule reads the batch's growth from the observation's log2_batch, clipped at OBS_HIGH: past 2**10 the
            # batch grew on without a limit (up to max_batch_size).
            raise ConfigError(
                f"max_batch_growth={self.max_batch_growth} must be a number in [1, {2**OBS_HIGH:g}] (the observation "
                f"reads a batch's growth up to 2**{OBS_HIGH:g})"
            )
        if self.anneal_plateau is not None and not (0.0 < self.anneal_plateau < 1.0):
            raise ConfigError(f"anneal_plateau={self.anneal_plateau} must be in (0, 1), or None for no annealing")
        if not isinstance(self.anneal_by, str) or self.anneal_by not in ("lr", "batch"):
            raise ConfigError(f"anneal_by={self.anneal_by!r} must be 'lr' or 'batch'")
        if not (0.0 <= self.anneal_after <= 1.0):
            raise ConfigError(f"anneal_after={self.anneal_after} must be in [0, 1]")
        if self.anneal_rungs < 1:
            raise ConfigError(f"anneal_rungs={self.anneal_rungs} must be >= 1")
        if self.anneal_release_after is not None:
            if self.anneal_plateau is None:
                raise ConfigError(
                    f"anneal_release_after={self.anneal_release_after} releases annealing's cuts, but anneal_plateau "
                    "is None (no annealing): set anneal_plateau, or leave anneal_release_after None"
                )
            # In float32, as the heuristic reads progress: shares one float32 apart released where it annealed
            if not (_f32(self.anneal_after) < _f32(self.anneal_release_after) and self.anneal_release_after <= 1.0):
                raise ConfigError(
                    f"anneal_release_after={self.anneal_release_after} must be in (anneal_after={self.anneal_after}, "
                    "1], or None to keep the cuts to the end"
                )
        if self.ramp_batch_after is not None and not (0.0 <= self.ramp_batch_after < 1.0):
            raise ConfigError(f"ramp_batch_after={self.ramp_batch_after} must be in [0, 1), or None for no ramp")
        if not 0.0 <= self.ramp_batch_until <= 1.0:
            raise ConfigError(f"ramp_batch_until={self.ramp_batch_until} must be in [0, 1]")
        if self.ramp_batch_after is not None and not _f32(self.ramp_batch_after) < _f32(self.ramp_batch_until):
            # The ramp grows the batch while ramp_batch_after <= progress < ramp_batch_until: an empty window turned
            # the ramp on and it never grew the batch.
            raise ConfigError(
                f"ramp_batch_after={self.ramp_batch_after} must be below ramp_batch_until={self.ramp_batch_until} "
                "(the ramp grows the batch from the one to the other); raise ramp_batch_until"
            )
        if not (
            is_finite_real(self.max_batch_over_noise)
            and self.max_batch_over_noise > 0
            and -6 <= _f32(-math.log10(self.max_batch_over_noise)) < 10
        ):
            # The rule reads log10(noise / batch), which the observation holds in [-6, 10]: outside these bounds the
            # batch never grew, or grew whatever the noise.
            raise ConfigError(
                f"max_batch_over_noise={self.max_batch_over_noise} must be a number in (1e-10, 1e6] (the observation "
                "reads noise / batch from 1e-6 to 1e10)"
            )
        store_plain_numbers(self)


_HEURISTIC_NUMBERS = {
    "lower_below": "below raise_above",
    "raise_above": "above lower_below",
    "max_overflow_rate": "in [0, 1]",
    "loss_rise_tolerance": "in [0, 1)",
    "grow_below_usage": "in (0, shrink_above_usage)",
    "shrink_above_usage": "in (grow_below_usage, 1.5]",
    "max_batch_over_noise": "in (1e-10, 1e6]",
    "max_batch_growth": ">= 1",
    "anneal_plateau": "in (0, 1)",
    "anneal_after": "in [0, 1]",
    "anneal_release_after": "in (anneal_after, 1]",
    "ramp_batch_after": "in [0, ramp_batch_until)",
    "ramp_batch_until": "in (ramp_batch_after, 1]",
}
"""``HeuristicConfig``'s number fields and their ranges (for the type check's message; the ranges are checked apart)."""


@dataclass(frozen=True)
class RewardConfig:
    """Weights of the environment's reward (see ``triaccel_rl.reward``) and the cost budget of an episode.

    An episode of ``TriAccel-v0`` ends when its charged time reaches ``budget_intervals`` × the time of
    one decision interval of the reference configuration (fp32 at the task's base batch, measured or
    modelled at the episode's start), however many decisions that takes; the return is the progress
    made within that time.

    Attributes:
        progress_scale: multiplier on the log probe-loss decrease of an interval.
        nonfinite_penalty: subtracted per unit of the interval's skipped-step rate.
        over_budget_penalty: subtracted when peak memory exceeded the memory budget.
        divergence_penalty: subtracted once when the run diverges (episode terminates).
        clip: the reward is clipped to [-clip, clip]: a guard against outliers (a loss falling a thousandfold in one
            interval), far above a real interval's progress (up to ~13 in the first interval on ``synthetic``: a clip
            of 10 would give first decisions of different progress the same +10).
        budget_intervals: the episode's time budget, in reference intervals; > 0.

    Example:
        >>> RewardConfig(budget_intervals=8).budget_intervals
        8
    """

    progress_scale: float = 10.0
    nonfinite_penalty: float = 1.0
    over_budget_penalty: float = 1.0
    divergence_penalty: float = 5.0
    clip: float = 100.0
    budget_intervals: float = 16.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            positive = f.name in ("clip", "budget_intervals")
            require_number(f"reward {f.name}", value, "> 0" if positive else ">= 0")
            if not (is_finite_real(value) and value >= 0):  # clip=-1 was told it must be "non-negative"; 0: below
                raise ConfigError(f"reward {f.name}={value} must be a finite number {'> 0' if positive else '>= 0'}")
        if self.clip <= 0:
            raise ConfigError(f"reward clip={self.clip} must be positive")
        if self.budget_intervals <= 0:
            raise ConfigError(
                f"reward budget_intervals={self.budget_intervals} must be positive "
                "(the episode's time budget in reference intervals, e.g. 16)"
            )
        store_plain_numbers(self)


@dataclass(frozen=True)
class ElasticConfig:
    """Memory-elastic batching: LR coupling to the effective batch, micro-batch planning, OOM recovery.

    The *effective* batch (samples per optimizer step) is what a policy chooses; it is run as one or more
    *micro-batches* whose gradients are accumulated, each as large as the memory model predicts to fit in
    ``fill_frac`` of the budget. ``fill_frac`` below the heuristic's ``shrink_above_usage`` (0.95) keeps
    a planned fill from reading as memory pressure; ``grow_below_usage`` (0.45) is half of it, so a
    doubled batch still fits.

    Warm-up: when a change of the effective batch raises the LR gain by a factor of ``warmup_above`` or
    more, the gain ramps linearly from the old to the new value over ``warmup_steps`` optimizer steps
    (step ``k`` after the change uses ``g_old + (g_new - g_old) * k / warmup_steps``); a lower gain
    applies at once, and so does the batch set before the first step (the run's starting configuration).

    Attributes:
        lr_rule: how the LR follows the effective batch (:class:`LRRule`).
        warmup_above: ratio ``g_new / g_old`` at or above which a rise of the LR gain is warmed up; > 1.
        warmup_steps: optimizer steps of the warm-up ramp (0: no warm-up).
        fill_frac: share of the memory budget micro-batches are planned to fill, in (0, 1].
        oom_budget_factor: after an out-of-memory error in a step split into micro-batches of ``m``, the budget
            becomes this factor × the memory predicted for ``m``, in (0, 1]; planning fills ``fill_frac`` of it, so
            the next steps use micro-batches predicted at most ``fill_frac × factor`` of what failed, but the budget
            keeps room in ``fill_frac`` of it for ``m // 2`` (at least two samples, the retry's floor): where the
            weights and optimizer state outweigh a micro-batch's activations, ``fill_frac × factor`` of what failed
            is less than they alone need, and every later step ran one-sample micro-batches. And below the budget
            that still plans ``m``: with ``fill_frac × factor = 1`` every later step planned ``m`` again, and failed
            at it. The budget is never raised.
        max_oom_retries: out-of-memory errors tolerated within one step before it gives up.

    Example:
        >>> ElasticConfig(lr_rule="sqrt").lr_rule
        <LRRule.SQRT: 'sqrt'>
    """

    lr_rule: LRRule = LRRule.AUTO
    warmup_above: float = 1.5
    warmup_steps: int = 10
    fill_frac: float = 0.9
    oom_budget_factor: float = 1.0
    max_oom_retries: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_rule", LRRule.parse(self.lr_rule))
        require_number("warmup_above", self.warmup_above, "> 1")
        require_whole("warmup_steps", self.warmup_steps, ">= 0")
        require_number("fill_frac", self.fill_frac, "in (0, 1]")
        require_number("oom_budget_factor", self.oom_budget_factor, "in (0, 1]")
        require_whole("max_oom_retries", self.max_oom_retries, ">= 1")
        if not (is_finite_real(self.warmup_above) and self.warmup_above > 1.0):
            raise ConfigError(f"warmup_above={self.warmup_above} must be a ratio > 1")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not (0.0 < self.fill_frac <= 1.0):
            raise ConfigError(f"fill_frac={self.fill_frac} must be in (0, 1]")
        if not (0.0 < self.oom_budget_factor <= 1.0):
            raise ConfigError(f"oom_budget_factor={self.oom_budget_factor} must be in (0, 1]")
        if self.max_oom_retries < 1:
            raise ConfigError(f"max_oom_retries={self.max_oom_retries} must be >= 1")
        store_plain_numbers(self)


_LR_SCALES_DEFAULT = (0.5, 0.75, 1.0, 1.25, 1.5)


@dataclass(frozen=True)
class ControllerConfig:
    """How often and within which bounds the controller decides.

    Attributes:
        interval_steps: optimizer steps between two decisions; with measured cost, the least number (see
            ``max_interval_factor``).
        max_interval_factor: with measured cost (a GPU), the interval grows up to ``interval_steps`` × this
            so that the decisions' own measured cost stays within their share of the overhead budget,
            ``(1 - signals.expensive_share) * signals.budget_frac`` of training time
            (``triaccel_rl.cadence.Cadence``); 1 keeps ``interval_steps`` fixed. On a CPU, with modelled cost
            (``profile``) and in the learning environment the interval is always ``interval_steps``.
        n_groups: layer groups the observation and the precision action are built from.
        lr_scales: the LR multipliers an action can pick (absolute, applied to the task's schedule).
        min_batch_size: smallest batch a shrink may reach.
        max_batch_size: largest batch a grow may reach.
        max_lr_change: the shield's bound on the LR multiplier's change at one decision (ratio). The batch's own LR
            coupling (``ElasticConfig.lr_rule``: ×2 for a doubled batch under the linear rule) is not the
            multiplier and is not bounded by it: it keeps the LR per sample, and a gain above
            ``ElasticConfig.warmup_above`` is ramped in over ``warmup_steps``. So one decision that raises the
            multiplier ×1.5 and doubles the batch moves the effective LR ×3 by the ramp's end.
        rollback: the shield keeps a copy of the model and optimizer state and restores it when training breaks.
            ``DecisionLoop`` (``compare``) judges each decision by its probe loss: finite, with finite buffers, the
            state is healthy; a non-finite probe loss or buffer restores the copy. The ``Controller`` judges each
            interval by its updates: one that applied every update, with finite buffers, is healthy; one that applied
            none, or left a buffer non-finite, restores the copy (under fp16 not where its losses were finite: the
            loss scale backing off); a mixed one does neither. The copy is refreshed every ``snapshot_every`` healthy
            decisions and at a decision that changes the configuration. Costs one copy of the parameters and
            optimizer state in memory (the ``Controller``'s two, allocated when it is built: it sees a copied state's
            loss only at the next interval, and keeps the last confirmed copy until then). The learning environment
            turns it off, so that a policy sees, and is penalised for, the divergences it causes.
        rollback_offload: keep the rollback copy of a CUDA model in pinned host memory rather than on the
            GPU (no GPU memory for it; the copy is queued on the stream, a few ms of PCIe per 100 MB).
        snapshot_every: the rollback copy is refreshed every this many healthy decisions, and right after
            any decision that changes the configuration (so a rollback never crosses a change: in the
            ``Controller`` the change's copy is restored once before any older one, as the change may be what failed);
            a rollback then loses at most ``snapshot_every`` intervals of training. 1 copies at every decision.
        max_rollbacks_in_a_row: rollbacks the ``Controller``'s shield makes with no healthy interval between them
            (nor a newer copy confirmed: a state that trained); the next failure restores the last confirmed state
            and raises ``NoGoodStateError``: a restored state that keeps failing (an update from it that overflows,
            huge optimizer moments) was otherwise restored for good, the run neither training nor stopping. A healthy
            interval starts the count again; fp16's loss-scale back-off is no rollback. ``DecisionLoop`` (``compare``)
            is not bounded: a row that keeps failing runs to its budget and ends as a miss, where an error would stop
            the whole comparison.
        cost_mode: whether the ``Controller`` reads the step times of your loop: ``measured`` (the default; on a GPU
            they drive the speed trial between bf16 and fp16 and the adaptive decision interval) or ``profile``
            (no speed trial, a fixed interval: time is what a hardware profile says, which the ``Controller`` does
            not charge). ``compare``, ``run_controller``, ``TrainingRun`` and ``TriAccel-v0`` take their cost mode
            from their own ``cost_mode`` argument, not from this field.
        ema_decay: smoothing of per-step signals (loss, gradient moments), in (0, 1).
        memory: the memory budget.
        heuristic: thresholds of the heuristic policy.
        elastic: LR coupling to the batch, micro-batch planning and OOM recovery.
        signals: which signals the collector measures, its overhead budget, and whether the decision
            loop applies curvature-scaled per-layer LR factors (``triaccel_rl.signals.SignalConfig``). A
            preset name (``"cheap"``, ``"fixed"``, ...) is accepted and turned into that preset.

    Example:
        >>> ControllerConfig.preset("safe").interval_steps
        50
        >>> ControllerConfig(signals="cheap").signals.mode
        <SignalMode.CHEAP: 'cheap'>
    """

    interval_steps: int = 20
    max_interval_factor: int = 8
    n_groups: int = 4
    lr_scales: tuple[float, ...] = _LR_SCALES_DEFAULT
    min_batch_size: int = 16
    max_batch_size: int = 4096
    max_lr_change: float = 1.5
    rollback: bool = True
    rollback_offload: bool = True
    snapshot_every: int = 4
    max_rollbacks_in_a_row: int = 4
    cost_mode: CostMode = CostMode.MEASURED
    ema_decay: float = 0.9
    memory: MemoryBudget = field(default_factory=MemoryBudget)
    heuristic: HeuristicConfig = field(default_factory=HeuristicConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    signals: SignalConfig = field(default_factory=lambda: _signal_config_type()())

    def __post_init__(self) -> None:
        for name in (
            "interval_steps",
            "max_interval_factor",
            "snapshot_every",
            "max_rollbacks_in_a_row",
            "n_groups",
            "min_batch_size",
            "max_batch_size",
        ):
            require_whole(name, getattr(self, name), "in [1, 16]" if name == "n_groups" else ">= 1")
        for name in ("max_lr_change", "ema_decay"):
            require_number(name, getattr(self, name), ">= 1 (a ratio)" if name == "max_lr_change" else "in (0, 1)")
        for name in ("rollback", "rollback_offload"):
            require_bool(name, getattr(self, name))
        for name, kind in (("memory", MemoryBudget), ("heuristic", HeuristicConfig), ("elastic", ElasticConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} must be of type {kind.__name__}, e.g. {kind.__name__}()"
                )
        if isinstance(self.lr_scales, list):  # a JSON or YAML file gives lists; the config stays hashable
            object.__setattr__(self, "lr_scales", tuple(self.lr_scales))
        if not isinstance(self.lr_scales, tuple) or any(
            isinstance(s, bool) or not isinstance(s, numbers.Real) for s in self.lr_scales
        ):
            raise ConfigError(f"lr_scales={self.lr_scales!r} must be a non-empty tuple of positive numbers")
        if self.interval_steps < 1:
            raise ConfigError(f"interval_steps={self.interval_steps} must be >= 1")
        if self.heuristic.anneal_by == "batch" and self.elastic.lr_rule is not LRRule.NONE:
            raise ConfigError(
                f"heuristic.anneal_by='batch' needs elastic=ElasticConfig(lr_rule='none'), got "
                f"lr_rule={self.elastic.lr_rule.value!r}: a doubled batch lowers the gradient noise only at the LR "
                "held; under another rule the LR follows the batch up and the plateau is not annealed"
            )
        if self.max_interval_factor < 1:
            raise ConfigError(f"max_interval_factor={self.max_interval_factor} must be >= 1 (1: a fixed interval)")
        if self.snapshot_every < 1:
            raise ConfigError(f"snapshot_every={self.snapshot_every} must be >= 1 (1: a rollback copy every decision)")
        if self.max_rollbacks_in_a_row < 1:
            raise ConfigError(
                f"max_rollbacks_in_a_row={self.max_rollbacks_in_a_row} must be >= 1 (1: the second failure in a row "
                "raises)"
            )
        if not (1 <= self.n_groups <= 16):
            raise ConfigError(f"n_groups={self.n_groups} must be in [1, 16]")
        if not self.lr_scales or any(not (is_finite_real(s) and s > 0) for s in self.lr_scales):
            raise ConfigError(f"lr_scales={self.lr_scales} must be a non-empty tuple of positive numbers")
        if any(not (2.0**-OBS_HIGH <= s <= 2.0**OBS_HIGH) for s in self.lr_scales):
            # The observation reads the LR multiplier as log2, clipped to +-OBS_HIGH: rungs past it all read alike, and
            # the heuristic, taking the nearest rung to what it reads, would move off a rung it meant to keep.
            raise ConfigError(
                f"lr_scales={self.lr_scales} must lie in [2**-{OBS_HIGH:g}, 2**{OBS_HIGH:g}] = "
                f"[{2.0**-OBS_HIGH:g}, {2.0**OBS_HIGH:g}] (the observation reads the LR multiplier's log2 up to "
                f"+-{OBS_HIGH:g})"
            )
        if 1.0 not in self.lr_scales:
            raise ConfigError(f"lr_scales={self.lr_scales} must contain 1.0 (the neutral choice)")
        if any(a >= b for a, b in itertools.pairwise(self.lr_scales)):
            raise ConfigError(
                f"lr_scales={self.lr_scales} must be strictly increasing: the policies step up and down this ladder "
                "by position"
            )
        if not (1 <= self.min_batch_size <= self.max_batch_size):
            raise ConfigError(f"need 1 <= min_batch_size={self.min_batch_size} <= max_batch_size={self.max_batch_size}")
        if not (is_finite_real(self.max_lr_change) and self.max_lr_change >= 1.0):  # NaN would turn the bound off
            raise ConfigError(f"max_lr_change={self.max_lr_change} must be >= 1 (a ratio)")
        try:
            bound = self.max_lr_change**2
        except OverflowError:  # above ~1.3e154: no two rungs are that far apart
            bound = math.inf
        wide = [(a, b) for a, b in itertools.pairwise(self.lr_scales) if self.max_lr_change > 1.0 and b / a >= bound]
        if wide:  # a move between them stops short nearer the rung it left, read next as that rung: the LR swung back
            a, b = wide[0]
            raise ConfigError(
                f"lr_scales={self.lr_scales} has rungs {a:g} and {b:g}, {b / a:g}x apart: at least max_lr_change**2 = "
                f"{bound:g}, so a move between them, stopped at x{self.max_lr_change:g} a decision, ends nearer the "
                "rung it left; add a rung between them or raise max_lr_change"
            )
        if not (0.0 < self.ema_decay < 1.0):
            raise ConfigError(f"ema_decay={self.ema_decay} must be in (0, 1)")
        object.__setattr__(self, "cost_mode", CostMode.parse(self.cost_mode))
        signal_config = _signal_config_type()
        if isinstance(self.signals, str):
            object.__setattr__(self, "signals", signal_config.preset(self.signals))
        elif not isinstance(self.signals, signal_config):
            raise ConfigError(
                f"signals={self.signals!r} must be a SignalConfig or the name of one of its presets "
                "(SignalConfig.preset)"
            )
        store_plain_numbers(self)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ControllerConfig:
        """Returns a named preset, with optional field overrides.

        Presets: ``default``; ``safe`` (longer intervals, narrower LR range); ``aggressive`` (short intervals,
        wider LR range, fp16 allowed); ``anneal`` (the heuristic also anneals the LR on a plateau of the probe
        loss past 30% of the run, ``HeuristicConfig.anneal_plateau=0.05``, with a decision every interval of 100
        steps on the cheap signals, row ``heuristic-anneal5-i1`` of ``experiments/gpu_benchmark.py``; with
        ``lr_scales=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5)`` the cuts go on to x0.25, row ``heuristic-anneal5-i1-deep``;
        measured: BENCHMARKS.md, "H200, 2026-12-02 (fifth session)" and "(seventh session)").
        The others leave the signals at ``SignalConfig()``; override them like any field:
        ``ControllerConfig.preset("safe", signals="cheap")``.

        Raises:
            ConfigError: an unknown preset or override name (the message lists the allowed ones), or an override
                out of its range.
        """
        presets: dict[str, dict[str, Any]] = {
            "default": {},
            "safe": {"interval_steps": 50, "lr_scales": (0.75, 1.0, 1.25), "max_lr_change": 1.25},
            "aggressive": {
                "interval_steps": 10,
                "lr_scales": (0.5, 0.75, 1.0, 1.5, 2.0),
                "max_lr_change": 2.0,
                "heuristic": HeuristicConfig(lower_below=0.5, raise_above=1.0, use_fp16=True),
            },
            # interval_steps as the H200 row ran it (gpu_benchmark's default): a plateau read over 20 steps is another
            # rule than one read over 100.
            "anneal": {
                "interval_steps": 100,
                "max_interval_factor": 1,
                "signals": "cheap",
                "heuristic": HeuristicConfig(anneal_plateau=0.05),
            },
        }
        if not isinstance(name, str) or name not in presets:  # a list raised "unhashable type"
            raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(presets)}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:  # replace() would raise a TypeError about __init__'s keyword arguments
            raise ConfigError(f"ControllerConfig has no field(s) {unknown}; its fields: {', '.join(known)}")
        return replace(cls(), **{**presets[name], **overrides})


def store_plain_numbers(config: Any) -> None:
    """Stores the NumPy (or other non-Python) numbers of the frozen dataclass ``config`` as Python ints and floats.

    Called at the end of a config's ``__post_init__``, once its checks have passed (they take NumPy numbers). A number
    kept as given travelled into a ``Controller``'s state (``ema_decay=np.float32(0.9)`` made its loss EMA a NumPy
    float), whose checkpoint ``torch.load`` then refused (``weights_only``, the default since torch 2.6), and NumPy's
    fixed-width arithmetic broke on it (``SignalConfig(seed=np.int64(0))`` overflowed the collector's seed mixing).
    Whole numbers become ``int``, other real numbers (``np.float64``, a ``Fraction``) ``float``, within a tuple
    (``lr_scales``) too; Python's own numbers are kept as they are, a ``float`` subclass (a sentinel default) included,
    and so is every other value.
    """
    for f in fields(config):
        value = getattr(config, f.name)
        plain = tuple(map(_plain_number, value)) if isinstance(value, tuple) else _plain_number(value)
        if plain is not value:
            object.__setattr__(config, f.name, plain)


def _plain_number(value: Any) -> Any:
    # Python's own numbers (bool and a float-subclass sentinel included) as they are; np.float64 subclasses float
    if isinstance(value, int | float) and not isinstance(value, np.generic):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _signal_config_type() -> type[SignalConfig]:
    # Imported on first use rather than at the top: triaccel_rl.signals.config imports store_plain_numbers from this
    # module, so when triaccel_rl.signals is imported first it would find this module half-initialised.
    from triaccel_rl.signals.config import SignalConfig

    return SignalConfig
