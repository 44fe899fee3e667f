"""Evaluation: metric arithmetic by hand, data layouts and class mapping, the `limoe eval`
commands end to end on a random limoe-tiny checkpoint, and parity with clip_benchmark."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

from limoe.checkpoints import load_model
from limoe.cli import main
from limoe.evaluate.clip_benchmark import load_limoe, topk_accuracy
from limoe.config import load_model_config
from limoe.data.crops import eval_images_on
from limoe.data.pipeline import expand_shards
from limoe.data.preprocess import unnormalize
from limoe.errors import LimoeError
from limoe.evaluate import classification_metrics, evaluate_retrieval, retrieval_metrics
from limoe.data.class_folders import imagenet_synsets
from limoe.evaluate.folders import ImageFolderLoader, scan_image_folder
from limoe.prompt_templates import load_templates
from limoe.evaluate.zeroshot import open_classification_set
from limoe.data.shards import build_shards
from tests.child_env import child_env
from tests.data.test_crops import EVAL_SIZES, MAX_LEVELS, MEAN_LEVELS, _photo
from tests.helpers import refused, run_limoe

DEMO = Path(__file__).resolve().parents[2] / "data_shards"


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)


def _eval_args(command: str, checkpoint: Path, data, output: Path, *options: str) -> list[str]:
    return ["eval", command, "--checkpoint", str(checkpoint), "--data", str(data), "--output", str(output),
            "--device", "cpu", "--workers", "0", "--batch-size", "64", *options]


def _eval(command: str, checkpoint: Path, data, output: Path, *options: str) -> int:
    return main(_eval_args(command, checkpoint, data, output, *options))


# ---------------------------------------------------------------------------------------------
# Metrics, against values worked out by hand


def test_classification_metrics_by_hand():
    logits = torch.tensor([
        [9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # label 0: first
        [3.0, 2.0, 4.0, 1.0, 1.0, 1.0, 1.0],  # label 1: two classes above → top-5 only
        [6.0, 1.0, 5.0, 4.0, 3.0, 2.0, 0.0],  # label 1: five classes above → neither
        [1.0, 7.0, 7.0, 1.0, 1.0, 1.0, 1.0],  # label 2: tied with class 1, ties count against
        [1.0, 1.0, 8.0, 1.0, 1.0, 1.0, 1.0],  # label 2: first
    ])
    labels = torch.tensor([0, 1, 1, 2, 2])
    metrics = classification_metrics(logits, labels)
    assert metrics["top1"] == pytest.approx(2 / 5)
    assert metrics["top5"] == pytest.approx(4 / 5)
    # Classes 0, 1, 2 occur (3-6 do not): recalls 1/1, 0/2, 1/2.
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 0 + 0.5) / 3)


def test_text_to_image_recall_by_hand():
    images = torch.eye(12)  # so text m's score for image n is texts[m, n]
    texts = torch.zeros(5, 12)
    texts[0, 0] = 1.0  # its image first
    texts[1, 1], texts[1, 2:5] = 0.5, 0.9  # three images above
    texts[2, 2], texts[2, 3:10] = 0.5, 0.9  # seven images above
    texts[3] = 0.2
    texts[3, 3] = 0.1  # all eleven others above
    texts[4, 4], texts[4, 5] = 0.5, 0.5  # tied with image 5: counts as rank 2
    metrics = retrieval_metrics(images, texts, torch.arange(5))
    assert metrics["text_to_image_R@1"] == pytest.approx(1 / 5)
    assert metrics["text_to_image_R@5"] == pytest.approx(3 / 5)
    assert metrics["text_to_image_R@10"] == pytest.approx(4 / 5)


def test_image_to_text_recall_counts_any_caption_and_skips_images_without_one():
    images = torch.eye(3)
    texts = torch.tensor([
        [0.1, 0.0, 0.0],  # image 0, caption a: low
        [0.9, 0.0, 0.0],  # image 0, caption b: image 0's nearest text
        [0.0, 0.3, 0.0],  # image 1's only caption …
        [0.2, 0.8, 0.0],  # … beaten by this caption of image 0
    ])
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 0, 1, 0]))
    assert metrics["image_to_text_R@1"] == pytest.approx(1 / 2)  # image 2 has no caption: not a query
    assert metrics["image_to_text_R@5"] == pytest.approx(1.0)
    assert metrics["text_to_image_R@1"] == pytest.approx(3 / 4)


def test_a_collapsed_model_gets_no_recall():
    features = torch.ones(20, 4)
    metrics = retrieval_metrics(features, features, torch.arange(20))
    assert metrics["image_to_text_R@10"] == metrics["text_to_image_R@10"] == 0.0


# ---------------------------------------------------------------------------------------------
# Zero-shot classification on image folders


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory) -> Path:
    """The 1000 ImageNet-1k synset folders; four hold images, one a corrupt file; the archive was left beside them."""
    root = tmp_path_factory.mktemp("imagenet") / "val"
    for synset in imagenet_synsets():
        (root / synset).mkdir(parents=True)
    _image(root / "n01440764" / "ILSVRC2012_val_00000293.JPEG", (200, 30, 30))  # label 0, tench
    _image(root / "n01440764" / "ILSVRC2012_val_00002138.JPEG", (190, 40, 30))
    _image(root / "n01443537" / "ILSVRC2012_val_00000236.JPEG", (30, 200, 30))  # label 1, goldfish
    _image(root / "n04548362" / "ILSVRC2012_val_00000911.JPEG", (30, 30, 200))  # label 893, wallet
    _image(root / "n15075141" / "ILSVRC2012_val_00000011.JPEG", (90, 90, 90))  # label 999, toilet paper
    (root / "n01443537" / "ILSVRC2012_val_00001234.JPEG").write_bytes(b"not a jpeg")
    (root / "ILSVRC2012_img_val.tar").write_bytes(b"")
    return root


def test_imagenet_synset_folders_map_to_open_clip_class_order(imagenet_tree):
    loader, names = open_classification_set(str(imagenet_tree), None, load_model_config("limoe-tiny"), 4, 0)
    labels = {key.split("/")[0]: int(label) for batch in loader for key, label in zip(batch.keys, batch.labels)}
    assert names == list(IMAGENET_CLASSNAMES)
    assert labels == {"n01440764": 0, "n01443537": 1, "n04548362": 893, "n15075141": 999}
    assert [names[labels[s]] for s in ("n01440764", "n04548362", "n15075141")] == ["tench", "wallet", "toilet paper"]
    assert loader.bad_samples.bad == {"bad_image": 1}


def test_an_image_folder_skips_and_counts_images_beyond_the_size_bounds(tmp_path):
    """A 60000×1 PNG would become a 13-gigapixel image when the eval resize enlarges its short side."""
    _image(tmp_path / "a" / "fine.png", (10, 20, 30))
    (tmp_path / "b").mkdir()
    Image.new("L", (60_000, 1)).save(tmp_path / "b" / "sliver.png")
    loader = ImageFolderLoader(scan_image_folder(tmp_path), image_size=64, batch_size=4, workers=0)
    assert [key for batch in loader for key in batch.keys] == ["a/fine.png"]
    assert loader.bad_samples.bad == {"image_aspect_ratio": 1}


def test_an_image_folder_gives_the_same_images_with_the_resize_on_the_device(tmp_path):
    """Class folders of photo-like images of odd sizes: the device's centre crops within a grey
    level of the eval transform's (the tolerance of tests/data/test_crops.py)."""
    for index, size in enumerate(EVAL_SIZES):
        path = tmp_path / "abc"[index % 3] / f"{index}.png"
        path.parent.mkdir(exist_ok=True)
        _photo(size, index).save(path)
    folder = scan_image_folder(tmp_path)
    worker = list(ImageFolderLoader(folder, image_size=31, batch_size=3, workers=0))
    device = list(ImageFolderLoader(folder, image_size=31, batch_size=3, workers=0, resize_on="device"))
    assert [b.keys for b in worker] == [b.keys for b in device]
    for a, b in zip(worker, device):
        assert torch.equal(a.labels, b.labels)
        levels = (unnormalize(eval_images_on(b.images, torch.device("cpu"))) - unnormalize(a.images)).abs() * 255
        assert levels.max() <= MAX_LEVELS + 0.01 and levels.mean() <= MEAN_LEVELS


