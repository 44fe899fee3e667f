"""limoe: LIMoE-style sparse mixture-of-experts contrastive image-text models.

The model (`limoe.model.tower.Limoe`) is one transformer tower for images and text whose MoE blocks
route both modalities' tokens jointly with top-1 Batch Priority Routing. open_clip's entry points
are here too (`limoe.factory`): `create_model_and_transforms`, `create_model`, `get_tokenizer`,
`list_models`, `preprocess_audio` for models with audio and `preprocess_video` for models with
video; they are imported on first use, so that `import limoe` and the command line stay quick.

`import limoe` imports neither torch nor anything else heavy: `limoe --help` answers in a fraction
of a second. Two libraries must still be told about the machine before they are first imported:
DeepSpeed probes for an accelerator on import (and warns when it falls back to the CPU), and Triton
decides on import whether its kernels run on the GPU or in the CPU interpreter (see
`limoe_kernels`). A finder placed first on `sys.meta_path` sees the first import of a library that
brings either (torchvision, open_clip and torch.compile bring Triton) and prepares both just before
it, whichever module asks.
"""

import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("limoe")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "unknown"


def _prepare_accelerator_libraries() -> None:
    """On a machine without CUDA, tell DeepSpeed it is the CPU and switch Triton's interpreter on
    (importing `limoe_kernels` does that, if it comes before Triton)."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    import limoe_kernels  # noqa: F401


def _torch_is_being_imported() -> bool:
    """True while torch's own import runs (it looks Triton up then, without importing it)."""
    return getattr(getattr(sys.modules.get("torch"), "__spec__", None), "_initializing", False)


class _BeforeAcceleratorLibraries:
    """A meta path finder that finds nothing: on the first lookup of a library that imports DeepSpeed
    or Triton (outside torch's own import) it removes itself and runs `_prepare_accelerator_libraries`,
    then lets the ordinary finders continue. Triton itself is not among them: preparing imports it,
    and a module imported from inside its own lookup would be loaded twice."""

    NAMES = ("deepspeed", "open_clip", "torch._dynamo", "torch._inductor", "torchvision")

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname in cls.NAMES and cls in sys.meta_path and not _torch_is_being_imported():
            sys.meta_path.remove(cls)
            _prepare_accelerator_libraries()
        return None


if not {"triton", *_BeforeAcceleratorLibraries.NAMES} & sys.modules.keys():
    sys.meta_path.insert(0, _BeforeAcceleratorLibraries)
else:  # too late to come first; prepare what still can be (Triton's launchers say if it was too late)
    _prepare_accelerator_libraries()


_API = ("create_model", "create_model_and_transforms", "get_tokenizer", "list_models", "preprocess_audio",
        "preprocess_video")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("limoe.factory"), name)
    raise AttributeError(f"module 'limoe' has no attribute {name!r}")
