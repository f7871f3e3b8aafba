"""What differs per family: only names, where the largest ModuleList is not the decoder stack.
Everything else (which matrices, their order, experts, taps) is learned from a traced forward."""
from __future__ import annotations

from .generic import Adapter, UnsupportedModel

FAMILIES: dict[str, Adapter] = {
    "opt": Adapter(family="opt", layers="model.decoder.layers"),
}

# Architectures known not to be decoder-only causal LMs with a layer list we can stream.
_REFUSED = {"t5", "bart", "whisper", "vit", "bert", "clip"}


def get_adapter(config) -> Adapter:
    mt = getattr(config, "model_type", "")
    if mt in _REFUSED or getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(f"unsupported architecture {mt!r}: only decoder-only causal LMs")
    return FAMILIES.get(mt, Adapter(family=mt or "generic"))
