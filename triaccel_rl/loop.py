"""``DecisionLoop``: the signals → observation → action → executor cycle over a ``TrainingRun``.

The environment (for learning) and ``compare`` (for evaluation) both drive a run through this class, so
the two see exactly the same observations, bounds and costs.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from triaccel_rl.actions import decode
from triaccel_rl.cadence import Cadence
from triaccel_rl.config import ControllerConfig, CostMode
from triaccel_rl.errors import is_real, is_whole
from triaccel_rl.executor import ApplyReport, Executor
from triaccel_rl.observation import LayerGrouper, ObservationLayout, build_observation
from triaccel_rl.shield import BufferCheck, RollbackGuard
from triaccel_rl.signals import SignalCollector, SignalMode, source_for_run
from triaccel_rl.training import IntervalStats, TrainingRun
from triaccel_rl.types import Precision, Signals

__all__ = ["OVERHEAD_PARTS", "DecisionLoop"]

OVERHEAD_PARTS = ("probe", "rollback", "moments", "rounds", "signals", "decision")
"""The parts of a decision's cost that :attr:`DecisionLoop.overhead_parts_ms` times: the probe loss, the
rollback copy (or restore), the optimizer's moments read back per layer, the estimator rounds (warm-up
included), the snapshot of the signals, and the policy with the executor (timed by whoever calls the policy).
Results before 2026-12-02's sixth session counted the moments under ``rollback``."""


