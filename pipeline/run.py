"""One pruning run, end to end, in this process: data -> slice of all layers -> perplexity -> output.

The Ray driver (actors/driver.py) reuses `prepare`, `fingerprint` and `finish` and replaces only
the middle (one slice here, K stages there).
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import allocation, assets, data, determinism, loading, remote, threads
from .calibrate import PruneSpec, SliceRunner, Trunk
from .checkpoint import OutputDir
from .models.generic import candidates

METHODS = ("multiweight", "sparsegpt", "wanda", "magnitude", "admm")
MODES = ("sequential", "stagewise", "dense")


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    out: str
    model: str | None = None          # HF folder or .gguf file; None = built-in SmolLM2-135M
    method: str = "multiweight"
    sparsity: float | None = 0.5
    nm: tuple[int, int] | None = None
    refit: str | None = None
    calib: str | None = None          # file, dataset folder[:SPLIT] or hub NAME[:CONFIG][:SPLIT]; None = Pride and Prejudice
    nsamples: int | None = None       # None = 128 on CUDA, 16 on CPU
    seqlen: int | None = None         # None = 2048 on CUDA, 512 on CPU
    seed: int = 0
    eval: str | None = None           # same kinds as calib; None = Emma
    eval_windows: int | None = None   # None = 8 (windows protocol) or the whole split (papers); 0 = no evaluation
    eval_protocol: str = "windows"    # windows | papers (SparseGPT/Wanda WikiText-2 perplexity)
    text_field: str = "text"          # the text column of record and dataset sources
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 4
    mode: str = "sequential"
    stages: int | None = None
    address: str | None = None
    overwrite: bool = False
    solver_options: dict = field(default_factory=dict)
    allocation: str = "uniform"       # sparsity per layer: uniform or owl (pipeline/allocation.py)
    target_blend: float | str = 0.0   # prune toward the dense model's outputs: α in [0, 1] or "auto"

    def validate(self) -> "RunConfig":
        """Check the options that need no machine facts; every problem is one ConfigError."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.refit not in (None, "cg", "exact"):
            raise ConfigError(f"unknown refit {self.refit!r}; choose none, cg or exact")
        if self.nm is not None:
            n, m = self.nm
            if not (0 < n < m):
                raise ConfigError(f"bad N:M pattern {n}:{m}: need 0 < N < M")
            self.sparsity = None
        elif self.sparsity is None or not (0 < self.sparsity < 1):
            raise ConfigError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.allocation not in allocation.ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.allocation!r}; choose uniform or owl")
        if self.allocation == "owl" and self.nm is not None:
            raise ConfigError("--allocation owl needs unstructured --sparsity, not an N:M pattern")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose auto, float32, bfloat16 or float16")
        if self.eval_protocol not in data.EVAL_PROTOCOLS:
            raise ConfigError(f"unknown eval protocol {self.eval_protocol!r}; choose {' or '.join(data.EVAL_PROTOCOLS)}")
        self.target_blend = parse_blend(self.target_blend)
        if self.eval_windows is not None and self.eval_windows < 0:
            raise ConfigError(f"--eval-windows must be >= 0, got {self.eval_windows}")
        return self

    def resolve(self) -> "RunConfig":
        """Validate and fill the defaults that depend on this machine's device."""
        self.validate()
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but torch sees no CUDA device")
        gpu = self.device == "cuda"
        # The literature's 128 x 2048 is a GPU default; on a 2-core CPU the default must run in minutes.
        self.nsamples = self.nsamples if self.nsamples is not None else (128 if gpu else 16)
        self.seqlen = self.seqlen if self.seqlen is not None else (2048 if gpu else 512)
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.seqlen < 2:
            raise ConfigError(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.eval_windows is None and self.eval_protocol == "windows":
            self.eval_windows = 8
        return self


def parse_blend(value) -> float | str:
    """--target-blend: "auto" or a number in [0, 1] (a float; ConfigError otherwise)."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"--target-blend must be a number in [0, 1] or auto, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"--target-blend must be a number in [0, 1] or auto, got {value!r}")
    return float(value)


def blending(cfg: "RunConfig") -> bool:
    return cfg.target_blend == "auto" or cfg.target_blend > 0


ONE_BATCH = ("--target-blend auto holds one calibration batch out to choose α, so it needs at least 2 "
             "(got 1: more --nsamples or a smaller --batch-size); solved with α = 0")


def blend_plan(cfg: "RunConfig", n_batches: int) -> tuple[float | str, str | None]:
    """The blend the solvers get, and why it is not what was asked (None when it is)."""
    if not blending(cfg):
        return 0.0, None
    if cfg.mode == "dense":  # X̂ = X there, so the blended target is the plain one
        return 0.0, DENSE_NOOP.removeprefix("warning: ")
    if cfg.target_blend == "auto" and n_batches < 2:
        return 0.0, ONE_BATCH
    return cfg.target_blend, None


def model_folder(model: str | None) -> Path | str:
    """A local HF folder, or the URI itself for a model on an object store (pipeline/remote.py)."""
    if model is None:
        return assets.default_model_dir()
    if remote.is_uri(model):
        if model.split("?")[0].endswith(".gguf"):
            raise ConfigError(f"a .gguf --model must be a local file; got {remote.redact(model)}")
        return model
    path = Path(model)
    if not path.exists():
        raise ConfigError(f"model not found: {model}")
    if path.is_file() and path.suffix == ".gguf":
        # GGUF is dequantized once into a safetensors folder in the cache, keyed by file identity.
        st = path.stat()
        key = f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
        try:
            return assets.gguf_to_hf(path, assets.cache_dir() / "gguf" / key)
        except Exception as e:  # noqa: BLE001 - any reader failure is one bad-input message
            raise ConfigError(f"unreadable GGUF model {model}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if path.is_file():
        raise ConfigError(f"--model must be a HF folder or a .gguf file, got {model}")
    return path


def run_dtype(cfg: RunConfig, files: loading.ModelFiles) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if cfg.device == "cpu":
        return torch.float32  # half precision matmuls are slow and lossy on CPU
    d = getattr(files.config, "dtype", None) or getattr(files.config, "torch_dtype", None)
    d = getattr(torch, d) if isinstance(d, str) else d
    return d if d in (torch.float16, torch.bfloat16) else torch.float32


def precheck(cfg: RunConfig) -> tuple[loading.ModelFiles, "Trunk"]:
    """What `prepare` would refuse that costs no tokenizing and no reading of weights or texts: the
    options, the model folder and its architecture, --seqlen against its positions, the data paths,
    the N:M pattern against every pruned matrix, and an --out that is not a run of this tool.
    Returns the model's files and a meta-device skeleton (names and shapes only). For the Ray
    driver, which runs it before it starts or joins a cluster, so bad input costs no cluster."""
    cfg.validate()
    folder = model_folder(cfg.model)
    files = loading.ModelFiles(folder)
    loading.get_adapter(files.config)  # unsupported architectures
    max_pos = getattr(files.config, "max_position_embeddings", None)
    if cfg.seqlen is not None and max_pos is not None and cfg.seqlen > max_pos:
        raise ConfigError(f"--seqlen {cfg.seqlen} is beyond the model's {max_pos} positions")
    for src in (cfg.calib, cfg.eval if cfg.eval_windows != 0 else None):
        if src:
            data.check_source(src)
    skeleton = Trunk(files, "cpu")  # meta device
    check_pattern(skeleton, PruneSpec(cfg.method, cfg.sparsity, tuple(cfg.nm) if cfg.nm else None, cfg.refit,
                                      dict(cfg.solver_options)))
    OutputDir(cfg.out).check_ours()
    return files, skeleton


@dataclass
class Prepared:
    cfg: RunConfig
    files: loading.ModelFiles
    spec: PruneSpec
    calib: torch.Tensor          # nsamples x seqlen token ids
    evalw: torch.Tensor | None   # evaluation windows x seqlen token ids
    calib_protocol: dict
    eval_protocol: dict | None
    dtype: torch.dtype
    blend_why: str | None = None  # why the solvers do not get the --target-blend asked for (blend_plan)


def prepare(cfg: RunConfig, files: loading.ModelFiles | None = None) -> Prepared:
    """`files`: the model, when the caller has opened it already (its headers are not read twice)."""
    from transformers import AutoTokenizer

    cfg.resolve()
    files = files or loading.ModelFiles(model_folder(cfg.model))
    folder = files.folder  # for a remote model: the cache folder of its config and tokenizer files
    loading.get_adapter(files.config)  # unsupported architectures fail before any work
    max_pos = getattr(files.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.seqlen > max_pos:
        raise ConfigError(f"--seqlen {cfg.seqlen} is beyond the model's {max_pos} positions")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"no usable tokenizer in {files.source}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    first, first_tok = data.first_token_id(tok)
    docs = data.load_documents(cfg.calib or assets.austen(assets.DEFAULT_CALIB), cfg.text_field, "calib")
    calib = data.document_windows(docs, tok, cfg.nsamples, cfg.seqlen, cfg.seed, first)
    how = (f"random offsets, seed {cfg.seed}" if len(docs) == 1 else
           f"C4 style: a random document of at least {cfg.seqlen} tokens, a random offset in it, seed {cfg.seed}")
    calib_protocol = {**data.protocol(docs.source, cfg.nsamples, cfg.seqlen, first_tok, how), **docs.describe()}
    evalw, eval_protocol = None, None
    if cfg.eval_windows != 0:
        docs = data.load_documents(cfg.eval or assets.austen(assets.DEFAULT_EVAL), cfg.text_field, "eval")
        text = data.joined_text(docs)
        if cfg.eval_protocol == "windows":
            evalw = data.eval_windows(data.tokenize(tok, text), cfg.eval_windows, cfg.seqlen, first)
            eval_protocol = data.protocol(docs.source, len(evalw), cfg.seqlen, first_tok,
                                          "first non-overlapping windows from the start of the text")
        else:
            evalw = data.papers_windows(tok, text, cfg.seqlen, cfg.eval_windows)
            eval_protocol = data.protocol(docs.source, len(evalw), cfg.seqlen, None,
                                          "the split's texts joined with \\n\\n, tokenized once with the "
                                          "tokenizer's special tokens, cut into non-overlapping windows; "
                                          "each window's first token is not scored (SparseGPT, Wanda)")
        eval_protocol = {"protocol": cfg.eval_protocol, **eval_protocol, **docs.describe(),
                         "tokens_scored": len(evalw) * (cfg.seqlen - 1)}
    blend, why = blend_plan(cfg, len(data.batches(calib, cfg.batch_size)))
    spec = PruneSpec(cfg.method, cfg.sparsity, tuple(cfg.nm) if cfg.nm else None, cfg.refit, dict(cfg.solver_options),
                     blend=blend)
    return Prepared(cfg, files, spec, calib, evalw, calib_protocol, eval_protocol, run_dtype(cfg, files), why)


def fingerprint(p: Prepared, partition: list[list[int]] | None = None, ties: bool = False) -> dict:
    """Everything that determines the pruned weights (not the evaluation, not the device count).
    ties: the model has weights tied between layers (`Trunk.has_ties`)."""
    c = p.cfg
    return {"model": p.files.fingerprint_parts(), "method": c.method, "pattern": p.spec.pattern(),
            "refit": c.refit, "solver_options": c.solver_options, "calib": data.windows_digest(p.calib),
            "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed, "mode": c.mode,
            "dtype": str(p.dtype), "batch_size": c.batch_size,
            # stagewise results depend on where the stage boundaries are
            "partition": partition if c.mode == "stagewise" else None,
            # the output layout: shard names carry the layer count (checkpoint.shard_name); an
            # output of the older layout (shards under layers/) is a different run, never resumed into
            "layout": "top-level shards", "n_layers": sum(map(len, partition)) if partition else None,
            # only when set, so that fingerprints of uniform runs stay what they were
            **({"allocation": c.allocation} if c.allocation != "uniform" else {}),
            # likewise only when on (dense mode, or auto on one batch, solve as without it: the same weights)
            **({"target_blend": p.spec.blend} if p.spec.blending else {}),
            # tied weights an owner never multiplies are pruned and stored by the layer that does
            # (Trunk): an output of such a model written before that is another layout, never resumed
            **({"tied": "left to the layer that multiplies them"} if ties else {})}


def name_of(trunk: Trunk, layer: int, param: str) -> str:
    """The owner's full name of tied parameter `param` (a name inside `layer`) that `layer` claimed."""
    full = f"{trunk.layer_prefix(layer)}.{param}"
    return trunk._tied_in.get(layer, {}).get(full, (None, full))[1]


def perplexity(nll: float, count: int) -> float:
    return math.exp(nll / count) if count else float("nan")


def peak_memory_mb() -> dict:
    out = {"host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def finish(p: Prepared, out: OutputDir, trunk: Trunk, layer_reports: list[dict], ppl: dict | None,
           seconds: float, extra: dict | None = None) -> dict:
    """Write everything outside the decoder layers, and the report; returns the report."""
    layer_reports = sorted(layer_reports, key=lambda r: r["layer"])
    zeros = total = 0
    dense_left: dict[str, dict] = {}
    for r in layer_reports:
        total += r["weights"]
        zeros += round(r["sparsity"] * r["weights"])
        for name, d in r.get("dense_left", {}).items():
            dense_left[f"{trunk.layer_prefix(r['layer'])}.{name}"] = dict(d)
    # Tied weights an owner left to later layers that none of them multiplied: written dense with
    # everything outside the layers (so the output has every tensor), and counted here.
    rest_extra = {}
    for r in layer_reports:
        for name, users in (r.get("tied_later") or {}).items():
            claimed = any(name_of(trunk, x["layer"], c) == f"{trunk.layer_prefix(r['layer'])}.{name}"
                          for x in layer_reports for c in x.get("tied_claimed", []))
            if not claimed:
                keys = sorted(trunk.later_keys(r["layer"], [name]))
                rest_extra.update(p.files.read(keys))
                n = sum(rest_extra[k].numel() for k in keys)
                total += n
                dense_left[f"{trunk.layer_prefix(r['layer'])}.{name}"] = {
                    "reason": f"tied: not multiplied by its owner, nor by layer {', '.join(map(str, users))}",
                    "weights": n}
    for d in dense_left.values():
        d["share"] = d["weights"] / total if total else 0.0
    fallback = sorted(f"{r['layer']}.{n}" for r in layer_reports for n, m in r["modules"].items() if "fallback" in m)
    c = p.cfg
    report = {
        "tool": "mwprune", "model": p.files.source, "family": loading.get_adapter(p.files.config).family,
        "method": c.method, "pattern": p.spec.pattern(), "sparsity_target": c.sparsity, "nm": c.nm,
        "refit": c.refit, "solver_options": c.solver_options, "mode": c.mode, "device": c.device,
        "dtype": str(p.dtype), "calibration": p.calib_protocol, "evaluation": p.eval_protocol,
        "perplexity": ppl, "sparsity": {"overall": zeros / total if total else 0.0,
                                        "per_layer": {r["layer"]: r["sparsity"] for r in layer_reports},
                                        "dense_left": dense_left,
                                        "dense_left_share": sum(d["share"] for d in dense_left.values()),
                                        "experts_fallback": fallback},
        "layers": layer_reports, "layers_resumed": sum(1 for r in layer_reports if r.get("resumed")),
        "seconds": seconds, "peak_memory": peak_memory_mb(),
    }
    if extra:
        report.update(extra)
    layer_names = {i: trunk.layer_keys(i) for i in range(trunk.n_layers)}
    rest = {**p.files.read(trunk.rest_keys()), **rest_extra}
    rest = {k: v.to(p.files.dtypes[k]) for k, v in rest.items()}
    # this process's reads of the model, the rest just read included (Ray stages: pipeline.stage_facts)
    report.update(p.files.counters())
    out.finalize(p.files.folder, rest, layer_names, report)
    return report


DENSE_NOOP = ("warning: --target-blend has no effect in --mode dense: every module is calibrated on the dense "
              "model's input there (X̂ = X), which is already the dense target; solved as without it")


def blend_notice(p: Prepared) -> str | None:
    """The progress line when the solvers do not get the blend asked for (None when they do)."""
    if p.blend_why is None:
        return None
    return DENSE_NOOP if p.cfg.mode == "dense" else "note: " + p.blend_why


def blend_report(p: Prepared, layer_reports: list[dict], dense_seconds: float, dense_mb: float) -> dict:
    """report.json's target_blend section: what was asked, what each module got, what it cost."""
    cfg = p.cfg
    if p.blend_why:
        return {"requested": cfg.target_blend, "applied": False, "why": p.blend_why}
    chosen = [m["blend"] for r in layer_reports for m in r["modules"].values() if "blend" in m]
    counts: dict[str, int] = {}
    for a in chosen:
        counts[f"{a:g}"] = counts.get(f"{a:g}", 0) + 1
    return {"requested": cfg.target_blend, "applied": bool(chosen),
            "grid": list(blend_grid()) if cfg.target_blend == "auto" else None,
            "modules": len(chosen), "chosen_counts": dict(sorted(counts.items())),
            "mean_alpha": sum(chosen) / len(chosen) if chosen else None,
            # auto: where each module's own held-out optimum lies, capped at 1 (the grid stops lower)
            "mean_optimum": _mean([m["blend_optimum"] for r in layer_reports for m in r["modules"].values()
                                   if "blend_optimum" in m]),
            "notes": sum(1 for r in layer_reports for m in r["modules"].values() if "blend_note" in m),
            # the dense stream doubles the calibration activations and their layer forwards
            "dense_stream_mb": dense_mb,
            "dense_stream_forward_seconds": dense_seconds,
            "resumed_layers": sum(1 for r in layer_reports if r.get("resumed"))}


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def blend_grid() -> tuple:
    from .solvers.blend import GRID
    return GRID


class Progress:
    """One line per finished layer on stderr: time, ETA, sparsity, error."""

    def __init__(self, total: int, quiet: bool = False, stream=None):
        # None: sys.stderr as it is when a line is written (not as it was at import: a redirect wins)
        self.total, self.quiet, self._stream = total, quiet, stream
        self.t0, self.done = time.perf_counter(), 0

    def __call__(self, i: int, report: dict) -> None:
        self.done += 1
        if self.quiet:
            return
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done)
        err = sum(m["error"] for m in report["modules"].values())
        tag = " (resumed)" if report.get("resumed") else ""
        print(f"[{self.done:>3}/{self.total}] layer {i:>3}  {report['seconds']:6.1f}s  elapsed {el:7.1f}s  "
              f"ETA {eta:7.1f}s  sparsity {report['sparsity']:.3f}  error {err:.4g}{tag}",
              file=self.stream, flush=True)

    def note(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.stream, flush=True)

    @property
    def stream(self):
        return self._stream or sys.stderr


