"""The only code that writes to `--out`: per-layer commits, resume, and the final checkpoint.

Layout of an output (a local folder, or any URI pyarrow.fs opens: s3://, gs://, ...), for a model
of 30 decoder layers:

    .mwprune/fingerprint.json              what determines the result; a rerun resumes only if equal
    .mwprune/layers/00012.json             layer 12's report; written after its tensors = the commit
    model-00013-of-00031.safetensors       layer 12's tensors (a shard of the final checkpoint)
    model-00031-of-00031.safetensors       everything outside the decoder layers (embeddings, norm, head)
    model.safetensors.index.json           weight_map and metadata.total_size
    tokenizer files, report.json
    config.json                            written last: until it appears the folder is not a model

Every shard sits at the top level because serving engines look only there: vLLM's DefaultModelLoader
(vllm/model_executor/model_loader/default_loader.py, `_prepare_weights`) globs `<folder>/*.safetensors`
and then keeps only the files that model.safetensors.index.json names (weight_utils.py,
`filter_duplicate_safetensors_files`); SGLang's DefaultModelLoader (python/sglang/srt/model_loader/
loader.py, `_prepare_weights`) does the same (read at vLLM 00b5ad07, SGLang 005cbe0e). Shards in a
subfolder are not globbed and the index only filters (vLLM reads the files the index names only when
the glob finds none; SGLang never), so with a subfolder those engines saw the non-layer shard alone.

Every file is written to a temporary name and renamed (local), or put as one object (object
stores, where a put is atomic), so a crash never leaves a half-written file under a final name.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
from pathlib import Path

import torch

STATE = ".mwprune"
MARK = "mwprune-run"


class OutputError(ValueError):
    pass


def _open_fs(uri: str):
    import pyarrow.fs as pafs

    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/"), False
    return pafs.LocalFileSystem(), str(Path(uri).absolute()), True


def fingerprint_digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_name(index: int, n_layers: int) -> str:
    """Layer `index`'s shard; index == n_layers names the shard of everything else (the last one)."""
    return f"model-{index + 1:05d}-of-{n_layers + 1:05d}.safetensors"


def safetensors_header(read) -> dict:
    """A safetensors header (tensor names, dtypes, shapes, byte ranges) from `read(n)` at the file's
    start: an 8-byte little-endian length, then that many bytes of JSON."""
    return json.loads(read(int.from_bytes(read(8), "little")))


