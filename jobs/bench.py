"""Benchmarks, one command: `python -m jobs.bench [--out DIR] [--sections ...] [--full]`.

Writes results.json, results.md and PNG plots into --out and prints the tables.
  solvers   layer solvers on real SmolLM2 layers (jobs/bench_solvers.py): error and time relative
            to SparseGPT, group-size sweep
  e2e       held-out perplexity per method and pattern on SmolLM2 + Austen, dense alongside, wall
            time per run (and the median time per layer), the share of SparseGPT's perplexity gap
            to dense that each method closes; perplexity_vs_sparsity.png. Rows are kept in
            e2e_rows.jsonl as they finish: rerunning an interrupted grid skips the finished ones.
  pipeline  Ray modes x stages (jobs/bench_pipeline.py): wall time against the single-process
            job, busy fraction and peak memory per stage, perplexity; timeline_<mode>.png
  moe       one 64-expert MoE MLP against one dense MLP of the same total size: CPU seconds per
            layer per method and pattern (jobs/bench_moe.py)
  blend     --target-blend: per method and pattern, α = 0, fixed α from a grid and auto; perplexity,
            share of SparseGPT's (α = 0) gap to dense closed, CPU seconds of auto against α = 0
            (one torch thread: the box may be shared); rows kept in blend_rows.jsonl as they finish
  gpu       7B-class random layers: seconds per layer per method, projected for a whole 7B model,
            and the whole job on a random 2-layer model of those shapes (only where CUDA is)
  readme    README's headline figures: the default job (`python -m jobs.prune`, nothing set) at the
            tool's default threads and at 1 thread: dense and pruned perplexity, seconds, bit-identity
            (jobs/bench_threads.py); not in the default list
  contention  thread settings under CPU contention: the single-process and a --stages 2 job (4 x 128
            calibration, 2 evaluation windows) alone and beside 2 busy processes; wall and CPU seconds,
            load average, bit-identity (jobs/bench_threads.py); not in the default list
Small by default (27 minutes on 2 CPU cores); --full uses the issue protocol (16 x 512 calibration,
8 x 512 evaluation on CPU), every pattern and 3 timing repeats.
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

from pipeline import threads

threads.configure()  # as jobs.prune: the OpenMP wait policy before torch starts its runtime
import torch  # noqa: E402

E2E_METHODS = [("magnitude", None), ("wanda", None), ("sparsegpt", None), ("multiweight", None),
               ("multiweight", "cg"), ("admm", "cg")]
E2E_OWL = [("admm", "cg")]  # also run with --allocation owl, at unstructured patterns (label +owl)
SMALL_PATTERNS = ["0.5", "2:4"]
FULL_PATTERNS = ["0.5", "0.6", "0.7", "2:4", "4:8"]


def finished_rows(rows_file: Path, proto: dict, key: tuple[str, ...]) -> dict:
    """Rows an interrupted grid already wrote for this protocol, by `key` (rerunning skips them)."""
    done = {}
    if rows_file.exists():
        for line in rows_file.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if r.get("protocol") == proto:
                done[tuple(r[k] for k in key)] = r
    return done


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}"


def label(method: str, refit: str | None) -> str:
    return method + (f"+{refit}" if refit else "")


def spread(xs: list[float]) -> dict:
    """Median with its spread: min, quartiles, max over the repeats."""
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": xs[0], "q1": q[0], "q3": q[2], "max": xs[-1], "n": len(xs)}


def add_ratios(rows: list[dict]) -> None:
    """Per pattern, against SparseGPT's row: the share of its perplexity gap to dense that a method
    closes (1 = reaches dense, negative = worse than SparseGPT, NaN when SparseGPT has no gap) and
    the wall-time ratio."""
    for r in rows:
        ref = next(x for x in rows if x["pattern"] == r["pattern"] and x["method"] == "sparsegpt")
        gap = ref["pruned"] - ref["dense"]
        r["gap_closed_vs_sparsegpt"] = (ref["pruned"] - r["pruned"]) / gap if gap > 0 else float("nan")
        r["time_vs_sparsegpt"] = r["seconds"] / ref["seconds"]


def e2e(out: Path, full: bool, patterns: list[str] | None, nsamples: int | None, seqlen: int | None,
        eval_windows: int | None, methods: list[str] | None = None, inputs: dict | None = None) -> dict:
    """One pruning run per (pattern, method). Rows are appended to out/e2e_rows.jsonl as they finish
    and a rerun with the same protocol skips them: a long --full grid survives being interrupted."""
    from pipeline.run import RunConfig, run

    patterns = patterns or (FULL_PATTERNS if full else SMALL_PATTERNS)
    proto = {"nsamples": nsamples or (16 if full else 8), "seqlen": seqlen or (512 if full else 256),
             "eval_windows": eval_windows or (8 if full else 4)}
    inputs = {k: v for k, v in (inputs or {}).items() if v}  # model, calib, eval: None = built-in
    proto.update({k: str(v) for k, v in inputs.items()})
    rows_file = out / "e2e_rows.jsonl"
    done = finished_rows(rows_file, proto, ("pattern", "method"))
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-", dir=out))
    try:
        for pat in patterns:
            nm = tuple(int(x) for x in pat.split(":")) if ":" in pat else None
            runs = [(m, r, "uniform") for m, r in E2E_METHODS] + \
                ([] if nm else [(m, r, "owl") for m, r in E2E_OWL])
            for method, refit, alloc in runs:
                name = label(method, refit) + ("+owl" if alloc == "owl" else "")
                if methods and name not in methods and method != "sparsegpt":
                    continue
                if (pat, name) in done:
                    rows.append(done[(pat, name)])
                    continue
                t0 = time.perf_counter()
                rep = run(RunConfig(out=str(work / "run"), method=method, refit=refit, nm=nm, allocation=alloc,
                                    sparsity=None if nm else float(pat), **proto), quiet=True)
                wall = time.perf_counter() - t0
                shutil.rmtree(work / "run")  # a float32 SmolLM2 checkpoint is 540 MB
                row = {"pattern": pat, "method": name, "dense": rep["perplexity"]["dense"],
                       "pruned": rep["perplexity"]["pruned"], "sparsity": rep["sparsity"]["overall"],
                       "seconds": wall, "layer_seconds": spread([r["seconds"] for r in rep["layers"]]),
                       "first_token": rep["evaluation"]["first_token"], "protocol": proto}
                rows.append(row)
                with rows_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"  e2e {pat:>4} {name:<15} ppl {row['pruned']:9.2f} (dense {row['dense']:.2f})  "
                      f"{wall:6.1f}s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    add_ratios(rows)
    return {"protocol": {"calib": "Pride and Prejudice", "eval": "Emma", **proto,
                         "windows": "calibration: random, seed 0; evaluation: the first non-overlapping ones",
                         "first_token": rows[0].get("first_token", "?") if rows else "?"},
            "rows": rows}


BLEND_METHODS = [("sparsegpt", None, "uniform"), ("multiweight", None, "uniform"), ("multiweight", "cg", "uniform"),
                 ("admm", "cg", "uniform"), ("admm", "cg", "owl")]  # owl: unstructured patterns only (label +owl)
BLEND_VALUES = ["0", "0.1", "0.2", "0.3", "auto"]


def blend(out: Path, patterns: list[str] | None, methods: list[str] | None, values: list[str] | None,
          nsamples: int | None, seqlen: int | None, eval_windows: int | None) -> dict:
    """One run per (pattern, method, blend) on the issue protocol (16 x 512 Pride and Prejudice,
    8 x 512 Emma by default), in this process with one torch thread; CPU seconds are this process's
    (time.process_time), robust to a shared box. Rows go to out/blend_rows.jsonl as they finish."""
    from pipeline.run import RunConfig, run

    torch.set_num_threads(1)
    proto = {"nsamples": nsamples or 16, "seqlen": seqlen or 512, "eval_windows": eval_windows or 8}
    rows_file = out / "blend_rows.jsonl"
    done = finished_rows(rows_file, proto, ("pattern", "method", "blend"))
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-blend-", dir=out))
    try:
        for pat in patterns or SMALL_PATTERNS:
            nm = tuple(int(x) for x in pat.split(":")) if ":" in pat else None
            for method, refit, alloc in BLEND_METHODS:
                name = label(method, refit) + ("+owl" if alloc == "owl" else "")
                if methods and name not in methods and method != "sparsegpt" or (alloc == "owl" and nm):
                    continue
                for value in values or BLEND_VALUES:
                    if method == "sparsegpt" and value != "0" and methods and "sparsegpt" not in methods:
                        continue  # the reference (α = 0) only
                    if (pat, name, value) in done:
                        rows.append(done[(pat, name, value)])
                        continue
                    t0, c0 = time.perf_counter(), time.process_time()
                    rep = run(RunConfig(out=str(work / "run"), method=method, refit=refit, nm=nm, allocation=alloc,
                                        sparsity=None if nm else float(pat), target_blend=value, **proto), quiet=True)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    shutil.rmtree(work / "run")
                    tb = rep.get("target_blend") or {}
                    row = {"pattern": pat, "method": name, "blend": value, "dense": rep["perplexity"]["dense"],
                           "pruned": rep["perplexity"]["pruned"], "seconds": wall, "cpu_seconds": cpu,
                           "mean_alpha": tb.get("mean_alpha"), "chosen_counts": tb.get("chosen_counts"),
                           "mean_optimum": tb.get("mean_optimum"),
                           "dense_stream_forward_seconds": tb.get("dense_stream_forward_seconds"),
                           "protocol": proto}
                    rows.append(row)
                    with rows_file.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"  blend {pat:>4} {name:<15} {value:>5}  ppl {row['pruned']:8.2f}  cpu {cpu:6.0f}s",
                          file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"protocol": proto, "rows": rows, "summary": blend_summary(rows)}


def blend_summary(rows: list[dict]) -> list[dict]:
    """Per (pattern, method): α = 0, the best fixed α, auto; gap closed vs SparseGPT at α = 0; auto's
    CPU seconds against α = 0; whether auto is within 0.5% of α = 0's perplexity or better."""
    out = []
    for pat in dict.fromkeys(r["pattern"] for r in rows):
        ref = next((r for r in rows if r["pattern"] == pat and r["method"] == "sparsegpt" and r["blend"] == "0"), None)
        for name in dict.fromkeys(r["method"] for r in rows if r["pattern"] == pat):
            mine = {r["blend"]: r for r in rows if r["pattern"] == pat and r["method"] == name}
            zero, auto = mine.get("0"), mine.get("auto")
            fixed = [r for b, r in mine.items() if b not in ("0", "auto")]
            best = min(fixed, key=lambda r: r["pruned"]) if fixed else None

            def closed(r):
                if r is None or ref is None or ref["pruned"] <= ref["dense"]:
                    return None
                return (ref["pruned"] - r["pruned"]) / (ref["pruned"] - ref["dense"])
            out.append({"pattern": pat, "method": name,
                        "zero": zero and zero["pruned"], "best_fixed": best and best["pruned"],
                        "best_fixed_alpha": best and best["blend"], "auto": auto and auto["pruned"],
                        "auto_mean_alpha": auto and auto.get("mean_alpha"),
                        "auto_mean_optimum": auto and auto.get("mean_optimum"),
                        "gap_closed": {k: closed(r) for k, r in (("zero", zero), ("best_fixed", best), ("auto", auto))},
                        "auto_cpu_vs_zero": auto["cpu_seconds"] / zero["cpu_seconds"] if auto and zero else None,
                        "auto_within_half_percent": auto["pruned"] <= 1.005 * zero["pruned"] if auto and zero else None})
    return out


