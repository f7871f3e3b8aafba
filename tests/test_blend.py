"""--target-blend: pruning toward the dense model's outputs (pipeline/solvers/blend.py, method.md 6)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from jobs.prune import default_out, main, parser
from pipeline.solvers import HessianAccumulator, prune_with_info
from pipeline.solvers import blend as blend_mod


def _problem(r=12, c=16, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(r, c, generator=g, dtype=torch.float64)
    X = torch.randn(n, c, generator=g, dtype=torch.float64) @ torch.randn(c, c, generator=g, dtype=torch.float64)
    Xh = X + 0.3 * torch.randn(n, c, generator=g, dtype=torch.float64)  # the pruned stream drifted
    keep = torch.rand(r, c, generator=g) > 0.5
    return W, X, Xh, keep


def _optimum(W, X, Xh, keep, alpha, lam):
    """Row by row, the least-squares optimum of (1/n)||w X̂ᵀ - t||² + λ||w - w0||² over the kept
    weights (pruned ones zero), t = (1-α) w0 X̂ᵀ + α w0 Xᵀ: an augmented lstsq on the activations,
    independent of H, C and the solvers."""
    n = X.shape[0]
    T = (1 - alpha) * W @ Xh.T + alpha * W @ X.T
    out = torch.zeros_like(W)
    for i in range(W.shape[0]):
        K = keep[i].nonzero().squeeze(1)
        A = Xh[:, K] / n ** 0.5
        b = T[i] / n ** 0.5
        if lam:
            A = torch.cat([A, lam ** 0.5 * torch.eye(len(K), dtype=W.dtype)])
            b = torch.cat([b, lam ** 0.5 * W[i, K]])
        out[i, K] = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    return out


@pytest.mark.parametrize("percdamp", [0.0, 0.01])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
@pytest.mark.parametrize("method", ["multiweight", "sparsegpt"])
def test_solver_on_blended_weight_is_the_blended_least_squares_optimum(method, alpha, percdamp):
    W, X, Xh, keep = _problem()
    H = HessianAccumulator(W.shape[1], dtype=torch.float64)
    C = blend_mod.CrossAccumulator(W.shape[1], dtype=torch.float64)
    for part in range(4):  # streamed in pieces, as the pipeline does
        H.add(Xh[part::4])
        C.add(Xh[part::4], X[part::4])
    Wa = blend_mod.blended_weight(W, H.hessian, C.cross, alpha, percdamp)
    res = prune_with_info(Wa, H.hessian, method, mask=keep, refit="exact", percdamp=percdamp)
    lam = blend_mod.damping(H.hessian, percdamp, W.dtype)
    assert lam == res.damping  # W_α used the damping the solver used
    want = _optimum(W, X, Xh, keep, alpha, lam)
    # float64, H's condition number here ~1e2: both sides agree to ~1e-13 relative; 1e-9 leaves room
    # for conditioning while any modelling error (a wrong C, a missing λ term) is of order 1e-2..1.
    assert (res.weight - want).abs().max() <= 1e-9 * want.abs().max()
    # and it is not the plain (α = 0) optimum: the test can tell the two apart
    plain = _optimum(W, X, Xh, keep, 0.0, lam)
    assert (plain - want).abs().max() > 1e-3 * want.abs().max()


def test_blend_zero_returns_the_weight_itself_and_dense_input_is_a_no_op():
    W, X, _, _ = _problem()
    H = HessianAccumulator(W.shape[1], dtype=torch.float64)
    C = blend_mod.CrossAccumulator(W.shape[1], dtype=torch.float64)
    H.add(X)
    C.add(X, X)
    assert blend_mod.blended_weight(W, H.hessian, C.cross, 0.0) is W
    # X̂ = X: C = H, so W_α = W up to float64 rounding (of a solve with cond ~1e2)
    Wa = blend_mod.blended_weight(W, H.hessian, C.cross, 0.7)
    assert (Wa - W).abs().max() <= 1e-10 * W.abs().max()


def test_heldout_error_matches_activations():
    W, X, Xh, keep = _problem(seed=1)
    Wh = W * keep
    H = HessianAccumulator(W.shape[1], dtype=torch.float64)
    C = blend_mod.CrossAccumulator(W.shape[1], dtype=torch.float64)
    G = HessianAccumulator(W.shape[1], dtype=torch.float64)
    H.add(Xh)
    C.add(Xh, X)
    G.add(X)
    direct = ((Wh @ Xh.T - W @ X.T) ** 2).sum().item() / X.shape[0]
    got = blend_mod.heldout_error(Wh, W, H.hessian, C.cross, G.hessian)
    assert got == pytest.approx(direct, rel=1e-10)  # float64 sums of ~1e3 terms


def test_heldout_curve_is_the_heldout_error_of_the_blended_weight():
    W, X, Xh, _ = _problem(seed=2)
    fit, held = slice(0, 150), slice(150, None)
    acc = {k: HessianAccumulator(W.shape[1], dtype=torch.float64) for k in ("H", "Hh", "Gh")}
    C, Ch = (blend_mod.CrossAccumulator(W.shape[1], dtype=torch.float64) for _ in range(2))
    acc["H"].add(Xh[fit])
    C.add(Xh[fit], X[fit])
    acc["Hh"].add(Xh[held])
    Ch.add(Xh[held], X[held])
    acc["Gh"].add(X[held])
    T = blend_mod.target(W, acc["H"].hessian, C.cross)
    e0, b, q, energy = blend_mod.heldout_curve(W, T, acc["Hh"].hessian, Ch.cross, acc["Gh"].hessian)
    for a in (0.0, 0.3, 0.7, 1.0):
        Wa = blend_mod.along(W, T, a)
        want = ((Wa @ Xh[held].T - W @ X[held].T) ** 2).sum().item() / 50
        # float64 traces of ~1e3 terms against a direct sum over the activations
        assert e0 + 2 * a * b + a * a * q == pytest.approx(want, rel=1e-9)
    assert energy == pytest.approx(((W @ X[held].T) ** 2).sum().item() / 50, rel=1e-10)
    assert q > 0 and b < 0  # the drifted stream: blending toward the dense target helps on held-out rows


# ---------------------------------------------------------------- end to end (tiny models) ----

def _args(model, texts, out, *extra):
    return ["--model", str(model), "--out", str(out), "--calib", str(texts["calib"]), "--eval", str(texts["eval"]),
            "--nsamples", "4", "--seqlen", "32", "--eval-windows", "1", "--batch-size", "1", "--quiet", *extra]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def _fingerprint(folder: Path) -> dict:
    return json.loads((folder / ".mwprune" / "fingerprint.json").read_text())["parts"]


def _modules(report: dict):
    for r in report["layers"]:
        for name, m in r["modules"].items():
            yield r["layer"], name, m


@pytest.fixture(scope="module")
def llama_runs(tiny_model, short_texts, tmp_path_factory):
    model = tiny_model("llama")
    d = tmp_path_factory.mktemp("blend")
    runs = {}
    for tag, extra in (("none", []), ("zero", ["--target-blend", "0"]), ("fixed", ["--target-blend", "0.5"]),
                       ("auto", ["--target-blend", "auto"])):
        assert main(_args(model, short_texts, d / tag, "--method", "sparsegpt", *extra)) == 0
        runs[tag] = d / tag
    return runs


def test_default_is_auto_and_zero_runs_nothing_of_the_blend(llama_runs):
    """The job's default for a method that fits the kept weights is auto, bit for bit; 0 is the plain
    solve: no dense stream, no report section, no fingerprint entry."""
    a, b = _weights(llama_runs["none"]), _weights(llama_runs["auto"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _report(llama_runs["none"])["target_blend"]["requested"] == "auto"
    z = _weights(llama_runs["zero"])
    assert any(not torch.equal(a[k], z[k]) for k in a)  # the test can tell the default from off
    rz = _report(llama_runs["zero"])
    assert "target_blend" not in rz and "target_blend" not in _fingerprint(llama_runs["zero"])
    assert _fingerprint(llama_runs["none"])["target_blend"] == "auto"


def test_fixed_blend_changes_weights_and_records_alpha(llama_runs):
    a, b = _weights(llama_runs["zero"]), _weights(llama_runs["fixed"])
    assert any(not torch.equal(a[k], b[k]) for k in a)
    rep = _report(llama_runs["fixed"])
    mods = list(_modules(rep))
    assert mods and all(m["blend"] == 0.5 for _, _, m in mods)
    tb = rep["target_blend"]
    assert tb["requested"] == 0.5 and tb["applied"] and tb["modules"] == len(mods)
    assert tb["dense_stream_forward_seconds"] > 0 and tb["dense_stream_mb"] > 0
    assert rep["sparsity"]["overall"] == pytest.approx(_report(llama_runs["zero"])["sparsity"]["overall"])


def test_auto_records_alpha_per_module_as_the_argmin(llama_runs):
    from pipeline.calibrate import AUTO_MIN_GAIN
    rep = _report(llama_runs["auto"])
    mods = list(_modules(rep))
    assert mods
    for _, _, m in mods:
        scores = {float(a): v for a, v in m["blend_scores"].items()}
        assert sorted(scores) == sorted(blend_mod.GRID)
        best = min(scores, key=lambda a: (scores[a], a))
        assert m["blend"] == best or (m["blend"] == 0 and scores[0] - scores[best] >= 0)
        # the scores are a parabola whose vertex is blend_optimum: on a grid of equal steps the argmin
        # is the grid point nearest the vertex, clamped to the grid
        opt = min(max(m["blend_optimum"], 0.0), blend_mod.AUTO_MAX)
        if m["blend"] == best:
            assert abs(best - opt) <= blend_mod.STEP / 2 + 1e-12
    tb = rep["target_blend"]
    assert tb["requested"] == "auto" and sum(tb["chosen_counts"].values()) == len(mods)
    assert 0 <= tb["mean_optimum"] <= 1
    assert any(m["blend"] > 0 for _, _, m in mods)  # the test can tell auto from off
    # layer 0's first group sees the dense input in both streams (X̂ = X): nothing to blend, so it keeps
    # 0 and is solved as without the option, from an H merged from its fit and held-out parts (the
    # same tokens summed in another order: float32 rounding, ~1e-7 relative)
    zero = _report(llama_runs["zero"])
    errs = {(lay, n): m["error"] for lay, n, m in _modules(zero)}
    first = next(r for r in rep["layers"] if r["layer"] == 0)
    assert AUTO_MIN_GAIN < 1e-6
    for n in first["groups"][0]:
        assert first["modules"][n]["blend"] == 0
        assert first["modules"][n]["error"] == pytest.approx(errs[(0, n)], rel=1e-4)


def test_names_fingerprint_and_resume(llama_runs, tiny_model, short_texts, tmp_path, capsys):
    p = parser()
    assert default_out(p.parse_args(["--target-blend", "0.15"])).endswith("-blend0.15")
    assert default_out(p.parse_args(["--target-blend", "auto"])).endswith("-blendauto")
    assert default_out(p.parse_args([])) == default_out(p.parse_args(["--target-blend", "auto"]))
    assert default_out(p.parse_args(["--target-blend", "0"])).endswith("-multiweight-0.5")  # the plain solve: no tag
    # the defaults that are 0: magnitude and Wanda without a refit, and dense mode
    for argv in (["--method", "wanda"], ["--method", "magnitude"], ["--mode", "dense"]):
        assert default_out(p.parse_args(argv)) == default_out(p.parse_args([*argv, "--target-blend", "0"]))
    assert default_out(p.parse_args(["--method", "wanda", "--refit", "cg"])).endswith("-blendauto")
    model = tiny_model("llama")
    out = llama_runs["fixed"]
    before = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.rglob("*") if f.is_file()}
    # the same run: already complete
    assert main(_args(model, short_texts, out, "--method", "sparsegpt", "--target-blend", "0.5")) == 0
    assert "already held this run" in capsys.readouterr().out
    # another blend into the same folder: refused (the fingerprint differs in target_blend)
    assert main(_args(model, short_texts, out, "--method", "sparsegpt", "--target-blend", "0.25")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "target_blend" in err and len(err.splitlines()) == 1
    after = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.rglob("*") if f.is_file()
             if not f.name.endswith(".lock")}
    assert {k: v for k, v in before.items() if not k.name.endswith(".lock")} == after


@pytest.mark.parametrize("value", ["1.5", "-0.1", "abc", "nan", ""])
def test_bad_values_rejected(value, tiny_model, short_texts, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(_args(tiny_model("llama"), short_texts, out, "--target-blend", value))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "--target-blend" in err, err
    assert not out.exists()


def test_auto_on_one_batch_solves_without_it(tiny_model, short_texts, tmp_path, capsys):
    """auto holds a batch out: with one batch it solves as α = 0 (same weights), says so in a note
    and in report.json, and exits 0 (it is the default: a one-batch run must not fail for it)."""
    from pipeline.run import ONE_BATCH
    model = tiny_model("llama")
    argv = _args(model, short_texts, tmp_path / "one", "--method", "sparsegpt", "--batch-size", "4")
    assert main([x for x in argv if x != "--quiet"]) == 0
    assert "note: " + ONE_BATCH in capsys.readouterr().err
    rep = _report(tmp_path / "one")
    assert rep["target_blend"] == {"requested": "auto", "applied": False, "why": ONE_BATCH}
    assert "target_blend" not in _fingerprint(tmp_path / "one")
    assert main(_args(model, short_texts, tmp_path / "zero", "--method", "sparsegpt", "--batch-size", "4",
                      "--target-blend", "0")) == 0
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "zero")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("auto", [False, True])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_experts_pair_their_routed_tokens(family, auto, tiny_model, short_texts):
    """Each expert's C pairs its routed tokens through the router input: fed the same stream as
    both the pruned and the dense side (and nothing pruned), C must equal H for every expert, which
    a wrong pairing (other tokens, other order) would break."""
    from pipeline import data, loading
    from pipeline.calibrate import Trunk, _Blend, accumulate_phase, dense_capture, new_pairs
    from pipeline.models.generic import plan_layer
    from transformers import AutoTokenizer

    folder = tiny_model(family)
    tok = AutoTokenizer.from_pretrained(folder)
    trunk = Trunk(loading.ModelFiles(folder))
    docs = data.load_documents(str(short_texts["calib"]), "text", "calib")
    ids = data.document_windows(docs, tok, 4, 32, 0, data.first_token_id(tok)[0])
    hidden, calls = trunk.embed(data.batches(ids, 2))
    layer = trunk.load_layer(0)
    plan = plan_layer(layer, trunk.adapter, hidden[0], calls[tuple(hidden[0].shape[:2])][0])
    assert any(plan.expert_phase)
    _, caps = dense_capture(layer, plan, hidden, calls, 0)
    blend = _Blend("auto" if auto else 0.5, caps, {1})
    checked = 0
    for k in range(len(plan.phases)):
        groups = list(range(len(plan.phases[k])))
        pairs = new_pairs(layer, plan, k, groups, "cpu", auto=auto)
        accs = accumulate_phase(layer, plan, k, hidden, calls, 0, blend=blend, pairs=pairs)
        plain = accumulate_phase(layer, plan, k, hidden, calls, 0)  # H without the blend
        for acc, pair, ref in zip(accs, pairs, plain):
            assert pair.unpaired == 0
            assert pair.cross.count == acc.count == ref.count
            if auto:  # H from its fit and held-out parts: batch 1 held out, batch 0 fit
                assert pair.h_fit.count + pair.h_held.count == acc.count and pair.g_held.count == pair.h_held.count
            if acc.count:
                # the same products, summed in another order: equal up to float32 accumulation order
                assert torch.allclose(pair.cross.cross, acc.hessian, rtol=1e-5, atol=1e-6)
                assert torch.allclose(acc.hessian, ref.hessian, rtol=1e-5, atol=1e-6)
                checked += plan.expert_phase[k]
    assert checked >= 2  # experts with routed tokens were compared


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_end_to_end(family, tiny_model, short_texts, tmp_path):
    model = tiny_model(family)
    assert main(_args(model, short_texts, tmp_path / "a", "--method", "sparsegpt", "--target-blend", "0.3")) == 0
    rep = _report(tmp_path / "a")
    experts = [m for _, _, m in _modules(rep) if "expert" in m]
    assert experts and all(m["blend"] in (0.3, 0.0) for m in experts)
    assert all(m["blend"] == 0.3 for m in experts if "blend_note" not in m)
    assert not any("blend_note" in m for m in experts)  # every routed token found its dense input
    assert main(_args(model, short_texts, tmp_path / "b", "--method", "sparsegpt")) == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    moved = [k for k in a if "expert" in k and not torch.equal(a[k], b[k])]
    assert moved  # the experts were solved toward another target


# ---------------------------------------------------------------- Ray (tests/test_ray.py's setup) ----

@pytest.fixture(scope="module")
def ray_up():
    import ray
    root = Path(__file__).resolve().parent.parent
    ray.shutdown()
    ray.init(num_cpus=2, num_gpus=3, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(root)}})
    yield ray
    ray.shutdown()


def _ray_args(model, texts, out, *extra):
    # 8 windows in batches of 2: four batches, one held out by auto
    return ["--model", str(model), "--out", str(out), "--calib", str(texts["calib"]), "--eval", str(texts["eval"]),
            "--nsamples", "8", "--seqlen", "32", "--eval-windows", "2", "--batch-size", "2", "--quiet", *extra]


def _single_one_thread(argv):
    """The single-process job with one thread, as each stage runs (tests/test_ray.py: thread count
    changes BLAS rounding, nothing else does)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("family,stages", [("llama", 2), ("llama", 3), ("mixtral", 2)])
