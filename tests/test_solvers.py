"""Layer solvers: exact properties on small synthetic layers, behaviour pinned on real layers.

Float tolerances: checks of an exact identity run in float64, where the solvers' results agree
with a direct solve to ~1e-13 relative (damped H, condition number <= ~1e4 here); 1e-9 leaves
room for different summation orders without hiding a wrong formula (those are off by > 1e-3).
"""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.solvers import HessianAccumulator, PruneResult, prune, prune_with_info
from pipeline.solvers.common import damped

METHODS = ("magnitude", "wanda", "sparsegpt", "multiweight")
PATTERNS = ({"sparsity": 0.5}, {"nm": (2, 4)}, {"nm": (4, 8)})
EXACT = 1e-9  # float64 identities (see module docstring)


def problem(r=24, c=64, n=512, dtype=torch.float64, seed=0):
    """LLM-like layer: inputs with a few outlier channels, so the Hessian is far from diagonal
    scale-wise and SparseGPT's and multiweight's updates clearly differ."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(c, 1, dtype=dtype)
    scale[torch.randperm(c, generator=g)[:3]] = 8.0
    base = torch.randn(c, 4, dtype=dtype, generator=g)  # shared factors: correlated inputs
    X = (torch.randn(c, n, dtype=dtype, generator=g) + base @ torch.randn(4, n, dtype=dtype, generator=g)) * scale
    W = torch.randn(r, c, dtype=dtype, generator=g)
    return W, X @ X.T / n


def least_squares(W, Hd, keep):
    """Row-wise optimum on the kept set: w_K = (w Hd)_K (Hd_KK)⁻¹."""
    out = torch.zeros_like(W)
    B = W @ Hd
    for i in range(W.shape[0]):
        K = keep[i].nonzero().squeeze(1)
        out[i, K] = torch.linalg.solve(Hd[K][:, K], B[i, K])
    return out


def close(a, b, tol=EXACT):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# ---------------------------------------------------------------- exact properties (float64)

@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_one_group_spanning_the_row_is_least_squares(pattern):
    W, H = problem()
    c = W.shape[1]
    res = prune_with_info(W, H, "multiweight", group=c, blocksize=c, **pattern)
    Hd, lam = damped(H, 0.01)
    assert res.damping == pytest.approx(lam)
    assert close(res.weight, least_squares(W, Hd, res.mask))


def test_group_one_equals_sparsegpt():
    W, H = problem(c=320)  # 2.5 blocks of 128: checks the lazy far updates and a short last block
    ref = prune_with_info(W, H, "sparsegpt", sparsity=0.5)
    # same fixed mask: identical update
    mw = prune_with_info(W, H, "multiweight", mask=ref.mask, group=1)
    sg = prune_with_info(W, H, "sparsegpt", mask=ref.mask)
    assert close(mw.weight, ref.weight) and close(sg.weight, ref.weight)
    # and the same mask rule picks the same mask
    own = prune_with_info(W, H, "multiweight", sparsity=0.5, group=1)
    assert torch.equal(own.mask, ref.mask) and close(own.weight, ref.weight)


def test_fixed_mask_group_sweep_and_refit():
    """For a fixed mask, growing groups approach the least-squares refit (measured, not a theorem:
    pinned here on this layer), and the refit is the optimum for the damped objective."""
    W, H = problem(c=128)
    mask = prune_with_info(W, H, "sparsegpt", sparsity=0.5).mask
    errs = [prune_with_info(W, H, "multiweight", mask=mask, group=g).error for g in (1, 8, 32, 128)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:])), errs
    exact = prune_with_info(W, H, "multiweight", mask=mask, refit="exact")
    assert close(exact.weight, least_squares(W, damped(H, 0.01)[0], mask))


def test_exact_refit_never_worse_and_cg_close():
    W, H = problem()
    for method in METHODS:
        for pattern in PATTERNS:
            base = prune_with_info(W, H, method, **pattern)
            ex = prune_with_info(W, H, method, refit="exact", **pattern)
            cg = prune_with_info(W, H, method, refit="cg", **pattern)
            assert torch.equal(ex.mask, base.mask) and torch.equal(cg.mask, base.mask)
            assert ex.error <= base.error * (1 + 1e-9), (method, pattern)
            assert cg.error <= ex.error * 1.02, (method, pattern)  # the brief's 2%


# ---------------------------------------------------------------- masks and sparsity

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,s", [((24, 64), 0.5), ((7, 200), 0.3), ((5, 300), 0.73), ((1, 130), 0.5)])
def test_unstructured_count_is_exact(method, shape, s):
    """Rule (all methods): exactly round(s·r·c) pruned (half up), pruned entries are exact zeros.
    Block quotas use cumulative rounding, so no block-rounding slack is needed."""
    r, c = shape
    W, H = problem(r, c)
    res = prune_with_info(W, H, method, sparsity=s)
    assert int((~res.mask).sum()) == math.floor(s * r * c + 0.5)
    assert bool((res.weight[~res.mask] == 0).all())
    assert res.mask.dtype == torch.bool and res.mask.shape == W.shape


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (3, 8), (8, 16)])
def test_nm_every_group_has_n_zeros(method, nm):
    """(8, 16) has 12870 patterns: multiweight then uses saliency masks and a per-row solve."""
    n, m = nm
    W, H = problem(16, 64)
    for group in ((None, m, 2 * m, 64) if method == "multiweight" else (None,)):
        kw = {"group": group} if group else {}
        res = prune_with_info(W, H, method, nm=nm, **kw)
        pruned = (~res.mask).view(16, -1, m).sum(2)
        zeros = (res.weight == 0).view(16, -1, m).sum(2)
        assert bool((pruned == n).all()) and bool((zeros >= n).all()), (method, group)
    if nm == (8, 16) and method == "multiweight":
        with pytest.raises(ValueError, match="12870"):
            prune(W, H, method, nm=nm, mask_rule="exact")


def test_fixed_mask_is_kept():
    W, H = problem()
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.4
    for method in METHODS:
        for refit in (None, "cg", "exact"):
            res = prune_with_info(W, H, method, mask=mask, refit=refit)
            assert torch.equal(res.mask, mask) and res.pattern == "fixed"
            assert bool((res.weight[~mask] == 0).all())


def test_magnitude_mask_is_layer_wide_smallest_abs():
    W = torch.tensor([[1.0, -3.0, 2.0, 0.5], [4.0, -0.1, 0.2, 5.0]])
    H = torch.eye(4)
    res = prune_with_info(W, H, "magnitude", sparsity=0.5)
    assert res.mask.tolist() == [[False, True, True, False], [True, False, False, True]]
    assert torch.equal(res.weight, W * res.mask)  # no update, just zeros
    # N:M: the n smallest |w| in each group of m of each row
    res = prune_with_info(W, H, "magnitude", nm=(1, 2))
    assert res.mask.tolist() == [[False, True, True, False], [True, False, False, True]]
    res = prune_with_info(W, H, "magnitude", nm=(3, 4))
    assert res.mask.tolist() == [[False, True, False, False], [False, False, False, True]]
    # ties: stable, the lower row-major index goes first
    res = prune_with_info(torch.ones(2, 4), H, "magnitude", sparsity=0.5)
    assert res.mask.tolist() == [[False] * 4, [True] * 4]


def test_wanda_mask_is_per_row_abs_times_input_norm():
    W = torch.tensor([[1.0, -3.0, 2.0, 0.5], [4.0, -0.1, 0.2, 5.0]])
    H = torch.diag(torch.tensor([1.0, 100.0, 1.0, 4.0]))  # ||X_j|| ∝ sqrt(H_jj) = 1, 10, 1, 2
    # scores: row 0: 1, 30, 2, 1.0; row 1: 4, 1, 0.2, 10 -> 2 lowest per row
    res = prune_with_info(W, H, "wanda", sparsity=0.5)
    assert res.mask.tolist() == [[False, True, True, False], [True, False, False, True]]
    # per row, not layer-wide: row 1's scores all exceed row 0's smallest, yet it loses two
    W2 = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]])
    res = prune_with_info(W2, torch.eye(4), "wanda", sparsity=0.5)
    assert res.mask.tolist() == [[False, False, True, True], [False, False, True, True]]
    res = prune_with_info(W, H, "wanda", nm=(1, 2))
    assert res.mask.tolist() == [[False, True, True, False], [True, False, False, True]]
    # ties within a row (score 1.0 at columns 0 and 3, s = 0.25): the lower index goes first
    res = prune_with_info(W[:1], H, "wanda", sparsity=0.25)
    assert res.mask.tolist() == [[False, True, True, True]]


# ---------------------------------------------------------------- robustness

@pytest.mark.parametrize("method", METHODS)
def test_dead_columns(method):
    W, H = problem()
    dead = [3, 17, 40]
    H[dead, :] = 0
    H[:, dead] = 0
    for pattern in PATTERNS:
        res = prune_with_info(W, H, method, refit="cg", **pattern)
        assert bool(torch.isfinite(res.weight).all()) and math.isfinite(res.error)
        if method in ("sparsegpt", "multiweight"):
            assert bool((res.weight[:, dead] == 0).all())


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_hessian(method):
    W, _ = problem(c=64)
    X = torch.randn(64, 10, dtype=torch.float64)  # 10 tokens for 64 inputs: rank 10
    H = X @ X.T / 10
    for pattern in PATTERNS:
        for refit in (None, "cg", "exact"):
            res = prune_with_info(W, H, method, refit=refit, **pattern)
            assert bool(torch.isfinite(res.weight).all()) and math.isfinite(res.error)


def test_damping_retries_then_clear_error():
    W, H = problem()
    # indefinite: smallest eigenvalue -5% of mean(diag H), so 1% damping fails and 10% works
    shift = float(torch.linalg.eigvalsh(H)[0]) + 0.05 * float(H.diagonal().mean())
    Hneg = H - shift * torch.eye(H.shape[0], dtype=H.dtype)
    res = prune_with_info(W, Hneg, "multiweight", sparsity=0.5)
    assert res.percdamp > 0.01 and bool(torch.isfinite(res.weight).all())
    with pytest.raises(RuntimeError, match="percdamp"):
        prune_with_info(W, -torch.eye(64, dtype=H.dtype), "sparsegpt", sparsity=0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_weights(dtype, method):
    W, H = problem(dtype=torch.float32)
    ref = prune_with_info(W.to(dtype).float(), H, method, sparsity=0.5)
    res = prune_with_info(W.to(dtype), H.to(dtype), method, sparsity=0.5)
    assert res.weight.dtype == dtype and bool(torch.isfinite(res.weight).all())
    assert int((~res.mask).sum()) == W.numel() // 2
    # a half-precision H and the final rounding cost a little accuracy, no more (bf16 has 8 bits)
    assert res.error <= ref.error * 1.1 + 1e-6


def test_one_row_layer():
    W, H = problem(r=1, c=64)
    for method in METHODS:
        for pattern in PATTERNS:
            res = prune_with_info(W, H, method, refit="exact", **pattern)
            assert res.weight.shape == (1, 64) and bool(torch.isfinite(res.weight).all())


def test_inputs_untouched_and_result_fields():
    W, H = problem(dtype=torch.float32)
    W0, H0 = W.clone(), H.clone()
    for method in METHODS:
        for refit in (None, "cg", "exact"):
            res = prune_with_info(W, H, method, nm=(2, 4), refit=refit)
            assert torch.equal(W, W0) and torch.equal(H, H0)
            assert isinstance(res, PruneResult) and res.weight is not W
            assert res.weight.dtype == W.dtype and res.weight.device == W.device
            assert res.method == method and res.pattern == "2:4" and res.refit == refit
            assert res.seconds > 0 and res.damping > 0 and res.percdamp == 0.01
            dW = res.weight.double() - W.double()
            assert res.error == pytest.approx(float(((dW @ H.double()) * dW).sum()), rel=1e-9)
    assert torch.equal(prune(W, H, "multiweight", sparsity=0.5),
                       prune_with_info(W, H, "multiweight", sparsity=0.5).weight)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(sparsity=0.5, nm=(2, 4)), "not both"),
    (dict(), "sparsity"),
    (dict(sparsity=0.0), "0.0"),
    (dict(sparsity=1.0), "1.0"),
    (dict(sparsity=1.5), "1.5"),
    (dict(sparsity=-0.1), "-0.1"),
    (dict(sparsity=float("nan")), "nan"),
    (dict(nm=(4, 4)), "(4, 4)"),
    (dict(nm=(5, 4)), "(5, 4)"),
    (dict(nm=(0, 4)), "(0, 4)"),
    (dict(nm=(2, 5)), "m=5"),
    (dict(nm=(2.0, 4)), "2.0"),
    (dict(nm=2), "2"),
    (dict(sparsity=0.5, method="obs"), "'obs'"),
    (dict(sparsity=0.5, refit="lbfgs"), "'lbfgs'"),
    (dict(sparsity=0.5, method="wanda", group=8), "group=8"),
    (dict(sparsity=0.5, mask_rule="best"), "'best'"),
    (dict(nm=(2, 4), group=6), "group=6"),
    (dict(sparsity=0.5, group=0), "group must be a positive int, got 0"),
    (dict(sparsity=0.5, percdamp=-1), "-1"),
    (dict(sparsity=0.5, refit_iters=5), "refit_iters=5"),
    (dict(mask=torch.ones(3, 3, dtype=torch.bool)), "(3, 3)"),
])
def test_bad_arguments_raise_value_error(kwargs, needle):
    W, H = problem(r=4, c=8, dtype=torch.float32)
    method = kwargs.pop("method", "multiweight")
    with pytest.raises(ValueError) as e:
        prune(W, H, method, **kwargs)
    assert needle in str(e.value)


@pytest.mark.parametrize("W,H,needle", [
    (torch.zeros(4), torch.eye(4), "(4,)"),
    (torch.zeros(4, 8), torch.eye(4), "(4, 4)"),
    (torch.zeros(4, 8), torch.zeros(8, 4), "(8, 4)"),
    (torch.zeros(4, 8, dtype=torch.long), torch.eye(8), "torch.int64"),
    (torch.full((4, 8), float("nan")), torch.eye(8), "NaN"),
    (torch.zeros(4, 8), torch.full((8, 8), float("inf")), "Inf"),
])
def test_bad_shapes_raise_value_error(W, H, needle):
    with pytest.raises(ValueError) as e:
        prune(W, H, "sparsegpt", sparsity=0.5)
    assert needle in str(e.value)


# ---------------------------------------------------------------- Hessian accumulator

def test_hessian_accumulator_running_mean_and_merge():
    x = torch.randn(3, 50, 16, dtype=torch.float64)
    flat = x.reshape(-1, 16)
    ref = flat.T @ flat / flat.shape[0]
    acc = HessianAccumulator(16, dtype=torch.float64)
    acc.add(x[0])
    acc.add(x[1:])               # any leading shape
    acc.add(x[:0].reshape(0, 16))  # empty batches are ignored
    assert acc.count == 150 and torch.allclose(acc.hessian, ref, rtol=1e-12, atol=1e-12)
    a, b = HessianAccumulator(16, dtype=torch.float64), HessianAccumulator(16, dtype=torch.float64)
    a.add(flat[:30])
    b.add(flat[30:].float())     # inputs are cast to the accumulator's dtype
    assert a.merge(b) is a and a.count == 150
    # b's input went through float32: 1e-6 relative is float32 rounding
    assert torch.allclose(a.hessian, ref, rtol=1e-6, atol=1e-6)
    assert a.merge(HessianAccumulator(16)).count == 150
    f32 = HessianAccumulator(16)
    f32.add(x.float())
    assert f32.hessian.dtype == torch.float32 and torch.allclose(f32.hessian.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="17"):
        f32.add(torch.zeros(2, 17))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    W, H = problem(dtype=torch.float32)
    for method in METHODS:
        for pattern in PATTERNS:
            cpu = prune_with_info(W, H, method, refit="cg", **pattern)
            gpu = prune_with_info(W.cuda(), H.cuda(), method, refit="cg", **pattern)
            assert gpu.weight.device.type == "cuda"
            assert gpu.error == pytest.approx(cpu.error, rel=1e-3)  # float32 on two devices


# ---------------------------------------------------------------- real SmolLM2 layers

@pytest.fixture(scope="module")
def real():
    """Layer 2's k (192 x 576) and o (576 x 576) of SmolLM2 with Hessians from 4 x 256 tokens of
    Pride and Prejudice (dense model, a few seconds)."""
    from jobs.bench_solvers import real_problems
    return real_problems(layers=(2,), modules=("k", "o"), count=4, seqlen=256, cache=False)


def test_real_layers_multiweight_beats_sparsegpt(real):
    """The issue's targets, pinned on real layers (measured here: multiweight/sparsegpt 0.67-0.90,
    +cg 0.44-0.52, cg/exact <= 1.0025): multiweight <= 0.95 of SparseGPT's error, with refit="cg"
    <= 0.80; exact refit no worse than none; cg within 2% of exact; the baselines worse."""
    for name, W, H in real:
        for pattern in PATTERNS:
            sg = prune_with_info(W, H, "sparsegpt", **pattern)
            mw = prune_with_info(W, H, "multiweight", **pattern)
            cg = prune_with_info(W, H, "multiweight", refit="cg", **pattern)
            ex = prune_with_info(W, H, "multiweight", refit="exact", **pattern)
            assert mw.error <= 0.95 * sg.error, (name, pattern, mw.error / sg.error)
            assert ex.error <= mw.error and cg.error <= 1.02 * ex.error, (name, pattern)
            assert cg.error <= 0.80 * sg.error, (name, pattern, cg.error / sg.error)
            for other in ("magnitude", "wanda"):
                assert prune_with_info(W, H, other, **pattern).error > sg.error, (name, other)


def test_real_layers_group_behaviour(real):
    """Pinned behaviours of method.md section 3 on a real layer: for a fixed mask the error falls
    as the group grows; for N:M, a wide re-solve group beats the m-column group, and the exact
    mask rule is no worse than saliency."""
    name, W, H = real[1]
    mask = prune_with_info(W, H, "sparsegpt", sparsity=0.5).mask
    errs = [prune_with_info(W, H, "multiweight", mask=mask, group=g).error for g in (1, 4, 32, 128)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    for nm in ((2, 4), (4, 8)):
        narrow = prune_with_info(W, H, "multiweight", nm=nm, group=nm[1])
        wide = prune_with_info(W, H, "multiweight", nm=nm, group=128)
        sal = prune_with_info(W, H, "multiweight", nm=nm, group=nm[1], mask_rule="saliency")
        assert wide.error < narrow.error <= sal.error, (nm, wide.error, narrow.error, sal.error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_report_error_blocked(dtype, monkeypatch):
    """The reported error, formed over blocks of H's columns (no float64 copy of the whole H), equals
    tr(ΔW H ΔWᵀ) to float64 rounding (1e-10 relative: the same terms summed in another order; H is
    positive definite, so the total is a sum of mostly same-signed terms), and leaves its inputs
    alone (a float64 W is not converted by .double(), so an in-place ΔW would overwrite it)."""
    from pipeline.solvers import common
    W0, H = problem(c=200)
    W0, H = W0.to(dtype), H.to(dtype)
    W = prune_with_info(W0, H, "sparsegpt", sparsity=0.5).weight
    before = W.clone()
    monkeypatch.setattr(common, "ERROR_BLOCK_BYTES", 8 * 200 * 7)  # blocks of 7 columns: a short last one
    got = common.report_error(W, W0, H)
    assert torch.equal(W, before)
    assert got == pytest.approx(common.error(W, W0, H), rel=1e-10)
