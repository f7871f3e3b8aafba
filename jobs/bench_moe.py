"""MoE layer cost: `python -m jobs.bench_moe [--experts 64] [--hidden 256] [--inter 64] [--out DIR]`.

Solves the matrices of one mixture-of-experts MLP (E experts, each gate/up: 2I x d and down:
d x I, each with its own Hessian from its own routed tokens) three ways, in the same process:
looped (prune_with_info per expert matrix), batched (prune_many: one call for all gate/up, one for
all down) and, for scale, one dense MLP of the same total size (gate/up: 2EI x d, down: d x EI,
one Hessian each). Every method at 50% and 2:4. Prints CPU and wall seconds per layer and the
ratios; writes moe.json. Also checks that the batched masks equal the looped ones.

`--memory` adds, per method and pattern, the peak extra resident memory of the batched and of the
looped solve of the layer, each measured in a fresh subprocess (Linux: VmHWM after clear_refs).

Activations are random with correlated features (a fixed random mixing), tokens routed top-k by
a random router, so experts get uneven token counts as in a real model. `--device cuda` runs the
same solves on a GPU (wall time is then the figure to read; CPU time is the host's).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.solvers import HessianAccumulator, many_bytes, prune_many, prune_with_info

METHODS = ("magnitude", "wanda", "sparsegpt", "multiweight", "multiweight+cg")
PATTERNS = ("0.5", "2:4")


def _kw(method: str, pattern: str) -> tuple[str, dict]:
    method, _, refit = method.partition("+")
    kw = {"refit": refit or None}
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        kw["nm"] = (n, m)
    else:
        kw["sparsity"] = float(pattern)
    return method, kw


def problems(experts: int, hidden: int, inter: int, tokens: int, top_k: int = 2, seed: int = 0):
    """(moe, dense): lists of (weight, hessian) for one MoE MLP (expert e's gate/up at 2e, its down
    at 2e + 1) and one dense MLP of the same size."""
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


def _on(mats, device):
    return [(w.to(device), h.to(device)) for w, h in mats]


def _stacks(moe):
    """The layer as prune_many takes it: (gate/up weights, Hessians), (down weights, Hessians)."""
    return [(torch.stack([w for w, _ in moe[k::2]]), torch.stack([h for _, h in moe[k::2]])) for k in (0, 1)]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return time.process_time() - c0, time.perf_counter() - t0, out


def solve_loop(mats, method, pattern):
    m, kw = _kw(method, pattern)
    return [prune_with_info(w, h, m, **kw) for w, h in mats]


def solve_batched(stacks, method, pattern):
    m, kw = _kw(method, pattern)
    return [r for W, H in stacks for r in prune_many(W, H, m, **kw)]


def run(experts: int = 64, hidden: int = 256, inter: int = 64, tokens: int = 4096, repeats: int = 1,
        methods=METHODS, patterns=PATTERNS, device: str = "cpu") -> dict:
    moe, dense = problems(experts, hidden, inter, tokens)
    moe, dense = _on(moe, device), _on(dense, device)
    stacks = _stacks(moe)
    order = list(range(0, len(moe), 2)) + list(range(1, len(moe), 2))  # the batched results' order
    rows = []
    for pattern in patterns:
        for method in methods:
            best = {}
            for _ in range(repeats):  # interleaved, so load on a shared box hits all three alike
                for name, fn in (("loop", lambda: solve_loop(moe, method, pattern)),
                                 ("batched", lambda: solve_batched(stacks, method, pattern)),
                                 ("dense", lambda: solve_loop(dense, method, pattern))):
                    cpu, wall, out = _timed(fn, device)
                    b = best.setdefault(name, [cpu, wall, out])
                    b[0], b[1], b[2] = min(b[0], cpu), min(b[1], wall), out
            loop = [best["loop"][2][k] for k in order]
            batched = best["batched"][2]
            same = sum(torch.equal(a.mask, b.mask) for a, b in zip(loop, batched))
            rel = max(abs(a.error - b.error) / max(b.error, 1e-30) for a, b in zip(batched, loop))
            rows.append({"method": method, "pattern": pattern,
                         "loop_s": best["loop"][0], "batched_s": best["batched"][0], "dense_s": best["dense"][0],
                         "loop_wall": best["loop"][1], "batched_wall": best["batched"][1],
                         "dense_wall": best["dense"][1],
                         "speedup": best["loop"][0] / best["batched"][0],
                         "speedup_wall": best["loop"][1] / best["batched"][1],
                         "moe_s": best["batched"][0], "ratio": best["batched"][0] / best["dense"][0],
                         "masks_equal": f"{same}/{len(loop)}", "max_rel_error_diff": rel})
    return {"experts": experts, "hidden": hidden, "inter": inter, "tokens": tokens, "repeats": repeats,
            "threads": torch.get_num_threads(), "device": str(device), "rows": rows}


def _peak_child(args) -> None:
    """In a fresh process: the peak RSS increase (MB) of one layer solved batched or looped."""
    experts, hidden, inter, tokens, method, pattern, mode = args
    torch.set_num_threads(1)
    moe, _ = problems(int(experts), int(hidden), int(inter), int(tokens))
    stacks = _stacks(moe)
    solve_loop(moe[:2], method, pattern)  # warm-up: imports, kernels
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS

    def kb(key):
        return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines()
                    if l.startswith(key))
    base = kb("VmRSS:")
    out = solve_batched(stacks, method, pattern) if mode == "batched" else solve_loop(moe, method, pattern)
    print(json.dumps({"peak_mb": (kb("VmHWM:") - base) / 1024, "n": len(out)}))


def memory(experts, hidden, inter, tokens, methods=METHODS, patterns=PATTERNS) -> list[dict]:
    rows = []
    for pattern in patterns:
        for method in methods:
            m, kw = _kw(method, pattern)
            kw.pop("sparsity", None)
            # the larger of the two calls (gate/up, then down), as estimated for the lead's chunking
            est = max(many_bytes(2 * inter, hidden, m, **kw), many_bytes(hidden, inter, m, **kw))
            row = {"method": method, "pattern": pattern, "estimate_mb": experts * est / 2 ** 20}
            for mode in ("batched", "loop"):
                cmd = [sys.executable, "-m", "jobs.bench_moe", "--_peak",
                       *map(str, (experts, hidden, inter, tokens, method, pattern, mode))]
                p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                row[f"{mode}_peak_mb"] = json.loads(p.stdout.strip().splitlines()[-1])["peak_mb"] \
                    if p.returncode == 0 else None
            rows.append(row)
    return rows


def table(res: dict) -> str:
    lines = [f"MoE MLP ({res['experts']} experts, d={res['hidden']}, I={res['inter']}) vs one dense MLP of the "
             f"same size (intermediate {res['experts'] * res['inter']}); {res['tokens']} tokens, top-2, "
             f"{res['threads']} thread(s), {res.get('device', 'cpu')}, best of {res['repeats']}; seconds per layer",
             "", "| method | pattern | looped CPU s | batched CPU s | dense CPU s | batched speed-up | "
             "batched / dense | looped wall s | batched wall s | dense wall s | masks equal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        if "batched_s" not in r:  # a file from before batched solves
            lines.append(f"| {r['method']} | {r['pattern']} | {r['moe_s']:.2f} | | {r['dense_s']:.2f} | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['pattern']} | {r['loop_s']:.2f} | {r['batched_s']:.2f} | "
                     f"{r['dense_s']:.2f} | {r['speedup']:.1f}x | {r['ratio']:.2f}x | {r['loop_wall']:.2f} | "
                     f"{r['batched_wall']:.2f} | {r['dense_wall']:.2f} | {r['masks_equal']} |")
    if res.get("memory"):
        lines += ["", "| method | pattern | batched peak extra MB | E x many_bytes MB | looped peak extra MB |",
                  "| --- | --- | --- | --- | --- |"]
        for r in res["memory"]:
            f = [("%.0f" % r[k]) if r[k] is not None else "failed" for k in ("batched_peak_mb", "loop_peak_mb")]
            lines.append(f"| {r['method']} | {r['pattern']} | {f[0]} | {r['estimate_mb']:.0f} | {f[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_peak"]:
        _peak_child(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory", action="store_true", help="also peak memory, batched vs looped (Linux)")
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = run(a.experts, a.hidden, a.inter, a.tokens, a.repeats, a.methods, device=a.device)
    if a.memory:
        res["memory"] = memory(a.experts, a.hidden, a.inter, a.tokens, a.methods)
    print(table(res))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "moe.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out / "moe.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
