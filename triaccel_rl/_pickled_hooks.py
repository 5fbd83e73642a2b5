"""Names under which pickle finds the hooks a ``LayerPrecision`` puts on a user's model.

``torch.save(model)`` while a Controller is open pickles the model's hook dictionaries, and the hooks are closures
(``precision.LayerPrecision._as_closure`` says why: Dynamo compiles a model through them without recompiling, and a deep
copy of the model shares them). Pickle saves a function by its module and name only, and could not find a closure by
name ("Can't pickle local object"). Each hook is given a name here, which this module's ``__getattr__`` resolves to the
hook itself while it lives in this process, and to :func:`inert` once it is gone or in another process (each name
carries a token of the process that made it). Once its ``LayerPrecision`` is removed the hook is :func:`released`: it
acts no more, and a deep copy of the model made before (which keeps the hooks, and may be saved after) sheds it at its
next forward. A model saved while a Controller is open therefore loads, once that Controller is closed or elsewhere, as
a model that runs as one never wrapped.
"""

from __future__ import annotations

import itertools
import os
import secrets
import weakref
from collections.abc import Callable, Iterable
from typing import Any

# Weak: a hook lives while a model holds it; a Controller dropped without close() keeps no model alive from here. A
# released hook stays (pickle must find a copy's hook by its name to save it: a deep copy made while the Controller was
# open, saved after close(), raised "not the same object").
_live: weakref.WeakValueDictionary[str, Callable[..., Any]] = weakref.WeakValueDictionary()
_released: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()
_numbers = itertools.count()
# This process's own part of every name: numbers alone restarted at 0 in each process, so a model saved in one and
# loaded in another where a Controller was open (a teacher loaded beside a student) got that Controller's live hooks.
# A forked child draws its own (it inherited its parent's, and counted on from the same number); a spawned one
# imports this module afresh, and draws its own here.
_PROCESS = secrets.token_hex(8)


def _new_process_token() -> None:
    global _PROCESS
    _PROCESS = secrets.token_hex(8)


if hasattr(os, "register_at_fork"):  # Unix only: Windows has no fork, and spawns every child
    os.register_at_fork(after_in_child=_new_process_token)


def named(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` (a function), renamed so that pickle saves it by a name of this module; returns it."""
    name = f"hook_{_PROCESS}_{next(_numbers)}"
    hook.__module__, hook.__name__, hook.__qualname__ = __name__, name, name
    _live[name] = hook
    return hook


def release(hooks: Iterable[Callable[..., Any]]) -> None:
    """Marks ``hooks`` released: their ``LayerPrecision`` was removed, and they act no more."""
    _released.update(hooks)


def released(hook: Callable[..., Any]) -> bool:
    """Whether ``hook`` is one of ours that acts no more: released, or :func:`inert`."""
    return hook is inert or hook in _released


def inert(*args: Any, **kwargs: Any) -> None:
    """What a saved hook loads as once it is gone or in another process: a forward (pre-)hook that changes nothing."""
    return None


def __getattr__(name: str) -> Callable[..., Any]:
    """Resolves a hook's name (PEP 562): pickle's lookup when saving, and when loading."""
    if name.startswith("hook_"):  # another process's name is never live here
        return _live.get(name, inert)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
