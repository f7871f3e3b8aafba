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

`--sections` adds checks to the default `pipeline`:

    memory   each stage's base (torch, transformers, Ray, the meta skeleton) and peak resident memory
             on a random Llama written in bf16 to a temporary folder (default: 24 layers, hidden 1536,
             intermediate 3072, 2.57 GB as float32), K = 6 sequential stages, magnitude, 2 x 64
             calibration tokens; target: every stage's peak above its base <= 0.25 x the float32 model
             (and the CUDA peak per stage beside it, on GPUs)
    threads  how far the single-process result moves with torch's thread count: 1 thread against
             --threads-max, at each --thread-calibs calibration (default 16 x 512 and 4 x 128):
             bit-identity, mask agreement overall and in layer 0, perplexity; with --unpinned also
             as before the solvers pinned their Cholesky factorisations to one thread
    spread   the exact (sequential) mode with each phase's solves spread over every stage, against
             the single-process job (one thread each) and against sequential stages that solve
             alone (MWPRUNE_SPREAD=0): --spread-method + --spread-refit at --spread-pattern (default
             multiweight + cg at 2:4, a solve-heavy run) for K in --spread-stages; wall time, busy %
             per stage, perplexity, and how far the weights are from the single process's
             (max |dW| / max |W| over every matrix). Target: >= 1.6x at K = 2 on a 2-core machine.
    cloud    the model on S3 against the same model in a local folder, at K in --cloud-stages (K = 1:
             the single-process job; K > 1: sequential stages): bytes each process read of the model
             and its reading seconds (report.json's model_bytes_read / model_read_s, per stage from
             stage_facts), against what it needs (its layers, the headers, the parts it owns). The
             store is moto's S3 server started here on a free port unless --cloud-model names an
             s3:// URI (the endpoint then comes from AWS_ENDPOINT_URL, as for any run); the node
             cache is emptied before each run, so every byte counted came from the store.
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

from pipeline import threads

threads.configure()  # as jobs.prune: the OpenMP wait policy before torch starts its runtime

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
    p.add_argument("--sections", default="pipeline", help="comma-separated: pipeline, memory, threads, spread, cloud")
    p.add_argument("--memory-model", default="24,1536,4096,12",
                   help="layers,hidden,intermediate,heads of the random Llama of the memory check")
    p.add_argument("--memory-stages", type=int, default=6)
    p.add_argument("--thread-calibs", default="16x512,4x128", help="nsamples x seqlen for the thread check")
    p.add_argument("--threads-max", type=int, default=2)
    p.add_argument("--spread-method", default="multiweight")
    p.add_argument("--spread-pattern", default="2:4", help="N:M like 2:4, or an unstructured sparsity like 0.5")
    p.add_argument("--spread-refit", default="cg")
    p.add_argument("--spread-stages", default="2,3")
    p.add_argument("--spread-runs", default="alone,spread", help="which sequential runs per K: alone, spread")
    p.add_argument("--cloud-model", default=None,
                   help="cloud: an s3:// URI of --model's files (default: upload --model to a local moto server)")
    p.add_argument("--cloud-stages", default="1,2,3")
    p.add_argument("--cloud-method", default="magnitude", help="cloud: the solver (reading is what is measured)")
    p.add_argument("--unpinned", action="store_true",
                   help="thread check: also run without pinning the solvers' Cholesky to one thread")
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
            "peak_rss_mb": [round(f["peak_rss_mb"]) for f in facts],
            "base_rss_mb": [round(f["base_rss_mb"]) for f in facts],
            "peak_above_base_mb": [round(f["peak_rss_mb"] - f["base_rss_mb"]) for f in facts],
            **({"cuda_peak_mb": [round(f.get("cuda_peak_mb", 0)) for f in facts]}
               if any("cuda_peak_mb" in f for f in facts) else {})}


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
              "| speed-up vs K=1 | busy % per stage | peak RSS MB per process (above base) | target | met | ppl pruned |"),
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
        above = r.get("peak_above_base_mb") or [None] * len(r.get("peak_rss_mb", []))
        rss = " / ".join(str(m) + ("" if d is None else f" ({d})") for m, d in zip(r.get("peak_rss_mb", []), above)) or "-"
        lines.append(f"| {r['mode']} | {r['stages']} | {median_text(r['walls'])} | {pipe} | {r['ratio_to_single']:.2f}x | "
                     f"{r['speedup_vs_single']:.2f}x | {r['speedup_vs_k1']:.2f}x | {busy} | {rss} | {r['target']} | "
                     f"{met} | {'-' if ppl is None else f'{ppl:.2f}'} |")
    return "\n".join(lines)


