"""Where Triton is not installed (macOS, Windows: pyproject installs it on Linux only) the CPU entry points run."""

import subprocess
import sys
import textwrap

# Run in a fresh interpreter: the block on Triton must not leak into the other tests, which load the kernels.
_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["triton"] = None  # ``import triton`` raises ModuleNotFoundError, as where it is not installed

    import gymnasium as gym
    import torch
    from torch import nn

    import triaccel_rl.envs  # registers TriAccel-v0
    from triaccel_rl import Controller, ControllerConfig
    from triaccel_rl.compare import compare
    from triaccel_rl.engine import StepEngine, _fused_unsupported

    def tiny_model():
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    for optimizer_class in (torch.optim.SGD, torch.optim.AdamW):
        model = tiny_model()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = optimizer_class(model.parameters(), lr=1e-2)
        with Controller(model, optimizer, policy="heuristic", config=ControllerConfig(interval_steps=2)) as ctl:
            assert not ctl.engine.fused
            x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
            for xb, yb in ctl.loader((x, y), batch_size=16):
                with ctl.autocast():
                    loss = nn.functional.cross_entropy(model(xb), yb)
                ctl.step(loss)
        assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before)), optimizer_class.__name__
        print(f"controller {optimizer_class.__name__}: trained")

    env = gym.make("TriAccel-v0", task="synthetic", max_decisions=2, config=ControllerConfig(interval_steps=2))
    env.reset(seed=0)
    env.step(env.action_space.sample())
    print("env: stepped")

    runs = compare("synthetic", ["fp32"], [0], epochs=0.2, config=ControllerConfig(interval_steps=2),
                   show_progress=False)
    assert [run.controller for run in runs] == ["static-fp32"], runs
    print("compare: ran")

    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    try:
        StepEngine(model, optimizer, torch.device("cpu"), fused=True)
    except ValueError as error:
        print(f"fused=True: {error}")
    # The default on CUDA would run the fused step: the reason its warning gives
    print(f"reason: {_fused_unsupported(optimizer, [list(model.parameters())])}")
    assert "triaccel_rl.kernels" not in sys.modules
    """
)


def test_the_cpu_entry_points_run_and_fused_true_says_triton_is_missing():
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    message = "Triton is not installed (triaccel-rl depends on it on Linux only)"
    assert done.stdout.splitlines() == [
        "controller SGD: trained",
        "controller AdamW: trained",
        "env: stepped",
        "compare: ran",
        f"fused=True: fused=True, but the fused step cannot run this optimizer: {message}",
        f"reason: {message}",
    ], done.stdout
