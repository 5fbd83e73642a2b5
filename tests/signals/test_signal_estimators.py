"""Exactness of the signal estimators against answers computed exactly (CPU, float64 where it matters)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from triaccel_rl.engine import StepEngine
from triaccel_rl.signals import (
    curvature_lr_factors,
    curvature_sparsity,
    frozen_batch_stats,
    gradient_moments,
    hutchinson,
)

N_PROBES = 3000
"""Probes for the 5% trace test. For this model and batch, 4 standard errors of the per-layer estimate fit in
5% of the exact trace from 2976 probes on (the test recomputes this bound from the exact Hessian)."""


def gelu_mlp() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)).double()


def layers_of(model: nn.Sequential) -> list[list[nn.Parameter]]:
    return [list(model[0].parameters()), list(model[2].parameters())]


def classification_batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (n,), generator=generator)


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        params = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hessian(loss_of, flat)


def layer_slices(model: nn.Sequential) -> list[slice]:
    sizes = [sum(p.numel() for p in params) for params in layers_of(model)]
    bounds = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def probe_std(hessian: torch.Tensor, block: slice) -> float:
    """Standard deviation of one Rademacher probe's ``v_l . (H v)_l``: ``sqrt(sum_{i in l, j != i} c_ij H_ij^2)``.

    A pair inside the layer appears twice (``H_ij v_i v_j + H_ji v_j v_i``), hence coefficient 4 per
    unordered pair; a pair with ``j`` outside the layer appears once.
    """
    rows = hessian[block]
    inside = rows[:, block].clone()
    inside.fill_diagonal_(0)
    outside_sq = rows.square().sum() - rows[:, block].square().sum()
    return math.sqrt(float(2 * inside.square().sum() + outside_sq))


# ---------------------------------------------------------------- Hutchinson


def test_hutchinson_trace_within_5_percent_of_exact_per_layer() -> None:
    model = gelu_mlp()
    x, y = classification_batch(seed=4)
    hessian = exact_hessian(model, x, y)
    loss = nn.functional.cross_entropy(model(x), y)
    estimate = hutchinson(loss, layers_of(model), N_PROBES, generator=torch.Generator().manual_seed(1))
    for layer, block in enumerate(layer_slices(model)):
        exact = float(hessian[block, block].diagonal().sum())
        standard_error = probe_std(hessian, block) / math.sqrt(N_PROBES)
        assert 4 * standard_error <= 0.05 * abs(exact), f"layer {layer}: {N_PROBES} probes are too few for 5%"
        measured = float(estimate.trace[layer])
        error = abs(measured - exact) / abs(exact)
        assert error <= 0.05, f"layer {layer}: Hutchinson {measured:.5f} vs exact {exact:.5f} ({100 * error:.2f}%)"
    assert estimate.used.tolist() == [True, True]


def test_hutchinson_unbiased_mean_over_seeds_converges() -> None:
    model = gelu_mlp()
    x, y = classification_batch()
    hessian = exact_hessian(model, x, y)
    layers = layers_of(model)
    n_seeds = 2000
    samples = []
    for seed in range(n_seeds):  # one probe per seed: the estimator's own distribution
        loss = nn.functional.cross_entropy(model(x), y)
        samples.append(hutchinson(loss, layers, 1, generator=torch.Generator().manual_seed(seed)).trace.numpy())
    values = np.array(samples)
    for layer, block in enumerate(layer_slices(model)):
        exact = float(hessian[block, block].diagonal().sum())
        std = probe_std(hessian, block)
        # The running mean's error shrinks like 1/sqrt(n): within 4 standard errors at every checkpoint.
        for n in (100, 500, 2000):
            error = abs(values[:n, layer].mean() - exact)
            assert error <= 4 * std / math.sqrt(n), f"layer {layer}, {n} seeds: error {error:.4g}, sd {std:.4g}"
        # And the sample standard deviation matches the one computed from the exact Hessian.
        assert values[:, layer].std() == pytest.approx(std, rel=0.1)


def test_hutchinson_diagonal_unbiased() -> None:
    model = gelu_mlp()
    x, y = classification_batch()
    hessian = exact_hessian(model, x, y)
    loss = nn.functional.cross_entropy(model(x), y)
    estimate = hutchinson(loss, layers_of(model), N_PROBES, generator=torch.Generator().manual_seed(2), diagonal=True)
    assert estimate.diagonal is not None
    measured = torch.cat(estimate.diagonal).double()
    exact = hessian.diagonal()
    # Per element: v_i (H v)_i = H_ii + sum_{j != i} H_ij v_i v_j, variance sum_{j != i} H_ij^2.
    off = hessian.clone()
    off.fill_diagonal_(0)
    standard_error = off.square().sum(1).sqrt() / math.sqrt(N_PROBES)
    assert torch.all((measured - exact).abs() <= 4.5 * standard_error + 1e-12)
    torch.testing.assert_close(measured.sum(), torch.as_tensor(float(estimate.trace.sum()), dtype=torch.float64))


def test_hutchinson_exact_for_diagonal_hessian() -> None:
    # loss = sum_i a_i w_i^2 / 2 has H = diag(a): every probe gives the exact trace (no cross terms).
    w = nn.Parameter(torch.ones(5, dtype=torch.float64))
    b = nn.Parameter(torch.ones(3, dtype=torch.float64))
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    loss = 0.5 * (a * w.square()).sum() + 0.5 * 7.0 * b.square().sum()
    estimate = hutchinson(loss, [[w], [b]], 3, diagonal=True)
    assert estimate.trace.tolist() == [15.0, 21.0]
    assert estimate.diagonal is not None
    assert estimate.diagonal[0].tolist() == a.tolist()


def test_hutchinson_over_every_sign_vector_is_exact_and_its_variance_is_the_documented_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exact, not statistical: a quadratic ``p^T A p / 2`` over 2 layers of 2 parameters each (H = A, dense), and the
    16 Rademacher vectors enumerated. Their mean is exactly ``tr(A_l)`` and ``diag(A)`` (unbiasedness), and the
    single-probe values' variance is exactly ``2 sum_{i != j in l} A_ij^2 + sum_{i in l, j not in l} A_ij^2``.
    Before the docstring's fix it gave the cross-layer pairs a coefficient 2 as well (14.5 for layer 0, not the exact
    9.25)."""
    a = torch.tensor(
        [[2.0, 1.0, 0.5, -1.0], [1.0, 3.0, 2.0, 0.0], [0.5, 2.0, -1.0, 1.5], [-1.0, 0.0, 1.5, 4.0]], dtype=torch.float64
    )
    w = nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([1.0, 0.5], dtype=torch.float64))
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)), dtype=torch.float64)
    queue = [part for row in signs for part in (row[:2], row[2:])]  # drawn per parameter, in layer order
    monkeypatch.setattr(
        "triaccel_rl.signals.estimators._rademacher", lambda like, generator: queue.pop(0).to(like.dtype)
    )

    def loss() -> torch.Tensor:
        p = torch.cat([w, b])
        return 0.5 * p @ a @ p

    all_of_them = hutchinson(loss(), [[w], [b]], len(signs), diagonal=True)
    assert not queue
    torch.testing.assert_close(all_of_them.trace, torch.tensor([5.0, 3.0], dtype=torch.float64), rtol=0, atol=1e-12)
    assert all_of_them.diagonal is not None
    torch.testing.assert_close(torch.cat(all_of_them.diagonal).double(), a.diagonal(), rtol=0, atol=1e-6)
    queue.extend(part for row in signs for part in (row[:2], row[2:]))
    single = torch.stack([hutchinson(loss(), [[w], [b]], 1).trace for _ in signs])
    variance = single.var(dim=0, unbiased=False)  # over the whole population of probes: exact
    off = a.clone()
    off.fill_diagonal_(0)
    blocks = [slice(0, 2), slice(2, 4)]
    for layer, block in enumerate(blocks):
        inside = off[block, block].square().sum()
        across = a[block].square().sum() - a[block, block].square().sum()
        documented = float(2 * inside + across)
        assert float(variance[layer]) == pytest.approx(documented, rel=1e-12), f"layer {layer}"
    # By hand: inside pairs (0, 1) and (2, 3), 4 * 1^2 and 4 * 1.5^2; across, 0.5^2 + 1^2 + 2^2 + 0^2 for either.
    assert [float(v) for v in variance] == pytest.approx([4.0 + 5.25, 9.0 + 5.25], rel=1e-12)


