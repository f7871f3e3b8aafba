"""Layer solvers: prune one linear layer's weight given its input Hessian.

    from pipeline.solvers import prune
    w_new = prune(weight, hessian, method="multiweight", sparsity=0.5)
    w_new = prune(weight, hessian, method="multiweight", nm=(2, 4), refit="cg")

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
from .common import CholeskyError, damped, error
from .hessian import HessianAccumulator

__all__ = ["prune", "prune_with_info", "PruneResult", "HessianAccumulator", "METHODS", "REFITS"]

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
    err = error(W, weight.detach(), hessian.to(dev))
    return PruneResult(W, ~P, err, lam, pd, seconds, cpu, method, pattern, opts.get("refit", refit))


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
