"""Streaming layer Hessian: H = X Xᵀ / n, the running mean over every token seen."""
from __future__ import annotations

import torch

from .common import one_thread


class HessianAccumulator:
    """Accumulates the c x c input Hessian of a linear layer without keeping activations.

    `add(x)` takes activations of shape (..., c); `hessian` is the mean of x xᵀ over all
    `count` tokens so far. Pass dtype=torch.float64 for long runs or wide layers.
    """

    def __init__(self, columns: int, dtype: torch.dtype = torch.float32, device=None):
        if columns <= 0:
            raise ValueError(f"columns must be positive, got {columns}")
        if not dtype.is_floating_point or dtype.itemsize < 4:
            raise ValueError(f"accumulate in float32 or float64, got {dtype}")
        self.columns = columns
        self.hessian = torch.zeros(columns, columns, dtype=dtype, device=device)
        self.count = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.columns:
            raise ValueError(f"activations have {x.shape[-1]} features, expected {self.columns}")
        x = x.detach().reshape(-1, self.columns).to(self.hessian.device, self.hessian.dtype)
        n = x.shape[0]
        if n == 0:
            return
        total = self.count + n
        # Rescale-then-add keeps H a mean at every step (no huge sums in float32). One thread: where
        # tokens outnumber columns (measured on MKL, 2 threads: from 512 tokens at 64 columns, 8192
        # at 576, 16384 at 1536) MKL splits the token sum over threads, and the bits then depend on
        # the thread count (tests/test_determinism.py).
        with one_thread(x):
            self.hessian.mul_(self.count / total).addmm_(x.T, x, alpha=1.0 / total)
        self.count = total

    @torch.no_grad()
    def merge(self, other: "HessianAccumulator") -> "HessianAccumulator":
        """Fold another accumulator's tokens into this one (token-weighted mean); returns self."""
        if other.columns != self.columns:
            raise ValueError(f"cannot merge {other.columns} columns into {self.columns}")
        total = self.count + other.count
        if other.count:
            h = other.hessian.to(self.hessian.device, self.hessian.dtype)
            self.hessian.mul_(self.count / total).add_(h, alpha=other.count / total)
            self.count = total
        return self
