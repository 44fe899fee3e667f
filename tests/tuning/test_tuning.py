"""Prompt tuning (`limoe tune`): step 0 is zero-shot exactly, only the tuned parts change, the
tuned file carries and enforces its label set, the support draw, and few-shot gains on the
held-out emoji classes."""

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from limoe.checkpoints import load_model
from limoe.cli import main
from limoe.evaluate.zeroshot import open_classification_set
from limoe.errors import LimoeError
from limoe.model.prompts import LABEL_SET_KEY, add_prompt_tuning, classification_logits
from limoe.tuning.few_shot import read_few_shot_split
from limoe.tuning.prompt_tuning import TuneRecipe, tuned_parameters
from tests.helpers import refused, shard_members

DEMO = Path(__file__).resolve().parents[2] / "data_shards"
HELDOUT_CLS = DEMO / "heldout_cls"


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("templates") / "templates.txt"
    path.write_text("an emoji of {c}.\n{c}\n")
    return path


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    """heldout_cls cut down for speed: its 21 classes with at least 4 samples, at most 6 samples each."""
    root = tmp_path_factory.mktemp("small_cls")
    samples = shard_members(HELDOUT_CLS)
    by_class: dict[int, list[str]] = {}
    for key, files in sorted(samples.items()):
        by_class.setdefault(int(files["cls"]), []).append(key)
    kept = [label for label, keys in sorted(by_class.items()) if len(keys) >= 4]
    with tarfile.open(root / "00000.tar", "w") as target:
        for new_label, label in enumerate(kept):
            for key in by_class[label][:6]:
                for extension, data in (("jpg", samples[key]["jpg"]), ("cls", str(new_label).encode())):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    target.addfile(info, io.BytesIO(data))
    names = (HELDOUT_CLS / "classnames.txt").read_text().splitlines()
    (root / "classnames.txt").write_text("".join(names[label] + "\n" for label in kept))
    return root


@pytest.fixture(scope="module")
def step_zero(checkpoint, templates, small_set, tmp_path_factory) -> tuple[Path, dict]:
    """A tuned file and its metrics after zero steps."""
    output = tmp_path_factory.mktemp("step_zero") / "tuned.safetensors"
    return output, _tune(checkpoint, small_set, output, templates, 1, 0)


def _tune(checkpoint: Path, data: Path, output: Path, templates: Path, shots: int, steps: int, *options: str) -> dict:
    metrics = output.with_suffix(".json")
    assert main(["tune", "--checkpoint", str(checkpoint), "--data", str(data), "--templates", str(templates),
                 "--shots", str(shots), "--steps", str(steps), "--output", str(output), "--metrics", str(metrics),
                 "--device", "cpu", "--workers", "0", *options]) == 0
    return json.loads(metrics.read_text())


def _zeroshot_args(checkpoint: Path, data: Path, output: Path, *options: str) -> list[str]:
    return ["eval", "zeroshot", "--checkpoint", str(checkpoint), "--data", str(data), "--output", str(output),
            "--device", "cpu", "--workers", "0", *options]


def _zeroshot(checkpoint: Path, data: Path, output: Path, *options: str) -> int:
    return main(_zeroshot_args(checkpoint, data, output, *options))


def test_fresh_prompts_and_head_change_nothing(checkpoint):
    """Attaching the tuned parts leaves every logit bit-identical (gates and head start at zero)."""
    model, _ = load_model(checkpoint)
    images = torch.randn(5, 3, 64, 64)
    tokens = torch.randint(1, 1000, (7, 16))
    before = classification_logits(model, model.encode_image(images), model.encode_text(tokens).T)
    add_prompt_tuning(model, 3, [f"class {i}" for i in range(7)], ["{}"], torch.Generator().manual_seed(0))
    after = classification_logits(model, model.encode_image(images), model.encode_text(tokens).T)
    assert torch.equal(before, after)


