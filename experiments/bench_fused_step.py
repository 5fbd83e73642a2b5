"""Times the fused optimizer step (stats + update + low-precision copy) against the unfused PyTorch path.

For each parameter set (ResNet-18 shapes, ~11.2M elements; GPT-2 small shapes, ~124M) and each optimizer
(SGD with Nesterov momentum, AdamW) it measures, with ``triton.testing.do_bench`` (median):

(a) fused: ``FusedSGD``/``FusedAdamW.step`` over a ``FlatParameterStore``, half the layers in bf16 so their
    copies are written, per-layer statistics emitted, loss-scale unscale and overflow skip included;
(b) unfused: the same work in stock PyTorch: ``torch._amp_foreach_non_finite_check_and_unscale_``
    (GradScaler's unscale + overflow check), ``torch.optim.AdamW(fused=True)`` or
    ``torch.optim.SGD(foreach=True)``, ``torch._foreach_copy_`` into bf16 copies of the same layers, and
    per-tensor statistics (``torch._foreach_norm`` with ord 2 and inf, and a non-finite count per tensor
    as the 0-norm of ``0 * g``, all multi-tensor ops without a Python loop over the tensors);
(c) the device's copy bandwidth, ``dst.copy_(src)`` on a large buffer, counting bytes read + written.

Bytes per element the fused step moves (``bytes_moved``): the stats pass reads g (4 B); the AdamW update
reads p, g, m, v (16 B) and writes p, m, v (12 B); the SGD-with-momentum update reads p, g, buf (12 B) and
writes p, buf (8 B); bf16 layers add a 2 B write. So AdamW 32 B (+2), SGD 24 B (+2), over the flat buffer
including its per-layer padding. The floor any fused step must move (``bytes_floor``) reads g once and
skips padding: AdamW 28 B (+2), SGD 20 B (+2) per parameter element. ``achieved_GBps`` is
``bytes_moved / fused_ms``; ``bandwidth_frac`` divides it by the measured copy bandwidth. ``fused_wall_ms``
is the wall-clock time per step of 50 back-to-back steps, host overhead included (at ~11M elements the
Python and launch overhead, ~0.1-0.2 ms a step, is comparable to the GPU time); ``unfused_parts_ms``
times each part of the unfused path alone. ``minimal_unfused_ms`` runs the unfused path without its
statistics part (its non-finite count is the slow part), and ``speedup_vs_minimal`` is the fused step's
speed-up over that: a lower bound, since the fused step still computes its statistics.

Usage (GPU): ``python experiments/bench_fused_step.py`` (add ``--sweep`` to time block sizes and warps).
Smoke test (CPU, tiny sizes, PyTorch reference path, timings meaningless):
``python experiments/bench_fused_step.py --smoke --output /tmp/fused_step.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from triaccel_rl.kernels import (
    FlatParameterStore,
    FusedAdamW,
    FusedSGD,
    StatRow,
    cast_to_low_precision,
    fused_adamw_step_reference,
    fused_sgd_step_reference,
    layer_grad_stats_reference,
    new_step_state,
)
from triaccel_rl.kernels._common import GPU_LAUNCH_CONFIGS

from triaccel_rl.compare import json_safe
from triaccel_rl.experiment import away_from_results, command_line, cpu_machine, file_to_write, git_commit, parse_args

LayerShapes = list[list[tuple[int, ...]]]

SGD_HYPER: dict[str, Any] = {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
ADAMW_HYPER: dict[str, Any] = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


@dataclass
class Args:
    """Command-line arguments; each field is a ``--flag`` (underscores become dashes)."""

    smoke: bool = False
    """Run tiny parameter sets on the CPU through the PyTorch reference path (timings are meaningless)."""
    check: bool = True
    """Before timing, verify the kernels against the references (bit-exact casts, update within tolerance)
    and print PASS/FAIL; use --no-check to skip."""
    sets: str = "resnet18,gpt2_124m"
    """Comma-separated parameter sets: resnet18 (~11.2M elements), gpt2_124m (~124M)."""
    optimizers: str = "sgd,adamw"
    """Comma-separated optimizers to time: sgd (Nesterov momentum), adamw."""
    warmup_ms: float = 50.0
    """do_bench warm-up budget per measurement, in ms (compilation happens before it)."""
    rep_ms: float = 300.0
    """do_bench timing budget per measurement, in ms."""
    copy_mib: int = 2048
    """Size of the buffer copied to measure device bandwidth, in MiB (several times the L2 cache)."""
    block_size: int = 0
    """Elements per program of the update kernel; 0 for the tuned default (GPU_LAUNCH_CONFIGS)."""
    num_warps: int = 0
    """Warps per program of the update kernel; 0 for the tuned default."""
    decay_groups: bool = False
    """The usual weight-decay recipe: no decay on 1-dim parameters (biases, norms). The fused store puts them in
    segments of their own (``FlatParameterStore(groups=...)``) and the kernels read the decay per segment; the
    unfused path gets the same two param groups."""
    sweep: bool = False
    """Also time the fused step with the update kernel at every block size in {1024, 2048, 4096} and warps
    in {4, 8, 16} (the statistics pass keeps its default)."""
    output: str = "experiments/results/fused_step.json"
    """Where to write the JSON rows."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, __doc__.splitlines()[0] if __doc__ else None)
    if args.smoke:
        # The smoke run exercises the CPU reference path; the interpreter would be slow and is tested elsewhere.
        os.environ.pop("TRITON_INTERPRET", None)
        # One thread: on a small shared CI machine, torch's intra-op threads mostly wait on each other.
        torch.set_num_threads(1)
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; run with --smoke for a CPU smoke test", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    sets = parameter_sets(args.smoke)
    unknown_sets = [name for name in args.sets.split(",") if name not in sets]
    unknown_optimizers = [name for name in args.optimizers.split(",") if f"{name}_step" not in GPU_LAUNCH_CONFIGS]
    if unknown_sets or unknown_optimizers:  # before, a KeyError after the first set's rows, and no file written
        raise SystemExit(
            f"--sets {args.sets!r} / --optimizers {args.optimizers!r}: unknown "
            f"{', '.join(map(repr, unknown_sets + unknown_optimizers))}; sets: {', '.join(sets)}; optimizers: "
            f"{', '.join(k.removesuffix('_step') for k in GPU_LAUNCH_CONFIGS if k.endswith('_step'))}"
        )
    # Checked now: a folder was found only when the rows were written, after every measurement. A smoke run leaves
    # the recorded GPU results alone (it replaced them with 4 CPU rows).
    try:
        output = file_to_write(
            "--output", away_from_results("--output", args.output, Args.output) if args.smoke else args.output
        )
    except ValueError as err:
        raise SystemExit(str(err)) from None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_machine()
    launch = {kernel: config for kernel, config in GPU_LAUNCH_CONFIGS.items() if kernel != "cast"}
    print(f"device {device_name}, torch {torch.__version__}, default (block_size, num_warps): {launch}")
    if args.block_size or args.num_warps:
        block, warps = args.block_size or "default", args.num_warps or "default"
        print(f"update kernels run with block_size {block}, num_warps {warps}")

    check_status = "skipped"
    if args.check:
        check_status = "PASS" if run_checks(device, args) else "FAIL"
        print(f"check: {check_status}")

    copy_gbps = measure_copy_bandwidth(device, args)
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s (read + write)")

    rows = []
    for set_name in args.sets.split(","):
        layers = sets[set_name]
        for optimizer in args.optimizers.split(","):
            row = bench_one(device, set_name, layers, optimizer, copy_gbps, args)
            row.update(
                device=device_name,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=git_commit(),
                command=command_line("experiments/bench_fused_step.py", args),
                check=check_status,
                torch=torch.__version__,
                triton=_triton_version(),
            )
            rows.append(row)
            if args.sweep and not args.smoke:
                sweep_configs(device, layers, optimizer, args)

    output.write_text(json.dumps(json_safe(rows), indent=2, allow_nan=False) + "\n")
    _print_table(rows, copy_gbps)
    print(f"wrote {len(rows)} rows to {output}")
    return 0 if check_status != "FAIL" else 1


