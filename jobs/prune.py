"""Prune a causal LM: `mwprune --model PATH --out DIR [options]` (or `python -m jobs.prune ...`).

With no arguments it prunes the built-in SmolLM2-135M with Austen text into ./out/. One process by
default; with --stages K > 1, --mode stagewise|dense, --address or RAY_ADDRESS it runs as Ray stage
actors (actors/driver.py).
Bad input ends with a one-line error and exit status 2; nothing is written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from pipeline import threads

threads.configure()  # before anything imports torch: OpenMP reads its wait policy once, at load


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except where there is none or the help text already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nm must look like 2:4, got {text!r}") from None
    return n, m


def parser(prog: str = "python -m jobs.prune") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=__doc__.splitlines()[0], formatter_class=_Help)
    p.add_argument("--model", help="HF folder (safetensors), .gguf file, or object-store URI (s3://bucket/model: "
                   "each process reads only the tensors it loads); default: built-in SmolLM2-135M-Instruct")
    p.add_argument("--out", help="output folder or URI (s3://, gs://...); default: out/<model>-<method>-<pattern>, "
                   "then every other option that changes the result (see README)")
    p.add_argument("--method", default="multiweight", help="multiweight | sparsegpt | wanda | magnitude | admm (mask search from multiweight's, refitted)")
    pat = p.add_mutually_exclusive_group()
    pat.add_argument("--sparsity", type=float, default=None, help="unstructured sparsity in (0, 1); default 0.5")
    pat.add_argument("--nm", type=_nm, default=None, help="N:M semi-structured pattern, e.g. 2:4 or 4:8")
    p.add_argument("--refit", default="none", help="none | cg | exact: least-squares refit of the kept weights")
    p.add_argument("--allocation", default="uniform",
                   help="uniform | owl: sparsity per layer from its outlier ratio (unstructured only; single process)")
    p.add_argument("--target-blend", default=None,
                   help="prune toward the dense model's outputs: a blend α in [0, 1] of the dense target into each "
                   "module's own (0 = off: each module fits its own pruned input), or auto (α per module from a "
                   "small grid, chosen on held-out calibration batches); carries a dense activation stream beside "
                   "the pruned one (default auto; 0 for magnitude and wanda without --refit, and in --mode dense)")
    p.add_argument("--group-size", type=int, default=None, help="multiweight: columns solved jointly (default 128)")
    p.add_argument("--mask-rule", default=None, help="multiweight N:M: saliency | exact (default exact)")
    p.add_argument("--calib", help="calibration data: a .txt, .jsonl/.json/.parquet/.arrow file, a datasets folder "
                   "(save_to_disk or data files; FOLDER:SPLIT), any of those on an object store (s3://...), "
                   "or a hub id NAME[:CONFIG][:SPLIT]; default: Pride and Prejudice")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128 on GPU, 16 on CPU)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048 on GPU, 512 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="calibration windows' random draws")
    p.add_argument("--eval", help="evaluation data (same kinds; the whole split is read); default: Emma")
    p.add_argument("--text-field", default="text", help="the text column of .jsonl/.parquet files and datasets")
    p.add_argument("--eval-protocol", default="windows",
                   help="windows (each window starts with a fixed token) | papers (SparseGPT/Wanda WikiText-2 perplexity)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="non-overlapping evaluation windows (default 8; papers: the whole split); 0 skips evaluation")
    p.add_argument("--tasks", default=None,
                   help="lm-eval zero-shot tasks, comma-separated (arc_easy,piqa or task YAML files); "
                   "needs pip install -e .[eval]")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, the checkpoint's on CUDA) | float32 | bfloat16 | float16")
    p.add_argument("--stages", type=int, default=None, help="Ray stage actors (default: GPUs in the cluster, or 1)")
    p.add_argument("--mode", default="sequential", help="sequential | stagewise | dense calibration")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS; without either, "
                   "--stages > 1 or --mode stagewise|dense starts a local Ray cluster; --mode sequential "
                   "alone runs in this process)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run of this tool in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


# Every part of the fingerprint (pipeline.run.fingerprint) and the options that set it: the default
# --out name carries all of them, so two runs that differ in the result never share a default folder.
NAME_PARTS = {"model": ("model",), "method": ("method",), "pattern": ("sparsity", "nm"), "refit": ("refit",),
              "solver_options": ("group_size", "mask_rule"), "mode": ("mode",), "partition": ("stages",),
              "calib": ("calib", "text_field"), "nsamples": ("nsamples", "device"), "seqlen": ("seqlen", "device"),
              "seed": ("seed",), "dtype": ("dtype", "device"), "batch_size": ("batch_size",),
              # the output layout is this version's, and the layer count is the model's
              "layout": (), "n_layers": ("model",), "allocation": ("allocation",), "target_blend": ("target_blend",),
              "tied": ("model",)}


def default_out(a) -> str:
    """out/<model>-<method>-<pattern>, then readable tags for refit, group size, mask rule and mode
    (with the stage count in stagewise mode, where the stage boundaries change the result), then a
    short digest of any other result-changing option not left at its default."""
    model_name = os.path.basename(os.path.normpath(a.model)) if a.model else "smollm2-135m"
    pattern = f"{a.nm[0]}of{a.nm[1]}" if a.nm else f"{a.sparsity if a.sparsity is not None else 0.5:g}"
    name = [model_name, a.method, pattern]
    if a.refit != "none":
        name.append(f"refit-{a.refit}")
    if a.group_size is not None:
        name.append(f"group{a.group_size}")
    if a.mask_rule is not None:
        name.append(f"mask-{a.mask_rule}")
    if getattr(a, "allocation", "uniform") != "uniform":
        name.append(a.allocation)
    blend = _blend_tag(target_blend(a))
    if blend and a.mode != "dense":  # dense mode ignores it (the same weights): the same folder
        name.append(blend)
    if a.mode != "sequential":
        name.append(a.mode)
        if a.mode == "stagewise":
            name.append(f"{a.stages}stages" if a.stages else "stages-auto")
    defaults = parser().parse_args([])
    rest = {k: getattr(a, k) for k in ("calib", "text_field", "nsamples", "seqlen", "seed", "dtype", "batch_size",
                                       "device")
            if getattr(a, k) != getattr(defaults, k)}
    if rest.get("calib"):
        rest["calib"] = os.path.abspath(rest["calib"])
    if rest:
        name.append(hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:8])
    return os.path.join("out", "-".join(name))


def target_blend(a) -> str:
    """--target-blend as given, else its default: auto where the method fits the kept weights (it won
    every row measured, docs/accuracy.md); 0 for magnitude and Wanda without a refit (they never change
    a kept weight: they stay the published baselines) and in dense mode (X̂ = X: nothing to blend)."""
    if a.target_blend is not None:
        return a.target_blend
    return "0" if a.mode == "dense" or (a.method in ("magnitude", "wanda") and a.refit == "none") else "auto"


def _blend_tag(value: str) -> str | None:
    """-blend0.15 / -blendauto; None when off (0) or not a valid value (validate() reports it)."""
    v = str(value).strip().lower()
    if v == "auto":
        return "blendauto"
    try:
        f = float(v)
    except ValueError:
        return None
    return f"blend{f:g}" if 0 < f <= 1 else None


def config_from_args(a):
    from pipeline.run import RunConfig

    opts = {}
    if a.group_size is not None:
        opts["group"] = a.group_size
    if a.mask_rule is not None:
        opts["mask_rule"] = a.mask_rule
    sparsity = a.sparsity if a.sparsity is not None or a.nm is not None else 0.5
    out = a.out or default_out(a)
    return RunConfig(out=out, model=a.model, method=a.method, sparsity=sparsity, nm=a.nm,
                     refit=None if a.refit == "none" else a.refit, calib=a.calib, nsamples=a.nsamples,
                     seqlen=a.seqlen, seed=a.seed, eval=a.eval, eval_windows=a.eval_windows,
                     eval_protocol=a.eval_protocol, text_field=a.text_field, device=a.device,
                     dtype=a.dtype, batch_size=a.batch_size, mode=a.mode, stages=a.stages, address=a.address,
                     overwrite=a.overwrite, solver_options=opts, allocation=a.allocation,
                     target_blend=target_blend(a))


def _ray_blend() -> bool:
    """Whether the Ray driver carries the dense stream for --target-blend."""
    from actors import driver
    return getattr(driver, "BLEND", False)


def distributed(a) -> bool:
    return bool(a.stages and a.stages > 1) or a.mode != "sequential" or bool(a.address) \
        or bool(os.environ.get("RAY_ADDRESS"))


def summary(report: dict) -> str:
    ppl = report.get("perplexity") or {}
    ppl_txt = f"perplexity dense {ppl['dense']:.2f} -> pruned {ppl['pruned']:.2f}  " if ppl else ""
    what = f"{report['method']} {report['pattern']}"
    if report.get("refit"):
        what += f" + refit {report['refit']}"
    if report.get("solver_options"):
        what += " (" + ", ".join(f"{k} {v}" for k, v in sorted(report["solver_options"].items())) + ")"
    tb = report.get("target_blend")
    if tb:
        what += f", target blend {tb['requested']}" + ("" if tb.get("applied") else " (no effect)")
        if tb.get("requested") == "auto" and tb.get("mean_alpha") is not None:
            what += f" (mean α {tb['mean_alpha']:.3f})"
    if report.get("stages", 1) > 1 or report.get("mode", "sequential") != "sequential":
        what += f", {report.get('mode')} on {report.get('stages')} stage{'s' if report.get('stages') != 1 else ''}"
    from pipeline import zeroshot
    return "\n".join([f"{what}: {ppl_txt}sparsity {report['sparsity']['overall']:.4f}  {report['seconds']:.1f}s",
                      *zeroshot.summary(report)])


def local_ray(a) -> bool:
    """Does this command start its own Ray cluster on this machine (no --address, no RAY_ADDRESS)?"""
    return distributed(a) and not a.address and not os.environ.get("RAY_ADDRESS")


def main(argv=None, prog: str = "python -m jobs.prune") -> int:
    try:
        a = parser(prog).parse_args(argv)
    except SystemExit as e:  # --help, or a one-line usage error
        return e.code if isinstance(e.code, int) else 2
    from pipeline.remote import is_uri, redact  # a URI's keys never reach a message or the summary
    try:
        # Bad options fail here, before Ray or any file; device defaults are resolved where the
        # work runs (a Ray driver on a CPU head must not pick CPU defaults for GPU stages).
        cfg = config_from_args(a).validate()
        if a.tasks and cfg.model and is_uri(cfg.model):  # lm-eval's dense run loads report["model"] itself
            raise ValueError("--tasks loads the dense model from a local folder, and --model is an object-store "
                             "URI: run --tasks on a local copy of the model")
        tasks = None  # (names, lm-eval TaskManager)
        if a.tasks:
            from pipeline import zeroshot
            if zeroshot.parse(a.tasks):  # lm-eval there and every task known: checked before any work
                tasks = zeroshot.resolve(zeroshot.parse(a.tasks))
        if distributed(a):
            if cfg.target_blend != 0 and cfg.mode != "dense" and not _ray_blend():
                raise ValueError("--target-blend runs in the single-process job only for now; drop --stages/--mode/"
                                 "--address (and RAY_ADDRESS)")
            if cfg.allocation != "uniform":  # its dense pre-pass is wired into the single-process job only
                raise ValueError(f"--allocation {cfg.allocation} runs in the single-process job only; "
                                 "drop --stages/--mode/--address (and RAY_ADDRESS)")
            from actors.driver import run_distributed
            if local_ray(a):
                # Ray 2.60 turns token authentication on and warns about it on every local start; a
                # cluster that lives only as long as this job has no one else to keep out.
                # RAY_AUTH_MODE=token in the environment keeps it on.
                # The driver says so when it starts the cluster, after the checks that need none.
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            report = run_distributed(cfg, quiet=a.quiet)
        else:
            from pipeline.run import run
            report = run(cfg, quiet=a.quiet)
        if tasks:
            from pipeline.checkpoint import OutputDir
            note = None if a.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
            report = zeroshot.add_to_report(report, OutputDir(cfg.out), tasks, cfg.batch_size, note)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # every failure is one line unless --debug
        if a.debug:
            raise
        msg = redact(str(e).splitlines()[0]) if str(e) else type(e).__name__  # a URI's keys never shown
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(summary(report))
    if report.get("already_complete"):
        print(f"{redact(cfg.out)} already held this run, complete: nothing was done, nothing written")
    else:
        print(f"wrote {redact(cfg.out)}")
    return 0


def cli() -> None:
    """The `mwprune` console command (pyproject [project.scripts])."""
    sys.exit(main(prog="mwprune"))


if __name__ == "__main__":
    sys.exit(main())
