"""Benchmark the Ray pipeline: `python -m jobs.bench_pipeline [--stages 1,2,3] [--out bench-out/pipeline.json]`.

For K = 1, 2, 3 stages on logical GPUs (one torch thread per stage) and each mode, it measures the
wall time of the whole job, from the call to the written output (actor start-up included), against
the single-process job run here with one thread too. Targets:

    sequential   wall time within 1.15x of the single-process job (it cannot be faster: every
                 layer waits for all layers before it)
    stagewise    speed-up over the single-process job >= 0.8 K, where the machine has K cores
    dense

It also reports the pipeline time (first embedding to last perplexity, without actor start-up),
how busy the stages were, and the held-out perplexity of each mode. A markdown table goes to
stdout, everything to the JSON file --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

MODES = ("sequential", "stagewise", "dense")


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.bench_pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder (default: built-in SmolLM2-135M, 30 layers)")
    p.add_argument("--method", default="sparsegpt",
                   help="solver (default sparsegpt: multiweight on CPU takes ~10 s a layer, too slow for minutes)")
    p.add_argument("--stages", default="1,2,3", help="comma-separated stage counts")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs Ray may use (default: all)")
    p.add_argument("--work", default=None, help="folder for the runs' outputs (default: a temporary one, removed)")
    p.add_argument("--out", default="bench-out/pipeline.json", help="JSON results")
    return p.parse_args(argv)


def config(a, out: Path, mode: str, stages: int | None):
    from pipeline.run import RunConfig
    return RunConfig(out=str(out), model=a.model, method=a.method, nsamples=a.nsamples, seqlen=a.seqlen,
                     eval_windows=a.eval_windows, batch_size=a.batch_size, mode=mode, stages=stages).resolve()


def stage_summary(report: dict) -> dict:
    facts = report["pipeline"]["stage_facts"]
    start = min(e[1] for f in facts for e in f["events"] if e[0] == "embed")
    end = max(e[2] for f in facts for e in f["events"])
    busy = [f["busy_s"] for f in facts]
    return {"pipeline_s": end - start, "busy_s": busy, "idle_s": [f["idle_s"] for f in facts],
            "peak_rss_mb": [round(f["peak_rss_mb"]) for f in facts]}


def score(rows: list[dict], cores: int) -> str:
    """Ratios and targets into the rows; returns the markdown table."""
    single = next(r["wall_s"] for r in rows if r["mode"] == "single-process")
    base = {r["mode"]: r["wall_s"] for r in rows if r["stages"] == 1 and r["mode"] != "single-process"}
    lines = ["| mode | K | wall s | pipeline s | wall / single | speed-up vs single | speed-up vs K=1 | target | met "
             "| ppl pruned |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r["ratio_to_single"] = r["wall_s"] / single
        r["speedup_vs_single"] = single / r["wall_s"]
        r["speedup_vs_k1"] = base.get(r["mode"], r["wall_s"]) / r["wall_s"]
        if r["mode"] == "sequential":
            r["target"], r["met"] = "wall <= 1.15x single", r["ratio_to_single"] <= 1.15
        elif r["mode"] in ("stagewise", "dense") and r["stages"] <= cores:
            goal = 0.8 * r["stages"]
            r["target"], r["met"] = f"speed-up >= {goal:.1f}x", r["speedup_vs_single"] >= goal
        elif r["mode"] in ("stagewise", "dense"):
            r["target"], r["met"] = f"n/a (K > {cores} cores)", None
        else:
            r["target"], r["met"] = "", None
        ppl = (r["perplexity"] or {}).get("pruned")
        pipe = f"{r['pipeline_s']:.1f}" if "pipeline_s" in r else "-"
        met = "" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"| {r['mode']} | {r['stages']} | {r['wall_s']:.1f} | {pipe} | {r['ratio_to_single']:.2f}x | "
                     f"{r['speedup_vs_single']:.2f}x | {r['speedup_vs_k1']:.2f}x | {r['target']} | {met} | "
                     f"{'-' if ppl is None else f'{ppl:.2f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse(argv)
    import ray
    import torch

    from actors.driver import run_distributed
    from pipeline.run import run

    ks = [int(k) for k in a.stages.split(",")]
    modes = [m for m in a.modes.split(",") if m]
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = str(Path(__file__).resolve().parent.parent)
    ray.init(num_cpus=a.cpus, num_gpus=max(ks), include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": root}})
    rows = []
    load_start = os.getloadavg()
    try:
        torch.set_num_threads(1)  # as each stage: one thread (stages on logical GPUs get OMP_NUM_THREADS=1)
        out = work / "single"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        rep = run(config(a, out, "sequential", None), quiet=True)
        single = time.perf_counter() - t0
        rows.append({"mode": "single-process", "stages": 1, "wall_s": single, "perplexity": rep["perplexity"]})
        print(f"single-process: {single:.1f}s", file=sys.stderr, flush=True)
        for mode in modes:
            for k in ks:
                out = work / f"{mode}-{k}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                rep = run_distributed(config(a, out, mode, k), quiet=True)
                wall = time.perf_counter() - t0
                rows.append({"mode": mode, "stages": k, "wall_s": wall, "perplexity": rep["perplexity"],
                             **stage_summary(rep)})
                print(f"{mode} K={k}: {wall:.1f}s", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)

    cores = os.cpu_count() or 1
    table = score(rows, cores)
    setup = {"model": a.model or "SmolLM2-135M (built-in)", "method": a.method, "nsamples": a.nsamples,
             "seqlen": a.seqlen, "eval_windows": a.eval_windows, "batch_size": a.batch_size, "cpus": a.cpus,
             "cores": cores, "threads_per_stage": 1, "single_process_threads": 1,
             "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()}
    print(f"{a.method}, {a.nsamples} x {a.seqlen} calibration, {a.eval_windows} eval windows, {cores} cores, "
          f"one thread per stage and for the single-process job\n")
    print(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"setup": setup, "rows": rows, "table": table}, indent=1))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