# ---------------------------------------------------------------------------------------------------------
# Parameter sets


def parameter_sets(smoke: bool) -> dict[str, LayerShapes]:
    """Layer shapes of each parameter set: one inner list per module (weight and bias together)."""
    if smoke:
        return {"resnet18": _resnet18_layers(width=4, num_classes=10), "gpt2_124m": _gpt2_layers(64, 2, 500, 64)}
    return {"resnet18": _resnet18_layers(width=64, num_classes=10), "gpt2_124m": _gpt2_layers(768, 12, 50257, 1024)}


def _resnet18_layers(width: int, num_classes: int) -> LayerShapes:
    """ResNet-18 (CIFAR head) modules: convs (no bias), batch norms (weight, bias), the classifier."""
    layers: LayerShapes = [[(width, 3, 7, 7)], [(width,), (width,)]]
    in_channels = width
    for stage, channels in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for block in range(2):
            downsample = block == 0 and stage > 0
            layers += [[(channels, in_channels, 3, 3)], [(channels,), (channels,)]]
            layers += [[(channels, channels, 3, 3)], [(channels,), (channels,)]]
            if downsample:
                layers += [[(channels, in_channels, 1, 1)], [(channels,), (channels,)]]
            in_channels = channels
    layers.append([(num_classes, in_channels), (num_classes,)])
    return layers


