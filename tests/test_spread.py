"""Spreading a phase's solves over workers (pipeline/spread.py), without Ray: pieces cover every row
of every item once, only row-separable items are cut, and merged results equal the item-by-item
solves (bit for bit for whole items; within float32 reassociation for cut ones)."""
from __future__ import annotations

import pytest
import torch

from pipeline import spread
from pipeline.solvers import prune_with_info


def problem(r, c, seed, tokens=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens or 4 * c, c, generator=g) @ (torch.eye(c) + 0.3 * torch.randn(c, c, generator=g))
    return torch.randn(r, c, generator=g), X.T @ X / X.shape[0]


class SplitPool:
    """n workers, all in this process: the same assign / solve / merge path as the stages' pool."""

    def __init__(self, n):
        self.workers = n

    def solve(self, items, batch=False):
        runs = spread.bundles(items) if batch else None
        shares = spread.assign([tuple(W.shape) for W, _, _ in items], [kw for *_, kw in items], self.workers, runs)
        done = []
        for share in shares:
            done += spread.solve_here(items, share)
        return spread.merge(items, done)


def kws(method, pattern, refit=None):
    kw = dict(method=method, refit=refit)
    kw.update(nm=(2, 4), sparsity=None) if pattern == "2:4" else kw.update(sparsity=0.5, nm=None)
    return kw


def test_pieces_cover_every_row_once_and_only_separable_items_are_cut():
    shapes = [(96, 64), (32, 64), (32, 64), (200, 128)]
    for n in (1, 2, 3):
        for pattern in ("0.5", "2:4"):
            for method in ("sparsegpt", "multiweight", "wanda", "magnitude", "admm"):
                kw = kws(method, pattern)
                shares = spread.assign(shapes, [kw] * len(shapes), n)
                assert len(shares) == n
                seen = {i: [] for i in range(len(shapes))}
                for share in shares:
                    for p in share:
                        seen[p.item].append(p.rows)
                for i, (r, _) in enumerate(shapes):
                    rows = sorted(seen[i])
                    assert rows[0][0] == 0 and rows[-1][1] == r
                    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))  # contiguous, no overlap
                    if len(rows) > 1:
                        assert spread.row_separable(kw) and n > 1
                if not spread.row_separable(kw):  # whole items, balanced largest first
                    assert all(len(seen[i]) == 1 for i in seen)


def test_whole_items_are_balanced_largest_first():
    shapes = [(576, 576), (192, 576), (192, 576)]  # q, k, v of SmolLM2
    shares = spread.assign(shapes, [kws("multiweight", "0.5")] * 3, 2)
    assert [sorted(p.item for p in s) for s in shares] == [[0], [1, 2]]
    many = [(64, 32)] * 16  # experts: never cut, spread evenly
    shares = spread.assign(many, [kws("multiweight", "2:4")] * 16, 2)
    assert [len(s) for s in shares] == [8, 8] and all(p.rows == (0, 64) for s in shares for p in s)


def test_separable_items_are_cut_only_where_they_cross_workers():
    """McNaughton's wrap-around rule: at most n - 1 items are cut, the rest stay whole (bit-identical),
    and every worker ends within a few rows' work (plus one call's fixed work) of the others."""
    kw = kws("multiweight", "2:4")
    for shapes in ([(576, 576), (192, 576), (192, 576)], [(1536, 576)] * 2, [(576, 1536)], [(4864, 896)] * 2,
                   [(64, 32), (200, 128), (96, 64)]):
        for n in (2, 3, 4):
            shares = spread.assign(shapes, [kw] * len(shapes), n)
            pieces = [p for s in shares for p in s]
            cut = {p.item for p in pieces if p.rows != (0, shapes[p.item][0])}
            assert len(cut) <= n - 1
            loads = [sum(p.cost for p in s) for s in shares]
            widest = max(c for _, c in shapes)
            # rounding to rows and slivers kept whole: a few rows; the per-call work budgeted for
            # n - 1 cuts where fewer were needed: one call's
            assert max(loads) - min(loads) <= (2 * spread.MIN_ROWS + spread.PIECE_ROWS) * widest ** 2 + 1e-6 * max(loads)
            assert all(b - a >= spread.MIN_ROWS for p in pieces for a, b in [p.rows])
    # whole items fill the workers first; separable ones top them up
    shares = spread.assign([(96, 64), (32, 64)], [kws("multiweight", "0.5"), kw], 2)
    assert [[(p.item, p.rows) for p in s] for s in shares] == [[(0, (0, 96))], [(1, (0, 32))]]