# ---------------------------------------------------------------- Fisher and noise


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def test_fisher_diagonal_equals_mean_of_per_sample_squared_gradients() -> None:
    model = gelu_mlp()
    x, y = classification_batch(24)
    per_sample = per_sample_grads(model, x, y)
    exact = [
        torch.cat([per_sample[f"{i}.weight"].square().mean(0).reshape(-1), per_sample[f"{i}.bias"].square().mean(0)])
        for i in (0, 2)
    ]

    def closure(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(xb), yb)

    # Micro-batches of one sample: the estimator reduces to mean_i(g_i^2) exactly (up to rounding).
    moments = gradient_moments(closure, x, y, layers_of(model), n_micro=len(x), fisher_diagonal=True)
    assert moments.micro_batch_size == 1
    assert moments.fisher_diagonal is not None
    for layer, (measured, expected) in enumerate(zip(moments.fisher_diagonal, exact, strict=True)):
        torch.testing.assert_close(measured.double(), expected, rtol=1e-5, atol=1e-9, msg=f"layer {layer}")


def test_gradient_moments_equal_their_formulas_over_the_micro_batch_gradients() -> None:
    """Deterministic, not statistical: with ``b = 6``, ``m = 4`` (and 2 samples beyond ``m * b`` left out), each layer's
    estimates equal the documented formulas evaluated on the micro-batch gradients built from per-sample gradients
    (vmap): ``|mean|^2 - sum(s2) / m``, ``b * sum(s2)`` and ``mean^2 + (b - 1/m) s2`` (float32 accumulation)."""
    model = gelu_mlp()
    x, y = classification_batch(26, seed=7)
    per_sample = per_sample_grads(model, x, y)
    b, m = 6, 4

    def closure(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(xb), yb)

    moments = gradient_moments(closure, x, y, layers_of(model), n_micro=m, fisher_diagonal=True)
    assert (moments.micro_batch_size, moments.n_micro) == (b, m)
    assert moments.fisher_diagonal is not None
    for layer, i in enumerate((0, 2)):
        flat = torch.cat([per_sample[f"{i}.weight"].flatten(1), per_sample[f"{i}.bias"]], dim=1)[: m * b]
        micro = flat.reshape(m, b, -1).mean(1)  # the m micro-batch gradients
        mean, s2 = micro.mean(0), micro.var(0, unbiased=True)
        expected = (mean.square().sum() - s2.sum() / m, b * s2.sum(), mean.square() + (b - 1 / m) * s2)
        measured = (moments.grad_sq_norm[layer], moments.trace_cov[layer], moments.fisher_diagonal[layer].double())
        for name, got, want in zip(("grad_sq_norm", "trace_cov", "fisher"), measured, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9, msg=f"layer {layer} {name}")
    with torch.no_grad():
        losses = [float(closure(x[k * b : (k + 1) * b], y[k * b : (k + 1) * b])) for k in range(m)]
    assert float(moments.loss) == pytest.approx(np.mean(losses), rel=1e-6)


