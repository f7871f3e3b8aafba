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

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import loading
from .models.generic import (EMBEDDINGS, Plan, WeightUses, _StopForward, call_layer, claimable, plan_layer,
                             run_until_stop, tied_owner)
from .solvers import HessianAccumulator, prune_with_info
from .solvers import blend as blend_mod
from .spread import LocalPool

STREAMS = ("calib", "calib_dense", "eval_dense", "eval_pruned")


@dataclass
class PruneSpec:
    method: str = "multiweight"
    sparsity: float | None = 0.5
    nm: tuple[int, int] | None = None
    refit: str | None = None
    options: dict = field(default_factory=dict)  # extra solver keywords (group size, mask rule, ...)
    module_sparsity: dict | None = None  # "layer.module" -> sparsity, overriding `sparsity` (OWL)
    blend: float | str = 0.0  # --target-blend: α in [0, 1] or "auto" (solvers/blend.py); 0 = off

    @property
    def blending(self) -> bool:
        return self.blend == "auto" or float(self.blend) > 0

    def pattern(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity:g}"

    def kwargs(self, key: str | None = None) -> dict:
        sparsity = (self.module_sparsity or {}).get(key, self.sparsity)
        return dict(method=self.method, sparsity=None if self.nm else sparsity,
                    nm=tuple(self.nm) if self.nm else None, refit=self.refit, **self.options)


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _fake(module: nn.Module, device):
    """Run `module` shape-only: its meta parameters become fake tensors on `device` (no memory),
    inside a FakeTensorMode. transformers skips its data-dependent checks on fake tensors, so the
    model's own code runs unchanged without a single weight loaded."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    swapped = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        for owner in module.modules():
            for store in (owner._parameters, owner._buffers):
                for k, t in list(store.items()):
                    if t is not None and t.device.type == "meta":
                        swapped.append((store, k, t))
                        fake = torch.empty(t.shape, dtype=t.dtype, device=device)
                        store[k] = nn.Parameter(fake, requires_grad=False) if isinstance(t, nn.Parameter) else fake
        try:
            yield
        finally:
            for store, k, t in swapped:
                store[k] = t


class _StandIn(nn.Module):
    """Takes a decoder layer's place in the model's own forward; `fn(i, h, args, kwargs)` returns
    the hidden state the layer hands on, wrapped in the layer's own return structure (a tensor, or a
    tuple whose first element is the hidden state), learned once per layer class by running the real
    layer shape-only (`_fake`)."""

    def __init__(self, i, layer, fn, shapes: dict):
        super().__init__()
        self.i, self.fn, self.shapes = i, fn, shapes
        self._layer = [layer]  # not a submodule: the stand-in owns no parameters

    def forward(self, h, *args, **kwargs):
        out = self.fn(self.i, h, args, kwargs)
        layer = self._layer[0]
        key = type(layer)
        if key not in self.shapes:
            self.shapes[key] = None  # a layer that cannot run shape-only: assume a plain tensor
            try:
                with torch.no_grad(), _fake(layer, h.device):
                    ref = layer(h, *args, **kwargs)
                if isinstance(ref, (tuple, list)):
                    self.shapes[key] = tuple(None if isinstance(v, torch.Tensor) else v for v in ref[1:])
            except Exception:  # noqa: BLE001
                pass
        rest = self.shapes[key]
        return out if rest is None else (out, *rest)


class Trunk:
    """A model skeleton on the meta device plus the code to run parts of it.

    Only what a caller loads is in memory: decoder layers one at a time, the modules that run before
    the layers (embeddings) for `embed`, the ones after them (final norm, head) for `nll`. Both run
    the model's own forward with the layers replaced by stand-ins, so nothing of a family's calling
    convention, embedding scale or logit post-processing (softcapping, scaling) is re-implemented.

    Tied weights between layers (Zamba2's shared transformer blocks): the checkpoint stores them once,
    under one layer (the owner, Zamba2's first user), and that layer prunes them with its Hessians;
    every other layer that uses them gets them as the owner last held them in this process (pruned,
    once it is), else from `tied_source(owner)` (committed checkpoint tensors, e.g. a Ray stage's
    store), else dense from the model files. `dense_tied(i)` swaps in the checkpoint's dense values
    for the dense streams.

    A tied weight the owner never multiplies (Zamba2's adapter slot of a later hybrid layer) is left
    to the later layer that does: the owner neither prunes, counts nor commits it (its report lists
    it under `tied_later`, `note_later`); that layer gets it dense (from the model files), prunes it
    with its own Hessians, counts it, and commits it in its own shard under the input's names
    (`layer_tensors(i, claimed)`), which a resumed run loads back like the rest of that layer.
    """

    tied_source = None  # optional callable: owner layer -> (its committed tensors, its report), or None

    def __init__(self, files: loading.ModelFiles, device="cpu", dtype=torch.float32):
        self.files, self.device, self.dtype = files, torch.device(device), dtype
        self.model, self.adapter = loading.build_skeleton(files, dtype)
        self.layers = self.adapter.layer_list(self.model)
        self.layers_path = self.adapter.layers_path(self.model)
        self._shapes: dict = {}
        self.before, self.after = self._split()
        self._loaded: set[str] = set()
        self._tied_in, self._tied_out = self._ties()
        self._tied_values: dict[str, torch.Tensor] = {}  # checkpoint key -> the owner's values at its last unload
        self._later: dict[int, set[str]] = {}  # owner layer -> its tied parameters (full names) left to later layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def layer_keys(self, i: int) -> list[str]:
        """Checkpoint tensor names of layer i (what its shard holds)."""
        return self.model._mwprune_conversion.keys_for(self.layer_prefix(i))

    def rest_keys(self) -> list[str]:
        """Checkpoint tensor names outside the decoder layers (embeddings, final norm, head...)."""
        inside = {k for i in range(self.n_layers) for k in self.layer_keys(i)}
        return [k for k in self.model._mwprune_conversion.sources if k not in inside]

    def layer_numel(self, i: int) -> int:
        return sum(p.numel() for p in self.layers[i].parameters())

    def _layer_of(self, name: str) -> int | None:
        head = self.layers_path + "."
        if not name.startswith(head):
            return None
        idx = name[len(head):].split(".", 1)[0]
        return int(idx) if idx.isdigit() else None

    def _ties(self) -> tuple[dict, dict]:
        """Parameters of a layer that the checkpoint stores under another layer (tied weights).

        tied_in[i][name] = (owner layer, owner's parameter name, checkpoint keys) for layer i's
        parameter `name`; tied_out[j][owner's name] = the layers that use it besides j."""
        conv, aliases = self.model._mwprune_conversion, self.model._mwprune_aliases
        tied_in: dict[int, dict] = {}
        tied_out: dict[int, dict[str, list[int]]] = {}
        for i in range(self.n_layers):
            prefix = self.layer_prefix(i)
            fed = {t for k in conv.keys_for(prefix) for t in conv.sources[k]}
            for n, _ in self.layers[i].named_parameters(remove_duplicate=False):
                full = f"{prefix}.{n}"
                if full in fed:
                    continue
                alt = next((a for a in aliases.get(full, []) if a in conv.targets), None)
                j = self._layer_of(alt) if alt else None
                if j is None or j == i:
                    continue  # not fed at all (load_module says so), or tied outside the layers
                keys = [k for k, ts in conv.sources.items() if alt in ts]
                tied_in.setdefault(i, {})[full] = (j, alt, keys)
                tied_out.setdefault(j, {}).setdefault(alt, []).append(i)
        # owner parameters whose checkpoint tensors feed them alone: those can move to another shard
        self._movable = {alt for by_alt in tied_out.values() for alt in by_alt
                         if all(set(ts) == {alt} for ts in conv.sources.values() if alt in ts)}
        return tied_in, tied_out

    @property
    def has_ties(self) -> bool:
        return bool(self._tied_out)

    def note_later(self, j: int, params) -> None:
        """Owner layer j's tied parameters (names inside the layer) left to the later layers that multiply them."""
        self._later[j] = {f"{self.layer_prefix(j)}.{n}" for n in (params or ())}

    def later_keys(self, j: int, params) -> set[str]:
        """Checkpoint keys of owner layer j's parameters `params` (names inside the layer)."""
        conv = self.model._mwprune_conversion
        full = {f"{self.layer_prefix(j)}.{n}" for n in params}
        return {k for k, ts in conv.sources.items() if any(t in full for t in ts)}

    def _set_tied(self, i: int, values: dict[str, torch.Tensor]) -> None:
        """Layer i's tied parameters as their own Parameter objects (data shared), marked with their owner."""
        for full, (j, _, _) in self._tied_in.get(i, {}).items():
            q = nn.Parameter(values[full], requires_grad=False)
            q._mwprune_tied = j
            loading._set(self.model, full, q)

    def load_layer(self, i: int, tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
        tied = self._tied_in.get(i, {})
        fetched: dict[int, tuple | None] = {}  # owner -> tied_source's answer, asked once per load
        if tied:  # tied weights as their owner holds them (pruned), where known; the given tensors win
            for j in {j for j, _, keys in tied.values() if any(k not in self._tied_values for k in keys)} - set(self._later):
                # an owner neither run nor loaded here (another stage's): its commit says what it left.
                # (An owner loaded here left its values in _tied_values: a dense pass, which plans
                # nothing, or a run, which noted it.)
                got = self._fetch(j, fetched)
                if got is not None:
                    self.note_later(j, (got[1] or {}).get("tied_later"))
            later = {alt for alt in (a for _, a, _ in tied.values()) if alt in self._later.get(self._layer_of(alt), ())}
            # what an owner left to later layers comes dense, from the model files
            tensors = {**self._owner_values(tied, fetched, skip=later), **(tensors or {})}
        owners = {alt: self.model.get_parameter(alt) for _, alt, _ in tied.values()}
        module = loading.load_module(self.model, self.files, self.layer_prefix(i), self.device, self.dtype, tensors)
        if tied:
            self._set_tied(i, {full: self.model.get_parameter(full).data for full in tied})
            for full, (_, alt, _) in tied.items():
                if alt in later:
                    self.model.get_parameter(full)._mwprune_claimable = True
            for alt, p in owners.items():  # loading fed the owner's names too: put them back as they were
                loading._set(self.model, alt, p)
        for alt, users in self._tied_out.get(i, {}).items():
            q = self.model.get_parameter(alt)
            q._mwprune_shared_with = users
            q._mwprune_pass_on = alt in self._movable
        return module

    def _fetch(self, j: int, fetched: dict) -> tuple | None:
        if j not in fetched:
            fetched[j] = self.tied_source(j) if self.tied_source is not None else None
        return fetched[j]

    def _owner_values(self, tied: dict, fetched: dict, skip=()) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for j, alt, keys in tied.values():
            if alt in skip:
                continue
            for k in keys:
                if k in self._tied_values:
                    out[k] = self._tied_values[k]
                else:
                    got = self._fetch(j, fetched)
                    if got is not None and k in got[0]:
                        out[k] = got[0][k]
        return out

    @contextlib.contextmanager
    def dense_tied(self, i: int):
        """Layer i (loaded) with its tied weights as the checkpoint has them, for dense streams: the
        owner may have pruned them already. A no-op for layers without tied weights."""
        tied = self._tied_in.get(i, {})
        if not tied or any(self.model.get_parameter(f).device.type == "meta" for f in tied):
            yield
            return
        saved = {f: self.model.get_parameter(f) for f in tied}
        owners = {alt: self.model.get_parameter(alt) for _, alt, _ in tied.values()}
        keys = sorted({k for _, _, ks in tied.values() for k in ks})
        self.model._mwprune_conversion.load(self.model, self.files.read(keys), self.device, self.dtype)
        self._set_tied(i, {f: self.model.get_parameter(alt).data for f, (_, alt, _) in tied.items()})
        for alt, p in owners.items():
            loading._set(self.model, alt, p)
        try:
            yield
        finally:
            for f, p in saved.items():
                loading._set(self.model, f, p)

    def layer_tensors(self, i: int, claimed=(), later=()) -> dict[str, torch.Tensor]:
        """Layer i's tensors under the checkpoint's names and layout (per-expert, as on the hub): its
        shard. `claimed`: tied parameters (names inside the layer) an earlier owner left to this layer,
        added under the owner's names; `later`: this layer's own tied parameters left to later layers,
        left out (their shards hold them)."""
        out = loading.module_tensors(self.model, self.layer_prefix(i))
        for k in self.later_keys(i, later):
            out.pop(k, None)
        if claimed:
            tied = self._tied_in.get(i, {})
            mine = {tied[f"{self.layer_prefix(i)}.{n}"][1]: self.model.get_parameter(f"{self.layer_prefix(i)}.{n}").detach()
                    for n in claimed}
            out.update(self.model._mwprune_conversion.revert(self.model, mine))
        return out

    def unload_layer(self, i: int) -> None:
        shared = self._tied_out.get(i)
        if shared and all(self.model.get_parameter(a).device.type != "meta" for a in shared):
            # Kept for the later layers that use them, as the checkpoint would hold them (its dtype),
            # so that they see exactly what a resumed run reads back from the output.
            conv = self.model._mwprune_conversion
            keys = {k for a in shared for k, ts in conv.sources.items() if a in ts}
            for k, v in self.layer_tensors(i).items():
                if k in keys:
                    self._tied_values[k] = v.to(self.files.dtypes.get(k, v.dtype)).clone()
        loading.unload_module(self.model, self.layer_prefix(i))

    def _ensure(self, prefixes: list[str]) -> None:
        for p in prefixes:
            if p not in self._loaded:
                loading.load_module(self.model, self.files, p, self.device, self.dtype)
                self._loaded.add(p)

    def _with_stand_ins(self, fn):
        saved = list(self.layers)
        for i in range(self.n_layers):
            self.layers[i] = _StandIn(i, saved[i], fn, self._shapes)
        return saved

    def _restore(self, saved) -> None:
        for i, layer in enumerate(saved):
            self.layers[i] = layer

    def _split(self) -> tuple[list[str], list[str]]:
        """Modules with weights that run before the layers, and after them, seen in a meta forward."""
        owners = [n for n, m in self.model.named_modules()
                  if n and not (n == self.layers_path or n.startswith(self.layers_path + "."))
                  and any(True for _ in m.parameters(recurse=False))]
        order: list[str] = []
        mark = {"layers": None}
        hooks = [self.model.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: order.append(n)) for n in owners]

        def through(i, h, args, kwargs):
            if mark["layers"] is None:
                mark["layers"] = len(order)
            return h
        saved = self._with_stand_ins(through)
        try:
            with torch.no_grad(), _fake(self.model, self.device):
                self.model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=self.device), use_cache=False)
        except Exception as e:  # noqa: BLE001
            raise loading.ModelFilesError(f"the model's forward cannot be traced ({type(e).__name__}: "
                                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
        finally:
            self._restore(saved)
            for h in hooks:
                h.remove()
        cut = mark["layers"] if mark["layers"] is not None else len(order)
        before = list(dict.fromkeys(order[:cut]))
        after = list(dict.fromkeys(n for n in order[cut:] if n not in before))
        return before, after

    @torch.no_grad()
    def embed(self, input_ids: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """Hidden states entering layer 0, and each layer's call arguments.

        The arguments (masks, rotary embeddings, ALiBi, per-layer sliding windows, positional ones)
        are captured from the model's own forward with every layer replaced by a stand-in, once per
        batch shape, so arguments that depend on the batch size are right for every batch.
        `calls[(batch, seqlen)][i]` is layer i's `(args, kwargs)`.

        An argument equal to the model's input embeddings (Zamba2's `original_hidden_states`) changes
        with each batch's content: it is captured as the `EMBEDDINGS` marker, every call becomes
        `(args, kwargs, True)`, and each hidden batch carries the embeddings beside the hidden state,
        `cat([h, e], -1)`, through every layer (`call_layer`) and every stage, to the head (`nll`).
        """
        self._ensure(self.before)
        n = self.n_layers
        calls: dict = {}
        hidden: list[torch.Tensor] = []
        state: dict = {}

        def is_embeddings(a) -> bool:
            h0 = state["h0"]
            return isinstance(a, torch.Tensor) and a.shape == h0.shape and a.dtype == h0.dtype and torch.equal(a, h0)

        def record(i, h, args, kwargs):
            if i == 0:
                hidden.append(h)
                state["h0"] = h
            if state["key"] in calls:
                raise _Stop  # arguments for this shape are known: layer 0's input is all we need
            if any(is_embeddings(a) for a in (*args, *kwargs.values())):
                args = tuple(EMBEDDINGS if is_embeddings(a) else a for a in args)
                kwargs = {k: EMBEDDINGS if is_embeddings(v) else v for k, v in kwargs.items()}
            state["calls"][i] = (args, kwargs)
            if i == n - 1:
                calls[state["key"]] = state["calls"]
                raise _Stop
            return h
        saved = self._with_stand_ins(record)
        try:
            for ids in input_ids:
                state.update(key=tuple(ids.shape[:2]), calls=[None] * n)
                try:
                    self.model(input_ids=ids.to(self.device), use_cache=False)
                except _Stop:
                    pass
        finally:
            self._restore(saved)
        marked = any(a is EMBEDDINGS for c in calls.values() for args, kw in c for a in (*args, *kw.values()))
        if marked:
            calls = {key: [(args, kw, True) for args, kw in c] for key, c in calls.items()}
            hidden = [torch.cat([h, h], dim=-1) for h in hidden]
        return hidden, calls

    @torch.no_grad()
    def nll(self, hidden: list[torch.Tensor], input_ids: list[torch.Tensor]) -> tuple[float, int]:
        """Summed next-token negative log-likelihood (float64) and token count; the window's first
        token is never scored (it is the fixed start token). Logits come from the model's own forward
        after the last layer (final norm, head, softcapping, scaling): its layers are stand-ins that
        hand on `hidden`, and what runs before them runs on meta, unloaded."""
        emb = self.model.get_input_embeddings()
        emb_name = next((n for n, m in self.model.named_modules() if m is emb), None)
        # Whatever runs before the layers must run, though its result is replaced by `hidden`; the
        # embedding table itself is skipped by passing zero embeddings.
        self._ensure(self.after + [n for n in self.before if n != emb_name])
        width = emb.embedding_dim if hasattr(emb, "embedding_dim") else emb.weight.shape[1]
        cur: dict = {}

        def inject(i, h, args, kwargs):
            if i:
                return h
            x = cur["h"]
            # A stream that carries the input embeddings beside the hidden state (see `embed`) is
            # twice the width the model's own forward hands its layers: the hidden state is the first half.
            return x[..., :h.shape[-1]] if x.shape[-1] == 2 * h.shape[-1] else x
        total, count = 0.0, 0
        saved = self._with_stand_ins(inject)
        try:
            for h, ids in zip(hidden, input_ids):
                for j in range(h.shape[0]):  # one window at a time: logits are seqlen x vocab
                    cur["h"] = h[j:j + 1]
                    dummy = torch.zeros(1, h.shape[1], width, device=self.device, dtype=self.dtype)
                    logits = self.model(inputs_embeds=dummy, use_cache=False).logits[0, :-1].float()
                    target = ids[j, 1:].to(logits.device)
                    total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").double().item()
                    count += target.numel()
        finally:
            self._restore(saved)
        return total, count


def _check_finite(batches: list[torch.Tensor], where: str) -> None:
    for b in batches:
        if not torch.isfinite(b).all():
            raise FloatingPointError(f"NaN or Inf in activations after {where}")


@torch.no_grad()
def forward(layer: nn.Module, batches: list[torch.Tensor], calls: dict, i: int) -> list[torch.Tensor]:
    return [call_layer(layer, b, calls[tuple(b.shape[:2])][i]) for b in batches]


# Experts that the router sends fewer calibration tokens than this are solved with the Hessian
# pooled over every expert of the same parameter in the layer (docs/design.md, "Experts").
MIN_EXPERT_TOKENS = 16


class _Pair:
    """What the blend needs beside a group's Hessian (solvers/blend.py): C over every batch and, for
    auto, the fit batches' H and C and the held-out batches' H, C and dense Gram, all c x c.

    With auto, the group's H and C are the token-weighted merges of their fit and held-out parts
    (`whole`): each product is taken once, not once for the whole and again for a part."""

    def __init__(self, columns: int, device, auto: bool):
        self.cross = blend_mod.CrossAccumulator(columns, device=device)
        self.auto, self.unpaired = auto, 0  # unpaired: routed tokens whose dense input was not found
        if auto:
            self.h_fit = HessianAccumulator(columns, device=device)
            self.c_fit = blend_mod.CrossAccumulator(columns, device=device)
            self.h_held = HessianAccumulator(columns, device=device)
            self.c_held = blend_mod.CrossAccumulator(columns, device=device)
            self.g_held = HessianAccumulator(columns, device=device)

    def add(self, xh: torch.Tensor, x: torch.Tensor | None, held: bool) -> None:
        """xh's rows paired with x's (x None: rows without a dense input, counted in `unpaired`; with
        auto they still enter H, which is built from the parts)."""
        if x is None:
            self.unpaired += xh.reshape(-1, xh.shape[-1]).shape[0]
            if self.auto:
                (self.h_held if held else self.h_fit).add(xh)
            return
        if not self.auto:
            self.cross.add(xh, x)
        elif held:
            self.h_held.add(xh)
            self.c_held.add(xh, x)
            self.g_held.add(x)
        else:
            self.h_fit.add(xh)
            self.c_fit.add(xh, x)

    def whole(self) -> HessianAccumulator:
        """auto: the group's H over every token (fit and held-out parts merged); C likewise, in place."""
        H = HessianAccumulator(self.h_fit.columns, device=self.h_fit.hessian.device)
        H.merge(self.h_fit).merge(self.h_held)
        self.cross = blend_mod.CrossAccumulator(self.c_fit.columns, device=self.c_fit.cross.device)
        self.cross.merge(self.c_fit).merge(self.c_held)
        return H

    def merge(self, other: "_Pair") -> "_Pair":
        self.cross.merge(other.cross)
        self.unpaired += other.unpaired
        if self.auto:
            for k in ("h_fit", "c_fit", "h_held", "c_held", "g_held"):
                getattr(self, k).merge(getattr(other, k))
        return self


@dataclass
class _Blend:
    """One layer's dense-stream side for the blend: per calibration batch, the dense layer's input of
    every dense group (by its first unit's name) and of the routers (by width), and which batches
    auto holds out."""
    alpha: float | str
    dense: list[dict]
    held: set[int]

    @property
    def auto(self) -> bool:
        return self.alpha == "auto"


def _routers(layer: nn.Module) -> list[nn.Module]:
    from .models.generic import is_router
    return [m for n, m in layer.named_modules() if n and is_router(n + ".weight")
            and any(True for _ in m.parameters(recurse=False))]


@contextlib.contextmanager
def _router_inputs(layer: nn.Module, seen: dict):
    """seen[width] = the first router input (tokens x width) of each forward: the MoE block's input,
    whose rows are what each expert receives (the rows the router sent it)."""
    def hook(_, args):
        if args and isinstance(args[0], torch.Tensor):
            x = args[0]
            seen.setdefault(x.shape[-1], x.detach().reshape(-1, x.shape[-1]))
    handles = [m.register_forward_pre_hook(hook) for m in _routers(layer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Tokens:
    """Which token (row of the router's input) each routed row of an expert unit is, in one forward.

    An expert's first matrix receives rows copied from the router's input (the MoE block's input):
    they are found there by their bytes. Its later matrices (down_proj) receive rows in the same
    order, so they take the token indices of that expert's last match in the forward."""

    def __init__(self, routers: dict):
        self.routers, self.index, self.last = routers, {}, {}

    def of(self, u, x: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """(token indices of x's rows or None, whether the rows are the router's input rows)."""
        c, rows = x.shape[-1], x.detach().reshape(-1, x.shape[-1])
        src = self.routers.get(c)
        if src is not None and rows.shape[0]:
            if c not in self.index:
                self.index[c] = _RowIndex(src)
            found = self.index[c].find(rows)
            if found is not None:
                self.last[u.expert] = found
                return found, True
        last = self.last.get(u.expert)
        if last is not None and len(last) == rows.shape[0]:
            return last, False
        return None, False


@torch.no_grad()
def dense_capture(layer: nn.Module, plan: Plan, batches: list[torch.Tensor], calls: dict, i: int
                  ) -> tuple[list[torch.Tensor], list[dict]]:
    """The dense layer's outputs for `batches` (the dense stream) and, per batch, what pairing needs,
    taken in that same forward (no extra forward work): each dense group's input (by its first
    unit's name), the routers' input (by width), and each expert group's input with its tokens
    ("experts": name -> (token indices, rows))."""
    firsts = {g[0] for ph in plan.phases for g in ph}
    outs, caps = [], []
    for b in batches:
        routers: dict = {}
        cap: dict = {"routers": routers, "experts": {}}
        tokens = _Tokens(routers)

        def on_use(u, x):
            if u.expert is not None:
                idx, _ = tokens.of(u, x)  # every expert use: later matrices take the first's tokens
                if u.name in firsts and idx is not None:
                    cap["experts"][u.name] = (idx, x.detach().reshape(-1, x.shape[-1]))
            elif u.name in firsts and u.name not in cap:
                cap[u.name] = x.detach()
        with WeightUses(layer, plan.units, on_use), _router_inputs(layer, routers):
            outs.append(call_layer(layer, b, calls[tuple(b.shape[:2])][i]))
        caps.append(cap)
    return outs, caps


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor) -> torch.Tensor:
    """x's rows as integers of the same width (a view where x is contiguous): equal bytes, equal rows."""
    x = x.detach().reshape(-1, x.shape[-1]).contiguous()
    return x.view(_INT[x.element_size()])


def _keys(bits: torch.Tensor, mult: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """One int64 key per row: a fixed random combination of the row's 16-bit words (each term below
    2^30 x 2^16, so a sum of up to 2^16 words stays inside int64), in chunks of rows to bound the
    int64 copy."""
    out = []
    for r in bits.split(chunk):
        w = r.view(torch.uint8).view(torch.int16).long() & 0xFFFF
        out.append((w * mult).sum(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=bits.device)


class _RowIndex:
    """The rows of a router's input, found again by their bytes (an expert receives exact copies):
    keys sorted once, looked up with searchsorted, a hit counting only where the bytes are equal."""

    def __init__(self, x: torch.Tensor):
        self.bits = _bits(x)
        words = self.bits.shape[1] * self.bits.element_size() // 2
        g = torch.Generator().manual_seed(0)
        self.mult = torch.randint(1, 1 << 30, (words,), generator=g).to(self.bits.device)
        self.keys, self.order = torch.sort(_keys(self.bits, self.mult), stable=True)  # stable: first equal row wins

    def find(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each of x's rows' index among the router input's rows (the first equal one), on the CPU;
        None unless every row is found."""
        q = _bits(x).to(self.bits.device)
        if q.shape[1] != self.bits.shape[1] or q.dtype != self.bits.dtype:
            return None
        k = _keys(q, self.mult)
        pos = torch.searchsorted(self.keys, k).clamp(max=len(self.keys) - 1)
        idx = self.order[pos]
        if bool((self.bits[idx] == q).all()):
            return idx.cpu()
        # a key that different rows share (rare): row by row among the equal keys
        out = []
        for t in range(q.shape[0]):
            n, hit = int(pos[t]), -1
            while n < len(self.keys) and self.keys[n] == k[t]:
                if bool((self.bits[self.order[n]] == q[t]).all()):
                    hit = int(self.order[n])
                    break
                n += 1
            if hit < 0:
                return None
            out.append(hit)
        return torch.tensor(out, dtype=torch.long)


def new_pairs(layer: nn.Module, plan: Plan, k: int, groups: list[int], device, auto: bool) -> list[_Pair]:
    phase, units = plan.phases[k], plan.units
    return [_Pair(units[phase[j][0]].weight(layer).shape[1], device, auto) for j in groups]


# auto keeps α = 0 unless the blend lowers the held-out error by more than this share of the dense
# outputs' energy: below it the scores differ by the rounding of their float64 traces (X̂ = X, as in a
# model's first layer, gives T = W up to rounding), not by anything the blend would fix.
AUTO_MIN_GAIN = 1e-9
# auto scores α on at most about this many of a matrix's rows (every k-th): the score is a sum of
# per-row held-out errors; on all rows its float64 products added 30 CPU s (1.64x instead of 1.38x of
# α = 0) to SparseGPT's 50% job on SmolLM2, for the same choices.
AUTO_ROWS = 128


def choose_alpha(W: torch.Tensor, pair: _Pair, kw: dict) -> tuple[float, dict, float]:
    """auto: the grid's α whose blended weight W_α (its target fitted on the fit batches) has the least
    held-out error ||W_αX̂ - WX||² / n, a parabola in α (blend.heldout_curve; no trial solve), summed
    over every k-th row (at most ~AUTO_ROWS rows). Returns
    α, the scores by α, and the parabola's own minimum over [0, 1] (where the module alone would go)."""
    W = W[::-(-W.shape[0] // AUTO_ROWS)]  # the score is a sum over rows: evenly spaced rows estimate it
    T = blend_mod.target(W, pair.h_fit.hessian, pair.c_fit.cross, kw.get("percdamp", 0.01))
    e0, b, q, energy = blend_mod.heldout_curve(W, T, pair.h_held.hessian, pair.c_held.cross, pair.g_held.hessian)
    scores = {a: e0 + 2 * a * b + a * a * q for a in blend_mod.GRID}
    best = min(scores, key=lambda a: (scores[a], a))
    if scores[0.0] - scores[best] <= AUTO_MIN_GAIN * energy:
        best = 0.0
    optimum = min(1.0, max(0.0, -b / q)) if q > 0 else 0.0
    return best, {f"{a:g}": v for a, v in scores.items()}, optimum


@torch.no_grad()
def accumulate_phase(layer: nn.Module, plan: Plan, k: int, batches: list[torch.Tensor], calls: dict, i: int,
                     accs: list[HessianAccumulator] | None = None,
                     groups: list[int] | None = None, blend: _Blend | None = None,
                     pairs: list[_Pair] | None = None) -> list[HessianAccumulator]:
    """The Hessians of phase k's groups (one per group; only `groups`, indices into the phase, if
    given) over `batches`. With `blend`, also fills `pairs` (one per group, aligned with the
    accumulators): each token's input here paired with the same module's input in the dense layer on
    the dense stream; an expert's tokens are paired through the router input (the expert's rows are
    found among the rows of this forward's router input, and the dense router input's rows at the
    same positions are taken: routing is the pruned stream's, as for H).

    A dense phase stops the layer's forward as soon as its input is seen; an expert phase runs the
    experts (each sees exactly its routed tokens) and stops at the next dense phase's first use.
    """
    phase, units = plan.phases[k], plan.units
    groups = list(range(len(phase))) if groups is None else groups
    if accs is None:
        accs = [HessianAccumulator(units[phase[j][0]].weight(layer).shape[1], device=batches[0].device) for j in groups]
    feeds = {phase[j][0]: n for n, j in enumerate(groups)}  # a group's input is taken at its first unit's use
    where = plan.phase_of()
    expert = plan.expert_phase[k]
    auto = blend is not None and blend.auto

    cur: dict = {}

    def on_use(u, x):
        j = feeds.get(u.name)
        if blend is not None and u.expert is not None:
            tok = cur["tokens"].of(u, x)  # every expert use, so that later matrices know their tokens
        if j is not None:
            if not auto:  # auto builds H from its fit and held-out parts (_Pair.whole)
                accs[j].add(x)
            if blend is not None:
                _pair(j, u, x, tok if u.expert is not None else None)
            if not expert:
                raise _StopForward
        elif expert and where.get(u.name, -1) > k and not plan.expert_phase[where[u.name]]:
            raise _StopForward

    def _pair(j, u, x, tok):
        b = cur["b"]
        held, dense = b in blend.held, blend.dense[b]
        if u.expert is None:
            ok = u.name in dense and dense[u.name].shape == x.shape
            pairs[j].add(x, dense[u.name] if ok else None, held)
            return
        idx, at_router = tok
        rows = x.detach().reshape(-1, x.shape[-1])
        if idx is None:
            pairs[j].add(rows, None, held)
            return
        if at_router:  # the expert's input is the MoE block's input: the dense one at the same tokens
            src = dense["routers"].get(x.shape[-1])
            pairs[j].add(rows, None if src is None else src[idx.to(src.device)], held)
            return
        # A later matrix of the expert (down_proj): the dense expert's input at the tokens the dense
        # router also sent it; a token it did not is paired with itself (target = its own output).
        didx, drows = dense["experts"].get(u.name, (torch.empty(0, dtype=torch.long), None))
        target = rows.clone()
        if len(didx):
            at = torch.full((int(max(didx.max(), idx.max())) + 1,), -1, dtype=torch.long)
            at[didx] = torch.arange(len(didx))  # token -> its row in the dense expert's input
            pos = at[idx]
            hit = pos >= 0
            target[hit.to(target.device)] = drows[pos[hit].to(drows.device)].to(target)
        pairs[j].add(rows, target, held)

    with WeightUses(layer, units, on_use):
        for n, b in enumerate(batches):
            routers: dict = {}
            cur.update(b=n, tokens=_Tokens(routers))
            with _router_inputs(layer, routers) if blend is not None else contextlib.nullcontext():
                run_until_stop(layer, b, calls[tuple(b.shape[:2])][i])
    if auto:
        for n in range(len(accs)):
            accs[n] = pairs[n].whole()
    return accs


# Expert Hessians of one phase held at once, at most (bytes; MWPRUNE_EXPERT_HESSIAN_GB overrides):
# E x c² floats is 52 GB for DeepSeek-V3's 256 experts of 7168 inputs, so experts are calibrated
# in chunks that fit, one forward of the layer per chunk.
EXPERT_HESSIAN_BYTES = 4 << 30


def expert_chunks(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups whose Hessians (`sizes` bytes each) fit `budget` together (one at least)."""
    chunks, cur, used = [], [], 0
    for j, b in enumerate(sizes):
        if cur and used + b > budget:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(j)
        used += b
    return chunks + ([cur] if cur else [])


def prune_experts(layer: nn.Module, plan: Plan, k: int, batches: list[torch.Tensor], calls: dict, i: int,
                  spec: "PruneSpec", where: str = "", pool=None, budget: int | None = None,
                  blend: _Blend | None = None) -> dict[str, dict]:
    """Expert phase k, calibrated and solved chunk by chunk within `budget` bytes of Hessians.

    Chunking changes nothing in the result: an expert's input does not depend on the other experts
    of its phase, so a chunk's Hessians are the same after earlier chunks were pruned; experts below
    the token minimum wait until every chunk has added its tokens to the pooled Hessian."""
    if budget is None:
        budget = int(float(os.environ.get("MWPRUNE_EXPERT_HESSIAN_GB", EXPERT_HESSIAN_BYTES / 2**30)) * 2**30)
    phase, units = plan.phases[k], plan.units
    sizes = [units[g[0]].weight(layer).shape[1] ** 2 * 4 for g in phase]
    pooled: dict[str, HessianAccumulator] = {}
    pooled_pairs: dict[str, _Pair] = {}
    reports: dict[str, dict] = {}
    few: list[tuple[int, HessianAccumulator]] = []
    for chunk in expert_chunks(sizes, budget):
        pairs = None if blend is None else new_pairs(layer, plan, k, chunk, batches[0].device, blend.auto)
        accs = accumulate_phase(layer, plan, k, batches, calls, i, groups=chunk, blend=blend, pairs=pairs)
        for n, (j, acc) in enumerate(zip(chunk, accs)):
            key = units[phase[j][0]].param
            pooled.setdefault(key, HessianAccumulator(acc.columns, device=acc.hessian.device)).merge(acc)
            if pairs is not None:
                pooled_pairs.setdefault(key, _Pair(acc.columns, acc.hessian.device, blend.auto)).merge(pairs[n])
        now = [(n, j, a) for n, (j, a) in enumerate(zip(chunk, accs)) if a.count >= MIN_EXPERT_TOKENS]
        few += [(j, _Count(a.count)) for j, a in zip(chunk, accs) if a.count < MIN_EXPERT_TOKENS]
        del accs
        if now:
            reports.update(prune_phase(layer, plan, k, [a for _, _, a in now], spec, where, i, pool,
                                       groups=[j for _, j, _ in now], pooled={},
                                       blend=blend, pairs=None if pairs is None else [pairs[n] for n, _, _ in now]))
        del now, pairs
    if few:
        reports.update(prune_phase(layer, plan, k, [a for _, a in few], spec, where, i, pool,
                                   groups=[j for j, _ in few], pooled=pooled, blend=blend,
                                   pooled_pairs=pooled_pairs))
    return {name: reports[name] for g in phase for name in g}  # in the plan's order


@dataclass
class _Count:
    """An expert's token count, without its Hessian (it is solved with the pooled one)."""
    count: int


def prune_phase(layer: nn.Module, plan: Plan, k: int, accs: list[HessianAccumulator], spec: PruneSpec,
                where: str = "", index: int | None = None, pool=None, groups: list[int] | None = None,
                pooled: dict | None = None, blend: _Blend | None = None, pairs: list[_Pair] | None = None,
                pooled_pairs: dict | None = None) -> dict[str, dict]:
    """Solve phase k's matrices (only `groups`, indices into the phase, if given; `accs` follow
    them) and write them into `layer`.

    pool: who solves (`spread.LocalPool`, the default, solves here one by one; a Ray stage passes a
    pool that spreads the phase's solves over every stage's device). pooled: the experts' pooled
    Hessians per parameter, for experts with too few tokens (default: pooled over `accs`).
    blend, pairs (aligned with `accs`), pooled_pairs (the fallback's pooled pairs by parameter): solve
    each matrix on (W_α, H) instead of (W, H) (solvers/blend.py); α = 0 passes W itself."""
    phase, units = plan.phases[k], plan.units
    groups = list(range(len(phase))) if groups is None else groups
    phase = [phase[j] for j in groups]
    if pooled is None:
        pooled = {}
        if plan.expert_phase[k]:  # the fallback for experts that got too few tokens
            for n, (g, acc) in enumerate(zip(phase, accs)):
                key = units[g[0]].param
                pooled.setdefault(key, HessianAccumulator(acc.columns, device=acc.hessian.device)).merge(acc)
                if pairs is not None:
                    pooled_pairs = pooled_pairs if pooled_pairs is not None else {}
                    pooled_pairs.setdefault(key, _Pair(acc.columns, acc.hessian.device, blend.auto)).merge(pairs[n])
    todo = []  # (name, accumulator its tokens came from, fallback source or None, pair or None)
    for n, (g, acc) in enumerate(zip(phase, accs)):
        fallback = plan.expert_phase[k] and acc.count < MIN_EXPERT_TOKENS
        src = pooled[units[g[0]].param] if fallback else acc
        pair = None
        if blend is not None:
            pair = pooled_pairs[units[g[0]].param] if fallback else pairs[n]
        todo += [(name, acc, src if fallback else None, pair) for name in g]
    items, blends = [], []
    for name, acc, fb, pair in todo:
        W, H, kw = units[name].weight(layer), (fb or acc).hessian, spec.kwargs(f"{index}.{name}")
        if blend is not None:
            info = _blend_info(W, H, pair, blend, kw)
            if info["blend"]:
                W = blend_mod.blended_weight(W, H, pair.cross.cross, info["blend"], kw.get("percdamp", 0.01))
            blends.append(info)
        items.append((W, H, kw))
    try:
        results = (pool or LocalPool()).solve(items, batch=plan.expert_phase[k])
    except (ValueError, RuntimeError, FloatingPointError) as e:  # say which matrix failed
        name = getattr(e, "item", None)
        label = todo[name][0] if isinstance(name, int) else "/".join(t[0] for t in todo)
        raise type(e)(f"{where}{label}: {e}") from e
    reports = {}
    for n, ((name, acc, fb, _), res) in enumerate(zip(todo, results)):
        u = units[name]
        u.set(layer, res.weight)
        w = res.weight
        reports[name] = {"shape": list(w.shape), "sparsity": (w == 0).float().mean().item(),
                         "error": res.error, "damping": res.damping, "seconds": res.seconds,
                         "tokens": acc.count}
        reports[name]["param"] = u.param  # where it lives in the layer (as transformers loads it)
        if u.expert is not None:
            reports[name]["expert"] = u.expert
        if u.transposed:
            reports[name]["transposed"] = True  # stored (inputs, outputs): Conv1D, x @ W experts
        if fb is not None:
            reports[name]["fallback"] = f"pooled Hessian ({fb.count} tokens): fewer than {MIN_EXPERT_TOKENS} routed"
        if blends:
            reports[name].update(blends[n])  # "error" above is measured against W_α, the weight solved for
    return reports


def _blend_info(W: torch.Tensor, H: torch.Tensor, pair: _Pair, blend: _Blend, kw: dict) -> dict:
    """The α a matrix is solved with, and why (auto: the held-out scores)."""
    if pair.unpaired:
        return {"blend": 0.0, "blend_note": f"{pair.unpaired} routed tokens without a dense-stream input: solved at 0"}
    if not blend.auto:
        return {"blend": float(blend.alpha)}
    if pair.h_held.count == 0 or pair.h_fit.count < MIN_EXPERT_TOKENS:
        return {"blend": 0.0, "blend_note": f"auto: {pair.h_fit.count} fit and {pair.h_held.count} held-out "
                                            f"tokens, too few to choose: solved at 0"}
    a, scores, optimum = choose_alpha(W, pair, kw)
    return {"blend": a, "blend_scores": scores, "blend_optimum": optimum}


@dataclass
class _Open:
    """A loaded layer with what calibrating it needs."""
    layer: nn.Module
    plan: Plan | None = None
    early: list[HessianAccumulator] | None = None  # first phase's Hessians, filled while batches arrive


class SliceRunner:
    """Prunes decoder layers `layer_ids` of `trunk`, in order, over batches pushed into streams.

    hessians_from: "calib" (sequential calibration: every layer sees the outputs of the pruned
    layers before it) or "calib_dense" (every layer's input is the dense model's activation, so
    layers are independent). Either way, inside a layer later phases see the pruned earlier ones.
    store: an OutputDir (or None): finished layers are committed there, and layers already
    committed are loaded from it instead of being solved again.
    calls: per batch shape, each layer's call arguments (`Trunk.embed`).
    pool: who solves each phase's matrices (see `prune_phase`); None: here, one by one.
    """

    def __init__(self, trunk: Trunk, layer_ids: list[int], spec: PruneSpec, calls: dict,
                 hessians_from: str = "calib", store=None, on_layer=None, pool=None):
        if hessians_from not in ("calib", "calib_dense"):
            raise ValueError(f"hessians_from must be 'calib' or 'calib_dense', got {hessians_from!r}")
        self.trunk, self.layer_ids, self.spec, self.calls = trunk, list(layer_ids), spec, calls
        self.hessians_from, self.store, self.on_layer, self.pool = hessians_from, store, on_layer, pool
        self.streams: dict[str, list[torch.Tensor]] = {s: [] for s in STREAMS}
        self.active: set[str] = set()
        self.reports: list[dict] = []
        self.solved = 0  # layers solved here (not loaded back from the store)
        self.busy = 0.0
        self.done = store.committed() if store is not None else set()
        self._first: _Open | None = None
        self.dense_seconds = 0.0  # forwards of the calib_dense stream (the blend's extra forward work)

    def _open(self, i: int, sample: torch.Tensor | None) -> _Open:
        layer = self.trunk.load_layer(i)
        o = _Open(layer)
        if sample is not None:
            o.plan = plan_layer(layer, self.trunk.adapter, sample, self.calls[tuple(sample.shape[:2])][i])
        return o

    def push(self, stream: str, batch: torch.Tensor) -> None:
        """Take one batch; the first layer's first Hessian starts accumulating right away."""
        t0 = time.perf_counter()
        batch = batch.to(self.trunk.device)
        self.streams[stream].append(batch)
        self.active.add(stream)
        first = self.layer_ids[0] if self.layer_ids else None
        # The blend pairs each token with the dense layer's input, captured in _layer: no early start.
        if stream == "calib" == self.hessians_from and first is not None and first not in self.done \
                and not self.spec.blending:
            if self._first is None:
                self._first = self._open(first, batch)
            o = self._first
            if not o.plan.expert_phase[0]:  # experts are calibrated in chunks, later (prune_experts)
                o.early = accumulate_phase(o.layer, o.plan, 0, [batch], self.calls, first, o.early)
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
            with self.trunk.dense_tied(i):  # tied weights as the checkpoint has them, not as pruned
                out = forward(layer, out, self.calls, i)
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
        trunk, calls, s = self.trunk, self.calls, self.streams
        solve = i not in self.done
        if self._first is not None and i == self.layer_ids[0]:
            o, self._first = self._first, None
        else:
            src = s[self.hessians_from]
            o = self._open(i, src[0] if (solve and src) else None)

        hess_src = s["calib"]
        blend = None
        with trunk.dense_tied(i):  # tied weights an earlier layer pruned: dense for the dense streams
            if "calib_dense" in self.active:
                dense_in = s["calib_dense"]
                t0 = time.perf_counter()
                if solve and self.hessians_from == "calib" and self.spec.blending:
                    # Before anything is pruned: the dense stream's output, and each module's dense input.
                    s["calib_dense"], caps = dense_capture(o.layer, o.plan, dense_in, calls, i)
                    n = len(caps)
                    if self.spec.blend == "auto" and n < 2:
                        raise ValueError("--target-blend auto holds out calibration batches: it needs at least 2 "
                                         f"(got {n}; more --nsamples or a smaller --batch-size)")
                    held = set(range(n - max(1, round(n / 4)), n)) if self.spec.blend == "auto" else set()
                    blend = _Blend(self.spec.blend, caps, held)
                else:
                    s["calib_dense"] = forward(o.layer, dense_in, calls, i)  # before anything is pruned
                self.dense_seconds += time.perf_counter() - t0
                if self.hessians_from == "calib_dense":
                    hess_src = dense_in  # the layer's input is dense; its later phases see the pruned earlier ones
            if "eval_dense" in self.active:
                s["eval_dense"] = forward(o.layer, s["eval_dense"], calls, i)

        if not solve:
            tensors, report = self.store.load_layer(i)
            trunk.note_later(i, report.get("tied_later"))
            trunk.unload_layer(i)
            layer = trunk.load_layer(i, tensors)
            report = dict(report, resumed=True)
        else:
            layer, plan, mod_reports = o.layer, o.plan, {}
            trunk.note_later(i, plan.tied_later)  # before any later layer loads
            for k in range(len(plan.phases)):
                if plan.expert_phase[k]:
                    mod_reports.update(prune_experts(layer, plan, k, hess_src, calls, i, self.spec, f"layer {i} ",
                                                     self.pool, blend=blend))
                    continue
                pairs = None
                if blend is not None:
                    pairs = new_pairs(layer, plan, k, list(range(len(plan.phases[k]))), hess_src[0].device, blend.auto)
                accs = o.early if k == 0 and o.early is not None else \
                    accumulate_phase(layer, plan, k, hess_src, calls, i, blend=blend, pairs=pairs)
                o.early = None  # not held through the later phases
                mod_reports.update(prune_phase(layer, plan, k, accs, self.spec, f"layer {i} ", i, self.pool,
                                               blend=blend, pairs=pairs))
                del accs, pairs
            del blend
            report = {"layer": i, "groups": [g for ph in plan.phases for g in ph], "modules": mod_reports,
                      **layer_sparsity(layer, plan)}
            claimed = sorted(u.param for u in plan.units.values() if tied_owner(u.tensor(layer)) is not None)
            if plan.tied_later:
                report["tied_later"] = plan.tied_later
            if claimed:
                report["tied_claimed"] = claimed
            if self.store is not None:
                tensors = trunk.layer_tensors(i, claimed, plan.tied_later)
                self.store.commit_layer(i, {k: v.to(trunk.files.dtypes.get(k, v.dtype)) for k, v in tensors.items()},
                                        report)
            self.solved += 1

        if "calib" in self.active:
            s["calib"] = forward(layer, s["calib"], calls, i)
            _check_finite(s["calib"], f"layer {i}")
        if "eval_pruned" in self.active:
            s["eval_pruned"] = forward(layer, s["eval_pruned"], calls, i)
            _check_finite(s["eval_pruned"], f"layer {i}")
        trunk.unload_layer(i)
        return report


def layer_sparsity(layer: nn.Module, plan: Plan | None) -> dict:
    """Sparsity over every weight of two or more dimensions in the layer (norms and biases aside),
    and the ones that stayed dense, by name, with why and how many weights."""
    zeros = total = 0
    dense: dict[str, dict] = {}
    reasons = plan.dense_left if plan is not None else {}
    mine = {u.param for u in plan.units.values()} if plan is not None else set()
    later = plan.tied_later if plan is not None else {}
    for name, p in layer.named_parameters():
        if p.dim() < 2 or (tied_owner(p) is not None and name not in mine) or name in later:
            continue  # a tied weight is counted once, at the layer that prunes it
        z = (p == 0).sum().item()
        zeros += z
        total += p.numel()
        if name in reasons or z == 0:
            dense[name] = {"reason": reasons.get(name, "no zeros"), "weights": p.numel()}
    return {"sparsity": zeros / total if total else 0.0, "weights": total, "dense_left": dense}
