"""Benchmark the Ray pipeline: `python -m jobs.bench_pipeline [--stages 1,2,3] [--out bench-out/pipeline.json]`.

For K = 1, 2, 3 stages on logical GPUs (one torch thread per stage) and each mode, it measures the
wall time of the whole job, from the call to the written output (actor start-up included), against
the single-process job run here with one thread too. Targets:

    sequential   wall time within 1.15x of the single-process job (it cannot be faster: every
                 layer waits for all layers before it)
    stagewise    speed-up over the single-process job >= 0.8 K, where the machine has K cores
    dense

It also reports the pipeline time (first embedding to last perplexity, without actor start-up),
the busy fraction of each stage over the pipeline time, each stage's peak resident memory, and the
held-out perplexity of each mode. Wall times are medians over --repeats runs with min and max. A
markdown table goes to stdout, everything to the JSON file --out, and the stage timeline of the
largest K of each mode to timeline_<mode>.png next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration; wall time is their median")
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
            "busy_fraction": [round(working(f["events"], start, end) / (end - start), 3) for f in facts],
            "peak_rss_mb": [round(f["peak_rss_mb"]) for f in facts]}


def working(events: list, start: float, end: float) -> float:
    """Seconds inside [start, end] that a stage spent in calls, start-up (init, warm) excluded;
    overlapping calls count once."""
    spans = sorted((max(a, start), min(b, end)) for n, a, b in events if n not in ("init", "warm", "setup"))
    total, reach = 0.0, start
    for a, b in spans:
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def timed(repeats: int, once, *args) -> tuple[dict, list[float]]:
    """Run `once(*args) -> report` `repeats` times; returns the last report and the wall times."""
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rep = once(*args)
        walls.append(time.perf_counter() - t0)
    return rep, walls


def median_text(walls: list[float]) -> str:
    w = sorted(walls)
    return f"{statistics.median(w):.1f}" + (f" [{w[0]:.1f}, {w[-1]:.1f}]" if len(w) > 1 else "")


def score(rows: list[dict], cores: int) -> str:
    """Ratios and targets into the rows; returns the markdown table."""
    single = next(r["wall_s"] for r in rows if r["mode"] == "single-process")
    base = {r["mode"]: r["wall_s"] for r in rows if r["stages"] == 1 and r["mode"] != "single-process"}
    lines = [("| mode | K | wall s, median [min, max] | pipeline s | wall / single | speed-up vs single "
              "| speed-up vs K=1 | busy % per stage | peak RSS MB per process | target | met | ppl pruned |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
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
        busy = " / ".join(f"{100 * b:.0f}" for b in r.get("busy_fraction", [])) or "-"
        rss = " / ".join(str(m) for m in r.get("peak_rss_mb", [])) or "-"
        lines.append(f"| {r['mode']} | {r['stages']} | {median_text(r['walls'])} | {pipe} | {r['ratio_to_single']:.2f}x | "
                     f"{r['speedup_vs_single']:.2f}x | {r['speedup_vs_k1']:.2f}x | {busy} | {rss} | {r['target']} | "
                     f"{met} | {'-' if ppl is None else f'{ppl:.2f}'} |")
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
        def fresh(job, out: Path, mode: str, stages: int | None):
            shutil.rmtree(out, ignore_errors=True)
            return job(config(a, out, mode, stages), quiet=True)

        rep, walls = timed(a.repeats, fresh, run, work / "single", "sequential", None)
        # the single-process job runs first, so this process's peak RSS is its own
        rows.append({"mode": "single-process", "stages": 1, "wall_s": statistics.median(walls), "walls": walls,
                     "perplexity": rep["perplexity"], "peak_rss_mb": [round(rep["peak_memory"]["host_rss_mb"])]})
        print(f"single-process: {median_text(walls)}s", file=sys.stderr, flush=True)
        for mode in modes:
            for k in ks:
                out = work / f"{mode}-{k}"
                rep, walls = timed(a.repeats, fresh, run_distributed, out, mode, k)
                rows.append({"mode": mode, "stages": k, "wall_s": statistics.median(walls), "walls": walls,
                             "perplexity": rep["perplexity"], **stage_summary(rep)})
                if k == max(ks) and (out / "timeline.png").exists():
                    png = Path(a.out).parent / f"timeline_{mode}.png"
                    png.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(out / "timeline.png", png)
                    rows[-1]["timeline"] = png.name
                if not a.work:
                    shutil.rmtree(out, ignore_errors=True)  # a float32 SmolLM2 checkpoint is 540 MB
                print(f"{mode} K={k}: {median_text(walls)}s", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)

    cores = os.cpu_count() or 1
    table = score(rows, cores)
    setup = {"model": a.model or "SmolLM2-135M (built-in)", "method": a.method, "nsamples": a.nsamples,
             "seqlen": a.seqlen, "eval_windows": a.eval_windows, "batch_size": a.batch_size, "cpus": a.cpus,
             "cores": cores, "repeats": a.repeats, "threads_per_stage": 1, "single_process_threads": 1,
             "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()}
    print(f"{a.method}, {a.nsamples} x {a.seqlen} calibration, {a.eval_windows} eval windows, {cores} cores, "
          f"one thread per stage and for the single-process job\n")
    print(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps({"setup": setup, "rows": rows, "table": table}, indent=1))
    os.replace(tmp, a.out)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
