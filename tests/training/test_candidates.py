"""Classification as candidate targets (Uni-Perceiver): the loss by hand, its gradient, and its
agreement with `limoe eval zeroshot`'s logits."""

import math

import pytest
import torch

from limoe.config import load_config
from limoe.data.pipeline import eval_loader, read_classnames
from limoe.prompt_templates import load_templates
from limoe.evaluate.zeroshot import encode_labelled_images, zeroshot_classifier
from limoe.model.tower import PAD_TOKEN, Limoe
from limoe.training import candidates
from limoe.training.candidates import LOGIT_SCALE_INIT, class_embeddings, encode_prompts, prompt_tokens
from limoe.training.objectives import CoTrainingObjective

CLASSES = ["zodiac", "household", "arrow"]
TEMPLATES = ["a photo of {}.", "{} emoji", "an icon of the {}"]
# No drops while training (capacity = group size, E=4) and no router noise: every token's output is
# its own, so prompts encoded one by one equal prompts encoded together.
DROPLESS = ["model.moe.train_capacity_factor=4.0", "model.moe.router_noise=false",
            "model.moe.eval_capacity_factor=null"]


@pytest.fixture(scope="module")
def trainer() -> CoTrainingObjective:
    torch.manual_seed(0)
    config = load_config("demo", DROPLESS)
    return CoTrainingObjective(Limoe(config.model), config)


def test_the_temperature_starts_at_one_over_0_07():
    assert math.exp(LOGIT_SCALE_INIT) == pytest.approx(1 / 0.07)


def test_the_loss_is_a_cross_entropy_worked_by_hand(trainer):
    model = trainer.model
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([2, 0])
    tokens = prompt_tokens(CLASSES, TEMPLATES, 16)  # [3·3, 16], class-major
    loss, terms, calls = trainer(images, labels, prompts=tokens, templates=len(TEMPLATES))

    scale = math.exp(LOGIT_SCALE_INIT)
    with torch.no_grad():
        image = [model(images[b : b + 1], None).image_features[0] for b in range(2)]
        expected = 0.0
        for b, label in enumerate(labels.tolist()):
            logits = []
            for c, name in enumerate(CLASSES):
                prompts = [model(None, prompt_tokens([name], [t], 16)).text_features[0] for t in TEMPLATES]
                mean = sum(prompts) / len(prompts)
                logits.append(scale * float(image[b] @ (mean / mean.norm())))
            expected += (-logits[label] + math.log(sum(math.exp(v) for v in logits))) / 2
    assert terms["classification"].item() == pytest.approx(expected, rel=1e-4)
    assert len(calls) == 2 and all(len(routing) == 2 for routing in calls)  # images, prompts; 2 MoE blocks each
    torch.testing.assert_close(loss, terms["classification"] + terms["auxiliary"])


def test_the_gradient_reaches_the_token_embedding_and_the_temperature(trainer):
    trainer.zero_grad()
    tokens = prompt_tokens(CLASSES, TEMPLATES, 16)
    loss, _, _ = trainer(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 1]), prompts=tokens, templates=3)
    loss.backward()
    embedding = trainer.model.embedders["text"].token_embed.weight.grad  # [V, d]
    used = tokens[tokens != PAD_TOKEN].unique()
    assert embedding[used].abs().sum(dim=1).min() > 0  # every token of every prompt is trained (padding is masked)
    unused = torch.ones(len(embedding), dtype=torch.bool)
    unused[used] = False
    assert embedding[unused].abs().sum() == 0
    assert trainer.classification.logit_scale.grad.abs() > 0
    assert trainer.model.logit_scale.grad is None  # the pairs' temperature is not the classification one


def test_the_logits_are_those_of_limoe_eval_zeroshot(trainer):
    """On a batch of train_cls, in eval mode: exp(scale)·cos to the candidates = zero-shot's logits."""
    model = trainer.model.eval()
    try:
        names = read_classnames("data_shards/train_cls")[:5]
        templates = load_templates("simple")
        batch = next(iter(eval_loader("data_shards/train_cls", 6, 64, 16, workers=0, classification=True)))
        features, _ = encode_labelled_images(model, [batch])  # what `limoe eval zeroshot` does
        expected = features @ zeroshot_classifier(model, names, templates)  # [6, 5]
        with torch.no_grad():
            prompts, _ = encode_prompts(model, prompt_tokens(names, templates, 16))
            ours = trainer.classification.logits(model.encode_image(batch.images), class_embeddings(prompts, 7))
        torch.testing.assert_close(ours / trainer.classification.logit_scale.exp(), expected, atol=1e-5, rtol=1e-5)
    finally:
        model.train()


def test_a_candidate_subset_scores_its_classes_as_the_whole_set_does(trainer):
    """`candidates: N` sees the same logits for its classes as `all` (classes are encoded apart)."""
    images, labels = torch.randn(3, 3, 64, 64), torch.tensor([4, 1, 4])
    names = [f"class {i}" for i in range(7)]
    tokens = prompt_tokens(names, TEMPLATES, 16)
    classes = candidates.candidate_subset(labels, len(names), 4, torch.Generator().manual_seed(0))
    assert len(classes) == 4 and set(labels.tolist()) <= set(classes.tolist())
    with torch.no_grad():
        image = trainer.model(images, None).image_features
        everything = class_embeddings(encode_prompts(trainer.model, tokens)[0], 3)  # [7, D]
        rows = candidates.prompt_rows(classes, 3)
        subset = class_embeddings(encode_prompts(trainer.model, tokens[rows])[0], 3)  # [4, D]
    torch.testing.assert_close(trainer.classification.logits(image, subset),
                               trainer.classification.logits(image, everything)[:, classes], atol=1e-5, rtol=1e-5)
    assert torch.equal(classes[candidates.positions(classes, labels)], labels)


def test_candidate_subsets_are_fixed_size_contain_the_labels_and_follow_the_generator():
    labels = torch.tensor([3, 3, 9, 0])
    draws = [candidates.candidate_subset(labels, 20, 6, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert all(len(d) == 6 and {0, 3, 9} <= set(d.tolist()) and len(set(d.tolist())) == 6 for d in draws)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    many = torch.arange(8)  # more classes in the batch than N: all of them, nothing else
    assert candidates.candidate_subset(many, 20, 6, torch.Generator()).tolist() == list(range(8))
    assert candidates.prompt_rows(torch.tensor([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]
