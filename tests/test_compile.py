"""A user's ``torch.compile``d model under the Controller: the same training as eager, and graphs that settle.

On the CPU the backend is ``aot_eager`` (Dynamo's tracing, guards and graph breaks, and AOTAutograd, without
Inductor's code generation); on a GPU the default Inductor backend. The fused step runs on a GPU or under Triton's
interpreter.
"""

import os

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import triaccel_rl.controller as controller_module
from triaccel_rl.controller import Controller
from triaccel_rl.engine import StepEngine

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKEND = "inductor" if DEVICE.type == "cuda" else "aot_eager"
FUSED_RUNS = DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

# Precisions of the two Linear layers from each step on: fp32, then uniform bf16, then a mixed map, then fp16 and bf16.
SWITCHES = {0: ["fp32", "fp32"], 4: ["bf16", "bf16"], 8: ["bf16", "fp32"], 12: ["fp16", "bf16"]}
STEPS = 20


def _train(
    compiled: bool, fused: bool, monkeypatch: pytest.MonkeyPatch, mode: str | None = None
) -> tuple[list, list, list[int]]:
    """Twenty steps of a user's loop; returns each step's (loss, logits dtype), the final weights, and how many
    graphs Dynamo had compiled after each step. ``mode`` is ``torch.compile``'s (Inductor only)."""
    monkeypatch.setattr(controller_module, "StepEngine", lambda *args, **kwargs: StepEngine(*args, fused=fused))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5)).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(STEPS * 16, 3, 4, 4, generator=g), torch.randint(0, 5, (STEPS * 16,), generator=g)
    if not compiled:
        forward = model
    else:
        forward = torch.compile(model, mode=mode) if mode else torch.compile(model, backend=BACKEND)
    seen, graphs = [], []
    with Controller(model, optimizer, policy="static-fp32") as ctl:
        assert ctl.engine.fused == fused
        for step, (xb, yb) in enumerate(ctl.loader((x.to(DEVICE), y.to(DEVICE)), batch_size=16, epochs=1)):
            if step in SWITCHES:
                ctl.engine.set_precisions(SWITCHES[step])
            optimizer.zero_grad()
            with ctl.autocast():
                logits = forward(xb)
                loss = nn.functional.cross_entropy(logits, yb)
            seen.append((loss.item(), logits.dtype))
            ctl.step(loss)
            graphs.append(counters["stats"]["unique_graphs"])
    return seen, [p.detach().cpu() for p in model.parameters()], graphs


@pytest.mark.parametrize(
    "fused",
    [
        False,
        pytest.param(
            True, marks=pytest.mark.skipif(not FUSED_RUNS, reason="the fused step needs a GPU or TRITON_INTERPRET=1")
        ),
    ],
    ids=["reference", "fused"],
)
def test_a_compiled_model_trains_as_the_eager_one_through_precision_changes(fused, monkeypatch):
    eager, eager_weights, _ = _train(compiled=False, fused=fused, monkeypatch=monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    compiled, compiled_weights, graphs = _train(compiled=True, fused=fused, monkeypatch=monkeypatch)

    assert len(compiled) == len(eager) == STEPS
    for (want_loss, want_dtype), (got_loss, got_dtype) in zip(eager, compiled, strict=True):
        assert got_dtype == want_dtype  # each switch reached the compiled forward at its step
        assert got_loss == pytest.approx(want_loss, rel=2e-3, abs=1e-4)
    for got, want in zip(compiled_weights, eager_weights, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4)
    # A uniform map is one graph with no break (the per-layer hooks are traced); a mixed map breaks at its layers.
    assert graphs[3] == 1 and graphs[7] == 2
    # Every map compiles once, at its first step: no recompiling at every step (a view made inside a hook did that).
    for start, end in zip(sorted(SWITCHES), [*sorted(SWITCHES)[1:], STEPS], strict=True):
        assert graphs[start + 1 : end] == [graphs[start]] * (end - start - 1), graphs


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_reduce_overhead_mode_replays_cuda_graphs_and_trains_as_the_eager_model(fused, monkeypatch):
    """``mode="reduce-overhead"`` (cudagraph trees): forward and backward replayed, through every precision map."""
    eager, eager_weights, _ = _train(compiled=False, fused=fused, monkeypatch=monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    replayed, replayed_weights, _ = _train(compiled=True, fused=fused, monkeypatch=monkeypatch, mode="reduce-overhead")
    for (want_loss, want_dtype), (got_loss, got_dtype) in zip(eager, replayed, strict=True):
        assert got_dtype == want_dtype
        assert got_loss == pytest.approx(want_loss, rel=2e-3, abs=1e-4)
    for got, want in zip(replayed_weights, eager_weights, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4)
    assert counters["inductor"]["cudagraph_skips"] == 0  # replayed as CUDA graphs, not silently run eagerly


@pytest.mark.skipif(not FUSED_RUNS, reason="the fused step needs a GPU or TRITON_INTERPRET=1")
def test_a_users_eager_forward_casts_its_weights_and_a_compiled_one_computes_the_same(monkeypatch):
    """Reading a 16-bit copy saves a cast kernel but costs host time a parameter: worth it only in a traced forward."""
    monkeypatch.setattr(controller_module, "StepEngine", lambda *args, **kwargs: StepEngine(*args, fused=True))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DEVICE)
    seen = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(type(module.weight)))  # after the swap's hook
    with Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="static-bf16") as ctl:
        x = torch.randn(4, 6, device=DEVICE)
        with ctl.autocast():
            eager = model(x)
        with ctl.autocast():
            compiled = torch.compile(model, backend=BACKEND)(x)
    assert seen[0] is nn.Parameter  # eager: the fp32 parameter, cast by autocast
    assert eager.dtype == compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager)  # the copies hold the weights rounded as autocast rounds them


