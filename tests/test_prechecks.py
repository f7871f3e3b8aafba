"""Bad input to a Ray job fails before any cluster is started or joined: one line, exit 2, nothing
written, no Ray (issue 22: `--stages 5` on a smaller model started a local cluster first)."""
from __future__ import annotations

import time

import pytest

from jobs.prune import main


@pytest.fixture
def no_ray(monkeypatch):
    """Record any attempt to start or join a cluster (the driver's `connect`, and `ray.init` itself)."""
    import ray

    import actors.driver as driver
    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise AssertionError("a cluster was started or joined")

    monkeypatch.setattr(driver, "connect", refuse)
    monkeypatch.setattr(ray, "init", refuse)
    was = ray.is_initialized()
    yield calls
    assert was or not ray.is_initialized()


def bad_cases(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run of this tool")
    return [  # (options, environment, what the one line says)
        (["--stages", "5"], {}, "--stages 5 is more than the model's 3 decoder layers"),
        (["--stages", "2", "--nm", "2:3"], {}, "needs input widths divisible by 3"),
        (["--stages", "2", "--calib", str(tmp_path / "missing.txt")], {}, "data file not found"),
        (["--mode", "stagewise", "--eval", str(tmp_path / "missing.jsonl")], {}, "data file not found"),
        (["--stages", "2", "--seqlen", "4096"], {}, "beyond the model's 256 positions"),
        (["--stages", "2"], {"MWPRUNE_PLACEMENT": "NEAR"}, "MWPRUNE_PLACEMENT must be one of"),
        (["--stages", "2"], {"MWPRUNE_STAGE_CPUS": "two"}, "MWPRUNE_STAGE_CPUS must be an integer"),
        (["--stages", "2", "--out", str(foreign)], {}, "is not a run of this tool"),
    ]


def test_bad_input_fails_before_ray(tiny_model, short_texts, tmp_path, capsys, monkeypatch, no_ray):
    model, out = tiny_model("llama"), tmp_path / "out"  # 3 decoder layers, 256 positions
    for opts, env, needle in bad_cases(tmp_path):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            argv = ["--model", str(model), "--out", str(out), "--calib", str(short_texts["calib"]),
                    "--nsamples", "4", "--seqlen", "32", *opts]
            capsys.readouterr()
            t0 = time.perf_counter()
            assert main(argv) == 2, opts
            wall = time.perf_counter() - t0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (opts, err)
        assert "starting a local Ray cluster" not in err[0]
        assert not out.exists(), opts
        assert wall < 10, (opts, wall)  # reading a config and shard headers; Ray alone takes ~2.5 s to start
    assert no_ray == []
    assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["notes.txt"]
