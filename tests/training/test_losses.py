"""Auxiliary losses against values worked by hand or by an independent formula."""

import math

import pytest
import torch

from limoe_kernels.router import route_logits_reference
from limoe.config import Config, LossConfig, ModelConfig, PerModality
from limoe.model.aux_losses import (
    importance_loss,
    load_loss,
    masked_group_mean,
    modality_entropies,
    router_z_loss,
    thresholded_global_entropy,
)
from limoe.training.losses import auxiliary_loss

IMAGE, TEXT = 0, 1  # an image-text model's modality ids


def test_importance_is_squared_cv_of_summed_probabilities():
    # One group; image tokens p = [0.7, 0.3] and text [0.4, 0.6]: Imp = [1.1, 0.9], mean 1, variance 0.01.
    prob_sum = torch.tensor([[[0.7, 0.3], [0.4, 0.6]]])
    assert importance_loss(prob_sum).item() == pytest.approx(0.01)


def test_load_matches_the_gaussian_formula_token_by_token():
    """The router's load sums, turned into the loss, equal V-MoE's formula written out per token."""
    torch.manual_seed(0)
    logits = torch.randn(10, 3)
    noise = torch.randn(10, 3) / 3
    sigma = 1 / 3
    noisy = logits + noise
    expected = []
    for g in range(2):
        load = [0.0, 0.0, 0.0]
        for s in range(5):
            top = max(noisy[5 * g + s].tolist())
            for e in range(3):
                z = (top - logits[5 * g + s, e].item()) / sigma
                load[e] += (1 - 0.5 * (1 + math.erf(z / math.sqrt(2)))) / 5
        mean = sum(load) / 3
        expected.append(sum((v - mean) ** 2 for v in load) / 3 / mean**2)
    modality = torch.tensor([IMAGE, TEXT] * 5)
    router = route_logits_reference(logits, noise, modality, group_size=5, num_modalities=2, noise_std=sigma)
    counts = torch.tensor([[3.0, 2.0], [2.0, 3.0]])
    assert load_loss(router.load_sum, counts).item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_z_loss_is_the_token_mean_of_squared_logsumexp():
    z_sum = torch.tensor([[2.0, 1.0], [3.0, 0.0]])
    counts = torch.tensor([[2.0, 1.0], [3.0, 0.0]])
    assert router_z_loss(z_sum, counts).item() == pytest.approx(1.0)


def test_entropies_are_normalized_per_modality_and_skip_absent_ones():
    # Image tokens p = [1, 0] and [0.5, 0.5]: H = 0 and log 2; their mean p = [0.75, 0.25]. One text token [0, 1].
    prob_sum = torch.tensor([[[1.5, 0.5], [0.0, 1.0]]])
    entropy_sum = torch.tensor([[math.log(2), 0.0]])
    token_entropy, marginal, present = modality_entropies(prob_sum, entropy_sum, torch.tensor([[2.0, 1.0]]))
    h_mean = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(token_entropy, torch.tensor([[math.log(2) / 2, 0.0]]))
    torch.testing.assert_close(marginal, torch.tensor([[h_mean, 0.0]]))
    assert present.tolist() == [[True, True]]
    _, _, present = modality_entropies(prob_sum, entropy_sum, torch.tensor([[2.0, 0.0]]))
    assert present.tolist() == [[True, False]]
    assert masked_group_mean(torch.tensor([[1.0, 5.0], [3.0, 7.0]]), torch.tensor([[True, False], [True, False]])).tolist() == [2.0, 0.0]


def test_global_entropy_threshold_switches_off_at_log_S():
    marginal = torch.tensor([[math.log(2.0), math.log(4.0)]])
    present = torch.tensor([[True, True]])
    loss = thresholded_global_entropy(marginal, present, [3.0, 3.0])
    torch.testing.assert_close(loss, torch.tensor([math.log(3.0) - math.log(2.0), 0.0]))


