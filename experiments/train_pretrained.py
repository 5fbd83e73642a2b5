"""Trains the policy shipped as ``triaccel_rl/pretrained/`` (``policy="pretrained"``) and writes its model card.

The command that trained the shipped policy (2 CPU cores, about 12 minutes; time is charged from the shipped
H200 profile; its model card, ``triaccel_rl/pretrained/MODEL_CARD.md``, records the command of the policy in the
package):

    python experiments/train_pretrained.py --timesteps 4096 --warm-start heuristic+lr-oracle \
        --warm-start-steps 1024 --lr-range 0.4,1.0 --warm-start-epochs 20

PPO (``triaccel_rl.rl.train_policy``) on ``TRAINING_TASKS`` with 2 ``SubprocVecEnv`` workers (each
cycles through the tasks, one per episode), periodic evaluation on ``HELD_OUT_TASKS``, checkpoints and
TensorBoard under ``--run-dir``. At the end it copies the policy zip and its ``.obs.json`` into
``--ship-dir`` and writes ``MODEL_CARD.md`` there. ``--smoke`` trains a few dozen steps into a temporary
folder (or the ``--run-dir`` given, where it is not the default) and ships nothing (the smoke test runs it).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from triaccel_rl.experiment import command_line, cpu_machine, git_commit, parse_args, write_text_atomic
from triaccel_rl.rl import ActionSpread

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    """Command-line arguments (each field is a ``--flag``)."""

    timesteps: int = 2048
    """Environment steps (decisions) to train for, summed over the environments."""
    n_envs: int = 2
    """Parallel environments (``SubprocVecEnv``, one process each)."""
    budget_intervals: float = 16.0
    """Each episode's time budget, in intervals of fp32 at the task's base batch (``RewardConfig``); an
    episode ends when its charged time reaches it, and its return is the progress made within it."""
    max_decisions: int = 64
    """Safety cap on decisions per episode (the time budget normally ends an episode first)."""
    progress: bool = True
    """Progress bars on stderr: the warm start's (the teacher's decisions, the imitation's passes), then PPO's
    environment steps (``--no-progress``: none)."""
    compute_bound: bool = False
    """Charge only the compute part of a step (no fixed per-step time); off, so training charges the costs
    ``compare`` and ``transfer.py`` judge by."""
    interval_steps: int = 10
    """Optimizer steps per decision (small, so that an episode is cheap on a CPU)."""
    lr_range: str = ""
    """``LOW,HIGH``: each episode's task LR is drawn log-uniformly from ``[LOW, HIGH]`` × its own (``TriAccelEnv``'s
    ``lr_range``: domain randomisation of the LR); empty: the tasks' own LRs."""
    n_steps: int = 128
    """PPO rollout length per environment (a rollout is ``n_steps * n_envs`` decisions)."""
    batch_size: int = 64
    """PPO minibatch size."""
    ent_coef: float = 0.0
    """PPO's entropy bonus (0: none, SB3's default)."""
    learning_rate: float = 3e-4
    """PPO's Adam step size (SB3's default)."""
    seed: int = 0
    """Seeds PPO and the environments (worker ``i``'s ``k``-th task draws from ``seed + k * n_envs + i``)."""
    eval_every: int = 1024
    """Environment steps between evaluations on the held-out tasks (0: none)."""
    checkpoint_every: int = 512
    """Environment steps between checkpoints (0: none)."""
    torch_threads: int = 1
    """PyTorch threads per environment process (1: one process per core, no oversubscription)."""
    warm_start: str = ""
    """A policy whose actions PPO's policy first imitates (e.g. ``heuristic``, or ``heuristic+lr-oracle`` with
    ``lr_range``: its LR choice undoes the episode's draw); '' for PPO from scratch."""
    warm_start_steps: int = 512
    """Teacher decisions imitated by ``--warm-start`` (not counted in ``--timesteps``)."""
    warm_start_epochs: int = 200
    """Passes of the imitation over those decisions (``triaccel_rl.rl.imitate``)."""
    warm_start_lr: float = 0.0
    """The imitation's own Adam step size, leaving PPO's optimizer untouched (PPO starts at ``--learning-rate`` with no
    moments); 0: the imitation steps PPO's optimizer at ``--learning-rate``, as the shipped policy's command did."""
    run_dir: str = "runs/pretrained"
    """Folder for the policy, checkpoints, evaluations and TensorBoard (``tensorboard --logdir``); with ``--smoke``,
    the default is replaced by a new temporary folder."""
    ship_dir: str = "triaccel_rl/pretrained"
    """Where the shipped policy and model card go ('' to ship nothing); a relative path is taken from the repository's
    root, where the package's policy lives (from another folder it made a stray copy there and said "shipped")."""
    from_checkpoint: str = ""
    """Ship this checkpoint instead of training (an interrupted run): its ``.obs.json`` is then taken from
    ``stats_episodes`` episodes of the checkpoint's own policy on each training task. The run is the newest TensorBoard
    run in ``--run-dir``: its start times the training, and only evaluations written since, up to the checkpoint's
    steps, are recorded (a checkpoint written before it started is refused)."""
    stats_episodes: int = 1
    """Episodes per training task for ``--from-checkpoint``'s observation range."""
    card_only: bool = False
    """Only rewrite ``MODEL_CARD.md`` from ``<run_dir>/training.json`` (e.g. after ``transfer.py`` ran)."""
    smoke: bool = False
    """A tiny run (a few dozen steps, in-process envs, one training task, into a temporary folder unless
    ``--run-dir`` names another than the default) that ships nothing."""


