"""The output checkpoint as serving engines and transformers load it.

vLLM's DefaultModelLoader (`_prepare_weights`) globs `<folder>/*.safetensors` and keeps the files
model.safetensors.index.json names (`filter_duplicate_safetensors_files`); SGLang copies that code.
`engine_tensors` below does the same, so a shard they would not see fails here.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import torch

from jobs.prune import main
from pipeline.checkpoint import fingerprint_digest


def run_tiny(model, texts, out, *extra) -> int:
    return main(["--model", str(model), "--out", str(out), "--calib", str(texts["calib"]), "--eval",
                 str(texts["eval"]), "--nsamples", "4", "--seqlen", "32", "--eval-windows", "1", "--quiet", *extra])


def engine_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors a vLLM/SGLang default loader reads: top-level glob, filtered by the index."""
    from safetensors import safe_open
    files = glob.glob(os.path.join(folder, "*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    wanted = {os.path.join(folder, f) for f in index["weight_map"].values()}
    files = [f for f in files if f in wanted]
    tensors, where = {}, {}
    for f in sorted(files):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                assert k not in tensors, f"{k} in two shards"
                tensors[k], where[k] = h.get_tensor(k), os.path.basename(f)
    return tensors, where


def test_every_tensor_in_a_top_level_shard_and_from_pretrained(tiny_model, short_texts, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")  # 3 decoder layers
    out = tmp_path / "out"
    assert run_tiny(model, short_texts, out) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert not (out / "layers").exists() and not list(out.glob("*.tmp"))

    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors, where = engine_tensors(out)
    assert where == index["weight_map"]  # every indexed tensor found, in the shard the index names
    assert set(tensors) == set(load_file(model / "model.safetensors"))  # nothing lost, nothing added
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, shard in where.items():  # one shard per layer, in order; the last holds the rest
        i = int(name.split(".")[2]) if name.startswith("model.layers.") else 3
        assert shard == f"model-{i + 1:05d}-of-00004.safetensors", name

    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = loaded.state_dict()
    for k, t in tensors.items():
        assert torch.equal(state[k], t), k
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["overall"] > 0.4  # the pruned weights are what got loaded
    q = state["model.layers.1.self_attn.q_proj.weight"]
    assert (q == 0).float().mean() > 0.4


def test_output_of_the_old_layout_is_not_resumed_into(tiny_model, short_texts, tmp_path, capsys):
    """An output written before shards moved to the top level is a different run: refused, and
    --overwrite replaces it."""
    model, out = tiny_model("llama"), tmp_path / "out"
    assert run_tiny(model, short_texts, out) == 0
    fp = json.loads((out / ".mwprune" / "fingerprint.json").read_text())
    old = {k: v for k, v in fp["parts"].items() if k not in ("layout", "n_layers")}
    (out / ".mwprune" / "fingerprint.json").write_text(json.dumps(
        {"mark": fp["mark"], "digest": fingerprint_digest(old), "parts": old}))
    (out / "config.json").unlink()  # an unfinished old run
    capsys.readouterr()
    assert run_tiny(model, short_texts, out) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "layout" in err and "n_layers" in err, err
    assert run_tiny(model, short_texts, out, "--overwrite") == 0
    assert (out / "config.json").exists()