def _gpt2_layers(width: int, n_blocks: int, vocab: int, context: int) -> LayerShapes:
    """GPT-2 modules: embeddings, per block two layer norms, attention and MLP linears; the final norm."""
    layers: LayerShapes = [[(vocab, width)], [(context, width)]]
    for _ in range(n_blocks):
        layers += [
            [(width,), (width,)],
            [(width, 3 * width), (3 * width,)],
            [(width, width), (width,)],
            [(width,), (width,)],
            [(width, 4 * width), (4 * width,)],
            [(4 * width, width), (width,)],
        ]
    layers.append([(width,), (width,)])
    return layers


# ---------------------------------------------------------------------------------------------------------
# Measurements


def bench_one(
    device: torch.device, set_name: str, layers: LayerShapes, optimizer: str, copy_gbps: float, args: Args
) -> dict[str, Any]:
    """Times the fused and the unfused step on one parameter set; returns the JSON row."""
    codes = [1 if i % 2 else 0 for i in range(len(layers))]  # half the layers in bf16
    fused_step, store = _make_fused(
        device, layers, optimizer, codes, args.block_size, args.num_warps, decay_groups=args.decay_groups
    )
    fused_ms = _time_ms(fused_step, device, args)
    fused_wall_ms = _wall_ms(fused_step, device)
    n_params = sum(store.layer_numels)
    n_padded = store.n_elements
    bf16_padded = sum(length for length, code in zip(store.layer_lengths, codes, strict=True) if code)
    del fused_step, store
    parts = _make_unfused(device, layers, optimizer, codes, decay_groups=args.decay_groups)

    def unfused_step() -> None:
        for part in parts.values():
            part()

    def minimal_unfused_step() -> None:
        for name, part in parts.items():
            if name != "stats":
                part()

    unfused_ms = _time_ms(unfused_step, device, args)
    minimal_unfused_ms = _time_ms(minimal_unfused_step, device, args)
    unfused_parts_ms = {name: _time_ms(part, device, args) for name, part in parts.items()}
    parts.clear()  # frees the unfused path's tensors before the next set
    if device.type == "cuda":
        torch.cuda.empty_cache()

    bf16_params = sum(_numel(layer) for layer, code in zip(layers, codes, strict=True) if code)
    moved_per_elem, floor_per_elem = (32, 28) if optimizer == "adamw" else (24, 20)
    bytes_moved = moved_per_elem * n_padded + 2 * bf16_padded
    bytes_floor = floor_per_elem * n_params + 2 * bf16_params
    achieved_gbps = bytes_moved / (fused_ms * 1e-3) / 1e9
    floor_ms = bytes_floor / (copy_gbps * 1e9) * 1e3
    print(
        f"{set_name:>10} {optimizer:>5}: fused {fused_ms:.3f} ms, unfused {unfused_ms:.3f} ms, "
        f"{unfused_ms / fused_ms:.2f}x, {achieved_gbps:.0f} GB/s ({achieved_gbps / copy_gbps:.0%} of copy)"
    )
    return {
        "set": set_name,
        "n_elements": n_params,
        "n_padded_elements": n_padded,
        "n_layers": len(layers),
        "optimizer": optimizer,
        "decay_groups": args.decay_groups,
        "fused_ms": fused_ms,
        "fused_wall_ms": fused_wall_ms,
        "unfused_ms": unfused_ms,
        "unfused_parts_ms": unfused_parts_ms,
        "speedup": unfused_ms / fused_ms,
        "minimal_unfused_ms": minimal_unfused_ms,
        "speedup_vs_minimal": minimal_unfused_ms / fused_ms,
        "achieved_GBps": achieved_gbps,
        "copy_GBps": copy_gbps,
        "bandwidth_frac": achieved_gbps / copy_gbps,
        "bytes_moved": bytes_moved,
        "bytes_floor": bytes_floor,
        "floor_ms": floor_ms,
        "floor_frac": floor_ms / fused_ms,
        "block_size": args.block_size or GPU_LAUNCH_CONFIGS[f"{optimizer}_step"][0],
        "num_warps": args.num_warps or GPU_LAUNCH_CONFIGS[f"{optimizer}_step"][1],
    }


