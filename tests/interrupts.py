"""Injecting a Ctrl-C at one point of a run, for the tests of what a run does after one."""

from collections.abc import Callable
from typing import Any


def interrupt_once(
    monkeypatch: Any, owner: object, name: str, when: Callable[[], bool], on_return: bool = False
) -> list:
    """Has ``owner.name`` raise KeyboardInterrupt the first time ``when()`` holds; the list returned fills once it did.

    On entry by default; with ``on_return``, once the call has run, as a Ctrl-C between its return and the caller's
    next line.
    """
    original = getattr(owner, name)
    fired: list[bool] = []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if fired or not when():
            return original(*args, **kwargs)
        fired.append(True)
        if on_return:
            original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, name, interrupted)
    return fired
