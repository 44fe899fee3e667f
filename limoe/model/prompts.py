"""Prompt tuning's parts of a model: deep prompt tokens in every attention layer and the
zero-initialised linear term of the classifier (Uni-Perceiver's prompt tuning).

**Deep prompts.** Each block's attention gets P learned tokens that every query may attend to,
as extra keys and values, as in Uni-Perceiver's released code (and P-tuning v2): one set per
block, shared by both modalities like every other block weight. They never pass through the MLP
or the MoE: in deep prompting a block's prompt outputs are replaced by the next block's prompts,
so an MLP would compute outputs nobody reads — and in an MoE block it would also take expert
capacity from real tokens, move them in Batch Priority Routing's order and enter the routing
statistics. The tokens live where attention's qkv projection reads (after the block's norm1;
Uni-Perceiver learns them before norm1, which reaches a subset of the same keys and values) and
start as norm1 of N(0, 1) draws, the scale of real normalised tokens.

**Exact at step 0.** Prompt attention is a separate softmax over the prompt keys, added to the
ordinary attention output through a per-head gate that starts at zero (LLaMA-Adapter's
zero-initialised attention): with the gate at 0 the block computes exactly what it computed
before; one shared softmax over prompts and tokens would change every attention weight from the
first step. Likewise the `LabelHead` adds a zero-initialised linear function of the image (or
audio clip) embedding to the scaled cosine logits, so a model with fresh prompts and head predicts
exactly what zero-shot classification predicts. The head reads the embeddings of the one modality
it was tuned on, which it records.

The parts attach to a built `Limoe` (`add_prompt_tuning`) and are saved with it: the tokens and
gates as `blocks.{i}.attention.prompts.{tokens,gate}`, the head as `label_head.linear.*`, the
label set, templates and modality in the file's metadata (`prompt_tuning_metadata`; files from
before the modality was recorded were tuned on images).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from limoe.errors import LimoeError
from limoe.prompt_templates import class_template

if TYPE_CHECKING:
    from limoe.model.tower import Limoe

LABEL_SET_KEY = "limoe_label_set"  # model-file metadata: the tuned label set, templates and modality, as JSON


class DeepPrompts(nn.Module):
    """One attention layer's learned key/value tokens and their zero-initialised per-head gate."""

    def __init__(self, tokens: Tensor, heads: int):
        super().__init__()
        self.tokens = nn.Parameter(tokens)  # [P, d], in the space the attention's qkv projection reads
        self.gate = nn.Parameter(torch.zeros(heads, device=tokens.device))  # [h]

    def forward(self, q: Tensor, qkv: nn.Linear) -> Tensor:
        """The gated attention of queries q [B, h, N, d/h] over the prompts → [B, h, N, d/h]."""
        batch, heads, _, head_dim = q.shape
        _, k, v = qkv(self.tokens).view(-1, 3, heads, head_dim).permute(1, 2, 0, 3)  # 3×[h, P, d/h]
        y = F.scaled_dot_product_attention(q, k.to(q.dtype).expand(batch, -1, -1, -1),
                                           v.to(q.dtype).expand(batch, -1, -1, -1))  # [B, h, N, d/h]
        return self.gate.to(y.dtype)[:, None, None] * y


class LabelHead(nn.Module):
    """The linear term added to the scaled cosine logits, the label set it was tuned for, and the
    modality whose embeddings it reads."""

    def __init__(self, embed_dim: int, classnames: Sequence[str], templates: Sequence[str], modality: str = "image"):
        super().__init__()
        self.linear = nn.Linear(embed_dim, len(classnames))
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.classnames = tuple(classnames)
        self.templates = tuple(templates)  # `str.format` strings with one {}
        self.modality = modality

    def forward(self, features: Tensor) -> Tensor:
        """Embeddings of `modality` [N, D] → [N, C]."""
        return self.linear(features)


def logit_temperature(model: Limoe) -> Tensor:
    """exp of the learned log-scale: what cosine similarities are multiplied by in the logits."""
    return model.logit_scale.exp()


def classification_logits(model: Limoe, image_features: Tensor, classifier: Tensor) -> Tensor:
    """Logits [N, C] of images [N, D] against class embeddings [D, C]: the scaled cosine, plus the
    linear term of a prompt-tuned model."""
    logits = logit_temperature(model).to(image_features.dtype) * (image_features @ classifier)
    head = label_head(model)
    return logits if head is None else logits + head(image_features)


def label_head(model: Limoe) -> Optional[LabelHead]:
    return getattr(model, "label_head", None)


def add_prompt_tuning(model: Limoe, prompt_tokens: int, classnames: Sequence[str], templates: Sequence[str],
                      generator: Optional[torch.Generator] = None, modality: str = "image") -> None:
    """Attach fresh deep prompts (gates at 0) to every block and a zero `LabelHead` reading
    `modality`'s embeddings: the model still computes exactly what it did. The tokens start as
    norm1 of N(0, 1) draws from `generator`."""
    for block in model.blocks:
        width = block.norm1.normalized_shape[0]
        with torch.no_grad():
            tokens = block.norm1(torch.randn(prompt_tokens, width, generator=generator).to(block.norm1.weight))
        block.attention.prompts = DeepPrompts(tokens, block.attention.heads)
    model.label_head = LabelHead(model.config.embed_dim, classnames, templates, modality).to(model.logit_scale.device)


def prompt_tuning_metadata(model: Limoe) -> dict[str, str]:
    """The model-file metadata that records a tuned model's label set (nothing for other models)."""
    head = label_head(model)
    if head is None:
        return {}
    return {LABEL_SET_KEY: json.dumps({"classnames": list(head.classnames), "templates": list(head.templates),
                                       "modality": head.modality})}


def restore_prompt_tuning(model: Limoe, state: dict[str, Tensor], metadata: dict[str, str], source: str) -> None:
    """Attach empty prompt-tuning parts shaped as in `state` (read from the model file `source`),
    so that it loads strictly; a model file without them leaves the model as it is."""
    for index, block in enumerate(model.blocks):
        tokens = state.get(f"blocks.{index}.attention.prompts.tokens")
        if tokens is not None:
            block.attention.prompts = DeepPrompts(torch.empty_like(tokens), block.attention.heads)
    if "label_head.linear.weight" in state:
        if LABEL_SET_KEY not in metadata:
            raise LimoeError("this model file has a tuned label head but no label set in its metadata; re-run `limoe tune`.")
        classnames, templates, modality = _label_set(metadata[LABEL_SET_KEY], source, model.config.modalities)
        model.label_head = LabelHead(model.config.embed_dim, classnames, templates, modality)


def _label_set(text: str, source: str, modalities: Sequence[str]) -> tuple[list[str], list[str], str]:
    """The class names, templates and modality (one of the model's `modalities`; images when none
    is recorded) written by `prompt_tuning_metadata`; anything else, a template with other fields
    than the class name's included, is one line."""
    try:
        label_set = json.loads(text)
        classnames, templates = label_set["classnames"], label_set["templates"]
        modality = label_set.get("modality", "image")
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
        classnames = templates = modality = None
    inputs = [name for name in modalities if name != "text"]  # what a label head can read
    if modality not in inputs or not all(
            isinstance(names, list) and names and all(isinstance(name, str) for name in names)
            for names in (classnames, templates)):
        raise LimoeError(f"this model file's {LABEL_SET_KEY} metadata is not a list of class names and templates "
                         f"for one of the model's inputs ({', '.join(inputs)}); "
                         f"re-run `limoe tune`.")
    templates = [class_template(template, f"the {LABEL_SET_KEY} metadata of {source}") for template in templates]
    return classnames, templates, modality
