"""GPU-only: the deferred training path queues work without ever waiting for the device."""

import gc

import pytest
import torch
from torch import nn

from triaccel_rl.graphs import StepGraphs
from triaccel_rl.training import TrainingRun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_deferred_steps_do_not_synchronise(precision):
    run = TrainingRun("synthetic", seed=0, device="cuda", batch_size=32)
    run.observe_budget_frac = None  # every step recorded (a GPU samples them by default): n_observed is exact
    assert run.engine.fused
    run.set_precisions([precision] * run.n_layers)
    run.train_interval(2)  # compiles the kernels and fits the memory model first
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            run._step(deferred=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    interval = run.train_interval(3)
    assert interval.moments.n_observed == 3 and interval.train_ms > 0


def test_channels_last_run_uses_the_fused_step_and_its_grads_stay_in_the_flat_buffer():
    run = TrainingRun("cnn-fmnist", seed=0, device="cuda", channels_last=True)
    assert run.engine.fused
    before = [p.detach().clone() for p in run.model.parameters()]
    run.train_interval(3)
    store = run.engine.store
    low, high = store.grads.data_ptr(), store.grads.data_ptr() + 4 * store.n_elements
    for p, old in zip(run.model.parameters(), before, strict=True):
        assert p.grad is not None and low <= p.grad.data_ptr() < high  # autograd accumulated in place
        assert not torch.equal(p.detach(), old)  # and the fused step applied it


def test_controller_steps_do_not_synchronise_between_decisions():
    from torch import nn

    from triaccel_rl.config import ControllerConfig
    from triaccel_rl.controller import Controller

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)).cuda()
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="bf16",
                     config=ControllerConfig(interval_steps=100))  # fmt: skip
    assert ctl.engine.fused
    x, y = torch.randn(512, 8), torch.randint(0, 2, (512,))
    batches = ctl.loader((x, y), batch_size=16)
    for step in range(6):
        xb, yb = next(batches)
        # After the first two steps, which compile the kernels and build the cost model: no sync at all.
        torch.cuda.set_sync_debug_mode("error" if step >= 2 else "default")
        try:
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(xb), yb)
            ctl.step(loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert ctl.steps == 6


def test_a_momentum_schedule_and_heads_taking_turns_do_not_synchronise():
    """``OneCycleLR`` cycles AdamW's beta1 at every step (new betas for the fused bias corrections) and two heads
    take turns (a layer sits each step out of its count): after the first steps, which compile the kernels and see
    each head once, no sync."""
    from torch import nn
    from users_loop import TwoHeads

    from triaccel_rl.config import ControllerConfig
    from triaccel_rl.controller import Controller

    torch.manual_seed(0)
    model = TwoHeads(width=8, hidden=32).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10)
    ctl = Controller(model, optimizer, policy="bf16", config=ControllerConfig(interval_steps=100))
    assert ctl.engine.fused
    x, y = torch.randn(8, 16, 8, device="cuda"), torch.randint(0, 3, (8, 16), device="cuda")
    betas = []
    for step in range(8):
        head = "ab"[step % 2]
        torch.cuda.set_sync_debug_mode("error" if step >= 3 else "default")
        try:
            optimizer.zero_grad(set_to_none=True)
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x[step], head), y[step])
            ctl.step(loss)
            scheduler.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        betas.append(optimizer.param_groups[0]["betas"][0])
    assert len(set(betas)) == len(betas), "the schedule did not move beta1 at every step"
    assert ctl.engine.fused_optimizer.layer_step_counts.tolist() == [8.0, 4.0, 4.0]
    ctl.close()


# --------------------------------------------------------------------------- captured steps (CUDA graphs)


def _params_and_buffers(run):
    return [t.detach().float() for t in list(run.model.parameters()) + list(run.model.buffers())]


def _assert_runs_match(eager, graphed, rtol):
    for index, (a, b) in enumerate(zip(_params_and_buffers(eager), _params_and_buffers(graphed), strict=True)):
        error = ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
        assert error <= rtol, f"tensor {index}: the runs differ by a max relative error {error:.3g} > {rtol}"