class OutputDir:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root, self.local = _open_fs(uri)
        self._n_layers: int | None = None

    # -- plain file operations -------------------------------------------------------------
    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        dst = self.path(rel)
        self.fs.create_dir(posixpath.dirname(dst), recursive=True)
        if not self.local:  # an object put is atomic on object stores
            with self.fs.open_output_stream(dst) as f:
                f.write(data)
            return
        tmp = dst + ".tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, dst)

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, default=str).encode())

    def listdir(self, rel: str) -> list[str]:
        import pyarrow.fs as pafs
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return [posixpath.basename(i.path) for i in self.fs.get_file_info(sel)]

    # -- run state -------------------------------------------------------------------------
    def complete(self) -> bool:
        return self.exists("config.json") and self.exists(f"{STATE}/fingerprint.json")

    def begin(self, fingerprint: dict, overwrite: bool = False) -> str:
        """Claim the folder for this run. Returns 'new', 'resume' or 'complete'.

        Refuses a folder that holds anything but a run of this tool, and a run of this tool with a
        different fingerprint (unless overwrite, which only ever deletes runs of this tool).
        """
        digest = fingerprint_digest(fingerprint)
        entries = self.listdir("")
        if entries:
            if not self.exists(f"{STATE}/fingerprint.json"):
                raise OutputError(f"--out {self.uri} is not empty and is not a run of this tool; refusing to write there")
            old = json.loads(self.read_bytes(f"{STATE}/fingerprint.json"))
            if old.get("mark") != MARK:
                raise OutputError(f"--out {self.uri} holds an unrecognised state file; refusing to write there")
            if old.get("digest") != digest:
                if not overwrite:
                    changed = sorted(k for k in set(old.get("parts", {})) | set(fingerprint)
                                     if old.get("parts", {}).get(k) != fingerprint.get(k))
                    raise OutputError(f"--out {self.uri} holds a different run (differs in: {', '.join(changed) or '?'}); "
                                      f"use a new --out, or --overwrite to replace it")
                self.fs.delete_dir_contents(self.root)
            elif self.complete():
                return "complete"
            else:
                return "resume"
        self.write_json(f"{STATE}/fingerprint.json", {"mark": MARK, "digest": digest,
                                                      "parts": json.loads(json.dumps(fingerprint, default=str))})
        return "new"

    def n_layers(self) -> int:
        """The model's decoder layer count, from the fingerprint (shard names carry it). Read from
        the state file, not passed in, so that Ray stages, which only open the folder, name shards
        exactly as the driver that claimed it."""
        if self._n_layers is None:
            parts = json.loads(self.read_bytes(f"{STATE}/fingerprint.json")).get("parts", {})
            if not isinstance(parts.get("n_layers"), int):
                raise OutputError(f"--out {self.uri}: the run's fingerprint has no layer count")
            self._n_layers = parts["n_layers"]
        return self._n_layers

    def committed(self) -> set[int]:
        return {int(n.split(".")[0]) for n in self.listdir(f"{STATE}/layers") if n.endswith(".json")}

    def commit_layer(self, index: int, tensors: dict[str, torch.Tensor], report: dict) -> None:
        from safetensors.torch import save
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise FloatingPointError(f"layer {index}: tensor {name} has NaN or Inf; not committed")
        blob = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
        self.write_bytes(shard_name(index, self.n_layers()), blob)
        self.write_json(f"{STATE}/layers/{index:05d}.json", report)  # the commit point

    def load_layer(self, index: int) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors.torch import load
        tensors = load(self.read_bytes(shard_name(index, self.n_layers())))
        report = json.loads(self.read_bytes(f"{STATE}/layers/{index:05d}.json"))
        return tensors, report

    def shard_header(self, rel: str) -> dict:
        """A shard's header, read without reading its tensors."""
        with self.fs.open_input_file(self.path(rel)) as f:
            return safetensors_header(f.read)

    def finalize(self, model_folder: Path, rest: dict[str, torch.Tensor], layer_names: dict[int, list[str]],
                 report: dict) -> None:
        """Write everything outside the decoder layers, the index and the report; config.json last.

        The index is built from the committed shards' own headers, whatever names they hold (the
        layer code decides those); `layer_names` only says which layers there are.
        """
        from safetensors.torch import save
        n = self.n_layers()
        if sorted(layer_names) != list(range(n)):
            raise OutputError(f"--out {self.uri}: finalize needs layers 0..{n - 1}, got {sorted(layer_names)}")
        rest_name = shard_name(n, n)
        blob = save({k: v.contiguous() for k, v in rest.items()}, metadata={"format": "pt"})
        self.write_bytes(rest_name, blob)
        weight_map, total = {}, 0
        headers = [(shard_name(i, n), self.shard_header(shard_name(i, n))) for i in range(n)]
        headers.append((rest_name, safetensors_header(io.BytesIO(blob).read)))
        for shard, header in headers:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in weight_map:
                    raise OutputError(f"tensor {name} is in both {weight_map[name]} and {shard}")
                weight_map[name] = shard
                total += info["data_offsets"][1] - info["data_offsets"][0]
        # total_size: bytes of tensor data, as transformers' save_pretrained writes it.
        self.write_json("model.safetensors.index.json", {"metadata": {"total_size": total},
                                                         "weight_map": dict(sorted(weight_map.items()))})
        for f in sorted(Path(model_folder).iterdir()):  # tokenizer, generation config, chat template...
            if f.is_file() and f.name != "config.json" and not f.name.startswith("model") \
                    and f.suffix not in (".safetensors", ".bin", ".gguf", ".pt") and f.stat().st_size < 64 << 20:
                self.write_bytes(f.name, f.read_bytes())
        self.write_json("report.json", report)
        self.write_bytes("config.json", (Path(model_folder) / "config.json").read_bytes())