def test_class_folders_are_not_decoded_on_the_device(checkpoint, imagenet_tree, tmp_path):
    refused(_eval_args("zeroshot", checkpoint, imagenet_tree, tmp_path / "zs.json", "--resize-on", "device",
                       "--decode-on", "device"), "is a class-folder tree, whose images are decoded in the data workers")
    assert not (tmp_path / "zs.json").exists()


def test_zeroshot_command_on_an_imagenet_tree(checkpoint, imagenet_tree, tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {c}.\n")
    out = run_limoe(_eval_args("zeroshot", checkpoint, imagenet_tree, tmp_path / "zs.json", "--templates",
                               str(templates)))
    metrics = json.loads((tmp_path / "zs.json").read_text())
    assert metrics["samples"] == 5 and metrics["classes"] == 1000
    assert metrics["skipped"] == {"bad_image": 1}
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1
    assert "top1" in out


def test_a_flat_folder_of_images_gets_the_layout_it_needs(checkpoint, tmp_path):
    for index in range(3):
        _image(tmp_path / "val" / f"ILSVRC2012_val_{index:08d}.JPEG", (index, 0, 0))
    refused(_eval_args("zeroshot", checkpoint, tmp_path / "val", tmp_path / "zs.json"),
            "holds images directly", "valprep.sh", "n01440764")
    assert not (tmp_path / "zs.json").exists()


def test_caption_shards_are_not_a_classification_set(checkpoint, tmp_path):
    refused(_eval_args("zeroshot", checkpoint, DEMO / "heldout", tmp_path / "zs.json", "--templates", "simple"),
            "no_label", after_progress=True)


def test_image_folder_with_class_names(checkpoint, tmp_path):
    for index, name in enumerate(["cat", "dog", "fish"]):
        _image(tmp_path / "pets" / name / "a.png", (80 * index, 0, 0))
    classnames = tmp_path / "names.txt"
    classnames.write_text("cat\ndog\nfish\n")
    assert _eval("zeroshot", checkpoint, tmp_path / "pets", tmp_path / "zs.json", "--classnames", str(classnames),
                 "--templates", "simple") == 0
    assert json.loads((tmp_path / "zs.json").read_text())["classes"] == 3


@pytest.mark.parametrize("template, problem", [
    ("a photo of {c} {x}", "has the field {x}, which is not the class placeholder"),
    ("{} {0.__class__}", "has the field {0.__class__}, which is not the class placeholder"),
    ("{c[0]} photo", "has the field {c[0]}, which is not the class placeholder"),
    ("a {c!r}", "has the field {c!r}, which is not the class placeholder"),
    ("a photo", "has 0 class placeholders"),
    ("{c} and {}", "has 2 class placeholders"),
    ("a photo of {c", "is not a valid format string (expected '}' before end of string)"),
])
def test_a_bad_template_is_one_line_naming_it_and_its_file(checkpoint, tmp_path, template, problem):
    _image(tmp_path / "pets" / "cat" / "a.png", (0, 0, 0))
    templates = tmp_path / "templates.txt"
    templates.write_text(f"a photo of a {{c}}.\n{template}\n")
    line = refused(_eval_args("zeroshot", checkpoint, tmp_path / "pets", tmp_path / "zs.json", "--templates",
                                      str(templates)))
    assert line.startswith(f"limoe: error: template {template!r} in templates file {templates} {problem};")


def test_template_braces_and_placeholders_format_as_written(tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("a {c}.\n{{c}} is {}\nset {{{c}}}\n")
    assert [t.format("cat") for t in load_templates(str(templates))] == ["a cat.", "{c} is cat", "set {cat}"]


def test_readable_class_folders_name_their_classes(checkpoint, tmp_path, capsys):
    """Without --classnames the folder names are the class names (underscores as spaces), said in
    one line on stderr; the numbers are those of a names file holding the same names."""
    for index, name in enumerate(["golden_retriever", "cat", "dog"]):
        _image(tmp_path / "pets" / name / "a.png", (80 * index, 0, 0))
        _image(tmp_path / "pets" / name / "b.png", (0, 80 * index, 0))
    assert _eval("zeroshot", checkpoint, tmp_path / "pets", tmp_path / "folders.json", "--templates", "simple") == 0
    err = capsys.readouterr().err
    assert f"limoe: warning: the class names of {tmp_path / 'pets'} are its 3 folder names with underscores as " \
           f"spaces (cat, dog, golden retriever); give --classnames to name them otherwise.\n" in err
    (tmp_path / "names.txt").write_text("cat\ndog\ngolden retriever\n")
    assert _eval("zeroshot", checkpoint, tmp_path / "pets", tmp_path / "file.json", "--templates", "simple",
                 "--classnames", str(tmp_path / "names.txt")) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "folders.json").read_text()) == json.loads((tmp_path / "file.json").read_text())


