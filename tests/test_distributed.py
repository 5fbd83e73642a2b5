"""The Controller under DDP: two processes on the CPU (gloo), each training a replica on its own shard."""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import triaccel_rl.kernels.flat_store as flat_store
from torch import nn
from torch.nn.functional import cross_entropy
from torch.nn.parallel import DistributedDataParallel
from triaccel_rl.policies import StaticPolicy

from triaccel_rl.config import ControllerConfig
from triaccel_rl.controller import Controller
from triaccel_rl.distributed import any_rank, any_rank_on_device, any_ranks, world_size
from triaccel_rl.engine import StepEngine
from triaccel_rl.errors import ConfigError
from triaccel_rl.types import Precision

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available() or "fork" not in mp.get_all_start_methods(),
    reason="needs torch.distributed with gloo, and processes started by fork",
)

WORLD = 2
TIMEOUT_S = 30  # a collective one process never joins fails after this, and the test with it, instead of hanging


def test_a_single_process_without_a_group_is_a_world_of_one_and_communicates_nothing(monkeypatch):
    def no_collective(*args: object, **kwargs: object) -> None:
        raise AssertionError("any_rank communicated in a single process")

    monkeypatch.setattr(dist, "all_reduce", no_collective)
    assert not dist.is_initialized()
    assert world_size() == 1
    assert any_rank(True, torch.device("cpu")) is True
    assert any_rank(False, torch.device("cpu")) is False
    assert any_ranks([True, False, True], torch.device("cpu")) == [True, False, True]
    assert any_ranks([], torch.device("cpu")) == []
    flags = torch.tensor([True, False])
    assert any_rank_on_device(flags) is flags  # no copy, no kernel


@pytest.mark.parametrize(
    ("config", "reduced_on"),
    [
        (
            "cpu:gloo,meta:nccl",
            "meta",
        ),  # init_process_group() with no backend: one a device type, get_backend() "undefined"
        ("cpu:gloo", "cpu"),  # no backend for the flags' device: through the host
    ],
)
def test_the_fused_steps_flags_are_reduced_where_the_group_has_a_backend_for_their_device(
    monkeypatch, config, reduced_on
):
    """torchrun's init_process_group() names no backend: the flags went through the host at every fused step. The meta
    device stands in for CUDA (no GPU here): its tensors cannot be copied to the host, as the old code did."""
    import triaccel_rl.distributed as distributed

    reduced = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *args: "undefined")
    monkeypatch.setattr(dist, "get_backend_config", lambda *args: config)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op: reduced.append(tensor.device.type))
    flags = torch.zeros(2, dtype=torch.bool, device="meta")
    if reduced_on == "cpu":
        flags = torch.zeros(2, dtype=torch.bool)
    agreed = any_rank_on_device(flags)
    assert reduced == [reduced_on] and agreed.device == flags.device and agreed.dtype == torch.bool
    assert distributed._backends() == dict(item.split(":") for item in config.split(","))


def test_any_ranks_is_each_flag_or_ed_over_the_processes(tmp_path):
    assert _run_on_two_processes(_flags_of_both, tmp_path) == [[True, False, True, True]] * WORLD


def test_any_rank_on_device_is_each_flag_or_ed_over_the_processes_as_a_bool_tensor(tmp_path):
    for rank, flags in enumerate(_run_on_two_processes(_device_flags_of_both, tmp_path)):
        assert flags.dtype == torch.bool, f"rank {rank}: {flags.dtype}"
        assert flags.tolist() == [True, False, True, True], f"rank {rank}"


def test_an_interval_end_under_fp16_agrees_in_one_collective(tmp_path):
    """The shield's two answers (non-finite buffers, non-finite losses) went out in two all-reduces."""
    for rank, reductions in enumerate(_run_on_two_processes(_reductions_in_two_intervals, tmp_path)):
        assert reductions == 10 + 2, f"rank {rank}: {reductions} all-reduces (one a step, to agree on the skip)"


def test_fp32_under_the_controller_is_a_plain_ddp_loop_bit_for_bit(tmp_path):
    results = _run_on_two_processes(_fp32_against_plain, tmp_path)
    for rank, (controlled, plain) in enumerate(results):
        assert torch.equal(controlled, plain), f"rank {rank}: max |diff| {float((controlled - plain).abs().max()):.3g}"
    assert torch.equal(results[0][0], results[1][0])


def test_an_adaptive_policy_is_refused_before_anything_is_hooked_in(tmp_path):
    for refused in _run_on_two_processes(_adaptive_refused, tmp_path):
        heuristic, custom = refused
        assert heuristic.startswith("policy='heuristic' decides from this process's own signals")
        assert "torch.distributed run has 2 processes" in heuristic
        assert heuristic.endswith("use a static policy: 'fp32', 'bf16', 'fp16'")
        assert custom.startswith("policy=a _Constant object decides")