@pytest.fixture
def deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("task, channels_last", [("synthetic", False), ("cnn-fmnist", True)])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_graphed_steps_match_eager_steps(deterministic_cudnn, task, channels_last, precision):
    runs = []
    for graphs in (False, True):
        run = TrainingRun(task, seed=0, device="cuda", channels_last=channels_last, cuda_graphs=graphs)
        run.set_precisions([precision] * run.n_layers)
        run.train_interval(4)
        run.set_precisions(["fp32"] * run.n_layers)  # a precision switch mid-run needs a second graph
        run.train_interval(3)
        run.set_precisions([precision] * run.n_layers)  # and back: the first graph replays again
        run.train_interval(2)
        runs.append(run)
    eager, graphed = runs
    assert eager.graphs is None
    switched = precision != "fp32"  # fp32 -> fp32 is no switch: the same graph serves
    assert graphed.graphs is not None and graphed.graphs.captures == 1 + switched and graphed.graphs.replays == 9
    assert len(graphed.graphs._inputs) == 1  # both graphs read one shared copy of the batch
    assert graphed.skipped_steps == eager.skipped_steps
    # cuBLAS may pick other kernels while capturing (no split-K workspace), so fp32 differs by rounding.
    _assert_runs_match(eager, graphed, rtol=1e-3 if precision != "fp32" else 1e-4)


