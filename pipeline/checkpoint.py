"""The only code that writes to `--out`: per-layer commits, resume, and the final checkpoint.

Layout of an output (a local folder, or any URI pyarrow.fs opens: s3://, gs://, ...), for a model
of 30 decoder layers:

    .mwprune/fingerprint.json              what determines the result; a rerun resumes only if equal
    .mwprune/layers/00012.json             layer 12's report; written after its tensors = the commit
    model-00013-of-00031.safetensors       layer 12's tensors (a shard of the final checkpoint)
    model-00031-of-00031.safetensors       everything outside the decoder layers (embeddings, norm, head)
    model.safetensors.index.json           weight_map and metadata.total_size
    tokenizer files, report.json
    config.json                            written last: until it appears the folder is not a model
    .mwprune/lock                          while a run writes: who holds the folder (see `OutputDir.lock`)

Every shard sits at the top level because serving engines look only there: vLLM's DefaultModelLoader
(vllm/model_executor/model_loader/default_loader.py, `_prepare_weights`) globs `<folder>/*.safetensors`
and then keeps only the files that model.safetensors.index.json names (weight_utils.py,
`filter_duplicate_safetensors_files`); SGLang's DefaultModelLoader (python/sglang/srt/model_loader/
loader.py, `_prepare_weights`) does the same (read at vLLM 00b5ad07, SGLang 005cbe0e). Shards in a
subfolder are not globbed and the index only filters (vLLM reads the files the index names only when
the glob finds none; SGLang never), so with a subfolder those engines saw the non-layer shard alone.

Every file is written to a temporary name and renamed (local), or put as one object (object
stores, where a put is atomic), so a crash never leaves a half-written file under a final name.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import posixpath
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path

import torch

from .loading import is_small_file

STATE = ".mwprune"
MARK = "mwprune-run"
LOCK = f"{STATE}/lock"
# Object stores have no locks: a lease object whose heartbeat is renewed every LEASE_SECONDS / 4 and
# that any run may take over once it is LEASE_SECONDS old (or at once, on the holder's own host, when
# the holder's process is gone). Clocks of the hosts sharing a bucket must agree to within a lease.
LEASE_SECONDS = 60.0
LEASE_SETTLE = 1.0  # seconds between writing a lease and reading it back (two runs racing for it)


class OutputError(ValueError):
    pass


class OutputBusy(OutputError):
    """Another live run holds --out."""


def _open_fs(uri: str):
    import pyarrow.fs as pafs

    from . import remote
    if remote.is_uri(uri):  # S3 with bounded timeouts and retries, endpoint from AWS_ENDPOINT_URL
        fs, path = remote.filesystem(uri)
        return fs, path, False
    return pafs.LocalFileSystem(), str(Path(uri).absolute()), True


def fingerprint_digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_name(index: int, n_layers: int) -> str:
    """Layer `index`'s shard; index == n_layers names the shard of everything else (the last one)."""
    return f"model-{index + 1:05d}-of-{n_layers + 1:05d}.safetensors"


def safetensors_header(read) -> dict:
    """A safetensors header (tensor names, dtypes, shapes, byte ranges) from `read(n)` at the file's
    start: an 8-byte little-endian length, then that many bytes of JSON."""
    return json.loads(read(int.from_bytes(read(8), "little")))


