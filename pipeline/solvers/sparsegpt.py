"""SparseGPT (Frantar & Alistarh 2023), following the reference sparsegpt.py: OBS one column
at a time, 128-column blocks with lazy far updates, saliency w²/U_jj² (U: upper Cholesky of H⁻¹),
mask per block (unstructured) or per m columns on the weights updated so far (N:M).

Only difference: the mask prunes exactly the quota with stable tie-breaking, where the reference
prunes every weight tied with its threshold (4-bit weights tie a lot)."""
from __future__ import annotations

import torch

from .common import diag, inverse_cholesky, lowest_nm, quota, saliency_mask


def prune(W, H, sparsity=None, nm=None, pruned=None, blocksize=128):
    """W: dead columns already zeroed; H: damped. Returns (new W, pruned mask). Batched: W is
    E x r x c and H E x c x c; every item is solved as alone (masks per item)."""
    r, c = W.shape[-2:]
    W = W.clone()
    U = inverse_cholesky(H)
    if nm:
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])  # N:M groups must not straddle blocks
    out = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, c, blocksize):
        i2 = min(i1 + blocksize, c)
        W1 = W[..., i1:i2].clone()
        U1 = U[..., i1:i2, i1:i2]
        d = diag(U1).unsqueeze(-2)  # 1 x b (E x 1 x b): broadcasts over the rows
        Err1 = torch.zeros_like(W1)
        if pruned is not None:
            mask1 = pruned[..., i1:i2]
        elif nm is None:
            mask1 = saliency_mask(W1, U1, quota(sparsity, r, i1, i2))
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pruned is None and nm and i % nm[1] == 0:
                m = nm[1]
                mask1[..., i:i + m] = lowest_nm(W1[..., i:i + m] ** 2 / d[..., i:i + m] ** 2, *nm)
            w = W1[..., i]
            err = w.masked_fill(~mask1[..., i], 0) / d[..., i]  # (w - q)/U_ii, q = w with pruned zeroed
            W1[..., i:] -= err.unsqueeze(-1) * U1[..., i:i + 1, i:]
            Err1[..., i] = err
        W1[mask1] = 0
        W[..., i1:i2] = W1
        W[..., i2:] -= Err1 @ U[..., i1:i2, i2:]
        out[..., i1:i2] = mask1
    return W, out
