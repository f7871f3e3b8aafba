"""Models, data and outputs on object stores: URIs opened with pyarrow.fs, read by byte range.

A `--model s3://bucket/path` is never downloaded whole. Each process fetches the small files
(config, tokenizer, generation config, chat template) into a local cache folder, so that
transformers reads them as from any folder; it reads each shard's safetensors header with two ranged
reads (the 8-byte length, then the JSON), and then, for each tensor it loads, only that tensor's
byte range. A stage that owns layers 40-59 of 80 reads those layers' bytes plus the headers.

Endpoint and credentials come from the standard chains: for S3, `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`) names an S3-compatible endpoint (MinIO, a test server); keys come from the
environment, `~/.aws` files or instance roles, as the AWS SDK inside Arrow finds them. Other schemes
(gs://, hdfs://, ...) go to `pyarrow.fs.FileSystem.from_uri` unchanged (not tested here).

Node-local cache, under `$MWPRUNE_CACHE/remote/`: small files and data sources are kept per URI and
per object identity (size and ETag, or modification time where a store has no ETag), tensor byte
ranges per object identity and range, so a restarted stage or a second run on the same node reads
them from disk, and an object that changed (new ETag, size or mtime) is fetched again, never served
stale. Tensor ranges are bounded by
`MWPRUNE_REMOTE_CACHE_GB` (default 20; 0 turns that cache off), oldest first out.

Environment knobs:
    MWPRUNE_REMOTE_ATTEMPTS    tries per S3 request (default 3; the SDK's standard retry strategy)
    MWPRUNE_REMOTE_TIMEOUT     seconds without a byte before a request is given up (default 10)
    MWPRUNE_REMOTE_CACHE_GB    bound of the tensor-range cache per node (default 20; 0 = off)
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import torch

# safetensors dtype names -> torch, for a local folder and a URI alike (pipeline/loading.py); a name
# missing here (or None: this torch lacks the type) is refused with a one-line message.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
          "U64": getattr(torch, "uint64", None),
          "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
          "F8_E5M2": getattr(torch, "float8_e5m2", None)}
MAX_HEADER = 100 << 20  # as safetensors itself: a larger header is a corrupt file
SECRET_KEYS = re.compile(r"(key|secret|token|password|passwd|credential|signature|sig)", re.I)


class RemoteError(ValueError):
    """A one-line bad-input message about a URI (credentials already redacted)."""


def is_uri(s) -> bool:
    return isinstance(s, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", s) is not None


def redact(s: str) -> str:
    """`s` with any credentials in URIs replaced by *** (user:secret@ and secret query values)."""
    s = re.sub(r"(://)[^/@\s]+@", r"\1***@", str(s))
    return re.sub(r"([?&][^=&\s]+)=([^&\s]*)",
                  lambda m: f"{m.group(1)}=***" if SECRET_KEYS.search(m.group(1)) else m.group(0), s)


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise RemoteError(f"{name} must be a number, got {os.environ[name]!r}") from None


def _first_line(e: BaseException) -> str:
    return redact(str(e).splitlines()[0]) if str(e) else type(e).__name__


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a URI. S3 gets bounded timeouts and retries, the
    endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, keys from the URI or the SDK's chain."""
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    if parts.scheme != "s3":
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except Exception as e:  # noqa: BLE001 - an unknown scheme, a bad URI: one line
            raise RemoteError(f"cannot open {redact(uri)}: {_first_line(e)}") from None
        return fs, path.rstrip("/")
    opts: dict = {}
    for k, v in parse_qsl(parts.query):
        if k in ("region", "endpoint_override", "scheme", "session_token"):
            opts[k] = v
        else:
            raise RemoteError(f"unsupported option {k!r} in {redact(uri)} (region, endpoint_override, scheme, session_token)")
    if parts.username or parts.password:
        opts["access_key"], opts["secret_key"] = unquote(parts.username or ""), unquote(parts.password or "")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_override" not in opts:
        opts["endpoint_override"] = endpoint
    timeout = _env_float("MWPRUNE_REMOTE_TIMEOUT", 10)
    attempts = max(1, int(_env_float("MWPRUNE_REMOTE_ATTEMPTS", 3)))
    try:
        fs = pafs.S3FileSystem(connect_timeout=min(timeout, 5.0), request_timeout=timeout,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **opts)
    except Exception as e:  # noqa: BLE001
        raise RemoteError(f"cannot open {redact(uri)}: {_first_line(e)}") from None
    bucket = parts.netloc.rpartition("@")[2]  # as written: hostname would lowercase it
    if not bucket:
        raise RemoteError(f"no bucket in {redact(uri)}")
    return fs, posixpath.join(bucket, unquote(parts.path).lstrip("/")).rstrip("/")