def test_a_probe_batch_is_refused_whatever_the_policy(tmp_path):
    """The estimator rounds run when each process's own timings allow: at other steps in each, beside DDP's
    collectives (its forward broadcasts buffers, its backward all-reduces), which would hang."""
    for message in _run_on_two_processes(_probe_refused, tmp_path):
        assert message.startswith("probe= is given, and this torch.distributed run has 2 processes")
        assert message.endswith("Leave probe out under torch.distributed")


def test_a_non_finite_buffer_in_one_process_rolls_every_process_back_to_the_same_state(tmp_path):
    """Rank 1's last batch of the second interval holds a NaN: its batch norm's running statistics turn NaN there, and
    the step is skipped in both (the NaN gradient is all-reduced). Before the fix rank 1 alone rolled back."""
    for rank, (rollbacks, restored, copy, final, other_final) in enumerate(_run_on_two_processes(_nan_batch, tmp_path)):
        assert rollbacks == 1, f"rank {rank}"
        assert torch.equal(restored, copy), f"rank {rank}: not restored to the state after the first interval"
        assert torch.equal(final, other_final), (
            f"rank {rank}: max |diff| {float((final - other_final).abs().max()):.3g}"
        )
        assert bool(torch.isfinite(final).all())


def test_a_non_finite_loss_in_one_process_skips_the_step_in_every_process(tmp_path):
    """A NaN term without a gradient: the all-reduced gradients stay finite, and rank 1's loss alone says skip."""
    for rank, (skipped, final, other_final) in enumerate(_run_on_two_processes(_nan_loss_term, tmp_path)):
        assert skipped == 1, f"rank {rank}"
        assert torch.equal(final, other_final), f"rank {rank}"


fused_step = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the fused step on the CPU needs Triton's interpreter"
)


@fused_step
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_non_finite_loss_in_one_process_skips_the_fused_step_in_every_process(tmp_path, precision):
    """The fused step's skip was decided in each process from its own loss: rank 1 skipped, rank 0 applied its update,
    and the replicas parted for good. Now both skip; the fp16 scale stays (a non-finite loss is no overflow)."""
    scenario = functools.partial(_fused_nan_loss_term, precision=precision)
    for rank, (skips, scales, before, after, other_after) in enumerate(_run_on_two_processes(scenario, tmp_path)):
        assert skips == [False, True, False], f"rank {rank}"
        assert torch.equal(after, before), f"rank {rank}: the skipped step moved the weights"
        assert torch.equal(after, other_after), (
            f"rank {rank}: max |diff| {float((after - other_after).abs().max()):.3g}"
        )
        assert scales == ([2.0**16] * 3 if precision == "fp16" else [1.0] * 3), f"rank {rank}"


@fused_step
def test_a_second_optimizers_overflow_in_one_process_skips_the_fused_step_and_backs_off_the_scale_in_every_one(
    tmp_path,
):
    """fp16, a head outside DDP held by a second optimizer: its gradients overflow in rank 1 alone. Both skip the
    step, and the scale backs off in both (it stays equal across the processes)."""
    for rank, (skips, scales, before, after, other_after) in enumerate(
        _run_on_two_processes(_fused_head_overflow, tmp_path)
    ):
        assert skips == [False, True, False], f"rank {rank}"
        assert torch.equal(after, before), f"rank {rank}: the skipped step moved the body"
        assert torch.equal(after, other_after), f"rank {rank}"
        assert scales == [2.0**16, 2.0**15, 2.0**15], f"rank {rank}"


@fused_step
def test_heads_split_by_rank_under_find_unused_parameters_stay_equal_with_large_gradients(tmp_path):
    """Rank 0's loss goes through head 0, rank 1's through head 1; ``zero_grad()`` before each forward. DDP's reducer
    writes each head's averaged gradient into the rank that did not use it, past the hook ``bind_large_grads`` tells
    by: with the head weights bound before the backward (counted as large), that rank left its head out of the update
    and the replicas parted (0.077 apart after four steps). Under DDP nothing is bound before the backward."""
    results = _run_on_two_processes(_heads_split_by_rank, tmp_path)
    for rank, (controlled, plain) in enumerate(results):
        torch.testing.assert_close(controlled, plain, msg=f"rank {rank}: the Controller against a plain DDP loop")
    assert torch.equal(results[0][0], results[1][0])


# ----------------------------------------------------------------------------------------- the processes' side