def test_graphed_steps_do_not_synchronise_and_report_the_eager_peak():
    run = TrainingRun("cnn-fmnist", seed=0, device="cuda", channels_last=True)
    assert run.graphs is not None  # on by default on a GPU
    run.set_precisions(["bf16"] * run.n_layers)
    first = run.train_interval(2)  # captures
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            run._step(deferred=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    later = run.train_interval(2)
    assert run.graphs.captures == 1 and run.graphs.replays == 7
    # A replay allocates nothing; the step's peak is the eager pass's, so the memory model sees activations.
    assert later.peak_bytes == first.peak_bytes == run.graphs.last_peak_bytes


def test_a_step_that_cannot_be_captured_runs_eagerly_and_graphs_turn_off(deterministic_cudnn, caplog):
    runs = []
    for graphs in (False, True):
        run = TrainingRun("synthetic", seed=0, device="cuda", cuda_graphs=graphs)
        if graphs:
            body = run._captured_body

            def syncing_body(x, y, body=body):
                loss = body(x, y)
                float(loss)  # a host-device sync: not allowed while a graph is being captured
                return loss

            run._captured_body = syncing_body
        run.train_interval(3)
        runs.append(run)
    eager, fallen_back = runs
    assert fallen_back.graphs is None
    assert "CUDA graph capture failed" in caplog.text
    assert torch.rand(8, device="cuda").isfinite().all()  # random ops run after the failed capture
    _assert_runs_match(eager, fallen_back, rtol=1e-5)


def test_after_a_failed_capture_random_ops_run_and_the_allocator_frees_its_cache():
    # torch 2.11 leaves the default CUDA generator in capture mode (random ops raise) and the allocator routing to the
    # failed capture's pool (empty_cache() frees nothing): graphs.recover_from_failed_capture undoes both.
    device = torch.device("cuda")
    model = nn.Linear(64, 10).to(device)
    graphs = StepGraphs(model, device)

    def body(x, y):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    def syncing_body(x, y):
        loss = body(x, y)
        float(loss)  # a host-device sync: the capture fails
        return loss

    x, y = torch.randn(32, 64, device=device), torch.randint(0, 10, (32,), device=device)
    with pytest.raises(RuntimeError):  # torch.AcceleratorError is one
        graphs.run("step", x, y, syncing_body, lambda: model.zero_grad(set_to_none=False))
    assert graphs._pool is None  # the failed capture's pool is not used again
    dropped = nn.functional.dropout(torch.ones(1000, device=device), p=0.5)
    assert 0 < int((dropped == 0).sum()) < 1000
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    block = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    assert torch.cuda.memory_reserved() >= before + (1 << 30)
    del block
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() == before, (
        f"{torch.cuda.memory_reserved() - before} bytes kept after empty_cache"
    )
    graphs.run("step", x, y, body, lambda: model.zero_grad(set_to_none=False))  # and a capture succeeds again
    assert graphs.captures == 1 and graphs._pool is not None


def test_fp16_loss_scale_is_updated_in_place_for_captured_steps():
    run = TrainingRun("synthetic", seed=0, device="cuda")
    run.set_precisions(["fp16"] * run.n_layers)
    scale = run.engine._scale
    run.train_interval(3)
    assert run.engine._scale is scale and run.graphs is not None and run.graphs.replays == 3


def test_graphed_probe_equals_the_eager_probe_and_leaves_batch_norm_alone(deterministic_cudnn):
    run = TrainingRun("cnn-fmnist", seed=0, device="cuda", channels_last=True)
    run.set_precisions(["bf16"] * run.n_layers)
    run.train_interval(2)
    buffers = [b.clone() for b in run.model.buffers()]
    graphed, again = run.probe_loss(), run.probe_loss()
    with torch.no_grad():
        eager = float(run._probe_body(*run.probe_batch))
    assert graphed == again
    assert abs(graphed - eager) <= 1e-3 * abs(eager), f"graphed probe {graphed} vs eager {eager}"
    for before, after in zip(buffers, run.model.buffers(), strict=True):
        assert torch.equal(before, after)


# ------------------------------------------------------------------- 16-bit weight copies, host rollback copy


def _assert_copies_current(run, dtype):
    """Every lowered layer's 16-bit copy is its fp32 weights rounded, bit for bit (what the forward reads)."""
    store = run.engine.store
    copy = store.fp16_copy if dtype == torch.float16 else store.bf16_copy
    for layer in run.engine.precision.controllable_indices:
        want = store.layer_segment(store.params, layer).to(dtype)
        got = store.layer_segment(copy, layer)
        assert torch.equal(want.view(torch.int16), got.view(torch.int16)), f"layer {layer}'s copy is stale"


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_run_reading_weight_copies_matches_one_casting_its_weights(deterministic_cudnn, graphs, precision):
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    runs, losses = [], []
    for copies in (True, False):
        run = TrainingRun("cnn-fmnist", seed=0, device="cuda", channels_last=True, cuda_graphs=graphs)
        run.observe_budget_frac = None  # every step's loss recorded (a GPU samples them by default)
        assert run.engine.fused
        if not copies:
            run.engine.precision.use_weight_copies(None)
        run.train_interval(2)  # fp32: the copies are not written
        run.set_precisions([precision] * run.n_layers)  # lowered mid-run: the copies are refreshed
        trajectory = []
        for _ in range(4):
            if copies:
                _assert_copies_current(run, dtype)  # before each step: the forward reads exactly weights.to(dtype)
            trajectory.append(run.train_interval(1).moments.loss)
        runs.append(run)
        losses.append(trajectory)
    assert runs[0].engine.store.shared_copy  # one 16-bit buffer whatever the precision
    # Equal values, yet not bit-equal runs: cuDNN picks other kernels for the flat store's views than for a
    # freshly cast weight (scripts/check_weight_copies.py, H200 2026-12-01: the fp16 stem convolution's output
    # one ulp apart with equal inputs and weights). So the runs are compared as a user would: the losses step by
    # step, and all weights together (norm-wise; one small tensor's elementwise error reached 5% in 4 steps).
    for step, (a, b) in enumerate(zip(*losses, strict=True)):
        assert abs(a - b) <= 1e-2 * abs(b), f"step {step}: loss {a} with copies, {b} casting"
    # Within two units of the 16-bit type's rounding (eps: bf16 2^-7, fp16 2^-10), norm-wise. Measured on the H200
    # (2026-12-01): bf16 1.02e-3, fp16 below 1e-3.
    with_copies, casting = runs[0].engine.store.params, runs[1].engine.store.params
    error, allowed = float((with_copies - casting).norm() / casting.norm()), 2 * torch.finfo(dtype).eps
    assert error <= allowed, f"the runs' weights differ by a norm-wise relative error {error:.3g} > {allowed:.3g}"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_forward_reads_the_weight_copies(precision):
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    run = TrainingRun("cnn-fmnist", seed=0, device="cuda", channels_last=True, cuda_graphs=False)
    run.set_precisions([precision] * run.n_layers)
    run.train_interval(1)
    store = run.engine.store
    copy = store.fp16_copy if dtype == torch.float16 else store.bf16_copy
    with torch.no_grad():
        before = float(run._probe_body(*run.probe_batch))
        store.layer_segment(copy, run.engine.precision.controllable_indices[0]).zero_()  # fp32 weights untouched
        after = float(run._probe_body(*run.probe_batch))
    assert after != before, f"zeroing the first layer's {precision} copy left the probe loss at {before}"


def test_the_offloaded_rollback_copy_takes_no_gpu_memory_and_restores_exactly():
    from triaccel_rl.shield import RollbackGuard

    run = TrainingRun("cnn-fmnist", seed=0, device="cuda", channels_last=True)
    run.train_interval(3)  # the optimizer state exists
    guard = RollbackGuard(run.model, run.engine.state_holder, offload=True)
    gc.collect()  # earlier tests' garbage cycles must not be freed inside the measurement (-8.6 MiB once, 2026-12-03)
    before = torch.cuda.memory_allocated()
    guard.save()
    assert torch.cuda.memory_allocated() == before  # the copy went to pinned host memory
    assert all(leaf.device.type == "cpu" and leaf.is_pinned() for leaf in guard._good.model.leaves
               if isinstance(leaf, torch.Tensor))  # fmt: skip
    run.train_interval(3)
    guard.save()  # reuses the pinned tensors: an asynchronous copy into them
    saved = [t.detach().clone() for t in _params_and_buffers(run)]
    run.train_interval(2)
    with torch.no_grad():
        next(run.model.parameters()).fill_(float("nan"))
    assert guard.restore()
    for want, got in zip(saved, _params_and_buffers(run), strict=True):
        assert torch.equal(want, got)


def test_the_fast_peak_reading_equals_max_memory_allocated():
    from triaccel_rl.memory import allocated_bytes, peak_allocated_bytes

    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    held = torch.empty(3 << 20, dtype=torch.uint8, device=device)
    del held
    assert peak_allocated_bytes(device) == torch.cuda.max_memory_allocated(device) >= 3 << 20
    kept = torch.empty(1 << 20, dtype=torch.uint8, device=device)
    assert allocated_bytes(device) == (torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device))
    del kept