def measure_copy_bandwidth(device: torch.device, args: Args) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n_bytes = (1 if args.smoke else args.copy_mib) * 2**20
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, args)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def sweep_configs(device: torch.device, layers: LayerShapes, optimizer: str, args: Args) -> None:
    """Prints the fused step's time for each block size and warp count (not written to the JSON)."""
    codes = [1 if i % 2 else 0 for i in range(len(layers))]
    print(f"  sweep ({optimizer}, {_numel_all(layers) / 1e6:.1f}M): block_size x num_warps -> ms")
    for block_size in (1024, 2048, 4096):
        cells = []
        for num_warps in (4, 8, 16):
            step, _ = _make_fused(device, layers, optimizer, codes, block_size, num_warps)
            cells.append(f"{num_warps:>2}w {_time_ms(step, device, args):.3f}")
            del step
        print(f"    {block_size:>5}: " + "  ".join(cells))


def _make_fused(
    device: torch.device,
    layers: LayerShapes,
    optimizer: str,
    codes: list[int],
    block_size: int,
    num_warps: int,
    decay_groups: bool = False,
) -> tuple[Callable[[], object], FlatParameterStore]:
    """A closure running one fused step, and its store (random weights and grads)."""
    params = [[torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in layer] for layer in layers]
    # With decay_groups: group 0 decays, group 1 (1-dim parameters) does not.
    groups = [[int(len(s) <= 1) for s in layer] for layer in layers] if decay_groups else None
    store = FlatParameterStore(params, groups=groups)
    store.grads.normal_()  # the padding too: harmless for timing
    hyper = dict(ADAMW_HYPER if optimizer == "adamw" else SGD_HYPER)
    if decay_groups:
        hyper["weight_decay"] = (hyper["weight_decay"], 0.0)
    opt: FusedSGD | FusedAdamW
    if optimizer == "adamw":
        opt = FusedAdamW(store, block_size=block_size or None, num_warps=num_warps or None, **hyper)
    else:
        opt = FusedSGD(store, block_size=block_size or None, num_warps=num_warps or None, **hyper)
    lr_factors = torch.ones(len(layers), device=device)
    precision_codes = torch.tensor(codes, dtype=torch.int32, device=device)
    inv_scale = torch.ones((), device=device)  # 1.0 keeps repeated steps on the same data finite
    return lambda: opt.step(1e-3, lr_factors, precision_codes, inv_scale), store


