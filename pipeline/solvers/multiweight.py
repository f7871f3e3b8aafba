"""Multi-weight optimal pruning (Zhao et al. 2024; derivation in method.md sections 2-3).

Columns are walked in groups B inside SparseGPT's column blocks; U is the upper Cholesky factor
of H⁻¹, G = U_BBᵀ U_BB. For a row w with pruned set P ⊂ B, the least-squares optimal change of
all columns from B onward (columns left of B frozen) is
    G_PP y = w_P,   z = y U_B,Pᵀ,   W[:, i1:] -= z U_B,i1:
which zeroes P exactly. group=1 is SparseGPT's update; group=c (and blocksize=c) is the
row-wise least-squares solution for the mask. Far columns get each block's updates at once.

Masks. Unstructured: per block, SparseGPT's saliency w²/U_jj² on the weights updated so far.
N:M: each m-column group's pattern is chosen on the weights updated up to that group
(mask_rule "exact": the least loss(P) = w_P (G_PP)⁻¹ w_Pᵀ over all C(m, n) patterns;
"saliency": the n lowest w²/U_jj²); with group > m that sequential pass only picks the mask and
the block is then re-solved from its start in groups of `group` columns with that mask.

Batched (W: E x r x c, H: E x c x c, each item its own H): the same walk for all items at once;
the rows of all items are stacked into the row solves, each row gathering its own item's matrix.
"""
from __future__ import annotations

import itertools
import math

import torch

from .common import cholesky, diag, inverse_cholesky, lowest_nm, quota, saliency_mask

# Defaults from `python -m jobs.bench_solvers` (12 real SmolLM2 layers; error / CPU time vs
# SparseGPT, geometric means). 50%: group 8 0.990/1.9x, 16 0.979/1.4x, 32 0.961/1.2x,
# 64 0.931/1.2x, 128 0.908/1.6x, 256 (block 256) 0.886/3.2x. 2:4 | 4:8: group m 0.992/0.7x |
# 0.982/0.8x, 64 0.938/1.4x | 0.935/1.5x, 128 0.914/2.1x | 0.912/2.1x; at 128 the rule "exact"
# beats "saliency" by 0.2-0.5% at the same cost.
GROUP = 128        # unstructured: one group per 128-column block
NM_GROUP = 128     # N:M re-solve group (a multiple of m); the mask is still chosen per m columns
NM_RULE = "exact"  # N:M mask rule
RULES = ("saliency", "exact")
BUCKETS = 4        # row buckets per solve: each padded to its own largest system, not the group's
# ... when the rows of many items (experts) are stacked into one solve (smaller buckets: less
# padding, and temporaries that stay in cache). 64 experts of jobs.bench_moe, one thread, CPU s per
# layer: 50% 4 buckets 1.55, 32 1.21-1.32, 64-128 1.25-1.33, 256 1.37 (looped 1.86); 2:4 4 buckets
# 1.87, 32 1.11-1.20, 64-128 1.07-1.14.
BUCKETS_MANY = 32
MAX_PATTERNS = 1000  # beyond this many C(m, n) patterns, N:M masks use saliency and a per-row solve


def solve_rows(A, R, sel, buckets=None, item=None):
    """X (r x b), zero outside sel, with A_SS x_r = R_r,S for each row r (S = sel_r, A SPD).

    Each row's system is compacted to its own set; rows are sorted by |S| and split into buckets
    padded (with identity) to their own largest |S|, so the cubic cost follows each row's size.
    Batched: A is E x b x b and item[r] names row r's matrix (rows of all items in one solve)."""
    buckets = buckets or (BUCKETS if item is None else BUCKETS_MANY)
    if item is not None:  # row k of item e is row e·b + k of the stacked matrices
        b = A.shape[-1]
        A, base = A.reshape(-1, b), item * b
    cnt = sel.sum(1)
    order = torch.argsort(cnt, stable=True)
    X = torch.zeros_like(R)
    for rows in order.tensor_split(min(buckets, len(order))):
        p = int(cnt[rows[-1]])
        if p == 0:
            continue
        s, c = sel[rows], cnt[rows]
        idx = torch.sort((~s).to(torch.uint8), dim=1, stable=True).indices[:, :p]  # S first
        ridx = idx if item is None else idx + base[rows].unsqueeze(1)
        # rows, then columns: much faster than one 2-D advanced index on CPU
        M = torch.gather(A.index_select(0, ridx.flatten()).view(len(rows), p, -1), 2,
                         idx.unsqueeze(1).expand(-1, p, -1))
        rhs = torch.gather(R[rows], 1, idx)
        if int(c[0]) < p:  # padding: identity rows/columns, zero right-hand side
            valid = torch.arange(p, device=R.device) < c.unsqueeze(1)
            M = torch.where(valid.unsqueeze(2) & valid.unsqueeze(1), M,
                            torch.eye(p, dtype=A.dtype, device=A.device))
            rhs = rhs * valid
        x = torch.cholesky_solve(rhs.unsqueeze(2), cholesky(M)).squeeze(2)
        X[rows] = torch.zeros(len(rows), R.shape[1], dtype=R.dtype, device=R.device).scatter_(1, idx, x)
    return X


