"""The model: one transformer tower for images and text with sparse top-1 expert MLPs.

`tower` (the `Limoe` model and its blocks) is built from `layers` (attention, MLP, pooling heads)
and `moe` (the expert layer), which routes with `routing` (groups, capacity, the per-call record)
and computes the auxiliary losses' inputs with `aux_losses`; `info` describes a config in numbers.
"""
