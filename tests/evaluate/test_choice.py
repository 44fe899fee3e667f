"""Choosing among candidates: the selection metrics by hand, `limoe eval choice` against
clip_benchmark's image_caption_selection on SugarCrepe- and Winoground-layout sets made from the
held-out emoji, the JSONL answer convention, classes given by exemplar images, and bad input."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from limoe.checkpoints import load_model
from limoe.cli import main
from limoe.data.preprocess import tokenizer
from limoe.evaluate.choice import encode_image_files, encode_tokens
from limoe.evaluate.clip_benchmark import load_limoe
from limoe.evaluate.folders import scan_image_folder
from limoe.evaluate.metrics import selection_metrics
from limoe.evaluate.zeroshot import exemplar_classifier
from tests.helpers import refused

DEMO = Path(__file__).resolve().parents[2] / "data_shards"


def _builder():
    spec = importlib.util.spec_from_file_location("build_choice_sets", DEMO / "build_choice_sets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def emoji_sets(tmp_path_factory) -> Path:
    """SugarCrepe (skin tone and man/woman swaps), Winoground and JSONL sets from data_shards/heldout."""
    root = tmp_path_factory.mktemp("emoji_choice")
    counts = _builder().build(root)
    assert counts == {"replace_att": 150, "replace_obj": 93, "winoground": 60, "jsonl": 360}
    return root


def _choice_args(checkpoint: Path, data: Path, format: str, output: Path, *options: str) -> list[str]:
    return ["eval", "choice", "--checkpoint", str(checkpoint), "--data", str(data), "--format", format,
            "--output", str(output), "--device", "cpu", "--workers", "0", "--capacity-factor", "dropless", *options]


def _choice(checkpoint: Path, data: Path, format: str, output: Path, *options: str) -> int:
    return main(_choice_args(checkpoint, data, format, output, *options))


# ---------------------------------------------------------------------------------------------
# Metrics, against values worked out by hand


def test_selection_metrics_by_hand():
    scores = [
        torch.tensor([[0.9, 0.2]]),  # SugarCrepe: caption above the negative
        torch.tensor([[0.3, 0.3]]),  # a tie: the caption comes first
        torch.tensor([[0.8, 0.1], [0.2, 0.5]]),  # Winoground: both images and both captions right
        torch.tensor([[0.8, 0.6], [0.7, 0.65]]),  # caption 0 wins both images: text wrong; images right
        torch.tensor([[0.1, 0.4, 0.2], [0.3, 0.6, 0.9]]),  # pair (0, 1): text right, image 1 beats image 0
        torch.tensor([[0.5, 0.5], [0.5, 0.5]]),  # Winoground tied everywhere: only pair (0, 0) gets its pick
    ]
    matches = [[(0, 0)], [(0, 0)], [(0, 0), (1, 1)], [(0, 0), (1, 1)], [(0, 1)], [(0, 0), (1, 1)]]
    first = selection_metrics(scores, matches)
    assert first["text_acc"] == pytest.approx(4 / 6)  # items 0, 1, 2, 4
    assert first["image_acc"] == pytest.approx(4 / 6)  # single images count as right; items 4 and 5 wrong
    assert first["acc"] == pytest.approx(3 / 6)  # items 0, 1 and 2
    assert (first["text_ties"], first["image_ties"], first["ties"]) == pytest.approx((2 / 6, 1 / 6, 2 / 6))
    strict = selection_metrics(scores, matches, ties="strict")
    assert strict["text_acc"] == pytest.approx(3 / 6)  # item 1's tie now counts against the model
    assert strict["image_acc"] == pytest.approx(4 / 6)
    assert strict["acc"] == pytest.approx(2 / 6)
    assert strict["ties"] == first["ties"]


class _TableModel(torch.nn.Module):
    """A model whose "images" are [nim, 1, 1, 1] tensors holding a row of `images` and whose tokens are
    rows of `texts`: embeddings chosen by hand, with repeats, so that many candidates tie exactly."""

    def __init__(self, images: torch.Tensor, texts: torch.Tensor):
        super().__init__()
        self.images, self.texts = images, texts

    def encode_image(self, pixels):
        return self.images[pixels.flatten().long()]

    def encode_text(self, tokens):
        return self.texts[tokens]


@pytest.mark.parametrize("images_per_item, texts_per_item", [(1, 2), (1, 3), (2, 2)])
def test_ties_are_counted_as_clip_benchmark_counts_them(images_per_item, texts_per_item):
    """clip_benchmark's own image_caption_selection on items whose embeddings are drawn from three
    vectors (so a third or more of the candidates tie), against `selection_metrics` on the same
    scores: SugarCrepe's one image and two texts, a three-text variant, Winoground's two and two."""
    pytest.importorskip("clip_benchmark")
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics import image_caption_selection

    generator = torch.Generator().manual_seed(0)
    pool = torch.nn.functional.normalize(torch.randn(3, 5, generator=generator), dim=-1)  # [3, D]
    items = 97
    image_ids = torch.randint(0, 3, (items, images_per_item), generator=generator)
    text_ids = torch.randint(0, 3, (items, texts_per_item), generator=generator)
    model = _TableModel(pool, pool)
    dataset = [(ids.float().view(-1, 1, 1, 1).squeeze(0), [int(t) for t in texts])
               for ids, texts in zip(image_ids, text_ids)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=13, collate_fn=image_captions_collate_fn)
    theirs = image_caption_selection.evaluate(model, loader, torch.tensor, "cpu", amp=False)

    scores = [pool[images] @ pool[texts].T for images, texts in zip(image_ids, text_ids)]  # [I, T] per item
    pairs = [(i, i) for i in range(min(images_per_item, texts_per_item))]
    ours = selection_metrics(scores, [pairs] * items)
    assert 0.2 < ours["ties"] < 0.9
    assert {name: ours[name] for name in theirs} == pytest.approx(theirs, abs=1e-9)
    strict = selection_metrics(scores, [pairs] * items, ties="strict")
    if images_per_item == 1:  # a caption tied with a negative: right by clip_benchmark's count, wrong by the strict one
        assert strict["text_acc"] < ours["text_acc"]
    else:  # identical texts tie for both images, and image 1 never gets the first of them
        assert strict["text_acc"] == ours["text_acc"]


# ---------------------------------------------------------------------------------------------
# Parity with clip_benchmark's image_caption_selection


def _clip_benchmark_selection(checkpoint: Path, dataset) -> dict:
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics import image_caption_selection

    model, _, tokenizer = load_limoe("limoe:dropless", str(checkpoint), "cpu")
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, collate_fn=image_captions_collate_fn)
    return image_caption_selection.evaluate(model, loader, tokenizer, "cpu", amp=False)


def test_sugar_crepe_matches_clip_benchmark_and_a_random_model_is_near_chance(checkpoint, emoji_sets, tmp_path):
    """clip_benchmark's SugarCrepe dataset (its local layout, no download) through its
    image_caption_selection with `load_limoe`, against `limoe eval choice`. Dropless capacity
    makes every embedding independent of the two tools' different batching."""
    pytest.importorskip("clip_benchmark")
    from clip_benchmark.datasets.builder import build_dataset

    assert _choice(checkpoint, emoji_sets / "sugar_crepe", "sugar_crepe", tmp_path / "choice.json") == 0
    ours = json.loads((tmp_path / "choice.json").read_text())
    transform = load_limoe("limoe", str(checkpoint), "cpu")[1]
    for subset in ("replace_att", "replace_obj"):
        dataset = build_dataset(f"sugar_crepe/{subset}", root=str(emoji_sets / "sugar_crepe"), transform=transform,
                                task="image_caption_selection")
        theirs = _clip_benchmark_selection(checkpoint, dataset)
        assert {name: ours[f"{subset}/{name}"] for name in theirs} == theirs
        assert ours[f"{subset}/items"] == len(dataset)
    # Chance is 1/2: over both subsets' 243 items this random model (seed 0) scores 0.53; seeds 0-5
    # score 0.47-0.56 (each negative is a real emoji name, so a random model's word biases move it).
    pooled = (150 * ours["replace_att/text_acc"] + 93 * ours["replace_obj/text_acc"]) / 243
    assert abs(pooled - 0.5) < 0.15


