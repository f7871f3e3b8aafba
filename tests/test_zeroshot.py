"""--tasks: lm-evaluation-harness on the dense and the pruned model, with a local task (a task YAML
over a jsonl file written here; nothing from a hub). Skipped where the [eval] extra is missing."""
from __future__ import annotations

import json

import pytest
import torch

from jobs.austen_cloze import task_yaml
from jobs.prune import main

pytest.importorskip("lm_eval")

QUESTIONS = [("The sky is", ["blue", "green", "very loud"], 0), ("Water is", ["wet", "dry"], 0),
             ("Fire is", ["cold", "hot"], 1), ("Two plus two is", ["four", "five", "six"], 0),
             ("Snow is", ["black", "white"], 1), ("The sun rises in the", ["east", "west"], 0),
             ("A cat says", ["woof", "meow", "moo"], 1), ("Ice is", ["frozen water", "warm"], 0)]
WORDS = ["red", "garden", "river", "quiet", "stone", "letter", "evening", "horse", "window", "music"]
# enough questions that the random tiny model's dense and pruned answers differ somewhere
QUESTIONS += [(f"Question {i}: the answer is", [WORDS[i % 10], WORDS[(i + 3) % 10], WORDS[(i + 6) % 10]], i % 3)
              for i in range(32)]


def write_task(folder) -> str:
    folder.mkdir()
    rows = folder / "qa.jsonl"
    rows.write_text("".join(json.dumps({"question": q, "choices": c, "label": label}) + "\n"
                            for q, c, label in QUESTIONS))
    yaml = folder / "tiny_qa.yaml"
    yaml.write_text(task_yaml(rows, "mwprune_tiny_qa", "question"))
    return str(yaml)


@torch.no_grad()
def own_accuracy(folder) -> tuple[dict, float]:
    """lm-eval's multiple-choice scoring, by hand: the summed log-probability of " " + choice after
    the question (the pair encoded together, the question's tokens split off); acc takes the best
    choice, acc_norm the best per character. Also returns the smallest margin between the best two."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    hits = {"acc": 0, "acc_norm": 0}
    margin = float("inf")
    for q, choices, label in QUESTIONS:
        ctx = tok(q, add_special_tokens=False)["input_ids"]
        lls = []
        for c in choices:
            whole = tok(q + " " + c, add_special_tokens=False)["input_ids"]
            logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            lls.append(sum(logp[j - 1, whole[j]].item() for j in range(len(ctx), len(whole))))
        for metric, scores in (("acc", lls), ("acc_norm", [ll / len(" " + c) for ll, c in zip(lls, choices)])):
            order = sorted(scores, reverse=True)
            margin = min(margin, order[0] - order[1])
            hits[metric] += int(max(range(len(scores)), key=scores.__getitem__) == label)
    return {k: v / len(QUESTIONS) for k, v in hits.items()}, margin


def test_local_task_dense_and_pruned(tiny_model, short_texts, tmp_path, capsys):
    model, out = tiny_model("llama"), tmp_path / "out"
    task = write_task(tmp_path / "tasks")
    argv = ["--model", str(model), "--out", str(out), "--calib", str(short_texts["calib"]), "--eval",
            str(short_texts["eval"]), "--nsamples", "4", "--seqlen", "32", "--eval-windows", "1", "--quiet",
            "--tasks", task]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    z = json.loads((out / "report.json").read_text())["zero_shot"]
    assert z["tasks"] == ["mwprune_tiny_qa"] and z["num_fewshot"] == 0 and z["harness"].startswith("lm-eval")
    mine = {}
    for which, folder in (("dense", model), ("pruned", out)):
        mine[which], margin = own_accuracy(folder)
        # lm-eval batches and pads; a choice within float noise of another could rank either way
        assert margin > 1e-5, f"{which}: two choices tie within {margin}; the comparison would be luck"
        assert z[which]["mwprune_tiny_qa"] == pytest.approx(mine[which], abs=1e-12), which
    assert mine["dense"] != mine["pruned"]  # so each side is shown to be its own model
    assert "mwprune_tiny_qa: acc" in printed

    before = (out / "report.json").read_bytes()  # the same command again: nothing to do
    assert main(argv) == 0
    assert (out / "report.json").read_bytes() == before


def test_bad_tasks_fail_before_any_work(tiny_model, short_texts, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--model", str(tiny_model("llama")), "--out", str(out), "--calib", str(short_texts["calib"]),
            "--nsamples", "4", "--seqlen", "32", "--quiet"]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("dataset_path: json\n")
    for tasks, needle in ((str(tmp_path / "missing.yaml"), "missing.yaml"), (str(bad_yaml), "no 'task:' name")):
        capsys.readouterr()
        assert main(base + ["--tasks", tasks]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()


def test_tasks_with_a_model_uri_refused_before_any_work(short_texts, tmp_path, capsys):
    """lm-eval loads the dense model from report["model"], which for a URI is not a folder: refused up
    front (one line, exit 2, nothing written), not after the pruning."""
    out = tmp_path / "out"
    argv = ["--model", "s3://bucket/model", "--out", str(out), "--calib", str(short_texts["calib"]),
            "--nsamples", "4", "--seqlen", "32", "--quiet", "--tasks", "arc_easy"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --tasks") and "URI" in err[0], err
    assert not out.exists()


def _prune_cli(argv, env_extra, tmp_path):
    """jobs.prune in a fresh process (the hub libraries read their offline flags at import), with an
    empty hub cache so no earlier download can answer."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    env.update(PYTHONPATH=str(root), OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf-home"),
               HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"), **env_extra)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "jobs.prune", *argv], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_unreachable_task_data_fails_before_any_work(tiny_model, short_texts, tmp_path, how):
    """A registered task whose data is neither cached nor reachable: one line, exit 2, before any
    pruning (nothing written), without huggingface_hub's five retries per request (~25 s of back-off
    and a warning each). "unreachable": the hub's endpoint refuses connections (a closed local port),
    whatever this machine's network, so the probe (not an environment flag) must decide."""
    out = tmp_path / "out"
    env = {"HF_HUB_OFFLINE": "1"} if how == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": "http://127.0.0.1:9"}
    r, wall = _prune_cli(["--model", str(tiny_model("llama")), "--out", str(out), "--calib", str(short_texts["calib"]),
                          "--nsamples", "4", "--seqlen", "32", "--eval-windows", "1", "--tasks", "arc_easy"], env, tmp_path)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith("error: task arc_easy: its data cannot be read"), err
    assert ("offline (HF_HUB_OFFLINE)" if how == "HF_HUB_OFFLINE" else "cannot be reached") in err[0], err
    assert not out.exists()
    # lm-eval's task index takes ~5-20 s here; the retries alone took ~25 s more before
    assert wall < 60, wall
