"""One phase's solves split over several workers (the Ray stages' devices), merged back exactly.

A phase of a layer is a list of independent solves `(W, H, kwargs)`: the matrices of one or more
groups (q/k/v share H; an expert phase has one item per expert matrix). `assign` cuts them into
pieces for `n` workers and `merge` puts the pieces' results back together, so that a pool of
workers gives what `prune_with_info` gives item by item:

- Whole items go to one worker each (largest first, to the least loaded worker). Such a piece is
  the very same computation as in one process: bit-identical on the same kind of device and thread
  count.
- Items whose rows are independent once H is known (`row_separable`: N:M patterns, Wanda's per-row
  quota) fill the workers in order up to a common load when there are too few items to balance
  otherwise, an item being cut into contiguous row ranges only where it crosses from one worker to
  the next: at most n - 1 cuts per phase, so the work that depends on H alone (the factorisation,
  the N:M pattern tables) is rarely repeated and most items stay whole. Every row sees the same
  arithmetic as in the whole matrix except for how the BLAS kernels block a matrix of fewer rows,
  and the refit's early stop (all rows of a piece converged), so a split item equals the whole one
  up to float32 reassociation (tests: max |dW| <= 1e-5 max |W|).
  Unstructured masks of sparsegpt / multiweight pick each block's quota over all rows, magnitude's
  over the matrix, and admm's schedule follows the whole matrix: those are never cut.

- In an expert phase, consecutive experts of one shape and the same options form bundles of up
  to BUNDLE (within BUNDLE_BYTES of solver workspace), each solved in one batched call
  (`prune_many`) and handed out whole. Bundles depend only on the phase, never on the number of
  workers, so one process and K stages solve the same batches: the same bits.

A failed factorisation raises the damping of the piece that failed only; `merge` re-solves the
other pieces of that item at the raised damping (`resolve`), which is what the whole item gets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .solvers import PruneResult, many_bytes, prune_many, prune_with_info

SPLIT_BELOW = 4  # cut row-separable items into row ranges while items < SPLIT_BELOW x workers
MIN_ROWS = 8     # no piece of a cut item is thinner (its per-call work would outweigh its rows)
# A call's fixed work in rows of the same matrix: SmolLM2's 2:4 + cg solves (one thread) cost
# ~0.035 s + 0.39 ms a row at 576 columns (k_proj against q_proj), and a 576 x 1536 down_proj cut
# in two ~0.15 s more than whole at 1.9 ms a row: 80-90 and ~77 rows.
PIECE_ROWS = 80
# Experts per batched call: the 64-expert benchmark layer gains 1.2-2.4x from batching
# (jobs.bench_moe); bundles of 8 keep most of it and still spread evenly over a few workers.
BUNDLE = 8
BUNDLE_BYTES = 1 << 30  # solver workspace of one bundle, at most (solvers.many_bytes)


@dataclass
class Piece:
    item: int                 # index of the (first) item it belongs to
    rows: tuple[int, int]     # row range [a, b) of the item's weight
    cost: float
    count: int = 1            # consecutive items solved together (a bundle of experts)


def row_separable(kw: dict) -> bool:
    """Whether each row's result depends only on that row, H and the options (see the module doc)."""
    if kw.get("mask") is not None:
        return True
    if kw.get("method") == "admm":
        return False
    return kw.get("nm") is not None or kw.get("method") == "wanda"


def cost(r: int, c: int) -> float:
    """A piece of r rows and c columns: the cubic solvers' work grows as rows x columns², plus what
    every call does once whatever its rows (H's factorisation, the N:M pattern tables, copies)."""
    return float(r + PIECE_ROWS) * c * c


def _key(W: torch.Tensor, H: torch.Tensor, kw: dict):
    if any(isinstance(v, torch.Tensor) for v in kw.values()):
        return None
    return (tuple(W.shape), W.dtype, H.dtype, W.device, tuple(sorted((k, repr(v)) for k, v in kw.items())))


def bundles(items: list[tuple]) -> list[tuple[int, int]]:
    """(first item, count) runs of consecutive items that one prune_many call can take."""
    out: list[tuple[int, int]] = []
    last = None
    for i, (W, H, kw) in enumerate(items):
        key = _key(W, H, kw)
        if out and key is not None and key == last:
            first, n = out[-1]
            size = many_bytes(*W.shape, kw.get("method", "multiweight"), nm=kw.get("nm"), refit=kw.get("refit"),
                              dtype=torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32)
            if n < BUNDLE and (n + 1) * size <= BUNDLE_BYTES:
                out[-1] = (first, n + 1)
                continue
        out.append((i, 1))
        last = key
    return out


