"""How to find a model's decoder layers, the modules to prune, and what runs after the layers.

The generic adapter covers any HF causal LM whose decoder layers form a ModuleList: it prunes every
nn.Linear inside a layer and learns which modules share an input, and in what order they run, by
tracing one real forward (`trace_groups`). Family files only name what differs.
"""
from .generic import Adapter, UnsupportedModel, trace_groups
from .families import FAMILIES, get_adapter

__all__ = ["Adapter", "UnsupportedModel", "trace_groups", "FAMILIES", "get_adapter"]