def check_pattern(trunk: Trunk, spec: PruneSpec) -> None:
    """N:M needs every pruned linear module's input width divisible by M: fail before any work
    (other matrices, such as experts, are checked by the solver, whose error names them)."""
    if not spec.nm:
        return
    m = spec.nm[1]
    for i in range(trunk.n_layers):
        units, _ = candidates(trunk.layers[i], trunk.adapter)
        for name, u in units.items():
            mod = trunk.layers[i].get_submodule(u.param.rpartition(".")[0]) if "." in u.param else None
            if isinstance(mod, torch.nn.Linear) and mod.in_features % m:
                raise ConfigError(f"N:M {spec.pattern()} needs input widths divisible by {m}; "
                                  f"layer {i} {name} has {mod.in_features}")


def completed_report(out: OutputDir) -> dict:
    """The report of a run that was already complete, marked so the caller can say nothing was done
    (the mark is not written anywhere)."""
    return dict(json.loads(out.read_bytes("report.json")), already_complete=True)


def _nll(trunk: Trunk, hidden: list, ids: list, what: str, progress: Progress) -> tuple[float, int]:
    """Trunk.nll batch by batch, with a progress note per batch: the head over the vocabulary is the
    slow part of the evaluation."""
    total, count, done, t0 = 0.0, 0, 0, time.perf_counter()
    for h, i in zip(hidden, ids):
        t, c = trunk.nll([h], [i])
        total, count, done = total + t, count + c, done + i.shape[0]
        progress.note(f"  perplexity ({what}): {done}/{sum(x.shape[0] for x in ids)} windows, "
                      f"{time.perf_counter() - t0:.1f}s")
    return total, count