def test_ray_sequential_carries_the_dense_stream(ray_up, family, stages, tiny_model, short_texts, tmp_path):
    """Sequential stages hand both streams downstream: the same weights as one process (unstructured
    sparsegpt solves whole matrices on one stage each, so the spread tests' tolerance is 0 here)."""
    model = tiny_model(family)
    extra = ("--method", "sparsegpt", "--target-blend", "auto")
    assert _single_one_thread(_ray_args(model, short_texts, tmp_path / "one", *extra)) == 0
    assert main(_ray_args(model, short_texts, tmp_path / "k", *extra, "--stages", str(stages))) == 0
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "k")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _report(tmp_path / "one"), _report(tmp_path / "k")
    assert ra["perplexity"] == rb["perplexity"]
    assert [m["blend"] for _, _, m in _modules(ra)] == [m["blend"] for _, _, m in _modules(rb)]
    assert rb["target_blend"]["applied"] and rb["target_blend"]["dense_stream_forward_seconds"] > 0


def test_ray_stagewise_applies_it_inside_stages_and_dense_mode_is_a_no_op(ray_up, tiny_model, short_texts,
                                                                          tmp_path, capsys):
    model = tiny_model("llama")
    base = ("--method", "sparsegpt", "--stages", "2")
    assert main(_ray_args(model, short_texts, tmp_path / "sw0", *base, "--mode", "stagewise")) == 0
    assert main(_ray_args(model, short_texts, tmp_path / "sw", *base, "--mode", "stagewise",
                          "--target-blend", "0.3")) == 0
    rep = _report(tmp_path / "sw")
    assert all(m["blend"] == 0.3 for _, _, m in _modules(rep)) and rep["target_blend"]["applied"]
    a, b = _weights(tmp_path / "sw0"), _weights(tmp_path / "sw")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(_ray_args(model, short_texts, tmp_path / "d0", *base, "--mode", "dense")) == 0
    argv = _ray_args(model, short_texts, tmp_path / "d", *base, "--mode", "dense", "--target-blend", "0.3")
    assert main([x for x in argv if x != "--quiet"]) == 0
    assert "no effect in --mode dense" in capsys.readouterr().err
    a, b = _weights(tmp_path / "d0"), _weights(tmp_path / "d")
    assert all(torch.equal(a[k], b[k]) for k in a)  # X̂ = X: the same weights, nothing pretended
    tb = _report(tmp_path / "d")["target_blend"]
    assert tb["applied"] is False and "dense" in tb["why"]
    assert not any("blend" in m for _, _, m in _modules(_report(tmp_path / "d")))


