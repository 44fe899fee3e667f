"""`model(images, tokens)` as open_clip code uses it: the tuple unpacks, open_clip's own model returns
the same structure, open_clip's losses take it (as a tuple and as a dict) and give the loss written
out here, and limoe's routing records stay on the tuple."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from open_clip.model import CLIP

import limoe
from limoe.model.tower import LimoeOutput


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 1000, (5, 16), generator=generator)
    tokens[:, 11:] = 0
    return torch.randn(5, 3, 64, 64, generator=generator), tokens


def _open_clip_model(output_dict: bool) -> CLIP:
    """A tiny open_clip CLIP: the reference for what the forward returns."""
    vision = dict(layers=1, width=16, head_width=8, patch_size=16, image_size=32)
    text = dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1)
    return CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text, output_dict=output_dict).eval()


def test_the_forward_unpacks_as_open_clips_tuple_and_keeps_the_routing():
    torch.manual_seed(0)
    model = limoe.create_model("limoe-tiny", capacity_factor="dropless")
    images, tokens = _batch()
    with torch.no_grad():
        output = model(images, tokens)
        image_features, text_features, logit_scale = output
        reference = _open_clip_model(False)(torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 8)))
        torch.testing.assert_close(image_features, model.encode_image(images), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(text_features, model.encode_text(tokens), atol=1e-5, rtol=1e-4)
    assert type(reference) is tuple and len(output) == len(reference) == 3
    assert logit_scale.item() == pytest.approx(math.exp(model.logit_scale.item()))
    assert (output.image_features, output.text_features, output.logit_scale, output.logit_bias) == (
        image_features, text_features, logit_scale, None)
    assert len(output.routing) == len(model.config.moe.layers)
    assert output.routing[0].expert.shape[0] == 5
    copied = copy.deepcopy(output)
    assert len(copied) == 3 and torch.equal(copied.routing[0].expert, output.routing[0].expert)


def test_open_clips_clip_loss_takes_the_tuple_and_the_dict():
    torch.manual_seed(0)
    model = limoe.create_model("limoe-tiny", capacity_factor="dropless")
    images, tokens = _batch(1)
    loss = ClipLoss()(*model(images, tokens))
    features = (model.encode_image(images), model.encode_text(tokens))
    logits = model.logit_scale.exp() * features[0] @ features[1].T  # [B, B]
    labels = torch.arange(5)
    torch.testing.assert_close(loss, (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2,
                               atol=1e-5, rtol=1e-4)
    loss.backward()
    assert model.logit_scale.grad is not None

    model.output_dict = True
    output = model(images, tokens)
    assert output.keys() == _open_clip_model(True)(torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 8))).keys()
    torch.testing.assert_close(ClipLoss()(**output, output_dict=True)["contrastive_loss"], loss)


def test_a_siglip_model_adds_its_bias_as_open_clips_siglip_models_do(tmp_path):
    """Four elements (the bias last) in the tuple, a logit_bias key in the dict; open_clip's SigLipLoss
    takes either and gives the sigmoid loss written out here."""
    from limoe.checkpoints import save_model_file
    from limoe.config import load_config
    from limoe.model.tower import build_model

    torch.manual_seed(0)
    config = load_config("demo", ["loss.contrastive=siglip", "loss.logit_bias_init=-3.0"])
    save_model_file(build_model(config), config, tmp_path / "siglip.safetensors")
    model = limoe.create_model(str(tmp_path / "siglip.safetensors"), capacity_factor="dropless", output_dict=True)
    images, tokens = _batch(2)
    with torch.no_grad():
        as_dict = model(images, tokens)
        model.output_dict = False
        output = model(images, tokens)
    assert isinstance(output, LimoeOutput) and len(output) == 4 and output[3] is output.logit_bias
    assert list(as_dict) == ["image_features", "text_features", "logit_scale", "logit_bias"]
    logits = output.logit_scale * output.image_features @ output.text_features.T + output.logit_bias  # [B, B]
    signs = 2 * torch.eye(5) - 1  # +1 on the matching pairs, −1 elsewhere
    expected = -F.logsigmoid(signs * logits).sum() / 5
    torch.testing.assert_close(SigLipLoss()(*output), expected)
    torch.testing.assert_close(SigLipLoss()(**as_dict), expected)