def test_nvml_reads_at_least_the_allocators_reserve_and_every_run_records_it():
    from triaccel_rl.compare import run_controller
    from triaccel_rl.memory import nvml_used_bytes

    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    reading = nvml_used_bytes(torch.device("cuda"))
    assert reading is not None, "NVML gave no reading on a CUDA machine"
    used, scope = reading
    assert scope in ("process", "device") and used >= torch.cuda.memory_reserved() >= block.numel()
    result = run_controller("synthetic", "bf16", 0, epochs=0.5, device="cuda", eval_every=1)
    assert result.nvml_bytes is not None and result.nvml_bytes >= result.peak_bytes > 0


def test_the_controllers_memory_peak_includes_the_forward():
    """A transient allocated and freed inside the forward is part of the step's peak (autocast() starts it)."""
    from torch import nn

    from triaccel_rl.config import ControllerConfig
    from triaccel_rl.controller import Controller

    transient = 256 * 2**20

    class Spiky(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 2)

        def forward(self, x):
            scratch = torch.ones(transient // 4, device=x.device)  # freed when the forward returns
            return self.linear(x) + 0.0 * scratch[0]

    model = Spiky().cuda()
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32",
                     config=ControllerConfig(interval_steps=2, max_interval_factor=1))  # fmt: skip
    x, y = torch.randn(64, 8, device="cuda"), torch.randint(0, 2, (64,), device="cuda")
    for xb, yb in ctl.loader((x, y), batch_size=16, epochs=1):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(xb), yb)
        ctl.step(loss)
    ctl.close()
    assert ctl.signals is not None and ctl.signals.memory_bytes >= transient


