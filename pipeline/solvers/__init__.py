"""Layer solvers: prune one linear layer's weight given its input Hessian.

    from pipeline.solvers import prune
    w_new = prune(weight, hessian, method="multiweight", sparsity=0.5)
    w_new = prune(weight, hessian, method="multiweight", nm=(2, 4), refit="cg")
    results = prune_many(weights, hessians, method="sparsegpt", sparsity=0.5)  # E same-shape layers

weight: r x c (rows = outputs); hessian: c x c, mean X Xᵀ / n over calibration tokens
(see HessianAccumulator). Any float dtype and device; the work is done in float32 (float64 when
either input is float64) on the weight's device; inputs are never modified.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import admm, magnitude, multiweight, refit as refit_mod, sparsegpt, wanda
from .common import CholeskyError, damped, damped_many, diag, report_error
from .hessian import HessianAccumulator

__all__ = ["prune", "prune_with_info", "prune_many", "many_bytes", "PruneResult", "HessianAccumulator", "METHODS",
           "REFITS"]

METHODS = {"magnitude": magnitude.prune, "wanda": wanda.prune, "sparsegpt": sparsegpt.prune,
           "multiweight": multiweight.prune, "admm": admm.prune}
REFITS = (None, "cg", "exact")
RETRIES = 4  # on a failed factorisation, damping x10 up to this many times


@dataclass
class PruneResult:
    weight: torch.Tensor   # pruned weight, same dtype/device as the input
    mask: torch.Tensor     # bool r x c, True = KEPT (pruned entries of `weight` are exact zeros)
    error: float           # tr(ΔW H ΔWᵀ), ΔW = weight - input weight, H the undamped given Hessian
    damping: float         # absolute λ added to diag(H) by the successful attempt
    percdamp: float        # λ / mean(diag H) of that attempt (raised from the request on retries)
    seconds: float         # wall time of the solve (mask, update, refit), not of this bookkeeping
    cpu_seconds: float     # process CPU time of the same span (all threads; robust to a busy box)
    method: str
    pattern: str           # "50%" style for unstructured, "2:4" for N:M, "fixed" for a given mask
    refit: str | None = None


def prune(weight, hessian, method="multiweight", **kw) -> torch.Tensor:
    """Pruned copy of `weight`; arguments as prune_with_info."""
    return prune_with_info(weight, hessian, method, **kw).weight


def prune_with_info(weight: torch.Tensor, hessian: torch.Tensor, method: str = "multiweight", *,
                    sparsity: float | None = None, nm: tuple[int, int] | None = None,
                    refit: str | None = None, mask: torch.Tensor | None = None,
                    percdamp: float = 0.01, blocksize: int | None = None,
                    group: int | None = None, mask_rule: str | None = None,
                    refit_iters: int | None = None) -> PruneResult:
    """Prune one layer.

    Exactly one of `sparsity` (0 < s < 1, unstructured: exactly round(s·r·c) weights pruned) or
    `nm=(n, m)` (n of every m consecutive inputs of each row pruned, c % m == 0), unless a fixed
    `mask` (bool r x c, True = kept) is given, in which case both may be omitted.
    method: "magnitude" (layer-wide smallest |w|), "wanda" (|w|·sqrt(H_jj) per row),
      "sparsegpt", "multiweight" (default), "admm" (mask search from the multiweight mask, always
      refitted, never worse than multiweight + the same refit; see admm.py).
    refit: None, "cg" (batched preconditioned CG, `refit_iters` iterations) or "exact"; for admm
      None means "cg" (its masks are only scored refitted).
    percdamp: λ = percdamp · mean(diag H); a failed Cholesky retries with percdamp x10.
    blocksize (sparsegpt, multiweight, admm; default 128), group and mask_rule (multiweight and
      admm's warm start): group size
      (default multiweight.GROUP, or multiweight.NM_GROUP for N:M, a multiple of m) and the N:M
      mask rule ("exact" or "saliency"; default multiweight.NM_RULE).
    """
    r, c, pattern = _validate(weight, hessian, method, sparsity, nm, refit, mask, percdamp,
                              blocksize, group, mask_rule, refit_iters)
    dev = weight.device
    dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    opts = {}
    if blocksize is not None:
        opts["blocksize"] = blocksize
    if method in ("multiweight", "admm"):
        opts.update(group=group, mask_rule=mask_rule)
    if method == "admm":  # it refits inside (it compares refitted masks), so not again below
        opts.update(refit=refit or "cg", refit_iters=refit_iters)
        refit = None

    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    W0 = weight.detach().to(dtype=dtype, copy=True)
    H = hessian.detach().to(device=dev, dtype=dtype, copy=True)
    # Dead inputs (never active in calibration) carry no information: zero them, as SparseGPT does.
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W0[:, dead] = 0
    pruned = None if mask is None else ~mask.to(dev, torch.bool)
    tries = [percdamp * 10 ** k for k in range(RETRIES + 1)] if percdamp > 0 else \
        [0.0] + [0.01 * 10 ** k for k in range(RETRIES)]
    for pd in tries:
        Hd, lam = damped(H, pd)
        try:
            # Wanda's score uses the undamped diag; the others solve with the damped H.
            if method == "admm":  # it keeps the better of two masks, scored on the undamped H
                opts["hessian"] = H
            W, P = METHODS[method](W0, H if method == "wanda" else Hd, sparsity, nm, pruned, **opts)
            if refit == "cg":
                W = refit_mod.cg(W0, Hd, W, P, **({} if refit_iters is None else {"iters": refit_iters}))
            elif refit == "exact":
                W = refit_mod.exact(W0, Hd, W, P)
        except CholeskyError:
            continue
        if bool(torch.isfinite(W).all()):
            break
    else:
        raise RuntimeError(f"{method}: factorisation failed or gave non-finite weights even with "
                           f"percdamp={tries[-1]:g}; is the Hessian finite and positive semidefinite?")
    W = W.masked_fill_(P, 0).to(weight.dtype)
    _sync(dev)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    del W0, H, Hd  # the solve's copies (2 c² for H alone) are not held while the error is formed
    opts.pop("hessian", None)
    err = report_error(W, weight.detach(), hessian.to(dev))
    return PruneResult(W, ~P, err, lam, pd, seconds, cpu, method, pattern, opts.get("refit", refit))


def prune_many(weights, hessians, method: str = "multiweight", *, sparsity: float | None = None,
               nm: tuple[int, int] | None = None, refit: str | None = None, mask=None,
               percdamp: float = 0.01, blocksize: int | None = None, group: int | None = None,
               mask_rule: str | None = None, refit_iters: int | None = None) -> list[PruneResult]:
    """Prune E layers of one shape, each with its own Hessian (MoE experts), in batched calls.

    weights: E x r x c tensor or a list of E r x c tensors (same shape, dtype, device); hessians:
    E x c x c or a list of c x c; mask (optional): E x r x c bool or a list. Other arguments as
    prune_with_info. Result e is prune_with_info(weights[e], hessians[e], ...)'s: the same
    validation (a bad item raises its ValueError, prefixed "item e: "), dead columns, damping,
    masks, and the same `error`, `damping` and `percdamp`. Weights and masks equal the one-at-a-time
    call's bit for bit for magnitude, wanda and sparsegpt (refit None or cg; measured on CPU, where
    a batched product rounds as the 2-D one); multiweight and refit "exact" stack the rows of all
    items into their row solves, padded to a common size, which rounds differently where rows
    prune different counts (unstructured: ~1e-14 relative in float64, ~1e-6 in float32; masks
    were equal in every test and in the benchmark's 64-expert layer).
    An item whose Cholesky fails at the requested damping, or whose weights come out non-finite, is
    solved alone by prune_with_info (so it retries with more damping exactly as there); a failure
    inside the batch that cannot be traced to one item solves every item alone. admm is not
    batched (a loop of prune_with_info).

    `seconds` and `cpu_seconds` of the items solved together are the batch's time divided by the
    number of those items. Their weight and mask are views into one E x r x c tensor each.

    Memory: the call holds every item's copies and workspace at once, about E · many_bytes(...)
    beyond the inputs (chunk the items to fit; the calls are independent).
    """
    W_in = _items(weights, "weights")
    H_in = _items(hessians, "hessians")
    M_in = None if mask is None else _items(mask, "mask")
    E = len(W_in)
    if len(H_in) != E or (M_in is not None and len(M_in) != E):
        raise ValueError(f"{E} weights but {len(H_in)} hessians"
                         + ("" if M_in is None else f" and {len(M_in)} masks"))
    if E == 0:
        return []
    pattern = None
    for e in range(E):
        try:
            _, _, pattern = _validate(W_in[e], H_in[e], method, sparsity, nm, refit,
                                      None if M_in is None else M_in[e], percdamp, blocksize, group,
                                      mask_rule, refit_iters)
        except ValueError as err:
            raise ValueError(f"item {e}: {err}") from err
        if W_in[e].shape != W_in[0].shape or W_in[e].dtype != W_in[0].dtype \
                or W_in[e].device != W_in[0].device:
            raise ValueError(f"item {e}: weight {_desc(W_in[e])} on {W_in[e].device}, but item 0 is "
                             f"{_desc(W_in[0])} on {W_in[0].device}; batch layers of one shape, "
                             f"dtype and device")
    kw = dict(sparsity=sparsity, nm=nm, refit=refit, percdamp=percdamp, blocksize=blocksize,
              group=group, mask_rule=mask_rule, refit_iters=refit_iters)

    def alone(e):
        return prune_with_info(W_in[e], H_in[e], method, mask=None if M_in is None else M_in[e], **kw)

    if method == "admm":  # its mask search keeps per-layer state (rho schedule, stopping): a loop
        return [alone(e) for e in range(E)]

    weight = W_in[0]
    dev = weight.device
    dtype = torch.float64 if torch.float64 in (weight.dtype, *(h.dtype for h in H_in)) else torch.float32
    opts = {}
    if blocksize is not None:
        opts["blocksize"] = blocksize
    if method == "multiweight":
        opts.update(group=group, mask_rule=mask_rule)

    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    W0 = torch.stack([w.detach() for w in W_in]).to(dtype=dtype)
    H = torch.stack([h.detach().to(device=dev, dtype=dtype) for h in H_in])
    dead = diag(H) == 0  # as prune_with_info: dead inputs zeroed
    diag(H)[dead] = 1
    W0.masked_fill_(dead.unsqueeze(-2), 0)
    pruned = None if M_in is None else ~torch.stack([m.to(dev, torch.bool) for m in M_in])
    pd = percdamp if percdamp > 0 else 0.0  # prune_with_info's first try
    Hd, lams = damped_many(H, pd)
    ok = torch.ones(E, dtype=torch.bool, device=dev)
    if method in ("sparsegpt", "multiweight") or refit == "exact":
        ok = torch.linalg.cholesky_ex(Hd).info == 0  # the items that would retry: solved alone
    sel = ok.nonzero().squeeze(1)
    out: list[PruneResult | None] = [None] * E
    if len(sel):
        if len(sel) < E:
            W0, H, Hd = W0[sel], H[sel], Hd[sel]
            pruned = None if pruned is None else pruned[sel]
        try:
            W, P = METHODS[method](W0, H if method == "wanda" else Hd, sparsity, nm, pruned, **opts)
            if refit == "cg":
                W = refit_mod.cg(W0, Hd, W, P, **({} if refit_iters is None else {"iters": refit_iters}))
            elif refit == "exact":
                W = refit_mod.exact(W0, Hd, W, P)
        except CholeskyError:  # not traceable to one item: every item alone
            W = None
        if W is not None:
            finite = torch.isfinite(W).flatten(1).all(1).tolist()
            W = W.masked_fill_(P, 0).to(weight.dtype)
            _sync(dev)
            n = len(sel)
            seconds, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
            del W0, H, Hd  # as prune_with_info: not held while the errors are formed
            for j, e in enumerate(sel.tolist()):
                if finite[j]:
                    err = report_error(W[j], W_in[e].detach(), H_in[e].to(dev))
                    out[e] = PruneResult(W[j], ~P[j], err, lams[e], pd, seconds, cpu, method,
                                         pattern, refit)
    return [r if r is not None else alone(e) for e, r in enumerate(out)]


def many_bytes(r: int, c: int, method: str = "multiweight", *, nm: tuple[int, int] | None = None,
               refit: str | None = None, dtype: torch.dtype = torch.float32,
               blocksize: int | None = None, group: int | None = None) -> int:
    """Estimated peak workspace of prune_many per item (bytes), for choosing how many r x c items
    (experts) to solve in one call: E items take about E times this beyond the inputs.

    Counted in words of the working dtype (float32, or float64): the Hessian's copy, its damped
    copy and up to three factors while the inverse factor is formed (5c²; 2c² for magnitude and
    wanda, which factor nothing unless refit="exact"); weight copies, updates,
    scores and sort indices (8rc); multiweight's padded row systems per bucket (r·b²/4, b the
    group/block width) and, at N:M, its table of pattern inverses (c·C(m, n)·m); cg's vectors (7rc).
    An upper bound of the peaks measured by `python -m jobs.bench_moe --memory`. admm is solved one
    item at a time (its own workspace, not counted here)."""
    words = (5 if method in ("sparsegpt", "multiweight") or refit == "exact" else 2) * c * c + 8 * r * c
    if method == "multiweight":
        b = min(blocksize or multiweight.GROUP, group or multiweight.GROUP, c)
        words += r * b * b // 4
        if nm is not None:
            words += c * math.comb(nm[1], nm[0]) * nm[1]
    if refit == "cg":
        words += 7 * r * c
    return words * (8 if dtype == torch.float64 else 4)


def _items(x, name):
    if isinstance(x, torch.Tensor):
        if x.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor (items first) or a list, got {_desc(x)}")
        return list(x.unbind(0))
    if isinstance(x, (list, tuple)):
        return list(x)
    raise ValueError(f"{name} must be a 3-D tensor or a list of tensors, got {_desc(x)}")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _desc(x):
    return f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _validate(weight, hessian, method, sparsity, nm, refit, mask, percdamp, blocksize, group,
              mask_rule, refit_iters):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if refit not in REFITS:
        raise ValueError(f"unknown refit {refit!r}; choose None, 'cg' or 'exact'")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor, got "
                         f"{_desc(weight)}")
    r, c = weight.shape
    if r == 0 or c == 0:
        raise ValueError(f"weight shape {tuple(weight.shape)} is empty")
    if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point() \
            or tuple(hessian.shape) != (c, c):
        raise ValueError(f"hessian must be a float {c} x {c} tensor (weight has {c} columns), "
                         f"got {_desc(hessian)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian contains NaN or Inf")
    if sparsity is not None and nm is not None:
        raise ValueError(f"give sparsity or nm, not both (sparsity={sparsity!r}, nm={nm!r})")
    if sparsity is None and nm is None and mask is None:
        raise ValueError("give one of sparsity (0 < s < 1) or nm=(n, m) (or a fixed mask)")
    pattern = "fixed"
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
                or not 0 < sparsity < 1 or math.isnan(sparsity):
            raise ValueError(f"sparsity must be a number with 0 < s < 1, got {sparsity!r}")
        pattern = f"{100 * sparsity:g}%"
    if nm is not None:
        if not isinstance(nm, (tuple, list)) or len(nm) != 2 \
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in nm):
            raise ValueError(f"nm must be a pair of ints (n, m), got {nm!r}")
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"nm=({n}, {m}) needs 0 < n < m")
        if c % m:
            raise ValueError(f"nm=({n}, {m}): the {c} input columns are not a multiple of m={m}")
        pattern = f"{n}:{m}"
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
                or tuple(mask.shape) != (r, c):
            raise ValueError(f"mask must be a bool {r} x {c} tensor (True = kept), got "
                             f"{_desc(mask)}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) \
            or not 0 <= percdamp < math.inf:
        raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
    for name, v in (("blocksize", blocksize), ("group", group), ("refit_iters", refit_iters)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if blocksize is not None and method not in ("sparsegpt", "multiweight", "admm"):
        raise ValueError(f"blocksize={blocksize!r} does not apply to method {method!r}")
    if (group is not None or mask_rule is not None) and method not in ("multiweight", "admm"):
        raise ValueError(f"group/mask_rule (group={group!r}, mask_rule={mask_rule!r}) apply only "
                         f"to methods 'multiweight' and 'admm', not {method!r}")
    if mask_rule is not None and mask_rule not in multiweight.RULES:
        raise ValueError(f"unknown mask_rule {mask_rule!r}; choose one of {multiweight.RULES}")
    if mask_rule == "exact" and nm is not None and math.comb(nm[1], nm[0]) > multiweight.MAX_PATTERNS:
        raise ValueError(f"mask_rule='exact' with nm={tuple(nm)}: {math.comb(nm[1], nm[0])} patterns "
                         f"is more than {multiweight.MAX_PATTERNS}; use mask_rule='saliency'")
    if nm is not None and mask is None and group is not None and group % nm[1]:
        raise ValueError(f"group={group} with nm={tuple(nm)}: an N:M group must be a multiple of m")
    if refit_iters is not None and refit != "cg" and not (method == "admm" and refit is None):
        raise ValueError(f"refit_iters={refit_iters!r} needs refit='cg', got refit={refit!r}")
    return r, c, pattern
