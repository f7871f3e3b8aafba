"""Build a model skeleton on the meta device and load only the parts being worked on.

Parameters live on `meta` until a module is loaded from the safetensors shards; buffers computed
in __init__ (rotary frequencies) are built for real, since they are not in the checkpoint.
No caller ever needs the whole model in memory.
"""
from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

import torch
from torch import nn

from . import remote
from .models import Adapter, get_adapter


class ModelFilesError(ValueError):
    pass


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".tflite",
                   ".ot")
SMALL_FILE = 64 << 20  # bytes: tokenizer and config files are far smaller; weights far larger


def is_small_file(name: str, size: int) -> bool:
    """Files that travel with a model but are not weights (config, tokenizer, generation config, chat
    template): fetched whole from a remote model, and the one rule for what the output carries over
    from a model, local or remote (pipeline/checkpoint.py). Weights in any format are not: the output's
    safetensors replace them, and others would hold the dense weights; nor are weight indexes
    (`*.index.json`: the output writes its own, others name shards it does not have)."""
    return not name.startswith(".") and Path(name).suffix not in WEIGHT_SUFFIXES \
        and not name.endswith(".index.json") and size < SMALL_FILE


class ModelFiles:
    """A HF folder: config plus safetensors shards, indexed by tensor name.

    `source` is a local folder or a URI (s3://..., see pipeline/remote.py). For a URI, the small
    files are fetched into a cache folder (`folder`, so transformers and the output read them as
    local files) and tensors are read by byte range; nothing else is downloaded. `counters()` says
    what was read: the store's requests for a URI, the tensor bytes (`bytes_read`, `read_seconds`)
    for a folder.
    """

    def __init__(self, source: str | os.PathLike):
        from transformers import AutoConfig

        self.store = None
        self.bytes_read, self.read_seconds = 0, 0.0
        if remote.is_uri(str(source)):
            self.source = remote.redact(str(source))
            self.store = remote.Store(str(source))
            self.folder = self._fetch_small_files()
        else:
            self.folder = Path(source)
            self.source = str(self.folder)
            if not self.folder.is_dir():
                raise ModelFilesError(f"model folder not found: {self.folder}")
            if not (self.folder / "config.json").is_file():
                raise ModelFilesError(f"no config.json in model folder {self.folder}")
        try:
            self.config = AutoConfig.from_pretrained(self.folder)
        except Exception as e:  # noqa: BLE001 - any parse failure is one bad-input message
            raise ModelFilesError(f"unreadable config.json in {self.source}: {str(e).splitlines()[0]}") from None
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ModelFilesError(f"unreadable model.safetensors.index.json in {self.source}: {e}") from None
        elif self.store is not None or (self.folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise ModelFilesError(f"no safetensors weights in {self.folder} (model.safetensors or an index)")
        self.files: dict[str, str] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.headers: dict[str, dict] = {}  # remote shards: tensor -> dtype, shape, byte range
        shards = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for shard in shards:
            if self.store is not None:
                try:
                    self.headers[shard] = header = remote.read_header(self.store, shard)
                except remote.RemoteError as e:
                    if str(e).startswith("not found") and weight_map is None:
                        raise ModelFilesError(f"no safetensors weights in {self.source} (model.safetensors "
                                              f"or an index)") from None
                    raise ModelFilesError(str(e)) from None
                for k, t in header.items():
                    self.files[k] = shard
                    self.dtypes[k] = remote.DTYPES[t["dtype"]]  # parse_header refused the others
                continue
            path = self.folder / shard
            try:
                from safetensors import safe_open
                with safe_open(path, framework="pt") as f:
                    names = {k: f.get_slice(k).get_dtype() for k in f.keys()}
            except Exception as e:  # noqa: BLE001
                raise ModelFilesError(f"corrupt or truncated safetensors file {path}: {str(e).splitlines()[0]}") from None
            for k, name in names.items():  # the table a URI's headers use (remote.DTYPES), refusing alike
                if remote.DTYPES.get(name) is None:
                    raise ModelFilesError(f"tensor {k} in {path} has dtype {name}, which this tool cannot read")
                self.files[k] = shard
                self.dtypes[k] = remote.DTYPES[name]
        self.shards = shards

    def _fetch_small_files(self) -> Path:
        """config.json, the index and the tokenizer's files of a remote model, into a cache folder
        keyed by the URI and each file's size and modification time (a changed file: a new folder)."""
        store = self.store
        try:
            listed = {posixpath.relpath(i.path, store.root): i for i in store.list("")}
            if "config.json" not in listed:
                store.info("config.json")  # names a missing bucket or prefix, or a refusal
                raise ModelFilesError(f"no config.json in model {self.source}")  # listed elsewhere
            names = sorted(n for n, i in listed.items() if n == "model.safetensors.index.json"
                           or is_small_file(n, i.size))
            key = remote._key(store.uri, *[(n, *store.identity(n)) for n in names])
            folder = store.fetch_to(names, remote._cache_root() / "models" / key)
        except remote.RemoteError as e:
            if str(e).startswith("not found"):
                raise ModelFilesError(f"model not found: {self.source} (no config.json)") from None
            raise ModelFilesError(str(e)) from None
        return folder

    def read(self, names: list[str], device="cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        import time

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        t0 = time.perf_counter()
        for shard, ns in by_file.items():
            if self.store is not None:
                try:
                    got = remote.read_tensors(self.store, shard, self.headers[shard], ns)
                except remote.RemoteError as e:
                    raise ModelFilesError(str(e)) from None
            else:
                from safetensors import safe_open
                try:
                    with safe_open(self.folder / shard, framework="pt", device="cpu") as f:
                        got = {n: f.get_tensor(n) for n in ns}
                except Exception as e:  # noqa: BLE001
                    raise ModelFilesError(f"corrupt or truncated safetensors file {self.folder / shard}: "
                                          f"{str(e).splitlines()[0]}") from None
                self.bytes_read += sum(t.numel() * t.element_size() for t in got.values())
            for n in ns:
                t = got[n]
                out[n] = t.to(device=device, dtype=dtype if (dtype and t.is_floating_point()) else t.dtype)
        if self.store is None:
            self.read_seconds += time.perf_counter() - t0
        return out

    def counters(self) -> dict:
        """What this process read of the model: `model_bytes_read` from the store (or tensor bytes
        from a local folder), `model_read_s` spent on it; for a URI also the requests made, the part
        of the bytes that were whole small files (config, tokenizer) and the tensor bytes served from
        this node's cache instead of the store."""
        if self.store is None:
            return {"model_bytes_read": self.bytes_read, "model_read_s": round(self.read_seconds, 4)}
        c = self.store.counters()
        return {"model_bytes_read": c["bytes_read"], "model_read_s": round(c["read_seconds"], 4),
                "model_requests": c["requests"], "model_small_files_bytes": c["small_bytes"],
                "model_cache_bytes": c["cache_bytes"]}

    def fingerprint_parts(self) -> dict:
        """What identifies the weights cheaply: config text and each shard's name and size."""
        if self.store is not None:
            return {"config": (self.folder / "config.json").read_text(),
                    "shards": {s: self.store.info(s).size for s in self.shards}}
        return {"config": (self.folder / "config.json").read_text(),
                "shards": {s: (self.folder / s).stat().st_size for s in self.shards}}


def build_skeleton(files: ModelFiles, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Adapter]:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    adapter = get_adapter(files.config)
    try:
        with init_empty_weights(include_buffers=False):
            # Eager experts: one matmul per expert, so each expert's routed tokens can be seen.
            model = AutoModelForCausalLM.from_config(files.config, dtype=dtype, experts_implementation="eager")
    except (ValueError, TypeError) as e:
        raise ModelFilesError(f"unsupported architecture {files.config.model_type!r}: {str(e).splitlines()[0]}") from None
    model.tie_weights()  # tied heads share the embedding tensor; shards store it once
    model.eval()
    model.requires_grad_(False)
    model._mwprune_aliases = _aliases(model)  # before loading replaces (and so unties) parameters
    model._mwprune_conversion = Conversion(model, files)
    return model, adapter


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Tied parameters: every name of each shared tensor (lm_head.weight ~ embed_tokens.weight)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: names for names in by_id.values() for n in names}


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


class Conversion:
    """transformers' own checkpoint conversion (renames, per-expert tensors fused into 3-D ones,
    prefixes), applied one module at a time instead of to the whole checkpoint at once.

    `sources[key]` lists the model tensors (parameters and persistent buffers) that checkpoint
    tensor `key` feeds, exactly as `from_pretrained` would route it; `revert` maps a module's
    tensors back to the checkpoint's names, as `save_pretrained` would.
    """

    def __init__(self, model: nn.Module, files: ModelFiles):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.mapping = get_model_conversion_mapping(model)
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta = model.state_dict()
        self.model_keys = set(meta)
        self.sources: dict[str, list[str]] = {}
        for key in sorted(files.files):
            target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            if target not in meta and key in meta:  # as transformers: the key needed no renaming
                target, pattern = key, None
            if target not in meta:
                continue  # a tensor the model does not use (vision tower of a text-only load...)
            if pattern is None:
                self.sources[key] = [target]
            else:  # one source may feed several targets (a fused qkv split into q, k, v)
                c = by_pattern[pattern]
                self.sources[key] = [target.replace(c.target_patterns[0], t) for t in c.target_patterns]
        self.used = [m for m in self.mapping if m.was_used()]
        self.targets = {t for ts in self.sources.values() for t in ts}  # every model tensor the checkpoint feeds

    def keys_for(self, prefix: str) -> list[str]:
        """Checkpoint keys that feed any tensor under module `prefix`."""
        return [k for k, ts in self.sources.items() if any(_under(t, prefix) for t in ts)]

    def load(self, model: nn.Module, tensors: dict[str, torch.Tensor], device, dtype) -> set[str]:
        """Convert checkpoint tensors and set them on `model`; returns the model keys set."""
        import copy
        import os

        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")  # no loader threads: one layer at a time
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its per-call "Loading weights" bar would flood the log
        try:
            info, _ = convert_and_load_state_dict_in_model(
                model, dict(tensors), LoadStateDictConfig(device_map={"": str(device)}, dtype=dtype,
                                                          weight_mapping=copy.deepcopy(self.mapping)))
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        if info.mismatched_keys:
            name, got, want = sorted(info.mismatched_keys, key=str)[0]
            raise ModelFilesError(f"tensor {name} has shape {tuple(got)} in the checkpoint, the model expects {tuple(want)}")
        if info.conversion_errors:
            name, msg = next(iter(info.conversion_errors.items()))
            raise ModelFilesError(f"cannot convert checkpoint tensor {name}: {str(msg).splitlines()[0]}")
        return {t for k in tensors for t in self.sources.get(k, [])}

    def revert(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model tensors (full names) -> checkpoint names and layout, as save_pretrained writes them."""
        from transformers.core_model_loading import revert_weight_conversion

        saved = getattr(model, "_weight_conversions", None)
        model._weight_conversions = self.used  # what this checkpoint's keys actually went through
        try:
            out = revert_weight_conversion(model, dict(tensors))
        finally:
            model._weight_conversions = saved
        return {k: v.contiguous() for k, v in out.items()}


def load_module(model: nn.Module, files: ModelFiles, prefix: str, device, dtype: torch.dtype,
                tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Materialise the parameters (and checkpoint buffers) of submodule `prefix` on `device`,
    through transformers' checkpoint conversion.

    `tensors` (checkpoint names -> tensors) replaces the shards for the keys it holds: how pruned
    layers committed to a run's output are loaded back on resume.
    """
    conv: Conversion = model._mwprune_conversion
    module = model.get_submodule(prefix)
    aliases = getattr(model, "_mwprune_aliases", None) or _aliases(model)
    wanted = {f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(remove_duplicate=False)}
    keys = conv.keys_for(prefix)
    fed = {t for k in keys for t in conv.sources[k]}
    for name in sorted(wanted - fed):  # a tied parameter: load the tensor it shares (head ~ embedding)
        alt = next((a for a in aliases.get(name, []) if a in conv.targets), None)
        if alt is None:
            raise ModelFilesError(f"tensor {name} missing from the checkpoint in {files.source}")
        keys += [k for k in conv.keys_for(alt) if alt in conv.sources[k] and k not in keys]
    given = {k: v for k, v in (tensors or {}).items() if k in keys}
    read = files.read(sorted(set(keys) - set(given)))
    loaded = conv.load(model, {**read, **given}, device, dtype)
    for name in sorted(wanted - loaded):
        alt = next(a for a in aliases.get(name, []) if a in loaded)
        _set(model, name, model.get_parameter(alt))
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        if p.device.type != "meta" and p.requires_grad:  # transformers' loader makes them trainable
            _set(module, name, nn.Parameter(p.data, requires_grad=False))
    for name, buf in module.named_buffers():
        if buf.device.type != "meta":
            owner_name, _, leaf = name.rpartition(".")
            (module.get_submodule(owner_name) if owner_name else module)._buffers[leaf] = buf.to(device)
    return module


def _set(root: nn.Module, name: str, value: nn.Parameter) -> None:
    owner_name, _, leaf = name.rpartition(".")
    (root.get_submodule(owner_name) if owner_name else root)._parameters[leaf] = value


def module_tensors(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of module `prefix`, under the checkpoint's own names and layout."""
    conv: Conversion = model._mwprune_conversion
    module = model.get_submodule(prefix)
    fed = {t for k in conv.keys_for(prefix) for t in conv.sources[k] if _under(t, prefix)}
    state = {f"{prefix}.{n}": t for n, t in module.state_dict(keep_vars=True).items()
             if f"{prefix}.{n}" in fed}
    return conv.revert(model, {k: v.detach() for k, v in state.items()})


def unload_module(model: nn.Module, prefix: str) -> None:
    """Give a module's parameters back to the meta device (frees their memory)."""
    module = model.get_submodule(prefix)
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        _set(module, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))


def non_layer_prefixes(model: nn.Module, adapter: Adapter) -> tuple[list[str], list[str]]:
    """Top-level modules needed before the layers (embeddings...) and after them (tail, head)."""
    layers = adapter.layers_path(model)
    after = adapter.tail_paths(model) + [adapter.head]
    before = []
    for name, mod in model.named_modules():
        if not name or name == layers or name.startswith(layers + ".") or any(
                name == a or name.startswith(a + ".") for a in after):
            continue
        if any(True for _ in mod.parameters(recurse=False)):
            before.append(name)
    return before, after
