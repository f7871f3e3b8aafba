"""The result does not depend on how busy the machine is (issue 22).

The same small job runs as `python -m jobs.prune` (a fresh process, so that the tool sets the
OpenMP environment before torch starts), once as the machine is and once beside two busy Python
processes that this test starts and kills. Every output tensor must be bit-identical (tolerance:
none): anything that sizes work by load or timing (libgomp's OMP_DYNAMIC, which sizes teams from the
load average; a threaded kernel whose bits follow the thread count it got) would show here. Two torch
threads, on the tiny Qwen3-MoE: its Hessians are where MKL's GEMM bits followed the thread count
(tests/test_determinism.py). report.json must also say which wait policy the run used.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
BUSY = "import time\nend = time.time() + 600\nwhile time.time() < end: pass"  # ends itself if the kill is missed


def _job(folder: Path, texts: dict, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_DYNAMIC")}
    env.update(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    subprocess.run([sys.executable, "-m", "jobs.prune", "--model", str(folder), "--out", str(out), "--quiet",
                    "--calib", str(texts["calib"]), "--eval", str(texts["eval"]), "--nsamples", "8",
                    "--seqlen", "64", "--batch-size", "8", "--eval-windows", "1"],
                   cwd=ROOT, env=env, check=True, timeout=600, stdout=subprocess.DEVNULL)
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    return got


def test_same_bits_quiet_and_beside_a_cpu_load(tiny_model, short_texts, tmp_path):
    folder = tiny_model("qwen3_moe")
    quiet = _job(folder, short_texts, tmp_path / "quiet")
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2)]
    try:
        time.sleep(1.0)  # both spinning before the job starts
        loaded = _job(folder, short_texts, tmp_path / "loaded")
        assert all(p.poll() is None for p in busy), "the load ended before the job did"
    finally:
        for p in busy:
            p.kill()
        for p in busy:
            p.wait()
    assert quiet.keys() == loaded.keys()
    differ = [k for k in quiet if not torch.equal(quiet[k], loaded[k])]
    assert not differ, f"{len(differ)} of {len(quiet)} tensors differ under load, first {differ[0]}"
    facts = json.loads((tmp_path / "loaded" / "report.json").read_text())["determinism"]
    assert facts["torch_threads"] == 2
    assert facts["openmp"]["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert facts["openmp"]["set_by_tool"].get("OMP_WAIT_POLICY") == "PASSIVE"
    assert facts["openmp"]["set_after_torch_import"] is False
