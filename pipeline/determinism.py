"""When two runs give bit-identical weights: the conditions, as report.json states them.

Measured on torch 2.13 (CPU wheel, MKL, AVX-512), SmolLM2-135M, 1 against 2 threads (`python -m
jobs.bench_pipeline --sections threads`): MKL's GEMMs (layer forwards, Hessians XᵀX) gave the same
bits for either thread count; only its threaded Cholesky did not, and it changed SparseGPT and
multiweight weights from layer 0 on. The solvers now run their whole-matrix factorisations on one
thread (pipeline/solvers/common.py), and the results no longer depend on the thread count there.
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
    "and multiweight jobs at 16 x 512 and 4 x 128 calibration tokens); larger thread counts are not "
    "verified; --refit exact "
    "does depend on it (its batched Cholesky of each row's kept columns is not pinned: it is the costly part)",
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
