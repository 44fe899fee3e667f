"""One training step on one process: micro-batches and activation checkpointing give the whole
batch's gradient, the compiled step the eager one, the DeepSpeed config merges, and a step does
not wait on the device. (Two processes with expert parallelism: test_expert_parallel.py.)"""

import json
import os
import sys

import deepspeed
import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

import limoe
import limoe_kernels
from limoe.config import load_config
from limoe.errors import LimoeError
from limoe.model.tower import build_model
from limoe.training.deepspeed_config import deepspeed_config
from limoe.training.flip import PatchDropping
from limoe.training.losses import auxiliary_loss, whole_batch_counts
from limoe.training.objectives import ContrastiveObjective
from limoe.training.session import start_session
from limoe.training.step import forward_backward, train_step
from limoe.training.trainer import build_engine
from tests.helpers import refused, run_args

BATCH = 16
BASE = [f"train.batch_size={BATCH}", "train.device=cpu", "model.moe.group_size=4", "optim.warmup_steps=1"]


def _batch(config):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH, 3, config.model.image_size, config.model.image_size), generator=generator,
                           dtype=torch.uint8)
    tokens = torch.randint(1, 1000, (BATCH, config.model.context_length), generator=generator)
    tokens[:, 9:] = 0
    return images, tokens


NOISE_OFF = ["model.moe.router_noise=false"]


@pytest.fixture(scope="module")
def quiet_engine():
    """An engine whose routers add no noise, so that the whole batch and its micro-batches route alike."""
    config = load_config("demo", BASE + NOISE_OFF)
    return build_engine(config, start_session(config))


@pytest.fixture(scope="module")
def noisy_engine():
    config = load_config("demo", BASE)
    return build_engine(config, start_session(config))


def _gradients(engine, overrides: list[str], seed: int = 7) -> tuple[dict, dict]:
    """This process's gradient of the fixed batch with `overrides` (micro-batching, checkpointing) on
    `engine`, whose weights no test changes; the router noise drawn from `seed`. The engine is a
    shared fixture: its checkpointed blocks are set back afterwards."""
    config = load_config("demo", BASE + overrides)
    model = engine.module.model
    checkpointed = model.checkpointed_blocks
    model.set_activation_checkpointing(config.train.activation_checkpointing)
    try:
        engine.zero_grad()
        torch.manual_seed(seed)
        terms, _, _ = forward_backward(engine, *_batch(config), config)
    finally:
        model.checkpointed_blocks = checkpointed
    return {name: p.grad.clone() for name, p in engine.module.named_parameters()}, terms


def _assert_same(gradients: dict, reference: dict, tolerance: float = 1e-5) -> None:
    """Per parameter, every element within `tolerance` × the parameter's largest gradient element
    (fp32: what summing in another order changes)."""
    assert gradients.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(gradients[name], grad, rtol=0, atol=tolerance * grad.abs().max().item(), msg=name)


