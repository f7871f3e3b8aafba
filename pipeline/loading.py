"""Build a model skeleton on the meta device and load only the parts being worked on.

Parameters live on `meta` until a module is loaded from the safetensors shards; buffers computed
in __init__ (rotary frequencies) are built for real, since they are not in the checkpoint.
No caller ever needs the whole model in memory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .models import Adapter, get_adapter


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class ModelFilesError(ValueError):
    pass


class ModelFiles:
    """A HF folder: config plus safetensors shards, indexed by tensor name."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open
        from transformers import AutoConfig

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelFilesError(f"model folder not found: {self.folder}")
        if not (self.folder / "config.json").is_file():
            raise ModelFilesError(f"no config.json in model folder {self.folder}")
        try:
            self.config = AutoConfig.from_pretrained(self.folder)
        except Exception as e:  # noqa: BLE001 - any parse failure is one bad-input message
            raise ModelFilesError(f"unreadable config.json in {self.folder}: {str(e).splitlines()[0]}") from None
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise ModelFilesError(f"no safetensors weights in {self.folder} (model.safetensors or an index)")
        self.files: dict[str, str] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        shards = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for shard in shards:
            path = self.folder / shard
            try:
                with safe_open(path, framework="pt") as f:
                    for k in f.keys():
                        self.files[k] = shard
                        self.dtypes[k] = _DTYPES.get(f.get_slice(k).get_dtype(), torch.float32)
            except Exception as e:  # noqa: BLE001
                raise ModelFilesError(f"corrupt or truncated safetensors file {path}: {str(e).splitlines()[0]}") from None
        self.shards = shards

    def read(self, names: list[str], device="cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for shard, ns in by_file.items():
            try:
                with safe_open(self.folder / shard, framework="pt", device="cpu") as f:
                    for n in ns:
                        t = f.get_tensor(n)
                        out[n] = t.to(device=device, dtype=dtype if (dtype and t.is_floating_point()) else t.dtype)
            except Exception as e:  # noqa: BLE001
                raise ModelFilesError(f"corrupt or truncated safetensors file {self.folder / shard}: "
                                      f"{str(e).splitlines()[0]}") from None
        return out

    def fingerprint_parts(self) -> dict:
        """What identifies the weights cheaply: config text and each shard's name and size."""
        return {"config": (self.folder / "config.json").read_text(),
                "shards": {s: (self.folder / s).stat().st_size for s in self.shards}}


def build_skeleton(files: ModelFiles, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Adapter]:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    adapter = get_adapter(files.config)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(files.config, dtype=dtype)
    except ValueError as e:
        raise ModelFilesError(f"unsupported architecture {files.config.model_type!r}: {str(e).splitlines()[0]}") from None
    model.tie_weights()  # tied heads share the embedding tensor; shards store it once
    model.eval()
    model.requires_grad_(False)
    model._mwprune_aliases = _aliases(model)  # before loading replaces (and so unties) parameters
    return model, adapter


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Tied parameters: every name of each shared tensor (lm_head.weight ~ embed_tokens.weight)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: names for names in by_id.values() for n in names}


def load_module(model: nn.Module, files: ModelFiles, prefix: str, device, dtype: torch.dtype,
                tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Materialise the parameters of submodule `prefix` on `device`.

    `tensors` (name relative to the module -> tensor) overrides the shards: how pruned layers
    committed to a run's output are loaded back on resume.
    """
    module = model.get_submodule(prefix)
    aliases = getattr(model, "_mwprune_aliases", None) or _aliases(model)
    wanted = {}
    for name, _ in module.named_parameters(remove_duplicate=False):
        full = f"{prefix}.{name}" if prefix else name
        if tensors is not None and name in tensors:
            continue
        src = next((a for a in aliases.get(full, [full]) if a in files.files), None)
        if src is None:
            raise ModelFilesError(f"tensor {full} missing from the checkpoint in {files.folder}")
        wanted[name] = src
    loaded = files.read(sorted(set(wanted.values())), device=device, dtype=dtype)
    for name, _ in list(module.named_parameters(remove_duplicate=False)):
        value = tensors[name].to(device=device, dtype=dtype) if tensors is not None and name in tensors \
            else loaded[wanted[name]]
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    for name, buf in module.named_buffers():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._buffers[leaf] = buf.to(device)
    return module


def unload_module(model: nn.Module, prefix: str) -> None:
    """Give a module's parameters back to the meta device (frees their memory)."""
    module = model.get_submodule(prefix)
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


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