class OutputDir:
    def __init__(self, uri: str):
        from .remote import redact
        self.uri = redact(uri)  # in every message: never a credential
        self.fs, self.root, self.local = _open_fs(uri)
        self._n_layers: int | None = None

    # -- plain file operations -------------------------------------------------------------
    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        dst = self.path(rel)
        self.fs.create_dir(posixpath.dirname(dst), recursive=True)
        if not self.local:  # an object put is atomic on object stores
            with self.fs.open_output_stream(dst) as f:
                f.write(data)
            return
        tmp = dst + ".tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, dst)

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, default=str).encode())

    def listdir(self, rel: str) -> list[str]:
        import pyarrow.fs as pafs
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return [posixpath.basename(i.path) for i in self.fs.get_file_info(sel)]

    # -- run state -------------------------------------------------------------------------
    def complete(self) -> bool:
        return self.exists("config.json") and self.exists(f"{STATE}/fingerprint.json")

    def check_ours(self) -> None:
        """Refuse, before writing anything, a folder that holds something other than a run of this tool."""
        entries = self.listdir("")
        if not entries or self.exists(f"{STATE}/fingerprint.json"):
            return
        if entries == [STATE] and set(self.listdir(STATE)) <= {"lock", "lock.tmp", "fingerprint.json.tmp"}:
            return  # a run between taking the lock and writing its fingerprint (or that died there)
        raise OutputError(f"--out {self.uri} is not empty and is not a run of this tool; refusing to write there")

    def begin(self, fingerprint: dict, overwrite: bool = False) -> str:
        """Claim the folder for this run. Returns 'new', 'resume' or 'complete'.

        Refuses a folder that holds anything but a run of this tool, a run of this tool with a
        different fingerprint (unless overwrite, which only ever deletes runs of this tool), and a
        folder another live run holds (OutputBusy). On success this run holds the folder's lock
        until `release()` (or until its process ends).
        """
        digest = fingerprint_digest(fingerprint)
        self.check_ours()
        self.lock()
        try:
            # Read only now: the run that held the lock may have written the fingerprint meanwhile.
            if self.exists(f"{STATE}/fingerprint.json"):
                old = json.loads(self.read_bytes(f"{STATE}/fingerprint.json"))
                if old.get("mark") != MARK:
                    raise OutputError(f"--out {self.uri} holds an unrecognised state file; refusing to write there")
                if old.get("digest") != digest:
                    if not overwrite:
                        changed = sorted(k for k in set(old.get("parts", {})) | set(fingerprint)
                                         if old.get("parts", {}).get(k) != fingerprint.get(k))
                        raise OutputError(f"--out {self.uri} holds a different run (differs in: {', '.join(changed) or '?'}); "
                                          f"use a new --out, or --overwrite to replace it")
                    self._clear_but_lock()
                elif self.complete():
                    return "complete"
                else:
                    return "resume"
            self.write_json(f"{STATE}/fingerprint.json", {"mark": MARK, "digest": digest,
                                                          "parts": json.loads(json.dumps(fingerprint, default=str))})
            return "new"
        except BaseException:
            self.release()
            raise

    def _clear_but_lock(self) -> None:
        """--overwrite: delete the earlier run, but not the lock this run holds."""
        for name in self.listdir(""):
            if name != STATE:
                self._delete(name)
        for name in self.listdir(STATE):
            if f"{STATE}/{name}" != LOCK:
                self._delete(f"{STATE}/{name}")

    def _delete(self, rel: str) -> None:
        import pyarrow.fs as pafs
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type != pafs.FileType.NotFound:
            self.fs.delete_file(self.path(rel))

    # -- the lock: one writer per --out --------------------------------------------------------
    def lock(self) -> None:
        """Hold --out for this process, or raise OutputBusy naming the run that holds it.

        Local folders (and network file systems with working locks): an exclusive flock on
        .mwprune/lock, which the kernel drops when the holding process ends, however it ends, so a
        crashed run never leaves the folder stuck. Object stores: a lease object renewed by a
        heartbeat thread (see LEASE_SECONDS). The file names its holder: pid, host, process start.
        """
        if getattr(self, "_lock", None) is not None:
            return
        lock = None
        if self.local:
            try:
                lock = _FileLock(self.path(LOCK))
                lock.acquire(_holder(), self.uri)
            except OSError as e:  # a file system without flock: fall back to the lease
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                lock = None
        if lock is None:
            lock = _Lease(self, LOCK)
            lock.acquire(_holder(), self.uri)
        self._lock = lock
        self._release = weakref.finalize(self, lock.release)  # if a caller forgets release()

    def release(self) -> None:
        """Give up the lock taken by begin(); safe to call more than once."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            self._release.detach()
            lock.release()

    def n_layers(self) -> int:
        """The model's decoder layer count, from the fingerprint (shard names carry it). Read from
        the state file, not passed in, so that Ray stages, which only open the folder, name shards
        exactly as the driver that claimed it."""
        if self._n_layers is None:
            parts = json.loads(self.read_bytes(f"{STATE}/fingerprint.json")).get("parts", {})
            if not isinstance(parts.get("n_layers"), int):
                raise OutputError(f"--out {self.uri}: the run's fingerprint has no layer count")
            self._n_layers = parts["n_layers"]
        return self._n_layers

    def committed(self) -> set[int]:
        return {int(n.split(".")[0]) for n in self.listdir(f"{STATE}/layers") if n.endswith(".json")}

    def commit_layer(self, index: int, tensors: dict[str, torch.Tensor], report: dict) -> None:
        from safetensors.torch import save
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise FloatingPointError(f"layer {index}: tensor {name} has NaN or Inf; not committed")
        blob = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
        self.write_bytes(shard_name(index, self.n_layers()), blob)
        self.write_json(f"{STATE}/layers/{index:05d}.json", report)  # the commit point

    def load_layer(self, index: int) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors.torch import load
        tensors = load(self.read_bytes(shard_name(index, self.n_layers())))
        report = json.loads(self.read_bytes(f"{STATE}/layers/{index:05d}.json"))
        return tensors, report

    def shard_header(self, rel: str) -> dict:
        """A shard's header, read without reading its tensors."""
        with self.fs.open_input_file(self.path(rel)) as f:
            return safetensors_header(f.read)

    def finalize(self, model_folder: Path, rest: dict[str, torch.Tensor], layer_names: dict[int, list[str]],
                 report: dict) -> None:
        """Write everything outside the decoder layers, the index and the report; config.json last.

        The index is built from the committed shards' own headers, whatever names they hold (the
        layer code decides those); `layer_names` only says which layers there are.
        """
        from safetensors.torch import save
        n = self.n_layers()
        if sorted(layer_names) != list(range(n)):
            raise OutputError(f"--out {self.uri}: finalize needs layers 0..{n - 1}, got {sorted(layer_names)}")
        rest_name = shard_name(n, n)
        blob = save({k: v.contiguous() for k, v in rest.items()}, metadata={"format": "pt"})
        self.write_bytes(rest_name, blob)
        weight_map, total = {}, 0
        headers = [(shard_name(i, n), self.shard_header(shard_name(i, n))) for i in range(n)]
        headers.append((rest_name, safetensors_header(io.BytesIO(blob).read)))
        for shard, header in headers:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in weight_map:
                    raise OutputError(f"tensor {name} is in both {weight_map[name]} and {shard}")
                weight_map[name] = shard
                total += info["data_offsets"][1] - info["data_offsets"][0]
        # total_size: bytes of tensor data, as transformers' save_pretrained writes it.
        self.write_json("model.safetensors.index.json", {"metadata": {"total_size": total},
                                                         "weight_map": dict(sorted(weight_map.items()))})
        for f in sorted(Path(model_folder).iterdir()):  # tokenizer, generation config, chat template...
            if f.is_file() and f.name != "config.json" and is_small_file(f.name, f.stat().st_size):
                self.write_bytes(f.name, f.read_bytes())
        self.write_json("report.json", report)
        self.write_bytes("config.json", (Path(model_folder) / "config.json").read_bytes())