def main(args: Args) -> dict[str, Any]:
    """Trains, ships and documents the policy; returns the facts the model card is written from."""
    from triaccel_rl.compare import json_safe
    from triaccel_rl.rl import obs_stats_path, save_policy, train_policy
    from triaccel_rl.shield import ObservationStats
    from triaccel_rl.tasks import HELD_OUT_TASKS, TRAINING_TASKS

    if args.smoke:
        args = replace(args, timesteps=32, n_envs=1, budget_intervals=4, interval_steps=2, n_steps=32,
                       batch_size=16, eval_every=0, checkpoint_every=0, ship_dir="")  # fmt: skip
        if args.run_dir == Args.run_dir:
            # A plumbing check wrote over the real run's policy, checkpoints and training.json in runs/pretrained.
            # A new folder each time: nothing of an earlier smoke run is taken for this one's.
            smoke_dir = tempfile.mkdtemp(prefix="triaccel-rl-smoke-pretrained-")
            print(f"--smoke: --run-dir {smoke_dir} (not the default {Args.run_dir})", file=sys.stderr)
            args = replace(args, run_dir=smoke_dir)
    training_tasks = ("synthetic",) if args.smoke else TRAINING_TASKS
    run_dir = Path(args.run_dir)
    if args.card_only:
        if not args.ship_dir:  # '' (or --smoke's) resolved to the repository root, and its policy.zip was looked for
            raise SystemExit("--card-only needs --ship-dir (the folder whose policy.zip the card describes)")
        if not (run_dir / "training.json").is_file():
            raise SystemExit(f"--card-only: {run_dir / 'training.json'} not found (the --run-dir of a finished run)")
        facts = json.loads((run_dir / "training.json").read_text())
        ship = _ship_dir(args)
        _write_card(ship, facts)
        return facts
    checkpoint = _checked_checkpoint(args) if args.from_checkpoint else None
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Wall clock, as file times are: an evaluations file older than this is another run's (None: a start unknown)
    started: float | None = time.time()
    commit = git_commit()  # the code that trains: a commit made during a run of minutes is not it
    stats = None
    if checkpoint is not None:
        # The interrupted run's start, not this script's: its evaluations are those written since, and its training
        # time runs from it to the checkpoint's write (before, any earlier run's evaluations and start were taken).
        started = _interrupted_run_start(run_dir / "tensorboard", checkpoint)
        # The rollouts' stats are written beside a copy in a temporary folder: beside the checkpoint they would replace
        # those PPO saved with it, and a copy over policy.zip, made first, left a broken policy beside the previous
        # policy's stats where a step failed
        with tempfile.TemporaryDirectory(prefix="triaccel-rl-from-checkpoint-") as staging:
            staged = Path(staging) / "policy.zip"
            shutil.copyfile(checkpoint, staged)
            _stats_from_rollouts(staged, training_tasks, args)
            stats = ObservationStats.load(obs_stats_path(staged))
        zip_path = run_dir / "policy.zip"
    else:
        zip_path = train_policy(
            list(training_tasks),
            total_timesteps=args.timesteps,
            n_envs=args.n_envs,
            vec="subproc" if args.n_envs > 1 else "dummy",
            budget_intervals=args.budget_intervals,
            max_decisions=args.max_decisions,
            interval_steps=args.interval_steps,
            n_steps=args.n_steps,
            batch_size=args.batch_size,
            ent_coef=args.ent_coef,
            learning_rate=args.learning_rate,
            seed=args.seed,
            out=run_dir / "policy.zip",
            log_dir=run_dir / "tensorboard",
            eval_tasks=list(HELD_OUT_TASKS) if args.eval_every > 0 else [],
            eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every,
            torch_threads=args.torch_threads,
            warm_start=args.warm_start or None,
            warm_start_steps=args.warm_start_steps,
            warm_start_epochs=args.warm_start_epochs,
            warm_start_learning_rate=args.warm_start_lr or None,
            compute_bound=args.compute_bound,
            lr_range=_lr_range(args),
            progress_bar=args.progress,
        )
    wall_s = time.perf_counter() - start
    facts = _facts(args, training_tasks, HELD_OUT_TASKS, checkpoint or zip_path, run_dir, wall_s, commit, started)
    if checkpoint is not None:
        # Only now, every step that can fail done: the run's policy.zip and its stats are replaced together
        save_policy(_ZipBytes(checkpoint), zip_path, stats)
    write_text_atomic(run_dir / "training.json", json.dumps(json_safe(facts), indent=1, allow_nan=False) + "\n")
    print(
        f"trained {facts['timesteps_trained']} env steps in {facts['wall_s']:.0f} s "
        f"({facts['env_steps_per_s']:.2f} env steps/s incl. PPO updates and evaluations): {zip_path}"
    )
    if args.ship_dir:
        ship = _ship_dir(args)
        ship.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(zip_path, ship / "policy.zip")
        shutil.copyfile(obs_stats_path(zip_path), ship / "policy.obs.json")
        _write_card(ship, facts)
        print(f"shipped: {ship / 'policy.zip'} ({(ship / 'policy.zip').stat().st_size / 1e3:.0f} kB), MODEL_CARD.md")
    return facts


