"""The generic adapter: decoder layers, the matrices a layer multiplies by, and their calibration order.

Nothing here knows a family. A layer's prunable matrices ("units") are found by watching one real
forward: every `F.linear`, `matmul` or `addmm` whose weight operand is a parameter of the layer (or
one expert's slice of a 3-D parameter) is a use of that unit, and its other operand is the unit's
input. That one rule covers `nn.Linear`, GPT-2's `Conv1D` (a transposed weight in `addmm`), Mamba's
`dt_proj` (its weight multiplied directly, no module call) and fused MoE experts (`W[e]` per expert,
fed exactly the tokens the router sent to expert e).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class UnsupportedModel(ValueError):
    pass


class _StopForward(Exception):
    pass


# Leaf module names of routers and expert gates: they choose experts and are never pruned.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "gating")


def is_router(param: str) -> bool:
    owner = param.rpartition(".")[0]
    leaf = owner.rpartition(".")[2] if owner else param
    return leaf in ROUTER_NAMES or leaf.endswith(("_gate", "_router"))


@dataclass(frozen=True)
class Adapter:
    """Names inside a HF causal LM. Empty `layers` means: the largest ModuleList of the model."""
    family: str = "generic"
    layers: str = ""
    # Only units whose owner module's leaf name is here are pruned; empty = every unit.
    prune_only: tuple[str, ...] = ()

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


def tied_owner(p: torch.Tensor) -> int | None:
    """For a parameter tied to (the same tensor as) one stored by another layer: that layer. Set by
    `Trunk.load_layer`; such a weight is pruned once, at the layer that stores it."""
    return getattr(p, "_mwprune_tied", None)


def shared_with(p: torch.Tensor) -> list[int]:
    """The later layers that use this layer's parameter `p` as a tied weight (set by `Trunk.load_layer`)."""
    return getattr(p, "_mwprune_shared_with", [])


def can_pass_on(p: torch.Tensor) -> bool:
    """Whether this layer's tied parameter `p`, if this layer never multiplies it, can be left to the
    later layer that does (its checkpoint tensors feed it alone, so they can move to that layer's
    shard). Set by `Trunk.load_layer`."""
    return getattr(p, "_mwprune_pass_on", False)


def claimable(p: torch.Tensor) -> bool:
    """A tied parameter stored by an earlier layer that left it to the layer that multiplies it
    (Zamba2's adapter slot of a later hybrid layer): this layer prunes it if its forward multiplies
    it. Set by `Trunk.load_layer`."""
    return getattr(p, "_mwprune_claimable", False)


@dataclass
class Unit:
    """One matrix the layer multiplies by: a 2-D parameter, or expert `expert` of a 3-D one.

    `transposed`: stored as (inputs, outputs) (Conv1D, experts used as `x @ W[e]`); learned from
    how the forward uses it. Solvers always see (outputs, inputs).
    """
    name: str
    param: str
    expert: int | None = None
    transposed: bool = False

    def tensor(self, layer: nn.Module) -> torch.Tensor:
        p = layer.get_parameter(self.param)
        return p[self.expert] if self.expert is not None else p

    def weight(self, layer: nn.Module) -> torch.Tensor:
        t = self.tensor(layer)
        return t.T if self.transposed else t

    def set(self, layer: nn.Module, w: torch.Tensor) -> None:
        t = self.tensor(layer)
        t.copy_(w.T if self.transposed else w)


@dataclass
class Plan:
    """How a layer is calibrated: phases in forward order; a phase is a list of groups (units that
    share one input, hence one Hessian). A dense phase is one group, solved before the forward reaches
    the next phase. An expert phase holds one group per expert of the same parameters: all its
    experts see their routed tokens in one forward, and are solved together."""
    units: dict[str, Unit]
    phases: list[list[list[str]]]
    expert_phase: list[bool]
    dense_left: dict[str, str] = field(default_factory=dict)  # layer parameter -> why it stays dense
    # tied parameters this layer stores but never multiplies, left to the later layer that does
    # (layer parameter -> the later layers that share it): neither pruned nor counted here
    tied_later: dict[str, list[int]] = field(default_factory=dict)

    def phase_of(self) -> dict[str, int]:
        return {u: k for k, ph in enumerate(self.phases) for g in ph for u in g}