def test_a_subset_of_imagenet_synset_folders_takes_their_imagenet_names(tmp_path):
    for synset in ("n01440764", "n02102040", "n15075141"):  # Imagenette's tench and springer, and toilet paper
        _image(tmp_path / "val" / synset / "a.png", (1, 2, 3))
    _, names = open_classification_set(str(tmp_path / "val"), None, load_model_config("limoe-tiny"), 4, 0)
    assert names == [IMAGENET_CLASSNAMES[0], IMAGENET_CLASSNAMES[217], IMAGENET_CLASSNAMES[999]]
    assert names == ["tench", "English Springer Spaniel", "toilet paper"]


@pytest.mark.parametrize("names, message", [("cat\ndog\n", "has 2 class names but"),
                                            (None, "named like ImageNet synsets that are not all ImageNet-1k's; give --classnames")])
def test_class_names_must_match_the_class_folders(tmp_path, names, message):
    for name in (["cat", "dog", "fish"] if names else ["n01440764", "n99999999"]):
        _image(tmp_path / "pets" / name / "a.png", (0, 0, 0))
    path = None
    if names is not None:
        path = tmp_path / "names.txt"
        path.write_text(names)
    with pytest.raises(LimoeError, match=message):
        open_classification_set(str(tmp_path / "pets"), path, load_model_config("limoe-tiny"), 4, 0)


