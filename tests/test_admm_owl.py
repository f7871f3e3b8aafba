"""ADMM mask search (pipeline/solvers/admm.py) and OWL layer sparsities (pipeline/allocation.py)."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from pipeline import allocation
from pipeline.solvers import prune_with_info
from pipeline.solvers.admm import project


def problem(r, c, n=256, seed=0, dtype=torch.float64):
    """A layer with correlated inputs and two outlier channels (as tests/test_solvers.py's)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(c, 1, dtype=dtype)
    scale[torch.randperm(c, generator=g)[:2]] = 6.0
    base = torch.randn(c, 3, dtype=dtype, generator=g)
    X = (torch.randn(c, n, dtype=dtype, generator=g) + base @ torch.randn(3, n, dtype=dtype, generator=g)) * scale
    return torch.randn(r, c, dtype=dtype, generator=g), X @ X.T / n


# ---------------------------------------------------------------- patterns

@pytest.mark.parametrize("shape,s", [((24, 64), 0.5), ((7, 48), 0.3), ((5, 40), 0.7)])
def test_admm_unstructured_count_is_exact(shape, s):
    W, H = problem(*shape, dtype=torch.float32)
    res = prune_with_info(W, H, "admm", sparsity=s)
    r, c = shape
    assert int((~res.mask).sum()) == int(s * r * c + 0.5)  # the solvers' rounding (half up)
    assert bool((res.weight[~res.mask] == 0).all())


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_admm_nm_every_group_exact(nm):
    n, m = nm
    W, H = problem(24, 64, dtype=torch.float32)
    res = prune_with_info(W, H, "admm", nm=nm)
    assert bool(((~res.mask).view(24, -1, m).sum(2) == n).all())
    assert bool((res.weight == 0).view(24, -1, m).sum(2).ge(n).all())


def test_project_breaks_ties_to_the_exact_count():
    X = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 2.0, 0.0]])
    keep = project(X, 0.5, None)  # 4 pruned of 8: one 2 and three of the six tied 1s kept
    assert int(keep.sum()) == 4 and bool(keep[1, 2]) and not bool(keep[1, 3])
    keep = project(X, 0.5, (2, 4))
    assert keep.sum(1).tolist() == [2, 2] and bool(keep[1, 2])


# ---------------------------------------------------------------- a problem solved by enumeration

def _row_costs(w, Hd, sets):
    """Least-squares error of row w for each pruned set (damped objective, exact re-solve)."""
    b, out = w @ Hd, {}
    for P in sets:
        K = [j for j in range(len(w)) if j not in P]
        x = torch.zeros_like(w)
        if K:
            x[K] = torch.linalg.solve(Hd[K][:, K], b[K])
        d = x - w
        out[P] = float(d @ Hd @ d)
    return out


def _best_unstructured(W, Hd, k):
    """Least error over every mask with exactly k pruned in the layer (rows combined by count)."""
    r, c = W.shape
    best = {0: 0.0}
    for i in range(r):
        per = {}
        for P, e in _row_costs(W[i], Hd, [P for t in range(c + 1) for P in itertools.combinations(range(c), t)]).items():
            per[len(P)] = min(per.get(len(P), math.inf), e)
        nxt = {}  # least error of rows 0..i with a + t pruned
        for a, ea in best.items():
            for t, et in per.items():
                if a + t <= k:
                    nxt[a + t] = min(nxt.get(a + t, math.inf), ea + et)
        best = nxt
    return best[k]


def _best_nm(W, Hd, n, m):
    groups = [list(itertools.combinations(range(g, g + m), n)) for g in range(0, W.shape[1], m)]
    sets = [sum(ps, ()) for ps in itertools.product(*groups)]
    return sum(min(_row_costs(W[i], Hd, sets).values()) for i in range(W.shape[0]))


def test_admm_finds_the_enumerated_best_mask():
    """3 x 8 layers, every mask enumerated (50%: 12 of 24 pruned, layer-wide; 2:4 per row), the
    error of each the exact least squares (refit="exact"; no damping, H is full rank here, so the
    objective admm scores its fall-back on is the one enumerated). Measured on these six seeds:
    admm optimal in 7 of 12 cases (5 of 6 at 50%), at worst 1.18x the optimum (2:4, where it
    kept multiweight's mask); multiweight optimal in 1, worst 2.18x. The bounds leave one case
    of slack; "optimal" allows 1e-9 relative for float64 summation order."""
    ratios, mw_ratios = [], []
    for seed in range(6):
        W, H = problem(3, 8, seed=seed)
        for pat, best in (({"sparsity": 0.5}, lambda: _best_unstructured(W, H, 12)),
                          ({"nm": (2, 4)}, lambda: _best_nm(W, H, 2, 4))):
            opt = best()
            adm = prune_with_info(W, H, "admm", refit="exact", percdamp=0, **pat).error
            mw = prune_with_info(W, H, "multiweight", refit="exact", percdamp=0, **pat).error
            assert adm >= opt * (1 - 1e-9)  # the enumeration is the optimum
            ratios.append(adm / opt)
            mw_ratios.append(mw / opt)
    assert max(ratios) <= 1.2, ratios
    assert sum(r <= 1 + 1e-9 for r in ratios) >= 6, ratios
    assert sum(r <= 1 + 1e-9 for r in ratios[0::2]) >= 4, ratios  # 50%
    assert all(a <= b * (1 + 1e-12) for a, b in zip(ratios, mw_ratios))  # never worse than its start