def test_captions_cut_to_the_same_tokens_tie_and_are_reported(checkpoint, tmp_path, capsys):
    """Two of three SugarCrepe items differ only past limoe-tiny's 16 tokens: they tie, the default
    counts them right (clip_benchmark's count), --ties strict wrong, and a warning says how many."""
    data = tmp_path / "set"
    _square(data / "val2017" / "a.jpg", (200, 30, 30))
    long = "a small red square drawn on a plain background next to nothing at all in the whole wide picture"
    items = {"1": {"filename": "a.jpg", "caption": f"{long} cat", "negative_caption": f"{long} dog"},
             "2": {"filename": "a.jpg", "caption": f"{long} red", "negative_caption": f"{long} blue"},
             "3": {"filename": "a.jpg", "caption": "a red square", "negative_caption": "a green circle"}}
    (data / "replace_obj.json").write_text(json.dumps(items))
    assert _choice(checkpoint, data, "sugar_crepe", tmp_path / "first.json") == 0
    warning = capsys.readouterr().err
    assert "limoe: warning: 2 of 3 replace_obj items have candidate texts that are identical after tokenization" \
        in warning
    assert _choice(checkpoint, data, "sugar_crepe", tmp_path / "strict.json", "--ties", "strict") == 0
    first, strict = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("first", "strict"))
    assert first["replace_obj/ties"] == first["replace_obj/text_ties"] == pytest.approx(2 / 3)
    assert first["replace_obj/text_acc"] - strict["replace_obj/text_acc"] == pytest.approx(2 / 3)


