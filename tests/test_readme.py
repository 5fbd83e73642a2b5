"""The README's Python examples run as written, and do what the README says they do."""

import re
from pathlib import Path

import numpy as np


def python_blocks() -> list[str]:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) == 3, "a new README example needs its checks here"
    monkeypatch.chdir(tmp_path)  # the checkpoint example writes ckpt.pt
    loop, env = {}, {}
    exec(compile(blocks[0], "README.md", "exec"), loop)
    # Your own loop: two epochs of 2048 samples under the heuristic, at batch 128 or a batch it grew to (at most an
    # eighth of the data, 256), a decision every 20 steps, finite weights.
    ctl, model = loop["ctl"], loop["model"]
    assert 2 * 2048 // 256 <= ctl.steps <= 2 * 2048 // 128
    assert len(ctl.decisions) == ctl.steps // ctl.config.interval_steps >= 1
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    # Checkpoints: saved after the two epochs, loaded back, and a third epoch trained from where they ended.
    after_two_epochs = ctl.steps
    exec(compile(blocks[1], "README.md", "exec"), loop)
    saved = loop["state"]["controller"]
    assert saved["steps"] == after_two_epochs and (saved["loader"]["epoch"], saved["loader"]["cursor"]) == (2, 0)
    resumed = loop["ctl"]  # a new Controller, as the example builds it
    assert resumed is not ctl and 2048 // 256 <= resumed.steps - after_two_epochs <= 2048 // 128  # one epoch more
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    # The environment: an observation of the documented size (11 + 8 K, K = 4 groups) and a finite reward.
    exec(compile(blocks[2], "README.md", "exec"), env)
    assert env["obs"].shape == (43,) and env["obs"].dtype == np.float32
    assert np.isfinite(env["reward"]) and not env["terminated"]


def test_the_warnings_the_readme_explains_are_the_ones_the_code_logs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## When it warns", 1)[1].split("\n## ", 1)[0]
    messages = re.findall(r"^\| `([^`]+)`", section, flags=re.MULTILINE)
    source = "".join(path.read_text() for path in (Path(__file__).parent.parent / "triaccel_rl").rglob("*.py"))
    assert len(messages) == 9
    for message in messages:
        assert message in source, f"README explains a warning the code no longer logs: {message!r}"