def test_step_zero_predicts_exactly_what_zeroshot_predicts(checkpoint, templates, small_set, step_zero, tmp_path):
    tuned, metrics = step_zero
    assert metrics["queries"] > 0
    for name in ("top1", "top5", "mean_per_class_recall"):
        assert metrics[f"tuned_{name}"] == metrics[f"zeroshot_{name}"]
    # Through `limoe eval zeroshot` (the templates come from the tuned file) on every sample:
    assert _zeroshot(tuned, small_set, tmp_path / "tuned_zs.json") == 0
    assert _zeroshot(checkpoint, small_set, tmp_path / "zs.json", "--templates", str(templates)) == 0
    assert json.loads((tmp_path / "tuned_zs.json").read_text()) == json.loads((tmp_path / "zs.json").read_text())


@pytest.mark.slow  # 40 tuning steps; step zero's equality with zero-shot is checked by default
def test_tuning_changes_only_the_tuned_parts_and_learns(checkpoint, templates, small_set, tmp_path):
    """Fast smoke of the few-shot recipe on a random model (zero-shot is at chance): every frozen
    tensor stays bit-identical; the support loss falls and the queries beat zero-shot."""
    metrics = _tune(checkpoint, small_set, tmp_path / "tuned.safetensors", templates, 2, 8, "--lr", "1e-2")
    base = load_file(str(checkpoint))
    tuned = load_file(str(tmp_path / "tuned.safetensors"))
    model, _ = load_model(tmp_path / "tuned.safetensors")
    trainable = set(tuned_parameters(model))
    assert set(tuned) - set(base) == {name for name in trainable if name not in base}
    frozen = [name for name in base if name not in trainable]
    assert all(torch.equal(base[name], tuned[name]) for name in frozen)
    kinds = ("attention.qkv.weight", "mlp.fc1.weight", "mlp.router_weight", "mlp.fc1_weight", "token_embed.weight",
             "patch_embed.weight", "logit_scale")  # attention, dense MLPs, routers, experts, embeddings, temperature
    assert all(any(name.endswith(kind) for name in frozen) for kind in kinds)
    changed = {name for name in trainable if name not in base or not torch.equal(base[name], tuned[name])}
    assert changed == trainable  # every LayerNorm, prompt, gate and the head moved
    assert metrics["last_loss"] < metrics["first_loss"]
    assert metrics["tuned_top1"] > metrics["zeroshot_top1"]


def test_the_report_is_one_column_of_values_and_ends_with_where_the_time_went(checkpoint, templates, small_set,
                                                                                tmp_path, capsys):
    metrics = _tune(checkpoint, small_set, tmp_path / "tuned.safetensors", templates, 1, 1)
    lines = capsys.readouterr().out.splitlines()
    title = next(index for index, line in enumerate(lines) if line.startswith("prompt tuning of "))
    table, timing = lines[title + 1: -1], lines[-1]
    rows = [re.fullmatch(r"  (\S+)( {2,})(\S+)", line) for line in table]
    assert all(rows) and [row[1] for row in rows] == list(metrics)  # the longest names too
    assert len({row.start(3) for row in rows}) == 1
    phases = [part.rsplit(" ", 2)[0] for part in timing.removeprefix("time: ").split(", ")]
    assert phases == ["loading", "encoding", "baselines", "1 steps", "evaluation"]


def test_a_tuned_file_refuses_another_label_set(small_set, step_zero, tmp_path):
    names = (small_set / "classnames.txt").read_text().splitlines()
    (tmp_path / "other.txt").write_text("\n".join(reversed(names)) + "\n")
    args = _zeroshot_args(step_zero[0], small_set, tmp_path / "zs.json", "--classnames", str(tmp_path / "other.txt"))
    line = refused(args)
    assert line.startswith(f"limoe: error: the checkpoint was prompt-tuned for {len(names)} classes")
    assert not (tmp_path / "zs.json").exists()


