"""Magnitude pruning: drop the smallest |w| of the whole layer (or of each m-group for N:M)."""
from __future__ import annotations

from .common import lowest, lowest_nm, quota


def prune(W, H, sparsity=None, nm=None, pruned=None):
    if pruned is None:
        score = W.abs()
        r, c = W.shape[-2:]  # per item when batched (E x r x c)
        pruned = lowest_nm(score, *nm) if nm else lowest(score, quota(sparsity, r, 0, c))
    return W.masked_fill(pruned, 0), pruned
