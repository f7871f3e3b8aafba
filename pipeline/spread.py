"""One phase's solves split over several workers (the Ray stages' devices), merged back exactly.

A phase of a layer is a list of independent solves `(W, H, kwargs)`: the matrices of one or more
groups (q/k/v share H; an expert phase has one item per expert matrix). `assign` cuts them into
pieces for `n` workers and `merge` puts the pieces' results back together, so that a pool of
workers gives what `prune_with_info` gives item by item:

- Whole items go to one worker each (largest first, to the least loaded worker). Such a piece is
  the very same computation as in one process: bit-identical on the same kind of device and thread
  count.
- Items whose rows are independent once H is known (`row_separable`: N:M patterns, Wanda's per-row
  quota) are cut into n contiguous row ranges when there are too few items to balance otherwise.
  Every row sees the same arithmetic as in the whole matrix except for how the BLAS kernels block
  a matrix of fewer rows, and the refit's early stop (all rows of a piece converged), so a split
  item equals the whole one up to float32 reassociation (tests: max |dW| <= 1e-5 max |W|).
  Unstructured masks of sparsegpt / multiweight pick each block's quota over all rows, magnitude's
  over the matrix, and admm's schedule follows the whole matrix: those are never cut.

A failed factorisation raises the damping of the piece that failed only; `merge` re-solves the
other pieces of that item at the raised damping (`resolve`), which is what the whole item gets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .solvers import PruneResult, prune_with_info

SPLIT_BELOW = 4  # cut row-separable items into row ranges while items < SPLIT_BELOW x workers


@dataclass
class Piece:
    item: int                 # index of the item it belongs to
    rows: tuple[int, int]     # row range [a, b) of the item's weight
    cost: float


def row_separable(kw: dict) -> bool:
    """Whether each row's result depends only on that row, H and the options (see the module doc)."""
    if kw.get("mask") is not None:
        return True
    if kw.get("method") == "admm":
        return False
    return kw.get("nm") is not None or kw.get("method") == "wanda"


def cost(r: int, c: int) -> float:
    return float(r) * c * c  # the cubic solvers' work grows as rows x columns²


def assign(shapes: list[tuple[int, int]], kws: list[dict], n: int) -> list[list[Piece]]:
    """Pieces per worker (worker 0 is the caller) for items of `shapes` (rows, columns)."""
    loads = [0.0] * n
    out: list[list[Piece]] = [[] for _ in range(n)]
    split = n > 1 and len(shapes) < SPLIT_BELOW * n
    whole = []
    for i, ((r, c), kw) in enumerate(zip(shapes, kws)):
        if split and row_separable(kw) and r >= n:
            bounds = [r * j // n for j in range(n + 1)]
            for j in range(n):
                a, b = bounds[j], bounds[j + 1]
                out[j].append(Piece(i, (a, b), cost(b - a, c)))
                loads[j] += cost(b - a, c)
        else:
            whole.append(i)
    for i in sorted(whole, key=lambda i: -cost(*shapes[i])):
        j = min(range(n), key=lambda j: (loads[j], j))
        out[j].append(Piece(i, (0, shapes[i][0]), cost(*shapes[i])))
        loads[j] += cost(*shapes[i])
    return out


def solve_piece(W: torch.Tensor, H: torch.Tensor, kw: dict, rows: tuple[int, int]) -> PruneResult:
    a, b = rows
    kw = dict(kw)
    if kw.get("mask") is not None:
        kw["mask"] = kw["mask"][a:b]
    whole = a == 0 and b == W.shape[0]
    return prune_with_info(W if whole else W[a:b], H, **kw)


def merge(items: list[tuple], pieces: list[Piece], results: list[PruneResult], resolve) -> list[PruneResult]:
    """One result per item from its pieces' results (in any order). `resolve(piece, percdamp)` solves
    a piece again at a given damping, for pieces that did not need the damping another piece of
    the same item was raised to."""
    by_item: dict[int, list[tuple[Piece, PruneResult]]] = {}
    for p, res in zip(pieces, results):
        by_item.setdefault(p.item, []).append((p, res))
    out = []
    for i in range(len(items)):
        parts = sorted(by_item[i], key=lambda pr: pr[0].rows[0])
        pd = max(res.percdamp for _, res in parts)
        parts = [(p, res if res.percdamp == pd else resolve(p, pd)) for p, res in parts]
        if len(parts) == 1:
            out.append(parts[0][1])
            continue
        first = parts[0][1]
        out.append(PruneResult(
            weight=torch.cat([res.weight for _, res in parts]), mask=torch.cat([res.mask for _, res in parts]),
            error=sum(res.error for _, res in parts), damping=first.damping, percdamp=pd,
            seconds=sum(res.seconds for _, res in parts), cpu_seconds=sum(res.cpu_seconds for _, res in parts),
            method=first.method, pattern=first.pattern, refit=first.refit))
    return out


class LocalPool:
    """Every solve here, item by item: the single-process job."""

    workers = 1

    def solve(self, items: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> list[PruneResult]:
        return solve_here(items, [Piece(i, (0, W.shape[0]), 0.0) for i, (W, _, _) in enumerate(items)])


def solve_here(items: list[tuple], pieces: list[Piece]) -> list[PruneResult]:
    """A worker's share: its pieces, solved in order. An error carries the failing item's index
    (`e.item`), for a message naming the matrix."""
    out = []
    for p in pieces:
        try:
            out.append(solve_piece(*items[p.item], p.rows))
        except (ValueError, RuntimeError, FloatingPointError) as e:
            e.item = p.item
            raise
    return out


def resolver(items: list[tuple]):
    def resolve(p: Piece, percdamp: float) -> PruneResult:
        W, H, kw = items[p.item]
        return solve_piece(W, H, dict(kw, percdamp=percdamp), p.rows)
    return resolve
