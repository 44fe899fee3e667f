"""limoe.benchmarks.training: the CPU smoke run prints its table, and the FLOP count is right by hand and by counter."""

import subprocess
import sys

import open_clip
import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from limoe.benchmarks import training as bench
from limoe.config import load_model_config
from limoe.model.tower import Limoe
from tests.child_env import child_env

HEADER = "model mode pairs/s step ms peak GiB GFLOP/pair MFU vs open_clip vs model-only".split()


def _run_bench(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "limoe.benchmarks.training", *args], capture_output=True, text=True, timeout=600,
                            env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _table(stdout: str) -> dict[tuple[str, str], list[str]]:
    """(model, mode) → the row's remaining cells."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == HEADER)
    rows = {}
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) < 2 or cells[1] not in bench.MODES:
            break
        rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_cpu_smoke_run_prints_every_row_through_the_trainer_too():
    stdout = _run_bench("--cpu", "--through-trainer")
    assert stdout.startswith("# CPU smoke run")
    rows = _table(stdout)
    expected = [("limoe-tiny", "eager"), ("limoe-tiny", "trainer"), ("limoe-tiny-dense", "eager"),
                ("limoe-tiny-dense", "trainer"), ("open_clip-tiny", "eager")]
    assert list(rows) == expected
    for key, cells in rows.items():
        assert len(cells) == 7, (key, cells)  # a failed row is a note instead of numbers
        pairs, step_ms, peak, gflop, mfu, vs_open_clip, vs_model = cells
        assert float(pairs) > 0 and float(step_ms) > 0 and float(gflop) > 0 and mfu.endswith("%")
        assert peak == "-"  # no CUDA memory on CPU
        assert vs_open_clip.endswith("x") == (key[0] != "open_clip-tiny")
        assert vs_model.endswith("x") == (key[1] == "trainer")


@pytest.mark.slow
def test_cpu_smoke_run_under_torch_compile():
    rows = _table(_run_bench("--cpu", "--models", "limoe-tiny", "open_clip-tiny", "--compile"))
    assert set(rows) == {(m, mode) for m in ("limoe-tiny", "open_clip-tiny") for mode in ("eager", "compiled")}
    assert all(len(cells) == 7 for cells in rows.values())


def test_arguments_pick_rows_and_reject_unknown_models():
    args = bench.parse_args(["--models", "limoe-b16", "limoe-b16-dense", "ViT-B-16", "--compile", "ViT-B-16",
                             "--through-trainer"])
    assert [(spec.label, mode) for spec, mode in bench.plan(args)] == [
        ("limoe-b16", "eager"), ("limoe-b16", "trainer"), ("limoe-b16-dense", "eager"),
        ("limoe-b16-dense", "trainer"), ("ViT-B-16", "eager"), ("ViT-B-16", "compiled"),
    ]
    assert args.specs[1] == bench.Spec("limoe-b16-dense", "limoe", "limoe-b16", dense=True)
    assert args.specs[1].partner == "ViT-B-16" and args.specs[2].partner is None
    assert (args.batch, args.steps, args.warmup) == (256, 20, 5)
    for bad in (["--models", "limoe-b99"], ["--models", "ViT-B-16", "--compile", "ViT-B-32"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


SMALL = ["image_size=8", "patch_size=4", "width=8", "depth=2", "heads=2", "mlp_dim=16", "embed_dim=4",
         "context_length=3", "image_pool=map", "text_pool=eos", "moe.num_experts=2", "moe.layers=[1]"]


def test_training_flops_by_hand():
    # Per token and block, d=8 h=16: qkv 2·8·24 = 384, output 2·8·8 = 128, MLP 2·(2·8·16) = 512;
    # attention 4·N·d: 128 for the 4 patches, 96 for the 3 text tokens. Router in 1 block: 2·8·2 = 32.
    image_blocks = 4 * (2 * (384 + 128 + 128 + 512) + 32)  # 9344
    text_blocks = 3 * (2 * (384 + 96 + 128 + 512) + 32)  # 6816
    patch_embed = 4 * 2 * (3 * 4 * 4) * 8  # 3072
    map_head = 2 * 8 * 8 + 4 * 8 * 8 * 4 + 4 * 4 * 8 + 2 * 8 * 8 + 4 * 8 * 16  # probe q, k/v, attention, out, MLP: 1920
    projections = 2 * (2 * 8 * 4)  # image and text: 128
    forward = image_blocks + text_blocks + patch_embed + map_head + projections
    assert forward == 21280
    assert bench.training_flops_per_pair(bench.limoe_streams(load_model_config("limoe-tiny", SMALL))) == 3 * forward
    dense = load_model_config("limoe-tiny", [*SMALL, "dense=true"])
    assert bench.training_flops_per_pair(bench.limoe_streams(dense)) == 3 * (forward - (4 + 3) * 32)


def _counted_forward_flops(model, images, tokens) -> int:
    """FLOPs torch's counter sees in one forward, attention through the math kernel so it is counted."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(images, tokens)
    return counter.get_total_flops()


@pytest.mark.parametrize("pools", [("map", "map"), ("cls", "eos"), ("mean", "mean")])
def test_limoe_flops_match_torch_flop_counter_on_the_dense_twin(pools):
    """The dense twin runs exactly the counted matmuls (a MoE layer also runs capacity slots)."""
    config = load_model_config("limoe-tiny", ["dense=true", f"image_pool={pools[0]}", f"text_pool={pools[1]}"])
    images, tokens = bench.random_batch(2, config.image_size, config.context_length, config.vocab_size, "cpu")
    forward = sum(bench.stream_forward_flops(s) for s in bench.limoe_streams(config))
    assert _counted_forward_flops(Limoe(config), images, tokens) == 2 * forward


def test_open_clip_flops_match_torch_flop_counter():
    name, overrides = bench.open_clip_config(bench.resolve_spec(bench.TINY_OPEN_CLIP))
    model = open_clip.create_model(name, pretrained=None, **overrides)
    images, tokens = bench.random_batch(2, 64, 16, 49408, "cpu")
    forward = sum(bench.stream_forward_flops(s) for s in bench.open_clip_streams({**open_clip.get_model_config(name), **overrides}))
    assert _counted_forward_flops(model, images, tokens) == 2 * forward
