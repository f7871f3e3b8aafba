"""Models, data and outputs on a real S3 endpoint: moto's standalone server on a free port, started
for this module and stopped with it (its objects live in its memory, nothing outside the test's
temp folder). The endpoint reaches every process through the standard AWS_ENDPOINT_URL.

Equality tolerance: none. A model read by byte range from S3 gives the same bytes as the local file,
so the same options and threads give bit-identical outputs (see tests/test_ray.py for why threads
matter and why every reference runs with one thread).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from test_ray import assert_identical, one_thread, prune, single_reference, tiny_argv

BUCKET = "models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    """The test server, with helpers to upload folders and read prefixes back."""

    def __init__(self, client, endpoint: str):
        self.client, self.endpoint = client, endpoint

    def upload(self, folder: Path, prefix: str) -> str:
        for f in sorted(Path(folder).iterdir()):
            if f.is_file():
                self.client.upload_file(str(f), BUCKET, f"{prefix}/{f.name}")
        return f"s3://{BUCKET}/{prefix}"

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=BUCKET, Key=key, Body=data)
        return f"s3://{BUCKET}/{key}"

    def keys(self, prefix: str) -> list[str]:
        out, token = [], None
        while True:
            kw = {"Bucket": BUCKET, "Prefix": prefix.rstrip("/") + "/"}
            if token:
                kw["ContinuationToken"] = token
            r = self.client.list_objects_v2(**kw)
            out += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return out
            token = r["NextContinuationToken"]

    def download(self, uri: str, dest: Path) -> Path:
        prefix = uri.removeprefix(f"s3://{BUCKET}/").rstrip("/")
        for key in self.keys(prefix):
            if key.endswith("/"):  # a directory marker (pyarrow's create_dir on S3)
                continue
            path = dest / key[len(prefix) + 1:]
            path.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(BUCKET, key, str(path))
        return dest


@pytest.fixture(scope="module")
def s3(tmp_path_factory, real_model_dir, short_texts):
    """moto's server on a free port; AWS_ENDPOINT_URL, dummy keys and a fresh MWPRUNE_CACHE for every
    process of this module (Ray workers started here inherit them). The real model and the texts
    are resolved first: they live in the usual cache, not in this module's."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request on stderr otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
            mp.delenv(k, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path_factory.mktemp("aws") / "none"))
        mp.setenv("MWPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        try:
            yield S3(client, endpoint)
        finally:
            import ray
            ray.shutdown()  # a cluster started here carries this module's environment
    server.stop()


@pytest.fixture(scope="module")
def s3_texts(s3, short_texts) -> dict[str, str]:
    return {k: s3.put(f"texts/{p.name}", p.read_bytes()) for k, p in short_texts.items()}


def make_model(folder: Path, real_model_dir: Path, **config) -> Path:
    """A tiny random llama (SmolLM2's tokenizer) with `config` changes."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        cfg = tiny_config("llama")
        for k, v in config.items():
            setattr(cfg, k, v)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
        for f in real_model_dir.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, folder / f.name)
    return folder


def header_bytes(folder: Path) -> dict[str, int]:
    """Per shard: the bytes of its header (8-byte length + JSON)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            out[f.name] = 8 + int.from_bytes(fh.read(8), "little")
    return out


def tensor_bytes(folder: Path) -> dict[str, int]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            for k, t in json.loads(fh.read(n)).items():
                if k != "__metadata__":
                    out[k] = t["data_offsets"][1] - t["data_offsets"][0]
    return out


def small_file_bytes(folder: Path) -> int:
    from pipeline.loading import is_small_file
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and (
        f.name == "model.safetensors.index.json"
        or is_small_file(f.name, f.stat().st_size)))


def s3_report(s3: S3, uri: str) -> dict:
    key = uri.removeprefix(f"s3://{BUCKET}/") + "/report.json"
    return json.loads(s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())


