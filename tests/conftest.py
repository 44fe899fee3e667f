"""Import `limoe_kernels` before any test module imports torchvision or open_clip (which import triton
through torch._dynamo), so that on a machine without CUDA Triton's interpreter is on from the
start and the Triton ops run on CPU tensors in every test, whatever the collection order."""

import limoe_kernels  # noqa: F401

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A random-initialised limoe-tiny model file (seed 0): what the evaluation and tuning tests
    read when they need a model but not a trained one."""
    return _model_file(tmp_path_factory, "tiny", [])


def _model_file(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    """A random-initialised limoe-tiny with `overrides` (seed 0), saved as a model file."""
    import torch

    from limoe.checkpoints import save_model_file
    from limoe.config import Config, load_model_config
    from limoe.model.tower import build_model

    torch.manual_seed(0)
    config = Config(model=load_model_config("limoe-tiny", overrides))
    path = tmp_path_factory.mktemp("model") / f"{name}.safetensors"
    save_model_file(build_model(config), config, path)
    return path


@pytest.fixture(scope="module")
def audio_checkpoint(tmp_path_factory) -> Path:
    """A random-initialised image-text-audio limoe-tiny reading one-second clips (seed 0): what the
    audio evaluation and routing tests read."""
    return _model_file(tmp_path_factory, "audio", ["modalities=[image, text, audio]", "audio.clip_seconds=1.0"])


@pytest.fixture(scope="module")
def video_checkpoint(tmp_path_factory) -> Path:
    """A random-initialised image-text-video limoe-tiny (`tests.helpers.VIDEO_MODEL`, seed 0): what
    the video evaluation and routing tests read."""
    from tests.helpers import VIDEO_MODEL

    return _model_file(tmp_path_factory, "video", VIDEO_MODEL)