def blend_table(res: dict) -> str:
    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    def pct(x):
        return "-" if x is None else f"{100 * x:+.1f}%"
    lines = ["| pattern | method | α = 0 | best fixed α | auto (mean α; mean module optimum) | gap closed: 0 / fixed / auto "
             "| auto CPU vs α = 0 | auto within 0.5% |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["summary"]:
        g = r["gap_closed"]
        am = "" if r["auto_mean_alpha"] is None else f" ({r['auto_mean_alpha']:.3f}" + \
            ("" if r.get("auto_mean_optimum") is None else f"; {r['auto_mean_optimum']:.2f}") + ")"
        lines.append(f"| {r['pattern']} | {r['method']} | {f(r['zero'])} | {f(r['best_fixed'])}"
                     f"{'' if r['best_fixed_alpha'] is None else ' (' + r['best_fixed_alpha'] + ')'} | "
                     f"{f(r['auto'])}{am} | "
                     f"{pct(g['zero'])} / {pct(g['best_fixed'])} / {pct(g['auto'])} | "
                     f"{f(r['auto_cpu_vs_zero'], '{:.2f}x')} | {f(r['auto_within_half_percent'], '{}')} |")
    p = res["protocol"]
    lines.append(f"\nProtocol: SmolLM2-135M; calibration {p['nsamples']} x {p['seqlen']} tokens of Pride and "
                 f"Prejudice (random windows, seed 0), evaluation {p['eval_windows']} x {p['seqlen']} tokens of "
                 f"Emma; gap closed is against SparseGPT at α = 0; CPU seconds with one torch thread.")
    return "\n".join(lines)


def e2e_table(res: dict) -> str:
    rows = res["rows"]
    lines = [("| pattern | method | perplexity | dense | gap closed vs SparseGPT | wall s | wall vs SparseGPT "
              "| s per layer, median [min, max] |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ls = r.get("layer_seconds")
        per_layer = f"{ls['median']:.1f} [{ls['min']:.1f}, {ls['max']:.1f}]" if ls else "-"
        lines.append(f"| {r['pattern']} | {r['method']} | {r['pruned']:.2f} | {r['dense']:.2f} | "
                     f"{100 * r['gap_closed_vs_sparsegpt']:+.1f}% | {r['seconds']:.0f} | "
                     f"{r.get('time_vs_sparsegpt', float('nan')):.2f}x | {per_layer} |")
    p = res["protocol"]
    lines.append(f"\nProtocol: {p.get('model', 'SmolLM2-135M')}; calibration {p['nsamples']} x {p['seqlen']} tokens "
                 f"of {p['calib']}, evaluation {p['eval_windows']} x {p['seqlen']} tokens of {p['eval']} "
                 f"({p['windows']}); first token {p['first_token']}.")
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


# Llama-2-7B's linear shapes (rows x columns) and how many of each a decoder layer holds.
SHAPES = {"7b": ({"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}, 4096, 11008, 32),
          "tiny": ({"q/k/v/o": (64, 64), "gate/up": (128, 64), "down": (64, 128)}, 64, 128, 4)}
PER_LAYER = {"q/k/v/o": 4, "gate/up": 2, "down": 1}
LAYERS_7B = 32


def random_llama(folder: Path, layers: int, hidden: int, inter: int, heads: int, tokenizer_from: Path,
                 dtype=torch.float32, tie: bool = True, vocab: int = 49152) -> int:
    """A Llama with random weights, written straight from the meta device (no default init, no
    second copy): timing and memory need no trained weights. Returns the parameter bytes."""
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=tie,
                         vocab_size=vocab, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    model.tie_weights()
    model.save_pretrained(folder)
    for f in Path(tokenizer_from).iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, Path(folder) / f.name)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def gpu(device: str = "cuda", scale: str = "7b", repeats: int = 3, patterns=("0.5", "2:4"),
        pipeline_layers: int = 2, nsamples: int = 128, seqlen: int = 2048, work: Path | None = None) -> dict:
    """7B-class layer shapes with random weights and Hessians (timing needs no training).
    Solvers: median seconds [min, max] per linear shape, per decoder layer (4 q/k/v/o, 2 gate/up,
    1 down) and projected for 32 layers. Pipeline: the single-process job on a random
    `pipeline_layers`-layer model of the same shapes, with the GPU default calibration (128 x 2048),
    SparseGPT and multiweight at --target-blend 0 and multiweight at the job's default auto (its peak
    memory shows the dense stream's cost on the device);
    its median seconds per decoder layer, times 32, plus its fixed cost, projects a whole 7B model.
    scale="tiny" runs the same code on small shapes (the tests, on CPU)."""
    from pipeline import assets
    from pipeline.run import RunConfig, run
    from pipeline.solvers import prune_with_info

    shapes, hidden, inter, heads = SHAPES[scale]
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    problems = {}
    for kind, (r, c) in shapes.items():  # H from 4c random tokens with uneven feature scales
        g = torch.Generator(device=dev).manual_seed(0)
        W = torch.randn(r, c, device=dev, generator=g, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
        X = torch.randn(c, 4 * c, device=dev, generator=g) * torch.rand(c, 1, device=dev, generator=g) * 3
        problems[kind] = (W, X @ X.T / X.shape[1])
        del X
    solvers = {}
    for pat in patterns:
        nm = tuple(int(x) for x in pat.split(":")) if ":" in pat else None
        for method, refit in E2E_METHODS:
            per_shape, layer_s = {}, 0.0
            for kind, (W, H) in problems.items():
                times = []
                for _ in range(repeats):
                    sync()
                    t0 = time.perf_counter()
                    prune_with_info(W, H, method=method, sparsity=None if nm else float(pat), nm=nm, refit=refit)
                    sync()
                    times.append(time.perf_counter() - t0)
                per_shape[kind] = spread(times)
                layer_s += per_shape[kind]["median"] * PER_LAYER[kind]
            solvers.setdefault(pat, {})[label(method, refit)] = {
                "per_shape": per_shape, "seconds_per_layer": layer_s, "projected_7b_seconds": LAYERS_7B * layer_s}
            print(f"  gpu solvers {pat:>4} {label(method, refit):<15} {layer_s:7.2f}s per layer", file=sys.stderr, flush=True)
    del problems
    pipeline = {}
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-", dir=work))
    try:
        folder = work / "model"
        random_llama(folder, pipeline_layers, hidden, inter, heads, assets.default_model_dir(), tie=False,
                     dtype=torch.float16 if dev.type == "cuda" else torch.float32)
        # the job's default --target-blend auto carries a second (dense) activation stream: its memory
        # and time beside the plain solve's
        for name, method, blend in (("sparsegpt", "sparsegpt", 0.0), ("multiweight", "multiweight", 0.0),
                                    ("multiweight+auto", "multiweight", "auto")):
            t0 = time.perf_counter()
            rep = run(RunConfig(out=str(work / "run"), model=str(folder), method=method, nsamples=nsamples,
                                seqlen=seqlen, eval_windows=0, device=dev.type, target_blend=blend), quiet=True)
            wall = time.perf_counter() - t0
            shutil.rmtree(work / "run")
            ls = spread([r["seconds"] for r in rep["layers"]])
            fixed = max(wall - sum(r["seconds"] for r in rep["layers"]), 0.0)
            pipeline[name] = {"wall_s": wall, "layer_seconds": ls, "fixed_s": fixed, "layers": pipeline_layers,
                              "nsamples": nsamples, "seqlen": seqlen, "peak_memory": rep["peak_memory"],
                              "dense_stream_mb": (rep.get("target_blend") or {}).get("dense_stream_mb"),
                              "projected_7b_seconds": fixed + LAYERS_7B * ls["median"]}
            print(f"  gpu pipeline {name:<16} {ls['median']:7.2f}s per layer, {wall:.1f}s wall", file=sys.stderr,
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "scale": scale,
            "repeats": repeats, "solvers": solvers, "pipeline": pipeline}


def gpu_table(res: dict) -> str:
    pats = list(res["solvers"])
    lines = ["| method | " + " | ".join(f"{p} s per layer | {p} projected 7B min" for p in pats) + " |",
             "| --- |" + " --- | --- |" * len(pats)]
    for m in res["solvers"][pats[0]]:
        cells = []
        for p in pats:
            v = res["solvers"][p][m]
            cells.append(f"{v['seconds_per_layer']:.2f} | {v['projected_7b_seconds'] / 60:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if res["pipeline"]:
        lines += ["", "| whole job, 50% | s per layer, median [min, max] | fixed s | projected 7B min | peak memory |",
                  "| --- | --- | --- | --- | --- |"]
        for m, v in res["pipeline"].items():
            ls = v["layer_seconds"]
            mem = ", ".join(f"{k} {x:.0f}" for k, x in v["peak_memory"].items())
            lines.append(f"| {m} | {ls['median']:.2f} [{ls['min']:.2f}, {ls['max']:.2f}] | {v['fixed_s']:.1f} | "
                         f"{v['projected_7b_seconds'] / 60:.1f} | {mem} |")
    lines.append(f"\nSolvers: {res['repeats']} repeats per shape, random fp16 weights and Hessians of 7B-class "
                 "shapes (4 q/k/v/o 4096x4096, 2 gate/up 11008x4096, 1 down 4096x11008 per layer, 32 layers). "
                 "Whole job: the single-process job on a random model with those shapes, 128 x 2048 calibration.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--sections", nargs="+", default=["solvers", "e2e", "pipeline", "moe", "gpu"],
                    choices=["solvers", "e2e", "pipeline", "moe", "gpu", "readme", "contention", "blend"])
    ap.add_argument("--limit-s", type=float, default=None, help="contention: stop a job after this many seconds")
    ap.add_argument("--blends", nargs="+", default=None,
                    help=f"blend section: --target-blend values (default {' '.join(BLEND_VALUES)})")
    ap.add_argument("--full", action="store_true", help="the issue protocol and every pattern (hours on a 2-core CPU)")
    ap.add_argument("--patterns", nargs="+", default=None, help="e2e patterns, e.g. 0.5 2:4")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="e2e methods to run (sparsegpt always runs: it is the reference), e.g. multiweight multiweight+cg")
    ap.add_argument("--model", default=None, help="e2e model (default: built-in SmolLM2-135M)")
    ap.add_argument("--calib", default=None, help="e2e calibration text (default: Pride and Prejudice)")
    ap.add_argument("--eval", default=None, help="e2e evaluation text (default: Emma)")
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="pipeline and GPU timing repeats (default 1, --full 3)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    repeats = a.repeats or (3 if a.full else 1)
    results = {"machine": machine(), "command": "python -m jobs.bench " + " ".join(map(str, argv or sys.argv[1:]))}
    md = [f"Machine: {results['machine']}  \nCommand: `{results['command']}`\n"]
    if "solvers" in a.sections:
        from jobs import bench_solvers
        argv_s = ["--out", str(a.out / "solvers")] + ([] if a.full else ["--layers", "2", "20", "--repeats", "1"])
        bench_solvers.main(argv_s)
        results["solvers"] = json.loads((a.out / "solvers" / "results.json").read_text())
        md_file = a.out / "solvers" / "results.md"
        md += ["## Layer solvers", md_file.read_text() if md_file.exists() else "(see solvers/results.json)"]
    if "e2e" in a.sections:
        res = e2e(a.out, a.full, a.patterns, a.nsamples, a.seqlen, a.eval_windows, a.methods,
                  {"model": a.model, "calib": a.calib, "eval": a.eval})
        results["e2e"] = res
        md += ["## End to end", e2e_table(res)]
        if e2e_plot(res, a.out / "perplexity_vs_sparsity.png"):
            md.append("![perplexity vs sparsity](perplexity_vs_sparsity.png)")
    if "blend" in a.sections:
        res = blend(a.out, a.patterns, a.methods, a.blends, a.nsamples, a.seqlen, a.eval_windows)
        results["blend"] = res
        (a.out / "blend.json").write_text(json.dumps(res, indent=1))
        md += ["## Target blend (--target-blend)", blend_table(res)]
    if "pipeline" in a.sections:
        from jobs import bench_pipeline
        pj = a.out / "pipeline.json"
        bench_pipeline.main(["--out", str(pj), "--repeats", str(repeats)]
                            + (["--nsamples", "16", "--seqlen", "512", "--eval-windows", "8"] if a.full else []))
        results["pipeline"] = json.loads(pj.read_text())
        md += ["## Pipeline", str(results["pipeline"].get("table", "(see pipeline.json)"))]
        md += [f"![{r['mode']} timeline]({r['timeline']})" for r in results["pipeline"]["rows"] if r.get("timeline")]
    if "moe" in a.sections:
        from jobs import bench_moe
        torch.set_num_threads(1)  # CPU seconds of one thread: comparable across runs
        results["moe"] = bench_moe.run(repeats=repeats)
        md += ["## MoE layer", bench_moe.table(results["moe"])]
    if "gpu" in a.sections:
        if torch.cuda.is_available():
            results["gpu"] = gpu(repeats=repeats, work=a.out)
            md += [f"## GPU ({results['gpu']['device']}, 7B-class random layers)", gpu_table(results["gpu"])]
        else:
            md += ["## GPU", "skipped: torch sees no CUDA device on this machine"]
    if "readme" in a.sections or "contention" in a.sections:
        from jobs import bench_threads
        work = Path(tempfile.mkdtemp(prefix="bench-threads-", dir=a.out))
        try:
            if "readme" in a.sections:
                results["readme"] = bench_threads.readme(work)
                md += ["## README figures", results["readme"]["table"]]
            if "contention" in a.sections:
                results["contention"] = bench_threads.contention(
                    work, bench_threads.SMALL, rows_file=a.out / "contention_rows.jsonl", limit_s=a.limit_s)
                md += ["## Threads under contention", results["contention"]["table"]]
        finally:
            shutil.rmtree(work, ignore_errors=True)
    text = "\n\n".join(md) + "\n"
    for name, data in (("results.json", json.dumps(results, indent=1, default=str)), ("results.md", text)):
        tmp = a.out / (name + ".tmp")
        tmp.write_text(data)
        os.replace(tmp, a.out / name)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