def _make_unfused(
    device: torch.device, layers: LayerShapes, optimizer: str, codes: list[int], decay_groups: bool = False
) -> dict[str, Callable[[], object]]:
    """The fused step's work in stock PyTorch multi-tensor ops, as named parts to run in order."""
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for layer in layers for s in layer]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    decay = ADAMW_HYPER["weight_decay"] if optimizer == "adamw" else SGD_HYPER["weight_decay"]
    param_groups: list[dict[str, Any]] = [{"params": params, "weight_decay": decay}]
    if decay_groups:  # the same two groups as the fused store's
        param_groups = [
            {"params": [p for p in params if p.dim() > 1], "weight_decay": decay},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
        ]
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        betas = (ADAMW_HYPER["beta1"], ADAMW_HYPER["beta2"])
        fused = device.type == "cuda"  # fused AdamW needs CUDA in older torch versions
        opt = torch.optim.AdamW(param_groups, lr=1e-3, betas=betas, eps=1e-8, fused=fused)
    else:
        sgd = {key: value for key, value in SGD_HYPER.items() if key != "weight_decay"}
        opt = torch.optim.SGD(param_groups, lr=1e-3, foreach=True, **sgd)
    copy_src: list[torch.Tensor] = [
        p for layer, code in zip(_split(params, layers), codes, strict=True) if code for p in layer
    ]
    copy_dst = [torch.empty_like(p, dtype=torch.bfloat16) for p in copy_src]
    found_inf = torch.zeros(1, device=device)
    inv_scale = torch.ones(1, device=device)  # 1.0 keeps repeated unscaling on the same data unchanged

    @torch.no_grad()
    def unscale_and_check() -> None:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)

    @torch.no_grad()
    def bf16_copy() -> None:
        torch._foreach_copy_(copy_dst, copy_src)

    @torch.no_grad()
    def stats() -> None:
        torch._foreach_norm(grads)  # per-tensor L2 norm (its square is the sum of squares)
        torch._foreach_norm(grads, float("inf"))  # per-tensor abs max, without _foreach_abs temporaries
        # Per-tensor non-finite count without a Python loop: 0 * g is NaN exactly where g is inf or NaN,
        # and the 0-"norm" counts the non-zero (NaN included) elements.
        torch._foreach_norm(torch._foreach_mul(grads, 0.0), 0)

    return {"unscale_and_check": unscale_and_check, "optimizer_step": opt.step, "bf16_copy": bf16_copy, "stats": stats}


def _wall_ms(fn: Callable[[], object], device: torch.device, n_steps: int = 50) -> float:
    """Wall-clock time per call of ``fn`` back to back, host overhead included (GPU time may hide under it)."""
    fn()  # warm-up, excluded
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n_steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()  # host-device sync: the last step must have finished
    return (time.perf_counter() - start) / n_steps * 1e3


def _time_ms(fn: Callable[[], object], device: torch.device, args: Args) -> float:
    """Median time of ``fn`` in ms: do_bench on a GPU (warm-up excluded), perf_counter on the CPU."""
    if device.type == "cuda":
        import triton.testing

        fn()  # compile outside the timed region
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))
    fn()  # warm-up, excluded
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------
# Correctness check before timing


def run_checks(device: torch.device, args: Args) -> bool:
    """Compares the kernels on ``device`` with the references; prints one PASS/FAIL line per check."""
    results = {"cast bit-exact": _check_cast(device)}
    for optimizer in ("sgd", "adamw"):
        update_ok, skip_ok = _check_step(device, optimizer, args)
        results[f"{optimizer} update vs reference"] = update_ok
        results[f"{optimizer} skip leaves state unchanged"] = skip_ok
    for name, ok in results.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    return all(results.values())


