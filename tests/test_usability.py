"""One writer per --out (a lock a crash does not leave stuck), default output names, a no-op rerun,
--help, the summary line."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobs.prune import NAME_PARTS, default_out, main, parser, summary
from pipeline import checkpoint
from pipeline.checkpoint import OutputBusy, OutputDir

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def args_for(model, texts, out, *extra):
    return ["--model", str(model), "--out", str(out), "--calib", str(texts["calib"]), "--eval", str(texts["eval"]),
            "--nsamples", "4", "--seqlen", "32", "--eval-windows", "1", "--quiet", *extra]


def eight_layer_model(tmp: Path, real_model_dir: Path) -> Path:
    """The tiny llama with 8 layers: after it takes --out it still has 8 layers to go, ample time
    to catch it holding the lock, and resuming it is quick."""
    import transformers as tf
    from conftest import tiny_config
    from tiny_models import save

    torch.manual_seed(1)
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 8
    return save(tf.AutoModelForCausalLM.from_config(cfg), tmp / "eight", real_model_dir)


# --- two writers -----------------------------------------------------------------------------

def test_second_writer_is_refused_and_a_killed_one_leaves_nothing_stuck(tmp_path, short_texts, real_model_dir, capsys):
    model = eight_layer_model(tmp_path, real_model_dir)
    out = tmp_path / "out"
    argv = args_for(model, short_texts, out)
    capsys.readouterr()  # the model's own save messages
    first = subprocess.Popen([sys.executable, "-m", "jobs.prune", *argv], cwd=ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE)
    lock = out / ".mwprune" / "lock"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not (lock.exists() and lock.stat().st_size):
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)  # frozen while it holds --out: the second writer meets a live holder
    try:
        assert first.poll() is None, "the first run ended before it could be caught holding --out"
        before = snapshot(out)
        for extra in ([], ["--method", "wanda"]):  # the same command, and a different one
            assert main(argv + extra) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "being written by another run" in err[0], err
            assert f"pid {first.pid} " in err[0], err[0]
        assert snapshot(out) == before  # the refused run changed nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = len(list((out / ".mwprune" / "layers").glob("*.json")))
    assert not (out / "config.json").exists()
    # The kernel dropped the dead run's lock: the same command now resumes and finishes.
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["layers_resumed"] == done and report["layers_solved"] == 8 - done
    assert not lock.exists()  # released at the end


def test_lock_in_one_process_and_leftover_lock_file(tmp_path):
    a, b = OutputDir(str(tmp_path / "o")), OutputDir(str(tmp_path / "o"))
    assert a.begin({"x": 1}) == "new"
    with pytest.raises(OutputBusy, match=f"pid {os.getpid()} "):
        b.begin({"x": 1})
    a.release()
    assert b.begin({"x": 1}) == "resume"
    b.release()
    # A run killed between taking the lock and writing its fingerprint leaves only the lock file.
    c = tmp_path / "c"
    (c / ".mwprune").mkdir(parents=True)
    (c / ".mwprune" / "lock").write_text('{"pid": 1}')
    out = OutputDir(str(c))
    assert out.begin({"x": 1}) == "new"
    out.release()


def test_overwrite_keeps_the_lock(tmp_path):
    out = OutputDir(str(tmp_path / "o"))
    assert out.begin({"x": 1}) == "new"
    out.write_bytes("layers/00000.safetensors", b"old")
    out.release()
    out = OutputDir(str(tmp_path / "o"))
    assert out.begin({"x": 2}, overwrite=True) == "new"
    assert not out.exists("layers/00000.safetensors")
    assert out.exists(checkpoint.LOCK)  # still held, so no one else can start meanwhile
    with pytest.raises(OutputBusy):
        OutputDir(str(tmp_path / "o")).begin({"x": 2})
    out.release()


@pytest.fixture
def store(tmp_path, monkeypatch):
    """OutputDirs that take the object-store path (a lease object, no flock) on a local folder."""
    monkeypatch.setattr(checkpoint, "LEASE_SETTLE", 0.0)

    def make() -> OutputDir:
        o = OutputDir(str(tmp_path / "bucket"))
        o.local = False
        return o
    return make


def write_lease(o: OutputDir, **holder) -> None:
    o.write_json(checkpoint.LOCK, dict({"pid": 1, "host": "elsewhere", "start": "1", "token": "t",
                                        "since": time.time(), "heartbeat": time.time(),
                                        "lease_seconds": 60.0}, **holder))


def test_lease_on_object_stores(store, monkeypatch):
    a, b = store(), store()
    monkeypatch.setattr(checkpoint, "LEASE_SECONDS", 0.4)
    assert a.begin({"x": 1}) == "new"
    first = json.loads(a.read_bytes(checkpoint.LOCK))
    with pytest.raises(OutputBusy, match="lease"):  # same host, live process: held
        b.begin({"x": 1})
    time.sleep(0.5)  # the heartbeat (every lease/4 s) renews the lease while the run lives
    assert json.loads(a.read_bytes(checkpoint.LOCK))["heartbeat"] > first["heartbeat"]
    a.release()
    assert not a.exists(checkpoint.LOCK)
    assert b.begin({"x": 1}) == "resume"
    b.release()


def test_lease_staleness(store):
    o = store()
    o.write_json(f"{checkpoint.STATE}/fingerprint.json", {"mark": checkpoint.MARK,
                                                         "digest": checkpoint.fingerprint_digest({"x": 1}), "parts": {}})
    write_lease(o)  # another host, fresh heartbeat: its liveness is unknown here, so it holds
    with pytest.raises(OutputBusy, match="lapses after 60s"):
        store().begin({"x": 1})
    write_lease(o, heartbeat=time.time() - 61)  # silent for more than a lease: stale
    fresh = store()
    assert fresh.begin({"x": 1}) == "resume"
    fresh.release()
    # On this host a holder whose process is gone is stale at once, heartbeat or not.
    import socket
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lease(o, host=socket.gethostname(), pid=gone.pid, start=None)
    fresh = store()
    assert fresh.begin({"x": 1}) == "resume"
    fresh.release()


def test_ray_driver_is_refused_too(tiny_model, short_texts, tmp_path):
    from actors.driver import run_distributed
    from jobs.prune import config_from_args

    out = tmp_path / "out"
    holder = OutputDir(str(out))
    holder.begin({"someone": "else"})
    try:
        cfg = config_from_args(parser().parse_args(args_for(tiny_model("llama"), short_texts, out,
                                                            "--stages", "2", "--mode", "dense"))).validate()
        with pytest.raises(OutputBusy, match="being written by another run"):
            run_distributed(cfg, quiet=True)
    finally:
        holder.release()


# --- default names ---------------------------------------------------------------------------

def test_default_names_carry_every_result_changing_option():
    name = lambda *argv: default_out(parser().parse_args(list(argv)))  # noqa: E731
    assert name() == os.path.join("out", "smollm2-135m-multiweight-0.5-blendauto")  # README's default folder
    variants = [["--method", "wanda"], ["--sparsity", "0.6"], ["--nm", "2:4"], ["--refit", "cg"],
                ["--refit", "exact"], ["--group-size", "32"], ["--nm", "2:4", "--mask-rule", "saliency"],
                ["--mode", "dense"], ["--mode", "stagewise", "--stages", "2"], ["--mode", "stagewise", "--stages", "3"],
                ["--calib", "a.txt"], ["--calib", "b.txt"], ["--nsamples", "32"], ["--seqlen", "256"], ["--seed", "1"],
                ["--dtype", "bfloat16"], ["--batch-size", "2"], ["--device", "cuda"], ["--model", "/m/llama-7b"]]
    names = [name(*v) for v in variants]
    assert len(set(names)) == len(names), names  # no two variants share a folder
    assert name() not in names
    assert name("--nm", "2:4") != name("--nm", "2:4", "--mask-rule", "exact")
    # Options that do not change the pruned weights keep the name (a rerun with them resumes).
    for v in (["--eval", "x.txt"], ["--eval-windows", "2"], ["--quiet"], ["--overwrite"], ["--stages", "3"],
              ["--mode", "dense", "--stages", "3"], ["--address", "auto"]):
        base = name("--mode", "dense") if "dense" in v else name()
        assert name(*v) == base, v
    assert "refit-cg" in name("--refit", "cg") and "group32" in name("--group-size", "32")


def test_name_parts_cover_the_fingerprint(tiny_model, short_texts, tmp_path):
    """A new part of the fingerprint needs a naming rule, or two runs differing in it would share a
    default folder: this fails until NAME_PARTS (and default_out) learn it."""
    from jobs.prune import config_from_args
    from pipeline.run import fingerprint, prepare

    cfg = config_from_args(parser().parse_args(args_for(tiny_model("llama"), short_texts, tmp_path / "o")))
    fp = fingerprint(prepare(cfg.validate()))
    assert set(fp) <= set(NAME_PARTS)  # (allocation is in the fingerprint only when not uniform)
    options = {a.dest for a in parser()._actions}
    assert {o for opts in NAME_PARTS.values() for o in opts} <= options


# --- reruns, help, summary -------------------------------------------------------------------

def test_no_op_rerun_says_so(tiny_model, short_texts, tmp_path, capsys):
    out = tmp_path / "out"
    argv = args_for(tiny_model("llama"), short_texts, out)
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert f"wrote {out}" in first
    before = snapshot(out)
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "wrote" not in again and "already held this run, complete" in again, again
    assert again.splitlines()[0] == first.splitlines()[0]  # the same summary line
    assert snapshot(out) == before
    assert "already_complete" not in json.loads((out / "report.json").read_text())


def test_help_shows_defaults():
    text = " ".join(parser().format_help().split())  # wrapping depends on the terminal width
    for needle in ("(default: multiweight)", "(default: none)", "(default: windows)", "(default: sequential)",
                   "(default: 0)", "(default: 4)"):
        assert needle in text, needle


def test_summary_names_refit_and_options():
    rep = {"method": "multiweight", "pattern": "2:4", "refit": "cg", "solver_options": {"group": 32},
           "perplexity": {"dense": 30.0, "pruned": 40.0}, "sparsity": {"overall": 0.5}, "seconds": 1.0,
           "stages": 2, "mode": "dense"}
    line = summary(rep)
    assert "multiweight 2:4 + refit cg (group 32), dense on 2 stages:" in line, line
    assert "refit" not in summary(dict(rep, refit=None))


def test_local_ray_is_announced_only_when_started_here(monkeypatch):
    from jobs.prune import local_ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    parse = parser().parse_args
    assert local_ray(parse(["--mode", "dense"])) and local_ray(parse(["--stages", "2"]))
    assert not local_ray(parse([])) and not local_ray(parse(["--stages", "1"]))
    assert not local_ray(parse(["--mode", "dense", "--address", "ray://head:10001"]))
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert not local_ray(parse(["--mode", "dense"]))