class _WinogroundFolder(torch.utils.data.Dataset):
    """Our Winoground layout as clip_benchmark's WinoGround dataset yields it: ([2, 3, H, W], [2 captions])."""

    def __init__(self, root: Path, transform):
        self.examples = [json.loads(line) for line in (root / "examples.jsonl").read_text().splitlines()]
        self.root, self.transform = root, transform

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        example = self.examples[index]
        images = [self.transform(Image.open(self.root / "images" / f"{example[f'image_{i}']}.jpg")) for i in (0, 1)]
        return torch.stack(images), [example["caption_0"], example["caption_1"]]


def test_winoground_scores_are_clip_benchmarks_text_image_and_group(checkpoint, emoji_sets, tmp_path):
    pytest.importorskip("clip_benchmark")
    assert _choice(checkpoint, emoji_sets / "winoground", "winoground", tmp_path / "wino.json") == 0
    ours = json.loads((tmp_path / "wino.json").read_text())
    transform = load_limoe("limoe", str(checkpoint), "cpu")[1]
    theirs = _clip_benchmark_selection(checkpoint, _WinogroundFolder(emoji_sets / "winoground", transform))
    assert (ours["text_score"], ours["image_score"], ours["group_score"]) == \
        (theirs["text_acc"], theirs["image_acc"], theirs["acc"])
    assert ours["items"] == 60


def test_jsonl_answer_indexes_the_side_with_several_candidates(checkpoint, emoji_sets, tmp_path):
    """Three items scored by hand from the embeddings: image→texts, text→images, and a 2×3 item
    whose answer names the pair (image 1, text 1)."""
    images = [tmp_path / f"{key:09d}.jpg" for key in (41, 42, 43)]  # image paths stay inside the file's folder
    for image in images:
        shutil.copyfile(emoji_sets / "sugar_crepe" / "val2017" / image.name, image)
    texts = ["man running light skin tone", "man running medium-light skin tone", "man running medium skin tone"]
    items = [
        {"images": [images[2].name], "texts": texts, "answer": 2},
        {"images": [p.name for p in images], "texts": [texts[0]], "answer": 0},
        {"images": [p.name for p in images[:2]], "texts": texts, "answer": 1},
    ]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    assert _choice(checkpoint, path, "jsonl", tmp_path / "jsonl.json") == 0
    ours = json.loads((tmp_path / "jsonl.json").read_text())

    model, _ = load_model(checkpoint, capacity_factor="dropless")
    tokens = tokenizer(model.config.context_length)(texts)  # [3, L]
    scores = encode_image_files(model, images, 8, 0) @ encode_tokens(model, tokens, 8).T  # [3 images, 3 texts]
    text_right = [bool(scores[2].argmax() == 2), True, bool(scores[1].argmax() == 1)]
    image_right = [True, bool(scores[:, 0].argmax() == 0), bool(scores[:2, 1].argmax() == 1)]
    assert ours["text_acc"] == pytest.approx(sum(text_right) / 3)
    assert ours["image_acc"] == pytest.approx(sum(image_right) / 3)
    assert ours["acc"] == pytest.approx(sum(t and i for t, i in zip(text_right, image_right)) / 3)