# ---------------------------------------------------------------------------------------------
# Zero-shot classification on shards, and clip_benchmark


CLIP_BENCHMARK_CLASSES = 16  # of heldout_cls's 69, to keep clip_benchmark's one-class-at-a-time classifier quick


@pytest.fixture(scope="module")
def clip_benchmark_set(tmp_path_factory) -> Path:
    """The samples of heldout_cls's first shard in its first classes, in clip_benchmark's wds layout."""
    root = tmp_path_factory.mktemp("wds_emoji")
    (root / "test").mkdir()
    with tarfile.open(expand_shards(str(DEMO / "heldout_cls"))[0]) as source:
        members = {m.name: source.extractfile(m).read() for m in source.getmembers()}
    keep = {name.split(".")[0] for name, data in members.items()
            if name.endswith(".cls") and int(data) < CLIP_BENCHMARK_CLASSES}
    with tarfile.open(root / "test" / "0.tar", "w") as target:
        for name, data in members.items():
            if name.split(".")[0] in keep:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                target.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("1\n")
    names = (DEMO / "heldout_cls" / "classnames.txt").read_text().splitlines()[:CLIP_BENCHMARK_CLASSES]
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nan emoji of {c}.\n")
    return root


def test_clip_benchmark_command_from_the_readme_matches_limoe_eval(checkpoint, clip_benchmark_set, tmp_path):
    """clip_benchmark's own command line through the registered loader, as the README runs it, under
    the installed NumPy (≥ 2.4 here, where clip_benchmark 1.6.2's `accuracy` fails unless the loader
    replaces it), against `limoe eval zeroshot` on the same shards and templates. Dropless capacity
    and fp32 make every embedding independent of how the two tools batch their inputs."""
    pytest.importorskip("clip_benchmark")
    output = tmp_path / "clip_benchmark.json"
    command = [sys.executable, "-m", "limoe.evaluate.clip_benchmark", "eval", "--model_type", "limoe",
               "--model", "limoe:dropless", "--pretrained", str(checkpoint), "--dataset", "wds/emoji",
               "--dataset_root", str(clip_benchmark_set), "--output", str(output), "--no_amp", "--num_workers", "0",
               "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=child_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(output.read_text())["metrics"]

    templates = str(clip_benchmark_set / "zeroshot_classification_templates.txt")
    assert _eval("zeroshot", checkpoint, clip_benchmark_set, tmp_path / "zs.json", "--capacity-factor", "dropless",
                 "--templates", templates) == 0
    ours = json.loads((tmp_path / "zs.json").read_text())
    assert ours["classes"] == CLIP_BENCHMARK_CLASSES
    assert ours["top1"] == pytest.approx(theirs["acc1"]) and ours["top5"] == pytest.approx(theirs["acc5"])
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"])


def test_a_clip_benchmark_layout_built_from_class_folders_runs_in_clip_benchmark(checkpoint, tmp_path):
    """`limoe shards build --layout clip_benchmark` on 7 images in 3 readable class folders, 4 per
    shard: two shards, which clip_benchmark's default 4 workers cannot read ("No samples found …
    fewer shards than workers"); the wrapper gives it 2, and its accuracy is `limoe eval zeroshot`'s
    on the same shards and templates."""
    pytest.importorskip("clip_benchmark")
    for label, (name, count) in enumerate([("cat", 3), ("dog", 2), ("golden_retriever", 2)]):
        for index in range(count):
            _image(tmp_path / "pets" / name / f"{index}.png", (90 * label, 40 * index, 200 - 90 * label))
    dataset = tmp_path / "wds_pets"
    out = run_limoe(["shards", "build", "--images", str(tmp_path / "pets"), "--output", str(dataset),
                     "--classification", "--layout", "clip_benchmark", "--maxcount", "4"])
    assert out.strip() == "samples=7 shards=2 unreadable_images=0 classes=3"
    assert sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file()) == \
        ["classnames.txt", "test/0.tar", "test/1.tar", "test/nshards.txt", "zeroshot_classification_templates.txt"]
    assert (dataset / "test" / "nshards.txt").read_text() == "2\n"
    assert (dataset / "classnames.txt").read_text() == "cat\ndog\ngolden retriever\n"
    templates = (dataset / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(templates) == 80 and templates[0] == "a bad photo of a {c}."

    output = tmp_path / "clip_benchmark.json"
    command = [sys.executable, "-m", "limoe.evaluate.clip_benchmark", "eval", "--model_type", "limoe",
               "--model", "limoe:dropless", "--pretrained", str(checkpoint), "--dataset", "wds/pets",
               "--dataset_root", str(dataset), "--output", str(output), "--no_amp", "--quiet"]  # default workers
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=child_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(output.read_text())["metrics"]
    assert _eval("zeroshot", checkpoint, dataset, tmp_path / "zs.json", "--capacity-factor", "dropless", "--templates",
                 str(dataset / "zeroshot_classification_templates.txt")) == 0
    ours = json.loads((tmp_path / "zs.json").read_text())
    assert (ours["samples"], ours["classes"]) == (7, 3)
    assert ours["top1"] == pytest.approx(theirs["acc1"])
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"])


def test_the_wrapper_gives_a_local_wds_dataset_at_most_one_worker_per_shard(tmp_path):
    from argparse import Namespace

    from limoe.evaluate.clip_benchmark import workers_at_most_shards

    (tmp_path / "pets" / "test").mkdir(parents=True)
    (tmp_path / "pets" / "test" / "nshards.txt").write_text("2\n")
    seen = []
    run = workers_at_most_shards(lambda args: seen.append((args.dataset, args.num_workers)))
    root = str(tmp_path / "{dataset}")
    for dataset, workers in (("wds/pets", 4), ("wds/pets", 1), ("wds/elsewhere", 4), ("cifar10", 4)):
        run(Namespace(dataset=dataset, dataset_root=root, split="test", num_workers=workers))
    assert seen == [("wds/pets", 2), ("wds/pets", 1), ("wds/elsewhere", 4), ("cifar10", 4)]


def test_the_replacement_accuracy_agrees_with_classification_metrics():
    logits, labels = torch.randn(37, 9), torch.randint(0, 9, (37,))
    expected = classification_metrics(logits, labels)
    assert topk_accuracy(logits, labels, (1, 5)) == pytest.approx([expected["top1"], expected["top5"]])


def test_clip_benchmark_loader_follows_the_checkpoint_config(checkpoint):
    model, transform, tokenizer = load_limoe("limoe", str(checkpoint), "cpu")
    assert tokenizer(["a photo of a cat"]).shape == (1, model.config.context_length)
    assert transform(Image.new("RGB", (100, 80))).shape == (3, model.config.image_size, model.config.image_size)
    assert model.config.moe.eval_capacity_factor == 2.0
    assert load_limoe("limoe:dropless", str(checkpoint), "cpu")[0].config.moe.eval_capacity_factor is None
    with pytest.raises(LimoeError, match="limoe:dropless"):
        load_limoe("ViT-B-32", str(checkpoint), "cpu")


# ---------------------------------------------------------------------------------------------
# Retrieval


def test_retrieval_command_on_the_heldout_shards(checkpoint, tmp_path):
    assert _eval("retrieval", checkpoint, DEMO / "heldout", tmp_path / "retrieval.json") == 0
    metrics = json.loads((tmp_path / "retrieval.json").read_text())
    assert metrics["images"] == metrics["texts"] > 300  # one caption per image
    for direction in ("image_to_text", "text_to_image"):
        assert 0 <= metrics[f"{direction}_R@1"] <= metrics[f"{direction}_R@5"] <= metrics[f"{direction}_R@10"] <= 1


@pytest.mark.parametrize("command, data, samples, options", [
    ("retrieval", "heldout", 343, ()), ("knn", "heldout_cls", 331, ()),
    ("zeroshot", "heldout_cls", 331, ("--templates", "simple")),
])
def test_an_eval_command_gives_the_same_metrics_with_the_resize_on_the_device(checkpoint, tmp_path, command, data,
                                                                              samples, options):
    """The device's centre crops are within a grey level of the workers' (tests/data/test_crops.py),
    and decoded there too, the same pixels (tests/data/test_device_decode.py); every metric may move
    by at most one sample of the set (measured: none moves)."""
    metrics = {}
    for resize_on, decode_on in (("worker", "worker"), ("device", "worker"), ("device", "device")):
        output = tmp_path / f"{resize_on}-{decode_on}.json"
        assert _eval(command, checkpoint, DEMO / data, output, "--resize-on", resize_on, "--decode-on", decode_on,
                     *options) == 0
        metrics[resize_on, decode_on] = json.loads(output.read_text())
    worker = metrics.pop(("worker", "worker"))
    assert worker.get("images", worker.get("samples")) == samples
    for device in metrics.values():
        assert worker.keys() == device.keys()
        for name, value in worker.items():
            if isinstance(value, float):
                assert abs(device[name] - value) <= 1 / samples, name
            else:  # counts of images, texts, skipped samples
                assert device[name] == value, name


def test_evaluate_retrieval_groups_repeated_images_and_restores_train_mode(checkpoint, tmp_path):
    for index in range(3):
        _image(tmp_path / "images" / f"{index}.png", (90 * index, 20, 20))
    captions = tmp_path / "captions.csv"
    captions.write_text("file,caption\n0.png,a red square\n0.png,a crimson block\n1.png,a green square\n2.png,blue\n")
    build_shards(tmp_path / "images", captions, tmp_path / "shards")
    model, _ = load_model(checkpoint)
    model.train()
    metrics = evaluate_retrieval(model, str(tmp_path / "shards"), batch_size=2, workers=0)
    assert (metrics["images"], metrics["texts"]) == (3, 4)
    assert model.training
