"""How to find a model's decoder layers and the matrices to prune.

The generic adapter covers any HF causal LM whose decoder layers form a ModuleList: it prunes every
matrix a layer multiplies by (linear weights, Conv1D, fused experts) and learns which share an
input, and in what order they run, by tracing one real forward (`plan_layer`). Family files only
name what differs.
"""
from .generic import Adapter, Plan, Unit, UnsupportedModel, plan_layer
from .families import FAMILIES, get_adapter

__all__ = ["Adapter", "Plan", "Unit", "UnsupportedModel", "plan_layer", "FAMILIES", "get_adapter"]
