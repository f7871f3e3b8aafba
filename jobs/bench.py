"""Benchmarks, one command: `python -m jobs.bench [--out DIR] [--sections ...] [--full]`.

Writes results.json, results.md and PNG plots into --out and prints the tables.
  solvers   layer solvers on real SmolLM2 layers (jobs/bench_solvers.py), relative to SparseGPT
  e2e       held-out perplexity per method and pattern on SmolLM2 + Austen, dense alongside,
            wall time per run, share of SparseGPT's perplexity gap to dense that each closes
  pipeline  Ray modes x stages (jobs/bench_pipeline.py)
  gpu       7B-class random layers, time per method per layer and projected for a whole 7B
            model (only where CUDA is available)
Small by default (minutes on 2 CPU cores); --full uses the issue protocol (16 x 512 calibration,
8 x 512 evaluation on CPU) and every pattern.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

E2E_METHODS = [("magnitude", None), ("wanda", None), ("sparsegpt", None), ("multiweight", None),
               ("multiweight", "cg")]
SMALL_PATTERNS = ["0.5", "2:4"]
FULL_PATTERNS = ["0.5", "0.6", "0.7", "2:4", "4:8"]


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}"


def label(method: str, refit: str | None) -> str:
    return method + (f"+{refit}" if refit else "")


def e2e(out: Path, full: bool, patterns: list[str] | None, nsamples: int | None, seqlen: int | None,
        eval_windows: int | None, methods: list[str] | None = None) -> dict:
    from pipeline.run import RunConfig, run

    patterns = patterns or (FULL_PATTERNS if full else SMALL_PATTERNS)
    proto = dict(nsamples=nsamples or (16 if full else 8), seqlen=seqlen or (512 if full else 256),
                 eval_windows=eval_windows or (8 if full else 4))
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-", dir=out))
    try:
        for pat in patterns:
            nm = tuple(int(x) for x in pat.split(":")) if ":" in pat else None
            for method, refit in E2E_METHODS:
                if methods and label(method, refit) not in methods and "sparsegpt" != method:
                    continue
                t0 = time.perf_counter()
                rep = run(RunConfig(out=str(work / "run"), method=method, refit=refit, nm=nm,
                                    sparsity=None if nm else float(pat), **proto), quiet=True)
                wall = time.perf_counter() - t0
                shutil.rmtree(work / "run")  # a float32 SmolLM2 checkpoint is 540 MB
                rows.append({"pattern": pat, "method": label(method, refit), "dense": rep["perplexity"]["dense"],
                             "pruned": rep["perplexity"]["pruned"], "seconds": wall})
                print(f"  e2e {pat:>4} {label(method, refit):<15} ppl {rep['perplexity']['pruned']:9.2f} "
                      f"(dense {rep['perplexity']['dense']:.2f})  {wall:6.1f}s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in rows:  # share of SparseGPT's gap to dense closed (negative: worse than SparseGPT)
        ref = next(x for x in rows if x["pattern"] == r["pattern"] and x["method"] == "sparsegpt")
        gap = ref["pruned"] - ref["dense"]
        r["gap_closed_vs_sparsegpt"] = (ref["pruned"] - r["pruned"]) / gap if gap > 0 else float("nan")
    return {"protocol": dict(proto, calib="Pride and Prejudice (random windows, seed 0)",
                             eval="Emma (first non-overlapping windows)", first_token="<|endoftext|>"),
            "rows": rows}


def e2e_table(res: dict) -> str:
    rows = res["rows"]
    lines = ["| pattern | method | perplexity | dense | gap closed vs SparseGPT | wall s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['method']} | {r['pruned']:.2f} | {r['dense']:.2f} | "
                     f"{100 * r['gap_closed_vs_sparsegpt']:+.1f}% | {r['seconds']:.0f} |")
    p = res["protocol"]
    lines.append(f"\nProtocol: calibration {p['nsamples']} x {p['seqlen']} tokens of {p['calib']}; "
                 f"evaluation {p['eval_windows']} x {p['seqlen']} tokens of {p['eval']}; first token {p['first_token']}.")
    return "\n".join(lines)


def e2e_plot(res: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in res["rows"] if ":" not in r["pattern"]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((float(r["pattern"]), r["pruned"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.axhline(rows[0]["dense"], color="gray", ls="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("unstructured sparsity")
    ax.set_ylabel("perplexity (Emma, held out)")
    ax.set_title("SmolLM2-135M pruned without retraining")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def gpu(repeats: int = 3) -> dict:
    """7B-class layer shapes (Llama-2-7B), random weights and Hessians: timing needs no training."""
    from pipeline.solvers import prune_with_info

    shapes = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
    per_layer = {"q/k/v/o": 4, "gate/up": 2, "down": 1}
    dev = torch.device("cuda")
    res = {}
    for method, refit in E2E_METHODS:
        total = 0.0
        for kind, (r, c) in shapes.items():
            g = torch.Generator(device=dev).manual_seed(0)
            W = torch.randn(r, c, device=dev, generator=g, dtype=torch.float16)
            X = torch.randn(c, 4 * c, device=dev, generator=g) * torch.rand(c, 1, device=dev, generator=g) * 3
            H = X @ X.T / X.shape[1]
            times = []
            for _ in range(repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                prune_with_info(W, H, method=method, sparsity=0.5, refit=refit)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            total += statistics.median(times) * per_layer[kind]
        res[label(method, refit)] = {"seconds_per_layer": total, "projected_7b_seconds": 32 * total}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--sections", nargs="+", default=["solvers", "e2e", "pipeline", "gpu"],
                    choices=["solvers", "e2e", "pipeline", "gpu"])
    ap.add_argument("--full", action="store_true", help="the issue protocol and every pattern (an hour or more on CPU)")
    ap.add_argument("--patterns", nargs="+", default=None, help="e2e patterns, e.g. 0.5 2:4")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="e2e methods to run (sparsegpt always runs: it is the reference), e.g. multiweight multiweight+cg")
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--eval-windows", type=int, default=None)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "command": "python -m jobs.bench " + " ".join(argv or sys.argv[1:])}
    md = [f"Machine: {results['machine']}  \nCommand: `{results['command']}`\n"]
    if "solvers" in a.sections:
        from jobs import bench_solvers
        argv_s = ["--out", str(a.out / "solvers")] + ([] if a.full else ["--layers", "2", "20", "--repeats", "1"])
        bench_solvers.main(argv_s)
        results["solvers"] = json.loads((a.out / "solvers" / "results.json").read_text())
        md_file = a.out / "solvers" / "results.md"
        md += ["## Layer solvers", md_file.read_text() if md_file.exists() else "(see solvers/results.json)"]
    if "e2e" in a.sections:
        res = e2e(a.out, a.full, a.patterns, a.nsamples, a.seqlen, a.eval_windows, a.methods)
        results["e2e"] = res
        md += ["## End to end", e2e_table(res)]
        if e2e_plot(res, a.out / "perplexity_vs_sparsity.png"):
            md.append("![perplexity vs sparsity](perplexity_vs_sparsity.png)")
    if "pipeline" in a.sections:
        from jobs import bench_pipeline
        pj = a.out / "pipeline.json"
        bench_pipeline.main(["--out", str(pj)] + (["--nsamples", "16", "--seqlen", "512", "--eval-windows", "8"]
                                                    if a.full else []))
        results["pipeline"] = json.loads(pj.read_text())
        md += ["## Pipeline", str(results["pipeline"].get("table", "(see pipeline.json)"))]
    if "gpu" in a.sections:
        if torch.cuda.is_available():
            results["gpu"] = gpu()
            md += ["## GPU (7B-class random layers, 50%)", "| method | s per layer | projected 7B (32 layers) s |",
                   "| --- | --- | --- |"] + [f"| {m} | {v['seconds_per_layer']:.2f} | {v['projected_7b_seconds']:.0f} |"
                                             for m, v in results["gpu"].items()]
        else:
            md += ["## GPU", "skipped: torch sees no CUDA device on this machine"]
    text = "\n\n".join(md) + "\n"
    tmp = a.out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, a.out / "results.json")
    (a.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
