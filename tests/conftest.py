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


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty huggingface_hub cache with the library in offline mode; `publish(folder, repo_id)`
    puts a model folder into it as a download would (refs/main → snapshots/<commit>/files)."""
    import hashlib
    import shutil

    import huggingface_hub.constants

    from limoe.checkpoints.hub import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    cache = tmp_path / "hf-cache"

    def publish(folder: Path, repo_id: str, files=(CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)) -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        for name in files:
            shutil.copy(folder / name, repo / "snapshots" / commit / name)

    return str(cache), publish