@pytest.mark.parametrize("method", ["sparsegpt", "multiweight", "wanda", "magnitude"])
@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
@pytest.mark.parametrize("refit", [None, "cg"])
def test_spread_equals_item_by_item(method, pattern, refit):
    """Whole items: bit-identical (the same computation). Cut items (N:M, Wanda): rows see the same
    arithmetic except BLAS blocking over fewer rows and the refit's early stop per piece; float32
    reassociation of that kind moves weights by ~1e-7 relative, so 1e-5 x max |W| is a wide margin
    that still fails for any wrong row, mask or update."""
    torch.manual_seed(0)
    items = []
    for j, (r, c) in enumerate([(48, 32), (16, 32), (16, 32)]):
        W, H = problem(r, c, seed=j)
        items.append((W, H, kws(method, pattern, refit)))
    ref = spread.LocalPool().solve(items)
    for n in (2, 3):
        got = SplitPool(n).solve(items)
        for a, b in zip(ref, got):
            assert torch.equal(a.mask, b.mask)
            if not spread.row_separable(items[0][2]):
                assert torch.equal(a.weight, b.weight)
            assert (a.weight - b.weight).abs().max() <= 1e-5 * a.weight.abs().max()
            assert b.error == pytest.approx(a.error, rel=1e-5)


def test_a_raised_damping_is_applied_to_every_piece_of_the_item():
    """A piece whose factorisation needed more damping: the item's other pieces are solved again at
    that damping, which is what the whole item gets in one process."""
    W, H = problem(8, 16, seed=3)
    items = [(W, H, kws("multiweight", "2:4"))]
    pieces = [spread.Piece(0, (0, 4), 1.0), spread.Piece(0, (4, 8), 1.0)]
    res = [spread.solve_piece(W, H, items[0][2], p.rows) for p in pieces]
    raised = spread.solve_piece(W, H, dict(items[0][2], percdamp=0.1), (4, 8))
    calls = []

    def resolve(p, pd):
        calls.append((p.rows, pd))
        return spread.resolver(items)(p, pd)
    got = spread.merge(items, [(pieces[0], res[0]), (pieces[1], raised)], resolve)[0]
    assert calls == [((0, 4), 0.1)]
    whole = prune_with_info(W, H, **dict(items[0][2], percdamp=0.1))
    assert got.percdamp == 0.1
    assert (got.weight - whole.weight).abs().max() <= 1e-5 * whole.weight.abs().max()


def test_a_failing_solve_names_its_item():
    W, H = problem(8, 16, seed=4)
    items = [(W, H, kws("multiweight", "0.5")), (W, H, dict(kws("multiweight", "0.5"), sparsity=1.5))]
    with pytest.raises(ValueError) as e:
        spread.LocalPool().solve(items)
    assert e.value.item == 1


def test_expert_chunks_fit_the_budget():
    from pipeline.calibrate import expert_chunks
    assert expert_chunks([4] * 5, 8) == [[0, 1], [2, 3], [4]]
    assert expert_chunks([10, 1, 1], 8) == [[0], [1, 2]]  # one group over budget still gets a chunk
    assert [j for c in expert_chunks([3, 5, 2, 7, 1], 9) for j in c] == list(range(5))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_experts_in_chunks_equal_experts_at_once(arch, real_model_dir, short_texts, tmp_path, monkeypatch):
    """Calibrating experts a few at a time (a budget of about two experts' Hessians) gives the
    result of calibrating them all at once, bit for bit: an expert's input does not depend on the
    other experts of its phase, and experts below the token minimum wait for the whole pooled
    Hessian. The token minimum is raised so that some experts take that fallback."""
    from pipeline import calibrate
    from pipeline.run import RunConfig, run
    from test_ray import assert_identical
    from tiny_models import write

    model = write(arch, tmp_path / "model", real_model_dir)

    monkeypatch.setattr(calibrate, "MIN_EXPERT_TOKENS", 64)
    outs, calls = {}, []
    real = calibrate.accumulate_phase

    def counting(*a, **kw):
        calls.append(kw.get("groups"))
        return real(*a, **kw)
    monkeypatch.setattr(calibrate, "accumulate_phase", counting)
    for name, gb in (("all", 100.0), ("chunks", None)):
        if gb is None:
            model_cfg = __import__("json").loads((model / "config.json").read_text())
            d = model_cfg["hidden_size"]
            gb = 2.5 * d * d * 4 / 2**30  # two gate/up experts' Hessians fit
        monkeypatch.setenv("MWPRUNE_EXPERT_HESSIAN_GB", str(gb))
        calls.clear()
        rep = run(RunConfig(out=str(tmp_path / name), model=str(model), calib=str(short_texts["calib"]),
                            eval=str(short_texts["eval"]), nsamples=4, seqlen=32, eval_windows=2, batch_size=2,
                            method="sparsegpt").resolve(), quiet=True)
        outs[name] = (rep, [c for c in calls if c is not None])
    # gate/up experts (hidden-wide inputs) go two at a time; narrower down experts more
    assert len(outs["chunks"][1]) > len(outs["all"][1])
    experts = [m for layer in outs["all"][0]["layers"] for m in layer["modules"].values() if "expert" in m]
    assert any("fallback" in m for m in experts) and not all("fallback" in m for m in experts), \
        sorted(m["tokens"] for m in experts)
    assert_identical(tmp_path / "all", tmp_path / "chunks")
    assert outs["chunks"][0]["perplexity"] == outs["all"][0]["perplexity"]
    assert outs["chunks"][0]["sparsity"] == outs["all"][0]["sparsity"]


