"""What differs per family: only names. Everything else is learned from a traced forward."""
from __future__ import annotations

from .generic import Adapter, UnsupportedModel

def _mamba_taps(layer):
    # transformers' Mamba mixer multiplies by dt_proj.weight directly (bias added in the scan):
    # dt_proj's input is the first time_step_rank features of x_proj's output.
    rank = layer.mixer.time_step_rank
    return {"mixer.dt_proj": ("mixer.x_proj", lambda out: out[..., :rank])}


_LLAMA = Adapter(family="llama", layers="model.layers", tail=("model.norm",))
FAMILIES: dict[str, Adapter] = {
    # LLaMA family: same layout under model.*
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "opt": Adapter(family="opt", layers="model.decoder.layers",
                   tail=("model.decoder.final_layer_norm", "model.decoder.project_out")),
    # Mamba: the mixer's four projections (conv1d is not a Linear and stays dense).
    "mamba": Adapter(family="mamba", layers="backbone.layers", tail=("backbone.norm_f",),
                     prune_only=("in_proj", "x_proj", "dt_proj", "out_proj"), taps=_mamba_taps),
}

# Architectures known not to be decoder-only causal LMs with a layer list we can stream.
_REFUSED = {"t5", "bart", "whisper", "vit", "bert", "clip"}


def get_adapter(config) -> Adapter:
    mt = getattr(config, "model_type", "")
    if mt in _REFUSED or getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(f"unsupported architecture {mt!r}: only decoder-only causal LMs")
    return FAMILIES.get(mt, Adapter(family=f"generic:{mt}"))
