"""Threads under contention, and README's headline figures: two sections of `python -m jobs.bench`.

    contention  the single-process job and a `--stages 2` job, each alone and beside a 2-process CPU
                load (two `python -c "while True: pass"` that this benchmark starts and kills), at
                each thread setting: 2 threads spinning as torch did before (GOMP_SPINCOUNT=300000,
                libgomp's own default), 2 threads passive, 1 thread, and the tool's default (no
                variable set). Per row: wall seconds, CPU seconds of the job's whole process tree
                (Ray's daemons and stages included; read from /proc every 0.2 s, so a process that
                lives under 0.2 s is missed), the 1-minute load average before and after, the
                perplexity, and whether every output tensor is bit-identical to the first row's.
    readme      the default job (`python -m jobs.prune`, nothing else set), at the tool's default
                threads and at 1 thread: the figures README quotes (dense and pruned perplexity,
                seconds) and whether the two runs' tensors are bit-identical.

Each job runs as `python -m jobs.prune` in a fresh process, so that the OpenMP variables take effect
(they are read once, when torch is imported). The load average counts every process on the machine:
on a shared box it is not only this benchmark's load.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import threads

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--nsamples", "4", "--seqlen", "128", "--eval-windows", "2"]
OMP_VARS = threads.REPORTED  # every thread variable: a setting row sets its own, nothing else leaks in
SETTINGS = {
    "2 threads, spinning (before)": {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "300000"},
    "2 threads, passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "default (nothing set)": {},
}
LOAD = "while True: pass"


def _clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def _descendants(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def run_job(args: list[str], env: dict, out: Path, limit_s: float | None = None) -> dict:
    """One `python -m jobs.prune` run: wall seconds, CPU seconds of its process tree, report. Past
    limit_s the job is interrupted (SIGINT, then SIGKILL to the processes it started) and the row
    says `stopped`: its wall and CPU seconds are then lower bounds."""
    shutil.rmtree(out, ignore_errors=True)
    hz = os.sysconf("SC_CLK_TCK")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "jobs.prune", *args, "--out", str(out), "--quiet"], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, int] = {}
    tree: set[int] = set()
    stopped = False
    while p.poll() is None:
        for pid in _descendants(p.pid):
            t = _ticks(pid)
            if t is not None:
                seen[pid] = max(seen.get(pid, 0), t)
                tree.add(pid)
        if limit_s and time.perf_counter() - t0 > limit_s and not stopped:
            stopped = True
            wall = time.perf_counter() - t0
            p.send_signal(signal.SIGINT)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                pass
            for pid in sorted(tree - {p.pid}) + [p.pid]:  # only what this job started
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.2)
    if not stopped:
        wall = time.perf_counter() - t0
    stdout, stderr = p.communicate()
    if stopped:
        return {"wall_s": wall, "cpu_s": sum(seen.values()) / os.sysconf("SC_CLK_TCK"), "load_before": load0,
                "load_after": os.getloadavg()[0], "perplexity": None, "determinism": None, "stopped": True}
    if p.returncode != 0:
        raise RuntimeError(f"jobs.prune {' '.join(args)} failed ({p.returncode}): {stderr.strip()[-500:]}")
    rep = json.loads((out / "report.json").read_text())
    return {"wall_s": wall, "cpu_s": sum(seen.values()) / hz, "load_before": load0, "load_after": os.getloadavg()[0],
            "perplexity": rep.get("perplexity"), "determinism": rep.get("determinism"), "stopped": False}


def tensors(out: Path) -> dict:
    from safetensors.torch import load_file
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    return got


def same_bits(a: dict, b: dict) -> tuple[int, int]:
    """(tensors bit-identical, tensors) between two outputs."""
    import torch
    return sum(1 for k in a if k in b and torch.equal(a[k], b[k])), len(a)


class CpuLoad:
    """`n` busy Python processes for the duration of a with-block; killed (by pid) on exit."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", LOAD]) for _ in range(self.n)]
        time.sleep(1.0)  # let them reach the run queue before the job starts
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


ORDER = [("single", "default (nothing set)"), ("single", "1 thread"), ("stages 2", "default (nothing set)"),
         ("single", "2 threads, passive"), ("single", "2 threads, spinning (before)"),
         ("stages 2", "2 threads, spinning (before)")]


