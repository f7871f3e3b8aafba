"""The threads benchmark (jobs/bench_threads.py) runs its rows, compares bits and stops what it starts.
(The timings themselves are measured by `python -m jobs.bench --sections contention`, never asserted.)"""
from __future__ import annotations

import os

from jobs import bench_threads


def _args(folder, texts):
    return ["--model", str(folder), "--calib", str(texts["calib"]), "--eval", str(texts["eval"]),
            "--nsamples", "2", "--seqlen", "32", "--eval-windows", "1"]


def test_contention_rows_alone_and_loaded(tiny_model, short_texts, tmp_path):
    res = bench_threads.contention(tmp_path, _args(tiny_model("llama"), short_texts),
                                   pairs=[("single", "1 thread"), ("single", "default (nothing set)")],
                                   rows_file=tmp_path / "rows.jsonl")
    rows = res["rows"]
    assert [(r["setting"], r["load_procs"]) for r in rows] == [
        ("1 thread", 0), ("1 thread", 2), ("default (nothing set)", 0), ("default (nothing set)", 2)]
    for r in rows:
        assert not r["stopped"] and r["wall_s"] > 0 and r["cpu_s"] > 0 and r["bit_identical_to_first"]
    # the job's own report says what it ran with
    assert rows[0]["determinism"]["torch_threads"] == 1
    assert rows[2]["determinism"]["openmp"]["set_by_tool"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 4
    assert res["table"].count("\n| single |") == 4


def test_a_stopped_job_leaves_nothing_running(tiny_model, short_texts, tmp_path):
    before = set(bench_threads._descendants(os.getpid()))
    r = bench_threads.run_job(_args(tiny_model("llama"), short_texts), bench_threads._clean_env({}), tmp_path / "o",
                              limit_s=0.5)
    assert r["stopped"] and r["perplexity"] is None
    assert set(bench_threads._descendants(os.getpid())) <= before | {os.getpid()}


def test_cpu_load_processes_end_with_the_block():
    with bench_threads.CpuLoad(2) as load:
        procs = list(load.procs)
        assert all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)