def init_ray(cpus: int, gpus: int) -> None:
    import ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = str(Path(__file__).resolve().parent.parent)
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": root}})


def pipeline(a, work: Path) -> dict:
    import ray
    import torch

    from actors.driver import run_distributed
    from pipeline.run import run

    ks = [int(k) for k in a.stages.split(",")]
    modes = [m for m in a.modes.split(",") if m]
    init_ray(a.cpus, max(ks))
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

    cores = os.cpu_count() or 1
    table = score(rows, cores)
    setup = {"model": a.model or "SmolLM2-135M (built-in)", "method": a.method, "nsamples": a.nsamples,
             "seqlen": a.seqlen, "eval_windows": a.eval_windows, "batch_size": a.batch_size, "cpus": a.cpus,
             "cores": cores, "repeats": a.repeats, "threads_per_stage": 1, "single_process_threads": 1,
             "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()}
    print(f"{a.method}, {a.nsamples} x {a.seqlen} calibration, {a.eval_windows} eval windows, {cores} cores, "
          f"one thread per stage and for the single-process job\n")
    print(table)
    return {"setup": setup, "rows": rows, "table": table}


def memory(a, work: Path) -> dict:
    """Per-stage base and peak memory on a random Llama (see the module docstring)."""
    import ray

    from actors.driver import run_distributed
    from jobs.bench import random_llama
    from pipeline import assets
    from pipeline.run import RunConfig
    import torch

    layers, hidden, inter, heads = (int(x) for x in a.memory_model.split(","))
    k = a.memory_stages
    folder = work / "memory-model"
    bf16_bytes = random_llama(folder, layers, hidden, inter, heads, assets.default_model_dir(), dtype=torch.bfloat16)
    f32_bytes = 2 * bf16_bytes
    init_ray(a.cpus, k)
    try:
        out = work / "memory-out"
        rep = run_distributed(RunConfig(out=str(out), model=str(folder), method="magnitude", nsamples=2, seqlen=64,
                                        eval_windows=2, batch_size=1, mode="sequential", stages=k).resolve(), quiet=True)
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(work / "memory-out", ignore_errors=True)
    gb = 1e9
    rows = []
    for f in rep["pipeline"]["stage_facts"]:
        above = (f["peak_rss_mb"] - f["base_rss_mb"]) * 2**20
        shared = f.get("shared_rss_mb", 0.0) * 2**20  # object-store pages read zero-copy, at the end
        rows.append({"stage": f["stage"], "layers": f"{f['layers'][0]}-{f['layers'][-1]}",
                     "base_gb": f["base_rss_mb"] * 2**20 / gb, "peak_gb": f["peak_rss_mb"] * 2**20 / gb,
                     "above_base_gb": above / gb, "above_base_x_model": above / f32_bytes,
                     "shared_gb": shared / gb, "above_base_less_shared_x_model": (above - shared) / f32_bytes,
                     "helped_pieces": f.get("helped_pieces", 0), "help_s": f.get("help_s", 0.0),
                     # sampled every 20 ms (actors.stage.RssWatch): the stage's own pages, object store left out
                     "private_above_base_gb": (f.get("peak_private_rss_mb", float("nan"))
                                               - f.get("base_private_rss_mb", float("nan"))) * 2**20 / gb,
                     "cuda_peak_gb": f["cuda_peak_mb"] * 2**20 / gb if "cuda_peak_mb" in f else None,
                     "heap_capped": f.get("heap_capped")})
    for r in rows:
        r["private_above_base_x_model"] = r["private_above_base_gb"] * gb / f32_bytes
    worst = max(r["above_base_x_model"] for r in rows)
    worst_private = max(r["private_above_base_x_model"] for r in rows)
    spread_on = os.environ.get("MWPRUNE_SPREAD", "1") != "0"
    lines = [f"Random Llama, {layers} layers, hidden {hidden}, intermediate {inter}: {f32_bytes / gb:.2f} GB as float32 "
             f"({bf16_bytes / gb:.2f} GB bf16 on disk); {k} sequential stages, spread solves "
             f"{'on' if spread_on else 'off'}, magnitude 50%, 2 x 64 calibration tokens.",
             "", "| stage | layers | base GB | peak GB | peak - base GB | (peak - base) / float32 model "
             "| object store at end GB | private peak - base GB | private / float32 model | pieces helped | CUDA peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cuda = "-" if r["cuda_peak_gb"] is None else f"{r['cuda_peak_gb']:.2f}"
        lines.append(f"| {r['stage']} | {r['layers']} | {r['base_gb']:.2f} | {r['peak_gb']:.2f} | "
                     f"{r['above_base_gb']:.2f} | {r['above_base_x_model']:.3f} | {r['shared_gb']:.3f} | "
                     f"{r['private_above_base_gb']:.2f} | {r['private_above_base_x_model']:.3f} | "
                     f"{r['helped_pieces']} | {cuda} |")
    lines.append(f"\ntarget: every stage <= 0.25x the float32 model; worst {worst:.3f}x (object-store pages "
                 f"included): {'met' if worst <= 0.25 else 'not met'}; worst private {worst_private:.3f}x: "
                 f"{'met' if worst_private <= 0.25 else 'not met'}; load average {os.getloadavg()[0]:.1f}")
    table = "\n".join(lines)
    print(table)
    return {"model": {"layers": layers, "hidden": hidden, "intermediate": inter, "heads": heads,
                      "float32_bytes": f32_bytes, "bf16_bytes": bf16_bytes}, "stages": k, "spread": spread_on,
            "rows": rows, "worst_x_model": worst, "worst_private_x_model": worst_private, "met": worst <= 0.25,
            "load_average": os.getloadavg(), "seconds": rep["seconds"], "table": table}


def _tensors(out: Path) -> dict:
    from safetensors.torch import load_file
    got = {}
    for f in sorted(out.glob("*.safetensors")):  # every shard sits at the top level
        got.update(load_file(f))
    return got


def agreement(a_out: Path, b_out: Path) -> dict:
    """How two runs' pruned weights compare: bit-identity, first differing tensor, mask agreement
    (fraction of matrix entries pruned in both or kept in both), overall and in layer 0."""
    import torch

    ta, tb = _tensors(a_out), _tensors(b_out)
    same = agree = total = agree0 = total0 = 0
    first = None
    for name in sorted(ta):
        x, y = ta[name], tb[name]
        if torch.equal(x, y):
            same += 1
        elif first is None:
            first = name
        if x.dim() != 2:
            continue
        n = int(((x == 0) == (y == 0)).sum())
        agree, total = agree + n, total + x.numel()
        if ".layers.0." in name:
            agree0, total0 = agree0 + n, total0 + x.numel()
    return {"bit_identical": first is None, "first_differing": first, "tensors_equal": same, "tensors": len(ta),
            "mask_agreement": agree / total, "mask_agreement_layer0": agree0 / total0 if total0 else None}


def threads(a, work: Path) -> dict:
    """The single-process job at 1 thread and at --threads-max threads (see the module docstring)."""
    from contextlib import nullcontext

    import torch

    from pipeline.run import RunConfig, run
    from pipeline.solvers import common

    pinned = common.one_thread
    rows = []
    for calib in a.thread_calibs.split(","):
        ns, sl = (int(x) for x in calib.lower().split("x"))
        outs = {}
        variants = [("1 thread", 1, True), (f"{a.threads_max} threads", a.threads_max, True)]
        if a.unpinned:
            variants.append((f"{a.threads_max} threads, Cholesky not pinned", a.threads_max, False))
        for label, n, pin in variants:
            out = work / f"threads-{ns}x{sl}-{n}-{pin}"
            shutil.rmtree(out, ignore_errors=True)
            torch.set_num_threads(n)
            common.one_thread = pinned if pin else (lambda t: nullcontext())
            try:
                t0 = time.perf_counter()
                rep = run(RunConfig(out=str(out), model=a.model, method=a.method, nsamples=ns, seqlen=sl,
                                    eval_windows=a.eval_windows, batch_size=a.batch_size).resolve(), quiet=True)
            finally:
                common.one_thread = pinned
                torch.set_num_threads(1)
            outs[label] = out
            row = {"calibration": f"{ns} x {sl}", "run": label, "threads": n, "pinned": pin,
                   "wall_s": time.perf_counter() - t0, "perplexity": rep["perplexity"]["pruned"]}
            if label != "1 thread":
                row.update(agreement(outs["1 thread"], out))
            rows.append(row)
            print(f"threads {calib} {label}: {row['wall_s']:.0f}s, perplexity {row['perplexity']:.4f}"
                  + (f", bit-identical {row['bit_identical']}, mask agreement {row['mask_agreement']:.6f}"
                     if "bit_identical" in row else ""), file=sys.stderr, flush=True)
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    lines = [f"{a.method}, single process, {a.eval_windows} eval windows; each run against the 1-thread run", "",
             "| calibration | run | perplexity | bit-identical | mask agreement | layer 0 mask agreement | first differing |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "bit_identical" not in r:
            lines.append(f"| {r['calibration']} | {r['run']} | {r['perplexity']:.3f} | | | | |")
        else:
            lines.append(f"| {r['calibration']} | {r['run']} | {r['perplexity']:.3f} | {'yes' if r['bit_identical'] else 'no'} "
                         f"| {r['mask_agreement']:.6f} | {r['mask_agreement_layer0']:.6f} | {r['first_differing'] or '-'} |")
    table = "\n".join(lines)
    print(table)
    return {"method": a.method, "rows": rows, "table": table}


def max_rel_diff(a_out: Path, b_out: Path) -> float:
    """max over matrices of max |dW| / max |W| between two runs' outputs."""
    ta, tb = _tensors(a_out), _tensors(b_out)
    return max(float((ta[k].float() - tb[k].float()).abs().max() / ta[k].float().abs().max().clamp_min(1e-30))
               for k in ta if ta[k].dim() >= 2)


def spread(a, work: Path) -> dict:
    """Sequential stages that share every phase's solves (see the module docstring)."""
    import ray
    import torch

    from actors.driver import run_distributed
    from pipeline.run import RunConfig, run

    ks = [int(k) for k in a.spread_stages.split(",")]
    pat = a.spread_pattern
    nm = tuple(int(x) for x in pat.split(":")) if ":" in pat else None

    def cfg(out: Path, stages):
        return RunConfig(out=str(out), model=a.model, method=a.spread_method, nm=nm,
                         sparsity=None if nm else float(pat), refit=None if a.spread_refit == "none" else a.spread_refit,
                         nsamples=a.nsamples, seqlen=a.seqlen, eval_windows=a.eval_windows, batch_size=a.batch_size,
                         mode="sequential", stages=stages).resolve()

    def fresh(job, out, stages):
        shutil.rmtree(out, ignore_errors=True)
        return job(cfg(out, stages), quiet=True)

    init_ray(a.cpus, max(ks))
    rows = []
    load_start = os.getloadavg()
    old = os.environ.get("MWPRUNE_SPREAD")
    try:
        torch.set_num_threads(1)
        single = work / "spread-single"
        rep, walls = timed(a.repeats, fresh, run, single, None)
        rows.append({"run": "single process", "stages": 1, "wall_s": statistics.median(walls), "walls": walls,
                     "perplexity": rep["perplexity"], "max_rel_dW": 0.0})
        print(f"single-process: {median_text(walls)}s", file=sys.stderr, flush=True)
        for k in ks:
            for spread_on in [r == "spread" for r in a.spread_runs.split(",") if r]:
                os.environ["MWPRUNE_SPREAD"] = "1" if spread_on else "0"
                out = work / f"spread-{k}-{int(spread_on)}"
                rep, walls = timed(a.repeats, fresh, run_distributed, out, k)
                rows.append({"run": "sequential, spread" if spread_on else "sequential, alone", "stages": k,
                             "wall_s": statistics.median(walls), "walls": walls, "perplexity": rep["perplexity"],
                             "max_rel_dW": max_rel_diff(single, out), **stage_summary(rep),
                             "help_s": [f.get("help_s", 0) for f in rep["pipeline"]["stage_facts"]],
                             "own_share_s": [f.get("own_share_s", 0) for f in rep["pipeline"]["stage_facts"]],
                             "waited_for_peers_s": [f.get("waited_for_peers_s", 0)
                                                    for f in rep["pipeline"]["stage_facts"]],
                             "layer_s": sum(x["seconds"] for x in rep["layers"]),
                             "solve_s": sum(m["seconds"] for x in rep["layers"] for m in x["modules"].values())})
                if spread_on and k == min(ks) and (out / "timeline.png").exists():
                    png = Path(a.out).parent / "timeline_spread.png"
                    png.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(out / "timeline.png", png)
                shutil.rmtree(out, ignore_errors=True)
                print(f"K={k} spread={spread_on}: {median_text(walls)}s", file=sys.stderr, flush=True)
        shutil.rmtree(single, ignore_errors=True)
    finally:
        if old is None:
            os.environ.pop("MWPRUNE_SPREAD", None)
        else:
            os.environ["MWPRUNE_SPREAD"] = old
        ray.shutdown()
    base = rows[0]["wall_s"]
    lines = [f"{a.spread_method} {pat} + refit {a.spread_refit}, {a.nsamples} x {a.seqlen} calibration, "
             f"{a.eval_windows} eval windows, {os.cpu_count()} cores, one thread per stage and for the single process", "",
             "| run | K | wall s | pipeline s | speed-up vs single | busy % per stage | help s per stage "
             "| ppl dense | ppl pruned | max dW / max W |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r["speedup_vs_single"] = base / r["wall_s"]
        busy = " / ".join(f"{100 * b:.0f}" for b in r.get("busy_fraction", [])) or "-"
        helps = " / ".join(f"{h:.0f}" for h in r.get("help_s", [])) or "-"
        pipe = f"{r['pipeline_s']:.1f}" if "pipeline_s" in r else "-"
        ppl = r["perplexity"] or {}
        lines.append(f"| {r['run']} | {r['stages']} | {median_text(r['walls'])} | {pipe} | {r['speedup_vs_single']:.2f}x | "
                     f"{busy} | {helps} | {ppl.get('dense', float('nan')):.3f} | {ppl.get('pruned', float('nan')):.3f} | "
                     f"{r['max_rel_dW']:.1e} |")
    for r in rows:
        if "own_share_s" in r:
            lines.append(f"\n{r['run']}, K = {r['stages']}: layers {r['layer_s']:.1f} s (solves {r['solve_s']:.1f} s of "
                         f"solver time, all pieces); per stage: own share {r['own_share_s']} s, waited for peers "
                         f"{r['waited_for_peers_s']} s, helped others {r['help_s']} s")
    k2 = next((r for r in rows if r["stages"] == 2 and r["run"] == "sequential, spread"), None)
    met = k2 is not None and k2["speedup_vs_single"] >= 1.6
    lines.append(f"\ntarget: sequential, spread, K = 2 >= 1.6x the single process: "
                 + ("not run" if k2 is None else f"{k2['speedup_vs_single']:.2f}x, {'met' if met else 'not met'}"))
    table = "\n".join(lines)
    print(table)
    return {"setup": {"method": a.spread_method, "pattern": pat, "refit": a.spread_refit, "nsamples": a.nsamples,
                      "seqlen": a.seqlen, "eval_windows": a.eval_windows, "cores": os.cpu_count(),
                      "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()},
            "rows": rows, "table": table, "met": met}


def _checkpoint_parts(folder: Path) -> tuple[dict[str, int], int]:
    """Tensor name -> data bytes, and the header bytes of all shards, from the local copy."""
    sizes, headers = {}, 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            headers += 8 + n
            for k, t in json.loads(fh.read(n)).items():
                if k != "__metadata__":
                    sizes[k] = t["data_offsets"][1] - t["data_offsets"][0]
    return sizes, headers


def cloud(a, work: Path) -> dict:
    """See the module docstring (cloud)."""
    import ray
    import torch

    from actors.driver import run_distributed
    from pipeline import assets, loading
    from pipeline.run import RunConfig, run

    folder = Path(a.model) if a.model else assets.default_model_dir()
    server = None
    os.environ["MWPRUNE_CACHE"] = str(work / "cache")  # before Ray starts: its workers inherit it
    uri = a.cloud_model
    if uri is None:
        import logging
        import socket

        import boto3
        from moto.server import ThreadedMotoServer
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        t0 = time.perf_counter()
        for f in sorted(folder.iterdir()):
            if f.is_file():
                client.upload_file(str(f), "bench", f"model/{f.name}")
        print(f"cloud: uploaded {folder} to the local S3 server in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr, flush=True)
        uri = "s3://bench/model"
    sizes, headers = _checkpoint_parts(folder)
    total = sum(sizes.values())
    ks = [int(k) for k in a.cloud_stages.split(",")]
    init_ray(a.cpus, max(ks))
    files = loading.ModelFiles(folder)
    from pipeline.calibrate import Trunk
    trunk = Trunk(files, "cpu")
    before, after = trunk.before, trunk.after

    conv = trunk.model._mwprune_conversion

    def needs(layers: list[int], first: bool, last: bool) -> int:
        """Bytes a process needs: the headers, its layers, the embeddings (first), the tail and head
        (last; a tied head is the embedding tensor)."""
        keys = {k for i in layers for k in trunk.layer_keys(i)}
        for group, yes in ((before, first), (after, last)):
            for p in group if yes else []:
                got = conv.keys_for(p) or [k for b in before for k in conv.keys_for(b)]  # tied head
                keys |= set(got)
        return headers + sum(sizes.get(k, 0) for k in keys)

    rows = []
    try:
        torch.set_num_threads(1)
        for k in ks:
            for source, model in (("local folder", str(folder)), ("s3", uri)):
                shutil.rmtree(work / "cache" / "remote", ignore_errors=True)  # every byte from the store
                out = work / f"cloud-{k}-{source.split()[0]}"
                shutil.rmtree(out, ignore_errors=True)
                cfg = RunConfig(out=str(out), model=model, method=a.cloud_method, nsamples=a.nsamples,
                                seqlen=a.seqlen, eval_windows=a.eval_windows, batch_size=a.batch_size,
                                mode="sequential", stages=None if k == 1 else k).resolve()
                t0 = time.perf_counter()
                rep = (run if k == 1 else run_distributed)(cfg, quiet=True)
                wall = time.perf_counter() - t0
                def row(name, c, layers, first, last):
                    return {"process": name, "layers": layers, "bytes": c["model_bytes_read"],
                            "small_files": c.get("model_small_files_bytes", 0), "cache": c.get("model_cache_bytes", 0),
                            "read_s": c["model_read_s"], "requests": c.get("model_requests"),
                            "needs": needs(layers, first, last)}
                procs = [row("single process", rep, list(range(trunk.n_layers)), True, True)]
                if k > 1:  # the driver reads the parts outside the layers for the output (finish)
                    procs = [row("driver", rep, [], True, True)] + [
                        row(f"stage {f['stage']}", f, f["layers"], f["stage"] == 0, f["stage"] == k - 1)
                        for f in rep["pipeline"]["stage_facts"]]
                for p in procs:
                    rows.append({"source": source, "stages": k, "wall_s": round(wall, 2), **p})
                print(f"cloud: {source}, K = {k}: {wall:.1f}s", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()
    lines = [f"checkpoint: {total / 1e6:.1f} MB of tensors, {headers} header bytes; {trunk.n_layers} layers",
             "MB read: from the store (s3) or the files (local folder), config and tokenizer files included; "
             "cache: tensor bytes served from the node's cache (a tensor asked for again, or read by another "
             "process of this node); needed: its layers, the headers, the parts it owns; "
             "asked / needed = (read - small files + cache) / needed",
             "", "| source | K | process | layers | MB read | of which small files | tensor MB from node cache "
             "| share of checkpoint read | asked / needed | read s | job wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ls = f"{r['layers'][0]}-{r['layers'][-1]}" if r["layers"] else "-"
        asked = r["bytes"] - r["small_files"] + r["cache"]
        lines.append(f"| {r['source']} | {r['stages']} | {r['process']} | {ls} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['small_files'] / 1e6:.2f} | {r['cache'] / 1e6:.2f} | "
                     f"{(r['bytes'] - r['small_files']) / (total + headers):.3f} | {asked / r['needs']:.3f} | "
                     f"{r['read_s']:.2f} | {r['wall_s']:.1f} |")
    table = "\n".join(lines)
    print(table)
    return {"setup": {"model": str(folder), "uri": uri, "method": a.cloud_method, "nsamples": a.nsamples,
                      "seqlen": a.seqlen, "eval_windows": a.eval_windows, "tensor_bytes": total,
                      "header_bytes": headers, "store": "moto (local)" if server is not None else "given"},
            "rows": rows, "table": table}


def main(argv=None) -> int:
    a = parse(argv)
    sections = [x for x in a.sections.split(",") if x]
    unknown = set(sections) - {"pipeline", "memory", "threads", "spread", "cloud"}
    if unknown:
        print(f"error: unknown section(s) {', '.join(sorted(unknown))}; choose pipeline, memory, threads, spread, cloud",
              file=sys.stderr)
        return 2
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {}
    try:
        if "pipeline" in sections:
            result.update(pipeline(a, work))
        if "memory" in sections:
            result["memory"] = memory(a, work)
        if "threads" in sections:
            result["threads"] = threads(a, work)
        if "spread" in sections:
            result["spread"] = spread(a, work)
        if "cloud" in sections:
            result["cloud"] = cloud(a, work)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, a.out)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