def _spread(policy_zip: Path) -> ActionSpread:
    """How much the policy's action depends on its input (``triaccel_rl.rl.action_spread``)."""
    from triaccel_rl.policies import LearnedPolicy

    from triaccel_rl.rl import action_spread, obs_stats_path
    from triaccel_rl.shield import ObservationStats

    return action_spread(LearnedPolicy(policy_zip), ObservationStats.load(obs_stats_path(policy_zip)))


def _spread_section(spread: ActionSpread | None) -> str:
    if spread is None:
        return ""
    mode = f"`{list(spread.mode)}`"
    text = (
        f"Its deterministic actions on {spread.samples} observations drawn uniformly in its training range "
        f"(`triaccel_rl.rl.action_spread`): {spread.distinct} distinct; the most frequent, {mode}, on "
        f"{100 * spread.mode_share:.0f}% of them."
    )
    if spread.distinct == 1:
        from triaccel_rl.actions import decode
        from triaccel_rl.config import ControllerConfig

        action = decode(np.asarray(spread.mode), ControllerConfig())
        groups = ", ".join(p.name.lower() for p in action.group_precisions)
        text += (
            f" **The policy is a constant:** it takes that action whatever it observes (groups, most sensitive "
            f"first: {groups}; LR ×{action.lr_scale:g}; batch: {action.batch_move.name.lower()}), so what it gains "
            "over the heuristic comes from that action, not from reading the run."
        )
    return f"\n## Does it read its input?\n\n{text}\n"


def _command(facts: dict[str, Any]) -> str:
    """The recorded command; a warm-started run from before ``--warm-start-epochs`` existed ran 20 passes."""
    command = f"`{facts['command']}`"
    if facts.get("warm_start") and "warm_start_epochs" not in facts["args"]:
        command += (
            " (recorded when the imitation's 20 passes were fixed; to reproduce it today add `--warm-start-epochs 20`)"
        )
    return command


def _warm_start_rate(warm_start: dict[str, Any]) -> str:
    """The imitation's own step size, where it had one (a record without it stepped PPO's optimizer at PPO's rate)."""
    rate = warm_start.get("learning_rate")
    return "" if rate is None else f", Adam at `learning_rate={rate:g}` of its own"