# -- 1. single process, s3:// -> s3:// ---------------------------------------------------------------
def test_single_process_s3_to_s3_equals_local(s3, s3_texts, tiny_model, short_texts, tmp_path):
    """The same job with the model, the texts and the output on S3 gives the local run's output bit
    for bit; the process reads each byte of the checkpoint once (every tensor once: a tensor read
    again comes from the node cache), and a second run reads only the headers from the store."""
    model = tiny_model("llama")
    uri = s3.upload(model, "single/tiny")
    ref = single_reference(tiny_argv(model, short_texts, tmp_path / "local"))
    got = single_reference(tiny_argv(uri, s3_texts, "s3://models/single/out"))
    local = s3.download("s3://models/single/out", tmp_path / "from-s3")
    assert_identical(tmp_path / "local", local)
    assert got["perplexity"] == ref["perplexity"]
    assert got["model"] == uri and got["calibration"]["file"] == s3_texts["calib"]

    # reading: headers, small files and every tensor once from the store; repeats from the cache
    headers, tensors = header_bytes(model), tensor_bytes(model)
    assert got["model_bytes_read"] == sum(headers.values()) + sum(tensors.values()) + small_file_bytes(model)
    assert got["model_cache_bytes"] > 0 and got["model_read_s"] > 0
    assert ref["model_bytes_read"] >= sum(tensors.values())  # the local run counts tensor bytes too

    # the output is a model: top-level shards, an index with the total size, loadable after download
    index = json.loads((local / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in local.glob("*.safetensors")}
    assert index["metadata"]["total_size"] == sum(tensor_bytes(local).values())
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    AutoTokenizer.from_pretrained(local)
    from test_ray import tensors as read_tensors
    out = read_tensors(local)
    w = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(m.get_parameter(w), out[w]) and (out[w] == 0).float().mean() == 0.5

    # a second run on this node: tensors from the cache, only the headers from the store
    again = single_reference(tiny_argv(uri, s3_texts, "s3://models/single/out2"))
    assert again["model_bytes_read"] == sum(headers.values())
    assert_identical(local, s3.download("s3://models/single/out2", tmp_path / "again"))


def test_moe_from_s3_equals_local(s3, s3_texts, tiny_model, short_texts, tmp_path):
    """A tiny mixture of experts (one checkpoint tensor per expert, fused by transformers' conversion
    when loaded) read by range from S3: the same output as from the local folder."""
    model = tiny_model("qwen3_moe")
    uri = s3.upload(model, "moe/tiny")
    single_reference(tiny_argv(model, short_texts, tmp_path / "local"))
    got = single_reference(tiny_argv(uri, s3_texts, "s3://models/moe/out"))
    assert_identical(tmp_path / "local", s3.download("s3://models/moe/out", tmp_path / "from-s3"))
    assert got["model_bytes_read"] - got["model_small_files_bytes"] == \
        sum(header_bytes(model).values()) + sum(tensor_bytes(model).values())


@pytest.mark.slow
def test_single_process_s3_to_s3_equals_local_on_real_model(s3, s3_texts, real_model_dir, short_texts, tmp_path):
    """SmolLM2-135M (30 layers, float32, 538 MB) on S3: sparsegpt from s3:// to s3:// equals the local
    folder's run bit for bit, and every tensor byte came from the store exactly once."""
    uri = s3.upload(real_model_dir, "real/smollm2")
    extra = ["--method", "sparsegpt", "--nsamples", 4, "--seqlen", 64, "--eval-windows", 1]
    ref = single_reference(tiny_argv(real_model_dir, short_texts, tmp_path / "local", *extra))
    got = single_reference(tiny_argv(uri, s3_texts, "s3://models/real/out", *extra))
    assert_identical(tmp_path / "local", s3.download("s3://models/real/out", tmp_path / "from-s3"))
    assert got["perplexity"] == ref["perplexity"]
    assert got["model_bytes_read"] - got["model_small_files_bytes"] == \
        sum(header_bytes(real_model_dir).values()) + sum(tensor_bytes(real_model_dir).values())


def test_a_changed_object_is_never_served_from_the_cache(s3, tmp_path, real_model_dir, monkeypatch):
    """Same key, same size, new bytes: the cache keys on the ETag, so the new tensor is read. And the
    range cache stays under its bound."""
    from pipeline.loading import ModelFiles
    from safetensors.torch import save_file

    model = make_model(tmp_path / "m", real_model_dir)
    uri = s3.upload(model, "changed/tiny")
    name = "model.layers.0.self_attn.q_proj.weight"
    first = ModelFiles(uri).read([name])[name]
    from safetensors.torch import load_file
    sd = load_file(model / "model.safetensors")
    sd[name] = sd[name] + 1.0
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    s3.upload(model, "changed/tiny")  # same size, new content
    files = ModelFiles(uri)
    second = files.read([name])[name]
    assert torch.equal(second, first + 1.0)
    # the tensor came from the store, not from the cache (only the unchanged small files did)
    assert files.counters()["model_bytes_read"] == sum(header_bytes(model).values()) + second.numel() * 4

    monkeypatch.setenv("MWPRUNE_REMOTE_CACHE_GB", str(200_000 / 2**30))  # bound: 200 kB
    monkeypatch.setenv("MWPRUNE_CACHE", str(tmp_path / "bounded"))
    files = ModelFiles(uri)
    files.read([k for k in files.files if ".layers." in k])  # ~0.5 MB of layer tensors
    cached = sum(f.stat().st_size for f in (tmp_path / "bounded" / "remote" / "ranges").rglob("*") if f.is_file())
    assert 0 < cached <= 200_000


def test_integer_tensors_have_the_same_dtype_from_a_folder_and_from_s3(s3, tmp_path, real_model_dir):
    """The dtype recorded per tensor (the one the output is written in) comes from one table for a
    local folder and a URI: integer tensors stay integers both ways, as read."""
    from pipeline.loading import ModelFiles, ModelFilesError
    from safetensors.torch import load_file, save_file

    model = make_model(tmp_path / "m", real_model_dir)
    ints = {"extra.i64": torch.arange(5, dtype=torch.int64), "extra.i32": torch.arange(3, dtype=torch.int32),
            "extra.i8": torch.tensor([-1, 2], dtype=torch.int8), "extra.u8": torch.tensor([7], dtype=torch.uint8),
            "extra.u32": torch.tensor([3], dtype=torch.uint32),
            "extra.bool": torch.tensor([True, False])}
    save_file({**load_file(model / "model.safetensors"), **ints}, model / "model.safetensors", metadata={"format": "pt"})
    local, remote = ModelFiles(model), ModelFiles(s3.upload(model, "ints/tiny"))
    assert local.dtypes == remote.dtypes
    for files in (local, remote):
        got = files.read(sorted(ints), dtype=torch.float16)  # a compute dtype leaves integers alone
        for k, t in ints.items():
            assert files.dtypes[k] == t.dtype and got[k].dtype == t.dtype and torch.equal(got[k], t), k
    # a dtype outside the table: the same refusal both ways (it was float32 from a folder)
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(model / "config.json", odd / "config.json")
    header = json.dumps({"t": {"dtype": "F8_E8M0", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (odd / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\1\2")
    for source in (odd, s3.upload(odd, "ints/odd")):
        with pytest.raises(ModelFilesError, match="tensor t in .* has dtype F8_E8M0, which this tool cannot read"):
            ModelFiles(source)


def test_the_output_carries_the_same_files_from_a_folder_and_from_s3(s3, tmp_path, real_model_dir, short_texts):
    """One rule (loading.is_small_file) says which of a model's files the output carries over, wherever
    the model is: tokenizer, generation config, chat template, yes; weights in other formats (they would
    hold the dense weights beside the pruned ones), their indexes and hidden files, no."""
    model = make_model(tmp_path / "m", real_model_dir)
    (model / "chat_template.jinja").write_text("{{ messages }}")
    skipped = {"pytorch_model.bin", "weights.pth", "tf_model.h5", "flax_model.msgpack", "model.onnx",
               "model.ckpt", "model.tflite", "rust_model.ot", "pytorch_model.bin.index.json", ".gitattributes"}
    for name in skipped:
        (model / name).write_bytes(b"dense weights")
    carried = {f.name for f in model.iterdir()} - skipped - {"model.safetensors"}
    assert {"config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json"} <= carried
    uri = s3.upload(model, "carried/tiny")
    got = {}
    for where, source in (("local", model), ("s3", uri)):
        single_reference(tiny_argv(source, short_texts, tmp_path / where, "--method", "magnitude"))
        got[where] = {f.name for f in (tmp_path / where).iterdir()} & ({f.name for f in model.iterdir()})
    assert got["local"] == got["s3"] == carried


def test_one_writer_per_s3_output(s3, capsys):
    """The lease on an S3 --out: a second run is refused while the first holds it (one line naming
    the holder), and may claim the output once the first has released it."""
    from pipeline.checkpoint import OutputBusy, OutputDir

    first = OutputDir("s3://models/lease/out")
    assert first.begin({"n_layers": 1, "x": 1}) == "new"
    try:
        with pytest.raises(OutputBusy, match="is being written by another run"):
            OutputDir("s3://models/lease/out").begin({"n_layers": 1, "x": 1})
    finally:
        first.release()
    second = OutputDir("s3://models/lease/out")
    assert second.begin({"n_layers": 1, "x": 1}) == "resume"
    second.release()
    assert not any(k.endswith(".mwprune/lock") for k in s3.keys("lease/out"))  # released: the lease is gone


def test_data_folders_and_splits_from_s3(s3, tmp_path):
    """--calib / --eval may name a dataset folder on S3 (fetched whole to the node cache, then read
    as a local folder), with :SPLIT as locally; the report names the URI, not the cache."""
    from pipeline import data
    rows = {"train": ["alpha text one", "alpha text two"], "test": ["beta text", "beta again", "beta three"]}
    for split, texts in rows.items():
        s3.put(f"ds/{split}.jsonl", "\n".join(json.dumps({"text": t}) for t in texts).encode())
    calib = data.load_documents("s3://models/ds", role="calib")
    assert calib.split == "train" and calib.texts() == rows["train"] and calib.describe()["file"] == "s3://models/ds"
    test = data.load_documents("s3://models/ds:test")
    assert test.split == "test" and test.texts() == rows["test"]
    with pytest.raises(data.DataError, match="no split 'dev'"):
        data.load_documents("s3://models/ds:dev")


def test_credentials_in_uris_are_redacted():
    from pipeline.remote import redact
    assert redact("s3://AKIA:sEcReT@bkt/m") == "s3://***@bkt/m"
    assert "sEcReT" not in redact("s3://bkt/m?region=eu&secret_key=sEcReT&session_token=tOk")
    assert "region=eu" in redact("s3://bkt/m?region=eu&secret_key=sEcReT")
    assert redact("/plain/path") == "/plain/path"


# -- 2. bad input: one line, exit 2, nothing written -------------------------------------------------
def fails_cleanly(capsys, argv, out_uri: str, needle: str, s3: S3) -> str:
    from jobs.prune import main
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert s3.keys(out_uri.removeprefix(f"s3://{BUCKET}/")) == []  # nothing written
    return lines[0]


@pytest.fixture(scope="module")
def bad_models(s3, tiny_model):
    """Uploads of broken copies of the tiny llama: not safetensors, truncated."""
    model = tiny_model("llama")
    uris = {"good": s3.upload(model, "bad/good")}
    blob = (model / "model.safetensors").read_bytes()
    for name, data in (("notst", b"this is not a safetensors file at all, only text " * 100),
                       ("truncated", blob[: len(blob) // 2])):
        s3.upload(model, f"bad/{name}")
        s3.put(f"bad/{name}/model.safetensors", data)
        uris[name] = f"s3://{BUCKET}/bad/{name}"
    return uris


@pytest.mark.parametrize("case,needle", [
    ("missing bucket", "bucket 'nobucket' not found"),
    ("missing key", "model not found: s3://models/bad/nothing-here"),
    ("not safetensors", "not safetensors"),
    ("truncated", "truncated"),
    ("missing calib", "not found: s3://models/texts/none.txt"),
    ("out bucket missing", "nobucket"),
])
def test_bad_cloud_input_is_one_line(s3, s3_texts, bad_models, capsys, case, needle):
    model = {"missing bucket": "s3://nobucket/tiny", "missing key": "s3://models/bad/nothing-here",
             "not safetensors": bad_models["notst"], "truncated": bad_models["truncated"]}.get(case, bad_models["good"])
    texts = dict(s3_texts, calib="s3://models/texts/none.txt") if case == "missing calib" else s3_texts
    out = "s3://nobucket/out" if case == "out bucket missing" else f"s3://models/bad-out/{case.replace(' ', '-')}"
    argv = tiny_argv(model, texts, out)
    if case == "out bucket missing":
        from jobs.prune import main
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
        return
    fails_cleanly(capsys, argv, out, needle, s3)


def test_keys_in_a_uri_never_reach_a_message(s3, s3_texts, capsys):
    line = fails_cleanly(capsys, tiny_argv("s3://testing:sEcReT1@models/bad/nothing-here", s3_texts,
                                           "s3://models/bad-out/creds"), "s3://models/bad-out/creds",
                         "model not found: s3://***@models/bad/nothing-here", s3)
    assert "sEcReT1" not in line


def test_access_denied_is_one_line(s3, s3_texts, capsys, monkeypatch):
    """A server that refuses every request (403 AccessDenied, as S3 answers a key without rights)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def _deny(self):
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                    b'<Message>Access Denied</Message></Error>')
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _deny

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        line = fails_cleanly(capsys, tiny_argv("s3://models/secret/tiny", s3_texts, "s3://models/denied-out"),
                             "s3://models/denied-out", "access denied", s3)
        assert "s3://models/secret/tiny" in line
    finally:
        server.shutdown()


def test_an_endpoint_that_does_not_answer_fails_within_a_minute(s3, s3_texts, capsys, monkeypatch):
    """A socket that accepts connections and never answers: bounded retries (defaults), then one line."""
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{hang.getsockname()[1]}")
        t0 = time.perf_counter()
        line = fails_cleanly(capsys, tiny_argv("s3://models/single/tiny", s3_texts, "s3://models/hang-out"),
                             "s3://models/hang-out", "does not answer", s3)
        assert time.perf_counter() - t0 < 60, line
    finally:
        hang.close()


# -- 3. stages: each reads its own layers --------------------------------------------------------------
_RAY = {"ours": False}


@pytest.fixture
def ray_s3(s3):
    """A local Ray started after the server's environment is set, so every worker sees it; logical
    GPUs so that stages run one thread each, as the single-process references. Started once, again
    after a test that used another cluster; the s3 fixture shuts it down with the module."""
    import ray
    if not (_RAY["ours"] and ray.is_initialized()):
        ray.shutdown()
        ray.init(num_cpus=2, num_gpus=3, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
        _RAY["ours"] = True
    return ray


@pytest.mark.parametrize("mode", ["sequential", "dense"])
def test_two_stages_from_s3_to_s3_read_their_own_layers(ray_s3, s3, s3_texts, short_texts, tmp_path,
                                                        real_model_dir, mode):
    """--stages 2 with model, texts and output on S3 equals the local single process (sequential and
    dense modes give the single-process result for any number of stages), and each stage reads from
    the store its headers, its layers and the parts it owns (first stage: embeddings; last: norm and
    head), within 10%, never the whole checkpoint. An untied head and 4 layers make the parts differ."""
    model = make_model(tmp_path / "model", real_model_dir, num_hidden_layers=4, tie_word_embeddings=False)
    uri = s3.upload(model, f"stages-{mode}/tiny")  # a prefix per test: no range cached by another test
    out = f"s3://models/stages-{mode}/out"
    assert prune(tiny_argv(uri, s3_texts, out, "--mode", mode, "--stages", 2)) == 0
    single_reference(tiny_argv(model, short_texts, tmp_path / "local", "--mode", mode))
    assert_identical(tmp_path / "local", s3.download(out, tmp_path / "from-s3"))

    rep = s3_report(s3, out)
    sizes, headers = tensor_bytes(model), sum(header_bytes(model).values())
    total = sum(sizes.values())
    facts = rep["pipeline"]["stage_facts"]
    assert len(facts) == 2
    for f in facts:
        own = sum(n for k, n in sizes.items() if any(k.startswith(f"model.layers.{i}.") for i in f["layers"]))
        if f["stage"] == 0:
            own += sizes["model.embed_tokens.weight"]
        if f["stage"] == len(facts) - 1:
            own += sizes["model.norm.weight"] + sizes["lm_head.weight"]
        want = own + headers
        got = f["model_bytes_read"] - f["model_small_files_bytes"]  # config/tokenizer files: the driver's, here
        assert abs(got - want) <= 0.10 * want, (f["stage"], got, want)
        assert got < total and f["model_read_s"] > 0


# -- 4. a cluster without a shared disk; a stage killed mid-run --------------------------------------
def test_cluster_without_a_shared_disk_reads_the_model_from_s3(s3, s3_texts, short_texts, tmp_path,
                                                                real_model_dir, monkeypatch):
    """A fake cluster (a head without GPUs, two nodes with two logical GPUs each), stages forced onto
    both nodes, and the model only on S3 (its local copy is moved away during the run, so no process
    could read it from disk): the job completes, each node read its stage's part from the store, and
    the output equals the local single process."""
    import ray
    from ray.cluster_utils import Cluster

    model = make_model(tmp_path / "model", real_model_dir, num_hidden_layers=4, tie_word_embeddings=False)
    uri = s3.upload(model, "cluster/tiny")
    hidden = tmp_path / ".away"
    model.rename(hidden)
    ray.shutdown()
    _RAY["ours"] = False
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        nodes = {cluster.add_node(num_cpus=1, num_gpus=2).node_id for _ in range(2)}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
        monkeypatch.setenv("MWPRUNE_PLACEMENT", "STRICT_SPREAD")
        out = "s3://models/cluster/out"
        assert prune(tiny_argv(uri, s3_texts, out, "--stages", 2)) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
        hidden.rename(model)
    facts = s3_report(s3, out)["pipeline"]["stage_facts"]
    assert {f["node_id"] for f in facts} == nodes  # one stage on each node
    assert all(0 < f["model_bytes_read"] < sum(tensor_bytes(model).values()) for f in facts)
    single_reference(tiny_argv(model, short_texts, tmp_path / "local"))
    assert_identical(tmp_path / "local", s3.download(out, tmp_path / "from-s3"))


def test_killed_stage_with_input_and_output_on_s3_resumes_unchanged(ray_s3, s3, s3_texts, short_texts, tmp_path,
                                                                   real_model_dir):
    """kill -9 of the stage processes mid-run, model and output on S3: the driver restarts the stages,
    committed layers are loaded back from S3 (the lease on --out is taken again by the same driver),
    only unfinished layers are solved again, and the output equals the uninterrupted local run."""
    import psutil
    import signal as sig

    from test_cli import slow_model

    model = slow_model(tmp_path, real_model_dir)
    uri = s3.upload(model, "killed/slow")
    out = "s3://models/killed/out"
    argv = tiny_argv(uri, s3_texts, out, "--method", "multiweight", "--refit", "exact", "--stages", 2)
    result = {}
    worker = threading.Thread(target=lambda: result.update(code=prune(argv)), daemon=True)
    worker.start()
    layers = "killed/out/.mwprune/layers"
    deadline = time.time() + 400
    while time.time() < deadline and len([k for k in s3.keys(layers) if k.endswith(".json")]) < 5 and worker.is_alive():
        time.sleep(0.1)
    pids = [p.pid for p in psutil.Process().children(recursive=True)
            if any("ray::Stage" in part for part in (p.cmdline() or [p.name()]))]
    killed_at = len([k for k in s3.keys(layers) if k.endswith(".json")])
    assert pids and 5 <= killed_at < 8, (pids, killed_at)
    for pid in pids:
        os.kill(int(pid), sig.SIGKILL)
    worker.join(600)
    assert result.get("code") == 0
    rep = s3_report(s3, out)
    assert rep["layers_resumed"] >= killed_at and rep["layers_solved"] == 8 - rep["layers_resumed"]
    with one_thread():
        single_reference(tiny_argv(model, short_texts, tmp_path / "ref", "--method", "multiweight", "--refit", "exact"))
    assert_identical(tmp_path / "ref", s3.download(out, tmp_path / "from-s3"))
