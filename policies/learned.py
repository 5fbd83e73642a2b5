"""``LearnedPolicy``: a stable-baselines3 policy loaded from its zip, checked against the expected spaces."""

from __future__ import annotations

import io
import json
import math
import os
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from triaccel_rl.policies.heuristic import fastest_16bit

from triaccel_rl.observation import ObservationLayout
from triaccel_rl.shield import check_observation
from triaccel_rl.types import Precision

__all__ = ["SUPPORTED_ALGORITHMS", "LearnedPolicy", "PolicyLoadError", "policy_view"]

SUPPORTED_ALGORITHMS = ("ppo", "a2c")


class PolicyLoadError(ValueError):
    """A policy file cannot be used: missing, corrupt, another algorithm, or trained for other spaces."""


class LearnedPolicy:
    """A trained SB3 policy (PPO or A2C zip) with the common ``predict`` signature.

    Args:
        path: the ``.zip`` written by ``model.save`` (``triaccel-rl train-policy`` writes one).
        observation_space: the space the caller will feed; the zip's must equal it.
        action_space: the space the caller expects back; the zip's must equal it.
        algorithm: ``"ppo"``, ``"a2c"`` or ``"auto"`` (tries each).
        device: torch device for the policy network (``"cpu"`` is fastest for these small MLPs).

    Raises:
        PolicyLoadError: the file is missing or not an SB3 zip, or its spaces differ (both printed; for observations
            of two layouts, both ``n_groups``), or it pickles an object the loader cannot rebuild from readable fields
            (named): nothing in the zip is unpickled, so a zip from elsewhere runs no code when loaded.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        observation_space: spaces.Space[Any] | None = None,
        action_space: spaces.Space[Any] | None = None,
        algorithm: str = "auto",
        device: str = "cpu",
    ) -> None:
        file = Path(path)
        if not file.is_file():
            problem = "is a folder, not a file" if file.is_dir() else "does not exist"
            raise PolicyLoadError(f"policy file {str(file)!r} {problem}")
        if not zipfile.is_zipfile(file):
            raise PolicyLoadError(f"policy file {str(file)!r} is not a zip written by stable-baselines3")
        # Not a str (None) raised a bare AttributeError from lower()
        if not isinstance(algorithm, str) or algorithm.lower() not in ("auto", *SUPPORTED_ALGORITHMS):
            raise PolicyLoadError(
                f"algorithm {algorithm!r} not supported; allowed: auto, {', '.join(SUPPORTED_ALGORITHMS)}"
            )
        algorithm = algorithm.lower()
        self.path = file
        self.model = _load(file, algorithm, device)
        self.initial_precision: Precision | None = None
        """The precision every layer starts in, before the first decision (None: the model's own, fp32);
        ``make_policy`` sets the heuristic's start precision."""
        self.speed_trial: bool | None = None
        """Whether the driver times bf16 and fp16 before the first decision (None: where step time is measured
        on a GPU or charged from a GPU's profile), as ``HeuristicConfig.speed_trial``; ``make_policy`` copies the
        config's setting."""
        self.low_precision: Precision | None = None
        """The 16-bit format every 16-bit group runs in, after a speed trial (:meth:`choose_low_precision`);
        None: no trial, the policy's own formats."""
        for label, expected, found in (
            ("observation", observation_space, self.model.observation_space),
            ("action", action_space, self.model.action_space),
        ):
            if expected is None or _same_space(expected, found):
                continue
            trained, given = _observation_groups(found), _observation_groups(expected)
            if label == "observation" and trained is not None and given is not None and trained != given:
                # Only n_groups sets the size of a Tri-Accel observation: named, as make_policy names the LR ladder
                raise PolicyLoadError(
                    f"policy {str(file)!r} was trained for {label} space {found}, n_groups={trained}; this "
                    f"configuration has {expected}, n_groups={given}: run it with the settings it was trained for, "
                    f"ControllerConfig(n_groups={trained}) (`triaccel-rl train-policy` trains for the default LR "
                    "ladder and layer groups only)"
                )
            raise PolicyLoadError(
                f"policy {str(file)!r} was trained for {label} space {found}, but this environment has "
                f"{expected}: run it with the settings it was trained for (`triaccel-rl train-policy` trains "
                "for the default LR ladder and layer groups only)"
            )
        self.observation_space = self.model.observation_space
        self.action_space = self.model.action_space
        self.name = f"learned:{file.name}"

    def wants_speed_trial(self, step_time_known: bool) -> bool:
        """Whether the driver should time the 16-bit formats before the first decision (see :attr:`speed_trial`)."""
        return step_time_known if self.speed_trial is None else self.speed_trial

    def choose_low_precision(self, step_ms: Mapping[Precision, float]) -> Precision:
        """Runs every 16-bit group in the format with the shortest measured step from now on; returns it.

        Which format is faster depends on the model and the GPU, which a policy trained on modelled cost cannot
        know. After the trial the policy chooses which groups run in 16 bits and the trial chooses the format:
        the policy's bf16 and fp16 both run in it, and its observation shows 16-bit groups as bf16, the format
        it learned in (:func:`policy_view`). The start precision follows when it is 16-bit. A tie keeps the current
        format, :attr:`low_precision`: bf16 where it is None (no trial yet), fp16 where ``make_policy`` pinned it (the
        heuristic's ``use_fp16``) or an earlier trial chose it.

        Raises:
            ValueError: ``step_ms`` is empty, names fp32, or holds a time that is not positive and finite.
        """
        self.low_precision = fastest_16bit(step_ms, self.low_precision or Precision.BF16)
        if self.initial_precision is not None and self.initial_precision is not Precision.FP32:
            self.initial_precision = self.low_precision
        return self.low_precision

    def predict(
        self,
        observation: np.ndarray,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """The SB3 model's ``predict``; after a speed trial, through :func:`policy_view` and the trial's format.

        Raises:
            ValueError: an observation of another shape than the policy's, not of numbers, or holding a NaN or an
                infinity (the feature named): the network has no answer for it. ``make_policy`` wraps a policy with
                its ``.obs.json`` in a ``FallbackPolicy``, which hands such observations to the heuristic instead.
        """
        space = self.observation_space
        if isinstance(space, spaces.Box) and len(space.shape) == 1:  # a Tri-Accel observation; others go to SB3 as is
            observation = check_observation(observation, space.shape[0])
            _refuse_non_finite(observation)
        size = int(np.shape(observation)[-1])
        layout = None if self.low_precision is None else ObservationLayout.for_size(size)
        view = observation if layout is None else policy_view(observation, layout)
        action, state = self.model.predict(view, state=state, episode_start=episode_start, deterministic=deterministic)
        if layout is None or self.low_precision is None:  # no trial, or not a Tri-Accel observation
            return action, state
        action = np.array(action, copy=True)
        precisions = action[..., : layout.n_groups]
        precisions[precisions != int(Precision.FP32)] = int(self.low_precision)
        return action, state


def _refuse_non_finite(observation: np.ndarray) -> None:
    """Raises a ValueError naming the first NaN or infinite feature of ``observation`` (one, or a batch's rows)."""
    bad = ~np.isfinite(observation)
    if not bad.any():
        return
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    feature = where[-1]
    layout = ObservationLayout.for_size(observation.shape[-1])
    name = layout.name(feature) if layout is not None else f"feature {feature}"
    row = f" of row {where[0]}" if observation.ndim == 2 else ""
    raise ValueError(
        f"observation holds {observation[where]} at feature {name} (index {feature}){row}: a learned policy cannot "
        "decide on it (with the policy's .obs.json beside its zip, make_policy hands such observations to the "
        "heuristic)"
    )


def policy_view(observation: np.ndarray, layout: ObservationLayout) -> np.ndarray:
    """``observation`` with every group's fp16 share moved to bf16: a run in fp16 as a policy trained in bf16 sees it.

    Example:
        >>> layout = ObservationLayout(n_groups=1)
        >>> obs = np.zeros(layout.size, dtype=np.float32)
        >>> obs[layout.group(0, "is_fp16")] = 1.0
        >>> view = policy_view(obs, layout)
        >>> float(view[layout.group(0, "is_bf16")]), float(view[layout.group(0, "is_fp16")])
        (1.0, 0.0)
    """
    view = np.array(observation, copy=True)
    for group in range(layout.n_groups):
        bf16, fp16 = layout.group(group, "is_bf16"), layout.group(group, "is_fp16")
        view[..., bf16] += view[..., fp16]
        view[..., fp16] = 0.0
    return view


def _load(file: Path, algorithm: str, device: str) -> Any:
    from stable_baselines3 import A2C, PPO

    classes: dict[str, Any] = {"ppo": PPO, "a2c": A2C}
    try:
        contents = file.read_bytes()  # the checks read these bytes and SB3 loads them: a file swapped meanwhile is not
    except OSError as err:
        raise PolicyLoadError(f"cannot read policy file {str(file)!r}: {err}") from err
    settings = _saved_settings(file, contents)
    saved = _saved_algorithm(settings)
    if saved is not None and saved not in classes:
        raise PolicyLoadError(
            f"policy {str(file)!r} was saved by stable-baselines3's {saved.upper()}; supported: "
            f"{', '.join(SUPPORTED_ALGORITHMS)}"
        )
    if saved is not None and algorithm not in ("auto", saved):
        raise PolicyLoadError(f"policy {str(file)!r} was saved by {saved.upper()}, not {algorithm.upper()}")
    names = [saved] if saved is not None else list(classes) if algorithm == "auto" else [algorithm]
    errors = []
    for name in names:
        custom_objects = _unpickle_nothing(file, settings, classes[name])
        try:
            return _load_keeping_global_rngs(classes[name], io.BytesIO(contents), device, custom_objects)
        except Exception as err:  # SB3 raises many types for a wrong or corrupt file
            errors.append(f"{name}: {type(err).__name__}: {err}")
    damaged = _damaged_member(contents)
    if damaged is not None:  # SB3 reports a bad CRC as "the file ... wasn't a zip-file", a cut file as "No data found"
        raise PolicyLoadError(f"cannot load policy {str(file)!r}: {damaged}")
    raise PolicyLoadError(f"cannot load policy {str(file)!r} ({'; '.join(errors)[:500]})")


def _load_keeping_global_rngs(
    algorithm_class: Any, source: io.BytesIO, device: str, custom_objects: dict[str, Any]
) -> Any:
    """``algorithm_class.load(source)`` with the global torch (CPU and CUDA), numpy and ``random`` generators kept.

    SB3's ``load`` calls ``set_random_seed`` with the seed saved in the zip, which re-seeded the user's process:
    every run then drew the same numbers after building a Controller (the same shuffled batches for every seed).
    """
    import torch

    numpy_state = np.random.get_state()  # noqa: NPY002 (the user's global generator is what SB3 re-seeds)
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            return algorithm_class.load(source, device=device, custom_objects=custom_objects)
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)


def _saved_settings(file: Path, contents: bytes) -> dict[str, Any]:
    """The ``data`` member of the zip ``contents`` (SB3's settings, JSON), read as SB3 reads it: nothing unpickled.

    Raises:
        PolicyLoadError: the member is missing, damaged, or not a JSON object.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(contents)) as archive:
            settings = json.loads(archive.read("data").decode())  # as SB3's load_from_zip_file reads it
    except Exception as err:  # zipfile, zlib and json raise many types for a damaged or missing member
        problem = _damaged_member(contents) or (
            f"its 'data' member cannot be read as stable-baselines3's JSON settings ({type(err).__name__}: {err})"
        )
        raise PolicyLoadError(f"cannot load policy {str(file)!r}: {problem}") from err
    if not isinstance(settings, dict):
        raise PolicyLoadError(
            f"cannot load policy {str(file)!r}: its 'data' member holds a JSON {type(settings).__name__}, not "
            "stable-baselines3's settings (an object)"
        )
    return settings


def _unpickle_nothing(file: Path, settings: dict[str, Any], algorithm_class: Any) -> dict[str, Any]:
    """``custom_objects`` for SB3's ``load`` that replace every pickled entry of ``settings``: SB3 unpickles none.

    SB3 unpickles (cloudpickle) each entry marked ``":serialized:"`` that ``custom_objects`` does not name, which runs
    whatever code the file's author put in it, before any check of ours. Here the spaces are rebuilt from the readable
    fields SB3 writes beside each pickle, the policy class is the algorithm's own ``MlpPolicy``, ``policy_kwargs`` may
    name only known torch and SB3 classes, and training-only state takes values that let SB3 build the model: the
    loaded model predicts as the saved one, but is not one to train on.

    Raises:
        PolicyLoadError: a pickled entry that cannot be rebuilt without unpickling it (the file and the entry named).
    """
    mlp_policy = algorithm_class.policy_aliases["MlpPolicy"]
    # SB3's _setup_model rebuilds these, or only learn() reads them
    training_only: dict[str, Any] = {
        "_last_obs": None,
        "_last_episode_starts": None,
        "_last_original_obs": None,
        "ep_info_buffer": None,
        "ep_success_buffer": None,
        "rollout_buffer_class": None,  # SB3's RolloutBuffer
        "rollout_buffer_kwargs": {},
        "lr_schedule": None,  # rebuilt from learning_rate
        "learning_rate": 0.0,  # a saved schedule: only the optimizer reads it, and its saved state is loaded
        "clip_range": 0.2,  # PPO's default; _setup_model wraps a number in a schedule
        "clip_range_vf": None,
    }
    custom_objects: dict[str, Any] = {"env": None}  # a saved name would be built by gymnasium.make (SB3 saves none)
    for key, entry in settings.items():
        if not (isinstance(entry, dict) and ":serialized:" in entry):  # SB3's own test for a pickled entry
            continue
        if key in ("observation_space", "action_space"):
            custom_objects[key] = _saved_space(file, key, entry)
        elif key == "policy_class":
            module = entry.get("__module__", mlp_policy.__module__)
            if module != mlp_policy.__module__:
                raise _unpickling_refused(
                    file,
                    key,
                    f"a class of module {module!r}, not stable-baselines3's MlpPolicy ({mlp_policy.__module__})",
                )
            custom_objects[key] = mlp_policy
        elif key == "policy_kwargs":
            custom_objects[key] = _saved_policy_kwargs(file, entry)
        elif key in training_only:
            custom_objects[key] = training_only[key]
        else:
            raise _unpickling_refused(file, key, f"a pickled object ({entry.get(':type:')!r})")
    return custom_objects


def _saved_space(file: Path, key: str, entry: dict[str, Any]) -> spaces.Space[Any]:
    """The ``Box``, ``Discrete`` or ``MultiDiscrete`` space SB3 pickled as ``entry``, from its readable fields.

    Raises:
        PolicyLoadError: another kind of space, or fields that do not describe one.
    """
    kind = entry.get(":type:")
    if kind not in (str(spaces.Box), str(spaces.Discrete), str(spaces.MultiDiscrete)):
        raise _unpickling_refused(
            file, key, f"a pickled {kind}: only Box, Discrete and MultiDiscrete spaces are rebuilt"
        )
    try:
        if not isinstance(entry["dtype"], str):
            raise ValueError(f"dtype {entry['dtype']!r} is not a name")
        dtype = np.dtype(entry["dtype"])
        if dtype.kind not in ("iuf" if kind == str(spaces.Box) else "iu"):
            raise ValueError(f"dtype {dtype} is not a number type the space takes")
        shape = tuple(_whole(size) for size in entry["_shape"])
        if kind == str(spaces.Box):
            low, high = (_printed_array(entry[bound], dtype, shape) for bound in ("low", "high"))
            return spaces.Box(low, high, shape, dtype)
        start = _printed_array(entry["start"], dtype, shape)
        if kind == str(spaces.Discrete):
            return spaces.Discrete(int(_printed_array(entry["n"], dtype, shape)), start=int(start), dtype=dtype)
        return spaces.MultiDiscrete(_printed_array(entry["nvec"], dtype, shape), dtype, start=start)
    except (KeyError, TypeError, ValueError, AssertionError) as err:  # gymnasium asserts on some bad arguments
        raise PolicyLoadError(
            f"policy {str(file)!r}: its {key!r} ({kind}) cannot be rebuilt from the readable fields beside its pickle "
            f"({type(err).__name__}: {err}); the loader does not unpickle objects from a policy file"
        ) from err


def _printed_array(text: Any, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    """The array of ``dtype`` and ``shape`` that numpy printed as ``text`` (``str(array)``, as SB3 writes it).

    Raises:
        ValueError: ``text`` is not a printed array of that size, or numpy summarised it (``...``).
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a printed array")
    if "..." in text:
        raise ValueError(f"numpy printed it summarised, without all its values ({text[:60]!r}...)")
    words = text.replace("[", " ").replace("]", " ").split()
    if len(words) != math.prod(shape):
        raise ValueError(f"{len(words)} values printed for shape {shape}")
    read = float if dtype.kind == "f" else int
    return np.array([read(word) for word in words], dtype=dtype).reshape(shape)


def _whole(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"shape entry {value!r} is not a whole number >= 0")
    return value


def _saved_policy_kwargs(file: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """The ``policy_kwargs`` dict SB3 pickled as ``entry`` (A2C's always name RMSprop), from its readable items.

    SB3 writes each item beside the pickle, a value JSON cannot hold as its ``str``: only a ``str`` that names a
    torch optimizer or activation, or an SB3 feature extractor, is read (as that class).

    Raises:
        PolicyLoadError: not a dict, or an item that is not JSON and names no known class.
    """
    if entry.get(":type:") != str(dict):
        raise _unpickling_refused(file, "policy_kwargs", f"a pickled {entry.get(':type:')}, not a dict")
    known = _known_classes()
    kwargs = {}
    for name, value in entry.items():
        if name in (":type:", ":serialized:"):
            continue
        if isinstance(value, str):  # no policy argument is a string: this is the str() of an object
            if value not in known:
                raise _unpickling_refused(
                    file,
                    "policy_kwargs",
                    f"a dict holding {name}={value}, not a torch optimizer or activation or an SB3 feature extractor",
                )
            value = known[value]
        kwargs[name] = value
    return kwargs


def _known_classes() -> dict[str, type]:
    """The classes a policy's ``policy_kwargs`` may name, keyed by their ``str``."""
    import torch
    from stable_baselines3.common import torch_layers

    found = {}
    for module, base in (
        (torch.optim, torch.optim.Optimizer),
        (torch.nn.modules.activation, torch.nn.Module),
        (torch_layers, torch_layers.BaseFeaturesExtractor),
    ):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, base):
                found[str(value)] = value
    return found


def _unpickling_refused(file: Path, key: str, what: str) -> PolicyLoadError:
    return PolicyLoadError(
        f"policy {str(file)!r}: its {key!r} is {what}; the loader does not unpickle objects from a policy file (that "
        "would run any code the file holds)"
    )


def _damaged_member(contents: bytes) -> str | None:
    """What is damaged inside the zip ``contents``, for a policy that did not load; None where nothing is.

    Damaged: a member whose bytes fail their CRC; no top-level ``data`` member (SB3's settings), as in a file cut
    short: the ``.pth`` members are zips themselves, so the cut file still opens as one of them (``testzip`` passes)
    and SB3 said only "No data found in the saved file"; or a ``.pth`` member torch cannot read, where torch's own
    message advised ``weights_only=False``, which would unpickle whatever the damaged file holds.
    """
    import torch

    try:
        with zipfile.ZipFile(io.BytesIO(contents)) as archive:
            bad = archive.testzip()
            names = archive.namelist()
            if bad is None and "data" in names:
                for name in (name for name in names if name.endswith(".pth")):
                    try:
                        torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
                    except Exception as err:  # torch raises many types for bytes that are not what it wrote
                        return (
                            f"its member {name!r} cannot be read as a torch state dict ({type(err).__name__}): the "
                            "file is damaged or was not written by stable-baselines3; save or copy the policy again"
                        )
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # a member whose header cannot be read
        return f"the zip is damaged ({type(err).__name__}: {err}); save or copy the policy again"
    if bad is not None:
        return f"its member {bad!r} is damaged (its bytes fail their CRC check); save or copy the policy again"
    if "data" not in names:
        return (
            "it holds no 'data' member: not a whole stable-baselines3 zip (truncated?); save or copy the policy again"
        )
    return None


def _saved_algorithm(data: dict[str, Any]) -> str | None:
    """The SB3 algorithm that wrote a zip, read from its ``data`` member's settings; None where they do not tell.

    An on-policy algorithm saves its rollout settings, PPO's with ``clip_range`` (A2C's without); the others' policy
    class lives in their own module (``stable_baselines3.dqn.policies``). Both PPO and A2C zips would load into
    either class, each then reporting the wrong algorithm.
    """
    if "rollout_buffer_class" in data or "n_epochs" in data:
        return "ppo" if "clip_range" in data else "a2c"
    policy_class = data.get("policy_class")
    module = policy_class.get("__module__", "") if isinstance(policy_class, dict) else ""
    parts = module.split(".")
    if len(parts) == 3 and parts[0] == "stable_baselines3" and parts[2] == "policies" and parts[1] != "common":
        return parts[1]
    return None


def _observation_groups(space: spaces.Space[Any]) -> int | None:
    """The ``n_groups`` whose observation has ``space``'s size; None: not a 1-D ``Box``, or no layout has its size."""
    if not isinstance(space, spaces.Box) or len(space.shape) != 1:
        return None
    layout = ObservationLayout.for_size(space.shape[0])
    return None if layout is None else layout.n_groups


def _same_space(a: spaces.Space[Any], b: spaces.Space[Any]) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, spaces.MultiDiscrete) and isinstance(b, spaces.MultiDiscrete):
        return bool(np.array_equal(a.nvec, b.nvec))
    if isinstance(a, spaces.Box) and isinstance(b, spaces.Box):
        return a.shape == b.shape and bool(np.allclose(a.low, b.low) and np.allclose(a.high, b.high))
    return a == b
