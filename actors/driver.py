"""The Ray driver: K stage actors, placed with a placement group, chained by streamed activations.

`run_distributed(cfg)` is the distributed twin of `pipeline.run.run`: it reuses `prepare`,
`fingerprint` and `finish`, and replaces the middle (one slice of all layers) by K stages, each a
`actors.stage.Stage` around `SliceRunner` for a contiguous slice of layers balanced by parameter
count. The driver never loads a layer: it builds a meta-device skeleton to count parameters and
names, and moves only object references; activations go from stage to stage through Ray's object
store (zero-copy numpy), at most MWPRUNE_MAX_INFLIGHT transfers outstanding at a time.

Modes (`cfg.mode`):
    sequential  stage s hands its *pruned* calibration outputs to stage s+1 after its run: every
                layer sees the outputs of all pruned layers before it, as in one process. Only one
                stage runs at a time, so every stage's device takes a share of each phase's solves.
    stagewise   each stage first forwards its *dense* outputs downstream, then prunes; inside a stage
                layers see the pruned layers before them. All stages solve at the same time.
    dense       like stagewise, but every layer is calibrated on dense inputs.

Environment knobs (the CLI has no flags for them):
    MWPRUNE_MAX_INFLIGHT       activation batches in flight between stages (default 8)
    MWPRUNE_PLACEMENT          PACK (default), SPREAD, STRICT_PACK or STRICT_SPREAD
    MWPRUNE_STAGE_GPUS         1: stages ask for a GPU even if the cluster has none yet (an autoscaler
                               starting GPU workers from zero); default: GPUs where the cluster has some
    MWPRUNE_PLACEMENT_TIMEOUT  seconds to wait for the placement group (default 60; 900 when GPUs were
                               asked for beyond those the cluster has now, for an autoscaler to add them)
    MWPRUNE_STAGE_CPUS         CPUs (and torch threads) per CPU stage (default: CPUs / stages)
    MWPRUNE_SPREAD             0: in sequential mode, each stage solves its own layers alone (default 1:
                               each phase's solves are spread over every stage, see actors.stage.StagePool)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path


from pipeline import data, determinism, loading, threads
from pipeline.calibrate import Trunk
from pipeline.checkpoint import OutputDir
from pipeline.run import (ConfigError, Progress, RunConfig, blend_notice, blend_report, blending,
                          completed_report, finish, fingerprint, model_folder, perplexity, precheck, prepare, run_dtype)

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
BLEND = True  # --target-blend: the dense stream is carried (sequential) or kept inside a stage (stagewise)


class PlacementError(ValueError):
    pass


class StageLost(RuntimeError):
    """A stage's process or node died; its committed layers survive in --out."""


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {os.environ[name]!r}") from None


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {os.environ[name]!r}") from None


def check_env() -> None:
    """The environment knobs (module docstring), checked before any cluster is started or joined."""
    for name in ("MWPRUNE_MAX_INFLIGHT", "MWPRUNE_STAGE_CPUS", "MWPRUNE_STAGE_RETRIES"):
        if name in os.environ:
            _env_int(name, 0)
    if "MWPRUNE_PLACEMENT_TIMEOUT" in os.environ:
        _env_float("MWPRUNE_PLACEMENT_TIMEOUT", 0)
    strategy = os.environ.get("MWPRUNE_PLACEMENT", "PACK").upper()
    if strategy not in STRATEGIES:
        raise ConfigError(f"MWPRUNE_PLACEMENT must be one of {', '.join(STRATEGIES)}, got {strategy!r}")


# -- partition ---------------------------------------------------------------------------------
def partition(weights: list[int], k: int) -> list[list[int]]:
    """Contiguous slices of layers 0..n-1 minimising the largest slice's total weight."""
    n = len(weights)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} layers into {k} stages")
    pre = [0]
    for w in weights:
        pre.append(pre[-1] + w)
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0
    for s in range(1, k + 1):
        for j in range(s, n - (k - s) + 1):
            for i in range(s - 1, j):
                c = max(cost[s - 1][i], pre[j] - pre[i])
                if c < cost[s][j]:
                    cost[s][j], cut[s][j] = c, i
    bounds, j = [], n
    for s in range(k, 0, -1):
        i = cut[s][j]
        bounds.append((i, j))
        j = i
    return [list(range(i, j)) for i, j in reversed(bounds)]