def candidates(layer: nn.Module, adapter: Adapter) -> tuple[dict[str, Unit], dict[str, str]]:
    """Every matrix of the layer that could be pruned, and the >=2-D weights that never can."""
    units, dense = {}, {}
    convs = {n for n, m in layer.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    for pname, p in layer.named_parameters():
        owner = pname.rpartition(".")[0]
        if p.dim() < 2 or (tied_owner(p) is not None and not claimable(p)):
            continue  # a tied weight stored by another layer is pruned (and counted) there
        if is_router(pname):
            dense[pname] = "router"
        elif owner in convs or p.dim() > 3:
            dense[pname] = "convolution" if owner in convs else f"{p.dim()}-D weight"
        elif adapter.prune_only and owner.rpartition(".")[2] not in adapter.prune_only:
            dense[pname] = "not selected by the family adapter"
        elif p.dim() == 2:
            name = pname[:-len(".weight")] if pname.endswith(".weight") else pname
            units[name] = Unit(name, pname)
        else:
            for e in range(p.shape[0]):
                units[f"{pname}[{e}]"] = Unit(f"{pname}[{e}]", pname, e)
    return units, dense


_LINEAR = {torch.nn.functional.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm,
           torch.Tensor.bmm}
_ADDMM = {torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm}


class WeightUses(TorchFunctionMode):
    """Calls `on_use(unit, x)` whenever the forward multiplies by a unit; x is (..., in_features)."""

    def __init__(self, layer: nn.Module, units: dict[str, Unit], on_use):
        super().__init__()
        self.units, self.on_use = units, on_use
        self.by_ptr: dict[int, list[tuple[Unit, torch.Tensor]]] = {}
        for u in units.values():
            t = u.tensor(layer)
            if t.device.type != "meta":
                self.by_ptr.setdefault(t.data_ptr(), []).append((u, t))

    def _match(self, w, used_out_in: bool) -> Unit | None:
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.device.type == "meta":
            return None
        for u, t in self.by_ptr.get(w.data_ptr(), ()):
            if w.shape == t.shape and w.stride() == t.stride():
                same = True
            elif w.shape == t.shape[::-1] and w.stride() == t.stride()[::-1]:
                same = False
            else:
                continue
            u.transposed = not (used_out_in == same)  # stored (in, out) unless both or neither flip
            return u
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.by_ptr and args:
            hit = None
            if func in _LINEAR and len(args) > 1:
                u = self._match(args[1], True)
                hit = (u, args[0]) if u else None
            elif func in _MATMUL and len(args) > 1:
                a, b = args[0], args[1]
                u = self._match(b, False)
                if u:
                    hit = (u, a)
                else:
                    u = self._match(a, True)
                    hit = (u, b.transpose(-2, -1)) if u and isinstance(b, torch.Tensor) and b.dim() >= 2 else None
            elif func in _ADDMM and len(args) > 2:
                u = self._match(args[2], False)
                hit = (u, args[1]) if u else None
            if hit:
                self.on_use(*hit)
        return func(*args, **kwargs)


class Embeddings:
    """Stands in a captured layer call for the model's input embeddings (Zamba2 hands them to every
    layer): arguments that change with each batch's content, which a per-shape capture cannot hold.
    Such a model's hidden batches carry the embeddings themselves, `cat([h, e], -1)`, and
    `call_layer` puts `e` where the marker is. Compared by type, so it survives pickling (Ray)."""

    def __repr__(self) -> str:
        return "<input embeddings>"


EMBEDDINGS = Embeddings()


def carries_embeddings(call: tuple) -> bool:
    """A call is `(args, kwargs)`, or `(args, kwargs, True)` when the hidden batches carry the
    model's input embeddings beside the hidden state (twice as wide)."""
    return len(call) > 2 and bool(call[2])


def call_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs = call[0], call[1]
    carried = carries_embeddings(call)
    if carried:
        hidden, e = (t.contiguous() for t in hidden.chunk(2, dim=-1))
        args = tuple(e if isinstance(a, Embeddings) else a for a in args)
        kwargs = {k: e if isinstance(v, Embeddings) else v for k, v in kwargs.items()}
    out = layer(hidden, *args, **kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return torch.cat([out, e], dim=-1) if carried else out


def _same_input(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x is y or (x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride())


@torch.no_grad()
def plan_layer(layer: nn.Module, adapter: Adapter, hidden: torch.Tensor, call: tuple[tuple, dict]) -> Plan:
    """Trace one real forward: which units run, in what order, and which share an input."""
    units, dense = candidates(layer, adapter)
    uses: list[tuple[Unit, torch.Tensor]] = []
    with WeightUses(layer, units, lambda u, x: uses.append((u, x))):
        call_layer(layer, hidden, call)
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for u, x in uses:
        for src, names in groups:
            if _same_input(x, src):
                if u.name not in names:
                    names.append(u.name)
                break
        else:
            groups.append((x, [u.name]))
    phases: list[list[list[str]]] = []
    expert_phase: list[bool] = []
    by_param: dict[str, int] = {}  # an expert parameter -> its phase
    for _, names in groups:
        first = units[names[0]]
        if first.expert is None:
            phases.append([names])
            expert_phase.append(False)
            continue
        # Experts of the same parameters form one phase, in the order their first expert ran.
        key = ",".join(sorted({units[n].param for n in names}))
        if key not in by_param:
            by_param[key] = len(phases)
            phases.append([])
            expert_phase.append(True)
        phases[by_param[key]].append(names)
    used = {n for ph in phases for g in ph for n in g}
    later: dict[str, list[int]] = {}
    left: set[str] = set()
    expert_params = {units[n].param for n in used if units[n].expert is not None}
    for name, u in units.items():
        if name in used:
            continue
        if u.expert is not None and u.param in expert_params:
            # An expert the traced batch did not reach: its own group in its parameter's phase; its
            # tokens (if any) arrive during calibration.
            k = next(k for k, ph in enumerate(phases) if expert_phase[k] and u.param in
                     {units[n].param for g in ph for n in g})
            sib = next(units[n] for g in phases[k] for n in g if units[n].param == u.param)
            u.transposed = sib.transposed
            phases[k].append([name])
        elif claimable(u.tensor(layer)):
            left.add(u.param)  # another later layer's: it prunes and counts it
        elif shared_with(u.tensor(layer)) and can_pass_on(u.tensor(layer)):
            later[u.param] = list(shared_with(u.tensor(layer)))
        elif shared_with(u.tensor(layer)):
            users = ", ".join(map(str, shared_with(u.tensor(layer))))
            dense[u.param] = (f"tied: used only by layer {users}, and tied weights are pruned once, "
                              f"by the layer that stores them")
        else:
            dense[u.param] = "never multiplied in a forward pass"
    kept = {n: u for n, u in units.items() if u.param not in dense and u.param not in later and u.param not in left}
    if not kept:
        raise UnsupportedModel(f"no prunable matrices found in {type(layer).__name__}")
    return Plan(kept, phases, expert_phase, dense, later)


def run_until_stop(layer: nn.Module, hidden: torch.Tensor, call) -> None:
    try:
        call_layer(layer, hidden, call)
    except _StopForward:
        pass