# ---------------------------------------------------------------------------------------------
# Classes given by exemplar images


def _square(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


def test_zeroshot_with_exemplar_images(checkpoint, tmp_path):
    """Each class is the mean of its exemplars' normalised embeddings, renormalised; images equal to
    a class's only exemplar are classified right even by a random model."""
    colours = {"blue": [(0, 0, 250)], "green": [(0, 250, 0), (20, 200, 20)], "red": [(250, 0, 0)]}
    for name, shades in colours.items():
        for index, colour in enumerate(shades):
            _square(tmp_path / "exemplars" / name / f"{index}.png", colour)
        _square(tmp_path / "data" / name / "query.png", shades[0])
    (tmp_path / "data" / "green" / "query.png").unlink()  # green: only judged through its mean
    model, _ = load_model(checkpoint, capacity_factor="dropless")
    folder = scan_image_folder(tmp_path / "exemplars")
    classifier = exemplar_classifier(model, folder, 8, 0)  # [D, 3]
    features = encode_image_files(model, [path for path, _ in folder.files], 8, 0)  # [4, D]
    green = torch.nn.functional.normalize(features[1:3].mean(dim=0), dim=0)
    torch.testing.assert_close(classifier.T, torch.stack([features[0], green, features[3]]))

    options = ["--candidate-images", str(tmp_path / "exemplars"), "--capacity-factor", "dropless"]
    assert main(["eval", "zeroshot", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--output",
                 str(tmp_path / "zs.json"), "--device", "cpu", "--workers", "0", *options]) == 0
    metrics = json.loads((tmp_path / "zs.json").read_text())
    assert (metrics["top1"], metrics["samples"], metrics["classes"]) == (1.0, 2, 3)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


def test_a_sugar_crepe_item_without_a_negative(checkpoint, tmp_path):
    _square(tmp_path / "set" / "val2017" / "a.jpg", (1, 2, 3))
    (tmp_path / "set" / "swap_obj.json").write_text(json.dumps({"7": {"filename": "a.jpg", "caption": "a red square"}}))
    refused(_choice_args(checkpoint, tmp_path / "set", "sugar_crepe", tmp_path / "out.json"),
            'item 7 has no "negative_caption"')
    assert not (tmp_path / "out.json").exists()


def test_a_jsonl_answer_out_of_range(checkpoint, tmp_path):
    _square(tmp_path / "a.jpg", (1, 2, 3))
    (tmp_path / "items.jsonl").write_text(json.dumps({"images": ["a.jpg"], "texts": ["x", "y"], "answer": 2}) + "\n")
    refused(_choice_args(checkpoint, tmp_path / "items.jsonl", "jsonl", tmp_path / "out.json"),
            '"answer" 2 is out of range for its 2 texts')


def test_exemplar_folders_must_match_the_class_folders(checkpoint, tmp_path):
    _square(tmp_path / "exemplars" / "cat" / "a.png", (1, 2, 3))
    _square(tmp_path / "data" / "dog" / "a.png", (1, 2, 3))
    refused(["eval", "zeroshot", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"),
                     "--candidate-images", str(tmp_path / "exemplars"), "--device", "cpu", "--workers", "0"],
            "are not the exemplar folders")
