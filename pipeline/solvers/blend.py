"""Pruning toward the dense model's outputs (asymmetric calibration; method.md section 8).

A module's input in the partly pruned model is X̂, the same module's input in the dense model on the
same tokens is X. With H = X̂X̂ᵀ/n and C = X̂Xᵀ/n, the blended objective

    f(Ŵ) = ||ŴX̂ - ((1-α)WX̂ + αWX)||² / n

equals tr((Ŵ - W_α) H (Ŵ - W_α)ᵀ) + const with W_α = W + α(W Cᵀ H⁻¹ - W), so every solver runs
unchanged on (W_α, H). The solvers damp H (H_d = H + λI, λ = percdamp · mean diag H), which at
α = 0 means minimising f + λ||Ŵ - W||²; `blended_weight` keeps that same ridge toward W for every α:

    W_α = W + α(W (C + λI)ᵀ H_d⁻¹ - W)

so that tr((Ŵ - W_α) H_d (Ŵ - W_α)ᵀ) = f(Ŵ) + λ||Ŵ - W||² + const exactly. It is computed in
float64 with a Cholesky solve (no explicit inverse). When X̂ = X (dense calibration), C = H and
W_α = W up to rounding.
"""
from __future__ import annotations

import torch

from .common import cholesky, one_thread

# auto: the blends it may choose per module. Each is scored without a solve (`heldout_curve`), so the
# grid costs nothing. Its top is set by fixed-α runs on SmolLM2 (docs/accuracy.md): multiweight + cg
# at 2:4 did worse at 0.4 than at 0.3, SparseGPT at 50% gained under 1% from 0.3 to 0.5, while each
# module's own held-out optimum lies higher (mean 0.51-0.72): errors every layer corrects add up.
STEP = 0.05
AUTO_MAX = 0.3
GRID = tuple(round(k * STEP, 2) for k in range(round(AUTO_MAX / STEP) + 1))


class CrossAccumulator:
    """Running mean of a bᵀ over tokens (a: pruned-stream input, b: dense-stream input, paired row by
    row), c x c, kept as a mean at every step as HessianAccumulator does."""

    def __init__(self, columns: int, dtype: torch.dtype = torch.float32, device=None):
        self.columns = columns
        self.cross = torch.zeros(columns, columns, dtype=dtype, device=device)
        self.count = 0

    @torch.no_grad()
    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a = a.detach().reshape(-1, self.columns).to(self.cross.device, self.cross.dtype)
        b = b.detach().reshape(-1, self.columns).to(self.cross.device, self.cross.dtype)
        if a.shape != b.shape:
            raise ValueError(f"paired inputs differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
        n = a.shape[0]
        if n == 0:
            return
        total = self.count + n
        with one_thread(a):  # as HessianAccumulator.add: MKL splits long token sums over threads
            self.cross.mul_(self.count / total).addmm_(a.T, b, alpha=1.0 / total)
        self.count = total

    @torch.no_grad()
    def merge(self, other: "CrossAccumulator") -> "CrossAccumulator":
        total = self.count + other.count
        if other.count:
            self.cross.mul_(self.count / total).add_(other.cross.to(self.cross), alpha=other.count / total)
            self.count = total
        return self


def damping(H: torch.Tensor, percdamp: float, dtype: torch.dtype = torch.float32) -> float:
    """The solvers' first-try λ (common.damped), computed on H as the solver will see it (in its
    working dtype: float64 if the weight or H is, else float32)."""
    H = H.to(torch.float64 if torch.float64 in (H.dtype, dtype) else torch.float32).clone()
    H.diagonal()[H.diagonal() == 0] = 1  # dead inputs, as prune_with_info sets them
    return percdamp * H.diagonal().mean().item()


@torch.no_grad()
def target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """W̃ = W (C + λI)ᵀ H_d⁻¹ in float64 (the α = 1 weight; H_d = H + λI, λ the solvers' first-try
    damping). Solved as H_d Z = (C + λI) Wᵀ, W̃ = Zᵀ."""
    H64 = H.detach().to(torch.float64).clone()
    dead = H64.diagonal() == 0
    H64.diagonal()[dead] = 1  # as the solvers do: dead inputs carry nothing
    lam = damping(H, percdamp, W.dtype)
    H64.diagonal().add_(lam)
    C64 = C.detach().to(torch.float64).clone()
    C64.diagonal().add_(lam)
    W64 = W.detach().to(torch.float64)
    with one_thread(H64):  # thread count must not change the bits (common.one_thread)
        L = cholesky(H64)
        Z = torch.cholesky_solve(C64 @ W64.T, L)
    return Z.T.contiguous()


@torch.no_grad()
def blended_weight(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, alpha: float,
                   percdamp: float = 0.01) -> torch.Tensor:
    """W_α (module doc) in W's dtype; α = 0 returns W itself, untouched."""
    if alpha == 0:
        return W
    return along(W, target(W, H, C, percdamp), alpha)


@torch.no_grad()
def along(W: torch.Tensor, T: torch.Tensor, alpha: float) -> torch.Tensor:
    """W + α(T - W) in float64, returned in W's dtype (T = `target(...)`: one factorisation serves
    every α of a grid); α = 0 returns W itself."""
    if alpha == 0:
        return W
    W64 = W.detach().to(torch.float64)
    return (W64 + alpha * (T - W64)).to(W.dtype)


@torch.no_grad()
def heldout_error(W_hat: torch.Tensor, W: torch.Tensor, H_h: torch.Tensor, C_h: torch.Tensor,
                  G_h: torch.Tensor) -> float:
    """||ŴX̂_h - WX_h||² / n_h from the held-out d x d matrices (H_h = X̂_hX̂_hᵀ/n_h,
    C_h = X̂_hX_hᵀ/n_h, G_h = X_hX_hᵀ/n_h): tr(ŴH_hŴᵀ) - 2 tr(ŴC_hWᵀ) + tr(WG_hWᵀ), float64."""
    A, B = W_hat.double(), W.double()
    return float(((A @ H_h.double()) * A).sum() - 2 * ((A @ C_h.double()) * B).sum()
                 + ((B @ G_h.double()) * B).sum())


@torch.no_grad()
def heldout_curve(W: torch.Tensor, T: torch.Tensor, H_h: torch.Tensor, C_h: torch.Tensor,
                  G_h: torch.Tensor) -> tuple[float, float, float, float]:
    """(e0, b, q, energy): heldout_error(W_α) = e0 + 2αb + α²q for W_α = W + α(T - W), the held-out
    error of the blended weight itself, a parabola in α, from four float64 products (no solve);
    energy = tr(W G_h Wᵀ), the dense outputs' mean square, the scale its rounding is relative to.
    Pruning W_α adds an error that barely depends on α, so the parabola's argmin stands in for that of
    the pruned weight's held-out error (docs/method.md, section 8)."""
    A, D = W.double(), T.double() - W.double()
    AH, AC = A @ H_h.double(), A @ C_h.double().T
    energy = float(((A @ G_h.double()) * A).sum())
    e0 = float((AH * A).sum() - 2 * (AC * A).sum()) + energy
    b = float((AH * D).sum() - (AC * D).sum())
    q = float(((D @ H_h.double()) * D).sum())
    return e0, b, q, energy