def group_update(Ug, Wg, P):
    """V (r x b), the change of the group's own columns (W_B -= V), and Z with V = Z U_BB.

    Two exact routes; each row takes the one with the smaller system, so none exceeds b/2:
      |P| <= |K|:  G_PP y = w_P,  V = y G_P,:            (G = U_BBᵀ U_BB)
      |K| <  |P|:  v_P = w_P,  S_KK v_K = -(w_P S_P,K)   (S = G⁻¹, K = kept columns of B)"""
    b = Ug.shape[-1]
    eye = torch.eye(b, dtype=Ug.dtype, device=Ug.device)
    Uinv = torch.linalg.solve_triangular(Ug, eye.expand(Ug.shape), upper=True)
    small = P.sum(-1) <= b // 2
    V = torch.zeros_like(Wg)
    if bool(small.any()):
        G = Ug.mT @ Ug
        V[small] = _rows_mm(solve_rows(G, Wg[small], P[small], item=_items(small)), G, small)
    if not bool(small.all()):
        S = Uinv @ Uinv.mT
        Wp = Wg[~small] * P[~small]
        V[~small] = Wp - solve_rows(S, _rows_mm(Wp, S, ~small), ~P[~small], item=_items(~small))
    return V, V @ Uinv


def _items(rows):
    """For a batched row selection (E x r bool): the item of each selected row; None unbatched."""
    return None if rows.dim() == 1 else rows.nonzero()[:, 0]


def _rows_mm(X, A, rows):
    """X @ A for the selected rows X = Y[rows]; batched, each row by its own item's A (put back in
    place, one batched product, selected again)."""
    if rows.dim() == 1:
        return X @ A
    full = X.new_zeros(*rows.shape, X.shape[-1])
    full[rows] = X
    return (full @ A)[rows]


class Patterns:
    """The C(m, n) ways to prune n of m columns. G = U_BBᵀ U_BB of every m-column group depends on
    H alone, so the inverses (G_PP)⁻¹ of all groups and patterns come from one batched call at the
    start and are shared by all rows: choosing and solving an N:M group needs no factorisation."""

    def __init__(self, n, m, U):
        dev = U.device
        self.n, self.m = n, m
        self.Q = None
        if math.comb(m, n) > MAX_PATTERNS:
            return
        self.idx = torch.tensor(list(itertools.combinations(range(m), n)), device=dev)  # C x n
        # bitmask of a pattern -> its index, to map a saliency choice to its pattern
        self.lookup = torch.zeros(1 << m, dtype=torch.long, device=dev)
        self.lookup[(1 << self.idx).sum(1)] = torch.arange(len(self.idx), device=dev)
        cols = torch.arange(U.shape[-1], device=dev).view(-1, m)
        Ug = U[..., cols.unsqueeze(2), cols.unsqueeze(1)]                  # (E x) groups x m x m
        G = Ug.mT @ Ug                                                      # (E x) groups x m x m
        i, j = self.idx.unsqueeze(2), self.idx.unsqueeze(1)
        Ginv = torch.cholesky_inverse(cholesky(G[..., i, j]))              # (E x) groups x C x n x n
        # (G_PP)⁻¹ embedded in m x m, per group and pattern: (E x) groups x C x m x m
        self.Q = torch.zeros(*Ginv.shape[:-2], m, m, dtype=U.dtype, device=dev)
        self.Q[..., torch.arange(len(self.idx), device=dev).view(-1, 1, 1), i, j] = Ginv

    def solve(self, g, Ug, Wg, rule):
        """Choose each row's pattern in m-column group number g; returns (Z, pruned)."""
        m = self.m
        if self.Q is None:  # too many patterns to tabulate
            P = lowest_nm(Wg ** 2 / diag(Ug).unsqueeze(-2) ** 2, self.n, m)
            return group_update(Ug, Wg, P)[1], P
        Q = self.Q[..., g, :, :, :]
        if rule == "exact":
            # w_P (G_PP)⁻¹ w_Pᵀ
            loss = (Wg.unsqueeze(-1) * Wg.unsqueeze(-2)).flatten(-2) @ Q.flatten(-2).mT
            choice = loss.argmin(-1)  # first minimum: ties go to the first pattern
        else:
            low = lowest_nm(Wg ** 2 / diag(Ug).unsqueeze(-2) ** 2, self.n, m)
            choice = self.lookup[(low.long() << torch.arange(m, device=Wg.device)).sum(-1)]
        Qc = Q[choice] if choice.dim() == 1 else \
            Q[torch.arange(len(Q), device=Q.device).unsqueeze(1), choice]  # each row its item's
        Y = torch.einsum("...rm,...rmk->...rk", Wg, Qc)
        P = torch.zeros_like(Wg, dtype=torch.bool).scatter_(-1, self.idx[choice], True)
        return Y @ Ug.mT, P