def _model(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm: list[nn.Module] = [nn.BatchNorm1d(16)] if batch_norm else []
    return nn.Sequential(nn.Linear(8, 16), *norm, nn.ReLU(), nn.Linear(16, 3))


def _shard(rank: int, n: int = 192) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, 8, generator=generator)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.zeros_like(tensor) for _ in range(WORLD)]
    dist.all_gather(out, tensor)
    return out


def _flags_of_both(rank: int) -> list[bool]:
    return any_ranks([rank == 0, False, rank == 1, True], torch.device("cpu"))


def _device_flags_of_both(rank: int) -> torch.Tensor:
    return any_rank_on_device(torch.tensor([rank == 0, False, rank == 1, True]))


FusedSteps = tuple[list[bool], list[float], torch.Tensor, torch.Tensor, torch.Tensor]
"""Each step's skip and loss scale, the watched parameters before and after the second step, the other rank's after."""


def _heads_split_by_rank(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four steps of a body and two heads under DDP (``find_unused_parameters``), each rank's loss through its own
    head, every weight counting as large; the Controller's fused run and a plain DDP loop's weights."""
    flat_store.BIND_BEFORE_BACKWARD_ELEMENTS, flat_store.BIND_BEFORE_BACKWARD_TOTAL = 16, 0  # in this process only

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(6, 8)
            self.heads = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 3)])

        def forward(self, x: torch.Tensor, head: int) -> torch.Tensor:
            return self.heads[head](torch.relu(self.body(x)))

    weights = []
    for controlled in (True, False):
        torch.manual_seed(0)
        model = TwoHeads()
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
        config = ControllerConfig(interval_steps=1000)
        ctl = Controller(ddp, optimizer, policy="fp32", fused=True, config=config) if controlled else None
        generator = torch.Generator().manual_seed(10 + rank)
        for _ in range(4):
            x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)
            optimizer.zero_grad()
            if ctl is None:
                cross_entropy(ddp(x, rank), y).backward()
                optimizer.step()
                continue
            with ctl.autocast():
                loss = cross_entropy(ddp(x, rank), y)
            ctl.step(loss)
        if ctl is not None:
            ctl.close()
        weights.append(_flat_parameters(model))
    return weights[0], weights[1]


def _fused_nan_loss_term(rank: int, precision: str) -> FusedSteps:
    """Three fused steps of a tiny DDP model; rank 1's second loss has a NaN term without a gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    ddp = DistributedDataParallel(model)
    engine = StepEngine(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9), torch.device("cpu"), fused=True)
    engine.set_precisions([precision, precision])
    return _three_fused_steps(rank, engine, ddp, model, spoil=lambda loss: loss + torch.tensor(float("nan")))


