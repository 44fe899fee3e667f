"""Routing statistics and the `limoe routing` report, checked on a model routed by hand.

The hand-routed model has one MoE block (block 0) whose input is known exactly: attention adds
nothing, patch and token embeddings are zero, and the position embeddings put +C (images) or
−C (text) in feature 0. After the LayerNorm every image token is the same vector and every text
token its mirror image, and the router reads feature 0, so image tokens go to expert 0 and
text tokens to expert 1 with gate probabilities computed here independently of the MoE layer.
"""

import functools
import itertools
import json
import math
import multiprocessing
import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from PIL import Image

from limoe.checkpoints import load_model, save_model_file
from limoe.config import Config, load_model_config
from limoe.data.pipeline import eval_loader
from limoe.errors import LimoeError
from limoe.routing_report.command import WORKERS, run_routing_report
from limoe.model.tower import PAD_TOKEN, Limoe
from limoe.model.routing import entropy, expert_capacity
from limoe.routing_report.pictures import PICTURES
from limoe.routing_report.statistics import RoutingAccumulator, collapse_warnings, collapses, format_summary_table
from tests.helpers import refused, run_limoe

C = 100.0  # magnitude of the modality feature
LOGIT = 2.0  # router logit of the chosen expert (and minus it for the mirrored one)


def hand_routed_model(*overrides: str) -> Limoe:
    """limoe-tiny cut to one MoE block of 4 experts: image → expert 0, text → expert 1 (cls → 2)."""
    settings = ["depth=1", "moe.layers=[0]", "moe.num_experts=4", "moe.eval_capacity_factor=null", "moe.group_size=2"]
    model = Limoe(load_model_config("limoe-tiny", settings + list(overrides))).eval()
    block = model.blocks[0]
    with torch.no_grad():
        for tensor in (block.attention.out.weight, block.attention.out.bias, model.embedders["image"].patch_embed.weight,
                       model.embedders["image"].patch_embed.bias, model.embedders["text"].token_embed.weight,
                       model.image_positions, model.text_positions):
            tensor.zero_()
        model.image_positions[:, 0] = C
        model.text_positions[:, 0] = -C
        scale = LOGIT / float(block.norm2(model.image_positions[:1])[0, 0])  # logit per unit of normalised feature 0
        router = block.mlp.router_weight
        router.zero_()
        router[0, 0], router[1, 0] = scale, -scale
        if model.image_cls_token is not None:  # the class token routes to expert 2 through feature 1
            model.image_cls_token.zero_()
            model.image_cls_token[..., 1] = C
            router[2, 1] = 4 * scale
    return model


def gate_probabilities(model: Limoe, embedding: torch.Tensor) -> torch.Tensor:
    """p(x) [E] for a token whose block input is `embedding` [d] (the router's math, written out)."""
    block = model.blocks[0]
    return torch.softmax(block.mlp.router_weight @ block.norm2(embedding), dim=-1)