# -- cluster -----------------------------------------------------------------------------------
def connect(cfg: RunConfig, quiet: bool) -> bool:
    """Join a running cluster (--address, RAY_ADDRESS) or start a local one. True if we connected
    here (and so must disconnect); False if this process was already connected (tests, benchmarks)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kw = dict(logging_level=logging.WARNING, log_to_driver=not quiet)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        runtime_env = None
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
            # Not inside `ray job submit`: ship our packages to the workers (the image carries the rest).
            runtime_env = {"py_modules": [str(ROOT / "pipeline"), str(ROOT / "actors")]}
        ray.init(address=address, runtime_env=runtime_env, **kw)
    else:
        # A local Ray on this machine: logical CPUs, at least one per requested stage. Said only now,
        # after every check that needs no cluster (Driver.run, step 1), when it really starts.
        if not quiet:
            what = f"--stages {cfg.stages}" if cfg.stages and cfg.stages > 1 else f"--mode {cfg.mode}"
            print(f"no --address or RAY_ADDRESS: starting a local Ray cluster on this machine for {what} "
                  f"(token authentication: {os.environ.get('RAY_AUTH_MODE', 'token')})", file=sys.stderr, flush=True)
        ray.init(num_cpus=max(os.cpu_count() or 1, cfg.stages or 1), include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                     p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}}, **kw)
    return True


@dataclasses.dataclass
class Placement:
    stages: int
    use_gpu: bool
    bundle: dict
    actor_options: dict
    threads: int | None
    strategy: str
    timeout: float


def plan_placement(cfg: RunConfig, n_layers: int) -> Placement:
    """How many stages, and what each asks for: one GPU where the cluster has GPUs (or --device cuda
    asks for them), else an equal share of CPUs. Raises PlacementError if the cluster cannot hold them."""
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    cpus = int(total.get("CPU", 0))
    # jobs.prune resolves --device on the driver, which on a GPU cluster is often a CPU-only head node:
    # "cpu" there only means "the driver has no CUDA". The cluster's GPUs decide (see stage_preference).
    # MWPRUNE_STAGE_GPUS=1: GPU stages even where the cluster has no GPU yet (GPU workers that an
    # autoscaler starts from zero).
    want_gpu = cfg.device == "cuda" or os.environ.get("MWPRUNE_STAGE_GPUS", "") not in ("", "0")
    use_gpu = gpus > 0 or want_gpu
    k = cfg.stages if cfg.stages is not None else max(1, min(gpus, n_layers))
    strategy = os.environ.get("MWPRUNE_PLACEMENT", "PACK").upper()
    if strategy not in STRATEGIES:
        raise ConfigError(f"MWPRUNE_PLACEMENT must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    timeout = _env_float("MWPRUNE_PLACEMENT_TIMEOUT", 60)
    if use_gpu:
        if k > gpus:
            if not want_gpu:  # only an explicit request for GPUs waits for an autoscaler
                raise PlacementError(f"--stages {k} is more than the cluster can place: it has {gpus} GPUs "
                                     f"(one stage per GPU)")
            timeout = _env_float("MWPRUNE_PLACEMENT_TIMEOUT", 900)  # an autoscaler may add nodes
        return Placement(k, True, {"GPU": 1}, {"num_gpus": 1, "num_cpus": 0}, None, strategy, timeout)
    node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    per = _env_int("MWPRUNE_STAGE_CPUS", max(1, cpus // max(k, 1)))
    per = max(1, min(per, max(node_cpus or [1])))
    placeable = sum(c // per for c in node_cpus)
    if k > placeable:
        raise PlacementError(f"--stages {k} is more than the cluster can place: it has {cpus} CPUs and no GPUs "
                             f"({per} CPU{'s' if per > 1 else ''} per stage)")
    return Placement(k, False, {"CPU": per}, {"num_cpus": per}, per, strategy, timeout)


def stage_preference(cfg: RunConfig) -> str:
    """What a stage is told about CUDA. Stages use CUDA whenever their torch sees it, unless --device cpu
    was explicit, which the driver can only tell where its own torch sees CUDA ("auto" would have
    resolved to cuda there)."""
    import torch

    return "cpu" if cfg.device == "cpu" and torch.cuda.is_available() else "auto"


# -- progress ----------------------------------------------------------------------------------
class _Sink:
    """Finished-layer reports from the stages, drained by the driver for its progress lines.

    It carries nothing the run needs: losing it (or what it held) costs progress lines only, which
    the driver prints at the end from the stages' own reports (`Driver._drain`)."""

    def __init__(self):
        self.items = []

    def put(self, item) -> None:
        self.items.append(item)

    def drain(self) -> list:
        out, self.items = self.items, []
        return out