def _cache_root() -> Path:
    from . import assets
    return assets.cache_dir() / "remote"


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:24]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # several processes of a node at once
    tmp.write_bytes(data)
    os.replace(tmp, path)


class RangeCache:
    """Tensor byte ranges on this node's disk, bounded (oldest out first). Each process trims the
    folder back under the bound after its own writes, so the bound holds up to what processes
    write at the same moment."""

    def __init__(self):
        self.root = _cache_root() / "ranges"
        self.limit = int(_env_float("MWPRUNE_REMOTE_CACHE_GB", 20) * 2**30)
        self._total: int | None = None

    def get(self, key: str) -> bytes | None:
        if self.limit <= 0:
            return None
        path = self.root / key[:2] / key
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return data

    def put(self, key: str, data: bytes) -> None:
        if self.limit <= 0 or len(data) > self.limit:
            return
        try:
            _atomic_write(self.root / key[:2] / key, data)
        except OSError:
            return  # a full or read-only disk only costs the cache
        if self._total is None:
            self._total = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())
        else:
            self._total += len(data)
        if self._total > self.limit:
            self._trim()

    def _trim(self) -> None:
        files = []
        for f in self.root.rglob("*"):
            try:
                st = f.stat()
            except OSError:
                continue
            if f.is_file():
                files.append((st.st_mtime, st.st_size, f))
        files.sort()
        total = sum(s for _, s, _ in files)
        for _, size, f in files:
            if total <= self.limit * 0.9:  # trim with a margin, not on every write
                break
            try:
                f.unlink()
                total -= size
            except OSError:
                pass
        self._total = total