def sweep(W1, U1, P1, group, pats=None, rule=None, i1=0):
    """Walk one block (starting at column i1) in groups, updating W1 in place (P1 too when pats
    chooses N:M masks); returns Z1, the block's accumulated updates for the columns to its right."""
    Z1 = torch.zeros_like(W1)
    for g1 in range(0, W1.shape[-1], group):
        g2 = min(g1 + group, W1.shape[-1])
        Ug = U1[..., g1:g2, g1:g2]
        if pats is not None:
            Z, P1[..., g1:g2] = pats.solve((i1 + g1) // group, Ug, W1[..., g1:g2], rule)
            W1[..., g1:] -= Z @ U1[..., g1:g2, g1:]
        else:
            V, Z = group_update(Ug, W1[..., g1:g2], P1[..., g1:g2])
            W1[..., g1:g2] -= V
            W1[..., g2:] -= Z @ U1[..., g1:g2, g2:]
        Z1[..., g1:g2] = Z
    return Z1


def prune(W, H, sparsity=None, nm=None, pruned=None, blocksize=128, group=None, mask_rule=None):
    """W: dead columns already zeroed; H: damped. Returns (new W, pruned mask).

    group: columns solved jointly (clipped to the block); defaults GROUP (unstructured) and
    NM_GROUP (N:M, a multiple of m). A fixed `pruned` mask works with any group. Batched: W is
    E x r x c and H E x c x c; every item is solved as alone (masks per item)."""
    r, c = W.shape[-2:]
    W = W.clone()
    U = inverse_cholesky(H)
    pats = None
    if nm:
        n, m = nm
        blocksize = max(m, blocksize // m * m)  # N:M groups must not straddle blocks
        if pruned is None:
            pats = Patterns(n, m, U)
            group = max(m, (group or NM_GROUP) // m * m)
    group = group or GROUP
    out = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, c, blocksize):
        i2 = min(i1 + blocksize, c)
        W1 = W[..., i1:i2].clone()
        U1 = U[..., i1:i2, i1:i2]
        if pruned is not None:
            P1 = pruned[..., i1:i2].clone()
        elif nm is None:
            P1 = saliency_mask(W1, U1, quota(sparsity, r, i1, i2))
        else:
            P1 = torch.zeros_like(W1, dtype=torch.bool)
        if pats is not None and group == m:
            Z1 = sweep(W1, U1, P1, m, pats, mask_rule or NM_RULE, i1)
        else:
            if pats is not None:  # pass 1 picks the N:M mask; pass 2 re-solves with it
                sweep(W1.clone(), U1, P1, m, pats, mask_rule or NM_RULE, i1)
            Z1 = sweep(W1, U1, P1, group)
        W1[P1] = 0
        W[..., i1:i2] = W1
        W[..., i2:] -= Z1 @ U[..., i1:i2, i2:]
        out[..., i1:i2] = P1
    return W, out