@pytest.mark.parametrize("policy", ["bf16", "fp16"])
def test_a_checkpoint_resumes_a_controlled_run_on_the_gpu(policy):
    """The fused step's moments and fp16 loss scale go into ``Controller.state_dict()``; the resumed run matches."""
    import io

    from torch import nn

    import triaccel_rl as ta

    data = (torch.randn(96, 8, generator=torch.Generator().manual_seed(0)), torch.arange(96) % 3)

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer, ta.Controller(model, optimizer, policy=policy)

    def train(model, ctl, stop_after=None, saved=None):
        for step, (x, y) in enumerate(ctl.loader(data, batch_size=16, epochs=2), start=1):
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
            if step == stop_after:
                torch.save({"model": model.state_dict(), "controller": ctl.state_dict()}, saved)

    model, optimizer, ctl = build()
    assert ctl.engine.fused
    saved = io.BytesIO()
    train(model, ctl, stop_after=7, saved=saved)
    # The torch optimizer never stepped, but its state_dict shows the fused moments, one entry a parameter.
    users = optimizer.state_dict()["state"]
    assert sorted(users) == [0, 1, 2, 3]
    for i, param in enumerate(model.parameters()):
        assert users[i]["momentum_buffer"].shape == param.shape and users[i]["momentum_buffer"].abs().sum() > 0
    saved.seek(0)
    state = torch.load(saved)
    model2, _, ctl2 = build()
    model2.load_state_dict(state["model"])
    ctl2.load_state_dict(state["controller"])
    if policy == "fp16":  # the loss scale the fused step had reached, not a fresh 2**16
        assert ctl2.engine.loss_scale == state["controller"]["engine"]["scaler"]["scale"].item()
    train(model2, ctl2)
    assert ctl2.steps == 12
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_model_saved_while_the_fused_step_runs_loads_with_its_weights_and_runs_without_hooks():
    """``torch.save(model)`` mid-run on the fused path: the hooks are saved by name and load as hooks that do
    nothing once the controller is closed; the parameters (views of the flat store) load with the run's values."""
    import io

    from torch import nn

    import triaccel_rl as ta

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).cuda()
    data = (torch.randn(64, 8, device="cuda"), torch.arange(64, device="cuda") % 3)
    saved = io.BytesIO()
    with ta.Controller(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), policy="bf16") as ctl:
        assert ctl.engine.fused
        for x, y in ctl.loader(data, batch_size=16):
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
        torch.save(model, saved)
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    for name, p in loaded.named_parameters():
        assert p.is_cuda and p.dtype == torch.float32 and torch.equal(p, weights[name]), name
    x = data[0][:4]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(loaded(x), model(x))  # both unhooked: plain autocast, the same weights


def test_an_optimizer_the_fused_step_cannot_run_is_named_in_a_warning(caplog):
    from torch import nn

    from triaccel_rl.engine import StepEngine

    model = nn.Linear(4, 2).cuda()
    # The biases at another LR than their weights: the fused step applies one LR a layer.
    optimizer = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "lr": 1e-4}])
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        engine = StepEngine(model, optimizer, torch.device("cuda"))
    assert not engine.fused
    reason = "a layer's parameters are in param groups of different LRs or 'layer' keys"
    assert f"cannot run this optimizer ({reason})" in caplog.text
    # The common recipe, no weight decay on biases, runs fused (it took the reference path before 2026-12-02), silently.
    caplog.clear()
    optimizer = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0}])
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        engine = StepEngine(model, optimizer, torch.device("cuda"))
    assert engine.fused and "cannot run" not in caplog.text


