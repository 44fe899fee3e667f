"""The video demo learns motion, not just appearance (slow: one run of configs/train/video-demo.yaml,
minutes on two cores).

data_shards/video_heldout holds 192 clips of sprite–direction pairs the run never saw (each sprite
moving the one way it never moves in data_shards/video_train). The trained model classifies each
clip's direction zero-shot, by the class names "moving left" … with the set's templates.txt, which
averages over the nuisance factors (every sprite, both speeds: "a cat face {}, fast" …), and its sprite by
the sprite names with the directions and speeds as templates; and it retrieves, for each clip, its
caption among all 96 a sprite, a direction and a speed make ("a cat face moving left, fast" …),
scored by the retrieved caption's direction. Then the same model reads each clip's
centre frame repeated 8 times, as `limoe eval --still-frame` does (`limoe.evaluate.inputs.eval_inputs`):
a still picture of the same sprite at the same place, with no motion.
Real clips must tell the directions apart far above chance (1/4); the still clips must not (they
carry no direction at all), while they still tell the sprites apart (1/12 chance), so what the
model lost is time and not the picture. docs/TRAINING.md#video quotes the recorded direction
numbers (`python -m limoe.figures record video-demo`, the same zero-shot through `limoe eval`); the
margins here sit below them.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from limoe.checkpoints import load_model
from limoe.data.pipeline import eval_loader, loader_options
from limoe.data.preprocess import tokenizer
from limoe.evaluate.inputs import eval_inputs
from limoe.evaluate.zeroshot import zeroshot_classifier
from limoe.prompt_templates import load_classnames, load_templates
from tests.child_env import child_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HELDOUT = ROOT / "data_shards" / "video_heldout"
SPEEDS = ("slow", "fast")


def sprite_of(key: str) -> str:
    """The sprite a held-out clip shows, from its key (`cat_face_left_slow_0` → `cat face`)."""
    return key.rsplit("_", 3)[0].replace("_", " ")


def heldout_features(model) -> dict:
    """Real and still clips' features [N, D], direction labels [N] and sprite names of the held-out set."""
    loader = eval_loader(str(HELDOUT), 64, model.config.image_size, model.config.context_length, 0,
                         classification=True, **loader_options(model.config, "video"))
    real, stills, labels, sprites = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            real.append(model.encode_video(eval_inputs(batch.images, "cpu")))
            stills.append(model.encode_video(eval_inputs(batch.images, "cpu", still_frame=True)))
            labels.append(batch.labels)
            sprites += [sprite_of(key) for key in batch.keys]
    return {"real": torch.cat(real), "still": torch.cat(stills), "labels": torch.cat(labels), "sprites": sprites}


def accuracies(model, held: dict) -> dict[str, float]:
    """Top-1 zero-shot accuracy of directions and of sprites, for real and still clips."""
    directions = load_classnames(HELDOUT / "classnames.txt")  # "moving left" …
    names = sorted(set(held["sprites"]))
    direction_classifier = zeroshot_classifier(  # [D, 4]
        model, directions, load_templates(str(HELDOUT / "templates.txt")))
    sprite_classifier = zeroshot_classifier(  # [D, 12]
        model, names, [f"a {{}} {direction}, {speed}" for direction in directions for speed in SPEEDS])
    sprite_labels = torch.tensor([names.index(name) for name in held["sprites"]])
    scores = {}
    for kind in ("real", "still"):
        features = held[kind]  # [N, D]
        scores[f"{kind}_direction"] = ((features @ direction_classifier).argmax(1) == held["labels"]).float().mean().item()
        scores[f"{kind}_sprite"] = ((features @ sprite_classifier).argmax(1) == sprite_labels).float().mean().item()
    return scores


def retrieved_directions(model, held: dict) -> dict[str, float]:
    """Video→text among every caption of the set's sprites, directions and speeds: the share of real
    and of still clips whose top caption names their direction."""
    directions = load_classnames(HELDOUT / "classnames.txt")
    names = sorted(set(held["sprites"]))
    captions = [(direction, f"a {name} {classname}, {speed}") for name in names
                for direction, classname in enumerate(directions) for speed in SPEEDS]
    with torch.no_grad():
        text = model.encode_text(tokenizer(model.config.context_length)([caption for _, caption in captions]))  # [96, D]
    caption_directions = torch.tensor([direction for direction, _ in captions])  # [96]
    return {f"{kind}_retrieved_direction":
            (caption_directions[(held[kind] @ text.T).argmax(1)] == held["labels"]).float().mean().item()
            for kind in ("real", "still")}


def test_the_video_demo_tells_unseen_motions_apart_and_a_still_frame_does_not(tmp_path):
    subprocess.run([sys.executable, "-m", "limoe", "train", "--config", "video-demo", "--workdir", str(tmp_path)],
                   cwd=ROOT, env=child_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model, _ = load_model(tmp_path / "model.safetensors")
    held = heldout_features(model)
    scores = {**accuracies(model, held), **retrieved_directions(model, held)}
    assert scores["real_direction"] >= 2 * 0.25 and scores["real_retrieved_direction"] >= 2 * 0.25
    assert scores["still_direction"] <= 0.4 and scores["still_retrieved_direction"] <= 0.4
    assert scores["still_sprite"] >= 3 / 12