def test_fisher_diagonal_unbiased_with_larger_micro_batches() -> None:
    model = gelu_mlp()
    pool_x, pool_y = classification_batch(512, seed=3)
    per_sample = per_sample_grads(model, pool_x, pool_y)
    exact_layer_sums = [
        float(per_sample[f"{i}.weight"].square().mean(0).sum() + per_sample[f"{i}.bias"].square().mean(0).sum())
        for i in (0, 2)
    ]

    def closure(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(xb), yb)

    generator = torch.Generator().manual_seed(4)
    rounds = []
    for _ in range(400):  # i.i.d. draws from the pool (with replacement): micro-batches of 8
        index = torch.randint(0, len(pool_x), (32,), generator=generator)
        moments = gradient_moments(closure, pool_x[index], pool_y[index], layers_of(model), 4, fisher_diagonal=True)
        assert moments.fisher_diagonal is not None
        rounds.append([float(f.sum()) for f in moments.fisher_diagonal])
    values = np.array(rounds)
    mean, standard_error = values.mean(0), values.std(0, ddof=1) / math.sqrt(len(values))
    # Unbiased: within 4 standard errors of the exact sums, a bound under 10% of them (a bias of a micro-batch's
    # Bessel factor, 8/7, would be 14%).
    assert np.all(4 * standard_error < 0.10 * np.array(exact_layer_sums))
    assert np.all(np.abs(mean - exact_layer_sums) <= 4 * standard_error), (mean, exact_layer_sums, standard_error)