SINK_RESTARTS = 5  # Ray restarts a lost progress actor this often (its queued lines are gone)

# What Ray raises when an actor, its worker process or its node is gone (as opposed to an error
# raised by the stage's own code, which is the run's error).
LOSS = ("RayActorError", "ObjectLostError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError")


def _is_loss(e: BaseException) -> bool:
    import ray
    return isinstance(e, tuple(getattr(ray.exceptions, n) for n in LOSS if hasattr(ray.exceptions, n)))


def _unwrap(e: BaseException, stage: int | None) -> BaseException:
    """A stage's exception as itself (one line names the stage), not as Ray's wrapper."""
    cause = getattr(e, "cause", None)
    where = f"stage {stage}: " if stage is not None else ""
    if isinstance(cause, Exception) and cause.args and isinstance(cause.args[0], str):
        if not cause.args[0].startswith("stage "):
            cause.args = (where + cause.args[0],) + cause.args[1:]
        return cause
    if isinstance(cause, Exception):
        return RuntimeError(f"{where}{type(cause).__name__}: {cause}")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return RuntimeError(f"{where}{first}")


# -- the driver --------------------------------------------------------------------------------
class Driver:
    def __init__(self, cfg: RunConfig, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        self.max_inflight = max(1, _env_int("MWPRUNE_MAX_INFLIGHT", 8))
        self.inflight: list = []
        self.owner: dict = {}  # object ref -> stage index, for error messages
        self.stages: list = []
        self.pg = None
        self.sink = None
        self.sink_call = None  # the drain in flight, never waited for
        self.sink_losses = 0
        self.shown: set[int] = set()  # layers whose progress line is out
        self.progress: Progress | None = None
        self.transfers = 0
        self.dense_seconds = 0.0

    # -- waiting, with progress and errors ------------------------------------------------------
    def _drain(self, wait: float = 0.0) -> None:
        """Progress lines for the layers the stages reported. Never blocks the pipeline on the
        progress actor (at most `wait` seconds, at the end): if it is lost, the run goes on and Ray
        restarts it; lines it lost come from the stages' reports at the end (`_show_missing`)."""
        import ray

        if self.sink is None:
            return
        if self.sink_call is not None:
            ready, _ = ray.wait([self.sink_call], timeout=wait)
            if not ready:
                return
            try:
                items = ray.get(self.sink_call)
            except ray.exceptions.RayError as e:
                if not _is_loss(e):
                    raise
                items, self.sink_losses = [], self.sink_losses + 1
                if self.sink_losses > SINK_RESTARTS:  # Ray has given up restarting it
                    self.sink, self.sink_call = None, None
                self.progress.note(f"progress actor lost ({type(e).__name__}); the run goes on, "
                                   f"missing progress lines follow at the end")
            for stage, i, report in items:
                if i not in self.shown:
                    self.shown.add(i)
                    self.progress(i, report)
        if self.sink is None:
            return
        try:
            self.sink_call = self.sink.drain.remote()
        except ray.exceptions.RayError:  # gone for good: go on without it
            self.sink, self.sink_call = None, None

    def _show_missing(self, reports: list[dict]) -> None:
        """Progress lines the progress actor lost (or never got), once the stages have reported."""
        if self.progress is None:
            return
        for r in sorted(reports, key=lambda r: r["layer"]):
            if r["layer"] not in self.shown:
                self.shown.add(r["layer"])
                self.progress(r["layer"], r)

    def _get(self, ref):
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:
            if _is_loss(e):  # its process or node is gone: restart from the committed layers
                raise StageLost(f"stage {self.owner.get(ref)} lost: {type(e).__name__}") from None
            raise _unwrap(e, self.owner.get(ref)) from None

    def _wait(self, refs: list, num_returns: int) -> list:
        import ray

        ready: list = []
        pending = list(refs)
        while len(ready) < num_returns:
            r, pending = ray.wait(pending, num_returns=num_returns - len(ready), timeout=0.5)
            ready += r
            self._drain()
            for x in r:  # raise a stage's error as soon as it is seen
                self._get(x)
        return pending

    def _call(self, s: int, method: str, *args):
        ref = getattr(self.stages[s], method).remote(*args)
        self.owner[ref] = s
        return ref

    def _hop(self, src: int, dst: int, counts: dict[str, int]) -> None:
        """Hand every batch of `counts`' streams from stage src to stage dst, at most max_inflight at once.

        The driver only passes references: Ray moves each batch from src's object store to dst.
        Calls from one caller run in order on an actor, so these land before anything submitted later.
        """
        for stream, n in counts.items():
            for j in range(n):
                if len(self.inflight) >= self.max_inflight:
                    self.inflight = self._wait(self.inflight, len(self.inflight) - self.max_inflight + 1)
                take = self._call(src, "take", stream, j)
                self.inflight.append(self._call(dst, "push", stream, take))
                self.transfers += 1

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> dict:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .stage import Stage

        t0 = time.perf_counter()
        cfg = self.cfg
        # 1. Everything that needs no cluster, so bad input costs nothing, writes nothing and starts
        # no Ray: options, environment knobs, model, data paths, pattern, --out, stages vs layers.
        probe = dataclasses.replace(cfg, device="cpu" if cfg.device in ("auto", "cuda") else cfg.device)
        probe.resolve()
        check_env()
        files, skeleton = precheck(probe)  # skeleton: meta device, names and parameter counts only
        folder = model_folder(cfg.model)  # a local folder, or a URI each stage reads by range
        n_layers = skeleton.n_layers
        if cfg.stages is not None and cfg.stages < 1:
            raise ConfigError(f"--stages must be positive, got {cfg.stages}")
        if cfg.stages is not None and cfg.stages > n_layers:
            raise ConfigError(f"--stages {cfg.stages} is more than the model's {n_layers} decoder layers")

        own = connect(cfg, self.quiet)
        out = None
        try:
            # 2. Placement: fail before anything is written if the cluster cannot hold the stages.
            plan = plan_placement(cfg, n_layers)
            k = plan.stages
            if k > n_layers:
                raise ConfigError(f"--stages {k} is more than the model's {n_layers} decoder layers")
            slices = partition([skeleton.layer_numel(i) for i in range(n_layers)], k)
            self.pg = placement_group([dict(plan.bundle) for _ in range(k)], strategy=plan.strategy)
            ready, _ = ray.wait([self.pg.ready()], timeout=plan.timeout)
            if not ready:
                raise PlacementError(f"--stages {k}: the cluster could not place {k} stages of {plan.bundle} "
                                     f"({plan.strategy}) within {plan.timeout:g}s")

            # 3. Stages start (importing torch, building skeletons) while this process tokenizes.
            if not self.quiet:  # restarted by Ray if lost; calls in flight then fail, see _drain
                self.sink = ray.remote(num_cpus=0, max_restarts=SINK_RESTARTS, max_task_retries=0)(_Sink).remote()
            # "help": a second thread per stage that solves pieces of other stages' phases (StagePool)
            StageActor = ray.remote(concurrency_groups={"help": 1})(Stage)
            self.stages = [
                # runtime_env: the OpenMP wait policy must be in a stage's environment before its torch
                # starts (pipeline/threads.py); Ray merges these env_vars with the job's
                StageActor.options(**plan.actor_options, max_restarts=0, max_task_retries=0,
                                   runtime_env={"env_vars": threads.stage_env()},
                                   scheduling_strategy=PlacementGroupSchedulingStrategy(
                                       self.pg, placement_group_bundle_index=s)).remote(s, stage_preference(cfg), plan.threads)
                for s in range(k)]
            ready0 = self._call(0, "ready")
            warm = [self._call(s, "warm", str(folder), cfg.model) for s in range(k)]
            p = self._prepare(ready0, files)
            self._wait(warm[:1], 1)  # the first stage can read the model: now the output may be claimed

            out = OutputDir(cfg.out)
            status = out.begin(fingerprint(p, slices, skeleton.has_ties), cfg.overwrite)
            self.progress = Progress(n_layers, self.quiet)
            if status == "complete":
                self.progress.note(f"{out.uri} already holds this run, complete; nothing to do")
                return completed_report(out)
            if status == "resume":
                self.progress.note(f"resuming in {out.uri}: {len(out.committed())} of {n_layers} layers already done")
            out_uri = out.root if out.local else cfg.out
            dtype = str(p.dtype).removeprefix("torch.")
            # Not waited for: each stage's later calls queue behind its setup, and later stages finish
            # starting up while the first one works (in sequential mode they are not needed before).
            for s in range(k):
                self._call(s, "setup", slices[s], p.spec, cfg.mode, out_uri, dtype, p.cfg.device, self.sink)
            spreading = cfg.mode == "sequential" and k > 1 and os.environ.get("MWPRUNE_SPREAD", "1") != "0"
            if spreading:  # the other stages wait anyway in this mode: they share each phase's solves
                for s in range(k):
                    self._call(s, "set_peers", self.stages)
            if note := blend_notice(p):
                self.progress.note(note)
            self.progress.note(f"{k} stage{'s' if k > 1 else ''} ({cfg.mode}): layers "
                               + " | ".join(f"{sl[0]}-{sl[-1]}" for sl in slices))

            # 4. The pipeline.
            reports, ppl, solved = self._pipeline(p, k)

            # 5. Facts, timeline, and everything outside the decoder layers.
            facts = [self._get(self._call(s, "facts")) for s in range(k)]
            wall = time.perf_counter() - t0
            extra = {"stages": k, "layers_solved": solved, "solves_spread": spreading,
                     "determinism": determinism.facts(p.cfg.device, [f["torch_threads"] for f in facts],
                                                      [f["openmp"] for f in facts]),
                     "pipeline": {"mode": cfg.mode, "partition": slices, "placement": plan.strategy,
                                  "bundle": plan.bundle, "max_inflight": self.max_inflight,
                                  "transfers": self.transfers, "stage_facts": _strip_events(facts)}}
            if blending(cfg):
                width = skeleton.model.config.get_text_config().hidden_size
                mb = cfg.nsamples * cfg.seqlen * width * p.dtype.itemsize / 2**20
                extra["target_blend"] = blend_report(p, reports, self.dense_seconds, mb)
            png = timeline_png(facts, f"{cfg.method} {p.spec.pattern()} {cfg.mode}, {k} stages")
            if png is not None:
                out.write_bytes("timeline.png", png)
                extra["pipeline"]["timeline"] = "timeline.png"
            return finish(p, out, skeleton, reports, ppl, wall, extra)
        finally:
            if out is not None:
                out.release()  # the lock begin() took on --out
            for a in self.stages:
                ray.kill(a)
            if self.sink is not None:
                try:
                    ray.kill(self.sink)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            if self.pg is not None:
                remove_placement_group(self.pg)
            if own:
                ray.shutdown()

    def _prepare(self, ready0, files=None):
        """prepare() for the device the first stage sees (CUDA only if torch sees it there), which may
        not be the driver's: a job's driver often runs on a head node without GPUs. The other stages
        check in `setup` that they see the same."""
        import torch

        cfg = self.cfg
        stage_dev = self._get(ready0)["device"]
        if cfg.device == "cuda" and stage_dev != "cuda":
            raise ConfigError("--device cuda requested but the stages' torch sees no CUDA device")
        c = dataclasses.replace(cfg, device=stage_dev)
        if c.device == "cuda" and not torch.cuda.is_available():
            # resolve() would refuse cuda here: resolve for CPU (defaults for whatever is still unset
            # are the GPU ones), then switch to the stages' device
            gpu_defaults = dataclasses.replace(c, device="cpu",
                                               nsamples=128 if c.nsamples is None else c.nsamples,
                                               seqlen=2048 if c.seqlen is None else c.seqlen)
            p = prepare(gpu_defaults, files)
            p.cfg.device = "cuda"
            p.dtype = run_dtype(p.cfg, p.files)
        else:
            p = prepare(c, files)
        for name in ("device", "nsamples", "seqlen"):  # the caller sees what ran, as with run()
            setattr(cfg, name, getattr(p.cfg, name))
        return p

    def _pipeline(self, p, k: int):
        """Submit the whole dataflow, bounded in flight; returns layer reports, perplexity, layers solved."""
        cfg = self.cfg
        bs = cfg.batch_size
        n_calib = len(data.batches(p.calib, bs))
        n_eval = len(data.batches(p.evalw, bs)) if p.evalw is not None else 0
        evalw = p.evalw.numpy() if p.evalw is not None else None
        kw = self._call(0, "embed", p.calib.numpy(), evalw, bs)
        for s in range(1, k):
            self._call(s, "set_kwargs", kw)
        runs = []
        if cfg.mode == "sequential":
            counts = {"calib": n_calib, "eval_dense": n_eval, "eval_pruned": n_eval,
                      "calib_dense": n_calib if p.spec.blending else 0}  # the blend's dense stream
            for s in range(k):
                if s > 0:
                    self._hop(s - 1, s, {n: c for n, c in counts.items() if c})
                runs.append(self._call(s, "run"))
        else:
            for s in range(k):
                emit = (["calib"] if s < k - 1 else []) + (["eval_dense"] if n_eval else [])
                self._call(s, "dense_pass", emit)
                if s < k - 1:  # queued on stage s before its run: downstream starts while s prunes
                    self._hop(s, s + 1, {"calib": n_calib, **({"eval_dense": n_eval} if n_eval else {})})
                runs.append(self._call(s, "run"))
            if n_eval:  # pruned evaluation follows the runs, stage after stage
                for s in range(1, k):
                    self._hop(s - 1, s, {"eval_pruned": n_eval})
                    self._call(s, "post_pass")
        nll = self._call(k - 1, "nll", evalw, bs) if n_eval else None
        self.inflight = self._wait(self.inflight + runs + ([nll] if nll else []),
                                   len(self.inflight) + len(runs) + (1 if nll else 0))
        results = [self._get(r) for r in runs]
        reports = [r for res in results for r in res["reports"]]
        self._drain(wait=5.0)
        if self.sink_call is not None:
            self._drain(wait=5.0)  # the drain submitted after the last put: the last lines
        self._show_missing(reports)
        ppl = None
        if nll is not None:
            res = self._get(nll)
            ppl = {"dense": perplexity(*res["eval_dense"]), "pruned": perplexity(*res["eval_pruned"])}
        self.dense_seconds = sum(res.get("dense_seconds", 0.0) for res in results)
        return reports, ppl, sum(res["solved"] for res in results)


def _strip_events(facts: list[dict]) -> list[dict]:
    out = []
    for f in facts:
        f = dict(f)
        t_start = min(e[1] for ff in facts for e in ff["events"])
        f["events"] = [(n, round(a - t_start, 3), round(b - t_start, 3)) for n, a, b in f["events"]]
        if f.get("peak_private_at"):  # on the events' clock
            f["peak_private_at"] = round(f["peak_private_at"] - t_start, 3)
        f.pop("clock", None)
        out.append(f)
    return out


def timeline_png(facts: list[dict], title: str) -> bytes | None:
    """A Gantt chart of what each stage did when (None if matplotlib is missing)."""
    try:
        import io

        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = {"init": "#bbbbbb", "warm": "#dddddd", "embed": "#8c564b", "push": "#1f77b4", "dense": "#2ca02c", "run": "#d62728",
              "take": "#17becf", "post": "#9467bd", "nll": "#ff7f0e", "setup": "#7f7f7f",
              "help": "#e377c2"}
    t_start = min(e[1] for f in facts for e in f["events"])
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.6 * len(facts)))
    for f in facts:
        y = f["stage"]
        for name, a, b in f["events"]:
            ax.broken_barh([(a - t_start, max(b - a, 0.005))], (y - 0.35, 0.7), color=colors.get(name, "black"))
    ax.set_yticks([f["stage"] for f in facts])
    ax.set_yticklabels([f"stage {f['stage']} (L{f['layers'][0]}-{f['layers'][-1]})" for f in facts])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(title)
    from matplotlib.patches import Patch
    used = sorted({e[0] for f in facts for e in f["events"]}, key=list(colors).index)
    # The legend gets its own strip under the axis label (inside the axes' box it hid the label).
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))
    fig.legend(handles=[Patch(color=colors[n], label=n) for n in used if n in colors], ncol=len(used),
               loc="lower center", fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def run_distributed(cfg: RunConfig, quiet: bool = False) -> dict:
    """The K-stage job on Ray. Returns the report (also written to `cfg.out`/report.json).

    A stage that dies (its process killed, its node lost) ends the attempt; the job then starts
    again by itself, up to MWPRUNE_STAGE_RETRIES (3) times, and resumes from the layers the stages
    had committed: only unfinished layers are solved again, and the result is unchanged. The
    driver's only other actor, the progress actor, costs nothing when lost: Ray restarts it, the
    driver never waits on it, and the progress lines it lost are printed from the stages' reports.
    """
    retries = max(0, _env_int("MWPRUNE_STAGE_RETRIES", 3))
    for attempt in range(retries + 1):
        try:
            return Driver(dataclasses.replace(cfg), quiet).run()
        except StageLost as e:
            if attempt == retries:
                raise StageLost(f"{e}; gave up after {retries} restarts (rerun the command to resume)") from None
            if not quiet:
                print(f"{e}: restarting the stages (attempt {attempt + 2} of {retries + 1}); committed layers are kept",
                      file=sys.stderr, flush=True)
    raise AssertionError("unreachable")
