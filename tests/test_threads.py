"""The OpenMP settings the tool makes (pipeline/threads.py): what, when, and that the user's win."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline import threads

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_passive_and_not_dynamic_unless_the_user_chose():
    assert threads.defaults({}) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_DYNAMIC": "FALSE"}
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):  # any wait setting of the user's
        assert "OMP_WAIT_POLICY" not in threads.defaults({var: "1"})
    assert threads.defaults({"OMP_DYNAMIC": "TRUE"}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.configure(env) == {"OMP_DYNAMIC": "FALSE"} and env["OMP_WAIT_POLICY"] == "ACTIVE"


def _fresh(code: str, **env) -> dict:
    """Run `code` in a fresh interpreter with the wait variables cleared (then `env`); its JSON line."""
    e = {k: v for k, v in os.environ.items() if k not in threads.REPORTED[2:]}
    e.update(env, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", code], env=e, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_entry_point_sets_them_before_torch_is_imported():
    """Importing jobs.prune (what `mwprune` and `python -m jobs.prune` do first) must not import torch:
    libgomp reads OMP_WAIT_POLICY once, when torch loads it."""
    got = _fresh("import json, os, sys, jobs.prune\n"
                 "before = 'torch' in sys.modules\n"
                 "from pipeline import threads\n"
                 "print(json.dumps({'torch_before': before, **threads.facts()}))")
    assert got["torch_before"] is False
    assert got["env"]["OMP_WAIT_POLICY"] == "PASSIVE" and got["set_after_torch_import"] is False
    assert got["set_by_tool"] == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_DYNAMIC": "FALSE"}
    assert got["openmp_runtime"] != "none"


def test_a_users_wait_policy_is_kept_and_reported():
    got = _fresh("import json, jobs.prune\nfrom pipeline import threads\nprint(json.dumps(threads.facts()))",
                 GOMP_SPINCOUNT="300000")
    assert got["env"]["OMP_WAIT_POLICY"] is None and got["env"]["GOMP_SPINCOUNT"] == "300000"
    assert "OMP_WAIT_POLICY" not in got["set_by_tool"]


def test_stage_env_carries_the_wait_settings():
    env = threads.stage_env()
    assert env.get("OMP_DYNAMIC") and any(k in env for k in threads.WAIT_VARS)
    assert "OMP_NUM_THREADS" not in env  # Ray sizes a stage's threads from its CPUs
