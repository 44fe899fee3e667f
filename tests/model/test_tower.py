"""The tower: every config builds and trains a step; parameter arithmetic; batch independence."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from limoe.config import Config, load_config, load_model_config
from limoe.distributed import ExpertSharding
from limoe.model.layers import Attention, Segment
from limoe.modalities.tokens import Tokens
from limoe.model.tower import Block, Limoe, TokenLayout, build_model, parameter_counts
from limoe.training.losses import ContrastiveLoss, auxiliary_loss

MODELS = ["limoe-tiny", "limoe-s32", "limoe-b32", "limoe-b16", "limoe-l16", "limoe-h14"]
# The large ones keep their width, experts and resolution but shrink to two blocks here.
SHRINK = {name: ["depth=2", "moe.layers=[1]"] for name in MODELS[1:]}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_h14_has_5_6B_parameters_and_675M_applied_per_token():
    with torch.device("meta"):
        total, per_token = parameter_counts(Limoe(load_model_config("limoe-h14")))
    assert total == pytest.approx(5.6e9, rel=0.03)
    assert per_token == pytest.approx(675e6, rel=0.03)


@pytest.mark.parametrize("name, vit", [("limoe-b16", "vit_b_16"), ("limoe-b32", "vit_b_32"), ("limoe-l16", "vit_l_16")])
def test_dense_twin_tower_matches_torchvision_vit(name, vit):
    with torch.device("meta"):
        model = Limoe(load_model_config(name, ["dense=true"]))
        reference = getattr(torchvision.models, vit)()
    tower = _count(model.blocks) + _count(model.embedders["image"]) + model.image_positions.numel() + _count(model.norm)
    reference_tower = _count(reference) - _count(reference.heads)
    assert tower == pytest.approx(reference_tower, rel=1e-3)


@pytest.mark.parametrize("name", [*MODELS[:3], *(pytest.param(name, marks=pytest.mark.slow) for name in MODELS[3:])])
@pytest.mark.parametrize("dense", [False, True])
def test_every_config_runs_forward_and_backward(name, dense):
    torch.manual_seed(0)
    config = load_model_config(name, SHRINK.get(name, []) + [f"dense={str(dense).lower()}"])
    model = Limoe(config)
    images = torch.randn(2, 3, config.image_size, config.image_size)
    tokens = torch.randint(1, config.vocab_size, (2, config.context_length))
    tokens[1, 5:] = 0
    output = model(images, tokens)
    assert output.image_features.shape == output.text_features.shape == (2, config.embed_dim)
    torch.testing.assert_close(output.image_features.norm(dim=-1), torch.ones(2))
    assert len(output.routing) == (0 if dense else len(config.moe.layers))
    aux, _ = auxiliary_loss(output.routing, Config().loss)
    loss = ContrastiveLoss("clip")(output.image_features, output.text_features, output.logit_scale) + aux
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
def test_forward_returns_the_temperature_and_the_losses_use_it_as_open_clip_does(contrastive):
    """`output.logit_scale` is exp(model.logit_scale), as open_clip's models return it; SigLIP's bias
    is the model's. Both losses are checked against their formulas written out here."""
    torch.manual_seed(0)
    config = load_config("demo", [f"loss.contrastive={contrastive}", "loss.logit_scale_init=1.5",
                                  "loss.logit_bias_init=-3.0"])
    model = build_model(config).eval()
    output = model(torch.randn(3, 3, 64, 64), torch.randint(1, 1000, (3, 16)))
    assert output.logit_scale.item() == pytest.approx(math.exp(1.5))
    logits = math.exp(1.5) * output.image_features @ output.text_features.T  # [B, B]
    if contrastive == "clip":
        assert output.logit_bias is None
        labels = torch.arange(3)
        expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    else:
        assert output.logit_bias.item() == -3.0 and "logit_bias" in dict(model.named_parameters())
        signs = 2 * torch.eye(3) - 1  # +1 on the matching pairs, −1 elsewhere
        expected = -F.logsigmoid(signs * (logits - 3.0)).sum() / 3
    loss = ContrastiveLoss(contrastive)(output.image_features, output.text_features, output.logit_scale,
                                        output.logit_bias)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("pool", [("map", "map"), ("cls", "cls"), ("mean", "mean"), ("map", "eos")])
def test_dropless_encodings_do_not_depend_on_the_rest_of_the_batch(pool):
    torch.manual_seed(0)
    config = load_model_config("limoe-tiny", ["moe.eval_capacity_factor=null", f"image_pool={pool[0]}",
                                              f"text_pool={pool[1]}"])
    model = Limoe(config).eval()
    images = torch.randn(11, 3, 64, 64)
    tokens = torch.randint(1, 1000, (11, 16))
    tokens[:, 9:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images[3:4]), model.encode_image(images)[3:4], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(tokens[5:6]), model.encode_text(tokens)[5:6], atol=1e-5, rtol=1e-4)


