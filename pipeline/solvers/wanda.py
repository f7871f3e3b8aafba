"""Wanda (Sun et al. 2023): score |w_ij| · ||X_j|| = |w_ij| · sqrt(H_jj), compared per output row."""
from __future__ import annotations

import torch

from .common import diag, lowest_nm, quota


def prune(W, H, sparsity=None, nm=None, pruned=None):
    """H is the undamped Hessian (damping would shift the scores)."""
    if pruned is None:
        r, c = W.shape[-2:]  # per item when batched (E x r x c, H: E x c x c)
        score = W.abs() * diag(H).clamp(min=0).sqrt().unsqueeze(-2)
        if nm:
            pruned = lowest_nm(score, *nm)
        else:
            # Each row prunes its own lowest scores, as Wanda does; cumulative rounding over the
            # rows makes the layer total exactly round(s·r·c) (every row gets s·c when integral).
            k = torch.tensor([quota(sparsity, c, i, i + 1) for i in range(r)], device=W.device)
            idx = torch.sort(score, dim=-1, stable=True).indices
            first = torch.arange(c, device=W.device) < k.unsqueeze(1)
            pruned = torch.zeros_like(idx, dtype=torch.bool).scatter_(-1, idx, first.expand(idx.shape))
    return W.masked_fill(pruned, 0), pruned