def _number(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``; "n/a" for None or a value that is not finite.

    ``training.json`` holds a NaN or infinite number (a diverged evaluation) as null, so the card read back from it
    (``--card-only``) meets None where the card written at the end of training met NaN; both read "n/a".

    Example:
        >>> _number(1.234, ".2f"), _number(None, ".2f"), _number(float("nan"), ".2f")
        ('1.23', 'n/a', 'n/a')
    """
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def _percent(share: float | None) -> str:
    """``share`` (0..1) as a whole percentage, "n/a" where it is None or not finite."""
    return "n/a" if share is None or not math.isfinite(share) else f"{100 * share:.0f}%"


def _profile_row(facts: dict[str, Any]) -> str:
    """The model card's profile row: the shipped profile, and the scale the policy was trained with if another."""
    from triaccel_rl.config import HardwareProfile

    row = f"{facts['profile']} (the shipped `triaccel_rl/profiles/h200.json`)"
    trained, shipped = facts.get("profile_throughput_scale"), HardwareProfile.load(None).throughput_scale
    if trained is not None and trained != shipped:
        row += (
            f"; trained with its `throughput_scale` of then, {trained:g} ms a sample-MFLOP, 6x the ResNet-18 step "
            f"the profile names (corrected to {shipped:g} on 2026-12-04: rewards over-charged the batch's compute "
            "against the fixed per-step time); the evaluations below are under the corrected profile"
        )
    return row


def _tasks_row(facts: dict[str, Any]) -> str:
    """The training tasks, and how the workers shared them: a run before 2026-12-05 did not share them equally."""
    tasks, n_envs = facts["training_tasks"], facts["args"]["n_envs"]
    names = ", ".join(f"`{t}`" for t in tasks)
    if facts.get("every_worker_every_task"):
        return names + " (each worker cycles through them, one per episode)"
    # make_env_fns until 2026-12-05: worker i cycled through tasks[(i + k * n_envs) % len(tasks)] only
    turns = max(1, -(-len(tasks) // n_envs))
    cycles = [[tasks[(i + k * n_envs) % len(tasks)] for k in range(turns)] for i in range(n_envs)]
    share = dict.fromkeys(tasks, 0.0)
    for cycle in cycles:
        for task in cycle:
            share[task] += 1 / len(cycle) / n_envs
    workers = "; ".join(f"worker {i} through " + ", ".join(f"`{t}`" for t in cycle) for i, cycle in enumerate(cycles))
    shares = ", ".join(f"`{t}` {_percent(v)}" for t, v in share.items())
    return (
        f"{names} (trained before `8a0b6a5` (2026-12-05), when each worker cycled through only some of them, one "
        f"per episode: {workers}; so each task's share of the episodes was {shares}. Since then every worker cycles "
        "through all of them: the command above trains on equal shares now, and does not give these weights again)"
    )


def _evaluation_timing(facts: dict[str, Any]) -> tuple[str, str]:
    """Which weights the evaluations during training scored: the end of the section's first sentence, and a note.

    The note, after the table, is for a run before 2026-12-05, which scored earlier weights than its step counts say.
    """
    settings, evals = facts["args"], facts["evaluations"]
    if facts.get("evaluated_after_update") or not evals:
        return ", each row on the weights trained on its step count (the checkpoint of that count)", ""
    rollout = settings["n_steps"] * settings["n_envs"]
    # Evaluated in the rollout its step count ends in, before the update on it: on the rollouts completed before it
    trained = [rollout * (-(-e["timesteps"] // rollout) - 1) for e in evals]
    last = evals[-1]["timesteps"]
    steps = f"{settings['n_steps']} × {settings['n_envs']} = {rollout} steps"
    which = (
        f"the weights one rollout ({steps}) before its step count"
        if all(t == e["timesteps"] - rollout for t, e in zip(trained, evals, strict=True))
        else "the weights of the last update before its step count"
    )
    return "", (
        f"\n**Produced before 2026-12-05, this table scores earlier weights than its step counts say.** Each "
        f"evaluation then ran in the middle of a rollout, before the update on it: each row scores {which} (the "
        f"{last} row scored the weights trained on {trained[-1]} steps), and the final weights were not evaluated. "
        "Evaluations now run after the update, on the weights of the checkpoint of their step count.\n"
    )


def model_card(facts: dict[str, Any], spread: ActionSpread | None = None, policy_sha256: str | None = None) -> str:
    """The Markdown model card for the shipped policy (``spread``: see :func:`_spread`).

    With ``policy_sha256`` (the zip the card describes), the evaluation tables are taken from ``transfer.py``'s
    results only where their ``pretrained`` runs are of that zip: a retrained policy's card showed its
    predecessor's evaluation as its own.
    """
    settings = facts["args"]
    ppo = facts.get("ppo", settings)  # the zip's own; a training.json of before 2026-12-07 holds only the flags
    evals = facts["evaluations"]
    eval_rows = "\n".join(
        f"| {e['timesteps']} | {_number(e['mean_reward'], '.2f')} ± {_number(e['std_reward'], '.2f')} |" for e in evals
    )
    eval_timing, eval_note = _evaluation_timing(facts)
    rows = [
        ("command", _command(facts)),
        ("algorithm", f"PPO, `n_steps={ppo['n_steps']}` per env, `batch_size={ppo['batch_size']}`, "
                      + (f"`ent_coef={ppo['ent_coef']:g}`, " if ppo.get("ent_coef") else "")
                      + (f"`learning_rate={ppo['learning_rate']:g}`, " if ppo.get("learning_rate", 3e-4) != 3e-4
                         else "")
                      + "other SB3 defaults"),
        ("training tasks", _tasks_row(facts)),
        ("held-out tasks (evaluation only)", ", ".join(f"`{t}`" for t in facts["held_out_tasks"])),
        ("environment steps trained", f"{facts['timesteps_trained']} decisions (episodes of a time budget of "
                                      f"{settings['budget_intervals']:g} reference intervals)"),
        ("warm start", "none (PPO from scratch)" if not facts.get("warm_start") else
                       f"imitation of `{facts['warm_start']['teacher']}` on {facts['warm_start']['decisions']} of its "
                       f"decisions before PPO (`triaccel_rl.rl.imitate`{_warm_start_rate(facts['warm_start'])}; "
                       "afterwards the deterministic policy matched "
                       f"{_percent(facts['warm_start']['agreement'])} of them in every component)"),
        ("seeds", f"PPO seed {settings['seed']}; worker `i`'s `k`-th task seeded "
                  f"`{settings['seed']} + k * {settings['n_envs']} + i`"),
        ("environments", f"{settings['n_envs']} × `{'SubprocVecEnv' if settings['n_envs'] > 1 else 'DummyVecEnv'}`, "
                         f"`torch_threads={settings['torch_threads']}` each"),
        ("env settings", f"`interval_steps={settings['interval_steps']}`, "
                         f"`RewardConfig(budget_intervals={settings['budget_intervals']:g})` (other weights default), "
                         f"`max_decisions={settings['max_decisions']}` (cap), cost mode `profile`, "
                         f"`compute_bound={settings['compute_bound']}`, "
                         f"`lr_range={settings.get('lr_range') or 'none'}`, device `cpu`, default `ControllerConfig`"),
        ("hardware profile (time and memory charged)", _profile_row(facts)),
        ("machine", facts["machine"]),
        ("wall time", f"{facts['wall_s']:.0f} s"),
        ("throughput", f"{facts['env_steps_per_s']:.2f} env steps/s "
                       f"({facts['env_steps_per_s'] * settings['interval_steps']:.0f} optimizer steps/s), "
                       "PPO updates and evaluations included"),
        ("commit", f"`{facts['commit']}` (the working tree may differ)"),
        ("date", facts["date"]),
    ]  # fmt: skip
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    provenance = ""
    if facts.get("shipped_from_checkpoint"):
        provenance = (
            "\n## Provenance\n\nThe training run stopped before it saved (see the command above without "
            "`--from-checkpoint`); this policy is its checkpoint\n"
            f"`{facts['shipped_from_checkpoint']}` after {facts['timesteps_trained']} environment steps, shipped "
            "with `--from-checkpoint`. Its `policy.obs.json` is therefore\nthe range of the checkpoint's own "
            f"stochastic rollouts ({settings['stats_episodes']} episode per training task), not of PPO's "
            "training buffer.\n"
        )
    interval = settings["interval_steps"]
    return f"""# Pretrained controller policy (`policy="pretrained"`)

An SB3 PPO `MlpPolicy` (two hidden layers of 64, separate policy and value nets) choosing, every
{settings["interval_steps"]} optimizer steps, a precision for each of 4 sensitivity-ranked layer groups, an LR
multiplier and a batch move (`TriAccel-v0`'s `MultiDiscrete([3, 3, 3, 3, 5, 3])` action from its 43-feature
observation). `policy.obs.json` holds the range of observations seen in training: an observation more
than one range width outside it goes to the heuristic (the shield's `FallbackPolicy`, logged). It also holds
the LR multipliers the LR action indexes (0.5, 0.75, 1, 1.25, 1.5): a configuration with another ladder is
refused. Until its first decision, one interval into a run, every layer runs in the heuristic's start precision
(bf16 by default).

**How often it decides in your run.** It was trained, and evaluated below, deciding every {interval}
optimizer steps. `Controller(model, optimizer, policy="pretrained")` decides every `ControllerConfig.interval_steps`
steps, 20 by default, and on a GPU stretches that interval while its decisions would cost more than their share of
the overhead budget (up to `max_interval_factor`, 8, times it); `compare` decides every `interval_steps` of the
config it is given (`experiments/transfer.py`, which made the tables below, gives {interval}). To decide as in
training, pass `config=ControllerConfig(interval_steps={interval})` (and `max_interval_factor=1` to hold it fixed on a
GPU). `policy.obs.json` records the interval (`interval_steps`); `make_policy` logs once, at INFO, where a
configuration's differs.

## Training

| | |
|---|---|
{table}

## Evaluation during training

Mean episode return (progress within the time budget of {settings["budget_intervals"]:g} reference intervals) on
the held-out tasks, one deterministic episode per task, from SB3's `EvalCallback`{eval_timing}:

| env steps | mean reward ± std |
|---|---|
{eval_rows or "| – | no evaluation ran |"}
{eval_note}
## Evaluation on the held-out tasks

Learned vs heuristic vs static baselines (time to target, final accuracy, peak memory; written by
`python experiments/transfer.py` to `experiments/results/transfer.json`):

{_transfer_section(TRANSFER, policy_sha256)}
## Evaluation on the fresh held-out tasks

Four tasks registered after this policy was chosen, before any controller ran on them, with targets from a rule
fixed in advance (README, "Tasks";
`python experiments/transfer.py --tasks fresh --out experiments/results/transfer_fresh.json --plots
experiments/results/plots/transfer_fresh`):

{_transfer_section(FRESH_TRANSFER, policy_sha256)}
{provenance}{_spread_section(spread)}
## Limits

Trained briefly on 2 contended CPU cores: a small budget of environment steps, so expect it to be
close to what PPO's first updates learn, not a converged policy. Time is modelled GPU time from the
H200 profile, not measured. Retrain with the command above and a larger `--timesteps` for a better one.

On a GPU the policy chooses which groups run in 16 bits and a speed trial of real steps chooses the
16-bit format (`LearnedPolicy.choose_low_precision`). On the H200 (BENCHMARKS.md, issue 7; measured for the
policy shipped on 2026-12-02, to be re-measured after a retrain) it reached
ResNet-18's target level with the heuristic (5.12 s against 5.15 s), there mostly through its fallback:
that model's curvature lies below every training task's, so 3 of its 4 decisions a run went to the
heuristic. On EfficientNet-B0 its first decision moved two groups to fp32 and raised the LR, 1.23× the
heuristic's time.
"""


FRESH_TRANSFER = REPO / "experiments" / "results" / "transfer_fresh.json"
"""``transfer.py --tasks fresh``'s results: the shipped policy on ``FRESH_HELD_OUT_TASKS``."""


TRANSFER = REPO / "experiments" / "results" / "transfer.json"
"""``transfer.py``'s results: the shipped policy on ``HELD_OUT_TASKS``."""


def _write_card(ship: Path, facts: dict[str, Any]) -> None:
    zip_path = ship / "policy.zip"
    (ship / "MODEL_CARD.md").write_text(model_card(facts, _spread(zip_path), _sha256(zip_path)))


def _ship_dir(args: Args) -> Path:
    ship = Path(args.ship_dir)
    return ship if ship.is_absolute() else REPO / ship


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _transfer_section(path: Path = TRANSFER, policy_sha256: str | None = None) -> str:
    """The transfer table and target check, when ``transfer.py`` has run against the policy of ``policy_sha256``."""
    if not path.is_file():
        return "Not run yet."
    runs = json.loads(path.read_text()).get("runs", [])
    evaluated = {run.get("policy_sha256") for run in runs if run.get("controller") == "pretrained"}
    if policy_sha256 is not None and evaluated != {policy_sha256}:
        held = ", ".join(sorted(str(sha)[:12] for sha in evaluated)) or "none"
        return (
            f"Not run yet for this policy (sha256 {policy_sha256[:12]}; `{path.name}` holds the evaluation of "
            f"policy {held}): run `transfer.py` as above, then this script with `--card-only`.\n"
        )
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import transfer
    finally:
        sys.path.remove(str(REPO / "experiments"))
    document = json.loads(path.read_text())
    lines = "\n".join(f"- {line}" for line in document["target_check"]["lines"])
    return (
        f"{transfer.format_table(document['summary'])}\n\nIssue 6's target check ({document['date']}, "
        f"{document['device']}, {document['args']['epochs']:g} epochs per run):\n\n{lines}\n"
    )


def _lr_range(args: Args) -> tuple[float, float] | None:
    """``--lr-range LOW,HIGH`` as a pair (None when empty).

    Raises:
        SystemExit: not two comma-separated numbers.
    """
    if not args.lr_range:
        return None
    try:
        low, high = (float(v) for v in args.lr_range.split(","))
    except ValueError:
        raise SystemExit(f"--lr-range {args.lr_range!r}: expected LOW,HIGH, e.g. 0.5,2") from None
    return low, high


def _checked_checkpoint(args: Args) -> Path:
    """``--from-checkpoint``'s file, once it loads as a PPO policy for the training environments' spaces.

    Raises:
        SystemExit: it is missing, or does not load so (truncated, another algorithm's, other spaces); the message
            names it.
    """
    import gymnasium as gym
    from triaccel_rl.policies import LearnedPolicy, PolicyLoadError

    from triaccel_rl.actions import action_space
    from triaccel_rl.observation import OBS_HIGH, ObservationLayout
    from triaccel_rl.rl import env_config

    checkpoint = Path(args.from_checkpoint)
    if not checkpoint.is_file():
        raise SystemExit(f"--from-checkpoint: {checkpoint} not found (a policy zip, e.g. <run_dir>/checkpoints/*.zip)")
    config = env_config(args.interval_steps)
    observations = gym.spaces.Box(-OBS_HIGH, OBS_HIGH, (ObservationLayout(config.n_groups).size,), np.float32)
    try:
        LearnedPolicy(checkpoint, observations, action_space(config), algorithm="ppo")
    except PolicyLoadError as err:
        raise SystemExit(f"--from-checkpoint: {err}") from None
    return checkpoint


class _ZipBytes:
    """A zip as ``triaccel_rl.rl.save_policy`` saves a model: its bytes as they are (SB3's save would rewrite them)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, file: BinaryIO) -> None:
        with open(self.path, "rb") as source:
            shutil.copyfileobj(source, file)


def _stats_from_rollouts(zip_path: Path, tasks: tuple[str, ...], args: Args) -> None:
    """Writes ``zip_path``'s ``.obs.json`` from its own stochastic rollouts on ``tasks`` (same env settings)."""
    from triaccel_rl.policies import LearnedPolicy

    from triaccel_rl.config import RewardConfig
    from triaccel_rl.rl import env_config, make_env_fns, obs_stats_path
    from triaccel_rl.shield import ObservationStats

    policy = LearnedPolicy(zip_path)
    observations = []
    fns = make_env_fns(list(tasks), len(tasks), args.max_decisions, args.interval_steps,
                       reward_config=RewardConfig(budget_intervals=args.budget_intervals),
                       compute_bound=args.compute_bound, lr_range=_lr_range(args))  # fmt: skip
    for k, make in enumerate(fns):
        env = make()  # it starts on tasks[k], and each seeded reset restarts its cycle: every episode is tasks[k]'s
        for episode in range(args.stats_episodes):
            observation, _ = env.reset(seed=args.seed + 1000 * k + episode)
            done = False
            while not done:
                observations.append(observation)
                action, _ = policy.predict(observation, deterministic=False)
                observation, _, terminated, truncated, _ = env.step(action)
                done = terminated or truncated
        env.close()
    stats = ObservationStats.from_observations(np.stack(observations))
    ladder = env_config(args.interval_steps).lr_scales
    replace(stats, lr_scales=ladder, interval_steps=args.interval_steps).save(obs_stats_path(zip_path))


def _interrupted_run_start(tensorboard: Path, checkpoint: Path) -> float | None:
    """When the interrupted run that wrote ``checkpoint`` started learning, for ``--from-checkpoint``.

    That is the Unix time (whole seconds) in the name of the newest TensorBoard event file in ``tensorboard``'s
    ``PPO_*`` folders: SB3 creates one as learning starts (a new ``PPO_<n>`` folder, or for a resumed run a new file in
    the newest). None where there is none (the start is then unknown: no evaluations are recorded).

    Raises:
        SystemExit: ``checkpoint`` was written before that run started: it is an earlier run's, whose start and
            evaluations cannot be told from the newer run's.
    """
    events = [
        (int(file.name.split(".")[3]), file.stat().st_mtime, file)
        for file in tensorboard.glob("PPO_*/events.out.tfevents.*")
        if len(file.name.split(".")) > 3 and file.name.split(".")[3].isdigit()
    ]
    if not events:
        print(
            f"--from-checkpoint: no TensorBoard run in {tensorboard}: the interrupted run's start is unknown, so no "
            "evaluations are recorded and the wall time is this script's",
            file=sys.stderr,
        )
        return None
    # The newest, not the first in name order (PPO_1, an earlier run's, whose start and evaluations were recorded)
    start, _, newest = max(events)
    if checkpoint.stat().st_mtime < start:
        raise SystemExit(
            f"--from-checkpoint {checkpoint} was written before the newest TensorBoard run started ({newest}): it is "
            "not that interrupted run's checkpoint, and its own run's training time and evaluations cannot be told "
            "from the newer run's; ship the newest run's checkpoint, or the policy.zip of a finished run"
        )
    return float(start)


def _facts(
    args: Args,
    training_tasks: tuple[str, ...],
    held_out: tuple[str, ...],
    zip_path: Path,
    run_dir: Path,
    wall_s: float,
    commit: str,
    started: float | None,
) -> dict[str, Any]:
    """What ``training.json`` and the model card record of the run in ``run_dir`` that wrote ``zip_path``.

    ``started`` (``time.time()`` when the run began; shipped from a checkpoint, the interrupted run's start,
    :func:`_interrupted_run_start`, None where unknown) keeps another run's evaluations out: the
    ``eval/evaluations.npz`` in ``run_dir`` counts only where it was written since (a run without evaluations,
    or whose first is not due yet, leaves an earlier run's file in a reused run dir), and only its evaluations at or
    below ``zip_path``'s step count (an interrupted run's past its checkpoint scored other weights). Shipped from a
    checkpoint, the training time runs from ``started`` to the checkpoint's write.
    """
    from stable_baselines3 import PPO

    from triaccel_rl.config import HardwareProfile

    model = PPO.load(zip_path, device="cpu")
    timesteps = int(model.num_timesteps)
    evaluations = []
    eval_file = run_dir / "eval" / "evaluations.npz"
    # Only this run's: a reused run dir keeps an earlier run's file, which training.json and the card once recorded
    # as this run's evaluations (a --smoke run, which evaluates nothing, showed a real run's table; so did a
    # --from-checkpoint of a run killed before its first evaluation).
    if eval_file.is_file() and started is not None and eval_file.stat().st_mtime >= started:
        data = np.load(eval_file)
        for steps, rewards in zip(data["timesteps"], data["results"], strict=True):
            if steps > timesteps:  # an interrupted run's past the checkpoint shipped: other weights' score
                continue
            evaluations.append(
                {"timesteps": int(steps), "mean_reward": float(np.mean(rewards)), "std_reward": float(np.std(rewards))}
            )
    training_s = wall_s
    if args.from_checkpoint and started is not None:
        # Training time of the interrupted run: from its TensorBoard file's creation to the checkpoint's write
        training_s = Path(args.from_checkpoint).stat().st_mtime - started
    return {
        "args": asdict(args),
        "command": command_line("experiments/train_pretrained.py", args),
        "training_tasks": list(training_tasks),
        "held_out_tasks": list(held_out),
        "timesteps_trained": timesteps,
        "wall_s": training_s,
        "env_steps_per_s": timesteps / training_s,
        "shipped_from_checkpoint": args.from_checkpoint or None,
        # The shipped zip's own: a --from-checkpoint run's flags need not repeat the checkpoint's training settings
        "ppo": {
            "n_steps": int(model.n_steps),
            "batch_size": int(model.batch_size),
            "ent_coef": float(model.ent_coef),
            "learning_rate": float(
                model.lr_schedule(1.0)
            ),  # the rate at the run's start (a schedule's, or the constant)
        },
        # Only this run's: a run dir reused keeps an earlier run's file, which the card once reported as this one's
        "warm_start": (
            json.loads(warm.read_text())
            if args.warm_start and (warm := run_dir / "warm_start.json").is_file()
            else None
        ),
        "profile": HardwareProfile.load(None).device,
        "profile_throughput_scale": HardwareProfile.load(None).throughput_scale,
        "machine": cpu_machine(),
        "evaluations": evaluations,
        # Absent from a training.json written before 2026-12-05 (rl.py's fixes): its card says what the run did instead
        "evaluated_after_update": True,
        "every_worker_every_task": True,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
    }


def parse(argv: list[str] | None = None) -> Args:
    """Parses ``--flag`` arguments into ``Args``."""
    return parse_args(Args, argv, __doc__)


if __name__ == "__main__":
    try:
        main(parse())
    except ValueError as err:  # a bad flag value (ConfigError too): one line, no traceback
        raise SystemExit(str(err)) from None
