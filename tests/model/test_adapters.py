"""Modality adapters (PolyViT's L_adapt): the first blocks come as one copy per modality."""

import pytest
import torch

from limoe.config import load_model_config
from limoe.errors import LimoeError
from limoe.model.info import describe_model
from limoe.model.tower import Block, Limoe, ModalityAdapter, parameter_counts


def _model(adapters: int) -> Limoe:
    torch.manual_seed(0)
    return Limoe(load_model_config("limoe-tiny", [f"modality_adapter_layers={adapters}"]))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_one_adapter_layer_adds_exactly_one_block_per_modality():
    shared, adapted = _model(0), _model(1)
    assert isinstance(adapted.blocks[0], ModalityAdapter)
    assert sorted(adapted.blocks[0]) == ["image", "text"]
    assert all(isinstance(block, Block) for block in adapted.blocks[0].values())
    assert all(isinstance(block, Block) for block in adapted.blocks[1:])
    assert len(adapted.blocks) == len(shared.blocks) == 4  # the depth a token goes through is unchanged
    one_block = _count(shared.blocks[0])
    assert _count(adapted) == _count(shared) + one_block  # block 0 now has a copy for each of 2 modalities
    assert parameter_counts(adapted)[1] == parameter_counts(shared)[1]  # each token uses one copy
    assert len(adapted.moe_blocks) == len(shared.moe_blocks) == 2


def test_perturbing_the_text_adapter_leaves_encode_image_bit_identical():
    model = _model(1).eval()
    images, tokens = torch.randn(3, 3, 64, 64), torch.randint(1, 1000, (3, 16))
    with torch.no_grad():
        image_before, text_before = model.encode_image(images), model.encode_text(tokens)
        for parameter in model.blocks[0]["text"].parameters():
            parameter.add_(torch.randn_like(parameter))
        assert torch.equal(model.encode_image(images), image_before)
        assert not torch.allclose(model.encode_text(tokens), text_before)


def test_every_adapter_parameter_gets_a_gradient_from_a_pair_batch():
    model = _model(1)
    output = model(torch.randn(2, 3, 64, 64), torch.randint(1, 1000, (2, 16)))
    (output.image_features.sum() + output.text_features.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks[0].parameters())


def test_an_adapter_on_a_moe_block_is_a_one_line_error():
    with pytest.raises(LimoeError, match="adapter block may not be a MoE block") as error:
        load_model_config("limoe-tiny", ["modality_adapter_layers=2"])  # MoE blocks are 1 and 3
    assert "\n" not in str(error.value)
    with pytest.raises(LimoeError, match="between 0 and the depth"):
        load_model_config("limoe-tiny", ["modality_adapter_layers=5", "moe.layers=[]"])


def test_limoe_info_lists_the_adapters():
    text = describe_model(load_model_config("limoe-tiny", ["modality_adapter_layers=1"]))
    assert "adapter blocks   the first 1, one copy per modality" in text
    assert "adapter" not in describe_model(load_model_config("limoe-tiny"))