def test_a_graph_traced_before_the_controller_does_not_skip_its_precisions():
    """Dynamo does not guard on module hooks: a graph traced before the controller's would ignore a mixed map."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(DEVICE)
    forward = torch.compile(model, backend=BACKEND)
    x = torch.randn(4, 8, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert forward(x).dtype == torch.bfloat16  # traced without hooks
    with Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="static-fp32") as ctl:
        ctl.engine.set_precisions(["bf16", "fp32"])
        with ctl.autocast():
            compiled, eager = forward(x), model(x)
    assert compiled.dtype == eager.dtype == torch.float32  # the last layer's fp32 holds in the compiled forward
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("first", ["plain", "controlled"])
def test_two_instances_of_one_class_compile_their_own_graphs(first):
    """An EMA copy or a teacher of the model's class, compiled beside it: neither may run the other's graph."""
    torch.manual_seed(0)
    controlled = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(DEVICE)
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE)
    with Controller(controlled, torch.optim.SGD(controlled.parameters(), lr=0.1), policy="static-fp32") as ctl:
        ctl.engine.set_precisions(["bf16", "fp32"])
        forwards = {
            "controlled": torch.compile(controlled, backend=BACKEND),
            "plain": torch.compile(plain, backend=BACKEND),
        }
        got = {}
        for name in (first, "controlled" if first == "plain" else "plain"):
            with ctl.autocast():  # the plain model under the controller's context: the outer bf16 autocast, no hooks
                got[name] = forwards[name](x)
        with ctl.autocast():
            want = {"controlled": controlled(x), "plain": plain(x)}
    assert got["controlled"].dtype == torch.float32  # its last layer's fp32 held
    assert got["plain"].dtype == torch.bfloat16  # autocast alone: no layer of it is held in fp32
    for name in got:
        torch.testing.assert_close(got[name], want[name])


def test_a_second_controller_on_the_same_model_is_not_served_the_first_ones_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(DEVICE)
    forward = torch.compile(model, backend=BACKEND)
    x = torch.randn(4, 8, device=DEVICE)
    dtypes = []
    for precisions in (["bf16", "fp32"], ["fp32", "bf16"]):
        with Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="static-fp32") as ctl:
            ctl.engine.set_precisions(precisions)
            with ctl.autocast():
                compiled, eager = forward(x), model(x)
            torch.testing.assert_close(compiled, eager)
            dtypes.append(compiled.dtype)
    assert dtypes == [torch.float32, torch.bfloat16]


class _WithFp32Regions(nn.Module):
    """A GRU and a PReLU: non-controllable layers that run in fp32 regions of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.gru, self.prelu, self.head = (
            nn.Linear(6, 8),
            nn.GRU(8, 8, batch_first=True),
            nn.PReLU(),
            nn.Linear(8, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.prelu(self.gru(self.fc(x))[0][:, -1]))


def test_a_compiled_model_with_fp32_regions_computes_as_the_eager_one_and_settles():
    """Before the fix, a compiled model with an RNN raised "'autocast' object has no attribute 'prev'" under any 16-bit
    map: Dynamo runs the RNN's call eagerly but compiled its hooks' frames, so the region was entered in traced code."""
    torch.manual_seed(0)
    model = _WithFp32Regions().to(DEVICE)
    forward = torch.compile(model, backend=BACKEND)
    torch._dynamo.reset()
    counters.clear()
    with Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="static-fp32") as ctl:
        for precisions in (["bf16", "bf16"], ["fp32", "bf16"]):
            ctl.engine.set_precisions(precisions)
            graphs = []
            for _ in range(3):
                x = torch.randn(4, 5, 6, device=DEVICE)
                with ctl.autocast():
                    compiled, eager = forward(x), model(x)
                assert compiled.dtype == eager.dtype == torch.bfloat16
                torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
                graphs.append(counters["stats"]["unique_graphs"])
            assert graphs[1:] == [graphs[0]] * 2, (precisions, graphs)  # compiled at the map's first step only


def test_a_compiled_layer_inside_the_models_own_fp32_block_computes_in_fp32_as_the_eager_one():
    """The pre-hook reads the autocast state in the traced frame, which Dynamo keeps as it traces the model's block.
    A compiled forward reads the 16-bit weight copies: before the fix, the router read one inside the block under a
    uniform map (and raised), and computed in 16 bits under a mixed one."""
    from test_precision import _copies_of, _Island

    from triaccel_rl.precision import LayerPrecision

    torch.manual_seed(0)
    model = _Island(DEVICE.type).to(DEVICE)
    lp = LayerPrecision(model, DEVICE.type)
    lp.use_weight_copies(_copies_of(model, lp))
    lp.copies_in_eager = False  # the eager forward casts its weights; the compiled one reads the copies
    forward = torch.compile(model, backend=BACKEND)
    for precisions in (["bf16", "bf16", "bf16"], ["bf16", "bf16", "fp32"], ["fp16", "bf16", "fp16"]):
        lp.set(precisions)
        x = torch.randn(2, 8, device=DEVICE)
        with lp.context():
            (compiled_head, compiled_routes), (eager_head, eager_routes) = forward(x), model(x)
        assert compiled_routes.dtype == eager_routes.dtype == torch.float32, precisions
        # an fp16 head under a map with bf16 layers hands its result on in fp32 (compiled as eager)
        handed_up = precisions[2] == "fp16" and "bf16" in precisions
        assert compiled_head.dtype == eager_head.dtype == (torch.float32 if handed_up else lp.precisions[2].dtype)
        torch.testing.assert_close(compiled_routes, eager_routes, rtol=0, atol=0)
        torch.testing.assert_close(compiled_head, eager_head, rtol=0, atol=0)