def random_batch(batch: int, seed: int, context_length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and captions of 3..16 tokens, the rest padding."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 1000, (batch, context_length), generator=generator)
    lengths = torch.randint(3, context_length + 1, (batch, 1), generator=generator)
    tokens[torch.arange(context_length) >= lengths] = PAD_TOKEN
    return torch.randn(batch, 3, 64, 64, generator=generator), tokens


def test_hand_routed_model_gives_exact_counts_shares_and_entropies():
    model = hand_routed_model()
    accumulator = RoutingAccumulator(model.config.moe_layers)
    text_tokens = 0
    with torch.no_grad():
        for seed, batch in enumerate((5, 3)):
            images, tokens = random_batch(batch, seed)
            accumulator.add(model(images, tokens).routing)
            text_tokens += int((tokens != PAD_TOKEN).sum())
        p_image = gate_probabilities(model, model.image_positions[0])
        p_text = gate_probabilities(model, model.text_positions[0])
    assert p_image.argmax() == 0 and p_text.argmax() == 1

    stats = accumulator.statistics()
    assert stats["num_batches"] == 2 and stats["num_experts"] == 4
    (layer,) = stats["layers"]
    image, text = layer["image"], layer["text"]
    assert layer["block"] == 0
    assert image["tokens"] == 8 * 64 and image["routed"] == image["kept"] == [8 * 64, 0, 0, 0]
    assert text["tokens"] == text_tokens and text["routed"] == text["kept"] == [0, text_tokens, 0, 0]
    assert image["share"] == [1.0, 0.0, 0.0, 0.0] and text["share"] == [0.0, 1.0, 0.0, 0.0]
    assert layer["image_share"] == [1.0, 0.0, None, None]
    assert image["routing_success"] == text["routing_success"] == 1.0 and image["dropped"] == text["dropped"] == 0.0
    assert image["experts_used"] == text["experts_used"] == 1
    for modality, p in ((image, p_image), (text, p_text)):
        # every token of a modality has the same gates, so the marginal entropy is the token entropy
        assert modality["token_entropy"] == pytest.approx(float(entropy(p)), abs=1e-5)
        assert modality["marginal_entropy"] == pytest.approx(float(entropy(p)), abs=1e-5)
    # dropless: capacity = a group's tokens (2 examples × (64 patches + 16 text positions)), groups 3 + 2
    slots = expert_capacity(2 * (64 + 16), 4, None) * (3 + 2)
    assert layer["slots_per_expert"] == slots
    assert layer["utilisation"] == pytest.approx([8 * 64 / slots, text_tokens / slots, 0.0, 0.0])
    assert stats["max_entropy"] == pytest.approx(math.log(4))


def test_accumulated_counts_equal_the_per_token_routing_of_every_batch():
    torch.manual_seed(0)
    config = load_model_config("limoe-tiny", ["moe.eval_capacity_factor=0.5"])  # drops in both layers
    model = Limoe(config).eval()
    accumulator = RoutingAccumulator(config.moe_layers)
    expected = torch.zeros(len(config.moe_layers), 2, 2, 4)  # [layer, routed/kept, modality, expert]
    with torch.no_grad():
        for seed in range(2):
            images, tokens = random_batch(6, seed)
            routing = model(images, tokens).routing
            accumulator.add(routing)
            modality = torch.cat([torch.zeros(6, 64, dtype=torch.long), (tokens != PAD_TOKEN).long() * 2 - 1], dim=1)
            for i, record in enumerate(routing):
                for m in range(2):
                    chosen = record.expert[modality == m]
                    expected[i, 0, m] += torch.bincount(chosen, minlength=4)
                    expected[i, 1, m] += torch.bincount(chosen[record.kept_mask[modality == m]], minlength=4)
    stats = accumulator.statistics()
    for i, layer in enumerate(stats["layers"]):
        for m, name in enumerate(("image", "text")):
            assert layer[name]["routed"] == expected[i, 0, m].long().tolist()
            assert layer[name]["kept"] == expected[i, 1, m].long().tolist()
        assert any(layer[name]["dropped"] > 0 for name in ("image", "text"))
    assert [layer["block"] for layer in stats["layers"]] == list(config.moe_layers)


def _accumulate_and_reduce(rank: int, init_file: str, routing: list, results) -> None:
    """One of two gloo ranks: add this rank's batch, all-reduce, hand back the statistics."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    accumulator = RoutingAccumulator((1, 3))
    accumulator.add(routing[rank])
    accumulator.all_reduce()
    results.put((rank, accumulator.statistics()))
    dist.destroy_process_group()


def test_all_reduce_gives_every_rank_the_statistics_of_all_batches(tmp_path):
    torch.manual_seed(0)
    model = Limoe(load_model_config("limoe-tiny", ["moe.eval_capacity_factor=0.5"])).eval()
    with torch.no_grad():
        routing = [model(*random_batch(batch, seed)).routing for seed, batch in enumerate((4, 7))]
    both = RoutingAccumulator((1, 3))
    for record in routing:
        both.add(record)
    # Spawned, not forked: the test process may hold a process group of its own (in-process training).
    results = multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.start_processes(_accumulate_and_reduce, (str(tmp_path / "init"), routing, results),
                                          nprocs=2, start_method="spawn")
    for _ in range(2):
        _, statistics = results.get()
        assert statistics["num_batches"] == 2
        assert json.dumps(statistics) == json.dumps(both.statistics())


def _statistics(image_share: list[float], text_share: list[float]) -> dict:
    """A one-layer statistics dict (block 5) with the given per-expert shares."""

    def modality(share):
        return {"tokens": 1000, "share": share, "top_expert": share.index(max(share)), "top_share": max(share),
                "experts_used": sum(s >= 0.01 for s in share)}

    return {"num_experts": len(image_share), "layers": [{"block": 5, "image": modality(image_share),
                                                          "text": modality(text_share)}]}


def test_collapse_is_one_expert_with_90_percent_or_text_on_a_single_expert():
    assert collapse_warnings(_statistics([0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.0, 0.0])) == []
    (image,) = collapses(_statistics([0.9, 0.05, 0.05, 0.0], [0.5, 0.5, 0.0, 0.0]))
    assert (image.block, image.modality) == (5, "image") and "block 5" in image.message and "90%" in image.message
    # 32 experts: one gets 70% of the text and 31 share the rest under 1% each
    text_share = [0.7] + [0.3 / 31] * 31
    (text,) = collapses(_statistics([1 / 32] * 32, text_share))
    assert text.modality == "text" and "single expert" in text.message and "block 5" in text.message


def test_summary_table_has_a_row_per_layer():
    model = hand_routed_model()
    accumulator = RoutingAccumulator(model.config.moe_layers)
    with torch.no_grad():
        accumulator.add(model(*random_batch(4, 0)).routing)
    stats = accumulator.statistics()
    table = format_summary_table(stats).splitlines()
    assert len(table) == 2 + len(stats["layers"])
    assert table[2].split()[:2] == ["0", f"256/{stats['layers'][0]['text']['tokens']}"]
    assert len(collapse_warnings(stats)) == 2  # image and text each on one expert


# --- the `limoe routing` report ------------------------------------------------------------------

HELDOUT = "data_shards/heldout"
BATCHES, BATCH = 2, 6


def _save(model: Limoe, path: Path) -> Path:
    save_model_file(model, Config(model=model.config), path)
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One `limoe routing --compare` run over 2 held-out batches of 6: `exact` is the dropless
    hand-routed model; `tight` also has a class token (routed to expert 2) and capacity factor 1
    in its config, below what expert 0 is asked for (64 patches per example)."""
    root = tmp_path_factory.mktemp("routing")
    exact = _save(hand_routed_model(), root / "exact.safetensors")
    tight = _save(hand_routed_model("image_pool=cls", "moe.eval_capacity_factor=1.0"), root / "tight.safetensors")
    stdout = run_limoe(["routing", "--checkpoint", str(exact), "--compare", str(tight), "--data", HELDOUT,
                        "--output", str(root / "out"), "--num-batches", str(BATCHES), "--batch-size", str(BATCH),
                        "--device", "cpu"])
    return {"exact": exact, "tight": tight, "out": root / "out", "stdout": stdout,
            "json": json.loads((root / "out" / "routing.json").read_text())}


@functools.lru_cache(maxsize=None)
def _direct_routing(path: Path) -> tuple[Limoe, list]:
    """The checkpoint's model and its LayerRouting for the report's batches (same loader and
    worker count, so the same samples in the same order), run here directly."""
    model, _ = load_model(path)
    with torch.no_grad():
        routing = [(batch, model(batch.images, batch.tokens).routing[0])
                   for batch in itertools.islice(eval_loader(HELDOUT, BATCH, 64, 16, WORKERS), BATCHES)]
    return model, routing


def _counts(model: Limoe, routing: list) -> torch.Tensor:
    """[routed/kept, modality, expert] from the per-token expert and kept_mask maps."""
    counts = torch.zeros(2, 2, 4, dtype=torch.long)
    first_text = model.config.num_patches + (model.image_cls_token is not None)
    for batch, record in routing:
        modality = torch.zeros_like(record.expert)
        modality[:, first_text:] = torch.where(batch.tokens != PAD_TOKEN, 1, -1)
        for m in range(2):
            counts[0, m] += torch.bincount(record.expert[modality == m], minlength=4)
            counts[1, m] += torch.bincount(record.expert[(modality == m) & record.kept_mask], minlength=4)
    return counts


def test_report_of_the_hand_routed_model_is_exact(report):
    model, routing = _direct_routing(report["exact"])
    text_tokens = sum(int((batch.tokens != PAD_TOKEN).sum()) for batch, _ in routing)
    checkpoint = report["json"]["checkpoints"][0]
    assert checkpoint["name"] == "exact.safetensors" and checkpoint["capacity_factor"] is None
    (layer,) = checkpoint["statistics"]["layers"]
    assert layer["image"]["routed"] == layer["image"]["kept"] == [BATCHES * BATCH * 64, 0, 0, 0]
    assert layer["text"]["routed"] == layer["text"]["kept"] == [0, text_tokens, 0, 0]
    assert layer["image_share"] == [1.0, 0.0, None, None]
    with torch.no_grad():
        for modality, position in (("image", model.image_positions[0]), ("text", model.text_positions[0])):
            expected = float(entropy(gate_probabilities(model, position)))
            assert layer[modality]["token_entropy"] == pytest.approx(expected, abs=1e-5)
            assert layer[modality]["marginal_entropy"] == pytest.approx(expected, abs=1e-5)
    assert len(checkpoint["collapse_warnings"]) == 2
    assert "exact.safetensors:" in report["stdout"] and "routing collapse in MoE block 0" in report["stdout"]


def test_reported_drops_are_the_drops_the_moe_layer_made(report):
    model, routing = _direct_routing(report["tight"])
    counts = _counts(model, routing)
    checkpoint = report["json"]["checkpoints"][1]
    assert checkpoint["capacity_factor"] == 1.0
    (layer,) = checkpoint["statistics"]["layers"]
    for m, name in enumerate(("image", "text")):
        assert layer[name]["routed"] == counts[0, m].tolist()
        assert layer[name]["kept"] == counts[1, m].tolist()
    # a group of 2 examples has 2·(1 + 64 + 16) positions: 44 slots per expert, 6 groups in all
    assert layer["image"]["routed"] == [BATCHES * BATCH * 64, 0, BATCHES * BATCH, 0]
    assert layer["image"]["kept"] == [6 * 44, 0, BATCHES * BATCH, 0]
    assert layer["image"]["dropped"] == pytest.approx(1 - (6 * 44 + 12) / (12 * 65))
    assert layer["text"]["dropped"] == 0.0


def test_examples_have_one_cell_per_patch_and_one_label_per_token(report, tmp_path):
    _, routing = _direct_routing(report["tight"])
    batch, record = routing[0]
    caption = _first_caption()
    for checkpoint in report["json"]["checkpoints"]:
        assert checkpoint["pictured_block"] == 0
        for i, example in enumerate(checkpoint["examples"]):
            assert example["key"] == batch.keys[i]
            assert torch.tensor(example["patch_experts"]).shape == (8, 8)  # 64 px / 8 px patches
            assert torch.tensor(example["patch_experts"]).eq(0).all()  # the class token (expert 2) is not a patch
            real = int((batch.tokens[i] != PAD_TOKEN).sum())
            assert len(example["tokens"]) == len(example["token_experts"]) == len(example["token_kept"]) == real
            assert set(example["token_experts"]) == {1}
            assert example["tokens"][0] == "<sot>" and example["tokens"][-1] == "<eot>"
        assert " ".join(checkpoint["examples"][0]["tokens"][1:-1]) == caption.lower()
    tight_examples = report["json"]["checkpoints"][1]["examples"]
    patch_kept = record.kept_mask[: len(tight_examples), 1:65].reshape(-1, 8, 8)  # after the class token
    assert [example["patch_kept"] for example in tight_examples] == patch_kept.tolist()
    assert not patch_kept.all()


def _first_caption() -> str:
    with tarfile.open(sorted(Path(HELDOUT).glob("*.tar*"))[0]) as shard:
        return shard.extractfile("000000000.txt").read().decode().strip()


def test_pictures_are_pngs_of_the_layout_size(report):
    examples = report["json"]["checkpoints"][0]["examples"]
    longest = max(len(example["tokens"]) for example in examples)
    # two checkpoints side by side, one MoE layer of 4 experts, 4 examples
    expected = {
        "modality_mix.png": (2 * (160 + 45 * 4), 200 + 60),
        "expert_heatmap.png": (2 * (140 + 50 * 4), 130 + 40),
        "drop_rates.png": (2 * (160 + 70), 260),
        "patch_experts.png": ((1 + 2) * 240, 4 * 260 + 60),  # the image, then each checkpoint's map
        "token_experts.png": (160 + 80 * longest, 4 * 2 * 70 + 60),
    }
    assert set(expected) == set(PICTURES)
    for name, size in expected.items():
        path = report["out"] / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size == size, name


def test_capacity_factor_option_applies_to_the_checkpoint(report, tmp_path):
    run_limoe(["routing", "--checkpoint", str(report["exact"]), "--data", HELDOUT, "--output", str(tmp_path),
               "--num-batches", "1", "--batch-size", "2", "--capacity-factor", "1.0", "--device", "cpu"])
    (checkpoint,) = json.loads((tmp_path / "routing.json").read_text())["checkpoints"]
    assert checkpoint["capacity_factor"] == 1.0
    # one group of 2·(64 + 16) positions: 40 slots
    assert checkpoint["statistics"]["layers"][0]["image"]["kept"] == [40, 0, 0, 0]


@pytest.mark.parametrize("which", ["checkpoint", "compare"])
def test_a_missing_checkpoint_is_one_line_and_exit_2(report, tmp_path, which):
    paths = {"checkpoint": str(report["exact"]), "compare": str(report["exact"])}
    paths[which] = str(tmp_path / "missing.safetensors")
    refused(["routing", "--checkpoint", paths["checkpoint"], "--compare", paths["compare"], "--data", HELDOUT,
             "--output", str(tmp_path / "out")], "missing.safetensors")
    assert not (tmp_path / "out").exists()


def test_a_dense_model_counts_batches_and_reports_no_routing():
    accumulator = RoutingAccumulator(())
    accumulator.add([])
    accumulator.all_reduce()  # nothing to reduce: no collective, no process group needed
    stats = accumulator.statistics()
    assert stats["num_batches"] == 1 and stats["layers"] == []
    assert collapse_warnings(stats) == [] and "no MoE layers" in format_summary_table(stats)


def test_a_block_without_experts_is_refused_before_any_output(report, tmp_path):
    dense = _save(Limoe(load_model_config("limoe-tiny", ["dense=true"])), tmp_path / "dense.safetensors")
    with pytest.raises(LimoeError, match="no MoE blocks"):
        run_routing_report(dense, HELDOUT, tmp_path / "out")
    with pytest.raises(LimoeError, match="block 1 .* is not an MoE block"):
        run_routing_report(report["exact"], HELDOUT, tmp_path / "out", block=1)
    assert not (tmp_path / "out").exists()


def test_the_report_ends_with_one_line_naming_its_folder_and_files(report):
    last = report["stdout"].splitlines()[-1]
    names = ["routing.json", *PICTURES]
    assert last == f"wrote {', '.join(names)} to {report['out']}"
    assert sorted(path.name for path in report["out"].iterdir()) == sorted(names)


@functools.lru_cache(maxsize=1)
def _heldout_batches() -> list:
    """The report's batches of 6 (same loader and worker count), all of them."""
    return list(eval_loader(HELDOUT, BATCH, 64, 16, WORKERS))


def test_keys_choose_the_pictured_examples_in_their_order(report, tmp_path):
    batches = _heldout_batches()
    # one sample of a batch after the counted ones (read on for it), one of the first batch
    later, first = batches[BATCHES + 1].keys[1], batches[0].keys[4]
    run_limoe(["routing", "--checkpoint", str(report["exact"]), "--data", HELDOUT, "--output", str(tmp_path),
               "--num-batches", str(BATCHES), "--batch-size", str(BATCH), "--keys", f"{later},{first}", "--device",
               "cpu"])
    (checkpoint,) = json.loads((tmp_path / "routing.json").read_text())["checkpoints"]
    assert [example["key"] for example in checkpoint["examples"]] == [later, first]
    real = int((batches[BATCHES + 1].tokens[1] != PAD_TOKEN).sum())
    assert len(checkpoint["examples"][0]["tokens"]) == real
    assert checkpoint["statistics"]["num_batches"] == BATCHES  # reading on for a key adds nothing to the statistics


def test_block_chooses_the_pictured_moe_block(tmp_path):
    torch.manual_seed(0)
    model = Limoe(load_model_config("limoe-tiny")).eval()  # MoE blocks 1 and 3, no class token
    path = _save(model, tmp_path / "tiny.safetensors")
    run_limoe(["routing", "--checkpoint", str(path), "--data", HELDOUT, "--output", str(tmp_path / "out"),
               "--num-batches", "1", "--batch-size", "3", "--block", "1", "--device", "cpu"])
    (checkpoint,) = json.loads((tmp_path / "out" / "routing.json").read_text())["checkpoints"]
    assert checkpoint["pictured_block"] == 1
    batch = next(iter(eval_loader(HELDOUT, 3, 64, 16, WORKERS)))
    with torch.no_grad():
        first, last = model(batch.images, batch.tokens).routing  # blocks 1 and 3
    pictured = [example["patch_experts"] for example in checkpoint["examples"]]
    assert pictured == first.expert[:, :64].reshape(3, 8, 8).tolist() != last.expert[:, :64].reshape(3, 8, 8).tolist()


@pytest.mark.parametrize("option, message", [
    (["--keys", "000000000,no-such-sample"], "--keys: no-such-sample is not a sample key of"),
    (["--keys", "000000000,"], "--keys has an empty key"),
    (["--block", "7"], "block 7 of model limoe-tiny is not an MoE block; its MoE blocks are [0]"),
])
def test_an_unknown_key_or_block_is_one_line_and_exit_2(report, tmp_path, option, message):
    refused(["routing", "--checkpoint", str(report["exact"]), "--data", HELDOUT, "--output", str(tmp_path / "out"),
             "--num-batches", "1", "--batch-size", str(BATCH), *option, "--device", "cpu"], message)
    assert not (tmp_path / "out").exists()