def test_a_branch_not_taken_is_left_alone_by_the_fused_step_as_by_torch_optim():
    """After ``zero_grad(set_to_none=True)`` a parameter with no gradient takes no decay or momentum (torch.optim)."""
    from users_loop import TwoHeads, train_heads_controlled, train_heads_plainly

    import triaccel_rl as ta

    def build():
        torch.manual_seed(0)
        model = TwoHeads().cuda()
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=g).cuda(), torch.randint(0, 3, (32,), generator=g).cuda()) for _ in range(8)]
    heads = ["a", "a", "b", "a", "b", "b", "a", "a"]
    plain, optimizer = build()
    train_heads_plainly(plain, optimizer, data, heads)
    model, optimizer = build()
    with ta.Controller(model, optimizer, policy="fp32") as ctl:
        assert ctl.engine.fused
        train_heads_controlled(ctl, model, optimizer, data, heads)  # the idle head: no decay, no momentum
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=f"{name} against torch.optim")


def test_an_environment_on_the_gpu_draws_from_its_own_cuda_stream(deterministic_cudnn):
    """The GPU tasks' crop-and-flip augmentation draws from the device's generator. An episode's random draws came
    from the caller's CUDA stream (SB3's, on a GPU), and took from it: the same seed and actions gave other weights
    when the caller drew in between. Now the environment swaps its own stream in, as it does the CPU's."""
    import gymnasium as gym
    import triaccel_rl.envs  # noqa: F401  (registers TriAccel-v0)

    from triaccel_rl.config import ControllerConfig
    from triaccel_rl.tasks import crop_flip, get_task

    assert get_task("resnet18-fmnist").augment is crop_flip
    config = ControllerConfig(interval_steps=4)
    weights = []
    for draws, own_stream in ((0, True), (3, True), (3, False)):
        env = gym.make(  # modelled time, and no end for the early probe loss's jump (x2 on these first steps)
            "TriAccel-v0",
            task="resnet18-fmnist",
            config=config,
            device="cuda",
            cost_mode="profile",
            divergence_factor=1000.0,
            max_decisions=8,
        )
        torch.cuda.manual_seed(1000 + draws)  # the caller's stream differs between the episodes
        env.reset(seed=0)
        if not own_stream:  # the control: the steps on the caller's stream, as before the fix
            env.unwrapped._cuda_rng = None
        action = [1] * config.n_groups + [2, 1]  # bf16 everywhere, LR x1, batch kept
        for _ in range(2):
            caller = torch.cuda.get_rng_state()
            _, _, terminated, truncated, _ = env.step(action)
            assert not (terminated or truncated)
            if own_stream:
                assert torch.equal(torch.cuda.get_rng_state(), caller)  # the episode took nothing from the caller's
            for _ in range(draws):
                torch.rand(7, device="cuda")  # the caller draws between steps
        weights.append([p.detach().clone() for p in env.unwrapped.loop.run.model.parameters()])
        env.close()
    for a, b in zip(weights[0], weights[1], strict=True):
        torch.testing.assert_close(a, b)  # other crops would differ by far more than float32's tolerance
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(weights[0], weights[2], strict=True))  # the control did


def test_a_step_of_accumulated_micro_batches_reads_the_peak_of_the_whole_batch():
    """``autocast()`` reset the allocator's peak at every micro-batch, so with ``ctl.backward()`` accumulation the
    step (and the memory model, which learns the loader batch's cost from it) read the last micro-batch's peak only:
    here a 16-sample one after a 112-sample one whose activations (512 KB a sample) set the batch's peak."""
    from triaccel_rl.controller import Controller

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 65536), nn.ReLU(), nn.Linear(65536, 10)).cuda()
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32")
    x, y = torch.randn(256, 16), torch.randint(0, 10, (256,))
    xb, yb = next(ctl.loader((x, y), batch_size=128))
    with ctl.autocast():
        first = nn.functional.cross_entropy(model(xb[:112]), yb[:112]) * 112 / 128
    ctl.backward(first)
    first_peak = torch.cuda.max_memory_allocated()
    with ctl.autocast():
        second = nn.functional.cross_entropy(model(xb[112:]), yb[112:]) * 16 / 128
    ctl.step(second)
    assert ctl._interval_peak >= first_peak > 40 * 2**20  # 112 x 512 KB of activations in it
