"""The command line: bad input (one line, exit 2, nothing written) and resume after a kill."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobs.prune import main

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def args_for(model, texts, out, *extra):
    return ["--model", str(model), "--out", str(out), "--calib", str(texts["calib"]), "--eval", str(texts["eval"]),
            "--nsamples", "4", "--seqlen", "32", "--eval-windows", "1", "--quiet", *extra]


def fails_cleanly(capsys, argv, out: Path, needle: str) -> str:
    before = snapshot(out)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert snapshot(out) == before  # nothing written, nothing changed
    return lines[0]


@pytest.fixture
def env(tiny_model, short_texts, tmp_path):
    return tiny_model("llama"), short_texts, tmp_path


@pytest.mark.parametrize("extra,needle", [
    (["--method", "obs"], "'obs'"),
    (["--sparsity", "1.5"], "1.5"),
    (["--sparsity", "0"], "sparsity"),
    (["--nm", "4:4"], "4:4"),
    (["--nm", "2:3"], "divisible by 3"),
    (["--nm", "two"], "two"),
    (["--refit", "newton"], "newton"),
    (["--seqlen", "100000"], "100000"),
    (["--mode", "fast"], "fast"),
    (["--device", "tpu"], "tpu"),
])
def test_bad_options(env, capsys, extra, needle):
    model, texts, tmp = env
    out = tmp / "out"
    fails_cleanly(capsys, args_for(model, texts, out, *extra), out, needle)
    assert not out.exists()


def test_bad_model_paths(env, capsys, tmp_path):
    model, texts, tmp = env
    out = tmp / "out"
    fails_cleanly(capsys, args_for(tmp / "nope", texts, out), out, "nope")
    # truncated safetensors
    broken = tmp / "broken"
    shutil.copytree(model, broken)
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    fails_cleanly(capsys, args_for(broken, texts, out), out, "truncated")
    # unsupported architecture (an encoder-decoder)
    t5 = tmp / "t5"
    shutil.copytree(model, t5, ignore=shutil.ignore_patterns("*.safetensors"))
    from transformers import T5Config
    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, d_kv=8).save_pretrained(t5)
    (t5 / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    fails_cleanly(capsys, args_for(t5, texts, out), out, "t5")


def test_bad_data(env, capsys):
    model, texts, tmp = env
    out = tmp / "out"
    empty = tmp / "empty.txt"
    empty.write_text("  \n")
    short = tmp / "short.txt"
    short.write_text("Only a few words here.")
    for calib, needle in ((tmp / "missing.txt", "missing.txt"), (empty, "empty"), (short, "too short")):
        argv = args_for(model, texts, out)
        argv[argv.index("--calib") + 1] = str(calib)
        fails_cleanly(capsys, argv, out, needle)
    assert not out.exists()


def test_refuses_foreign_out_and_other_runs(env, capsys):
    model, texts, tmp = env
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    fails_cleanly(capsys, args_for(model, texts, foreign), foreign, "not a run of this tool")
    out = tmp / "out"
    assert main(args_for(model, texts, out)) == 0
    capsys.readouterr()
    # same out, different settings: refused without --overwrite, and the finished run is untouched
    fails_cleanly(capsys, args_for(model, texts, out, "--method", "wanda"), out, "different run")
    assert main(args_for(model, texts, out, "--method", "wanda", "--overwrite")) == 0
    assert json.loads((out / "report.json").read_text())["method"] == "wanda"


def test_same_command_twice_is_a_no_op(env, capsys):
    model, texts, tmp = env
    out = tmp / "out"
    assert main(args_for(model, texts, out)) == 0
    before = snapshot(out)
    assert main(args_for(model, texts, out)) == 0
    assert snapshot(out) == before


def test_nan_weights_stop_with_layer_name(env, capsys):
    model, texts, tmp = env
    bad = tmp / "nan-model"
    shutil.copytree(model, bad)
    from safetensors.torch import load_file, save_file
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    code = main(args_for(bad, texts, tmp / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "layer 1" in err[0], err
    assert not (tmp / "out" / "config.json").exists()


# --- resume after the driver is killed -------------------------------------------------------

def slow_model(tmp: Path, real_model_dir: Path) -> Path:
    """8 layers, wide enough that one layer takes a noticeable time to solve."""
    import transformers as tf
    torch.manual_seed(1)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=True)
    from tiny_models import save
    return save(tf.AutoModelForCausalLM.from_config(cfg), tmp / "slow", real_model_dir)


def test_killed_driver_resumes_to_the_same_result(tmp_path, short_texts, real_model_dir):
    model = slow_model(tmp_path, real_model_dir)
    argv = [sys.executable, "-m", "jobs.prune", *args_for(model, short_texts, tmp_path / "killed"),
            "--nsamples", "8", "--seqlen", "64", "--refit", "exact"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    state = tmp_path / "killed" / ".mwprune" / "layers"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(state.glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(state.glob("*.json")))
    assert 2 <= done < 8, f"kill landed after {done} layers"
    assert not (tmp_path / "killed" / "config.json").exists()  # never looks complete

    assert subprocess.run(argv, cwd=ROOT, env=env).returncode == 0
    report = json.loads((tmp_path / "killed" / "report.json").read_text())
    assert report["layers_resumed"] == done and report["layers_solved"] == 8 - done

    argv_ref = [a if a != str(tmp_path / "killed") else str(tmp_path / "ref") for a in argv]
    assert subprocess.run(argv_ref, cwd=ROOT, env=env).returncode == 0
    # Exact equality: a resumed layer is read back bit for bit and the same deterministic float32
    # kernels (same thread count) rebuild the activations, so nothing may differ at all.
    from safetensors.torch import load_file
    for f in sorted((tmp_path / "ref").glob("*.safetensors")):
        a, b = load_file(f), load_file(tmp_path / "killed" / f.name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    ref = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert ref["perplexity"] == report["perplexity"]
