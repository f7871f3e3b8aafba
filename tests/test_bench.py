"""The benchmark command's sections run, resume and report what the issue asks, on tiny inputs.
(The numbers themselves are measured by `python -m jobs.bench`, never asserted here.)"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import bench

ROOT = Path(__file__).resolve().parent.parent


def test_spread_is_median_quartiles_and_extremes():
    s = bench.spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["min"], s["q1"], s["q3"], s["max"], s["n"]) == (3.0, 1.0, 2.0, 4.0, 5.0, 5)
    assert bench.spread([7.0]) == {"median": 7.0, "min": 7.0, "q1": 7.0, "q3": 7.0, "max": 7.0, "n": 1}


def test_busy_time_counts_overlaps_once_and_skips_start_up():
    from jobs.bench_pipeline import working
    events = [("init", 0, 5), ("embed", 5, 6), ("run", 6, 9), ("push", 8, 10), ("nll", 12, 20)]
    assert working(events, 5, 15) == 1 + 4 + 3  # embed, run+push merged, nll cut at the end


def test_gap_closed_and_time_ratio():
    rows = [{"pattern": "0.5", "method": "sparsegpt", "dense": 30.0, "pruned": 40.0, "seconds": 10.0},
            {"pattern": "0.5", "method": "multiweight", "dense": 30.0, "pruned": 37.5, "seconds": 15.0},
            {"pattern": "0.5", "method": "wanda", "dense": 30.0, "pruned": 50.0, "seconds": 2.0},
            {"pattern": "2:4", "method": "sparsegpt", "dense": 30.0, "pruned": 29.0, "seconds": 4.0}]
    bench.add_ratios(rows)
    assert [r["gap_closed_vs_sparsegpt"] for r in rows[:3]] == [0.0, 0.25, -1.0]
    assert [r["time_vs_sparsegpt"] for r in rows] == [1.0, 1.5, 0.2, 1.0]
    assert math.isnan(rows[3]["gap_closed_vs_sparsegpt"])  # no gap to close


def test_e2e_rows_resume(tmp_path, tiny_model, short_texts, monkeypatch):
    inputs = {"model": tiny_model("llama"), "calib": short_texts["calib"], "eval": short_texts["eval"]}
    args = (tmp_path, False, ["0.5"], 4, 32, 2, ["magnitude"], inputs)
    res = bench.e2e(*args)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"magnitude", "sparsegpt"}  # sparsegpt always runs: it is the reference
    mag = rows["magnitude"]
    assert abs(mag["sparsity"] - 0.5) < 1e-3 and mag["layer_seconds"]["n"] == 3  # the tiny llama has 3 layers
    assert len((tmp_path / "e2e_rows.jsonl").read_text().splitlines()) == 2

    import pipeline.run

    def no_run(*a, **k):
        raise AssertionError("a finished row ran again")

    monkeypatch.setattr(pipeline.run, "run", no_run)
    again = bench.e2e(*args)  # every row comes from e2e_rows.jsonl
    assert [r["pruned"] for r in again["rows"]] == [r["pruned"] for r in res["rows"]]
    with pytest.raises(AssertionError, match="ran again"):  # another protocol is another row
        bench.e2e(tmp_path, False, ["0.5"], 5, 32, 2, ["magnitude"], inputs)

    table = bench.e2e_table(again)
    assert table.count("\n| 0.5 |") == 2
    png = bench.e2e_plot(again, tmp_path / "ppl.png")
    assert png is None or png.read_bytes()[:4] == b"\x89PNG"  # None only without matplotlib


def test_gpu_section_runs_on_cpu_at_tiny_scale(tmp_path):
    """The GPU section's code (solver timings per shape, the whole job on a random model of the
    same shapes, the projections) on small shapes, so that a GPU session only has to run it."""
    res = bench.gpu(device="cpu", scale="tiny", repeats=2, nsamples=8, seqlen=32, work=tmp_path)  # 2 batches
    assert set(res["solvers"]) == {"0.5", "2:4"}
    for per_method in res["solvers"].values():
        assert set(per_method) == {bench.label(m, r) for m, r in bench.E2E_METHODS}
        for v in per_method.values():
            assert set(v["per_shape"]) == set(bench.PER_LAYER)
            for s in v["per_shape"].values():
                assert s["n"] == 2 and 0 < s["min"] <= s["median"] <= s["max"]
            expect = sum(v["per_shape"][k]["median"] * n for k, n in bench.PER_LAYER.items())
            assert v["seconds_per_layer"] == pytest.approx(expect)
            assert v["projected_7b_seconds"] == pytest.approx(32 * expect)
    assert set(res["pipeline"]) == {"sparsegpt", "multiweight", "multiweight+auto"}
    # the default blend's dense stream: 8 x 32 tokens of the tiny shapes' hidden size, float32
    hidden = bench.SHAPES["tiny"][1]
    assert res["pipeline"]["multiweight+auto"]["dense_stream_mb"] == pytest.approx(8 * 32 * hidden * 4 / 2**20)
    assert res["pipeline"]["multiweight"]["dense_stream_mb"] is None
    for v in res["pipeline"].values():
        assert v["layer_seconds"]["n"] == 2
        assert v["projected_7b_seconds"] == pytest.approx(v["fixed_s"] + 32 * v["layer_seconds"]["median"])
    assert "| multiweight+cg |" in bench.gpu_table(res)
    assert list(tmp_path.iterdir()) == []  # the random model and runs are removed


@pytest.mark.slow
def test_pipeline_bench_reports_busy_memory_and_timeline(tmp_path, tiny_model):
    out = tmp_path / "p" / "pipeline.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "jobs.bench_pipeline", "--model", str(tiny_model("llama")),
                           "--stages", "2", "--modes", "sequential,dense", "--nsamples", "4", "--seqlen", "32",
                           "--eval-windows", "2", "--batch-size", "2", "--cpus", "2", "--repeats", "2",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {(r["mode"], r["stages"]): r for r in res["rows"]}
    assert set(rows) == {("single-process", 1), ("sequential", 2), ("dense", 2)}
    for (mode, k), r in rows.items():
        assert len(r["walls"]) == 2 and min(r["walls"]) <= r["wall_s"] <= max(r["walls"])
        if mode != "single-process":
            assert len(r["busy_fraction"]) == k and all(0 < b <= 1 for b in r["busy_fraction"])
            assert len(r["peak_rss_mb"]) == k and all(m > 0 for m in r["peak_rss_mb"])
    # sequential mode is the single-process job, bit for bit
    assert rows[("sequential", 2)]["perplexity"] == rows[("single-process", 1)]["perplexity"]
    assert (out.parent / "timeline_dense.png").read_bytes()[:4] == b"\x89PNG"
    assert "busy % per stage" in res["table"]


def test_moe_bench_tiny(tmp_path):
    """The MoE section at tiny scale: every method and pattern gets a row with positive times."""
    from jobs import bench_moe
    assert bench_moe.main(["--experts", "4", "--hidden", "32", "--inter", "8", "--tokens", "256",
                           "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "moe.json").read_text())
    assert {(r["method"], r["pattern"]) for r in res["rows"]} == \
        {(m, p) for m in bench_moe.METHODS for p in bench_moe.PATTERNS}
    assert all(r["moe_s"] > 0 and r["dense_s"] > 0 for r in res["rows"])


def test_agreement_counts_masks_and_finds_the_first_difference(tmp_path):
    """The thread check's comparison of two outputs: mask agreement overall and in layer 0."""
    import torch
    from safetensors.torch import save_file

    from jobs.bench_pipeline import agreement
    w = {f"model.layers.{i}.mlp.down_proj.weight": torch.tensor([[0.0, 1.0], [2.0, 0.0]]) for i in range(2)}
    for name, change in (("a", None), ("b", "model.layers.1.mlp.down_proj.weight")):
        (tmp_path / name).mkdir(parents=True)
        t = {k: v.clone() for k, v in w.items()}
        if change:
            t[change][0, 0] = 3.0  # one of the 8 entries: pruned in a, kept in b
        save_file(t, tmp_path / name / "model-00001-of-00002.safetensors")
    same = agreement(tmp_path / "a", tmp_path / "a")
    assert same["bit_identical"] and same["mask_agreement"] == 1.0
    diff = agreement(tmp_path / "a", tmp_path / "b")
    assert not diff["bit_identical"] and diff["first_differing"] == "model.layers.1.mlp.down_proj.weight"
    assert diff["mask_agreement"] == 7 / 8 and diff["mask_agreement_layer0"] == 1.0


