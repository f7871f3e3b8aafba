"""prune_many (MoE experts in batched calls) against a loop of prune_with_info.

Tolerances. Where the batched computation is the same one (magnitude, wanda, sparsegpt, refit
None or cg) the results are compared for exact equality: on CPU a batched product rounds as the
2-D one, every other step is elementwise or per item, and cg freezes a finished item where the loop
would have stopped. multiweight at unstructured sparsity and refit "exact" stack the rows of all
experts into their row solves, padded to a common size (identity padding changes the Cholesky
solve's rounding): there masks must still be equal and weights/errors agree to 1e-9 relative in
float64 (measured ~1e-14; a wrong row-to-expert mapping is off by O(1)).
"""
from __future__ import annotations

import math

import pytest
import torch

from pipeline import solvers
from pipeline.solvers import CholeskyError, many_bytes, prune_many, prune_with_info
from test_solvers import close, problem

METHODS = ("magnitude", "wanda", "sparsegpt", "multiweight")
PATTERNS = ({"sparsity": 0.5}, {"nm": (2, 4)})
E, R, C = 6, 16, 64
DEAD = [3, 17, 40]   # expert 1's dead inputs
RETRY = 3            # expert 3 needs a damping retry (Cholesky fails at 1%)


def experts(dtype=torch.float64):
    """E experts of one shape, each its own Hessian: one with dead columns, one rank-deficient
    (10 tokens for 64 inputs), one indefinite enough that 1% damping fails and 10% works."""
    Ws, Hs = [], []
    for e in range(E):
        W, H = problem(r=R, c=C, dtype=dtype, seed=10 + e)
        Ws.append(W)
        Hs.append(H)
    Hs[1][DEAD, :] = 0
    Hs[1][:, DEAD] = 0
    X = torch.randn(C, 10, dtype=dtype, generator=torch.Generator().manual_seed(5))
    Hs[2] = X @ X.T / 10
    H = Hs[RETRY].double()
    shift = float(torch.linalg.eigvalsh(H)[0]) + 0.05 * float(H.diagonal().mean())
    Hs[RETRY] = (H - shift * torch.eye(C, dtype=torch.float64)).to(dtype)
    return torch.stack(Ws), torch.stack(Hs)


def bitwise(method, refit):
    return refit in (None, "cg") and method != "multiweight"


def check_same(many, loop, method, pattern, refit, exact):
    assert len(many) == len(loop)
    for a, b in zip(many, loop):
        assert torch.equal(a.mask, b.mask)
        assert a.damping == b.damping and a.percdamp == b.percdamp
        assert (a.method, a.pattern, a.refit) == (b.method, b.pattern, b.refit)
        assert a.weight.dtype == b.weight.dtype and a.weight.shape == b.weight.shape
        if exact:
            assert torch.equal(a.weight, b.weight) and a.error == b.error
        else:
            assert close(a.weight, b.weight) and a.error == pytest.approx(b.error, rel=1e-9)


