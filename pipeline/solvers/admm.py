"""ADMM mask search (method.md section 4b; as in ALPS, Meng et al. 2024), warm-started from the
multiweight mask and never worse than it.

Work in coordinates where H has a unit diagonal (w' = w·s, H' = H / s sᵀ, s = sqrt(diag H)),
so that keeping the largest |w'| keeps the largest |w|·||x||. With B = w0' H' and a penalty rho:

    W = (B + rho (D - V)) (H' + rho I)⁻¹     least squares pulled towards the sparse copy D
    D = proj(W + V)                          exact count (unstructured) or exact N:M
    V = V + W - D                            scaled dual: the running residual

rho grows with the support's churn (ALPS's schedule), so the support settles; (H' + rho I)⁻¹ is
formed once per rho value (one Cholesky) and an iteration is one r x c x c product. The start
is the multiweight + refit solution with its consistent dual V = (B - D H') / rho, so the first
step is a projected gradient step from it. The mask found is refitted; whichever of it and the
multiweight mask has the lower layer error tr(ΔW H ΔWᵀ) is returned.
"""
from __future__ import annotations

import torch

from . import multiweight, refit as refit_mod
from .common import cholesky, error, one_thread, quota

# Measured on the 12 real SmolLM2 layers of jobs.bench_solvers at 50% (error vs SparseGPT's):
# rho 0.1 0.570, 0.3 0.587, 1.0 0.687 (a large start keeps the warm start's support); slower
# growth 0.566 (x1.2/1.1/1.05, 90 iterations) and 0.563 (x1.1/1.05/1.03, 150) at 1.4x and 2.5x
# the search time; a final refit of 30 cg iterations instead of 10: the same; scoring by |w|
# (no rescaling) 0.607, by |w|·H_jj^¼ 0.571; more rounds from the refitted result change
# nothing (its support is stable).
# At N:M (2:4; L1.q, L15.o, L15.up, L29.down; docs/measurements.md "Layer solvers") the result is a local optimum
# for swaps: exchanging a kept and a pruned weight of one m-group, moving only those two (exact
# for that move) or re-solving with cg, gains < 0.2%; projections scored on the layer error
# (OBS saliency per weight or per group pattern, H's m x m group blocks as the metric) are 1-50%
# worse; a gradual 1:4 -> 2:4 projection 0.5-10% worse; 400 iterations at x1.03 gain 0.3-3.6%
# for 4-6x the search time. An exact swap search needs (H_KK)⁻¹ per row: 3-7x SparseGPT's whole
# time for the batched Cholesky alone.
ITERS = 60        # ADMM iterations at most (it stops earlier once the support is stable)
RHO = 0.1         # starting penalty, relative to H' (unit diagonal)
UPDATE = 3        # iterations between penalty updates
REFIT_ITERS = 10  # cg iterations of the final refit: ADMM ends next to the least-squares point


def project(X, sparsity, nm):
    """Bool keep-mask: the largest |X| (exactly r·c - round(s·r·c) of them, layer-wide), or the
    m - n largest of every m consecutive entries of each row."""
    r, c = X.shape
    A = X.abs()
    if nm:
        n, m = nm
        idx = torch.topk(A.view(r, c // m, m), m - n, dim=2, sorted=False).indices
        return torch.zeros(r, c // m, m, dtype=torch.bool, device=X.device).scatter_(2, idx, True).view(r, c)
    keep = r * c - quota(sparsity, r, 0, c)
    if keep == 0:
        return torch.zeros_like(A, dtype=torch.bool)
    flat = A.flatten()
    t = torch.kthvalue(flat, r * c - keep + 1).values  # the smallest kept magnitude
    out = flat > t
    short = keep - int(out.sum())
    if short > 0:  # ties at the threshold: the first ones (row-major) fill the quota
        eq = flat == t
        out |= eq & (torch.cumsum(eq, 0) <= short)
    return out.view(r, c)


def _refit(W0, H, W, P, refit, refit_iters):
    if refit == "exact":
        return refit_mod.exact(W0, H, W, P)
    return refit_mod.cg(W0, H, W, P, **({} if refit_iters is None else {"iters": refit_iters}))


def _inverse(Hn, rho, eye):
    """(Hn + ρI)⁻¹ on one thread: MKL's threaded factorisation and inverse round differently per
    thread count, which moved admm's masks (2:4 admm + cg on SmolLM2: 51.74 at 2 threads, 50.74 at 1)."""
    with one_thread(Hn):
        return torch.cholesky_inverse(cholesky(Hn + rho * eye))


def search(W0, H, Ws, keep, sparsity, nm, iters=None, rho=None, update=None):
    """ADMM from the solution Ws (support `keep`); returns the final keep-mask and W (unscaled)."""
    iters, rho, update = iters or ITERS, rho or RHO, update or UPDATE
    s = H.diagonal().sqrt()
    Hn = H / s.unsqueeze(0) / s.unsqueeze(1)
    B = (W0 * s) @ Hn
    D = Ws * s * keep
    V = (B - D @ Hn) / rho
    eye = torch.eye(len(s), dtype=H.dtype, device=H.device)
    K = _inverse(Hn, rho, eye)
    total = keep.numel() - int(keep.sum())  # pruned count, the scale of "support change"
    last = keep
    DmV = D - V
    for it in range(iters):
        U = torch.add(B, DmV, alpha=rho) @ K    # W
        U += V                                  # W + V
        keep = project(U, sparsity, nm)
        V = U.masked_fill(keep, 0)              # V + W - D, D = U on the kept entries
        if (it + 1) % update == 0:
            change = int((keep != last).sum()) / max(1, total)
            last = keep
            if change == 0 and it + 1 >= 2 * update:
                break
            new = rho * (1.3 if change > 0.1 else 1.2 if change > 0.005 else 1.1)
            V *= rho / new  # keep the unscaled dual rho·V
            rho = new
            K = _inverse(Hn, rho, eye)
        DmV = torch.where(keep, U, -V)          # D - V
    return keep, U.masked_fill_(~keep, 0) / s


def prune(W, H, sparsity=None, nm=None, pruned=None, blocksize=128, group=None, mask_rule=None,
          refit="cg", refit_iters=None, hessian=None, iters=None, rho=None):
    """W: dead columns zeroed; H: damped; hessian: the undamped one the choice is scored on
    (default H). Returns (new W, pruned mask), already refitted."""
    Wm, Pm = multiweight.prune(W, H, sparsity, nm, pruned, blocksize, group, mask_rule)
    Wm = _refit(W, H, Wm, Pm, refit, refit_iters)
    if pruned is not None:  # a fixed mask leaves nothing to search
        return Wm, Pm
    keep, Wa = search(W, H, Wm, ~Pm, sparsity, nm, iters, rho)
    Pa = ~keep
    Wa = _refit(W, H, Wa * keep, Pa, refit, refit_iters or REFIT_ITERS)
    Href = H if hessian is None else hessian
    if error(Wa, W, Href) < error(Wm, W, Href):
        return Wa, Pa
    return Wm, Pm