def test_bench_blend_summary():
    """jobs.bench's blend section: gap closed against SparseGPT at α = 0, the best fixed α, auto's
    CPU ratio and the 0.5% rule, from rows (numbers made up; the arithmetic is what is checked)."""
    from jobs.bench import blend_summary, blend_table
    row = lambda m, b, ppl, cpu: dict(pattern="0.5", method=m, blend=b, dense=30.0, pruned=ppl,  # noqa: E731
                                      cpu_seconds=cpu, mean_alpha=None if b == "0" else 0.2)
    rows = [row("sparsegpt", "0", 50.0, 100.0), row("sparsegpt", "0.1", 46.0, 120.0),
            row("sparsegpt", "0.3", 48.0, 120.0), row("sparsegpt", "auto", 45.0, 300.0),
            row("multiweight", "0", 48.0, 150.0), row("multiweight", "auto", 48.3, 180.0)]
    s = {r["method"]: r for r in blend_summary(rows)}
    assert s["sparsegpt"]["best_fixed"] == 46.0 and s["sparsegpt"]["best_fixed_alpha"] == "0.1"
    assert s["sparsegpt"]["gap_closed"]["auto"] == pytest.approx(0.25)
    assert s["sparsegpt"]["auto_cpu_vs_zero"] == pytest.approx(3.0)
    assert s["sparsegpt"]["auto_within_half_percent"] is True
    assert s["multiweight"]["gap_closed"]["zero"] == pytest.approx(0.1)
    assert s["multiweight"]["auto_within_half_percent"] is False  # 48.3 > 1.005 x 48.0
    table = blend_table({"protocol": dict(nsamples=16, seqlen=512, eval_windows=8), "summary": list(s.values())})
    assert "+25.0%" in table and "3.00x" in table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("collide", [False, True])
def test_row_index_finds_routed_rows_by_their_bytes(dtype, collide):
    """An expert's rows are found among the router input's rows: the first equal row, every row or
    none. `collide` gives every row the same key, so the row-by-row path must sort it out."""
    from pipeline import calibrate
    g = torch.Generator().manual_seed(0)
    src = torch.randn(50, 24, generator=g).to(dtype)
    src[7] = src[3]  # a repeated token: its first occurrence is the answer
    ix = calibrate._RowIndex(src)
    if collide:
        ix.mult = torch.zeros_like(ix.mult)
        ix.keys, ix.order = torch.sort(calibrate._keys(ix.bits, ix.mult), stable=True)
    want = torch.tensor([9, 3, 41, 0, 3, 49])
    assert torch.equal(ix.find(src[want]), torch.where(want == 7, 3, want))
    assert torch.equal(ix.find(src[torch.tensor([7])]), torch.tensor([3]))
    other = src[:2].clone()
    other[1, 5] = -other[1, 5] if other[1, 5] != 0 else 1.0  # one value changed: not a copy
    assert ix.find(other) is None
    assert ix.find(torch.zeros(2, 25, dtype=dtype)) is None  # another width
