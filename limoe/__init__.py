"""limoe: LIMoE-style sparse mixture-of-experts contrastive image-text models.

The model (`limoe.model.tower.Limoe`) is one transformer tower for images and text whose MoE blocks
route both modalities' tokens jointly with top-1 Batch Priority Routing.
"""

import os

__version__ = "0.1.0"

if "DS_ACCELERATOR" not in os.environ:
    # DeepSpeed probes for an accelerator on import and warns when it falls back to the CPU;
    # say which one it is so a CPU machine runs quietly.
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"

import limoe_kernels  # noqa: E402,F401  (first: on a machine without CUDA it switches Triton's interpreter on, see kernels/__init__.py)