class Store:
    """Reads under one URI prefix, counted: bytes and seconds from the store, bytes from the cache."""

    def __init__(self, uri: str):
        self.uri, self.shown = uri.rstrip("/"), redact(uri.rstrip("/"))
        self.fs, self.root = filesystem(self.uri)
        self.bytes_read = 0      # from the store
        self.read_seconds = 0.0  # spent on store requests (metadata, headers, ranges, small files)
        self.requests = 0
        self.cache_bytes = 0     # tensor bytes served from this node's cache instead
        self.small_bytes = 0     # part of bytes_read: whole small files (config, tokenizer, data)
        self._files: dict[str, object] = {}
        self._infos: dict[str, object] = {}
        self.cache = RangeCache()

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def where(self, rel: str = "") -> str:
        return f"{self.shown}/{rel}" if rel else self.shown

    def _fail(self, rel: str, e: BaseException) -> RemoteError:
        """One line naming what is wrong: a missing bucket, a missing key, a refusal, no answer."""
        msg = _first_line(e)
        if isinstance(e, FileNotFoundError) or "NotFound" in msg or "NoSuchKey" in msg:
            bucket = self.root.split("/", 1)[0]
            if urlsplit(self.uri).scheme == "s3" and not self._bucket_exists(bucket):
                return RemoteError(f"bucket {bucket!r} not found ({self.shown})")
            return RemoteError(f"not found: {self.where(rel)}")
        if isinstance(e, PermissionError) or re.search(r"access.?denied|forbidden|\b403\b|InvalidAccessKeyId|"
                                                       r"SignatureDoesNotMatch", msg, re.I):
            return RemoteError(f"access denied to {self.where(rel)}: {msg}")
        if re.search(r"NETWORK_CONNECTION|curlCode|Timeout|timed out|connect", msg, re.I):
            return RemoteError(f"the store for {self.shown} does not answer ({msg})")
        return RemoteError(f"cannot read {self.where(rel)}: {msg}")

    def _bucket_exists(self, bucket: str) -> bool:
        import pyarrow.fs as pafs
        try:
            return self.fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except Exception:  # noqa: BLE001 - cannot tell: say "not found" for the key
            return True

    def info(self, rel: str):
        """FileInfo of an object; RemoteError if it is missing or unreadable."""
        import pyarrow.fs as pafs
        if rel not in self._infos:
            t0 = time.perf_counter()
            try:
                info = self.fs.get_file_info(self.path(rel))
            except Exception as e:  # noqa: BLE001
                raise self._fail(rel, e) from None
            finally:
                self.read_seconds += time.perf_counter() - t0
                self.requests += 1
            if info.type == pafs.FileType.NotFound:
                raise self._fail(rel, FileNotFoundError(rel))
            self._infos[rel] = info
        return self._infos[rel]

    def _handle(self, rel: str):
        """A random-access handle on the object (opening it is one HEAD request), kept open."""
        f = self._files.get(rel)
        if f is None:
            t0 = time.perf_counter()
            try:
                f = self._files[rel] = self.fs.open_input_file(self.path(rel))
            except Exception as e:  # noqa: BLE001
                raise self._fail(rel, e) from None
            finally:
                self.read_seconds += time.perf_counter() - t0
                self.requests += 1
        return f

    def identity(self, rel: str) -> tuple:
        """What changes when the object changes: its size and ETag where the store gives one (S3),
        else its modification time."""
        meta = {}
        try:
            meta = {k.lower(): v for k, v in (self._handle(rel).metadata() or {}).items()}
        except RemoteError:
            raise
        except Exception:  # noqa: BLE001 - a file system without metadata
            pass
        etag = meta.get("etag")
        if etag:
            return (self.info(rel).size, etag.decode() if isinstance(etag, bytes) else str(etag))
        info = self.info(rel)
        return (info.size, info.mtime_ns)

    def list(self, rel: str = "", recursive: bool = False) -> list:
        """FileInfos of the files under `rel` (relative paths in `.path`)."""
        import pyarrow.fs as pafs
        t0 = time.perf_counter()
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=recursive))
        except Exception as e:  # noqa: BLE001
            raise self._fail(rel, e) from None
        finally:
            self.read_seconds += time.perf_counter() - t0
            self.requests += 1
        out = []
        for i in infos:
            if i.type == pafs.FileType.File:
                self._infos[posixpath.relpath(i.path, self.root)] = i
                out.append(i)
        return out

    def _counted(self, rel: str, read) -> bytes:
        """One request: `read()`'s bytes, counted and timed; any failure is one RemoteError line."""
        t0 = time.perf_counter()
        try:
            data = read()
        except Exception as e:  # noqa: BLE001
            raise self._fail(rel, e) from None
        finally:
            self.read_seconds += time.perf_counter() - t0
            self.requests += 1
        self.bytes_read += len(data)
        return data

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        f = self._handle(rel)
        data = self._counted(rel, lambda: f.read_at(length, offset))
        if len(data) != length:
            raise RemoteError(f"corrupt or truncated safetensors file {self.where(rel)}: "
                              f"{length} bytes at {offset} asked for, {len(data)} read")
        return data

    def read_all(self, rel: str) -> bytes:
        def read():
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        return self._counted(rel, read)

    def fetch_to(self, rels: list[str], folder: Path) -> Path:
        """Copy objects `rels` (relative to this prefix) into `folder` under the same names; a folder
        that is complete (its marker written last) is reused as is."""
        if (folder / ".complete").is_file():  # not counted in cache_bytes, which counts tensor bytes
            return folder
        tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
        for rel in rels:
            data = self.read_all(rel)
            self.small_bytes += len(data)
            _atomic_write(tmp / rel, data)
        (tmp / ".complete").write_text("")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process of this node got there first: theirs is the same
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def counters(self) -> dict:
        return {"bytes_read": self.bytes_read, "read_seconds": self.read_seconds, "requests": self.requests,
                "cache_bytes": self.cache_bytes, "small_bytes": self.small_bytes}