def run(cfg: RunConfig, quiet: bool = False) -> dict:
    """The single-process job. Returns the report (also written to `cfg.out`/report.json); a report
    with `already_complete` set when `cfg.out` held this run, finished, and nothing was done."""
    t0 = time.perf_counter()
    say = Progress(0, quiet).note
    say(f"reading the model's config and tokenizer, tokenizing the texts ({remote.redact(cfg.model) if cfg.model else 'built-in SmolLM2-135M'})")
    p = prepare(cfg)
    cal = p.calib_protocol
    say(f"calibration: {cfg.nsamples} x {cfg.seqlen} tokens of {Path(str(cal['file'])).name}; evaluation: "
        + (f"{cfg.eval_windows} x {cfg.seqlen} tokens of {Path(str(p.eval_protocol['file'])).name}" if p.evalw is not None
           else "none") + f"; {cfg.device}, {str(p.dtype).removeprefix('torch.')}"
        + (f", {threads.describe()}" if cfg.device == "cpu" else "") + f" ({time.perf_counter() - t0:.1f}s)")
    out = OutputDir(cfg.out)
    trunk = Trunk(p.files, cfg.device, p.dtype)
    check_pattern(trunk, p.spec)
    status = out.begin(fingerprint(p, [list(range(trunk.n_layers))], trunk.has_ties), cfg.overwrite)
    try:
        progress = Progress(trunk.n_layers, quiet)
        if status == "complete":  # jobs.prune says so
            return completed_report(out)
        if status == "resume":
            progress.note(f"resuming in {out.uri}: {len(out.committed())} of {trunk.n_layers} layers already done")
        calib_hidden, calls = trunk.embed(data.batches(p.calib, cfg.batch_size))
        plan = None
        if cfg.allocation == "owl":  # one pass of the calibration batches through the dense layers
            progress.note("OWL: one dense pass for the layers' outlier ratios")
            plan = allocation.owl_plan(trunk, calib_hidden, calls, cfg.sparsity)
            p.spec.module_sparsity = plan["module_sparsity"]
        hessians_from = "calib_dense" if cfg.mode == "dense" else "calib"
        if note := blend_notice(p):
            progress.note(note)
        runner = SliceRunner(trunk, list(range(trunk.n_layers)), p.spec, calls, hessians_from, out, progress)
        for b in calib_hidden:
            runner.push(hessians_from, b)
            if p.spec.blending:  # the dense model's activations, carried beside the pruned stream
                runner.push("calib_dense", b)
        if p.evalw is not None:
            eval_ids = data.batches(p.evalw, cfg.batch_size)
            eval_hidden, eval_calls = trunk.embed(eval_ids)
            for key, c in eval_calls.items():
                runner.calls.setdefault(key, c)
            for b in eval_hidden:
                runner.push("eval_dense", b)
                runner.push("eval_pruned", b)
        progress.note(f"pruning {trunk.n_layers} decoder layers ({cfg.method} {p.spec.pattern()}"
                      f"{', refit ' + cfg.refit if cfg.refit else ''}), one line per layer as it is committed"
                      f" ({time.perf_counter() - t0:.1f}s)")
        progress.t0 = time.perf_counter()
        reports = runner.run()
        ppl = None
        if p.evalw is not None:
            progress.note("evaluating: the final norm and head on the dense and the pruned outputs")
            ppl = {"dense": perplexity(*_nll(trunk, runner.streams["eval_dense"], eval_ids, "dense", progress)),
                   "pruned": perplexity(*_nll(trunk, runner.streams["eval_pruned"], eval_ids, "pruned", progress))}
        progress.note(f"writing the rest of the checkpoint (embeddings, head, index, report) to {out.uri}")
        extra = {"stages": 1, "layers_solved": runner.solved, "determinism": determinism.facts(cfg.device)}
        if plan is not None:
            extra["allocation"] = {k: v for k, v in plan.items() if k != "module_sparsity"}
        if blending(cfg):
            mb = sum(h.numel() * h.element_size() for h in calib_hidden) / 2**20
            extra["target_blend"] = blend_report(p, reports, runner.dense_seconds, mb)
        return finish(p, out, trunk, reports, ppl, time.perf_counter() - t0, extra)
    finally:
        out.release()
