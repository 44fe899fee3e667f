"""`limoe plan`: measured activation bytes against a real CPU step, the state arithmetic by hand,
the settings it recommends, and bad input. (The state against a real ZeRO engine, which needs a
process group: tests/training/test_engine_state.py.)"""

import dataclasses
import shlex

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from limoe.cli import build_parser
from tests.helpers import refused, run_limoe, set_options
from limoe.config import load_config
from limoe.data.preprocess import normalize
from limoe.errors import LimoeError
from limoe.model.tower import build_model
from limoe.plan import GiB, Setting, plan_memory, refuse_if_it_cannot_fit
from limoe.plan.launch import launch_command
from limoe.plan.activations import KeptStorages, measure_activations
from limoe.plan.state import count_parameters, state_bytes
from limoe.training.losses import auxiliary_loss
from limoe.training.objectives import ContrastiveObjective

# The demo model in fp32 on the Triton ops (the plan measures the GPU's ops), one routing group.
TINY = ["train.precision=fp32", "model.moe.backend=triton", "model.moe.group_size=4"]


@pytest.fixture(scope="module")
def tiny():
    config = load_config("demo", TINY)
    return config, measure_activations(config, bf16=False)


def _real_forward(config, checkpointing: str, batch: int):
    """A real training forward of `batch` pairs (uint8 images in, as the loader gives them)."""
    torch.manual_seed(0)
    module = ContrastiveObjective(build_model(config), config).train()
    module.model.set_activation_checkpointing(checkpointing)
    images = torch.randint(0, 256, (batch, 3, config.model.image_size, config.model.image_size), dtype=torch.uint8)
    tokens = torch.randint(1, 1000, (batch, config.model.context_length))

    def run():
        output = module.model(normalize(images), tokens)
        return output, auxiliary_loss(output.routing, config.loss)[0]

    return module, run


def test_activation_bytes_agree_with_what_a_real_cpu_step_saves_for_backward(tiny):
    """Reference: the storages autograd saves in a real forward (its saved-tensor hooks), parameters excluded."""
    config, profile = tiny
    batch = config.model.moe.group_size
    model, run = _real_forward(config, "none", batch)
    planned = profile.per_pair["none"] * batch + profile.shared_weight_copies["none"] + profile.expert_weight_copies["none"]
    assert planned == pytest.approx(_saved_bytes(model, run), rel=0.10)


def _saved_bytes(module, run) -> int:
    """Bytes of the storages autograd saves for backward while `run()` runs, parameters excluded."""
    parameters = {StorageWeakRef(p.untyped_storage()) for p in module.parameters()}
    saved = {}

    def pack(tensor):
        key = StorageWeakRef(tensor.untyped_storage())
        if key not in parameters:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    del output
    return sum(saved.values())


@pytest.mark.parametrize("checkpointing", ["moe", "all"])
def test_checkpointed_activation_bytes_agree_with_a_real_cpu_step(tiny, checkpointing):
    """Under checkpointing a block keeps its inputs, not autograd's saved tensors, so the reference is
    what a real forward leaves alive; the plan's numbers come from fake tensors."""
    config, profile = tiny
    batch = config.model.moe.group_size
    model, run = _real_forward(config, checkpointing, batch)
    tracker = KeptStorages({StorageWeakRef(p.untyped_storage()): "shared" for p in model.parameters()})
    with tracker:
        output = run()
    kept = tracker.kept()
    planned = (profile.per_pair[checkpointing] * batch + profile.shared_weight_copies[checkpointing]
               + profile.expert_weight_copies[checkpointing])
    assert planned == pytest.approx(kept.activations + kept.shared_weight_copies, rel=0.10)
    assert profile.per_pair["all"] < profile.per_pair["moe"] < profile.per_pair["none"]
    del output


