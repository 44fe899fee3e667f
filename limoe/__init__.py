"""limoe: LIMoE-style sparse mixture-of-experts contrastive image-text models.

The model (`limoe.model.Limoe`) is one transformer tower for images and text whose MoE blocks
route both modalities' tokens jointly with top-1 Batch Priority Routing.
"""

__version__ = "0.1.0"
