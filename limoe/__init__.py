"""limoe: LIMoE-style sparse mixture-of-experts contrastive image-text models.

The model (`limoe.model.tower.Limoe`) is one transformer tower for images and text whose MoE blocks
route both modalities' tokens jointly with top-1 Batch Priority Routing. open_clip's entry points
are here too (`limoe.factory`): `create_model_and_transforms`, `create_model`, `get_tokenizer`,
`list_models`; they are imported on first use, so that `import limoe` and the command line stay quick.
"""

import importlib
import os

__version__ = "0.1.0"

if "DS_ACCELERATOR" not in os.environ:
    # DeepSpeed probes for an accelerator on import and warns when it falls back to the CPU;
    # say which one it is so a CPU machine runs quietly.
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"

import limoe_kernels  # noqa: E402,F401  (first: on a machine without CUDA it switches Triton's interpreter on, see kernels/__init__.py)


_API = ("create_model", "create_model_and_transforms", "get_tokenizer", "list_models")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("limoe.factory"), name)
    raise AttributeError(f"module 'limoe' has no attribute {name!r}")
