"""The architecture matrix: tiny random models of every supported family, written by
`save_pretrained` (the hub layout), pruned at 50% (with the job's default `--target-blend auto`) and
2:4 by the single-process job.

For each: the report's dense and pruned perplexities equal a plain `from_pretrained` forward; every
matrix the report lists is at its target; routers stay dense; the output's tensor names are the
input checkpoint's own (per-expert, as serving engines expect); overall sparsity is what the
checkpoint holds, dense leftovers included.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from test_pipeline import checkpoint_sparsity, hf_perplexity, pruned_matrices
from tiny_models import ARCHS, MOE, write
from pipeline.run import RunConfig, run

SUPPORTED = ARCHS
EXPERTS = {"mixtral": 4, "qwen2_moe": 4, "qwen3_moe": 4, "olmoe": 4, "deepseek_v3": 4, "jamba": 4}


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory, real_model_dir):
    made = {}

    def make(arch):
        if arch not in made:
            made[arch] = write(arch, tmp_path_factory.mktemp(f"arch-{arch}"), real_model_dir)
        return made[arch]
    return make


def keys(folder) -> set[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


def tensor(folder, name) -> torch.Tensor:
    index = folder / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
    with safe_open(folder / shard, "pt") as f:
        return f.get_tensor(name)


# 6 windows in batches of 4: two batch shapes, so arguments that depend on the batch (BLOOM's
# ALiBi) must be right at both sizes.
SMALL = dict(nsamples=6, seqlen=32, eval_windows=2, batch_size=4)


@pytest.mark.parametrize("pattern", ["50%", "2:4"])
@pytest.mark.parametrize("arch", SUPPORTED)
def test_architecture(arch, pattern, tiny_arch, short_texts, tmp_path):
    folder = tiny_arch(arch)
    out = tmp_path / "out"
    # 50% with the job's default --target-blend auto (two batches: one held out), 2:4 without it
    opts = {"nm": (2, 4)} if pattern == "2:4" else {"target_blend": "auto"}
    report = run(RunConfig(out=str(out), model=str(folder), calib=str(short_texts["calib"]),
                           eval=str(short_texts["eval"]), **SMALL, **opts), quiet=True)
    if pattern == "50%":
        tb = report["target_blend"]
        assert tb["applied"] and tb["modules"] == sum(len(r["modules"]) for r in report["layers"])
    # Same float32 ops as transformers' own forward, in other batch shapes: 1e-4 relative.
    assert report["perplexity"]["dense"] == pytest.approx(hf_perplexity(folder, short_texts["eval"], 2, 32), rel=1e-4)
    assert report["perplexity"]["pruned"] == pytest.approx(hf_perplexity(out, short_texts["eval"], 2, 32), rel=1e-4)

    mats = pruned_matrices(out, report)
    assert mats
    for name, w in mats.items():
        if pattern == "2:4":
            assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all(), name
        else:
            assert (w == 0).sum().item() == round(0.5 * w.numel()), name
    sp = report["sparsity"]
    assert sp["overall"] == pytest.approx(checkpoint_sparsity(out), abs=1e-9)
    assert sp["overall"] >= 0.5 * (1 - sp["dense_left_share"]) - 1e-9
    routers = [n for n, d in sp["dense_left"].items() if d["reason"] == "router"]
    for n in routers:  # never pruned
        assert (tensor(out, n) != 0).all() if n in keys(out) else True

    # The output is written under the input's names and layout (per-expert tensors, embed_out...).
    assert keys(out) == keys(folder)
    if arch in MOE:
        assert routers, "an MoE model has routers, and they stay dense"
        experts = [m for r in report["layers"] for m in r["modules"].values() if "expert" in m]
        moe_layers = {r["layer"] for r in report["layers"] if any("expert" in m for m in r["modules"].values())}
        per_layer = len({m["param"] for m in experts}) and len(experts) // len(moe_layers)
        assert per_layer % EXPERTS[arch] == 0 and per_layer >= EXPERTS[arch]  # every expert of every matrix
        assert sum(m["tokens"] for m in experts) > 0
        fallback = [f"{r['layer']}.{n}" for r in report["layers"] for n, m in r["modules"].items() if "fallback" in m]
        assert sorted(fallback) == sp["experts_fallback"]


def test_deepseek_router_bias_loaded_and_written(tiny_arch, short_texts, tmp_path):
    """DeepSeek-V3's e_score_correction_bias is a checkpoint buffer: it routes the calibration tokens
    and reaches the output unchanged."""
    folder = tiny_arch("deepseek_v3")
    name = next(k for k in keys(folder) if k.endswith("e_score_correction_bias"))
    assert tensor(folder, name).abs().sum() > 0
    run(RunConfig(out=str(tmp_path / "out"), model=str(folder), calib=str(short_texts["calib"]),
                  eval_windows=0, nsamples=4, seqlen=32, batch_size=4), quiet=True)
    assert torch.equal(tensor(tmp_path / "out", name), tensor(folder, name))


def test_zamba2_shared_block_pruned_once(tiny_arch, short_texts, tmp_path):
    """Zamba2's layer 2 uses layer 1's shared transformer block (tied weights, stored once under
    layer 1). Layer 1 prunes it; layer 2 computes with the pruned block but neither prunes nor counts
    it again; the block's adapter slot for layer 2 (stored under layer 1's names, multiplied by layer
    2 only) is pruned by layer 2 with its own Hessians and written in layer 2's shard; the embeddings
    that every layer takes ride along with the hidden batches, so a batch size of 1 and of 4 agree."""
    folder = tiny_arch("zamba2")
    reports = {}
    for bs in (1, 4):
        reports[bs] = run(RunConfig(out=str(tmp_path / f"out{bs}"), model=str(folder), calib=str(short_texts["calib"]),
                                    eval=str(short_texts["eval"]), nsamples=4, seqlen=32, eval_windows=2,
                                    batch_size=bs), quiet=True)
    report, out = reports[4], tmp_path / "out4"
    by_layer = {r["layer"]: r for r in report["layers"]}
    shared = "shared_transformer.self_attn.q_proj"
    assert shared in by_layer[1]["modules"] and shared not in by_layer[2]["modules"]
    assert not any(n.startswith("shared_transformer.") for n in by_layer[2]["dense_left"])
    # Layer 1 multiplies by its own adapter slot (0) and prunes it; slot 1 is layer 2's: layer 1 leaves
    # it (neither pruned, counted nor committed there), layer 2 prunes it and stores it.
    slot1 = [f"shared_transformer.self_attn.linear_{x}_adapter_list.1.{k}" for x in "qkv" for k in (0, 1)] + \
        [f"shared_transformer.feed_forward.gate_up_proj_adapter_list.1.{k}" for k in (0, 1)]
    assert "shared_transformer.self_attn.linear_q_adapter_list.0.0" in by_layer[1]["modules"]
    assert sorted(by_layer[1]["tied_later"]) == sorted(n + ".weight" for n in slot1)
    assert sorted(by_layer[2]["tied_claimed"]) == sorted(n + ".weight" for n in slot1)
    for n in slot1:
        assert n in by_layer[2]["modules"] and n not in by_layer[1]["modules"], n
    assert not [n for n, d in report["sparsity"]["dense_left"].items() if d["reason"].startswith("tied")]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    layer2_shard = index["model.layers.2.linear.weight"]
    for n in slot1:  # under the input's (layer 1's) names, in layer 2's shard, at the target
        name = f"model.layers.1.{n}.weight"
        assert index[name] == layer2_shard, name
        w = tensor(out, name)
        assert (w == 0).sum().item() == round(0.5 * w.numel()), name
        assert not torch.equal(w, tensor(folder, name))
    # Counted once: layer weights add up to the checkpoint's layer weights (tied ones once).
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    n = sum(p.numel() for p in model.model.layers.parameters() if p.dim() >= 2)
    assert sum(r["weights"] for r in report["layers"]) == n
    # The written block is the pruned one, once, under layer 1's names; the model ties layer 2 to it,
    # the slot that layer 2 pruned included.
    name = "model.layers.1." + shared + ".weight"
    w = tensor(out, name)
    assert (w == 0).sum().item() == round(0.5 * w.numel())
    assert keys(out) == keys(folder)
    assert model.model.layers[2].shared_transformer.self_attn.q_proj.weight.data_ptr() == \
        model.model.layers[1].shared_transformer.self_attn.q_proj.weight.data_ptr()
    slot = model.model.layers[2].shared_transformer.self_attn.linear_q_adapter_list[1][0].weight
    assert torch.equal(slot, tensor(out, "model.layers.1." + slot1[0] + ".weight"))
    # Float32, other batch shapes: the same to 1e-4 relative (summation order differs).
    for k in ("dense", "pruned"):
        assert reports[1]["perplexity"][k] == pytest.approx(reports[4]["perplexity"][k], rel=1e-4)


def _zamba2_resumed(tiny_arch, short_texts, tmp_path, done, **opts):
    """The tiny Zamba2 run whole, then a copy of it cut back to a run stopped with only layers `done`
    committed and the checkpoint unfinished (other layers' shards left as a crash would), resumed.
    Returns (whole run's report, resumed run's report, whole folder, resumed folder)."""
    import shutil
    cfg = dict(model=str(tiny_arch("zamba2")), calib=str(short_texts["calib"]), eval=str(short_texts["eval"]),
               nsamples=4, seqlen=32, eval_windows=2, batch_size=4, **opts)
    whole = tmp_path / "whole"
    first = run(RunConfig(out=str(whole), **cfg), quiet=True)
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    for f in ("config.json", "report.json", "model-00004-of-00004.safetensors", "model.safetensors.index.json"):
        (out / f).unlink()
    for i in set(range(3)) - set(done):
        (out / ".mwprune" / "layers" / f"{i:05d}.json").unlink()
    return first, run(RunConfig(out=str(out), **cfg), quiet=True), whole, out


def test_zamba2_resume_after_the_owner_of_the_shared_block(tiny_arch, short_texts, tmp_path):
    """A run stopped after layer 1 (which stores and prunes the shared block) committed: the rerun
    loads layer 1 back and solves layer 2 with the block exactly as committed; bit-identical result."""
    first, again, whole, out = _zamba2_resumed(tiny_arch, short_texts, tmp_path, [0, 1], nm=(2, 4))
    assert again["layers_resumed"] == 2 and again["layers_solved"] == 1
    assert again["perplexity"] == first["perplexity"]
    for name in keys(whole):
        assert torch.equal(tensor(out, name), tensor(whole, name)), name
    assert again["sparsity"] == first["sparsity"]


@pytest.mark.parametrize("done", [[0], [0, 1, 2]])
def test_zamba2_resume_with_the_later_adapter_slots(tiny_arch, short_texts, tmp_path, done):
    """Layer 2's adapter slot is stored in layer 2's shard under layer 1's names. A run stopped with
    only layer 0 committed (layers 1 and 2 solved again: the slot must start from the input's dense
    values, not from anything an interrupted run left), and one stopped after every layer committed
    but before the checkpoint was finished (layer 2 loaded back with its pruned slot): bit-identical
    output and report to the uninterrupted run."""
    first, again, whole, out = _zamba2_resumed(tiny_arch, short_texts, tmp_path, done, method="sparsegpt")
    assert again["layers_resumed"] == len(done) and again["layers_solved"] == 3 - len(done)
    assert again["perplexity"] == first["perplexity"]
    assert again["sparsity"] == first["sparsity"]
    assert keys(out) == keys(whole)
    for name in keys(whole):
        assert torch.equal(tensor(out, name), tensor(whole, name)), name