def _check_cast(device: torch.device) -> bool:
    """Bit-exactness of the cast kernel against Tensor.to on special values and random bit patterns."""
    special = torch.tensor(
        [0.0, -0.0, 1e-45, -1e-45, 2.0**-24, 2.0**-25, 3 * 2.0**-25, 2.0**-14, 65504.0, 65519.99, 65520.0,
         1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.4028234663852886e38, float("inf"), float("-inf"), float("nan")],
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    n = 1 << 16 if device.type == "cpu" else 1 << 24
    bits = torch.randint(-(2**31), 2**31, (n,), generator=generator, dtype=torch.int64).to(torch.int32)
    x = torch.cat([special, bits.view(torch.float32)]).to(device)
    ok = True
    for dtype in (torch.bfloat16, torch.float16):
        got = cast_to_low_precision(x, dtype).view(torch.int16)
        n_bad = int((got != x.to(dtype).view(torch.int16)).sum())
        if n_bad:
            print(f"    cast to {dtype}: {n_bad} of {x.numel()} bit patterns differ from Tensor.to")
            ok = False
    return ok


def _check_step(device: torch.device, optimizer: str, args: Args) -> tuple[bool, bool]:
    """Three fused steps against the reference functions on an awkward layout, then a NaN step."""
    layers: list[list[tuple[int, ...]]] = [[(1,)], [(4095,)], [(300, 301), (7,)], [(3,)] * 5, [(1000, 1001)]]
    rtol, atol = 1e-5, 1e-6
    params = [[torch.nn.Parameter(torch.randn(s, device=device)) for s in layer] for layer in layers]
    groups = [[int(len(s) <= 1) for s in layer] for layer in layers] if args.decay_groups else None
    store = FlatParameterStore(params, groups=groups)
    hyper = dict(ADAMW_HYPER if optimizer == "adamw" else SGD_HYPER)
    if args.decay_groups:
        hyper["weight_decay"] = (hyper["weight_decay"], 0.0)
    opt: FusedSGD | FusedAdamW
    if optimizer == "adamw":
        opt = FusedAdamW(store, block_size=args.block_size or None, num_warps=args.num_warps or None, **hyper)
        ref_states = [torch.zeros_like(store.params), torch.zeros_like(store.params)]
        ref_step_state = new_step_state(device, ADAMW_HYPER["beta1"], ADAMW_HYPER["beta2"], n_layers=store.n_layers)
    else:
        opt = FusedSGD(store, block_size=args.block_size or None, num_warps=args.num_warps or None, **hyper)
        ref_states = [torch.zeros_like(store.params)]
        ref_step_state = new_step_state(device, n_layers=store.n_layers)
    hyper["weight_decay"] = opt.kernel_weight_decay()  # the references take it per segment
    ref_params = store.params.clone()
    ref_bf16, ref_fp16 = store.bf16_copy.clone(), store.fp16_copy.clone()
    factors = torch.linspace(0.5, 1.5, len(layers), device=device)
    update_ok = True
    for step in range(3):
        codes = torch.tensor([(step + i) % 3 for i in range(len(layers))], dtype=torch.int32, device=device)
        store.grads.normal_().mul_(256.0)
        momentum_before = ref_states[0].clone()
        result = opt.step(1e-2, factors, codes, inv_scale=1 / 256)
        ref_stats = layer_grad_stats_reference(store.grads, store.chunk_layer, len(layers), 1 / 256)
        common = (ref_bf16, ref_fp16, store.chunk_layer, factors, codes, ref_stats, ref_step_state)
        if optimizer == "adamw":
            fused_adamw_step_reference(ref_params, store.grads, *ref_states, *common, lr=1e-2, inv_scale=1 / 256,
                                       **hyper)  # fmt: skip
            states = [opt.exp_avg, opt.exp_avg_sq]
        else:
            fused_sgd_step_reference(ref_params, store.grads, *ref_states, *common, lr=1e-2, inv_scale=1 / 256,
                                     **hyper)  # fmt: skip
            states = [opt.momentum_buffer]
        named = [("params", store.params, ref_params)]
        named += [(f"state {i}", got, want) for i, (got, want) in enumerate(zip(states, ref_states, strict=True))]
        for name, got, want in named:
            err = float(((got - want).abs() - rtol * want.abs()).max())
            if err > atol:
                print(f"    {optimizer} step {step} {name}: error {err:.3g} beyond rtol {rtol} + atol {atol}")
                update_ok = False
        stats_err = _stats_error(result.stats, ref_stats, store, store.grads / 256, momentum_before)
        if stats_err > 1.0:
            print(f"    {optimizer} step {step} stats: error {stats_err:.3g} x the tolerance")
            update_ok = False
        for layer, code in enumerate(codes.tolist()):
            if code:
                buffer = store.bf16_copy if code == 1 else store.fp16_copy
                segment = store.layer_segment(buffer, layer)
                want_copy = store.layer_segment(store.params, layer).to(buffer.dtype)
                if not torch.equal(segment.view(torch.int16), want_copy.view(torch.int16)):
                    print(f"    {optimizer} step {step} layer {layer}: {buffer.dtype} copy differs from params.to")
                    update_ok = False
        ref_params.copy_(store.params)  # compare each step from the same starting point
        for got, want in zip(states, ref_states, strict=True):
            want.copy_(got)

    before = [t.clone() for t in (store.params, store.bf16_copy, store.fp16_copy, *states)]
    count_before = opt.step_count.clone()
    store.grads[store.n_elements // 2] = float("nan")
    result = opt.step(1e-2, factors, codes, inv_scale=1 / 256)
    after = (store.params, store.bf16_copy, store.fp16_copy, *states)
    skip_ok = bool(result.skipped) and all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    skip_ok = skip_ok and torch.equal(opt.step_count, count_before)
    skip_ok = skip_ok and int(result.stats.view(torch.int32)[StatRow.NONFINITE_TOTAL, 0]) == 1
    return update_ok, skip_ok


def _stats_error(
    got: torch.Tensor, want: torch.Tensor, store: FlatParameterStore, grads: torch.Tensor, momentum_before: torch.Tensor
) -> float:
    """Largest statistics error in units of its tolerance (<= 1 passes).

    Counts and maxima must match exactly; a float sum may differ by 1e-5 of the sum of its absolute terms
    (float32 sums in another order differ by a few ulps of that, not of a possibly cancelling total).
    """
    bits_got, bits_want = got.view(torch.int32), want.view(torch.int32)
    for row in (StatRow.GRAD_NONFINITE, StatRow.NONFINITE_TOTAL, StatRow.GRAD_ABS_MAX):
        if not torch.equal(bits_got[row], bits_want[row]):
            return float("inf")
    layer = store.chunk_layer.long()

    def per_layer(values: torch.Tensor) -> torch.Tensor:
        segments = values.double().view(-1, store.segment_align).sum(dim=1)
        return torch.zeros(store.n_layers, dtype=torch.float64, device=values.device).index_add_(0, layer, segments)

    g = grads.double()
    scales = {
        StatRow.GRAD_SQ_SUM: per_layer(g * g),
        StatRow.GRAD_SUM: per_layer(g.abs()),
        StatRow.GRAD_DOT_MOMENTUM: per_layer((g * momentum_before.double()).abs()),
        StatRow.MOMENTUM_SQ_SUM: want[StatRow.MOMENTUM_SQ_SUM].double(),
        StatRow.SECOND_MOMENT_SUM: want[StatRow.SECOND_MOMENT_SUM].double(),
    }
    worst = 0.0
    for row, scale in scales.items():
        err = (got[row].double() - want[row].double()).abs()
        worst = max(worst, float((err / (1e-5 * scale + 1e-30)).max()))
    return worst


# ---------------------------------------------------------------------------------------------------------
# Plumbing


def _triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except ImportError:
        return "none"


def _numel(layer: list[tuple[int, ...]]) -> int:
    return sum(int(torch.Size(s).numel()) for s in layer)


def _numel_all(layers: LayerShapes) -> int:
    return sum(_numel(layer) for layer in layers)


def _padded_elements(layers: LayerShapes) -> int:
    """Flat-buffer length of ``layers`` in a ``FlatParameterStore`` (padding included), without allocating."""
    from triaccel_rl.kernels._common import PARAM_ALIGN_ELEMENTS, SEGMENT_ALIGN_ELEMENTS

    total = 0
    for layer in layers:
        inner = sum(-(-int(torch.Size(s).numel()) // PARAM_ALIGN_ELEMENTS) * PARAM_ALIGN_ELEMENTS for s in layer)
        total += max(-(-inner // SEGMENT_ALIGN_ELEMENTS), 1) * SEGMENT_ALIGN_ELEMENTS
    return total


def _split(params: list[torch.nn.Parameter], layers: LayerShapes) -> list[list[torch.nn.Parameter]]:
    """Groups a flat parameter list back into ``layers``' structure."""
    out, start = [], 0
    for layer in layers:
        out.append(params[start : start + len(layer)])
        start += len(layer)
    return out


def _print_table(rows: list[dict[str, Any]], copy_gbps: float) -> None:
    header = (
        f"{'set':>10} {'opt':>5} {'elements':>12} {'fused ms':>9} {'wall ms':>8} {'unfused ms':>10} {'speedup':>7} "
        f"{'vs min':>7} {'GB/s':>6} {'of copy':>7} {'floor ms':>8}"
    )
    print("\n" + header)
    for r in rows:
        print(
            f"{r['set']:>10} {r['optimizer']:>5} {r['n_elements']:>12,} {r['fused_ms']:>9.3f} "
            f"{r['fused_wall_ms']:>8.3f} {r['unfused_ms']:>10.3f} {r['speedup']:>6.2f}x "
            f"{r['speedup_vs_minimal']:>6.2f}x {r['achieved_GBps']:>6.0f} "
            f"{r['bandwidth_frac']:>7.0%} {r['floor_ms']:>8.3f}"
        )
    print(f"copy bandwidth {copy_gbps:.0f} GB/s (read + write); unfused parts (ms):")
    for r in rows:
        parts = ", ".join(f"{name} {ms:.3f}" for name, ms in r["unfused_parts_ms"].items())
        print(f"  {r['set']:>10} {r['optimizer']:>5}: {parts}")


if __name__ == "__main__":
    sys.exit(main())
