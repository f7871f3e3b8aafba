"""One pipeline stage: a thin Ray actor around `pipeline.calibrate.SliceRunner`.

A stage owns a contiguous slice of decoder layers. It loads only those layers, one at a time, from
the safetensors shards (the first stage also the embeddings, for `Trunk.embed`; the last stage also
the final norm and head, for `Trunk.nll`), and commits each pruned layer straight into the output
through `OutputDir`. It moves tensors and calls the core; it holds no solver or model code.

Activations travel between stages as numpy arrays, which Ray hands over zero-copy from its object
store. Such arrays are read-only shared memory, so a stage copies a batch once on arrival.

Logical streams, as the driver names them:

    calib        calibration batches handed downstream (pruned outputs in sequential mode, dense
                 outputs in stagewise and dense modes)
    calib_dense  sequential mode with --target-blend only: the dense model's calibration
                 activations, carried beside the pruned ones (the blend's target)
    eval_dense   evaluation windows through the dense layers
    eval_pruned  evaluation windows through the pruned layers

Routing inside a stage, by mode:

    sequential   everything goes into the slice runner before it runs, exactly as the single-process
                 job does (hessians from "calib"); outputs are taken after the run.
    stagewise    calib and eval_dense are buffered; `dense_pass` forwards them through the dense
    dense        layers of the slice for the next stage, then feeds calib to the runner ("calib"
                 with hessians_from="calib" in stagewise: layers see the pruned layers before them in
                 this stage; "calib_dense" with hessians_from="calib_dense" in dense mode).
                 eval_pruned pushed after the run goes through the committed (pruned) layers,
                 loaded back from the output (`post_pass`).
"""
from __future__ import annotations

import os
import resource
import time

import numpy as np
import torch

import ray

from pipeline import data, loading, spread, threads
from pipeline.calibrate import PruneSpec, SliceRunner, Trunk
from pipeline.checkpoint import OutputDir
from pipeline.solvers import PruneResult, many_bytes, prune_many, prune_with_info

STREAMS = ("calib", "calib_dense", "eval_dense", "eval_pruned")