def test_text_padding_changes_nothing_beyond_the_end_of_text():
    torch.manual_seed(0)
    model = Limoe(load_model_config("limoe-tiny", ["moe.eval_capacity_factor=null"])).eval()
    tokens = torch.randint(1, 1000, (1, 16))
    tokens[:, 6:] = 0
    short = tokens.clone()
    with torch.no_grad():
        a = model.encode_text(tokens)
        model.text_positions.data[6:] += 1.0  # positions past the padding start must not matter
        torch.testing.assert_close(model.encode_text(short), a)


def test_bf16_autocast_step_tracks_fp32_with_fp32_routing_and_gradients():
    """The GPU training precision, run on CPU: bf16 autocast around fp32 weights, as `limoe train` does.

    The router must still decide in fp32, every gradient must be a finite fp32 tensor, and the
    features must stay close to the fp32 forward of the same weights.
    """
    torch.manual_seed(0)
    model = Limoe(load_model_config("limoe-tiny", ["moe.eval_capacity_factor=null"])).eval()  # no noise, no drops
    images = torch.randn(5, 3, 64, 64)
    tokens = torch.randint(1, 1000, (5, 16))
    tokens[:, 11:] = 0
    reference = model(images, tokens)
    with torch.autocast("cpu", torch.bfloat16):
        output = model(images, tokens)
        loss = ContrastiveLoss("clip")(output.image_features, output.text_features, output.logit_scale)
        loss = loss + auxiliary_loss(output.routing, Config().loss)[0]
    loss.backward()
    assert all(r.importance.dtype == torch.float32 for r in output.routing)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name
    for ours, fp32 in [(output.image_features, reference.image_features), (output.text_features, reference.text_features)]:
        cosine = (ours.float() * fp32).sum(-1)
        assert cosine.min() > 0.98


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_the_whole_model_compiles_as_one_graph(backend):
    """torch.compile(fullgraph=True) traces the tower, routing and both op sets without a graph
    break (the Triton ops through their fake kernels), and computes what eager mode computes."""
    torch.manual_seed(0)
    model = Limoe(load_model_config("limoe-tiny", [f"moe.backend={backend}"]))
    images, tokens = torch.randn(3, 3, 64, 64), torch.randint(1, 1000, (3, 16))
    torch.manual_seed(1)
    eager = model(images, tokens)
    torch.manual_seed(1)  # the same router noise
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(images, tokens)
    torch.testing.assert_close(compiled.image_features, eager.image_features)
    torch.testing.assert_close(compiled.text_features, eager.text_features)
    torch.testing.assert_close(compiled.routing[0].load, eager.routing[0].load)


def test_attention_over_segments_equals_attention_per_modality_with_gradients():
    """One residual tensor, two segments: each segment attends only to itself, exactly as if the
    modalities ran separately, values and every gradient (the joined d(qkv) included)."""
    torch.manual_seed(0)
    attention = Attention(16, 4)
    image, text = torch.randn(3, 7, 16), torch.randn(3, 5, 16)
    key_mask = torch.ones(3, 5, dtype=torch.bool)
    key_mask[1, 3:] = False
    upstream = torch.randn(3, 12, 16)

    joint = torch.cat([image, text], dim=1).requires_grad_()
    y = attention(joint, (Segment(0, 7), Segment(7, 5, key_mask)))
    grads = torch.autograd.grad(y, [joint, *attention.parameters()], upstream)

    parts = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    y_ref = torch.cat([attention(parts[0]), attention(parts[1], (Segment(0, 5, key_mask),))], dim=1)
    grads_ref = torch.autograd.grad(y_ref, [*parts, *attention.parameters()], upstream)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grads[0], torch.cat(grads_ref[:2], dim=1))
    for grad, grad_ref in zip(grads[1:], grads_ref[2:]):
        torch.testing.assert_close(grad, grad_ref)


def test_joint_forward_encodes_each_modality_as_encode_image_and_encode_text_do():
    """Attention never crosses modalities and, dropless in eval, routing is per token: the joint
    forward's features equal the single-modality encoders'."""
    torch.manual_seed(0)
    model = Limoe(load_model_config("limoe-tiny", ["moe.eval_capacity_factor=null"])).eval()
    images, tokens = torch.randn(3, 3, 64, 64), torch.randint(1, 1000, (3, 16))
    tokens[:, 10:] = 0
    with torch.no_grad():
        output = model(images, tokens)
        torch.testing.assert_close(output.image_features, model.encode_image(images), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(output.text_features, model.encode_text(tokens), atol=1e-5, rtol=1e-4)


def test_block_runs_on_one_residual_tensor():
    torch.manual_seed(0)
    config = load_model_config("limoe-tiny")
    block = Block(config, True, ExpertSharding())
    streams = [Tokens(torch.randn(2, 5, config.width), torch.full((2, 5), config.modality_id("image")), None, "image"),
               Tokens(torch.randn(2, 3, config.width), torch.full((2, 3), config.modality_id("text")), None, "text")]
    layout = TokenLayout.of(streams)
    assert [(s.start, s.length) for s in layout.segments] == [(0, 5), (5, 3)] and layout.modality.shape == (2, 8)
    y, routing = block(torch.cat([s.x for s in streams], dim=1), layout)
    assert y.shape == (2, 8, config.width) and routing.expert.shape == (2, 8)