def test_auxiliary_loss_weights_and_sums_over_layers():
    from limoe.model.routing import LayerRouting

    def layer(value: float) -> LayerRouting:
        zeros = torch.zeros(2, 2)
        return LayerRouting(
            importance=torch.tensor(value), load=torch.tensor(2 * value), z=torch.tensor(0.0),
            token_entropy=torch.full((1, 2), value), marginal_entropy=torch.zeros(1, 2),
            present=torch.tensor([[True, True]]), routed=zeros, kept=zeros, prob_sum=zeros,
            entropy_sum=torch.zeros(2), expert=torch.zeros(1, 1), kept_mask=torch.zeros(1, 1), capacity=4, num_groups=1,
        )

    config = LossConfig(importance=1.0, load=10.0, local_entropy=PerModality(image=1.0, text=0.0),
                        global_entropy=PerModality(image=0.0, text=2.0),
                        global_entropy_min_experts=PerModality(image=8.0, text=3.0))
    total, parts = auxiliary_loss([layer(1.0), layer(2.0)], config)
    assert parts["importance"].item() == pytest.approx(3.0)
    assert parts["load"].item() == pytest.approx(60.0)
    assert parts["local_entropy_image"].item() == pytest.approx(3.0)
    assert parts["local_entropy_text"].item() == 0.0
    assert parts["global_entropy_text"].item() == pytest.approx(2 * 2 * math.log(3.0))
    assert total.item() == pytest.approx(3 + 60 + 3 + 4 * math.log(3.0))


def test_entropy_losses_of_three_modalities_leave_out_the_one_absent_from_the_batch():
    """An image-text-audio model on a batch without text: two groups, image in both, audio in the
    first only. The text weights and threshold are set high: were text's empty columns averaged,
    its global loss would be 7 · log 3."""
    from limoe.model.routing import LayerRouting

    config = Config(model=ModelConfig(modalities=("image", "text", "audio")),
                    loss=LossConfig(importance=0.0, load=0.0, local_entropy=PerModality(image=1.0, text=5.0, audio=2.0),
                                    global_entropy=PerModality(text=7.0, audio=3.0),
                                    global_entropy_min_experts=PerModality(text=3.0, audio=4.0))).loss
    assert dict(config.global_entropy) == {"image": 0.01, "text": 7.0, "audio": 3.0}  # image's: the default
    zeros = torch.zeros(3, 4)
    layer = LayerRouting(
        importance=torch.tensor(0.0), load=torch.tensor(0.0), z=torch.tensor(0.0),
        token_entropy=torch.tensor([[0.2, 0.0, 0.6], [0.4, 0.0, 0.0]]),  # [G, M]: image, text, audio
        marginal_entropy=torch.tensor([[math.log(2.0), 0.0, math.log(2.0)], [math.log(16.0), 0.0, 0.0]]),
        present=torch.tensor([[True, False, True], [True, False, False]]), routed=zeros, kept=zeros, prob_sum=zeros,
        entropy_sum=torch.zeros(3), expert=torch.zeros(2, 1), kept_mask=torch.zeros(2, 1), capacity=4, num_groups=2,
    )
    total, parts = auxiliary_loss([layer], config)
    assert parts["local_entropy_image"].item() == pytest.approx(1.0 * (0.2 + 0.4) / 2)
    assert parts["local_entropy_text"].item() == 0.0 and parts["global_entropy_text"].item() == 0.0
    assert parts["local_entropy_audio"].item() == pytest.approx(2.0 * 0.6)  # the first group's only
    # image: S = 8 (default): log 8 − log 2 in the first group, log 16 ≥ log 8 in the second → mean log 2
    assert parts["global_entropy_image"].item() == pytest.approx(0.01 * math.log(2.0))
    assert parts["global_entropy_audio"].item() == pytest.approx(3.0 * (math.log(4.0) - math.log(2.0)))
    assert total.item() == pytest.approx(0.3 + 1.2 + 0.01 * math.log(2.0) + 3.0 * math.log(2.0))


def test_a_loss_config_not_matching_the_routing_s_modalities_is_named():
    from limoe.model.routing import LayerRouting

    zeros = torch.zeros(3, 2)
    layer = LayerRouting(
        importance=torch.tensor(0.0), load=torch.tensor(0.0), z=torch.tensor(0.0), token_entropy=torch.zeros(1, 3),
        marginal_entropy=torch.zeros(1, 3), present=torch.ones(1, 3, dtype=torch.bool), routed=zeros, kept=zeros,
        prob_sum=zeros, entropy_sum=torch.zeros(3), expert=torch.zeros(1, 1), kept_mask=torch.zeros(1, 1), capacity=4,
        num_groups=1)
    with pytest.raises(ValueError, match="names 2 modalities"):
        auxiliary_loss([layer], Config().loss)