class DecisionLoop:
    """Runs a ``TrainingRun`` interval by interval and turns raw actions into settings.

    Args:
        run: the training run to drive.
        config: decision interval, groups, bounds; ``config.signals`` configures the signal collector and the
            run's sampling of its per-step statistics (``TrainingRun.observe_budget_frac``).
        rollback: override ``config.rollback`` (the learning environment turns it off).
        adaptive_interval: let the interval grow so that decisions stay within their overhead budget
            (``ControllerConfig.max_interval_factor``); by default on for a GPU run with measured cost.

    Example:
        >>> loop = DecisionLoop(TrainingRun("synthetic", device="cpu"), ControllerConfig(interval_steps=2))
        >>> _ = loop.train_interval()
        >>> loop.snapshot(progress=0.1).batch_size
        64
    """

    def __init__(
        self,
        run: TrainingRun,
        config: ControllerConfig,
        rollback: bool | None = None,
        adaptive_interval: bool | None = None,
    ) -> None:
        for name, value in (("rollback", rollback), ("adaptive_interval", adaptive_interval)):
            if value is not None and not isinstance(value, bool):  # "no" turned the rollback on
                raise ValueError(f"{name}={value!r} must be True, False or None (the config's default)")
        if not isinstance(config, ControllerConfig):  # a dict or None failed on .rollback, unnamed
            raise TypeError(f"config={config!r} must be a ControllerConfig, e.g. ControllerConfig(interval_steps=5)")
        self.run = run
        self.config = config
        self.collector = SignalCollector(
            run.layers, config.ema_decay, run.memory_budget_bytes, config.signals, run.engine.layer_param_counts
        )
        # The shield's rollback: a copy of the last state whose probe loss was finite, restored when it is not; with it
        # the signals' running estimates and the run's noise EMAs, which the diverging interval had folded its huge
        # losses and gradients into, and the loss scale, which its skipped steps had cut. The callbacks reach this loop
        # through a weak reference: a strong one would close a reference cycle (loop, guard, callback), and a dropped
        # loop and its rollback copies (and its run, once closed) would wait for a full garbage collection.
        owner = weakref.proxy(self)
        use_rollback = config.rollback if rollback is None else rollback
        guard = RollbackGuard(
            run.model,
            run.engine.state_holder,
            config.rollback_offload,
            config.snapshot_every,
            after_restore=run.engine.after_restore,  # weights and optimizer state changed outside the fused step
            save_extra=lambda: (owner.collector.estimates(), run.noise_estimates, run.engine.scaler_state()),
            load_extra=lambda saved: owner._restore_estimates(saved),
        )
        self.guard = guard if use_rollback else None
        # Buffers holding infinities by design (an additive mask), excused from the shield's buffer check
        self._broken_buffers = BufferCheck(run.model)
        if self.guard is not None:
            self.guard.reserve()  # allocates the copy (pinned host memory on a GPU) before training
        self._healthy = False  # the latest probe loss was finite
        # The per-step statistics are sampled under the config's share where the run measures its time and memory (a
        # GPU in measured mode), and all recorded elsewhere, so that observations repeat for a seed. (The run kept
        # the default SignalConfig's share: a configured one was ignored, and compare's run, built in measured mode
        # and switched to profile mode after, sampled in profile mode.)
        run.observe_budget_frac = config.signals.observe_budget_frac if run.measures_memory else None
        measured_gpu = run.cost_mode is CostMode.MEASURED and run.device.type == "cuda"
        adaptive = measured_gpu if adaptive_interval is None else adaptive_interval
        share = (1.0 - config.signals.expensive_share) * config.signals.budget_frac
        self.cadence = Cadence(
            config.interval_steps,
            config.max_interval_factor,
            share,
            adaptive=adaptive,
            cheap_share=config.signals.cheap_budget_frac,
        )
        self._mark: tuple[float, float, float] | None = None  # (overhead_ms, estimator_ms, cheap_ms) at a chunk's end
        self._interval_train_ms = 0.0  # training time and steps since the last snapshot
        self._interval_steps = 0
        self._interval_recorded_ms = 0.0  # what recording the per-step statistics took in them
        self._fold_ms = self._fold_cheap_ms = 0.0  # what folding the interval's chunks into the collector took
        self._decided = False  # a snapshot (and so a decision) came after the last training chunk
        self.grouper = LayerGrouper(
            self.collector.controllable, config.n_groups, param_counts=run.engine.layer_param_counts
        )
        self.executor = Executor(config, self.grouper)
        self.layout = ObservationLayout(config.n_groups)
        self.signals: Signals | None = None
        self.decisions = 0
        self.overhead_parts_ms = dict.fromkeys(OVERHEAD_PARTS, 0.0)
        """Wall ms of the controller's work by part (:data:`OVERHEAD_PARTS`); ``decision`` is the caller's to add."""

    def _restore_estimates(self, saved: tuple[dict[str, Any], np.ndarray, Any]) -> None:
        estimates, noise, scaler = saved
        self.collector.restore_estimates(estimates)
        self.run.noise_estimates = noise
        self.run.engine.load_scaler_state(scaler)  # the interval's skipped steps had cut the scale (see scaler_state)

    def train_interval(self, max_steps: int | None = None) -> IntervalStats:
        """Trains up to the next decision point, or ``max_steps`` steps if fewer, and feeds the collector.

        The next decision point is ``cadence.steps`` steps after the last :meth:`snapshot`; a caller that
        stops short (``max_steps``, e.g. to evaluate at fixed steps) calls this again to finish the interval
        (:attr:`decision_due` says when to take the snapshot). A call once the interval is whole, with no snapshot
        taken, starts it anew as :meth:`discard_interval` does: no snapshot reads the steps passed over. The steps
        run through ``TrainingRun.train_interval``: one host-device sync per call. The decision work between an
        interval's end and the next call (snapshot, policy, executor; not the estimator rounds, which have
        their own budget) is what ``cadence`` measures.
        """
        if max_steps is not None and (not is_whole(max_steps) or max_steps < 0):  # before the cadence's record moves
            raise ValueError(f"max_steps={max_steps!r} must be a whole number >= 0 (or None: to the decision point)")
        collector = self.collector
        if self._decided:
            if self._mark is not None:
                overhead, rounds, cheap = self._mark
                # The interval's folding of its chunks' moments is the cheap tier's work too, as in the Controller,
                # whose decision window holds it (it was left out here: the mark is taken after each fold).
                decision_ms = (collector.overhead_ms - overhead) - (collector.estimator_ms - rounds) + self._fold_ms
                self.cadence.record(
                    decision_ms,
                    self._interval_train_ms,
                    self._interval_steps,
                    cheap_ms=collector.cheap_ms - cheap + self._fold_cheap_ms,
                    recording_ms=self._interval_recorded_ms,
                )
            self._interval_train_ms, self._interval_steps, self._decided = 0.0, 0, False
            self._interval_recorded_ms = self._fold_ms = self._fold_cheap_ms = 0.0
        if self._interval_steps >= self.cadence.steps:  # a whole interval went by without a snapshot: start anew
            self._restart_interval()
        left = self.cadence.steps - self._interval_steps
        stats = self.run.train_interval(left if max_steps is None else min(max_steps, left))
        self._interval_train_ms += stats.train_ms
        self._interval_steps += stats.steps
        self._interval_recorded_ms += stats.moments.recorded_ms
        overhead, cheap = collector.overhead_ms, collector.cheap_ms
        collector.observe_interval(
            stats.moments,
            n_steps=stats.steps,
            train_ms=stats.train_ms,
            charged_ms=stats.charged_ms,
            peak_bytes=stats.peak_bytes,
            skipped=stats.skipped,
            budget_lowered=stats.oom_events > 0,
        )
        self._fold_ms += collector.overhead_ms - overhead
        self._fold_cheap_ms += collector.cheap_ms - cheap
        self._mark = (collector.overhead_ms, collector.estimator_ms, collector.cheap_ms)
        return stats

    def discard_interval(self) -> None:
        """Ends the open interval with no snapshot: the next decision point is a whole interval away.

        Its snapshot reads none of the steps trained so far, which say nothing of the settings decided next:
        ``compare`` calls it after a speed trial (:meth:`time_precisions`), whose fp16 candidate's skipped steps,
        while its loss scale backs off, read as overflows of the format the trial chose. Their time still counts in
        the cadence's training, and the signals' running estimates keep them (real training). Right after a snapshot
        nothing is open: nothing changes.
        """
        if self._decided:  # the interval the snapshot closed is recorded at the next train_interval() call
            return
        self._restart_interval()

    def time_precisions(
        self,
        candidates: Sequence[Precision],
        steps: int,
        warmup_steps: int = 2,
        train: Callable[[int], IntervalStats] | None = None,
    ) -> tuple[dict[Precision, float], list[IntervalStats]]:
        """Times real training steps in each candidate precision: ``(ms a step per candidate, chunks trained)``.

        Each candidate (every controllable layer alike) trains ``warmup_steps`` then ``steps`` steps; the
        time is the mean of the latter. The warm-up steps pay what a new precision map costs once (a graph
        capture, kernel selection). All are real training steps, fed to the collector as any other; the
        caller charges them (``IntervalStats.charged_ms``). The last candidate's precision is left on. A candidate
        may be a ``Precision`` or its name (``"bf16"``); one named twice is timed once, and the result is keyed by
        ``Precision``. ``train(n)`` trains a chunk of at most ``n`` steps (``train_interval`` by default): ``compare``
        charges each chunk as it comes and cuts them at its evaluation steps.

        Raises:
            ValueError: no candidate, an unknown one, or ``steps`` not a whole number >= 1, or ``warmup_steps`` not a
                whole number >= 0 (bools refused too), before any step trains.
        """
        if candidates is None or isinstance(candidates, str):  # "bf16" was read as the names 'b', 'f', '1', '6'
            raise ValueError(f"candidates={candidates!r}: give a sequence of precisions to time, e.g. ['bf16', 'fp16']")
        # Parsed before any step trains: an unknown name was met only at set_precisions, after the candidates before
        # it had trained and changed the run's precision; "bf16" and Precision.BF16 were timed twice, keyed apart.
        candidates = list(dict.fromkeys(Precision.parse(candidate) for candidate in candidates))
        if not candidates:  # checked on the list: an empty iterator is truthy
            raise ValueError("candidates is empty: name at least one precision to time")
        # Checked here, before the first candidate trains: a fractional count (steps=2.5) trained a few steps, left
        # the precision changed and failed in train_interval.
        if not is_whole(steps) or steps < 1:
            raise ValueError(f"steps={steps!r} must be >= 1, a whole number of timed steps a candidate")
        if not is_whole(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps!r} must be >= 0, a whole number of steps a candidate")
        n_controllable = len(self.run.precision.controllable_indices)
        step_ms: dict[Precision, float] = {}
        chunks: list[IntervalStats] = []
        for precision in candidates:
            self.run.set_precisions([precision] * n_controllable)
            timed_ms = 0.0
            timed_steps = 0
            for n, timed in ((warmup_steps, False), (steps, True)):
                while n > 0:  # an interval may end inside a chunk: carry on into the next one
                    chunk = train(n) if train is not None else self.train_interval(max_steps=n)
                    if chunk.steps == 0:
                        break
                    chunks.append(chunk)
                    n -= chunk.steps
                    if timed:
                        timed_ms += chunk.train_ms
                        timed_steps += chunk.steps
            step_ms[precision] = timed_ms / max(timed_steps, 1)
        return step_ms, chunks

    @property
    def decision_due(self) -> bool:
        """Whether the steps since the last snapshot have reached the cadence's interval."""
        return not self._decided and self._interval_steps >= self.cadence.steps

    def snapshot(self, progress: float) -> Signals:
        """Closes the interval: probe loss, optimizer moments, a due estimator round, ``Signals``, re-ranking.

        With ``config.signals.mode`` ``all`` (the default), the collector runs its expensive estimators
        (Hutchinson curvature, micro-batch gradient noise, curvature sparsity) on sub-batches of the run's
        held-out probe batch whenever its overhead budget has room (``SignalConfig``). With
        ``config.signals.lr_factors`` (default off; :meth:`enable_lr_factors`), the curvature-scaled
        per-layer LR factors of the snapshot are applied to the run. The snapshot reports the run's
        current memory budget, which it lowers after an out-of-memory error.

        ``progress`` is the share of the run trained so far; outside [0, 1] it is clamped, and NaN read as 0.

        Raises:
            ValueError: ``progress`` is not a real number (a bool neither), before the probe or anything else runs.
        """
        if not is_real(progress):  # "0.5" or None failed deep in the estimators, the interval already closed
            raise ValueError(f"progress={progress!r} must be a real number, the share of the run trained (e.g. 0.25)")
        self._decided = True
        parts = self.overhead_parts_ms
        start = time.perf_counter()
        probe = self.run.probe_loss()
        rolled_back = copied_now = False
        self._healthy = math.isfinite(probe)
        mark = time.perf_counter()
        parts["probe"] += (mark - start) * 1e3
        if self.guard is not None:
            # The probe runs its norms in train mode (their batch statistics), so a running statistic a non-finite
            # batch wrote would show only at evaluation: checked on its own.
            broken = self._broken_buffers()
            if self._healthy and not broken:
                copied_now = self.guard.healthy()  # refreshes the copy every config.snapshot_every healthy decisions
            elif self.guard.restore(f"non-finite values in buffers {broken[:3]}" if broken else "non-finite loss"):
                rolled_back = True
                probe = self.run.probe_loss()
                self._healthy = math.isfinite(probe)
        copied = time.perf_counter()
        parts["rollback"] += (copied - mark) * 1e3  # the copy (every snapshot_every healthy decisions) or the restore
        moments = self.run.engine.grad_mean_sq_norm()
        now = time.perf_counter()
        parts["moments"] += (now - copied) * 1e3  # one reduction and one host-device sync
        self.collector.add_overhead((now - start) * 1e3)
        if self.collector.config.mode is SignalMode.ALL:
            if self.collector.source is None:
                self.collector.attach(source_for_run(self.run), seed=self.run.seed)
            rounds = self.collector.estimator_ms
            ran = self.collector.maybe_estimate(progress=progress)
            parts["rounds"] += self.collector.estimator_ms - rounds
            if copied_now and ran is not None and self.guard is not None:  # on the copy's weights: it goes with it
                self.guard.refresh_extra()
        # The run lowers its budget after an out-of-memory error; the snapshot must report the current one.
        self.collector.memory_budget_bytes = self.run.memory_budget_bytes
        # The collector's own charge for the snapshot, not a clock around the call: a clock around it read a little
        # more than the collector charged, so the parts could add up to more than the overhead they split.
        cheap_before = self.collector.cheap_ms
        self.signals = self.collector.snapshot(
            grad_mean_sq_norm=moments,
            probe_loss=probe,
            batch_size=self.run.batch_size,
            lr_scale=self.run.lr_scale,
            precisions=self.run.precisions,
            progress=progress,
        )
        parts["signals"] += self.collector.cheap_ms - cheap_before
        self.signals.extra["rolled_back"] = rolled_back
        self.signals.extra["rollbacks"] = self.guard.rollbacks if self.guard is not None else 0
        if self.collector.config.lr_factors and self.signals.lr_factors is not None:
            self.run.lr_factors = self.signals.lr_factors
        self.grouper.update(self.signals)
        return self.signals

    def enable_lr_factors(self) -> None:
        """Applies the curvature-scaled per-layer LR factors (``SignalConfig.lr_factors``) from the next snapshot.

        For policies that expect them (``HeuristicPolicy.needs_lr_factors``, e.g. ``heuristic-second-order``)
        when the loop was built with a config that leaves them off. ``config.signals`` is updated too, so
        the loop's config keeps describing what it does.
        """
        # Only the flag changes, and only snapshot() reads it: the collector's scheduler, built from the
        # old config, has nothing that depends on it.
        self.collector.config = replace(self.collector.config, lr_factors=True)
        self.config = replace(self.config, signals=self.collector.config)

    def observation(self) -> np.ndarray:
        """The observation of the latest snapshot."""
        if self.signals is None:
            raise RuntimeError("no snapshot yet: call train_interval() and snapshot() first")
        return build_observation(self.signals, self.grouper, self.run.task.base_batch_size, self.layout)

    def apply(self, raw_action: np.ndarray) -> ApplyReport:
        """Decodes ``raw_action`` and applies it to the run through the executor (with its shield).

        A decision that changes the configuration refreshes the rollback copy (the state was just probed
        healthy; only the settings change): a change is what most often precedes a divergence, and a
        rollback then restarts from the change rather than from an older copy. It also makes the next
        interval the shortest (``Cadence.expedite``), so the change is judged soon.
        """
        overflow = self.signals.overflow_rate if self.signals is not None else 0.0
        report = self.executor.apply(decode(raw_action, self.config), self.run, overflow_rate=overflow)
        self.decisions += 1
        if report.changed:
            self.cadence.expedite()  # judge the change at the next decision, soon
        if report.changed and self.guard is not None and self._healthy and not self.guard.copy_is_current:
            self.guard.save()
        return report

    def _restart_interval(self) -> None:
        """Starts the cadence's interval anew, with no decision: the steps since the last snapshot are passed over."""
        # Their time still counts in the run's training that the decisions are weighed against (dropped, a speed
        # trial across two decision points would leave 1.3 s of 2.1 s out of the cadence's trained_ms).
        self.cadence.add_training(self._interval_train_ms)
        self._interval_train_ms, self._interval_steps, self._interval_recorded_ms = 0.0, 0, 0.0
        self._fold_ms = self._fold_cheap_ms = 0.0
        # Kept, the next snapshot would read the passed-over steps with its own: their skips in its overflow rate,
        # their time in its step time (where train_interval goes on past a decision point with no snapshot)
        self.collector.discard_interval()
