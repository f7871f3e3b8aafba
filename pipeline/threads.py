"""CPU threads that do not collapse when the cores are shared: the OpenMP wait policy, set before torch.

This torch (2.13 CPU wheel) runs ATen's parallel loops and its statically linked MKL on GNU OpenMP
(`torch/lib/libgomp.so.1`). libgomp reads its environment once, when it is loaded, i.e. when torch
is first imported; unset, a thread that waits at a barrier spins for about 300,000 iterations
(GOMP_SPINCOUNT's default, a few ms) before it sleeps. On a box whose cores are busy, the two
threads' spinning takes the cores from the thread holding the work (and from the other
processes), and a 2-thread job ran 7-10x slower than a 1-thread one (issue 22; the contention
section of `python -m jobs.bench`, docs/measurements-threads.md). PASSIVE makes waiting threads
sleep at once: libgomp, LLVM's libomp and Intel's libiomp5 all honour OMP_WAIT_POLICY.

So every entry point calls `configure()` before anything imports torch (jobs/prune.py at import,
Ray stage processes through their runtime_env: `stage_env()`). A user's own setting wins: any of
OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME in the environment leaves the wait policy alone.
OMP_DYNAMIC=FALSE (libgomp's default) is made explicit: TRUE lets libgomp size each team from the
load average, which would tie the thread count, and with it the last bits of some kernels, to load.

None of this imports torch; `facts()` (which does) states what was used, for report.json.
"""
from __future__ import annotations

import os
import sys

WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # any one set: the user chose
REPORTED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
            "OMP_DYNAMIC", "MKL_DYNAMIC")
# In a Ray stage's environment: which of its wait variables the driver's configure() set. The stage
# finds them set when it starts, so without this its report would read as if the user had set them.
SET_BY_TOOL_VAR = "MWPRUNE_SET_BY_TOOL"

# What configure() set in this process (the rest came from the user), and whether torch was already
# imported then (so that the OpenMP runtime had read its environment before: too late to matter).
_set_here: dict[str, str] = {}
_late = False


def defaults(environ=os.environ) -> dict[str, str]:
    """The variables the tool sets where the user has not."""
    out = {}
    if not any(v in environ for v in WAIT_VARS):
        out["OMP_WAIT_POLICY"] = "PASSIVE"
    if "OMP_DYNAMIC" not in environ:
        out["OMP_DYNAMIC"] = "FALSE"
    return out


def configure(environ=os.environ) -> dict[str, str]:
    """Set the defaults in `environ` (this process's by default); returns what it set. Call before
    `import torch`: afterwards it still sets them (for child processes) but this process's OpenMP
    runtime has read its environment already, which facts() reports."""
    global _late
    new = defaults(environ)
    environ.update(new)
    if environ is os.environ:
        _set_here.update(new)
        _late = _late or ("torch" in sys.modules and bool(new))
    return new


def stage_env() -> dict[str, str]:
    """env_vars for a Ray stage process: this process's settings of the wait variables (the user's or
    configure()'s), so that stages on any node wait as the driver does."""
    configure()
    env = {k: os.environ[k] for k in REPORTED[2:] if k in os.environ}
    env[SET_BY_TOOL_VAR] = ",".join(sorted(k for k, v in _set_here.items() if env.get(k) == v))
    return env


def set_by_tool() -> dict[str, str]:
    """The variables the tool set: by configure() in this process, or, in a Ray stage, by the driver's
    (named in SET_BY_TOOL_VAR by stage_env()); the rest of REPORTED came from the user (or Ray)."""
    out = dict(_set_here)
    for k in os.environ.get(SET_BY_TOOL_VAR, "").split(","):
        if k in os.environ:
            out[k] = os.environ[k]
    return out


def facts() -> dict:
    """The thread settings of this process, for report.json's `determinism` block."""
    import torch

    info = torch.__config__.parallel_info()
    runtime = "GNU libgomp" if _has_lib("libgomp") else "LLVM/Intel libomp" if _has_lib("libomp") or _has_lib("libiomp") \
        else ("OpenMP (unknown runtime)" if "OpenMP" in info else "none")
    return {"openmp_runtime": runtime, "env": {k: os.environ.get(k) for k in REPORTED},
            "set_by_tool": set_by_tool(), "set_after_torch_import": _late}


def describe() -> str:
    """For the progress line: torch's threads and how idle OpenMP threads wait."""
    import torch

    n = torch.get_num_threads()
    wait = os.environ.get("OMP_WAIT_POLICY") or ("GOMP_SPINCOUNT=" + os.environ["GOMP_SPINCOUNT"]
                                                 if "GOMP_SPINCOUNT" in os.environ else "unset")
    who = " (set by mwprune; OMP_WAIT_POLICY/OMP_NUM_THREADS override)" if "OMP_WAIT_POLICY" in set_by_tool() else ""
    return f"{n} thread{'s' if n != 1 else ''}, OpenMP wait {wait.lower()}{who}"


def _has_lib(stem: str) -> bool:
    """Is a shared library whose name starts with `stem` mapped into this process?"""
    try:
        with open("/proc/self/maps") as f:
            return any(f"/{stem}" in line for line in f)
    except OSError:
        return False