def test_micro_batches_of_a_quarter_give_the_whole_batch_gradient(quiet_engine):
    """fp32; the loss terms and every parameter's gradient."""
    whole, whole_terms = _gradients(quiet_engine, NOISE_OFF)
    micro, micro_terms = _gradients(quiet_engine, NOISE_OFF + ["train.micro_batch_size=4"])
    _assert_same(micro, whole)
    for name, value in whole_terms.items():
        torch.testing.assert_close(micro_terms[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_flip_micro_batches_give_the_whole_batch_gradient_of_the_same_masks(quiet_engine):
    """FLIP draws the kept patches once per step for the whole batch; each micro-batch encodes its
    own rows of them in both passes, so the gradient is the whole masked batch's."""
    flip = ["train.steps=10", "train.image_mask_ratio=0.5"]
    unmasked, _ = _gradients(quiet_engine, NOISE_OFF)
    unmasking = quiet_engine.module.patch_dropping
    quiet_engine.module.patch_dropping = {**unmasking, "image": PatchDropping.from_config(load_config("demo", BASE + flip))}
    try:
        whole, whole_terms = _gradients(quiet_engine, NOISE_OFF + flip)
        micro, micro_terms = _gradients(quiet_engine, NOISE_OFF + flip + ["train.micro_batch_size=4"])
    finally:
        quiet_engine.module.patch_dropping = unmasking
    _assert_same(micro, whole)
    torch.testing.assert_close(micro_terms["loss"], whole_terms["loss"], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(whole["model.image_positions"], unmasked["model.image_positions"])  # masking acted


def test_the_gradient_pass_replays_the_router_noise_of_the_encoding_pass(noisy_engine):
    """With router noise, the feature-cache gradient equals back-propagating through all micro-batches
    kept alive at once (drawn from the same RNG state, in the same order): the reference keeps every
    graph, the step recomputes each micro-batch and must see the same noise to get the same features."""
    config = load_config("demo", BASE + ["train.micro_batch_size=4"])
    micro, _ = _gradients(noisy_engine, ["train.micro_batch_size=4"], seed=7)
    torch.manual_seed(config.train.seed)  # build_engine's weights
    reference = ContrastiveObjective(build_model(config), config)
    images, tokens = _batch(config)
    torch.manual_seed(7)
    outputs = [reference.features({"image": i, "text": t}) for i, t in zip(images.split(4), tokens.split(4))]
    whole = whole_batch_counts([routing for _, routing in outputs])
    loss = reference.contrastive_loss(torch.cat([features["image"] for features, _ in outputs]),
                                      torch.cat([features["text"] for features, _ in outputs]))
    loss = loss + sum(auxiliary_loss(routing, config.loss, whole_batch=whole)[0] for _, routing in outputs)
    loss.backward()
    _assert_same(micro, {name: p.grad for name, p in reference.named_parameters()})


def test_activation_checkpointing_gives_identical_gradients_with_router_noise(noisy_engine):
    """torch.utils.checkpoint restores the RNG state for the recompute: the same noise, routing and
    gradient, bit for bit."""
    plain, _ = _gradients(noisy_engine, [])
    for checkpointing in ("moe", "all"):
        checkpointed, _ = _gradients(noisy_engine, [f"train.activation_checkpointing={checkpointing}"])
        _assert_same(checkpointed, plain, tolerance=0)


@pytest.mark.slow
def test_compiled_step_matches_the_eager_step():
    """One step with the tower under torch.compile (aot_eager on CPU: the traced forward and backward
    graphs run op by op; Inductor's code generation is GPU territory) against the eager step: loss and
    parameters after the step agree to 1e-5 (relative)."""
    results = {}
    for compiled in (False, True):
        config = load_config("demo", BASE + [f"train.compile={str(compiled).lower()}"])
        engine = build_engine(config, start_session(config), compile_backend="aot_eager")
        torch.manual_seed(7)
        terms, _, _ = train_step(engine, *_batch(config), config)
        results[compiled] = terms["loss"], {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    _assert_same(results[True][1], results[False][1])


class HostReads(TorchFunctionMode):
    """Counts the reads of a tensor's value by the host (`.item()`, `bool()`, `.tolist()`, …, and
    `nonzero`) made by limoe's or DeepSpeed's code: on a GPU each waits for the device. The CPU
    stand-in for torch.cuda.set_sync_debug_mode. Reads inside torch itself are left out: AdamW's
    step counters, for one, are host tensors on a GPU too."""

    READS = {Tensor.item, Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.tolist, Tensor.numpy,
             Tensor.nonzero, torch.nonzero}

    # The installed folders of the code being watched, found from the modules themselves: a test
    # must not depend on what the checkout is called (a clone named `limoe` holds torch's files too,
    # in its .venv, under a path containing "/limoe/").
    WATCHED = tuple(os.path.dirname(os.path.realpath(module.__file__)) + os.sep
                    for module in (limoe, limoe_kernels, deepspeed))

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = os.path.realpath(sys._getframe(1).f_code.co_filename)
        if func in self.READS and caller.startswith(self.WATCHED):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_back_from_the_device():
    """Neither the whole batch nor micro-batches with checkpointing read anything back; the
    skip_nonfinite_steps mode reads once (the loss, checked on every rank before the update)."""
    config = load_config("demo", BASE)
    engine = build_engine(config, start_session(config))
    images, tokens = _batch(config)
    train_step(engine, images, tokens, config)  # the first step builds the optimizer state
    for overrides, reads in ([], 0), (["train.micro_batch_size=4", "train.activation_checkpointing=moe"], 0), \
                            (["train.skip_nonfinite_steps=true"], 1):
        variant = load_config("demo", BASE + overrides)
        engine.module.model.set_activation_checkpointing(variant.train.activation_checkpointing)
        with HostReads() as counter:
            train_step(engine, images, tokens, variant)
        assert counter.count == reads, overrides


def test_the_deepspeed_config_merges_a_file_and_keeps_limoe_keys(tmp_path):
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "wall_clock_breakdown": True,
                                 "train_batch_size": 16, "gradient_clipping": 1.0}))
    config = load_config("demo", BASE + ["distributed.zero_stage=2", f"distributed.deepspeed_config={extra}"])
    merged = deepspeed_config(config, 1, bf16=False)
    assert merged["zero_optimization"] == {**merged["zero_optimization"], "stage": 2, "reduce_bucket_size": 1000}
    assert merged["wall_clock_breakdown"] is True  # not limoe's: the user's value wins
    assert merged["gradient_clipping"] == 1.0 and merged["train_batch_size"] == 16  # equal to limoe's: accepted
    default = deepspeed_config(load_config("demo", BASE), 1, bf16=False)
    assert default["timers"]["throughput"]["enabled"] is False and default["wall_clock_breakdown"] is False
    assert default["gradient_clipping"] == 0.0  # without ZeRO limoe clips by the true global norm itself
    with pytest.raises(LimoeError, match="'gradient_clipping' to 2.0, but 'optim.grad_clip' makes it 1.0"):
        deepspeed_config(load_config("demo", BASE + ["distributed.deepspeed_config={gradient_clipping: 2.0}"]), 1, False)
    with pytest.raises(LimoeError, match="does not exist"):
        deepspeed_config(load_config("demo", BASE + [f"distributed.deepspeed_config={tmp_path / 'no.json'}"]), 1, False)


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch_size=5", "train.micro_batch_size 5 does not divide the 16 pairs per GPU"),
    ("train.micro_batch_size=2", "multiple of model.moe.group_size 4"),
    ("distributed.deepspeed_config={zero_optimization: {stage: 2}}", "'zero_optimization.stage' to 2"),
    ("distributed.zero_stage=3", "zero_stage 3 partitions parameters"),
])
def test_bad_training_settings_are_one_line_and_exit_2(tmp_path, override, message):
    refused(run_args("train", tmp_path / "run", "data.workers=0", *BASE, override), message)
