"""Pieces shared by the solvers: damping, the inverse-Hessian Cholesky factor, masks, error.

Every solver takes either one layer (W: r x c, H: c x c) or a batch of same-shape layers with a
leading item dimension (W: E x r x c, H: E x c x c, each item its own Hessian, as MoE experts);
the item dimension is written `...` below, and a 2-D call runs the same operations as before."""
from __future__ import annotations

from contextlib import contextmanager

import torch


class CholeskyError(RuntimeError):
    """A factorisation failed; the caller retries with more damping."""


def damped(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """H + λI with λ = percdamp · mean(diag H) (SparseGPT's damping); returns (H_damped, λ)."""
    lam = percdamp * H.diagonal().mean().item()
    Hd = H.clone()
    Hd.diagonal().add_(lam)
    return Hd, lam


def damped_many(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, list[float]]:
    """`damped` for each item of E x c x c; λ from each item's own 2-D mean (a batched mean rounds
    differently in float32, and λ must equal the one-at-a-time call's)."""
    lams = [percdamp * h.diagonal().mean().item() for h in H]
    Hd = H.clone()
    Hd.diagonal(dim1=-2, dim2=-1).add_(torch.tensor(lams, dtype=H.dtype, device=H.device).unsqueeze(1))
    return Hd, lams


def cholesky(A: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """Cholesky of one or a batch of SPD matrices; raises CholeskyError instead of returning junk."""
    L, info = torch.linalg.cholesky_ex(A, upper=upper)
    if bool((info != 0).any()):  # NaN that slips through is caught by the final isfinite check
        raise CholeskyError("matrix is not positive definite")
    return L


@contextmanager
def one_thread(t: torch.Tensor):
    """On CPU, run the block with one torch thread. MKL's threaded Cholesky rounds differently for
    each thread count (measured: 1 vs 2 threads changed sparsegpt and multiweight weights), while
    its GEMMs here do not; pinning the few whole-matrix factorisations makes the solvers' results
    independent of the thread count, for ~0.1 s a call at c = 1536."""
    n = torch.get_num_threads()
    if t.device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper U with H⁻¹ = UᵀU; its trailing blocks give (H_FF)⁻¹ = U_FFᵀ U_FF for free."""
    with one_thread(H):
        return cholesky(torch.cholesky_inverse(cholesky(H)), upper=True)


def quota(sparsity: float, rows: int, i1: int, i2: int) -> int:
    """Pruned count for columns [i1, i2): cumulative rounding, so any split of the columns
    into blocks prunes exactly round(sparsity · rows · c) weights in total (half rounds up)."""
    def total(i):
        return int(sparsity * rows * i + 0.5)
    return total(i2) - total(i1)


def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k lowest entries; ties go to the lower row-major index (stable sort),
    which matters because 4-bit dequantized weights tie a lot."""
    flat = scores.flatten(-2)  # per item (leading dims) when batched
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(-1, torch.sort(flat, dim=-1, stable=True).indices[..., :k], True)
    return mask.view(scores.shape)


def lowest_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask of the n lowest of every m consecutive entries of each row (stable ties)."""
    *lead, r, c = scores.shape
    idx = torch.sort(scores.reshape(*lead, r, c // m, m), dim=-1, stable=True).indices[..., :n]
    mask = torch.zeros(*lead, r, c // m, m, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, idx, True).view(scores.shape)


def saliency_mask(W1: torch.Tensor, U1: torch.Tensor, k: int) -> torch.Tensor:
    """SparseGPT's block mask: prune the k lowest w²/U_jj² of the block."""
    return lowest(W1 ** 2 / diag(U1).unsqueeze(-2) ** 2, k)


def diag(A: torch.Tensor) -> torch.Tensor:
    """The diagonal of each item's matrix (last two dims)."""
    return A.diagonal(dim1=-2, dim2=-1)


def error(W: torch.Tensor, W0: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ), ΔW = W - W0, in float64 (half-precision inputs would lose ΔW itself)."""
    dW = W.double() - W0.double()
    return float(((dW @ H.double()) * dW).sum())


ERROR_BLOCK_BYTES = 16 << 20  # float64 columns of H converted at a time by report_error


def report_error(W: torch.Tensor, W0: torch.Tensor, H: torch.Tensor) -> float:
    """`error`, the number a solve reports, computed over blocks of H's columns: no float64 copy of
    the whole H (c² doubles: 134 MB at c = 4096) nor of ΔW H, only ΔW and one block at a time
    (ΔW in the same float64 values; the sum in another order, so the result may differ from
    `error` in its last bits). The solvers' decisions (admm's choice of mask) keep `error`."""
    dW = W.to(torch.float64, copy=True)  # a copy even when W is float64: it is changed in place next
    dW.sub_(W0)  # float32 -> float64 is exact: the same ΔW as W.double() - W0.double()
    c = H.shape[-1]
    step = max(1, ERROR_BLOCK_BYTES // (8 * c))
    total = torch.zeros((), dtype=torch.float64, device=dW.device)
    for a in range(0, c, step):
        total += ((dW @ H[:, a:a + step].double()) * dW[:, a:a + step]).sum()
    return float(total)
