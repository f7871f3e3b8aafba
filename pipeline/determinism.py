"""When two runs give bit-identical weights: the conditions, as report.json states them.

Measured on torch 2.13 (CPU wheel, MKL, AVX-512, GNU OpenMP), 1 against 2 threads: MKL's GEMMs gave
the same bits for either thread count where they split the output over threads (layer forwards); its
threaded Cholesky did not, and changed SparseGPT and multiweight weights from layer 0 on (SmolLM2,
`python -m jobs.bench_pipeline --sections threads`); nor did its GEMM for a Hessian XᵀX where tokens
far outnumber columns (it splits the token sum over threads: from 512 tokens a batch at 64 columns,
8192 at 576), which changed the tiny Qwen3-MoE's weights from layer 0's q/k/v on. The solvers run
their whole-matrix factorisations (pipeline/solvers/common.py) and the Hessian accumulator its
product (hessian.py) on one thread, and the results no longer depend on the thread count there.
Load: the tool sets OMP_DYNAMIC=FALSE (pipeline/threads.py) so that libgomp never sizes its teams by
the load average; tests/test_load.py runs one job quiet and beside a CPU load.
"""
from __future__ import annotations

import torch

from . import threads as _threads

CONDITIONS = [
    "same model files and the same fingerprinted options (method, pattern, refit, solver options, "
    "calibration file, nsamples, seqlen, seed, batch size, dtype, mode; stagewise also the stage boundaries)",
    "same torch build and BLAS (MKL picks kernels by instruction set, e.g. AVX-512 or AVX2, which round differently)",
    "same device type: CPU and CUDA results differ",
    "any number of stages in sequential and dense mode (the same code on the same tensors; tested)",
    "CPU: torch thread count measured not to matter between 1 and 2 threads (SmolLM2, whole sparsegpt "
    "and multiweight jobs at 16 x 512 and 4 x 128 calibration tokens; tiny Qwen3-MoE and Zamba2 jobs, "
    "tested), with the Hessian products and whole-matrix factorisations on one thread; larger thread "
    "counts are not verified; --refit exact "
    "does depend on it (its batched Cholesky of each row's kept columns is not pinned: it is the costly part)",
    "CPU load: does not matter (tested: the same 2-thread job quiet and beside two busy processes) while "
    "OMP_DYNAMIC is FALSE, which the tool sets unless the environment sets it; the OpenMP wait policy "
    "(OMP_WAIT_POLICY, PASSIVE unless set) changes speed only",
    "CUDA: not verified; cuBLAS and cuSOLVER may differ from run to run unless "
    "torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8 are set",
]


def facts(device: str, threads: list[int] | int | None = None, openmp: list[dict] | dict | None = None) -> dict:
    """The `determinism` entry of report.json for a run on `device` with `threads` torch threads
    (one number per stage, or the single process's) and `openmp` settings (pipeline.threads.facts():
    per stage, or this process's)."""
    if threads is None:
        threads = torch.get_num_threads()
    return {"device": device, "torch_threads": threads, "openmp": openmp if openmp is not None else _threads.facts(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bit_identical_when": CONDITIONS}