def linear_regression(d: int, noise_std: float, seed: int) -> tuple[nn.Linear, torch.Tensor, float]:
    """A linear model at ``w = w* + delta`` (``|delta| = 1``) and the closed-form simple noise scale.

    Data: ``x ~ N(0, I_d)``, ``y = x . w* + noise_std * eps``; loss ``(x . w - y)^2 / 2``. Per-sample gradient
    ``g = x (x . delta - noise_std * eps)``, so ``G = delta`` and, by Isserlis' theorem,
    ``Sigma = (|delta|^2 + noise_std^2) I + delta delta^T``: ``B_simple = tr(Sigma) / |G|^2
    = d (1 + noise_std^2) + 1``.
    """
    generator = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=generator, dtype=torch.float64)
    delta = torch.randn(d, generator=generator, dtype=torch.float64)
    delta /= delta.norm()
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    return model, w_star, d * (1 + noise_std**2) + 1


def regression_data(
    w_star: torch.Tensor, n: int, noise_std: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, len(w_star), generator=generator, dtype=torch.float64)
    return x, x @ w_star + noise_std * torch.randn(n, generator=generator, dtype=torch.float64)


def test_noise_scale_matches_the_closed_form_on_linear_regression() -> None:
    noise_std = 0.5
    model, w_star, expected = linear_regression(d=8, noise_std=noise_std, seed=0)

    def closure(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (model(x).squeeze(1) - y).square().mean()

    generator = torch.Generator().manual_seed(1)
    rounds = []
    for _ in range(200):  # fresh samples each round; numerator and denominator averaged separately
        x, y = regression_data(w_star, 8 * 16, noise_std, generator)
        moments = gradient_moments(closure, x, y, [[model.weight]], n_micro=8)
        rounds.append((float(moments.trace_cov.sum()), float(moments.grad_sq_norm.sum())))
    values = np.array(rounds)
    (numerator, denominator), (se_numerator, se_denominator) = values.mean(0), values.std(0, ddof=1) / math.sqrt(200)
    # The two moments separately, each within 4 standard errors of its closed form: tr(Sigma) = d (1 + noise^2) + 1
    # and |G|^2 = |delta|^2 = 1.
    assert abs(numerator - expected) <= 4 * se_numerator, (numerator, expected, se_numerator)
    assert abs(denominator - 1.0) <= 4 * se_denominator, (denominator, se_denominator)
    # Their ratio, B_simple, within the ratio's 4 standard errors (first order): a bound under 10%, so a missing
    # Bessel correction over the 8 micro-batches (8/7, 14%) would fail it.
    relative = 4 * math.hypot(se_numerator / numerator, se_denominator / denominator)
    assert relative < 0.10
    measured = numerator / denominator
    assert abs(measured - expected) <= relative * expected, f"B_simple {measured:.3f} vs closed form {expected:.3f}"


def test_adam_second_moment_reused_is_the_squared_gradient_after_one_step() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = StepEngine(model, optimizer, torch.device("cpu"))
    assert engine.second_moment_diagonal() == [None, None]  # no state before the first update
    x = torch.randn(8, 3)
    loss = model(x).square().mean()
    loss.backward()
    squared = [torch.cat([p.grad.reshape(-1) ** 2 for p in params]) for params in engine.layer_params]
    optimizer.zero_grad()
    engine.backward_and_step(model(x).square().mean())
    for measured, expected in zip(engine.second_moment_diagonal(), squared, strict=True):
        assert measured is not None
        # exp_avg_sq = (1 - beta2) g^2 after one step; the bias correction divides by (1 - beta2).
        torch.testing.assert_close(measured, expected, rtol=1e-5, atol=0.0)


# ---------------------------------------------------------------- sparsity


def test_sparsity_hand_computed_case_exact() -> None:
    # 100 coordinates: one of 64, nine of 4, 56 of 0.5, 34 zeros; mass 64 + 36 + 28 = 128, mean 1.28.
    diagonal = torch.tensor([64.0] + [4.0] * 9 + [0.5] * 56 + [0.0] * 34)
    shuffled = diagonal[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    sparsity = curvature_sparsity([shuffled, -shuffled], small_threshold=0.01)
    # top 1% = 1 coordinate: 64 / 128; top 10% = 10 coordinates: 100 / 128; small: |d| <= 0.0128 → the 34 zeros.
    assert sparsity.top1_share.tolist() == [0.5, 0.5]
    assert sparsity.top10_share.tolist() == [0.78125, 0.78125]
    assert sparsity.small_frac.tolist() == [0.34, 0.34]
    assert sparsity.top10_ratio.tolist() == [7.8125, 7.8125]


def test_sparsity_counts_round_up_and_edge_cases() -> None:
    flat = torch.ones(30)  # k(0.1) = 3, not 4 (0.1 * 30 is 3.0000000000000004 in floating point)
    one = torch.tensor([2.5])  # a single coordinate holds all the mass
    zeros = torch.zeros(7)  # all-zero layer: flat by convention, every coordinate small
    sparsity = curvature_sparsity([flat, one, zeros], small_threshold=0.5)
    assert sparsity.top1_share.tolist() == [1 / 30, 1.0, 1 / 7]
    assert sparsity.top10_share.tolist() == [3 / 30, 1.0, 1 / 7]
    assert sparsity.small_frac.tolist() == [0.0, 0.0, 1.0]
    assert sparsity.top10_ratio.tolist() == [1.0, 1.0, 1.0]


def test_sparsity_small_frac_counts_up_to_the_threshold_times_the_mean() -> None:
    # Mass 16 over 4 coordinates, mean 4; threshold 0.25: the bar is 1.0. Just under it counts, on it counts (<=),
    # just over it does not: 2 of 4.
    diagonal = torch.tensor([1 - 2**-8, 1.0, 1 + 2**-8, 13.0])
    assert curvature_sparsity([diagonal], small_threshold=0.25).small_frac.tolist() == [0.5]


def test_sparsity_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"layer 1 has an empty curvature diagonal"):
        curvature_sparsity([torch.ones(3), torch.zeros(0)])
    with pytest.raises(ValueError, match=r"layers \[0\] has non-finite entries"):
        curvature_sparsity([torch.tensor([1.0, float("nan")])])
    with pytest.raises(ValueError, match=r"small_threshold=2"):
        curvature_sparsity([torch.ones(3)], small_threshold=2)
    with pytest.raises(ValueError, match=r"layer 5 has an empty curvature diagonal"):
        curvature_sparsity([torch.ones(3), torch.zeros(0)], layer_ids=[2, 5])


def test_a_non_finite_diagonal_is_named_by_its_model_layer() -> None:
    """Layer 0 has no diagonal (frozen, or no optimizer moment yet): the error named the bad layer 2 as 1, its place
    among the layers that have one."""
    from triaccel_rl.signals.collector import _sparsity_with_gaps

    with pytest.raises(ValueError, match=r"layers \[2\] has non-finite entries"):
        _sparsity_with_gaps([None, torch.ones(5), torch.tensor([1.0, float("inf")])], 0.01, None)


# ---------------------------------------------------------------- LR factors


def test_lr_factors_exact_and_clipped() -> None:
    curvature = np.array([1.0, 4.0, 16.0, 0.0, np.nan, 1e-6, 1e6])
    factors = curvature_lr_factors(curvature)
    # Median of the valid [1, 4, 16, 1e-6, 1e6] is 4: sqrt(4 / c), clipped to [0.5, 2]; invalid layers get 1.
    assert factors.tolist() == [2.0, 1.0, 0.5, 1.0, 1.0, 2.0, 0.5]


def test_lr_factors_invariant_to_scale_and_bounded() -> None:
    rng = np.random.default_rng(0)
    curvature = 10.0 ** rng.uniform(-6, 3, 50)
    factors = curvature_lr_factors(curvature, exponent=1.0, min_factor=0.25, max_factor=4.0)
    np.testing.assert_allclose(curvature_lr_factors(1e5 * curvature, exponent=1.0, min_factor=0.25, max_factor=4.0),
                               factors, rtol=1e-12)  # fmt: skip
    assert factors.min() >= 0.25 and factors.max() <= 4.0
    order = np.argsort(curvature)
    assert np.all(np.diff(factors[order]) <= 0)  # sharper layers never get a larger factor
    assert curvature_lr_factors(np.zeros(3)).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exponent": 0.0}, "exponent=0.0"),
        ({"min_factor": 1.5}, "min_factor=1.5"),
        ({"max_factor": 0.9}, "max_factor=0.9"),
    ],
)
def test_lr_factors_validate(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        curvature_lr_factors(np.ones(3), **kwargs)


def test_frozen_batch_stats_leave_the_running_statistics_as_they_were_even_after_an_overflow() -> None:
    """Train-mode normalisation inside, the statistics and counter as before outside. With only the momentum at 0, an
    overflowing batch made them NaN for good (``0 * inf``)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    before = [b.clone() for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    model.eval()
    x = torch.randn(8, 3)
    with frozen_batch_stats(model):
        assert bn.training and not model[2].training  # batch statistics; dropout off
        out = model(x)
        model(torch.full((8, 3), float("inf")))  # a batch whose statistics overflow
    torch.testing.assert_close(out.mean(0), bn.bias.detach(), atol=1e-5, rtol=0)  # normalised by x's own statistics
    after = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not model.training
    with frozen_batch_stats(model):
        loss = model(x).square().sum()
    loss.backward()  # after the block: the restore must not bump the versions the forward's graph saved
    assert model[0].weight.grad is not None


def test_frozen_batch_stats_keep_a_batch_norm_frozen_in_eval_mode_as_trained() -> None:
    """Fine-tuning with a frozen (eval-mode) batch norm in a model in training mode: the block put every module in
    training mode, so the estimators measured the batch-statistics function, not the one trained (the first layer's
    exact Hessian trace, 1.118 as trained, read -2.45). Now the loss and its Hessian inside are those outside."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.0)
    model.train()
    model[1].eval()  # frozen statistics
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    params = [model[0].weight, model[0].bias]

    def loss_and_trace() -> tuple[torch.Tensor, float]:
        """The loss and the exact trace of its Hessian in the first layer's parameters."""
        loss = nn.functional.mse_loss(model(x), y)
        grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
        rows = [torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, params, retain_graph=True)]) for g in grads]
        return loss.detach(), float(torch.stack(rows).diagonal().sum())

    trained = loss_and_trace()
    with frozen_batch_stats(model):
        assert model.training and not model[1].training  # the frozen norm kept as it is
        measured = loss_and_trace()
    assert torch.equal(measured[0], trained[0]) and measured[1] == trained[1]
    assert trained[1] > 0  # (the batch-statistics function's trace is negative here)
    assert [m.training for m in model] == [True, False, True]  # the modes as they were