def test_state_arithmetic_by_hand_for_h14_on_32_gpus():
    """LIMoE-H/14, 32 GPUs, expert parallelism 8 (each expert on 4 GPUs), ZeRO 1."""
    config = load_config("limoe-h14", ["distributed.zero_stage=1"])
    d, h, experts, moe_layers, depth, dense_layers = 1280, 5120, 32, 12, 32, 20
    mlp = 2 * d * h + h + d  # fc1 and fc2 with biases: 13,113,600
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d)  # two LayerNorms, qkv, output projection
    map_head = d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + mlp  # probe, attention, norm, MLP
    shared = (3 * 14 * 14 * d + d  # patch embedding
              + 256 * d + 49408 * d + 16 * d  # image positions, token embedding, text positions
              + depth * block + dense_layers * mlp + moe_layers * experts * d  # blocks, dense MLPs, routers
              + 2 * d  # final LayerNorm
              + 2 * map_head + 2 * d * 1024 + 1)  # pooling heads, projections, logit scale
    all_experts = moe_layers * experts * mlp
    counts = count_parameters(config)
    assert (counts.shared, counts.all_experts, counts.local_experts) == (shared, all_experts, all_experts // 8)
    assert counts.shared + counts.all_experts == pytest.approx(5.6e9, rel=0.01)  # the paper's 5.6B

    state = state_bytes(counts, gpus=32, expert_parallel=8, zero_stage=1, zero_bucket_elements=0)
    held = shared + all_experts // 8  # each GPU: all shared weights and 4 experts per MoE layer
    assert state.parameters == 4 * held and state.gradients == 4 * held  # fp32; ZeRO 1 keeps whole gradients
    # fp32 master copy and two moments of this GPU's partition: shared over 32 GPUs, experts over their 4 replicas
    assert state.optimizer == round(12 * (shared / 32 + all_experts // 8 / 4))
    zero0 = state_bytes(counts, gpus=32, expert_parallel=8, zero_stage=0, zero_bucket_elements=0)
    assert zero0.optimizer == 8 * held
    zero2 = state_bytes(counts, gpus=32, expert_parallel=8, zero_stage=2, zero_bucket_elements=0)
    assert zero2.gradients == round(4 * (shared / 32 + all_experts // 8 / 4))


def test_plan_for_b16_on_8_gpus_picks_a_fitting_setting():
    plan = plan_memory(load_config("limoe-b16"), 8, 80 * GiB)
    assert plan.local_batch == 2048
    assert not plan.fits(Setting("none", 2048))  # 2048 pairs of B/16 activations do not fit 80 GiB
    best = plan.recommended()
    assert best is not None and plan.fits(best)
    for checkpointing in ("none", "moe", "all"):
        largest = plan.largest_fitting(checkpointing)
        assert largest is not None and plan.fits(largest)
        bigger = [m for m in plan.micro_batches if m > largest.micro_batch]
        assert not bigger or not plan.fits(Setting(checkpointing, min(bigger)))
    global_loss = dataclasses.replace(plan.config, loss=dataclasses.replace(plan.config.loss, local_loss=False))
    whole = plan_memory(global_loss, 8, 80 * GiB).breakdown(Setting("all", 2048)).logits
    local = plan.breakdown(Setting("all", 2048)).logits
    # 16384² logits per rank instead of 2048 × 16384: the difference is 7 × 2048 × 16384 logits
    assert whole - local == pytest.approx(plan.profile.logit_bytes * 7 * 2048 * 16384, abs=2)


def test_train_refuses_a_run_that_cannot_fit_in_one_line():
    with pytest.raises(LimoeError) as error:
        refuse_if_it_cannot_fit(load_config("limoe-b16", ["train.activation_checkpointing=none"]), 8, 80 * GiB)
    message = str(error.value)
    assert "GiB per GPU" in message and "set train.micro_batch_size=" in message and "\n" not in message


@pytest.mark.parametrize("gpus, overrides, message", [
    (8, ["train.micro_batch_size=300"], "does not divide the 2048 pairs per GPU"),
    (8, ["train.micro_batch_size=4"], "multiple of model.moe.group_size 8"),
    (8, ["distributed.zero_stage=3"], "zero_stage 3 partitions parameters"),
    (8, ["distributed.deepspeed_config={train_batch_size: 4096}"], "'train_batch_size' to 4096"),
    (8, ["distributed.deepspeed_config={bf16: {enabled: true}}"], "sets 'bf16'"),
    (6, ["distributed.expert_parallel_size=4"], "does not divide the 6 GPUs"),
])
def test_bad_settings_are_one_line_and_exit_2(gpus, overrides, message):
    args = ["plan", "--config", "limoe-b16", "--gpus", str(gpus), "--gpu-memory", "80", *set_options(*overrides)]
    refused(args, message)


@pytest.mark.parametrize("option, value, message", [
    ("--gpu-memory", "nan", "'nan' is out of range; give a finite number > 0 and ≤ 1e+06 such as 80"),
    ("--gpu-memory", "inf", "'inf' is out of range"),
    ("--gpu-memory", "-80", "'-80' is out of range"),
    ("--gpu-memory", "0", "'0' is out of range"),
    ("--gpu-memory", "1e300", "'1e300' is out of range"),
    ("--gpu-memory", "80GB", "'80GB' is not a number; give one such as 80"),
    ("--gpus", "0", "0 is out of range; give a whole number ≥ 1"),
    ("--gpus", "-8", "-8 is out of range; give a whole number ≥ 1"),
])
def test_gpu_numbers_out_of_range_are_one_line_and_exit_2(option, value, message):
    values = {"--gpus": "8", "--gpu-memory": "80", option: value}
    line = refused(["plan", "--config", "limoe-b16", *(text for pair in values.items() for text in pair)])
    assert line.startswith(f"limoe: error: argument {option}: {message}")


@pytest.mark.parametrize("inputs", ["images", "texts"])
def test_one_modality_activation_bytes_agree_with_a_real_cpu_forward(tiny, inputs):
    """A classification step encodes images and prompts in separate passes; each pass's bytes per
    item against what autograd saves in a real forward of that modality alone."""
    config, profile = tiny
    batch = config.model.moe.group_size
    module, _ = _real_forward(config, "none", batch)
    images = torch.randint(0, 256, (batch, 3, config.model.image_size, config.model.image_size), dtype=torch.uint8)
    tokens = torch.randint(1, 1000, (batch, config.model.context_length))

    def run():
        output = module.model(normalize(images), None) if inputs == "images" else module.model(None, tokens)
        return output, auxiliary_loss(output.routing, config.loss)[0]

    per_item = profile.per_example[("image",) if inputs == "images" else ("text",)]
    assert per_item["none"] * batch == pytest.approx(_saved_bytes(module, run), rel=0.10)


def _classnames(tmp_path, count: int):
    path = tmp_path / "classnames.txt"
    path.write_text("".join(f"class {index}\n" for index in range(count)))
    return path


def _tasks(classnames) -> list[str]:
    """Overrides for pairs plus a labelled set under PolyViT's weighted schedule (B/16's batch of 16384 pairs)."""
    tasks = ("tasks=[{name: pairs, kind: contrastive, data: 'p/{0..9}.tar', batch_size: 16384, steps: 8}, "
             f"{{name: labels, kind: classification, data: 'c/{{0..9}}.tar', classnames: {classnames}, "
             "templates: simple, batch_size: 8192, steps: 2}]")
    return [tasks, "train.steps=10"]


def _cotraining(base: str, classnames, *overrides: str):
    return load_config(base, [*_tasks(classnames), *overrides])


def test_a_cotraining_plan_is_its_largest_step_and_counts_prompts_by_hand(tmp_path):
    """B/16 on 8 GPUs: pairs of 16384, and 8192 images scored against 1000 classes × 7 templates."""
    plan = plan_memory(_cotraining("limoe-b16", _classnames(tmp_path, 1000)), 8, 80 * GiB)
    pairs, labels = plan.workloads
    assert (pairs.kind, pairs.local, pairs.global_batch) == ("contrastive", 2048, 16384)
    assert (labels.kind, labels.local, labels.candidates, labels.gathered_prompts, labels.prompts) == (
        "classification", 1024, 1000, 7000, 875)  # 7000 prompts split over 8 GPUs
    assert plan.micro_batches == [None]  # a classification batch is encoded whole
    setting = Setting("all", None)
    steps = [plan.step_breakdown(workload, setting) for workload in plan.workloads]
    assert plan.breakdown(setting) == max(steps, key=lambda step: step.total)
    profile = plan.profile
    assert steps[1].activations == round(profile.per_example[("image",)]["all"] * 1024 + profile.per_example[("text",)]["all"] * 875)
    assert steps[0] == plan_memory(load_config("limoe-b16"), 8, 80 * GiB).breakdown(Setting("all", 2048))

    subset = plan_memory(_cotraining("limoe-b16", _classnames(tmp_path, 1000), "tasks.1.candidates=64"), 8, 80 * GiB)
    assert subset.workloads[1].candidates == 1000  # a batch of 8192 may hold every class: all are scored
    smaller = plan_memory(_cotraining("limoe-b16", _classnames(tmp_path, 100_000), "tasks.1.candidates=10000"), 8,
                          80 * GiB)
    assert (smaller.workloads[1].candidates, smaller.workloads[1].prompts) == (10000, 8750)


def test_a_label_set_too_large_to_encode_is_refused_naming_its_task(tmp_path):
    large = _cotraining("limoe-b16", _classnames(tmp_path, 21841), "train.activation_checkpointing=none")
    with pytest.raises(LimoeError) as error:
        refuse_if_it_cannot_fit(large, 8, 80 * GiB)
    message = str(error.value)
    assert "task labels's step needs" in message and "19111 prompts" in message and "\n" not in message
    assert "set train.micro_batch_size=null train.activation_checkpointing=" in message

    huge = _cotraining("limoe-b16", _classnames(tmp_path, 400_000), "tasks.1.templates=openai")
    with pytest.raises(LimoeError, match="give task labels fewer candidates"):
        refuse_if_it_cannot_fit(huge, 8, 80 * GiB)


def test_plan_reports_each_task_and_exits_1_when_its_largest_step_does_not_fit(tmp_path):
    overrides = [*_tasks(_classnames(tmp_path, 21841)), "train.activation_checkpointing=none"]
    report = run_limoe(["plan", "--config", "limoe-b16", "--gpus", "8", "--gpu-memory", "80",
                                *set_options(*overrides)], status=1)
    assert "the largest step, task labels" in report and "DOES NOT FIT" in report
    assert "1024 images + 19111 prompts of 21841 classes per GPU" in report
    assert "settings to use: train.activation_checkpointing=all (" in report  # each task's whole batch, as configured


def _plan_report(*options: str, status: int = 0) -> list[str]:
    report = run_limoe(["plan", "--gpus", "8", "--gpu-memory", "80", *options], status=status)
    return [line.strip() for line in report.splitlines()]


def _launched_config(line: str):
    """The config that the pasted launch line trains with: its `limoe train` arguments, parsed by limoe's parser."""
    argv = shlex.split(line)
    args = build_parser().parse_args(argv[argv.index("limoe") + 1:])
    assert args.command == "train"
    return load_config(args.config, args.set), args


def test_plan_says_no_change_for_a_config_at_its_recommended_setting():
    report = _plan_report("--config", "limoe-b16", "--set", "data.train=/data/{0..9}.tar")
    assert report[-3].startswith("settings to use: no change, the configured train.micro_batch_size=null "
                                 "train.activation_checkpointing=all (")
    assert "micro_batch_size=2048" not in "\n".join(report)  # the whole per-GPU batch is no micro-batching
    assert report[-2] == "launch:"
    config, args = _launched_config(report[-1])
    assert report[-1].startswith("deepspeed --num_gpus 8 --module limoe train ")
    assert args.config == "limoe-b16" and args.set == ["data.train=/data/{0..9}.tar"]
    assert config.data.train[0].shards == "/data/{0..9}.tar"


def test_the_launch_line_trains_with_the_recommended_setting():
    report = _plan_report("--config", "limoe-b16", "--set", "train.activation_checkpointing=none", status=1)
    assert report[-3].startswith("settings to use: train.activation_checkpointing=all (")
    config, args = _launched_config(report[-1])
    assert args.set == ["train.activation_checkpointing=all"]  # the recommendation replaces the planned override
    replanned = plan_memory(config, 8, 80 * GiB)
    assert replanned.fits(replanned.configured) and replanned.overrides(replanned.recommended()) == []


@pytest.mark.parametrize("gpus, launcher", [
    (1, "limoe train"),
    (6, "deepspeed --num_gpus 6 --module limoe train"),
    (32, "deepspeed --hostfile hosts --num_nodes 4 --num_gpus 8 --module limoe train"),
    (12, "deepspeed --hostfile hosts --num_nodes 2 --num_gpus 6 --module limoe train"),
])
def test_the_launch_line_spreads_the_gpus_over_nodes_of_at_most_8(gpus, launcher):
    line = launch_command("configs/train/limoe-h14.yaml", gpus, ["data.train=/data/{00000..41455}.tar"])
    assert line == (f"{launcher} --config configs/train/limoe-h14.yaml --workdir runs/limoe-h14 "
                    f"--set 'data.train=/data/{{00000..41455}}.tar'")


def test_input_images_are_counted_uncropped_when_the_device_resizes_them():
    """The demo (64 px crops, 128 pairs) on 2 GPUs, 64 pairs each, by hand. Cropped in the workers,
    two uint8 batches: 2 x 64 x 3 x 64² = 1,572,864 bytes. Uncropped, a box is at most
    ceil(4/3 x 2 x ceil(64 / sqrt(0.9 x 3/4))) = ceil(8/3 x 78) = 208 px a side: 2 x 64 x 3 x 208²
    = 16,613,376 bytes, and the resize's float32 pixels, row pass and weights,
    4 x 64 x (3 x 208² + 3 x 64 x 208 + 2 x 64 x 208) = 50,266,112 bytes, are one more transient."""
    worker = plan_memory(load_config("demo", TINY), 2, 80 * GiB)
    device = plan_memory(load_config("demo", [*TINY, "data.resize_on=device"]), 2, 80 * GiB)
    setting = Setting("none", None)
    cropped, uncropped = worker.breakdown(setting), device.breakdown(setting)
    assert cropped.inputs == 1_572_864 and uncropped.inputs == 16_613_376
    assert uncropped.transient == max(cropped.transient, 50_266_112)
    assert uncropped.total - cropped.total == 16_613_376 - 1_572_864 + uncropped.transient - cropped.transient
    report = _plan_report("--config", "demo", *(f"--set={o}" for o in TINY), "--set", "data.resize_on=device")
    assert any(line.startswith("input images ") and "uncropped up to 208 px a side" in line for line in report)


# An image-text-audio demo model co-trained on pairs and on audio-text pairs, 16 of each per step.
# A clip: 0.37 s at 16 kHz, T = 5920 samples; 1 + (5920 − 512) // 160 = 34 frames of 257 bins;
# 48 mel rows in patches of 16: 3 x (34 // 16 = 2) = 6 tokens.
AUDIO = ["model.modalities=[image, text, audio]", "model.audio.n_mels=48", "model.audio.clip_seconds=0.37",
         "tasks=[{name: pairs, kind: contrastive, data: 'p/{0..9}.tar', batch_size: 16, steps: 6}, "
         "{name: sounds, kind: contrastive, data: 'a/{0..9}.tar', batch_size: 16, steps: 4, modalities: [audio, text]}]",
         "train.steps=10"]


def test_an_audio_task_is_planned_with_its_clips_by_hand():
    """On 2 GPUs, 8 clips each: two float32 waveform batches [8, 5920] on the GPU, 2 x 8 x 5920 x 4 =
    378,880 bytes (the pairs' step keeps its 2 x 8 x 3 x 64² uint8 images = 196,608); the log-mel
    working set per clip is its complex spectrum (8 bytes a bin) with the two squares and their sum
    (4 bytes each), 257 x 34 x 20 = 174,760 bytes; the host's batch is 8 x 5920 x 4 = 189,440 bytes."""
    plan = plan_memory(load_config("demo", [*TINY, *AUDIO]), 2, 80 * GiB)
    pairs, sounds = plan.workloads
    assert (sounds.modalities, sounds.local, pairs.modalities) == (("audio", "text"), 8, ("image", "text"))
    assert plan.profile.log_mel_per_clip == 174_760
    setting = Setting("none", None)
    audio_step, image_step = plan.step_breakdown(sounds, setting), plan.step_breakdown(pairs, setting)
    assert (audio_step.inputs, image_step.inputs) == (378_880, 196_608)
    assert audio_step.activations == round(plan.profile.per_example[("text", "audio")]["none"] * 8)
    assert audio_step.activations != image_step.activations
    report = _plan_report("--config", "demo", "--gpus", "2", *(f"--set={o}" for o in [*TINY, *AUDIO]))
    [line] = [line for line in report if line.startswith("audio ")]
    assert "6 tokens per clip (3 x 2 patches of 16, 34 frames of 0.37 s)" in line
    assert "log-mel 0.17 MiB per clip on the GPU; 0.2 MiB of waveforms per batch on the host" in line


# An image-text-video demo model co-trained on pairs and on video-text pairs, 16 of each per step:
# clips of 6 frames at 64 px in tubelets of 3 (2 steps of 8 x 8 positions, 128 tokens a clip).
VIDEO_TASK = ["model.modalities=[image, text, video]", "model.video.frames=6", "model.video.tubelet_frames=3",
              "tasks=[{name: pairs, kind: contrastive, data: 'p/{0..9}.tar', batch_size: 16, steps: 6}, "
              "{name: clips, kind: contrastive, data: 'v/{0..9}.tar', batch_size: 16, steps: 4, "
              "modalities: [video, text]}]", "train.steps=10"]


def test_a_video_task_is_planned_with_its_clips_by_hand():
    """On 2 GPUs, 8 clips each: two uint8 clip batches [8, 6, 3, 64, 64] on the GPU, 2 x 8 x 6 x 3 x
    64² = 1,179,648 bytes (the pairs' step keeps its 2 x 8 x 3 x 64² uint8 images = 196,608)."""
    plan = plan_memory(load_config("demo", [*TINY, *VIDEO_TASK]), 2, 80 * GiB)
    pairs, clips = plan.workloads
    assert (clips.modalities, clips.local) == (("video", "text"), 8)
    setting = Setting("none", None)
    video_step, image_step = plan.step_breakdown(clips, setting), plan.step_breakdown(pairs, setting)
    assert (video_step.inputs, image_step.inputs) == (1_179_648, 196_608)
    assert video_step.activations == round(plan.profile.per_example[("text", "video")]["none"] * 8)


# Audio pretraining of the same model (pretrain.modalities), without tasks: 16 clips and captions a step.
AUDIO_PRETRAINING = [*AUDIO[:3], "pretrain.modalities=[audio, text]", "train.batch_size=16"]


def test_audio_pretraining_is_planned_with_its_clips():
    """On 2 GPUs, 8 audio-text pairs each, as the audio task above: the same waveform bytes by hand,
    the activations of audio-text pairs, and the report's audio line."""
    plan = plan_memory(load_config("configs/pretrain/demo.yaml", [*TINY, *AUDIO_PRETRAINING], kind="pretrain"), 2,
                       80 * GiB)
    [step] = plan.workloads
    assert (step.modalities, step.local) == (("audio", "text"), 8)
    assert set(plan.profile.per_example) == {("text", "audio"), ("text",), ("audio",)}
    breakdown = plan.step_breakdown(step, Setting("none", None))
    assert breakdown.inputs == 378_880
    assert breakdown.activations == round(plan.profile.per_example[("text", "audio")]["none"] * 8)
    report = _plan_report("--config", "configs/pretrain/demo.yaml", "--gpus", "2",
                          *(f"--set={o}" for o in [*TINY, *AUDIO_PRETRAINING]))
    [line] = [line for line in report if line.startswith("audio ")]
    assert "6 tokens per clip (3 x 2 patches of 16, 34 frames of 0.37 s)" in line
    assert any(line.startswith("input clips ") for line in report)


def test_pretraining_a_modality_the_model_lacks_is_refused_by_the_plan():
    refused(["plan", "--gpus", "1", "--gpu-memory", "80", "--config", "configs/pretrain/demo.yaml",
             *set_options("pretrain.modalities=[audio, text]")],
            "pretrain.modalities names 'audio', which is not one of model.modalities (image, text)")


VIDEO = ["model.modalities=[image, text, video]", "model.video.frames=6", "model.video.tubelet_frames=3"]


@pytest.mark.parametrize("extra, overrides", [("audio", AUDIO), ("video", VIDEO)])
def test_a_modality_text_activation_bytes_agree_with_a_real_cpu_forward(extra, overrides):
    """The audio (or video) stream's bytes per pair, measured on its `dummy_batch`, against what
    autograd saves in a real forward of random clips (uint8 frames normalised, for video) and captions."""
    config = load_config("demo", [*TINY, *overrides])
    profile = measure_activations(config, bf16=False, inputs=(("text", extra),))
    batch = config.model.moe.group_size
    torch.manual_seed(0)
    module = ContrastiveObjective(build_model(config), config).train()
    size = config.model.image_size
    clips = (torch.randn(batch, config.model.audio.clip_samples) if extra == "audio"
             else normalize(torch.randint(0, 256, (batch, 6, 3, size, size), dtype=torch.uint8)))
    tokens = torch.randint(1, 1000, (batch, 16))

    def run():
        features, routing = module.model.encode({extra: clips, "text": tokens})
        return features, auxiliary_loss(routing, config.loss)[0]

    assert profile.per_example[("text", extra)]["none"] * batch == pytest.approx(_saved_bytes(module, run), rel=0.10)


def test_decoding_on_the_device_adds_one_decode_group_of_full_size_images_to_the_transients():
    """The same 64 pairs per GPU, decoded on the device: the decode's transient is the smaller of
    the group budget (512 MiB = 536,870,912 bytes) and 64 images at the largest size the bounds
    allow (64 x 3 x 8192² = 12,884,901,888), beside one more uncropped batch (8,306,688 bytes):
    545,177,600 bytes, larger than the resize's 50,266,112."""
    resize = plan_memory(load_config("demo", [*TINY, "data.resize_on=device"]), 2, 80 * GiB)
    decode = plan_memory(load_config("demo", [*TINY, "data.resize_on=device", "data.decode_on=device"]), 2, 80 * GiB)
    setting = Setting("none", None)
    resized, decoded = resize.breakdown(setting), decode.breakdown(setting)
    assert decoded.inputs == resized.inputs == 16_613_376
    assert decoded.transient == max(resized.transient, 545_177_600)
    report = _plan_report("--config", "demo", *(f"--set={o}" for o in TINY), "--set", "data.resize_on=device",
                          "--set", "data.decode_on=device")
    assert any(line.startswith("transient ") and "device decode and resize" in line for line in report)