def test_bundles_group_consecutive_experts_of_one_shape_and_options():
    W, H = problem(8, 16, seed=5)
    W2, H2 = problem(4, 16, seed=6)
    a, b = kws("multiweight", "0.5"), kws("multiweight", "2:4")
    items = [(W, H, a)] * 10 + [(W2, H2, a)] * 2 + [(W, H, b)] + [(W, H, a)]
    assert spread.bundles(items) == [(0, 8), (8, 2), (10, 2), (12, 1), (13, 1)]


@pytest.mark.parametrize("method", ["sparsegpt", "multiweight"])
@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_expert_bundles_are_the_same_batches_for_any_number_of_workers(method, pattern):
    """Experts solved in bundles (prune_many): any number of workers gives the one-worker result bit
    for bit (a bundle is solved whole wherever it goes), which equals solving each expert alone up
    to prune_many's own stated tolerance (multiweight pads stacked rows: ~1e-6 relative in float32)."""
    items = []
    for e in range(11):
        W, H = problem(12, 16, seed=10 + e, tokens=40 + 7 * e)
        items.append((W, H, kws(method, pattern, "cg")))
    one = spread.LocalPool().solve(items, batch=True)
    alone = spread.LocalPool().solve(items)
    for n in (2, 3):
        for a, b in zip(one, SplitPool(n).solve(items, batch=True)):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
    for a, b in zip(alone, one):
        assert torch.equal(a.mask, b.mask)
        assert (a.weight - b.weight).abs().max() <= 1e-5 * a.weight.abs().max()


def test_a_helpers_share_goes_in_bounded_calls(monkeypatch):
    """StagePool (actors/stage.py) with two peers served in this process: each helper's share of a
    phase goes out in calls of at most HELP_CALL_BYTES (estimated), taken one at a time, so a
    helper never holds more than one call's pieces; the merged results equal the item-by-item
    solves bit for bit (whole items: the same computation), and each call's estimate is within the
    bound unless it is a single piece."""
    ray = pytest.importorskip("ray")
    from actors import stage as st

    items = []
    for j in range(8):  # 8 whole items (unstructured sparsegpt is never cut), one Hessian each
        W, H = problem(24, 32, seed=10 + j)
        items.append((W, H, kws("sparsegpt", "0.5")))
    one = st.piece_bytes(items[0][0], items[0][2], 24) + 32 * 32 * 4
    limit = 2 * one  # two pieces a call
    monkeypatch.setattr(st, "HELP_CALL_BYTES", limit)
    for p_share in spread.assign([(24, 32)] * 8, [kw for *_, kw in items], 3)[1:]:
        calls = st.help_calls(items, p_share, limit)
        assert [p for c in calls for p in c] == p_share  # every piece once, in order
        for c in calls:
            est = sum(st.piece_bytes(items[p.item][0], items[p.item][2], 24) + 32 * 32 * 4 for p in c)
            assert est <= limit or len(c) == 1

    class Peer:  # Stage.help on a plain Stage state, answered at once (ray.get is the identity here)
        def __init__(self):
            self.state = st.Stage.__new__(st.Stage)
            self.state.device, self.state.help_busy, self.state.help_events, self.state.help_calls = "cpu", 0.0, [], 0
            self.sizes = []
            peer = self

            class _Help:
                @staticmethod
                def remote(hessians, payload):
                    peer.sizes.append(len(payload))
                    return st.Stage.help(peer.state, hessians, payload)
            self.help = _Help

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    peers = [Peer(), Peer()]
    got = st.StagePool(peers, "cpu").solve(items)
    ref = spread.LocalPool().solve(items)
    for a, b in zip(ref, got):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
    for p in peers:  # 8 items over 3 workers: 2-3 pieces a helper, at most 2 a call
        assert p.state.help_calls == len(p.sizes) == -(-sum(p.sizes) // 2) and max(p.sizes) <= 2, p.sizes
    assert sum(sum(p.sizes) for p in peers) == 5 and max(len(p.sizes) for p in peers) == 2
