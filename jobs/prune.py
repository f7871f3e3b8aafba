"""Prune a causal LM: `python -m jobs.prune --model PATH --out DIR [options]`.

With no arguments it prunes the built-in SmolLM2-135M with Austen text into ./out/. One process by
default; with --stages K, --mode or --address it runs as Ray stage actors (actors/driver.py).
Bad input ends with a one-line error and exit status 2; nothing is written.
"""
from __future__ import annotations

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nm must look like 2:4, got {text!r}") from None
    return n, m


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m jobs.prune", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF folder (safetensors) or .gguf file; default: built-in SmolLM2-135M")
    p.add_argument("--out", help="output folder or URI (s3://, gs://...); default: out/<model>-<method>-<pattern>")
    p.add_argument("--method", default="multiweight", help="multiweight | sparsegpt | wanda | magnitude | admm (mask search from multiweight's, refitted)")
    pat = p.add_mutually_exclusive_group()
    pat.add_argument("--sparsity", type=float, default=None, help="unstructured sparsity in (0, 1); default 0.5")
    pat.add_argument("--nm", type=_nm, default=None, help="N:M semi-structured pattern, e.g. 2:4 or 4:8")
    p.add_argument("--refit", default="none", help="none | cg | exact: least-squares refit of the kept weights")
    p.add_argument("--allocation", default="uniform",
                   help="uniform | owl: sparsity per layer from its outlier ratio (unstructured only; single process)")
    p.add_argument("--group-size", type=int, default=None, help="multiweight: columns solved jointly")
    p.add_argument("--mask-rule", default=None, help="multiweight N:M: saliency | exact")
    p.add_argument("--calib", help="calibration text: .txt, .jsonl/.json (field text) or .parquet; default: Pride and Prejudice")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128 on GPU, 16 on CPU)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048 on GPU, 512 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", help="evaluation text (same formats); default: Emma")
    p.add_argument("--eval-windows", type=int, default=8, help="non-overlapping evaluation windows; 0 skips evaluation")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, the checkpoint's on CUDA) | float32 | bfloat16 | float16")
    p.add_argument("--stages", type=int, default=None, help="Ray stage actors (default: GPUs in the cluster, or 1)")
    p.add_argument("--mode", default="sequential", help="sequential | stagewise | dense calibration")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else single process)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run of this tool in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def config_from_args(a):
    from pipeline.run import RunConfig

    opts = {}
    if a.group_size is not None:
        opts["group"] = a.group_size
    if a.mask_rule is not None:
        opts["mask_rule"] = a.mask_rule
    sparsity = a.sparsity if a.sparsity is not None or a.nm is not None else 0.5
    pattern = f"{a.nm[0]}of{a.nm[1]}" if a.nm else f"{sparsity:g}"
    model_name = os.path.basename(os.path.normpath(a.model)) if a.model else "smollm2-135m"
    out = a.out or os.path.join("out", f"{model_name}-{a.method}-{pattern}")
    return RunConfig(out=out, model=a.model, method=a.method, sparsity=sparsity, nm=a.nm,
                     refit=None if a.refit == "none" else a.refit, calib=a.calib, nsamples=a.nsamples,
                     seqlen=a.seqlen, seed=a.seed, eval=a.eval, eval_windows=a.eval_windows, device=a.device,
                     dtype=a.dtype, batch_size=a.batch_size, mode=a.mode, stages=a.stages, address=a.address,
                     overwrite=a.overwrite, solver_options=opts, allocation=a.allocation)


def distributed(a) -> bool:
    return bool(a.stages and a.stages > 1) or a.mode != "sequential" or bool(a.address) \
        or bool(os.environ.get("RAY_ADDRESS"))


def summary(report: dict) -> str:
    ppl = report.get("perplexity") or {}
    ppl_txt = f"perplexity dense {ppl['dense']:.2f} -> pruned {ppl['pruned']:.2f}  " if ppl else ""
    return (f"{report['method']} {report['pattern']}: {ppl_txt}sparsity {report['sparsity']['overall']:.4f}  "
            f"{report['seconds']:.1f}s")


def main(argv=None) -> int:
    try:
        a = parser().parse_args(argv)
    except SystemExit as e:  # --help, or a one-line usage error
        return e.code if isinstance(e.code, int) else 2
    try:
        # Bad options fail here, before Ray or any file; device defaults are resolved where the
        # work runs (a Ray driver on a CPU head must not pick CPU defaults for GPU stages).
        cfg = config_from_args(a).validate()
        if distributed(a):
            if cfg.allocation != "uniform":  # its dense pre-pass is wired into the single-process job only
                raise ValueError(f"--allocation {cfg.allocation} runs in the single-process job only; "
                                 "drop --stages/--mode/--address (and RAY_ADDRESS)")
            from actors.driver import run_distributed
            report = run_distributed(cfg, quiet=a.quiet)
        else:
            from pipeline.run import run
            report = run(cfg, quiet=a.quiet)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # every failure is one line unless --debug
        if a.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(summary(report))
    print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