# -- lock internals ------------------------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder() -> dict:
    now = time.time()
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
            "token": uuid.uuid4().hex, "since": now, "heartbeat": now, "lease_seconds": LEASE_SECONDS}


def _alive(holder: dict) -> bool | None:
    """Is the holding process still running? None when it cannot be told from here (another host)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    start = _proc_start(holder["pid"])
    if holder.get("start") is not None and start is not None:
        return start == holder["start"]
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(uri: str, holder: dict | None, lease: bool = False) -> OutputBusy:
    if not holder:
        who = "another run"
    else:
        since = time.strftime("%H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
        who = f"another run (pid {holder.get('pid')} on {holder.get('host')}, since {since})"
        if lease:
            age = time.time() - holder.get("heartbeat", 0)
            who += f", last heartbeat {age:.0f}s ago; its lease lapses after {holder.get('lease_seconds', LEASE_SECONDS):g}s without one"
    return OutputBusy(f"--out {uri} is being written by {who}; wait for it to finish, or use another --out")


class _FileLock:
    def __init__(self, path: str):
        self.path, self.fd = path, None

    def acquire(self, holder: dict, uri: str) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    text = os.pread(fd, 4096, 0)
                    info = json.loads(text) if text else None
                except ValueError:  # the holder is writing it right now
                    info = None
                os.close(fd)
                raise _busy(uri, info) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder unlinks the file on release: if it did so between our open and our
            # flock, we hold a lock on a file nobody else will see. Start again on the current file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: a waiting run then retries on a fresh file
        except FileNotFoundError:
            pass
        os.close(fd)


class _Lease:
    """A lease object on a store without locks: written, read back after LEASE_SETTLE (the last of
    two racing writers wins), renewed by a heartbeat thread, deleted on release."""

    def __init__(self, out: OutputDir, rel: str):
        self.out, self.rel = out, rel
        self.holder = None
        self.stop = threading.Event()
        self.thread = None
        self.lost = False

    def _read(self) -> dict | None:
        try:
            return json.loads(self.out.read_bytes(self.rel))
        except (FileNotFoundError, OSError, ValueError):
            return None

    def acquire(self, holder: dict, uri: str) -> None:
        old = self._read()
        if old is not None and old.get("token") != holder["token"]:
            alive = _alive(old)
            fresh = time.time() - old.get("heartbeat", 0) < old.get("lease_seconds", LEASE_SECONDS)
            if alive or (alive is None and fresh):
                raise _busy(uri, old, lease=True)
        self.out.write_json(self.rel, holder)
        time.sleep(LEASE_SETTLE)
        now = self._read()
        if now is None or now.get("token") != holder["token"]:
            raise _busy(uri, now, lease=True)
        self.holder = holder
        self.thread = threading.Thread(target=self._beat, name="mwprune-lease", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        period = max(0.05, self.holder["lease_seconds"] / 4)
        while not self.stop.wait(period):
            now = self._read()
            if now is None or now.get("token") != self.holder["token"]:
                self.lost = True  # taken over (our heartbeats stopped for a whole lease): say so once
                import sys
                print(f"warning: lost the lease on --out {self.out.uri} to another run", file=sys.stderr, flush=True)
                return
            self.holder = dict(self.holder, heartbeat=time.time())
            try:
                self.out.write_json(self.rel, self.holder)
            except OSError:
                pass  # a transient store error: the next beat tries again

    def release(self) -> None:
        if self.holder is None:
            return
        self.stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        now = self._read()
        if now is not None and now.get("token") == self.holder["token"]:
            self.out._delete(self.rel)
        self.holder = None