def assign(shapes: list[tuple[int, int]], kws: list[dict], n: int,
           runs: list[tuple[int, int]] | None = None) -> list[list[Piece]]:
    """Pieces per worker (worker 0 is the caller) for items of `shapes` (rows, columns); `runs`:
    bundles of items solved together (default: every item alone).

    Whole items go largest first to the least loaded worker. Then, when there are few items,
    the row-separable ones fill the workers up to a common level in order, an item being cut only
    where it crosses from one worker to the next (McNaughton's wrap-around rule): at most n - 1
    cuts, so few pieces repeat the per-call work that depends on H alone (its factorisation, the
    N:M pattern tables), and an item that fits one worker stays whole, bit-identical."""
    loads = [0.0] * n
    out: list[list[Piece]] = [[] for _ in range(n)]
    runs = runs or [(i, 1) for i in range(len(shapes))]
    split = n > 1 and len(runs) < SPLIT_BELOW * n
    whole, cut = [], []
    for i, count in runs:
        (r, c), kw = shapes[i], kws[i]
        if count == 1 and split and row_separable(kw) and r >= 2 * MIN_ROWS:
            cut.append(i)
        else:
            whole.append(Piece(i, (0, r), count * cost(r, c), count))
    for p in sorted(whole, key=lambda p: (-p.cost, p.item)):
        j = min(range(n), key=lambda j: (loads[j], j))
        out[j].append(p)
        loads[j] += p.cost
    if cut:
        widest = max(shapes[i][1] for i in cut)  # up to n - 1 cuts add a piece each
        room = _fill(loads, sum(cost(*shapes[i]) for i in cut) + (n - 1) * cost(0, widest))
        j = 0
        for i in cut:
            (r, c), a = shapes[i], 0
            while a < r:
                take = r - a if j == n - 1 else min(r - a, round(room[j] / (c * c)) - PIECE_ROWS)
                if r - a - take < MIN_ROWS:  # no sliver left for the next worker
                    take = r - a
                if take >= MIN_ROWS or take == r - a:
                    out[j].append(Piece(i, (a, a + take), cost(take, c)))
                    loads[j] += cost(take, c)
                    room[j] -= cost(take, c)
                    a += take
                if a < r or room[j] < cost(MIN_ROWS, c) / 2:
                    j = min(j + 1, n - 1)
    return out


def _fill(loads: list[float], total: float) -> list[float]:
    """Room per worker when `total` more work raises every worker to a common level (those already
    above it get none)."""
    ranked = sorted(loads)
    for k in range(len(ranked)):
        level = (total + sum(ranked[:k + 1])) / (k + 1)
        if k + 1 == len(ranked) or level <= ranked[k + 1]:
            break
    return [max(0.0, level - x) for x in loads]


def solve_piece(W: torch.Tensor, H: torch.Tensor, kw: dict, rows: tuple[int, int]) -> PruneResult:
    a, b = rows
    kw = dict(kw)
    if kw.get("mask") is not None:
        kw["mask"] = kw["mask"][a:b]
    whole = a == 0 and b == W.shape[0]
    return prune_with_info(W if whole else W[a:b], H, **kw)


def merge(items: list[tuple], done: list[tuple[Piece, PruneResult]], resolve=None) -> list[PruneResult]:
    """One result per item from its pieces' results, `done` = (piece, result) with bundles already
    unpacked into single-item pieces (`unbundle`), in any order. `resolve(piece, percdamp)` (default:
    solve it here) solves a piece again at a given damping, for pieces that did not need the damping
    another piece of the same item was raised to."""
    resolve = resolve or resolver(items)
    by_item: dict[int, list[tuple[Piece, PruneResult]]] = {}
    for p, res in done:
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
    """Every solve here: the single-process job (experts in bundles when `batch`)."""

    def solve(self, items: list[tuple[torch.Tensor, torch.Tensor, dict]], batch: bool = False) -> list[PruneResult]:
        runs = bundles(items) if batch else [(i, 1) for i in range(len(items))]
        pieces = [Piece(i, (0, items[i][0].shape[0]), 0.0, n) for i, n in runs]
        return merge(items, solve_here(items, pieces))


def solve_here(items: list[tuple], pieces: list[Piece]) -> list[tuple[Piece, PruneResult]]:
    """A worker's share: its pieces, solved in order, bundles unpacked into one (piece, result) per
    item. An error carries the failing item's index (`e.item`), for a message naming the matrix."""
    out = []
    for p in pieces:
        try:
            if p.count > 1:
                group = items[p.item:p.item + p.count]
                out += unbundle(items, p, prune_many([W for W, _, _ in group], [H for _, H, _ in group], **group[0][2]))
            else:
                out.append((p, solve_piece(*items[p.item], p.rows)))
        except (ValueError, RuntimeError, FloatingPointError) as e:
            e.item = p.item
            if p.count > 1 and e.args and isinstance(e.args[0], str) and e.args[0].startswith("item "):
                k, _, rest = e.args[0][5:].partition(": ")  # prune_many names the item in its batch
                if k.isdigit():
                    e.item, e.args = p.item + int(k), (rest,) + e.args[1:]
            raise
    return out


def unbundle(items: list[tuple], p: Piece, results: list[PruneResult]) -> list[tuple[Piece, PruneResult]]:
    """A piece's results as (single-item piece, result) pairs, as `merge` takes them."""
    if p.count == 1:
        return [(p, results[0])]
    return [(Piece(p.item + e, (0, items[p.item + e][0].shape[0]), 0.0), r) for e, r in enumerate(results)]


def resolver(items: list[tuple]):
    def resolve(p: Piece, percdamp: float) -> PruneResult:
        W, H, kw = items[p.item]
        return solve_piece(W, H, dict(kw, percdamp=percdamp), p.rows)
    return resolve
