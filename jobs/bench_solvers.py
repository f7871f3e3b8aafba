"""Benchmark the layer solvers on real SmolLM2 layers: `python -m jobs.bench_solvers [--out DIR]`.

Hessians come from the dense model on Pride and Prejudice (every layer sees dense inputs).
For 50%, 2:4 and 4:8 it reports, per method, the geometric mean over layers of
error(method)/error(sparsegpt) and time(method)/time(sparsegpt) (median of --repeats, same
process), plus the multiweight group-size sweep and N:M mask-rule comparison.
`real_problems()` is also what tests/test_solvers.py uses to get real (W, H) pairs.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeline import assets
from pipeline.solvers import HessianAccumulator, prune_with_info

# Default: a spread of depths and one module of each input kind (q/k/v share one input, and
# gate/up); any of MODULES can be asked for.
LAYERS = (1, 15, 29)
MODULES = ("q", "k", "v", "o", "gate", "up", "down")
DEFAULT_MODULES = ("q", "o", "up", "down")
PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
         "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
         "down": "mlp.down_proj"}


class _Stop(Exception):
    pass


def windows(tokenizer, book: str, count: int, seqlen: int) -> torch.Tensor:
    """`count` windows spread evenly over the book, each token 0 (<|endoftext|>) + seqlen-1 tokens."""
    ids = tokenizer(Path(assets.austen(book)).read_text(encoding="utf-8"))["input_ids"]
    step = (len(ids) - seqlen) // max(1, count - 1) if count > 1 else 0
    return torch.tensor([[0] + ids[i * step:i * step + seqlen - 1] for i in range(count)])


@torch.inference_mode()
def real_problems(layers=LAYERS, modules=MODULES, count: int = 32, seqlen: int = 512,
                  book: str = "prideprejudice", batch: int = 8, cache: bool = True):
    """[(name, W, H)] for the given decoder layers and module types of the default model, with
    H = mean X Xᵀ/n (float32) from the dense model's inputs to each module. Cached on disk."""
    layers, modules = tuple(sorted(set(layers))), tuple(m for m in MODULES if m in modules)
    key = f"{'-'.join(map(str, layers))}_{'-'.join(modules)}_{count}x{seqlen}_{book}"
    path = assets.cache_dir() / "bench_solvers" / f"{key}.pt"
    if cache and path.is_file():
        return torch.load(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = windows(AutoTokenizer.from_pretrained(folder), book, count, seqlen)
    base = model.model
    accs, hooks = {}, []
    for i in layers:
        for m in modules:
            lin = base.layers[i].get_submodule(PATHS[m])
            accs[i, m] = HessianAccumulator(lin.in_features)
            hooks.append(lin.register_forward_pre_hook(lambda mod, args, a=accs[i, m]: a.add(args[0])))

    def stop(*_):
        raise _Stop  # nothing deeper is needed
    hooks.append(base.layers[layers[-1]].register_forward_hook(stop))
    for b in range(0, count, batch):
        try:
            base(input_ids=x[b:b + batch])
        except _Stop:
            pass
    for h in hooks:
        h.remove()
    out = [(f"L{i}.{m}", base.layers[i].get_submodule(PATHS[m]).weight.detach().clone(),
            accs[i, m].hessian) for i, m in accs]
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(path)
    return out


PATTERNS = {"50%": {"sparsity": 0.5}, "2:4": {"nm": (2, 4)}, "4:8": {"nm": (4, 8)}}


def variants(pattern: str, exact_ok: bool, sweep: bool = True):
    """(label, method, options) for one pattern; the first is the reference (sparsegpt).
    The sweeps leave out the default (group 128; N:M rule exact), which is the multiweight row."""
    nm = PATTERNS[pattern].get("nm")
    out = [("sparsegpt", "sparsegpt", {}), ("magnitude", "magnitude", {}), ("wanda", "wanda", {}),
           ("multiweight", "multiweight", {}), ("multiweight+cg", "multiweight", {"refit": "cg"}),
           ("sparsegpt+cg", "sparsegpt", {"refit": "cg"}), ("admm+cg", "admm", {"refit": "cg"})]
    if exact_ok:
        out.append(("multiweight+exact", "multiweight", {"refit": "exact"}))
    if sweep and nm is None:
        out += [(f"multiweight group={g}", "multiweight", {"group": g}) for g in (8, 16, 32, 64)]
        out.append(("multiweight group=256 block=256", "multiweight", {"group": 256, "blocksize": 256}))
    elif sweep:
        out += [("multiweight group=m", "multiweight", {"group": nm[1]}),
                ("multiweight group=m rule=saliency", "multiweight", {"group": nm[1], "mask_rule": "saliency"}),
                ("multiweight group=64", "multiweight", {"group": 64}),
                ("multiweight rule=saliency", "multiweight", {"mask_rule": "saliency"})]
    return out


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def bench(problems, patterns=tuple(PATTERNS), repeats: int = 3, exact_max_size: int = 576 * 576,
          sweep: bool = True, log=print, only=None):
    """Per-layer records and per-(pattern, variant) summaries (geometric means vs sparsegpt).
    only: variant labels to run (sparsegpt, the reference, always runs)."""
    records = []
    for name, W, H in problems:
        for pat in patterns:
            exact_ok = W.numel() <= exact_max_size
            base = None
            for label, method, opts in variants(pat, exact_ok, sweep):
                if only and label not in only and label != "sparsegpt":
                    continue
                # the two timings every ratio hangs on get repeats; CPU time on one thread is
                # steady enough for the rest with one run each
                n = repeats if label in ("sparsegpt", "multiweight") else 1
                runs = [prune_with_info(W, H, method, **PATTERNS[pat], **opts) for _ in range(n)]
                rec = {"layer": name, "shape": list(W.shape), "pattern": pat, "variant": label,
                       "error": runs[0].error, "percdamp": runs[0].percdamp,
                       "seconds": statistics.median(r.seconds for r in runs),
                       "cpu_seconds": statistics.median(r.cpu_seconds for r in runs)}
                base = base or rec
                rec["error_ratio"] = rec["error"] / base["error"]
                rec["time_ratio"] = rec["seconds"] / base["seconds"]
                rec["cpu_ratio"] = rec["cpu_seconds"] / base["cpu_seconds"]
                records.append(rec)
            log(f"{name:8s} {pat:4s} sparsegpt {base['seconds']:.2f}s " + "  ".join(
                f"{r['variant'].replace('multiweight', 'mw')} {r['error_ratio']:.3f}/{r['cpu_ratio']:.1f}x"
                for r in records if r["layer"] == name and r["pattern"] == pat and r is not base))
    summary = []
    for pat in patterns:
        labels = dict.fromkeys(r["variant"] for r in records if r["pattern"] == pat)
        for label in labels:
            rs = [r for r in records if r["pattern"] == pat and r["variant"] == label]
            summary.append({"pattern": pat, "variant": label, "layers": len(rs),
                            "error_ratio": geomean([r["error_ratio"] for r in rs]),
                            "time_ratio": geomean([r["time_ratio"] for r in rs]),
                            "cpu_ratio": geomean([r["cpu_ratio"] for r in rs]),
                            "worst_error_ratio": max(r["error_ratio"] for r in rs)})
    return records, summary


def table(summary, patterns) -> str:
    labels = list(dict.fromkeys(s["variant"] for s in summary))
    get = {(s["pattern"], s["variant"]): s for s in summary}
    head = "| variant | " + " | ".join(f"{p} error | {p} cpu | {p} wall" for p in patterns) + " |"
    lines = [head, "|" + " --- |" * (1 + 3 * len(patterns))]
    for label in labels:
        cells = []
        for p in patterns:
            s = get.get((p, label))
            cells += [f"{s['error_ratio']:.3f}" + ("" if s["layers"] == max(
                x["layers"] for x in summary if x["pattern"] == p) else f" (n={s['layers']})"),
                      f"{s['cpu_ratio']:.2f}x", f"{s['time_ratio']:.2f}x"] if s else ["", "", ""]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=list(LAYERS), help="decoder layer indices")
    ap.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES), choices=MODULES)
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--windows", type=int, default=32, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timing repeats (median) of sparsegpt and multiweight; other variants run once")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default); 1 makes CPU time an exact work measure")
    ap.add_argument("--exact-max-size", type=int, default=576 * 576,
                    help="run the exact refit (O(r·c³)) only on layers with at most this many weights")
    ap.add_argument("--no-sweep", action="store_true", help="skip group-size and mask-rule sweeps")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="run only these variants (labels as in the table, e.g. multiweight+cg admm+cg)")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    problems = real_problems(args.layers, args.modules, args.windows, args.seqlen)
    print(f"{len(problems)} layers, Hessians from {args.windows} x {args.seqlen} tokens "
          f"({time.time() - t0:.0f} s); torch threads {torch.get_num_threads()}", flush=True)
    records, summary = bench(problems, args.patterns, args.repeats, args.exact_max_size,
                             not args.no_sweep, log=lambda s: print(s, flush=True), only=args.variants)
    print()
    print("error tr(ΔW H ΔWᵀ), CPU time and wall time relative to sparsegpt; geometric mean over "
          f"layers ({len(problems)}; n= where fewer); sparsegpt and multiweight times are medians of "
          f"{args.repeats} runs")
    print(table(summary, args.patterns))
    print(f"\ntotal {time.time() - t0:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(
            {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
             "threads": torch.get_num_threads(), "summary": summary, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
