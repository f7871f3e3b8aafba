"""Results do not depend on torch's thread count (on CPU), and report.json says when they are identical.

Equality tolerance: none. MKL's GEMMs gave the same bits for 1 and 2 threads where they split the
output over threads; its threaded Cholesky did not, nor did its GEMM for a Hessian XᵀX where tokens
far outnumber columns (it splits the token sum over threads), which is why the solvers pin their
whole-matrix factorisations and the Hessian accumulator its product to one thread
(pipeline/solvers/common.py, hessian.py). The unpinned cases are checked too, so that these tests
would notice if the shapes here stopped exercising the threaded kernels.
"""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from pipeline import determinism
from pipeline.run import RunConfig, run
from pipeline.solvers import HessianAccumulator, common, hessian, prune


def _problem(c: int = 576, rows: int = 576):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * c, c, generator=g) * torch.linspace(0.1, 3.0, c)
    return torch.randn(rows, c, generator=g), x.T @ x / (4 * c)


def _at(threads: int, fn):
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("kw", [dict(method="sparsegpt", sparsity=0.5), dict(method="multiweight", sparsity=0.5),
                                dict(method="multiweight", nm=(2, 4)),
                                # admm's (H + ρI)⁻¹: unpinned, its 2:4 masks moved between 1 and 2 threads
                                dict(method="admm", nm=(2, 4), refit="cg")])
def test_solvers_give_the_same_bits_on_one_and_two_threads(kw):
    W, H = _problem()
    one = _at(1, lambda: prune(W, H, **kw))
    two = _at(2, lambda: prune(W, H, **kw))
    assert torch.equal(one, two), (one - two).abs().max().item()


def test_the_unpinned_factorisation_does_depend_on_threads(monkeypatch):
    """What the pin is for: without it, 1 and 2 threads give different SparseGPT weights here."""
    W, H = _problem()
    monkeypatch.setattr(common, "one_thread", lambda t: nullcontext())
    one = _at(1, lambda: prune(W, H, method="sparsegpt", sparsity=0.5))
    two = _at(2, lambda: prune(W, H, method="sparsegpt", sparsity=0.5))
    if torch.equal(one, two):
        pytest.skip("this BLAS build gives the same bits anyway; nothing to show")
    assert not torch.equal(one, two)


def _tokens(n: int = 2048, c: int = 64):
    """Activations whose XᵀX MKL (2 threads) sums in two halves of the tokens: 2048 x 64 (measured
    from 512 tokens at 64 columns; 8192 at 576)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, c, generator=g) * torch.linspace(0.1, 3.0, c)


def test_hessian_gives_the_same_bits_on_one_and_two_threads():
    x = _tokens()

    def acc():
        a = HessianAccumulator(x.shape[1])
        for part in x.split(512 + 256):  # several adds: the running mean's rescale is exercised too
            a.add(part)
        return a.hessian

    one, two = _at(1, acc), _at(2, acc)
    assert torch.equal(one, two), (one - two).abs().max().item()


def test_the_unpinned_hessian_product_does_depend_on_threads():
    """What the Hessian's pin is for: the same addmm on 2 threads gives other bits at this shape."""
    x = _tokens()
    one = _at(1, lambda: torch.zeros(64, 64).addmm_(x.T, x, alpha=1 / len(x)))
    two = _at(2, lambda: torch.zeros(64, 64).addmm_(x.T, x, alpha=1 / len(x)))
    if torch.equal(one, two):
        pytest.skip("this BLAS build sums these tokens the same way on 2 threads; nothing to show")
    assert not torch.equal(one, two)


def _job_tensors(folder, texts, out, threads: int, method: str = "multiweight") -> dict:
    """A tiny whole job at `threads` torch threads; every output tensor. 8 x 64 calibration tokens in
    one batch of 512 tokens: at 64 columns, past where MKL splits the token sum (see _tokens)."""
    from safetensors.torch import load_file

    def job():
        run(RunConfig(out=str(out), model=str(folder), calib=str(texts["calib"]), eval=str(texts["eval"]),
                      method=method, nsamples=8, seqlen=64, eval_windows=1, batch_size=8), quiet=True)
    _at(threads, job)
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    return got


@pytest.mark.parametrize("arch", ["qwen3_moe", "zamba2"])
def test_tiny_moe_and_hybrid_jobs_same_bits_on_one_and_two_threads(arch, tiny_model, short_texts, tmp_path):
    """Expert routing and dispatch (Qwen3-MoE), Mamba-2 mixers and the shared block (Zamba2): the whole
    job's tensors on 1 and 2 threads, multiweight 50% (issue 22 found 112 of 135 differing)."""
    folder = tiny_model(arch)
    one = _job_tensors(folder, short_texts, tmp_path / "one", 1)
    two = _job_tensors(folder, short_texts, tmp_path / "two", 2)
    differ = [k for k in one if not torch.equal(one[k], two[k])]
    assert not differ, f"{len(differ)} of {len(one)} tensors differ, first {differ[0]}"


def test_tiny_moe_job_differs_on_two_threads_without_the_hessian_pin(tiny_model, short_texts, tmp_path, monkeypatch):
    """The other side: with the Hessian's product threaded again, the same job's bits move."""
    monkeypatch.setattr(hessian, "one_thread", lambda t: nullcontext())
    folder = tiny_model("qwen3_moe")
    one = _job_tensors(folder, short_texts, tmp_path / "one", 1)
    two = _job_tensors(folder, short_texts, tmp_path / "two", 2)
    if all(torch.equal(one[k], two[k]) for k in one):
        pytest.skip("this BLAS build sums these Hessians the same way on 2 threads; nothing to show")
    assert any(not torch.equal(one[k], two[k]) for k in one)


def test_report_facts_state_the_conditions():
    f = determinism.facts("cpu", [1, 1, 1])
    assert f["device"] == "cpu" and f["torch_threads"] == [1, 1, 1] and f["torch"] == torch.__version__
    assert f["openmp"]["env"]["OMP_WAIT_POLICY"] and f["openmp"]["openmp_runtime"] != "none"
    text = " ".join(f["bit_identical_when"])
    for word in ("fingerprinted", "BLAS", "CUDA", "stages", "thread", "refit exact"):
        assert word in text, word