# ---------------------------------------------------------------- real layers

@pytest.fixture(scope="module")
def real():
    from jobs.bench_solvers import real_problems
    return real_problems(layers=(2,), modules=("k", "o"), count=4, seqlen=256, cache=False)


def test_admm_never_worse_than_multiweight_refit_on_real_layers(real):
    """admm keeps the better of its mask and multiweight's, both refitted the same way, so its
    error is never above multiweight + cg (the two share that computation bit for bit; 1e-12
    covers nothing but summation order). Measured here, admm / (multiweight + cg): 0.52-0.54 at
    50%, 0.64-0.78 at 2:4 and 4:8; pinned with margin at 0.9."""
    for name, W, H in real:
        for pattern in ({"sparsity": 0.5}, {"nm": (2, 4)}, {"nm": (4, 8)}):
            mw = prune_with_info(W, H, "multiweight", refit="cg", **pattern)
            adm = prune_with_info(W, H, "admm", refit="cg", **pattern)
            assert adm.error <= mw.error * (1 + 1e-12), (name, pattern)
            assert adm.error <= 0.9 * mw.error, (name, pattern, adm.error / mw.error)


# ---------------------------------------------------------------- OWL

def test_owl_counts_sum_to_the_overall_sparsity_exactly():
    g = torch.Generator().manual_seed(0)
    for target in (0.5, 0.7, 0.333):
        for _ in range(5):
            layers = int(torch.randint(2, 12, (1,), generator=g))
            sizes = [[int(x) for x in torch.randint(50, 5000, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)]
                     for _ in range(layers)]
            ratios = torch.rand(layers, generator=g).tolist()
            layer_s = allocation.owl_sparsities(ratios, [sum(s) for s in sizes], target)
            total = sum(map(sum, sizes))
            # weighted mean is the target up to float rounding of a few terms
            assert abs(sum(s * sum(n) for s, n in zip(layer_s, sizes)) / total - target) < 1e-12
            counts = allocation.module_counts(layer_s, sizes, target)
            assert sum(map(sum, counts)) == int(target * total + 0.5)
            for ks, ns, s in zip(counts, sizes, layer_s):
                assert all(0 < k < n for k, n in zip(ks, ns))
                assert abs(sum(ks) / sum(ns) - s) < 2 * len(ns) / sum(ns)  # rounding: < 1 weight per module each way
                # what the solvers prune for s = k / n is exactly k
                assert all(int(k / n * n + 0.5) == k for k, n in zip(ks, ns))


def test_owl_sparsities_follow_the_outlier_ratios():
    s = allocation.owl_sparsities([0.01, 0.03, 0.02, 0.05], [10, 10, 10, 10], 0.6, lam=0.08)
    assert max(s) - min(s) == pytest.approx(0.16)  # the spread is 2λ
    assert sorted(range(4), key=lambda i: s[i]) == [3, 1, 2, 0]  # more outliers, lower sparsity
    assert allocation.owl_sparsities([0.02, 0.02], [5, 9], 0.5) == [0.5, 0.5]
    with pytest.raises(ValueError, match="leave"):
        allocation.owl_sparsities([0.0, 1.0], [1, 1], 0.95, lam=0.08)


def test_outlier_ratio_counts_scores_above_m_times_mean():
    W = torch.ones(2, 5)
    W[0, 0] = 100.0  # mean |w| = 108/10, 100 > 5 x 10.8; nothing else is
    assert allocation.outlier_ratio([W], [torch.ones(5)], 5.0) == pytest.approx(0.1)
    # the input norm scales the score: column 1 (both rows) has 100x the energy: scores 10 vs 1,
    # mean 2.8, threshold 8.4
    assert allocation.outlier_ratio([torch.ones(2, 5)], [torch.tensor([1.0, 1e4, 1, 1, 1])], 3.0) == pytest.approx(0.2)


