"""Model folders in Hugging Face Hub layout, and `hf-hub:org/name` references to them.

A folder holds `model.safetensors` (the exported model file: every weight, with the resolved
config embedded), `limoe_config.json` (the same config as JSON: what marks the folder as a limoe
model and what `get_tokenizer` reads without fetching the weights) and `README.md` (a model card
with the architecture, the training recipe and how to load it). The two configs must agree (a
hand-edited `limoe_config.json` would make `get_tokenizer` cut captions at another length than
the weights were trained with), so loading a folder compares them. `limoe export --format hf`
writes one; `huggingface-cli upload org/name FOLDER` publishes it. `hf-hub:org/name` fetches
those files through huggingface_hub's cache, so with `HF_HUB_OFFLINE=1` a cached model loads
without a network, as open_clip's `hf-hub:` models do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from limoe.checkpoints.model_file import config_from_json, read_embedded_config, save_model_file
from limoe.config import Config, to_dict
from limoe.errors import LimoeError
from limoe.files import atomic_write
from limoe.model.info import describe_model
from limoe.model.tower import Limoe

HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "limoe_config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"


def is_hub_reference(reference: str | Path) -> bool:
    return str(reference).startswith(HUB_PREFIX)


def is_model_folder(path: Path) -> bool:
    """A folder in this layout (a training workdir has no `limoe_config.json`)."""
    return (path / CONFIG_FILE).is_file()


def save_model_folder(model: Limoe, config: Config, folder: Path, repo_id: Optional[str] = None,
                      step: Optional[int] = None) -> None:
    """Write `folder` in Hub layout; `repo_id` (org/name) is what the model card tells users to load,
    `step` the training step the weights were taken at (None: the config's train.steps)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(to_dict(config), indent=1) + "\n"))
    card = model_card(config, repo_id or f"<org>/{folder.resolve().name}", step)
    atomic_write(folder / CARD_FILE, lambda tmp: tmp.write_text(card))
    save_model_file(model, config, folder / WEIGHTS_FILE, step=step)


def read_folder_config(folder: Path) -> Config:
    """The folder's `limoe_config.json`, checked against its weights' embedded config when they
    are present (an `hf-hub:` config fetched without its weights is taken as it is)."""
    config = _read_config_file(folder)
    if (folder / WEIGHTS_FILE).is_file():
        check_folder_config(folder, config, read_embedded_config(folder / WEIGHTS_FILE))
    return config


def check_folder_config(folder: Path, config: Config, embedded: Config) -> None:
    """Refuse a model folder whose `limoe_config.json` (`config`) differs from the config embedded
    in its weights (`embedded`), naming the keys that differ."""
    ours, theirs = _flat(to_dict(config)), _flat(to_dict(embedded))
    differing = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
    if differing:
        first = differing[0]
        raise LimoeError(
            f"model folder {folder}: {CONFIG_FILE} disagrees with the config embedded in {WEIGHTS_FILE} on "
            f"{', '.join(differing)} ({first} {ours.get(first)!r} vs {theirs.get(first)!r}); export the folder again "
            f"with `limoe export --format hf` (or restore {CONFIG_FILE})."
        )


def _flat(data: dict, prefix: str = "") -> dict:
    """Nested config keys as dotted names: {"model": {"depth": 2}} → {"model.depth": 2}."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_config_file(folder: Path) -> Config:
    try:
        text = (folder / CONFIG_FILE).read_bytes()
    except OSError as error:
        raise LimoeError(f"cannot read {folder / CONFIG_FILE} ({error}); export the model folder again.") from None
    return config_from_json(text, str(folder / CONFIG_FILE))


def fetch(reference: str, files: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE), cache_dir: Optional[str] = None) -> Path:
    """The local folder holding `files` of the Hub model `hf-hub:org/name`, downloaded into (or
    found in) huggingface_hub's cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    repo_id = reference.removeprefix(HUB_PREFIX)
    try:
        paths = [Path(hf_hub_download(repo_id, name, cache_dir=cache_dir, library_name="limoe")) for name in files]
    except (HfHubHTTPError, EntryNotFoundError, HFValidationError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LimoeError(
            f"cannot fetch {', '.join(files)} of {reference} from the Hugging Face Hub ({reason}); check the name and "
            f"the network, or with HF_HUB_OFFLINE=1 that the model is in the cache."
        ) from None
    return paths[0].parent


def _training_length(config: Config, step: Optional[int]) -> str:
    """'Trained for N steps', with the planned length when the weights come from before the end."""
    planned = config.train.steps
    if step is None or step == planned:
        return f"Trained for {planned} steps"
    return f"Trained for {step} steps (taken at step {step} of a {planned}-step run)"


_AUDIO_TAG = "\n- zero-shot-audio-classification"
_AUDIO_USE = """
audio_features = model.encode_audio(limoe.preprocess_audio("clip.flac", model)[None])  # its centre clip, resampled"""


def model_card(config: Config, repo_id: str, step: Optional[int] = None) -> str:
    """A model card: Hub metadata, the architecture, the training recipe (with the step the weights
    were taken at), and how to load the model (and, for a model with audio, how to encode clips)."""
    train, sources = config.train, ", ".join(f"`{source.shards}`" for source in config.data.train)
    modalities = config.model.modalities
    audio = "audio" in modalities
    return f"""---
library_name: limoe
tags:
- limoe
- clip
- mixture-of-experts
- zero-shot-image-classification{_AUDIO_TAG if audio else ""}
pipeline_tag: zero-shot-image-classification
---

# {repo_id.split("/")[-1]}

A LIMoE-style sparse mixture-of-experts {"-".join(modalities)} model trained with limoe: one transformer
tower for {", ".join(modalities[:-1])} and {modalities[-1]} whose expert layers route every modality's tokens
with top-1 Batch Priority Routing.

```text
{describe_model(config.model)}
```

{_training_length(config, step)} of {train.batch_size} pairs with the `{config.loss.contrastive}` loss on {sources}.
The full training config is in `{CONFIG_FILE}`.

## Use

```python
import limoe

model, preprocess_train, preprocess_val = limoe.create_model_and_transforms("hf-hub:{repo_id}")
tokenizer = limoe.get_tokenizer("hf-hub:{repo_id}")
image_features = model.encode_image(preprocess_val(image)[None])   # [1, {config.model.embed_dim}], L2-normalised
text_features = model.encode_text(tokenizer(["a photo of a cat"])){_AUDIO_USE if audio else ""}
```

`limoe eval zeroshot --checkpoint hf-hub:{repo_id} --data /datasets/imagenet/val` and clip_benchmark
(`python -m limoe.evaluate.clip_benchmark eval --model_type limoe --model limoe --pretrained hf-hub:{repo_id} …`)
load it too.

## Training data, evaluation and license

Describe the training data, its license, the evaluation results and the intended use here before publishing.
"""
