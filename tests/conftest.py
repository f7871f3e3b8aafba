"""Shared fixtures: tiny random models of every family, short texts, the real SmolLM2 folder."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipeline import threads

threads.configure()  # as jobs.prune does, before torch: 2 spinning threads crawl on a busy box
import torch  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = dict(vocab_size=49152, max_position_embeddings=256)


def tiny_config(family: str):
    import transformers as tf
    if family == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=True, **TINY)
    if family == "mistral":  # sliding window shorter than the windows: masks differ from full causal
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, sliding_window=8, **TINY)
    if family == "qwen3":  # layers of two kinds: the per-layer arguments must be captured per layer
        return tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, use_sliding_window=True, sliding_window=8,
                              max_window_layers=1, layer_types=["full_attention", "sliding_attention", "full_attention"],
                              **TINY)
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                            word_embed_proj_dim=64, vocab_size=49152, max_position_embeddings=256)
    if family == "mamba":
        return tf.MambaConfig(hidden_size=64, state_size=8, num_hidden_layers=3, expand=2, time_step_rank=8,
                              vocab_size=49152)
    import tiny_models  # the architecture matrix's configs (2 layers each)
    return tiny_models.config(family)


FAMILIES = ("llama", "mistral", "qwen3", "opt", "mamba")


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    from pipeline import assets
    return assets.default_model_dir()


@pytest.fixture(scope="session")
def texts() -> dict[str, Path]:
    from pipeline import assets
    return {"calib": assets.austen("prideprejudice"), "eval": assets.austen("emma")}


@pytest.fixture(scope="session")
def short_texts(tmp_path_factory, texts) -> dict[str, Path]:
    """The first ~60 kB of each book: enough windows for the tiny runs, fast to tokenize."""
    d = tmp_path_factory.mktemp("texts")
    out = {}
    for k, p in texts.items():
        out[k] = d / f"{k}.txt"
        out[k].write_text(p.read_text()[:60_000])
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, real_model_dir):
    """Factory: a folder with a randomly initialised model of `family` and SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            torch.manual_seed(0)
            d = tmp_path_factory.mktemp(f"tiny-{family}")
            model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
            model.save_pretrained(d)
            for f in real_model_dir.iterdir():
                if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                    shutil.copy(f, d / f.name)
            made[family] = d
        return made[family]

    return make
