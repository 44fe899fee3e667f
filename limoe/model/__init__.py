"""The model: one transformer tower for images and text with sparse top-1 expert MLPs.

`tower` (the `Limoe` model and its blocks) is built from each modality's embedder
(`limoe.modalities`), `layers` (attention, MLP, pooling heads) and `moe` (the expert layer, on the ops of `limoe_kernels`), which groups tokens with `routing`
(groups, capacity, the per-call record); `aux_losses` names the auxiliary losses' formulas; `info`
describes a config in numbers.
"""