def test_frozen_batch_stats_put_back_every_buffer_a_training_forward_writes() -> None:
    """An instance norm that tracks running statistics (no batch norm: its running variance moved by 0.56 a round)
    and a spectral norm's power-iteration vectors (advanced at every forward, so each pass saw another function):
    both as they were after the block, and the spectral norm's weight one function inside it."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Conv1d(2, 3, 1)), nn.InstanceNorm1d(3, track_running_stats=True))
    before = {name: b.clone() for name, b in model.named_buffers()}
    x = torch.randn(4, 2, 5)
    with frozen_batch_stats(model):
        first, second = model(x), model(x)
    assert torch.equal(first, second)  # the power iteration held: one function
    after = dict(model.named_buffers())
    assert {name for name in before if "_u" in name or "_v" in name} and "1.running_var" in before
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed"
    model(x)  # a control: a training forward outside the block does change them
    assert not torch.equal(dict(model.named_buffers())["1.running_var"], before["1.running_var"])


def test_frozen_batch_stats_hold_rrelu_the_hooked_spectral_norm_and_a_rebound_buffer() -> None:
    """RReLU draws its slopes in training mode and the older hook-based spectral norm iterates there: each pass saw
    another function (losses 0.0405 and 0.0397; a 0.14 difference). A buffer the forward rebinds (``self.seen =
    self.seen + n``) was copied back into the tensor the module no longer held: the count moved from 5 to 37."""

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.utils.spectral_norm(nn.Linear(4, 8))
            self.act = nn.RReLU()
            self.b = nn.Linear(8, 3)
            self.register_buffer("seen", torch.zeros((), dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen = self.seen + len(x)
            return self.b(self.act(self.a(x)))

    torch.manual_seed(0)
    model = Counting()
    x = torch.randn(16, 4)
    model(x[:5])
    before = {name: b.clone() for name, b in model.named_buffers()}
    with frozen_batch_stats(model):
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    assert model.training and model.act.training and model.a.training  # modes put back
    after = dict(model.named_buffers())
    assert int(after["seen"]) == 5 and after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert not torch.equal(model(x), model(x))  # a control: outside the block RReLU draws again


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_frozen_batch_stats_turn_off_the_dropout_built_into_attention_and_rnns(kind: str) -> None:
    """Before the fix only dropout modules were switched off: ``nn.MultiheadAttention``'s own attention dropout (so a
    ``TransformerEncoderLayer``'s) and an LSTM's between-layer dropout stayed on, so the loss the Hessian-vector
    products differentiate changed from one forward to the next."""
    torch.manual_seed(0)
    model: nn.Module
    if kind == "transformer":
        model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, batch_first=True)
        rates = [(model.self_attn, 0.5)]
    else:
        model = nn.LSTM(8, 8, num_layers=2, dropout=0.5, batch_first=True)
        rates = [(model, 0.5)]
    x = torch.randn(2, 5, 8)

    def forward() -> torch.Tensor:
        out = model(x)
        return out[0] if isinstance(out, tuple) else out

    with frozen_batch_stats(model):
        first, second = forward(), forward()
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        forward().square().mean().backward()  # still differentiable (an RNN stays in training mode)
    assert all(module.dropout == rate for module, rate in rates)  # put back
    assert model.training
    assert not torch.equal(forward(), forward())  # outside the block the dropout is on again


def test_frozen_batch_stats_put_back_the_weights_an_embedding_with_max_norm_renormalises() -> None:
    """Before the fix ``nn.Embedding(max_norm=...)`` and ``nn.EmbeddingBag(max_norm=...)`` came out of the block with
    the rows the forward looked up renormalised in place (``torch.embedding_renorm_``): a round over the probe batch
    changed trained parameters (rows of norm 4 to 19 cut to 1). Their gradients in the block are unchanged."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 4, max_norm=1.0)
            self.bag = nn.EmbeddingBag(20, 4, max_norm=1.0, mode="mean")
            self.plain = nn.Embedding(20, 4)  # no max_norm: nothing to put back, nothing copied
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(x).mean(1) + self.bag(x) + self.plain(x).mean(1))

    torch.manual_seed(0)
    model = Tokens()
    with torch.no_grad():
        model.emb.weight.mul_(5)  # rows above max_norm, as after some updates
        model.bag.weight.mul_(5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randint(10, 20, (8, 3))
    with frozen_batch_stats(model):
        model(x).square().mean().backward()
    for name, value in before.items():
        assert torch.equal(model.get_parameter(name), value), f"{name} changed"
    assert model.emb.weight.grad is not None and model.emb.weight.grad[10:].abs().sum() > 0  # it was differentiated
    model(x)  # a control: a forward outside the block does renormalise them
    assert not torch.equal(model.emb.weight, before["emb.weight"])
    assert not torch.equal(model.bag.weight, before["bag.weight"])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("hutchinson", "n_probes=2.0 must be a whole number >= 1"),
        ("moments", "n_micro=2.0 must be a whole number >= 2"),
    ],
)
def test_a_count_that_is_not_whole_is_refused_by_name(call: str, message: str) -> None:
    """Python's bare "'float' object cannot be interpreted as an integer" named no argument."""
    model = gelu_mlp()
    params = [list(model[0].parameters()), list(model[2].parameters())]
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=message):
        if call == "hutchinson":
            hutchinson(nn.functional.cross_entropy(model(x), y), params, n_probes=2.0)  # type: ignore[arg-type]
        else:
            closure = lambda a, b: nn.functional.cross_entropy(model(a), b)  # noqa: E731
            gradient_moments(closure, x, y, params, n_micro=2.0)  # type: ignore[arg-type]


def test_the_median_of_an_even_count_of_curvatures_is_the_mean_of_the_middle_two():
    """Valid curvatures 1, 4, 16, 64: median 10, so sqrt(10 / c) clipped to [0.5, 2] (only odd counts were tested)."""
    assert curvature_lr_factors(np.array([1.0, 4.0, 16.0, 64.0])).tolist() == pytest.approx(
        [2.0, math.sqrt(10 / 4), math.sqrt(10 / 16), 0.5]
    )
