"""The generic adapter: layers, prunable modules, calibration order, tail modules."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class UnsupportedModel(ValueError):
    pass


class _StopForward(Exception):
    pass


@dataclass(frozen=True)
class Adapter:
    """Names inside a HF causal LM. Empty `layers` means: the largest ModuleList of the model."""
    family: str = "generic"
    layers: str = ""
    # Modules applied after the last decoder layer and before the head, in order (absent ones skipped).
    tail: tuple[str, ...] = ()
    head: str = "lm_head"
    # Only these Linear names (suffixes inside a layer) are pruned; empty = every nn.Linear.
    prune_only: tuple[str, ...] = ()
    # Modules whose weight the layer uses directly (never calling the module), so a pre-hook never
    # fires: name -> (module whose *output* carries the input, function output -> input).
    taps: Callable[[nn.Module], dict[str, tuple[str, Callable]]] | None = None

    def layer_taps(self, layer: nn.Module) -> dict[str, tuple[str, Callable]]:
        return self.taps(layer) if self.taps else {}

    def layers_path(self, model: nn.Module) -> str:
        if self.layers:
            return self.layers
        best, best_n = None, 0
        for name, mod in model.named_modules():
            if isinstance(mod, nn.ModuleList) and len(mod) > 0:
                n = sum(p.numel() for p in mod.parameters())
                if n > best_n:
                    best, best_n = name, n
        if best is None:
            raise UnsupportedModel(f"no decoder layer list found in {type(model).__name__}")
        return best

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path(model))

    def tail_paths(self, model: nn.Module) -> list[str]:
        if self.tail:
            names = list(self.tail)
        else:  # conventional names of the final norm, beside the layer list
            parent = self.layers_path(model).rpartition(".")[0]
            names = [f"{parent}.{n}" if parent else n for n in ("norm", "final_layer_norm", "norm_f", "ln_f")]
        out = []
        for n in names:
            try:
                if model.get_submodule(n) is not None:
                    out.append(n)
            except AttributeError:
                pass
        return out

    def prunable(self, layer: nn.Module) -> dict[str, nn.Linear]:
        mods = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        if self.prune_only:
            mods = {n: m for n, m in mods.items() if n.rpartition(".")[2] in self.prune_only}
        if not mods:
            raise UnsupportedModel(f"no linear modules to prune in {type(layer).__name__}")
        return mods


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def input_hook(layer: nn.Module, modules: dict[str, nn.Linear], name: str, sink, stop: bool = False,
               taps: dict | None = None):
    """Feed the input of module `name` to `sink`; `stop` then skips the rest of the layer's forward."""
    def feed(x):
        sink(x)
        if stop:
            raise _StopForward
    if taps and name in taps:
        src, fn = taps[name]
        return layer.get_submodule(src).register_forward_hook(lambda mod, args, out: feed(fn(out)))
    return modules[name].register_forward_pre_hook(lambda mod, args: feed(args[0]))


def trace_groups(layer: nn.Module, modules: dict[str, nn.Linear], hidden: torch.Tensor,
                 kwargs: dict, taps: dict | None = None) -> list[list[str]]:
    """Calibration order of a layer's modules, grouped by shared input, from one real forward.

    Modules that read the very same tensor (q/k/v; gate/up) form one group and share a Hessian.
    Groups come in the order they run, so later groups can be calibrated on pruned earlier ones.
    A module that never runs is an error: its Hessian would be empty.
    """
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [input_hook(layer, modules, name, lambda x, name=name: seen.append((name, x)), taps=taps)
             for name in modules]
    try:
        with torch.no_grad():
            call_layer(layer, hidden[:1], kwargs)  # kwargs were captured for batch 1
    finally:
        for h in hooks:
            h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in seen:
        for src, names in groups:
            if x is src or (x.data_ptr() == src.data_ptr() and x.shape == src.shape and x.stride() == src.stride()):
                if name not in names:
                    names.append(name)
                break
        else:
            groups.append((x, [name]))
    order = [names for _, names in groups]
    missing = set(modules) - {n for g in order for n in g}
    if missing:
        raise UnsupportedModel(f"modules never called in a forward pass: {sorted(missing)}")
    return order


def run_until_hooks(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> None:
    try:
        call_layer(layer, hidden, kwargs)
    except _StopForward:
        pass