def test_owl_job_keeps_the_overall_sparsity(tiny_model, short_texts, tmp_path):
    """End to end on a tiny model, with admm: exactly round(0.5 · weights) zeros, as the uniform run (every
    module has an even size there, so uniform is exact too), spread unevenly over the layers."""
    from jobs.prune import main
    model = tiny_model("llama")
    reports = {}
    for alloc in ("uniform", "owl"):
        out = tmp_path / alloc
        assert main(["--model", str(model), "--out", str(out), "--calib", str(short_texts["calib"]),
                     "--eval-windows", "0", "--nsamples", "4", "--seqlen", "32", "--quiet",
                     "--method", "admm", "--sparsity", "0.5", "--allocation", alloc]) == 0
        reports[alloc] = json.loads((out / "report.json").read_text())
    u, o = reports["uniform"], reports["owl"]
    assert o["sparsity"]["overall"] == u["sparsity"]["overall"] == 0.5
    mods = [m for r in o["layers"] for m in r["modules"].values()]
    zeros = sum(round(m["sparsity"] * m["shape"][0] * m["shape"][1]) for m in mods)
    assert zeros == o["allocation"]["pruned"] == o["allocation"]["weights"] // 2
    per = list(o["sparsity"]["per_layer"].values())
    assert max(per) - min(per) > 0.05 and len(o["allocation"]["outlier_ratio"]) == len(per)


@pytest.mark.parametrize("extra,needle", [
    (["--allocation", "owl", "--nm", "2:4"], "N:M"),
    (["--allocation", "owl", "--stages", "2"], "single-process"),
    (["--allocation", "best"], "'best'"),
    (["--method", "admm", "--nm", "2:3"], "divisible by 3"),
])
def test_bad_allocation_options(tiny_model, short_texts, tmp_path, capsys, extra, needle):
    from jobs.prune import main
    out = tmp_path / "out"
    code = main(["--model", str(tiny_model("llama")), "--out", str(out), "--calib", str(short_texts["calib"]),
                 "--eval-windows", "0", "--nsamples", "4", "--seqlen", "32", "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()


def _swap_gain(W0, H, W, keep, n, m, rounds=500):
    """Relative drop of tr(ΔW H ΔWᵀ) that a swap search gets from (W, keep) at N:M: per row and
    round, the best exchange of a kept weight j and a pruned weight i of one m-group, moving only
    those two (w_j -> 0, w_i -> its least-squares value given the rest; exact for that move),
    taken while it lowers the row's error."""
    W0, H, W, keep = W0.double(), H.double(), W.double().clone(), keep.clone()
    r, c = W.shape
    g = c // m
    d = H.diagonal()
    Hb = H.view(g, m, g, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # the m x m group blocks
    G = (W - W0) @ H  # gradient of each row's error (/2); ~0 on kept weights after a refit
    before = float(((W - W0) * G).sum())
    rows = torch.arange(r)
    for _ in range(rounds):
        w, ga, gb = W.view(r, g, m, 1), G.view(r, g, m, 1), G.view(r, g, 1, m)
        delta = w * (d.view(g, m, 1) * w - 2 * ga) - (gb - Hb * w) ** 2 / d.view(g, 1, m)
        k = keep.view(r, g, m)
        delta = delta.masked_fill(~(k.unsqueeze(3) & ~k.unsqueeze(2)), math.inf).view(r, -1)
        best, idx = delta.min(1)
        ok = best < -1e-12 * before
        if not bool(ok.any()):
            break
        rr, idx = rows[ok], idx[ok]
        j = idx // (m * m) * m + idx // m % m
        i = idx // (m * m) * m + idx % m
        wj = W[rr, j]
        t = -(G[rr, i] - H[i, j] * wj) / d[i]
        W[rr, j], W[rr, i], keep[rr, j], keep[rr, i] = 0.0, t, False, True
        G[rr] += -wj.unsqueeze(1) * H[j] + t.unsqueeze(1) * H[i]
    after = float(((W - W0) * ((W - W0) @ H)).sum())
    assert bool(((~keep).view(r, g, m).sum(2) == n).all())  # swaps keep the pattern
    return 1 - after / before


def test_admm_nm_result_is_a_swap_local_optimum(real):
    """At N:M, no exchange of a kept and a pruned weight of one group (moving those two) improves
    admm's result by more than 0.5%, while the same search improves multiweight + cg by more
    than 0.3% (so the check can fail): a swap search after admm adds little. Measured here:
    admm < 0.01%, multiweight + cg 0.5-2.1% (2:4, 4:8); on the 12 bench layers, swaps verified by
    a cg refit gained < 0.2% after admm (docs/measurements.md, Layer solvers)."""
    from pipeline.solvers.common import damped
    for name, W, H in real:
        Hd, _ = damped(H, 0.01)  # the objective the solvers minimise (percdamp 0.01, the default)
        for nm in ((2, 4), (4, 8)):
            mw = prune_with_info(W, H, "multiweight", refit="cg", nm=nm)
            adm = prune_with_info(W, H, "admm", refit="cg", nm=nm)
            g_mw = _swap_gain(W, Hd, mw.weight, mw.mask, *nm)
            g_adm = _swap_gain(W, Hd, adm.weight, adm.mask, *nm)
            assert g_adm < 0.005 and g_mw > 0.003, (name, nm, g_adm, g_mw)