def contention(work: Path, job_args: list[str], pairs: list[tuple[str, str]] | None = None, loads=(0, 2),
               rows_file: Path | None = None, limit_s: float | None = None) -> dict:
    """Every (job, setting) of `pairs` alone and beside the load; rows also appended to rows_file as
    they finish. Ray gives each of the 2 stages one CPU, so one torch thread whatever the setting:
    there only the wait policy (and the driver's threads) differ."""
    rows, ref = [], None
    for kind, name in pairs or ORDER:
        args = job_args + (["--stages", "2"] if kind == "stages 2" else [])
        for load in loads:
            out = work / "run"
            with CpuLoad(load) if load else contextlib.nullcontext():
                r = run_job(args, _clean_env(SETTINGS[name]), out, limit_s)
            row = {"job": kind, "setting": name, "load_procs": load, **r}
            if not r["stopped"]:
                t = tensors(out)
                ref = ref if ref is not None else t
                eq, n = same_bits(ref, t)
                row.update(tensors_equal=eq, tensors=n, bit_identical_to_first=eq == n)
            rows.append(row)
            ppl = f"ppl {r['perplexity']['pruned']:.4f}, identical {row['tensors_equal']}/{row['tensors']}" \
                if not r["stopped"] else f"stopped after {limit_s:g} s"
            print(f"  contention {kind:<9} {name:<29} load {load}: {r['wall_s']:7.1f} s wall, {r['cpu_s']:7.1f} s CPU, "
                  f"load avg {r['load_before']:.1f}->{r['load_after']:.1f}, {ppl}", file=sys.stderr, flush=True)
            if rows_file:
                with open(rows_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
    shutil.rmtree(work / "run", ignore_errors=True)
    return {"job_args": job_args, "limit_s": limit_s, "rows": rows, "table": contention_table(rows, job_args)}



def contention_table(rows: list[dict], job_args: list[str]) -> str:
    what = "" if "--model" in job_args else " (SmolLM2-135M, multiweight 50%)"
    lines = [f"`python -m jobs.prune {' '.join(job_args)}`{what}; bit-identical: every "
             "output tensor equals the first row's; load avg: 1-minute load average before -> after (whole machine)", "",
             "| job | threads | beside 2 busy processes | wall s | CPU s | load avg | pruned perplexity | bit-identical |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["stopped"]:
            tail = "stopped | |"
            wall, cpu = f"> {r['wall_s']:.0f}", f"> {r['cpu_s']:.1f}"
        else:
            tail = f"{r['perplexity']['pruned']:.4f} | {'yes' if r['bit_identical_to_first'] else 'no'} " \
                   f"({r['tensors_equal']}/{r['tensors']}) |"
            wall, cpu = f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}"
        lines.append(f"| {r['job']} | {r['setting']} | {'yes' if r['load_procs'] else 'no'} | {wall} | {cpu} | "
                     f"{r['load_before']:.1f} -> {r['load_after']:.1f} | {tail}")
    return "\n".join(lines)


def readme(work: Path) -> dict:
    """The default job as README describes it, at the tool's default threads and at 1 thread."""
    rows, ref = [], None
    for name in ("default (nothing set)", "1 thread"):
        out = work / "readme-run"
        r = run_job([], _clean_env(SETTINGS[name]), out)
        rep = json.loads((out / "report.json").read_text())
        t = tensors(out)
        ref = ref or t
        eq, n = same_bits(ref, t)
        rows.append({"setting": name, **r, "seconds_in_report": rep["seconds"], "sparsity": rep["sparsity"]["overall"],
                     "bit_identical_to_first": eq == n, "tensors_equal": eq, "tensors": n})
        print(f"  readme {name}: dense {r['perplexity']['dense']:.4f}, pruned {r['perplexity']['pruned']:.4f}, "
              f"{r['wall_s']:.1f} s wall, load avg {r['load_before']:.1f}", file=sys.stderr, flush=True)
    shutil.rmtree(work / "readme-run", ignore_errors=True)
    lines = ["`python -m jobs.prune` (the default job: SmolLM2-135M, multiweight 50%, --target-blend auto, 16 x 512 calibration, "
             "8 x 512 evaluation)", "",
             "| threads | dense perplexity | pruned perplexity | sparsity | wall s | CPU s | load avg | bit-identical |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['perplexity']['dense']:.2f} | {r['perplexity']['pruned']:.2f} | "
                     f"{r['sparsity']:.4f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['load_before']:.1f} -> "
                     f"{r['load_after']:.1f} | {'yes' if r['bit_identical_to_first'] else 'no'} |")
    return {"rows": rows, "table": "\n".join(lines)}


def main(argv=None) -> int:
    """Standalone: `python -m jobs.bench_threads [contention|readme ...] [--full-job] [--out FILE]`."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m jobs.bench_threads", description=__doc__.splitlines()[0])
    p.add_argument("sections", nargs="*", default=["contention"], choices=["contention", "readme"])
    p.add_argument("--full-job", action="store_true", help="contention: the default job's size, not 4 x 128")
    p.add_argument("--limit-s", type=float, default=None, help="contention: stop a job after this many seconds")
    p.add_argument("--single-only", action="store_true", help="contention: the single-process job's rows only")
    p.add_argument("--job-args", default=None,
                   help="contention: the job's options instead of the 4 x 128 SmolLM2 job, as one string")
    p.add_argument("--out", default="bench-out/threads.json")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    res = {}
    try:
        if "contention" in a.sections:
            job = a.job_args.split() if a.job_args else [] if a.full_job else SMALL
            pairs = [x for x in ORDER if x[0] == "single"] if a.single_only else None
            res["contention"] = contention(work, job, pairs, rows_file=Path(a.out).with_suffix(".rows.jsonl"),
                                           limit_s=a.limit_s)
            print(res["contention"]["table"])
        if "readme" in a.sections:
            res["readme"] = readme(work)
            print(res["readme"]["table"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