@pytest.mark.parametrize("refit", (None, "cg"))
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_many_equals_loop(method, pattern, refit):
    Ws, Hs = experts()
    many = prune_many(Ws, Hs, method, refit=refit, **pattern)
    loop = [prune_with_info(w, h, method, refit=refit, **pattern) for w, h in zip(Ws, Hs)]
    # multiweight at N:M: every row prunes the same count, so no padding differs (measured equal)
    check_same(many, loop, method, pattern, refit,
               exact=bitwise(method, refit) or (method == "multiweight" and "nm" in pattern))
    if method in ("sparsegpt", "multiweight"):
        assert loop[RETRY].percdamp > 0.01 and many[RETRY].percdamp == loop[RETRY].percdamp
        assert all(r.percdamp == 0.01 for e, r in enumerate(many) if e != RETRY)
        assert bool((many[1].weight[:, DEAD] == 0).all())
    for r in many:  # exact pattern per expert
        assert bool(torch.isfinite(r.weight).all()) and math.isfinite(r.error)
        assert bool((r.weight[~r.mask] == 0).all())
        if "sparsity" in pattern:
            assert int((~r.mask).sum()) == round(0.5 * R * C)
        else:
            assert bool(((~r.mask).view(R, C // 4, 4).sum(2) == 2).all())


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_many_equals_loop_float32_and_exact_refit(method, pattern):
    """float32 (what the job runs) for the bitwise methods; refit "exact" in float64."""
    if bitwise(method, None):
        Ws, Hs = experts(torch.float32)
        many = prune_many(list(Ws), list(Hs), method, refit="cg", **pattern)  # lists work too
        loop = [prune_with_info(w, h, method, refit="cg", **pattern) for w, h in zip(Ws, Hs)]
        check_same(many, loop, method, pattern, "cg", exact=True)
    Ws, Hs = experts()
    many = prune_many(Ws, Hs, method, refit="exact", **pattern)
    loop = [prune_with_info(w, h, method, refit="exact", **pattern) for w, h in zip(Ws, Hs)]
    check_same(many, loop, method, pattern, "exact", exact=False)


def test_fixed_masks_options_and_admm():
    Ws, Hs = experts()
    masks = torch.rand(E, R, C, generator=torch.Generator().manual_seed(1)) > 0.4
    for method, kw in (("multiweight", dict(mask=masks, group=8)),
                       ("sparsegpt", dict(nm=(4, 8), blocksize=32)),
                       ("multiweight", dict(nm=(2, 4), mask_rule="saliency", group=4)),
                       ("multiweight", dict(sparsity=0.3, percdamp=0.0)),
                       ("admm", dict(sparsity=0.5))):
        many = prune_many(Ws, Hs, method, **kw)
        loop = [prune_with_info(Ws[e], Hs[e], method, **{k: (v[e] if k == "mask" else v) for k, v in kw.items()})
                for e in range(E)]
        check_same(many, loop, method, None, None, exact=method in ("sparsegpt", "admm"))
        if "mask" in kw:
            assert all(torch.equal(r.mask, m) for r, m in zip(many, masks))


def test_batch_failure_falls_back_to_one_at_a_time(monkeypatch):
    """A Cholesky failure inside the batch that names no item: every expert is solved alone."""
    Ws, Hs = experts()
    loop = [prune_with_info(w, h, "sparsegpt", sparsity=0.5) for w, h in zip(Ws, Hs)]
    real = solvers.METHODS["sparsegpt"]

    def fail_batched(W, *a, **k):
        if W.dim() > 2:
            raise CholeskyError("batched")
        return real(W, *a, **k)
    monkeypatch.setitem(solvers.METHODS, "sparsegpt", fail_batched)
    check_same(prune_many(Ws, Hs, "sparsegpt", sparsity=0.5), loop, "sparsegpt", None, None, exact=True)


def test_inputs_untouched_and_fields():
    Ws, Hs = experts(torch.float32)
    W0, H0 = Ws.clone(), Hs.clone()
    many = prune_many(Ws.to(torch.bfloat16), Hs, "multiweight", nm=(2, 4), refit="cg")
    assert torch.equal(Ws, W0) and torch.equal(Hs, H0)
    for r in many:
        assert r.weight.dtype == torch.bfloat16 and r.seconds > 0 and r.cpu_seconds >= 0
        assert r.pattern == "2:4" and r.refit == "cg" and r.method == "multiweight"
    with pytest.raises(RuntimeError, match="percdamp"):  # an expert that fails alone fails here
        prune_many(Ws[:2], torch.stack([Hs[0], -torch.eye(C)]), "sparsegpt", sparsity=0.5)
    assert prune_many([], [], "sparsegpt", sparsity=0.5) == []


@pytest.mark.parametrize("args,needle", [
    ((torch.zeros(2, 4, 8), [torch.eye(8), torch.eye(4)]), "item 1: hessian must be a float 8 x 8"),
    (([torch.zeros(4, 8), torch.zeros(5, 8)], [torch.eye(8)] * 2), "item 1: weight shape (5, 8)"),
    (([torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.float64)], [torch.eye(8)] * 2), "torch.float64"),
    ((torch.zeros(2, 4, 8), torch.eye(8).repeat(3, 1, 1)), "2 weights but 3 hessians"),
    ((torch.zeros(4, 8), torch.eye(8)), "3-D tensor"),
    ((torch.zeros(2, 4, 8), torch.stack([torch.eye(8), torch.full((8, 8), float("nan"))])), "item 1: hessian contains NaN"),
])
def test_bad_input(args, needle):
    with pytest.raises(ValueError) as e:
        prune_many(*args, "sparsegpt", sparsity=0.5)
    assert needle in str(e.value)
    with pytest.raises(ValueError, match="item 0: give sparsity or nm, not both"):
        prune_many(torch.zeros(1, 4, 8), torch.eye(8).unsqueeze(0), "wanda", sparsity=0.5, nm=(2, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_many_equals_loop():
    Ws, Hs = experts(torch.float32)
    Ws, Hs = Ws.cuda(), Hs.cuda()
    for method in METHODS:
        for pattern in PATTERNS:
            many = prune_many(Ws, Hs, method, refit="cg", **pattern)
            loop = [prune_with_info(w, h, method, refit="cg", **pattern) for w, h in zip(Ws, Hs)]
            for a, b in zip(many, loop):
                assert a.weight.device.type == "cuda" and a.percdamp == b.percdamp
                # cuBLAS batched and single products may round differently: float32 tolerance
                assert a.error == pytest.approx(b.error, rel=1e-3)


def test_many_bytes_orders_the_workspace():
    """The per-item estimate the caller chunks experts by: what each part adds, and its units."""
    base = many_bytes(128, 256, "sparsegpt")
    assert base == (5 * 256 * 256 + 8 * 128 * 256) * 4
    assert many_bytes(128, 256, "sparsegpt", dtype=torch.float64) == 2 * base
    assert many_bytes(128, 256, "magnitude") < base < many_bytes(128, 256, "multiweight")
    assert many_bytes(128, 256, "multiweight") < many_bytes(128, 256, "multiweight", nm=(4, 8)) \
        < many_bytes(128, 256, "multiweight", nm=(4, 8), refit="cg")