@pytest.mark.parametrize("label_set", ['{"classnames": ["a"]}', "[1, 2]", "not json"])
def test_a_tuned_file_with_a_damaged_label_set_is_one_line(step_zero, tmp_path, label_set):
    with safe_open(str(step_zero[0]), framework="pt") as handle:
        metadata = {**handle.metadata(), LABEL_SET_KEY: label_set}
    save_file(load_file(str(step_zero[0])), str(tmp_path / "damaged.safetensors"), metadata)
    with pytest.raises(LimoeError, match="limoe_label_set metadata is not a list of class names and templates"):
        load_model(tmp_path / "damaged.safetensors")


def test_a_tuned_file_whose_template_has_other_fields_is_one_line(step_zero, tmp_path):
    with safe_open(str(step_zero[0]), framework="pt") as handle:
        metadata = handle.metadata()
    label_set = {**json.loads(metadata[LABEL_SET_KEY]), "templates": ["an emoji of {}.", "{} {0.__class__}"]}
    path = tmp_path / "edited.safetensors"
    save_file(load_file(str(step_zero[0])), str(path), {**metadata, LABEL_SET_KEY: json.dumps(label_set)})
    with pytest.raises(LimoeError) as error:
        load_model(path)
    assert str(error.value).startswith(f"template '{{}} {{0.__class__}}' in the {LABEL_SET_KEY} metadata of {path} has "
                                       f"the field {{0.__class__}}, which is not the class placeholder;")


def test_the_support_draw_is_seeded_and_takes_k_per_class(checkpoint, small_set):
    model, _ = load_model(checkpoint, capacity_factor="dropless")  # features independent of the batching
    loader, names = open_classification_set(str(small_set), None, model.config, 64, 0)
    first = read_few_shot_split(model, loader, shots=3, seed=0)
    again = read_few_shot_split(model, open_classification_set(str(small_set), None, model.config, 17, 0)[0],
                                shots=3, seed=0)
    other = read_few_shot_split(model, loader, shots=3, seed=1)
    chosen = lambda split: {key for key, kept in zip(split.keys, split.support.tolist()) if kept}  # noqa: E731
    assert chosen(first) == chosen(again) != chosen(other)  # batch size does not matter; the seed does
    samples = torch.bincount(first.labels, minlength=len(names))
    support = torch.bincount(first.labels[first.support], minlength=len(names))
    assert torch.equal(support, samples.clamp(max=3))
    assert torch.equal(first.support_labels, first.labels[first.support])
    torch.testing.assert_close(model.encode_image(first.support_inputs), first.features[first.support])


def test_the_recipe_schedule_warms_up_then_decays():
    recipe = TuneRecipe(steps=10)
    factors = [recipe.lr_factor(step) for step in range(10)]
    assert factors[:2] == [0.5, 1.0]  # 20% of 10 steps of linear warmup
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    assert factors[-1] > recipe.min_lr_fraction


@pytest.mark.slow
def test_few_shot_tuning_beats_zeroshot(tmp_path, templates):
    """A demo model trained here (limoe train, the demo recipe: over an hour on 2 CPU cores), tuned
    on 4 shots per class of heldout_cls at --lr 1e-2 for 60 steps. Measured (docs/EVALUATION.md):
    queries' top-1 0.072 zero-shot → 0.301 tuned; the best linear probe on the same shots scores
    0.386, so the probe is not beaten on the demo and that is not asserted."""
    assert main(["train", "--workdir", str(tmp_path / "run")]) == 0
    metrics = _tune(tmp_path / "run" / "model.safetensors", HELDOUT_CLS, tmp_path / "tuned.safetensors", templates,
                    4, 60, "--lr", "1e-2")
    assert metrics["tuned_top1"] > metrics["zeroshot_top1"] + MARGIN_OVER_ZEROSHOT


MARGIN_OVER_ZEROSHOT = 0.15  # measured +0.23 on the demo model; docs/EVALUATION.md