def _fused_head_overflow(rank: int) -> FusedSteps:
    """Three fp16 fused steps of a DDP body; a head outside DDP, its own optimizer's, overflows in rank 1's second."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 6), nn.ReLU())
    head = nn.Linear(6, 3)
    ddp = DistributedDataParallel(body)
    model = nn.Sequential(ddp, head)
    engine = StepEngine(model, torch.optim.SGD(ddp.parameters(), lr=0.1), torch.device("cpu"), fused=True)
    engine.set_precisions([Precision.FP16] * engine.n_layers)
    head_optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    handles = []

    def spoil(loss: torch.Tensor) -> torch.Tensor:
        handles.append(head.weight.register_hook(lambda grad: grad * float("inf")))
        return loss

    def after_step() -> None:
        while handles:
            handles.pop().remove()
        head_optimizer.step()
        head_optimizer.zero_grad()

    return _three_fused_steps(rank, engine, model, body, spoil, after_step)


def _three_fused_steps(
    rank: int,
    engine: StepEngine,
    forward: nn.Module,
    watched: nn.Module,
    spoil: Callable[[torch.Tensor], torch.Tensor],
    after_step: Callable[[], None] | None = None,
) -> FusedSteps:
    """Three fused steps of ``forward`` on this rank's shard; ``spoil`` takes rank 1's second loss before its step."""
    x, y = _shard(rank, 24)
    skips, scales = [], []
    before = after = torch.empty(0)
    for step in range(3):
        with engine.precision.context():
            loss = cross_entropy(forward(x[step * 8 : (step + 1) * 8]).float(), y[step * 8 : (step + 1) * 8])
        if rank == 1 and step == 1:
            loss = spoil(loss)
        if step == 1:
            before = _flat_parameters(watched)
        skips.append(bool(engine.backward_and_step(loss)[1]))
        scales.append(engine.loss_scale)
        if step == 1:
            after = _flat_parameters(watched)
        if after_step is not None:
            after_step()
    engine.remove()
    return skips, scales, before, after, _gathered(after)[1 - rank]


def _reductions_in_two_intervals(rank: int) -> int:
    """The all-reduces the Controller makes (DDP's own go through its reducer) in two intervals of fp16."""
    model = _model()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ctl = Controller(ddp, optimizer, policy="fp16", config=ControllerConfig(interval_steps=5))
    x, y = _shard(rank)
    reductions = 0
    all_reduce = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reductions
        reductions += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted  # this process's own module: it ends with the scenario
    try:
        for step in range(10):
            with ctl.autocast():
                loss = cross_entropy(ddp(x[step * 12 : (step + 1) * 12]), y[step * 12 : (step + 1) * 12])
            ctl.step(loss)
    finally:
        dist.all_reduce = all_reduce
    ctl.close()
    return reductions


def _fp32_against_plain(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Controller's run on this rank's shard through ``ctl.loader``, then a plain DDP loop on the same batches."""
    model = _model()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ctl = Controller(ddp, optimizer, policy="fp32", config=ControllerConfig(interval_steps=5))
    batches = []
    for x, y in ctl.loader(_shard(rank), batch_size=16, epochs=1):
        batches.append((x.clone(), y.clone()))
        with ctl.autocast():
            loss = cross_entropy(ddp(x), y)
        ctl.step(loss)
    ctl.close()
    plain_model = _model()
    plain = DistributedDataParallel(plain_model)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        loss = cross_entropy(plain(x), y)
        plain_optimizer.zero_grad()
        loss.backward()
        plain_optimizer.step()
    return _flat_parameters(model), _flat_parameters(plain_model)


class _Constant:
    """A policy of the user's own, adaptive as far as the Controller can tell."""

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None, deterministic: bool = False):
        return StaticPolicy("fp32").predict(observation, state)


def _adaptive_refused(rank: int) -> tuple[str, str]:
    model = _model()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    messages = []
    for policy in ("heuristic", _Constant()):
        try:
            Controller(ddp, optimizer, policy=policy)
        except ConfigError as error:
            messages.append(str(error))
        else:
            messages.append("accepted")
        hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in ddp.modules()]
        assert hooks == [0] * len(hooks), f"a refused Controller left hooks: {hooks}"
    for static in ("static-bf16", StaticPolicy("fp32")):  # accepted
        Controller(ddp, optimizer, policy=static).close()
    return messages[0], messages[1]


def _probe_refused(rank: int) -> str:
    model = _model()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    try:
        Controller(ddp, optimizer, policy="fp32", probe=_shard(rank, 16), loss_fn=cross_entropy)
    except ConfigError as error:
        hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in ddp.modules()]
        assert hooks == [0] * len(hooks), f"a refused Controller left hooks: {hooks}"
        return str(error)
    return "accepted"


def _nan_batch(rank: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    model = _model(batch_norm=True)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ctl = Controller(ddp, optimizer, policy="fp32", config=ControllerConfig(interval_steps=5))
    x, y = _shard(rank)
    for step in range(13):
        xb, yb = x[step * 12 : (step + 1) * 12].clone(), y[step * 12 : (step + 1) * 12]
        if rank == 1 and step == 9:  # the second interval's last step
            xb[0] = float("nan")
        with ctl.autocast():
            loss = cross_entropy(ddp(xb), yb)
        ctl.step(loss)
        if step == 4:
            copy = _flat_parameters(model)  # the first interval's end, confirmed by the next update
        if step == 9:
            restored = _flat_parameters(model)
    ctl.close()
    final = _flat_parameters(model)
    return ctl.rollbacks, restored, copy, final, _gathered(final)[1 - rank]


def _nan_loss_term(rank: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    model = _model()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ctl = Controller(ddp, optimizer, policy="fp32", config=ControllerConfig(interval_steps=5))
    x, y = _shard(rank)
    for step in range(7):
        with ctl.autocast():
            loss = cross_entropy(ddp(x[step * 12 : (step + 1) * 12]), y[step * 12 : (step + 1) * 12])
        if rank == 1 and step == 2:
            loss = loss + torch.tensor(float("nan"))
        ctl.step(loss)
    ctl.close()
    final = _flat_parameters(model)
    return ctl.skipped_steps, final, _gathered(final)[1 - rank]


def _process(rank: int, port: int, scenario: Callable[[int], Any], out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # two processes on a shared CPU
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        torch.save(scenario(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_on_two_processes(scenario: Callable[[int], Any], out_dir: Path) -> list[Any]:
    """``scenario(rank)`` in each of two processes of one gloo group; their results, by rank."""
    import torch._dynamo  # DDP's constructor imports it: seconds once here, not in each forked process

    with socket.socket() as probe:  # a free port (the OS picks it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(
        _process, args=(port, scenario, str(out_dir)), nprocs=WORLD, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 2 * TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):  # raises a process's error
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the processes did not finish in {2 * TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]