# -- safetensors by range ----------------------------------------------------------------------------
def parse_header(raw: bytes, where: str, size: int, n: int) -> dict:
    """The tensors of a safetensors header, checked against the object's size."""
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except ValueError as e:
        raise RemoteError(f"corrupt or truncated safetensors file {where}: unreadable header "
                          f"({_first_line(e)})") from None
    data_size = size - 8 - n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = t["dtype"], [int(d) for d in t["shape"]], t["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise RemoteError(f"corrupt or truncated safetensors file {where}: bad entry for tensor {name}") from None
        if DTYPES.get(dtype) is None:
            raise RemoteError(f"tensor {name} in {where} has dtype {dtype}, which this tool cannot read")
        numel = 1
        for d in shape:
            numel *= d
        itemsize = DTYPES[dtype].itemsize
        if not (0 <= a <= b) or b - a != numel * itemsize:
            raise RemoteError(f"corrupt or truncated safetensors file {where}: tensor {name} has bad offsets")
        if b > data_size:
            raise RemoteError(f"corrupt or truncated safetensors file {where}: tensor {name} ends at byte "
                              f"{8 + n + b}, the object has {size}")
        out[name] = {"dtype": dtype, "shape": shape, "start": 8 + n + a, "end": 8 + n + b}
    return out


def read_header(store: Store, rel: str) -> dict:
    """A shard's tensors from two ranged reads: the 8-byte length, then the JSON header."""
    size = store.info(rel).size
    where = store.where(rel)
    if size < 8:
        raise RemoteError(f"corrupt or truncated safetensors file {where}: {size} bytes, not safetensors")
    n = int.from_bytes(store.read_range(rel, 0, 8), "little")
    if n > MAX_HEADER or 8 + n > size:
        raise RemoteError(f"corrupt or truncated safetensors file {where}: not safetensors "
                          f"(header length {n} for an object of {size} bytes)")
    return parse_header(store.read_range(rel, 8, n), where, size, n)


def read_tensors(store: Store, rel: str, header: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors `names` of shard `rel`, each from its own byte range (ranges that touch are read as
    one request); served from the node's range cache where it holds them."""
    ident = store.identity(rel)
    out: dict[str, bytes] = {}
    missing = []
    for name in names:
        t = header[name]
        key = _key(store.uri, rel, *ident, name, t["start"], t["end"])
        data = store.cache.get(key)
        if data is not None and len(data) == t["end"] - t["start"]:
            out[name] = data
            store.cache_bytes += len(data)
        else:
            missing.append((t["start"], t["end"], name, key))
    missing.sort()
    i = 0
    while i < len(missing):  # runs of adjacent tensors: one request, no byte outside them
        j = i
        while j + 1 < len(missing) and missing[j + 1][0] == missing[j][1]:
            j += 1
        start, end = missing[i][0], missing[j][1]
        blob = memoryview(store.read_range(rel, start, end - start))
        for a, b, name, key in missing[i:j + 1]:
            out[name] = blob[a - start:b - start]  # a view: the one copy is the writable buffer below
            store.cache.put(key, out[name])
        i = j + 1
    tensors = {}
    for name in names:
        t = header[name]
        buf = bytearray(out[name])  # writable: torch.frombuffer shares it
        dtype = DTYPES[t["dtype"]]
        tensors[name] = (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)).reshape(t["shape"])
    return tensors


# -- data sources (--calib, --eval) ------------------------------------------------------------------
def fetch_data(spec: str) -> tuple[Path, str | None]:
    """A data URI (a file, or a dataset folder, optionally FOLDER:SPLIT) copied to this node's cache;
    returns the local path and the split asked for."""
    split = None
    store = Store(spec)
    try:
        files = _data_files(store, spec)
    except RemoteError:
        head, _, tail = spec.rpartition(":")
        if not tail or "/" in tail or not is_uri(head):
            raise
        store, split = Store(head), tail
        files = _data_files(store, head)
    name = posixpath.basename(store.root) or "data"
    if files is None:  # a single object
        key = _key(store.uri, *store.identity(""))
        dest = _cache_root() / "data" / key / name
        if not dest.is_file():
            _atomic_write(dest, store.read_all(""))
        return dest, split
    rels = sorted(posixpath.relpath(i.path, store.root) for i in files)
    key = _key(store.uri, *[(r, *store.identity(r)) for r in rels])
    folder = store.fetch_to(rels, _cache_root() / "data" / key)
    return folder, split


def _data_files(store: Store, spec: str):
    """None for a single object; else the FileInfos under the prefix (a dataset folder)."""
    import pyarrow.fs as pafs
    t0 = time.perf_counter()
    try:
        info = store.fs.get_file_info(store.root)
    except Exception as e:  # noqa: BLE001
        raise store._fail("", e) from None
    finally:
        store.read_seconds += time.perf_counter() - t0
    if info.type == pafs.FileType.File:
        store._infos[""] = info
        return None
    files = store.list("", recursive=True) if info.type == pafs.FileType.Directory else []
    if not files:
        raise store._fail("", FileNotFoundError(spec))
    return files
