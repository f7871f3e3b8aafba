"""Pruning a slice of decoder layers: a function from input batches to output batches.

The single-process job runs one slice holding every layer; a Ray stage runs the same code on its
own slice. Four streams of hidden states can flow through a slice:

    calib        calibration batches through the *pruned* layers (sequential calibration)
    calib_dense  calibration batches through the *dense* layers (dense / stagewise modes)
    eval_dense   evaluation windows through the dense layers (dense perplexity)
    eval_pruned  evaluation windows through the pruned layers (pruned perplexity)

Each layer is loaded once: dense streams pass through it, its modules are pruned group by group
(Hessians from `calib`, or from `calib_dense` in dense mode), then pruned streams pass through it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import loading
from .models.generic import call_layer, input_hook, run_until_hooks, trace_groups
from .solvers import HessianAccumulator, prune_with_info

STREAMS = ("calib", "calib_dense", "eval_dense", "eval_pruned")


@dataclass
class PruneSpec:
    method: str = "multiweight"
    sparsity: float | None = 0.5
    nm: tuple[int, int] | None = None
    refit: str | None = None
    options: dict = field(default_factory=dict)  # extra solver keywords (group size, mask rule, ...)
    module_sparsity: dict | None = None  # "layer.module" -> sparsity, overriding `sparsity` (OWL)

    def pattern(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity:g}"

    def kwargs(self, key: str | None = None) -> dict:
        sparsity = (self.module_sparsity or {}).get(key, self.sparsity)
        return dict(method=self.method, sparsity=None if self.nm else sparsity,
                    nm=tuple(self.nm) if self.nm else None, refit=self.refit, **self.options)


class _Stop(Exception):
    pass


class Trunk:
    """A model skeleton on the meta device plus the code to run parts of it.

    Only what a caller loads is in memory: decoder layers one at a time, the modules before the
    layers (embeddings) for `embed`, the modules after them (final norm, head) for `nll`.
    """

    def __init__(self, files: loading.ModelFiles, device="cpu", dtype=torch.float32):
        self.files, self.device, self.dtype = files, torch.device(device), dtype
        self.model, self.adapter = loading.build_skeleton(files, dtype)
        self.layers = self.adapter.layer_list(self.model)
        self.layers_path = self.adapter.layers_path(self.model)
        self.before, self.after = loading.non_layer_prefixes(self.model, self.adapter)
        self._loaded: set[str] = set()

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def layer_param_names(self, i: int) -> list[str]:
        return [f"{self.layer_prefix(i)}.{n}" for n, _ in self.layers[i].named_parameters()]

    def layer_numel(self, i: int) -> int:
        return sum(p.numel() for p in self.layers[i].parameters())

    def load_layer(self, i: int, tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
        prefix = self.layer_prefix(i)
        rel = None if tensors is None else {k[len(prefix) + 1:]: v for k, v in tensors.items()}
        return loading.load_module(self.model, self.files, prefix, self.device, self.dtype, rel)

    def unload_layer(self, i: int) -> None:
        loading.unload_module(self.model, self.layer_prefix(i))

    def _ensure(self, prefixes: list[str]) -> None:
        for p in prefixes:
            if p not in self._loaded:
                loading.load_module(self.model, self.files, p, self.device, self.dtype)
                self._loaded.add(p)

    @torch.no_grad()
    def embed(self, input_ids: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict]]:
        """Hidden states entering layer 0, and the keyword arguments each layer is called with.

        The arguments (masks, rotary embeddings, per-layer sliding windows...) are captured from a
        real forward of the model with every layer replaced by a recorder, so no family's calling
        convention is guessed. They are captured for batch size 1 and broadcast over any batch.
        """
        self._ensure(self.before)
        n = self.n_layers
        kwargs: list[dict] = [None] * n  # type: ignore[list-item]
        hidden: list[torch.Tensor] = []
        state = {"first": True}

        class Recorder(nn.Module):
            def __init__(self, i):
                super().__init__()
                self.i = i

            def forward(self, h, *args, **kw):
                if state["first"]:
                    kwargs[self.i] = kw
                    if self.i == n - 1:
                        raise _Stop
                    return h
                hidden.append(h)
                raise _Stop

        saved = list(self.layers)
        for i in range(n):
            self.layers[i] = Recorder(i)
        try:
            try:
                self.model(input_ids=input_ids[0][:1].to(self.device), use_cache=False)
            except _Stop:
                pass
            state["first"] = False
            for ids in input_ids:
                try:
                    self.model(input_ids=ids.to(self.device), use_cache=False)
                except _Stop:
                    pass
        finally:
            for i, layer in enumerate(saved):
                self.layers[i] = layer
        return hidden, kwargs

    @torch.no_grad()
    def nll(self, hidden: list[torch.Tensor], input_ids: list[torch.Tensor]) -> tuple[float, int]:
        """Summed next-token negative log-likelihood (float64) and token count; the window's first
        token is never scored (it is the fixed start token)."""
        self._ensure(self.after)
        total, count = 0.0, 0
        for h, ids in zip(hidden, input_ids):
            for j in range(h.shape[0]):  # one window at a time: logits are seqlen x vocab
                x = h[j:j + 1]
                for p in self.adapter.tail_paths(self.model):
                    x = self.model.get_submodule(p)(x)
                logits = self.model.get_submodule(self.adapter.head)(x)[0, :-1].float()
                target = ids[j, 1:].to(logits.device)
                total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").double().item()
                count += target.numel()
        return total, count


def _check_finite(batches: list[torch.Tensor], where: str) -> None:
    for b in batches:
        if not torch.isfinite(b).all():
            raise FloatingPointError(f"NaN or Inf in activations after {where}")


@torch.no_grad()
def forward(layer: nn.Module, batches: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    return [call_layer(layer, b, kwargs) for b in batches]


@torch.no_grad()
def accumulate_group(layer: nn.Module, modules: dict[str, nn.Linear], names: list[str],
                     batches: list[torch.Tensor], kwargs: dict, acc: HessianAccumulator | None = None,
                     taps: dict | None = None) -> HessianAccumulator:
    """The Hessian of a group of modules sharing one input, over `batches`.

    The layer's forward is cut right after the group's input is seen, so calibrating the first
    modules of a layer costs almost nothing.
    """
    acc = acc or HessianAccumulator(modules[names[0]].in_features, device=batches[0].device)
    hook = input_hook(layer, modules, names[0], acc.add, stop=True, taps=taps)
    try:
        for b in batches:
            run_until_hooks(layer, b, kwargs)
    finally:
        hook.remove()
    return acc


def prune_group(modules: dict[str, nn.Linear], names: list[str], acc: HessianAccumulator,
                spec: PruneSpec, where: str = "", layer: int | None = None) -> dict[str, dict]:
    reports = {}
    H = acc.hessian
    for name in names:
        mod = modules[name]
        try:
            res = prune_with_info(mod.weight.data, H, **spec.kwargs(f"{layer}.{name}"))
        except (ValueError, RuntimeError, FloatingPointError) as e:  # say which module failed
            raise type(e)(f"{where}{name}: {e}") from e
        mod.weight.data = res.weight
        w = res.weight
        reports[name] = {"shape": list(w.shape), "sparsity": (w == 0).float().mean().item(),
                         "error": res.error, "damping": res.damping, "seconds": res.seconds,
                         "tokens": acc.count}
    return reports


@dataclass
class _Open:
    """A loaded layer with what calibrating it needs."""
    layer: nn.Module
    modules: dict[str, nn.Linear]
    taps: dict
    groups: list[list[str]] | None = None
    early: HessianAccumulator | None = None  # first group's Hessian, filled while batches arrive


class SliceRunner:
    """Prunes decoder layers `layer_ids` of `trunk`, in order, over batches pushed into streams.

    hessians_from: "calib" (sequential calibration: every layer sees the outputs of the pruned
    layers before it) or "calib_dense" (every layer's input is the dense model's activation, so
    layers are independent). Either way, inside a layer later groups see the pruned earlier ones.
    store: an OutputDir (or None): finished layers are committed there, and layers already
    committed are loaded from it instead of being solved again.
    """

    def __init__(self, trunk: Trunk, layer_ids: list[int], spec: PruneSpec, kwargs: list[dict],
                 hessians_from: str = "calib", store=None, on_layer=None):
        if hessians_from not in ("calib", "calib_dense"):
            raise ValueError(f"hessians_from must be 'calib' or 'calib_dense', got {hessians_from!r}")
        self.trunk, self.layer_ids, self.spec, self.kwargs = trunk, list(layer_ids), spec, kwargs
        self.hessians_from, self.store, self.on_layer = hessians_from, store, on_layer
        self.streams: dict[str, list[torch.Tensor]] = {s: [] for s in STREAMS}
        self.active: set[str] = set()
        self.reports: list[dict] = []
        self.solved = 0  # layers solved here (not loaded back from the store)
        self.busy = 0.0
        self.done = store.committed() if store is not None else set()
        self._first: _Open | None = None

    def _open(self, i: int, sample: torch.Tensor | None) -> _Open:
        layer = self.trunk.load_layer(i)
        o = _Open(layer, self.trunk.adapter.prunable(layer), self.trunk.adapter.layer_taps(layer))
        if sample is not None:
            o.groups = trace_groups(layer, o.modules, sample, self.kwargs[i], o.taps)
        return o

    def push(self, stream: str, batch: torch.Tensor) -> None:
        """Take one batch; the first layer's first Hessian starts accumulating right away."""
        t0 = time.perf_counter()
        batch = batch.to(self.trunk.device)
        self.streams[stream].append(batch)
        self.active.add(stream)
        first = self.layer_ids[0] if self.layer_ids else None
        if stream == "calib" == self.hessians_from and first is not None and first not in self.done:
            if self._first is None:
                self._first = self._open(first, batch)
            o = self._first
            o.early = accumulate_group(o.layer, o.modules, o.groups[0], [batch], self.kwargs[first], o.early, o.taps)
        self.busy += time.perf_counter() - t0

    @torch.no_grad()
    def dense_outputs(self, stream: str = "calib_dense") -> list[torch.Tensor]:
        """The slice's dense output for a pushed stream, without touching the runner's state.

        Lets a Ray stage hand dense activations downstream *before* it prunes (dense and
        stagewise modes), so that every stage can calibrate at the same time.
        """
        t0 = time.perf_counter()
        out = list(self.streams[stream])
        for i in self.layer_ids:
            layer = self.trunk.load_layer(i)
            out = forward(layer, out, self.kwargs[i])
            self.trunk.unload_layer(i)
        self.busy += time.perf_counter() - t0
        return out

    def run(self) -> list[dict]:
        for i in self.layer_ids:
            t0 = time.perf_counter()
            report = self._layer(i)
            report["seconds"] = time.perf_counter() - t0
            self.busy += report["seconds"]
            self.reports.append(report)
            if self.on_layer:
                self.on_layer(i, report)
        return self.reports

    def _layer(self, i: int) -> dict:
        trunk, kw, s = self.trunk, self.kwargs[i], self.streams
        solve = i not in self.done
        if self._first is not None and i == self.layer_ids[0]:
            o, self._first = self._first, None
        else:
            src = s[self.hessians_from]
            o = self._open(i, src[0] if (solve and src) else None)

        hess_src = s["calib"]
        if "calib_dense" in self.active:
            dense_in = s["calib_dense"]
            s["calib_dense"] = forward(o.layer, dense_in, kw)  # before any module is pruned
            if self.hessians_from == "calib_dense":
                hess_src = dense_in  # the layer's input is dense; its later groups see the pruned earlier ones
        if "eval_dense" in self.active:
            s["eval_dense"] = forward(o.layer, s["eval_dense"], kw)

        if not solve:
            tensors, report = self.store.load_layer(i)
            trunk.unload_layer(i)
            layer = trunk.load_layer(i, tensors)
            report = dict(report, resumed=True)
        else:
            layer, mod_reports = o.layer, {}
            for k, names in enumerate(o.groups):
                if k == 0 and o.early is not None:
                    acc = o.early
                else:
                    acc = accumulate_group(layer, o.modules, names, hess_src, kw, taps=o.taps)
                mod_reports.update(prune_group(o.modules, names, acc, self.spec, f"layer {i} ", i))
                del acc
            report = {"layer": i, "groups": o.groups, "modules": mod_reports,
                      "sparsity": _layer_sparsity(o.modules)}
            if self.store is not None:
                prefix = trunk.layer_prefix(i)
                self.store.commit_layer(i, {f"{prefix}.{n}": p.to(trunk.files.dtypes[f"{prefix}.{n}"])
                                            for n, p in layer.named_parameters()}, report)
            self.solved += 1

        if "calib" in self.active:
            s["calib"] = forward(layer, s["calib"], kw)
            _check_finite(s["calib"], f"layer {i}")
        if "eval_pruned" in self.active:
            s["eval_pruned"] = forward(layer, s["eval_pruned"], kw)
            _check_finite(s["eval_pruned"], f"layer {i}")
        trunk.unload_layer(i)
        return report


def _layer_sparsity(modules: dict[str, nn.Linear]) -> float:
    zeros = sum((m.weight == 0).sum().item() for m in modules.values())
    return zeros / sum(m.weight.numel() for m in modules.values())