# -- moving tensors ----------------------------------------------------------------------------
def pack(t: torch.Tensor) -> tuple[str, np.ndarray]:
    """A tensor as a numpy array Ray can share zero-copy (bfloat16 travels as its int16 bits)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return "bfloat16", t.view(torch.int16).numpy()
    return str(t.dtype).removeprefix("torch."), t.numpy()


def unpack(obj: tuple[str, np.ndarray], device) -> torch.Tensor:
    """Own a copy: zero-copy arrays from the object store are read-only."""
    name, arr = obj
    t = torch.from_numpy(np.array(arr, copy=True))
    if name == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.to(device)


def to_device(obj, device):
    """Per-layer keyword arguments (masks, rotary embeddings...) moved to `device`, e.g. to "cpu" to
    ship them between processes."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def shared_rss_mb() -> float:
    """Resident shared-memory pages mapped here (RssShmem), in MB: Ray's object store, which a stage
    reads zero-copy (batches from upstream, the Hessians and weights of spread solves). They count
    toward this process's RSS, but they are the node's object store, bounded by its size and not by
    the slice (measured: ~33 MB per stage with spread solves on the memory test's 48 small layers,
    under 1 MB without)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


class RssWatch:
    """Peaks of this process's resident memory split into private pages (anonymous and file-backed:
    its own work) and shared-memory pages (RssShmem: Ray's object store read zero-copy), sampled
    every `every` seconds in a daemon thread. ru_maxrss gives the peak of their sum only, and the
    shared part at the end (shared_rss_mb) need not be what it held at that peak. A peak shorter
    than `every` can be missed: ru_maxrss stays the bound."""

    def __init__(self, every: float = 0.02):
        import threading
        self.private_mb = self.shared_mb = 0.0
        self.private_at = 0.0  # when the private peak was seen (time.time())
        self.every = every
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="rss-watch", daemon=True).start()

    @staticmethod
    def sample() -> tuple[float, float]:
        got = {}
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                        k, v = line.split(":")
                        got[k] = int(v.split()[0]) / 1024
        except (OSError, ValueError):
            return float("nan"), float("nan")
        return got.get("RssAnon", 0.0) + got.get("RssFile", 0.0), got.get("RssShmem", 0.0)

    def _loop(self):
        while not self._stop.wait(self.every):
            p, s = self.sample()
            if p > self.private_mb:
                self.private_mb, self.private_at = p, time.time()
            self.shared_mb = max(self.shared_mb, s)


_LIBC = None
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
MMAP_THRESHOLD = 4 << 20  # bytes; see cap_heap
TRIM_THRESHOLD = 64 << 20  # bytes; see cap_heap


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 - glibc only
        except (OSError, AttributeError):  # not glibc
            _LIBC = False
    return _LIBC


def cap_heap(threshold: int = MMAP_THRESHOLD, trim: int = TRIM_THRESHOLD) -> bool:
    """Serve every allocation of `threshold` bytes or more (weights, Hessians, solver workspace) with
    its own mmap, returned to the system when freed. glibc's default threshold rises with each large
    free (up to 32 MiB), after which such tensors come from the heap, which keeps what it frees.
    Measured on a slice of 4 layers of a 1536-wide Llama (magnitude): peak above base 711 -> 450 MB;
    sparsegpt, 2 layers: 557-668 -> 453-472 MB, CPU time within noise (26-32 s against 28-29 s).
    Tensors under 4 MiB (activation batches) stay on the heap: an earlier try with a lower fixed
    threshold cost ~20% of a layer's time, put down to fresh page faults for every activation.
    The heap's free top is kept up to `trim` bytes (setting the mmap threshold also fixes glibc's
    trim threshold, which was left at 4 MiB): the solvers' 1-4 MiB temporaries otherwise shrink
    and regrow the heap many times a solve, each regrowth paid in page faults. Measured (2:4 + cg
    on SmolLM2-shaped half matrices, one thread): 5.5 s (sys 0.6-0.8 s) -> 4.9 s (sys 0.1 s), as
    without cap_heap; two processes at once 5.1-5.6 s -> 4.6-4.8 s; the spread benchmark at K = 2
    98 -> 92 s; the memory check's worst stage 0.235x -> 0.237x of the float32 model (the heap is
    also trimmed after each layer, `return_freed_memory`). Returns False where the C library is not
    glibc."""
    libc = _libc()
    if not libc:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))


def return_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim), after each layer: what
    cap_heap leaves on the heap (small tensors, Python objects) does not creep up layer by layer."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def release(trunk: Trunk, prefixes: list[str]) -> None:
    """Give loaded non-layer modules (embeddings) back to the meta device; the trunk loads them
    again if they are asked for."""
    for p in prefixes:
        if p in trunk._loaded:
            loading.unload_module(trunk.model, p)
            trunk._loaded.discard(p)
    return_freed_memory()


def stage_device(requested: str) -> str:
    """CUDA only when torch sees it (Ray's GPU ids may be logical), and not when --device cpu."""
    return "cuda" if requested != "cpu" and torch.cuda.is_available() else "cpu"


# -- solves spread over every stage ----------------------------------------------------------------
def _pack_result(r: PruneResult) -> tuple:
    return (pack(r.weight), pack(r.mask), r.error, r.damping, r.percdamp, r.seconds, r.cpu_seconds, r.method,
            r.pattern, r.refit)


def _unpack_result(t: tuple, device) -> PruneResult:
    w, m, *rest = t
    return PruneResult(unpack(w, device), unpack(m, device), *rest)


# What one help call may make a helper hold, at most (estimated: its pieces' weights, results and
# solver workspace, and their Hessians), unless a single piece is larger: a helper's share of a phase
# goes out in calls of at most this, which the helper's one "help" thread takes one at a time, so
# its pieces never stack beyond one call, whatever the phase (64 experts, say). Set against the
# stage's own peak on the memory check's 1536 x 4096 layers (~0.45-0.6 GB above base).
HELP_CALL_BYTES = 256 << 20


def piece_bytes(W: torch.Tensor, kw: dict, rows: int, count: int = 1) -> int:
    """What solving `count` items of `rows` rows like W takes on a helper beyond its Hessians:
    the weights it receives, the weights and masks it returns, and the solver's workspace."""
    c = W.shape[1]
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    work = many_bytes(rows, c, kw.get("method", "multiweight"), nm=kw.get("nm"), refit=kw.get("refit"), dtype=dtype,
                      blocksize=kw.get("blocksize"), group=kw.get("group"))
    return count * (rows * c * (2 * W.element_size() + 1) + work)


def help_calls(items: list[tuple], share: list, limit: int | None = None) -> list[list]:
    """A helper's pieces, in order, cut into calls of at most `limit` (default HELP_CALL_BYTES)
    estimated bytes (`piece_bytes` plus each distinct Hessian once per call); a piece larger than
    `limit` goes alone."""
    limit = HELP_CALL_BYTES if limit is None else limit
    calls: list[list] = [[]]
    used, seen = 0, set()
    for p in share:
        W, _, kw = items[p.item]
        hs = {id(items[i][1]): items[i][1] for i in range(p.item, p.item + p.count)}
        size = piece_bytes(W, kw, p.rows[1] - p.rows[0], p.count) + \
            sum(H.numel() * H.element_size() for k, H in hs.items() if k not in seen)
        if calls[-1] and used + size > limit:
            calls.append([])
            used, seen = 0, set()
            size = piece_bytes(W, kw, p.rows[1] - p.rows[0], p.count) + sum(H.numel() * H.element_size()
                                                                             for H in hs.values())
        calls[-1].append(p)
        used += size
        seen |= set(hs)
    return [c for c in calls if c]


class StagePool:
    """A phase's solves spread over this stage and its peers (`pipeline.spread` decides the pieces).

    The peers run `Stage.help` in their own "help" thread, so they answer while their main thread
    waits for batches (sequential mode) or accumulates its first Hessian as batches arrive. Each
    helper gets its share of a phase in calls of at most HELP_CALL_BYTES (`help_calls`; one call
    for the dense phases of the models measured): each call carries the Hessians its pieces need,
    once, and their rows; the helper takes its calls one at a time and trims its heap before each,
    so a helper's pieces never stack on each other. The caller solves its own share meanwhile,
    then gathers. A helper that is lost (its process or node died) or fails has its share solved
    here again, so no row is ever taken from a failed solve; the driver then sees the lost stage
    and restarts from the commits as for any lost stage."""

    def __init__(self, peers: list, device):
        self.peers, self.device = list(peers), device
        self.lost: set[int] = set()
        self.helped = 0  # pieces solved by peers
        self.help_calls = 0  # calls that carried them
        self.local_s = 0.0  # solving this stage's own share
        self.wait_s = 0.0   # then waiting for the peers' shares

    def solve(self, items: list[tuple], batch: bool = False) -> list[PruneResult]:
        helpers = [j for j in range(len(self.peers)) if j not in self.lost]
        runs = spread.bundles(items) if batch else None
        shares = spread.assign([tuple(W.shape) for W, _, _ in items], [kw for _, _, kw in items], 1 + len(helpers),
                               runs)
        calls = []
        for peer, whole in zip(helpers, shares[1:]):
            for share in help_calls(items, whole) if whole else []:
                hs: dict[int, tuple[int, torch.Tensor]] = {}  # id of a Hessian -> (its index here, it): once a call
                payload = []
                for p in share:
                    group = range(p.item, p.item + p.count)
                    for i in group:
                        hs.setdefault(id(items[i][1]), (len(hs), items[i][1]))
                    a, b = p.rows
                    payload.append(([hs[id(items[i][1])][0] for i in group], [pack(items[i][0][a:b]) for i in group],
                                    _wire(items[p.item][2], p.rows)))
                hessians = [pack(H) for _, H in hs.values()]  # in index order (dicts keep insertion order)
                calls.append((peer, share, self.peers[peer].help.remote(hessians, payload)))
                self.help_calls += 1
        t0 = time.perf_counter()
        done = spread.solve_here(items, shares[0])
        t1 = time.perf_counter()
        self.local_s += t1 - t0
        for peer, share, ref in calls:
            if peer in self.lost:  # an earlier call found it gone: its later calls are solved here
                done += spread.solve_here(items, share)
                continue
            try:
                got = ray.get(ref)
                for p, results in zip(share, got):
                    done += spread.unbundle(items, p, [_unpack_result(r, self.device) for r in results])
                self.helped += len(share)
            except ray.exceptions.RayError as e:
                from .driver import _is_loss
                if _is_loss(e):
                    self.lost.add(peer)
                done += spread.solve_here(items, share)  # an error of the solve itself is raised here, named
        self.wait_s += time.perf_counter() - t1
        return spread.merge(items, done)


def _wire(kw: dict, rows: tuple[int, int]) -> dict:
    """A piece's solver options for the trip: a fixed mask cut to its rows, as numpy."""
    if kw.get("mask") is None:
        return kw
    return dict(kw, mask=pack(kw["mask"][rows[0]:rows[1]]))


class Stage:
    """Decoder layers `layer_ids` of the model in `folder`; see the module docstring."""

    def __init__(self, index: int, device: str = "auto", threads: int | None = None):
        t0 = time.time()
        if threads:
            torch.set_num_threads(threads)
        self.heap_capped = cap_heap()
        self.index = index
        self.device = stage_device(device)
        self.events: list[tuple[str, float, float]] = [("init", t0, time.time())]
        self.busy = 0.0
        self.failed: BaseException | None = None
        self.t_ready = time.time()
        self.base_rss_mb = current_rss_mb()
        self.pool: StagePool | None = None
        self.help_events: list[tuple[str, float, float]] = []  # from the "help" thread
        self.help_busy = 0.0
        self.help_calls = 0  # help calls served (StagePool.help_calls counts those this stage sent)

    def ready(self) -> dict:
        """What torch sees here; the driver resolves its configuration for this device."""
        return {"stage": self.index, "device": self.device, "pid": os.getpid()}

    def warm(self, folder: str, model: str | None) -> None:
        """Read the model's config and shard headers, and import its modeling code: the slow part of
        a fresh process, done while the driver tokenizes."""
        def f(folder):
            # A URI (s3://...) is read by range from here, whatever the node; a local folder that is not
            # here (another node: the driver's converted copy of a .gguf) is resolved again from --model.
            if not loading.remote.is_uri(folder) and not os.path.isdir(folder):
                from pipeline.run import model_folder
                folder = str(model_folder(model))
            self.files = loading.ModelFiles(folder)
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
            try:
                MODEL_FOR_CAUSAL_LM_MAPPING[type(self.files.config)]
            except KeyError:
                pass  # setup reports unsupported architectures
        self._timed("warm", f, folder)

    def setup(self, layer_ids: list[int], spec: PruneSpec, mode: str, out: str, dtype: str, device: str,
              sink=None) -> None:
        """The slice: a meta skeleton (no weights yet), the output, and the routing for `mode`."""
        def f():
            if device != self.device:
                raise RuntimeError(f"this stage's torch sees {self.device} but the first stage's sees {device}; "
                                   f"use a cluster whose stage nodes all have GPUs, or none")
            self.layer_ids, self.spec, self.mode, self.sink = list(layer_ids), spec, mode, sink
            self.trunk = Trunk(self.files, self.device, getattr(torch, dtype))
            self.store = OutputDir(out)
            self.trunk.tied_source = self._tied_source
            self.hf = "calib_dense" if mode == "dense" else "calib"
            self.kwargs: dict | None = None  # per batch shape, each layer's (args, kwargs)
            self.main: SliceRunner | None = None
            self.post: SliceRunner | None = None
            self.inbox: dict[str, list[torch.Tensor]] = {s: [] for s in STREAMS}
            self.outbox: dict[str, list[torch.Tensor | None]] = {}
            self.ran = False
        self._timed("setup", f)
        self.base_rss_mb = current_rss_mb()  # torch, transformers and the skeleton: before any weight
        self.base_private_mb = RssWatch.sample()[0]
        self.watch = RssWatch()

    # -- bookkeeping -------------------------------------------------------------------------
    def _timed(self, name: str, fn, *args):
        if self.failed is not None:  # later calls report the first failure, not a consequence of it
            try:
                again = type(self.failed)(*self.failed.args)
            except Exception:  # noqa: BLE001 - an exception type with another constructor
                again = RuntimeError(str(self.failed))
            raise again
        t0 = time.time()
        try:
            return fn(*args)
        except Exception as e:
            if e.args and isinstance(e.args[0], str) and not e.args[0].startswith("stage "):
                e.args = (f"stage {self.index}: {e.args[0]}",) + e.args[1:]  # whichever call reports it
            self.failed = e
            raise
        finally:
            t1 = time.time()
            self.busy += t1 - t0
            if self.events and self.events[-1][0] == name and t0 - self.events[-1][2] < 0.01:
                self.events[-1] = (name, self.events[-1][1], t1)  # merge runs of small calls
            else:
                self.events.append((name, t0, t1))

    def _tied_source(self, j: int) -> tuple[dict, dict]:
        """Layer j's committed tensors and report, for a layer here that uses weights tied to it
        (Zamba2's shared block, pruned once by its owner j in an earlier stage; the report says which
        tied weights j left to the later layers that multiply them). In sequential mode j is committed
        before this stage starts; in stagewise and dense modes this waits for the commit (the owner
        never waits on a later stage, so this cannot deadlock; a lost owner stage ends the attempt)."""
        while j not in self.store.committed():
            time.sleep(0.2)
        return self.store.load_layer(j)

    def _on_layer(self, i: int, report: dict) -> None:
        return_freed_memory()
        if self.sink is not None:
            try:  # progress only: a lost progress actor must not cost the layer (the driver shows it later)
                self.sink.put.remote((self.index, i, report))
            except Exception:  # noqa: BLE001
                self.sink = None

    def _runner(self, store=True) -> SliceRunner:
        return SliceRunner(self.trunk, self.layer_ids, self.spec, self.kwargs, self.hf,
                           self.store if store else None, self._on_layer, pool=self.pool if store else None)

    def _receive(self, stream: str, t: torch.Tensor) -> None:
        if stream == "eval_pruned":
            if not self.ran:
                self.main.push("eval_pruned", t)
            else:  # after the run: through the committed layers, loaded back
                if self.post is None:
                    self.post = SliceRunner(self.trunk, self.layer_ids, self.spec, self.kwargs, self.hf, self.store,
                                            lambda i, report: return_freed_memory())
                self.post.push("eval_pruned", t)
        elif self.mode == "sequential":
            self.main.push(self.hf if stream == "calib" else stream, t)
        else:
            self.inbox[stream].append(t)

    # -- what the driver calls -----------------------------------------------------------------
    def set_peers(self, stages: list) -> None:
        """The other stages, to spread this stage's solves over (sequential mode)."""
        self.pool = StagePool([a for j, a in enumerate(stages) if j != self.index], self.device)

    @ray.method(concurrency_group="help")
    def help(self, hessians: list, payload: list) -> list:
        """Solve pieces of another stage's phase (its own thread: see StagePool): per piece, its
        Hessians' indices, its weights (one, or a bundle of experts for one batched call) and its
        options. Results travel back as numpy; nothing is kept here."""
        t0 = time.time()
        try:
            torch.set_num_threads(torch.get_num_threads())  # this thread's OpenMP setting, as the stage's
            return_freed_memory()  # what earlier calls freed is handed back before this one takes more
            H = [unpack(h, self.device) for h in hessians]
            out = []
            for hs, ws, kw in payload:
                if kw.get("mask") is not None:
                    kw = dict(kw, mask=unpack(kw["mask"], self.device))
                Ws = [unpack(w, self.device) for w in ws]
                res = prune_many(Ws, [H[h] for h in hs], **kw) if len(Ws) > 1 else [prune_with_info(Ws[0], H[hs[0]], **kw)]
                out.append([_pack_result(r) for r in res])
            return out
        finally:
            t1 = time.time()
            self.help_calls += 1
            self.help_busy += t1 - t0
            self.help_events.append(("help", t0, t1))

    def embed(self, calib_ids: np.ndarray, eval_ids: np.ndarray | None, batch_size: int):
        """First stage: hidden states entering layer 0 for every stream; returns the per-layer
        keyword arguments (on CPU) for the other stages."""
        return self._timed("embed", self._embed, calib_ids, eval_ids, batch_size)

    def _embed(self, calib_ids, eval_ids, batch_size):
        hidden, calls = self.trunk.embed(data.batches(torch.from_numpy(np.array(calib_ids)), batch_size))
        ev = []
        if eval_ids is not None:
            ev, ev_calls = self.trunk.embed(data.batches(torch.from_numpy(np.array(eval_ids)), batch_size))
            for key, c in ev_calls.items():  # another batch shape: its own call arguments
                calls.setdefault(key, c)
        release(self.trunk, self.trunk.before)  # the embeddings are done with: not held while layers are solved
        self.kwargs = calls
        self.main = self._runner()
        for b in hidden:
            self._receive("calib", b)
            if self.mode == "sequential" and self.spec.blending:
                self._receive("calib_dense", b)
        for b in ev:
            self._receive("eval_dense", b)
            self._receive("eval_pruned", b)
        return to_device(calls, "cpu")

    def set_kwargs(self, kwargs: dict) -> None:
        self.kwargs = to_device(kwargs, self.device)
        self.main = self._runner()

    def push(self, stream: str, batch: tuple[str, np.ndarray]) -> None:
        """One batch from upstream; in sequential mode the first Hessian accumulates right away."""
        self._timed("push", lambda: self._receive(stream, unpack(batch, self.trunk.device)))

    def dense_pass(self, emit: list[str]) -> dict:
        """stagewise / dense: forward the buffered streams through the dense slice for the next stage
        (`emit`), then hand calib to the runner. Returns the number of batches per emitted stream."""
        return self._timed("dense", self._dense_pass, emit)

    def _dense_pass(self, emit):
        names = {"calib": "calib_dense", "eval_dense": "eval_dense"}
        aux = self._runner(store=False)  # stream names that never trigger Hessian accumulation
        for stream in emit:
            for b in self.inbox[stream]:
                aux.push(names[stream], b)
            self.outbox[stream] = aux.dense_outputs(names[stream])
            return_freed_memory()
        for b in self.inbox["calib"]:
            self.main.push(self.hf, b)
            if self.hf == "calib" and self.spec.blending:  # stagewise: the blend's dense stream, inside the stage
                self.main.push("calib_dense", b)
        self.inbox = {s: [] for s in STREAMS}
        return {s: len(self.outbox[s]) for s in emit}

    def run(self) -> dict:
        return self._timed("run", self._run)

    def _run(self):
        reports = self.main.run()
        self.ran = True
        active = self.main.active
        if self.mode == "sequential":
            for stream, name in (("calib", self.hf), ("calib_dense", "calib_dense"), ("eval_dense", "eval_dense"),
                                 ("eval_pruned", "eval_pruned")):
                if name in active:
                    self.outbox[stream] = self.main.streams[name]
        elif "eval_pruned" in active:
            self.outbox["eval_pruned"] = self.main.streams["eval_pruned"]
        self.main.streams = {s: [] for s in self.main.streams}  # outputs now live in the outbox only
        return {"reports": reports, "solved": self.main.solved, "dense_seconds": self.main.dense_seconds}

    def post_pass(self) -> int:
        """eval_pruned that arrived after the run: through this stage's committed layers."""
        return self._timed("post", self._post_pass)

    def _post_pass(self):
        self.post.run()
        self.outbox["eval_pruned"] = self.post.streams["eval_pruned"]
        self.post = None
        return len(self.outbox["eval_pruned"])

    def take(self, stream: str, j: int) -> tuple[str, np.ndarray]:
        """Batch j of an output stream, for the next stage; the stage lets go of it."""
        def f():
            t = self.outbox[stream][j]
            self.outbox[stream][j] = None
            return pack(t)
        return self._timed("take", f)

    def nll(self, eval_ids: np.ndarray, batch_size: int) -> dict:
        """Last stage: summed NLL and token count of the dense and pruned evaluation streams."""
        def f():
            ids = data.batches(torch.from_numpy(np.array(eval_ids)), batch_size)
            return {k: self.trunk.nll(self.outbox[k], ids) for k in ("eval_dense", "eval_pruned")}
        return self._timed("nll", f)

    def facts(self) -> dict:
        import ray

        now = time.time()
        events = sorted(self.events + self.help_events, key=lambda e: e[1])
        last = max(e[2] for e in events)
        out = {"stage": self.index, "layers": self.layer_ids, "device": self.device, "pid": os.getpid(),
               "node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
               "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()], "torch_threads": torch.get_num_threads(),
               "openmp": threads.facts(),
               "busy_s": round(self.busy + self.help_busy, 3), "help_s": round(self.help_busy, 3),
               "helped_pieces": self.pool.helped if self.pool else 0,
               "help_calls_sent": self.pool.help_calls if self.pool else 0, "help_calls_served": self.help_calls,
               "own_share_s": round(self.pool.local_s, 3) if self.pool else 0.0,
               "waited_for_peers_s": round(self.pool.wait_s, 3) if self.pool else 0.0,
               "idle_s": round(max(0.0, last - self.t_ready - self.busy - self.help_busy), 3),
               "init_s": round(self.t_ready - self.events[0][1], 3),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "base_rss_mb": self.base_rss_mb, "rss_now_mb": current_rss_mb(), "shared_rss_mb": shared_rss_mb(),
               "heap_capped": self.heap_capped,
               # what this stage read of the model: its layers, the shards' headers, the parts it owns
               **self.files.counters(),
               **({"base_private_rss_mb": round(self.base_private_mb, 1),
                   "peak_private_rss_mb": round(self.watch.private_mb, 1),
                   "peak_private_at": self.watch.private_at,
                   "peak_shared_rss_mb": round(self.watch.shared_mb, 1)} if hasattr(self, "watch") else {}),
               "events": [(n, round(a, 4), round(b, 4)) for n, a, b in events], "clock": now}
        if self.device == "cuda":
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out