@pytest.mark.slow
def test_pipeline_bench_memory_and_threads_sections(tmp_path, tiny_model):
    """Per-stage base and peak memory with the target against the float32 model; the thread check's
    rows (on this tiny model the 1- and 2-thread results are compared, not asserted equal)."""
    out = tmp_path / "p" / "pipeline.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "jobs.bench_pipeline", "--sections", "memory,threads",
                           "--model", str(tiny_model("llama")), "--memory-model", "4,64,128,4", "--memory-stages", "2",
                           "--thread-calibs", "2x32", "--eval-windows", "2", "--batch-size", "2", "--cpus", "2",
                           "--unpinned", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    mem = res["memory"]
    assert mem["stages"] == 2 and len(mem["rows"]) == 2 and mem["model"]["float32_bytes"] > 0
    for r in mem["rows"]:
        assert 0 < r["base_gb"] <= r["peak_gb"]
        assert math.isclose(r["above_base_x_model"], r["above_base_gb"] * 1e9 / mem["model"]["float32_bytes"], rel_tol=1e-9)
    assert mem["met"] == (mem["worst_x_model"] <= 0.25)
    rows = res["threads"]["rows"]
    assert [(r["threads"], r["pinned"]) for r in rows] == [(1, True), (2, True), (2, False)]
    for r in rows[1:]:
        assert 0 < r["mask_agreement"] <= 1 and r["bit_identical"] == (r["first_differing"] is None)
    assert "layer 0 mask agreement" in res["threads"]["table"]
