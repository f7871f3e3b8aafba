"""MoE layer cost: `python -m jobs.bench_moe [--experts 64] [--hidden 256] [--inter 64] [--out DIR]`.

Solves the matrices of one mixture-of-experts MLP (E experts, each gate/up: 2I x d and down:
d x I, each with its own Hessian from its own routed tokens) and, in the same process, one dense
MLP of the same total size (gate/up: 2EI x d, down: d x EI, one Hessian each), with every method at
50% and 2:4. Prints seconds per layer and the ratio MoE / dense; writes moe.json.

Activations are random with correlated features (a fixed random mixing), tokens routed top-k by
a random router, so experts get uneven token counts as in a real model.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pipeline.solvers import HessianAccumulator, prune_with_info

METHODS = ("magnitude", "wanda", "sparsegpt", "multiweight")
PATTERNS = ("0.5", "2:4")


def _kw(pattern: str) -> dict:
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        return {"nm": (n, m)}
    return {"sparsity": float(pattern)}


def problems(experts: int, hidden: int, inter: int, tokens: int, top_k: int = 2, seed: int = 0):
    """(moe, dense): lists of (weight, hessian) for one MoE MLP and one dense MLP of the same size."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(hidden, hidden, generator=g) / hidden ** 0.5
    x = torch.randn(tokens, hidden, generator=g) @ mix
    route = (x @ torch.randn(hidden, experts, generator=g)).topk(top_k, dim=1).indices
    act = torch.nn.functional.silu

    def mlp(w_gu, w_d, xs):
        acc_in = HessianAccumulator(hidden)
        acc_in.add(xs)
        gate, up = (xs @ w_gu.T).chunk(2, dim=1)
        acc_mid = HessianAccumulator(w_d.shape[1])
        acc_mid.add(act(gate) * up)
        return [(w_gu, acc_in.hessian), (w_d, acc_mid.hessian)]

    moe = []
    for e in range(experts):
        xs = x[(route == e).any(1)]
        if len(xs) == 0:
            xs = x[:1]
        moe += mlp(torch.randn(2 * inter, hidden, generator=g) / hidden ** 0.5,
                   torch.randn(hidden, inter, generator=g) / inter ** 0.5, xs)
    dense = mlp(torch.randn(2 * experts * inter, hidden, generator=g) / hidden ** 0.5,
                torch.randn(hidden, experts * inter, generator=g) / (experts * inter) ** 0.5, x)
    return moe, dense


def layer_seconds(mats, method: str, pattern: str) -> float:
    """CPU seconds (process time) to solve every matrix: robust to other work on a shared box."""
    t0 = time.process_time()
    for w, h in mats:
        prune_with_info(w, h, method, **_kw(pattern))
    return time.process_time() - t0


def run(experts: int = 64, hidden: int = 256, inter: int = 64, tokens: int = 4096, repeats: int = 1,
        methods=METHODS, patterns=PATTERNS) -> dict:
    moe, dense = problems(experts, hidden, inter, tokens)
    rows = []
    for pattern in patterns:
        for method in methods:
            t_moe = min(layer_seconds(moe, method, pattern) for _ in range(repeats))
            t_dense = min(layer_seconds(dense, method, pattern) for _ in range(repeats))
            rows.append({"method": method, "pattern": pattern, "moe_s": t_moe, "dense_s": t_dense,
                         "ratio": t_moe / t_dense})
    return {"experts": experts, "hidden": hidden, "inter": inter, "tokens": tokens, "repeats": repeats,
            "threads": torch.get_num_threads(), "rows": rows}


def table(res: dict) -> str:
    lines = [f"MoE MLP ({res['experts']} experts, d={res['hidden']}, I={res['inter']}) vs one dense MLP of the "
             f"same size (intermediate {res['experts'] * res['inter']}); {res['tokens']} tokens, top-2, "
             f"{res['threads']} thread(s), best of {res['repeats']}",
             "", "| method | pattern | MoE CPU s/layer | dense CPU s/layer | MoE / dense |", "| --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['moe_s']:.2f} | {r['dense_s']:.2f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = run(a.experts, a.hidden, a.inter, a.tokens, a.repeats)
    print(table(res))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
