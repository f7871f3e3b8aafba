"""Sparsity per layer: uniform, or OWL (Yin et al. 2024, "Outlier Weighed Layerwise sparsity").

OWL gives layers with more outliers a lower sparsity. A layer's outlier ratio is the share of
its scores |W_ij|·||X_j|| (all its pruned modules together; ||X_j|| over the calibration tokens
reaching the module in the *dense* model) above M times their mean. The ratios are mapped
linearly onto [0, 2λ] and subtracted from the target around their mean, weighted by the layers'
pruned parameter counts, so the overall sparsity is unchanged.

Counts are exact: every module gets a whole number of pruned weights, handed out by cumulative
rounding over the modules in order, so their sum is round(S · all pruned-module weights), what a
uniform run prunes when that product is whole (each module rounds separately there).
"""
from __future__ import annotations

import torch

from .models.generic import WeightUses, call_layer, plan_layer

ALLOCATIONS = ("uniform", "owl")
M = 5.0       # OWL's outlier threshold: scores above M x the layer's mean
LAMBDA = 0.08  # OWL's spread: layer sparsities within about ±λ of the target


def outlier_ratio(weights: list[torch.Tensor], col_sq: list[torch.Tensor], m: float = M) -> float:
    """Share of all |W_ij|·||X_j|| of one layer above m x their mean. col_sq: each module's mean
    x_j² over its tokens (the Hessian's diagonal); the same token count for every module of a
    layer makes this OWL's score up to one common factor, which the ratio ignores."""
    scores = [w.detach().float().abs() * s.float().clamp(min=0).sqrt().to(w.device) for w, s in zip(weights, col_sq)]
    total = sum(float(x.sum()) for x in scores)
    count = sum(x.numel() for x in scores)
    thresh = m * total / count
    return sum(int((x > thresh).sum()) for x in scores) / count


def owl_sparsities(ratios: list[float], sizes: list[int], target: float, lam: float = LAMBDA) -> list[float]:
    """Layer sparsities: target - (x_l - mean_w x), x = ratios mapped onto [0, 2λ], mean weighted by
    `sizes` (pruned weights per layer), so that Σ size·s = target·Σ size. Equal ratios: uniform."""
    lo, hi = min(ratios), max(ratios)
    x = [0.0 if hi == lo else (r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(a * n for a, n in zip(x, sizes)) / sum(sizes)
    out = [target - (a - mean) for a in x]
    if not all(0 < s < 1 for s in out):
        raise ValueError(f"OWL sparsities leave (0, 1) for target {target:g} and λ={lam:g}: "
                         f"{min(out):.3f}..{max(out):.3f}")
    return out


def module_counts(layer_sparsity: list[float], module_sizes: list[list[int]], target: float) -> list[list[int]]:
    """Pruned weights per module (layers x modules), by cumulative rounding over all modules in
    order; the grand total is exactly round(target · Σ sizes) (half up, as the solvers round)."""
    total_size = sum(sum(ms) for ms in module_sizes)
    want = int(target * total_size + 0.5)
    exact = sum(s * n for s, ms in zip(layer_sparsity, module_sizes) for n in ms)
    scale = want / exact if exact else 0.0  # removes float drift so the last total is `want`
    out, cum, done = [], 0.0, 0
    for s, ms in zip(layer_sparsity, module_sizes):
        row = []
        for n in ms:
            cum += s * n * scale
            k = min(want, int(cum + 0.5))
            row.append(min(n, max(0, k - done)))
            done += row[-1]
        out.append(row)
    out[-1][-1] += want - done  # float rounding of `cum` can leave at most a weight or two
    return out


@torch.no_grad()
def dense_column_norms(trunk, layer_ids: list[int], batches: list[torch.Tensor], calls: dict):
    """{layer: {matrix: (mean x_j² over its tokens, weight)}} for the matrices the job prunes, from
    one pass of the calibration batches through the dense layers (OWL's statistics; nothing is
    pruned). Inputs are seen as the solvers see them (`WeightUses`), experts on their routed tokens."""
    out = {}
    hidden = list(batches)
    for i in layer_ids:
        layer = trunk.load_layer(i)
        plan = plan_layer(layer, trunk.adapter, hidden[0], calls[tuple(hidden[0].shape[:2])][i])
        sums = {n: [torch.zeros(u.weight(layer).shape[1], dtype=torch.float64, device=trunk.device), 0]
                for n, u in plan.units.items()}

        def add(u, x):
            x = x.reshape(-1, x.shape[-1])
            sums[u.name][0] += (x.double() ** 2).sum(0)
            sums[u.name][1] += x.shape[0]
        with WeightUses(layer, plan.units, add):
            hidden = [call_layer(layer, b, calls[tuple(b.shape[:2])][i]) for b in hidden]
        out[i] = {n: (s / max(1, c), plan.units[n].weight(layer).detach().clone()) for n, (s, c) in sums.items()}
        trunk.unload_layer(i)
    return out


def owl_plan(trunk, batches: list[torch.Tensor], calls: dict, target: float,
             m: float = M, lam: float = LAMBDA) -> dict:
    """Per-module sparsities for every layer of `trunk` (OWL), with the facts behind them:
    {"module_sparsity": {"i.name": s}, "layer_sparsity": [...], "outlier_ratio": [...]}.
    Each module's s is count / size, so the solvers' round(s · size) prunes exactly that count."""
    ids = list(range(trunk.n_layers))
    stats = dense_column_norms(trunk, ids, batches, calls)
    names = [list(stats[i]) for i in ids]
    ratios = [outlier_ratio([stats[i][n][1] for n in names[i]], [stats[i][n][0] for n in names[i]], m) for i in ids]
    sizes = [[stats[i][n][1].numel() for n in names[i]] for i in ids]
    layer_s = owl_sparsities(ratios, [sum(s) for s in sizes], target, lam)
    counts = module_counts(layer_s, sizes, target)
    mod = {f"{i}.{n}": k / size for i in ids for n, k, size in zip(names[i], counts[i], sizes[i])}
    return {"module_sparsity": mod, "layer_sparsity": layer_s, "outlier_ratio": ratios,
            "pruned": sum(map(sum, counts)), "weights": sum(map(sum, sizes)), "M": m, "lambda": lam}
