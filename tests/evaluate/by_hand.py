"""What the audio and video evaluation tests work out by hand from clips read straight from the
shards: the members of each sample, recall counted by rank and the zero-shot metrics, both within near
ties, and the leave-one-out k-NN vote."""

import tarfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from limoe.data.preprocess import tokenizer


def shard_members(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of the .tar.gz shards in `folder`, in shard order: {shard/key: {extension: bytes}}."""
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar.gz")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                members.setdefault(f"{shard.name}/{key}", {})[extension] = tar.extractfile(member).read()
    return members


def _rank(scores: list[float], right: set[int], margin: float) -> int:
    """How many wrong candidates score at least `margin` above the best right one (a negative
    margin counts near ties against it, a positive one for it)."""
    best = max(scores[i] for i in right)
    return sum(1 for i, score in enumerate(scores) if i not in right and score >= best + margin)


def retrieval_bounds(inputs: torch.Tensor, features: torch.Tensor, text: torch.Tensor, modality: str,
                     tolerance: float = 1e-5) -> tuple[dict, dict]:
    """Recall by hand of inputs [N, ...] with features [N, D] against their captions' text [N, D],
    with every near tie (within `tolerance`: another batching moves a random model's last bits)
    counted against (low) and for (high). Identical inputs are one input with several captions,
    as identical images are."""
    count = len(inputs)
    distinct, owner = torch.unique(inputs.flatten(1), dim=0, return_inverse=True)  # [N', ...], [N]
    kept = torch.stack([features[owner == row][0] for row in range(len(distinct))])  # [N', D]
    scores = (text @ kept.T).tolist()  # [N][N']

    def recalls(margin: float) -> dict:
        text_ranks = [_rank(row, {int(owner[i])}, margin) for i, row in enumerate(scores)]
        input_ranks = [_rank([scores[i][clip] for i in range(count)],
                             {i for i in range(count) if owner[i] == clip}, margin) for clip in range(len(distinct))]
        expected = {"clips": len(distinct), "texts": count}
        for k in (1, 5, 10):
            expected[f"{modality}_to_text_R@{k}"] = sum(r < k for r in input_ranks) / len(distinct)
            expected[f"text_to_{modality}_R@{k}"] = sum(r < k for r in text_ranks) / count
        return expected

    return recalls(-tolerance), recalls(tolerance)


def assert_retrieval_within(metrics: dict, bounds: tuple[dict, dict]) -> None:
    """The command's recall lies within the bounds by hand. Text→clip recall is pinned to two queries;
    clip→text recall may be wider, as a caption repeated on several clips (the video set's) ties
    with its copies, and which copy wins depends on the batching's last bits."""
    low, high = bounds
    assert (metrics["clips"], metrics["texts"]) == (low["clips"], low["texts"])
    for key in low:
        assert low[key] - 1e-6 <= metrics[key] <= high[key] + 1e-6, (key, metrics[key], low[key], high[key])
    for key in (k for k in low if k.startswith("text_to_")):  # the clips differ: near ties are rare
        assert high[key] - low[key] <= 2 / low["texts"], key


def zeroshot_bounds(model, features: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str],
                    templates: Sequence[str], tolerance: float = 1e-5) -> tuple[dict, dict]:
    """Each class the renormalised mean of its normalised prompts. A random model's class scores
    nearly tie, and another batching of the prompts moves the last bits: a class within
    `tolerance` of the label's score may rank either way, so this gives the metrics with every
    such near tie counted against (low) and for (high)."""
    training = model.training
    model.eval()  # as evaluation encodes: no router noise (a test may have left the model training)
    with torch.no_grad():
        context = model.config.context_length
        classes = torch.stack([F.normalize(model.encode_text(tokenizer(context)([t.format(name) for t in templates]))
                                           .mean(dim=0), dim=0) for name in classnames])  # [C, D]
    model.train(training)
    logits = features @ classes.T  # [N, C]
    label = logits.gather(1, labels[:, None])  # [N, 1]

    def metrics(above: torch.Tensor) -> dict:  # above [N]: classes ranked above the label
        per_class = [(above[labels == c] == 0).float().mean().item() for c in range(len(classnames))]
        return {"top1": (above == 0).float().mean().item(), "top5": (above < 5).float().mean().item(),
                "mean_per_class_recall": sum(per_class) / len(classnames)}

    return (metrics((logits >= label - tolerance).sum(dim=1) - 1),  # near ties against the label
            metrics((logits > label + tolerance).sum(dim=1)))  # near ties for it


def assert_zeroshot_within(metrics: dict, bounds: tuple[dict, dict], samples: int, classes: int) -> None:
    """The command's metrics (float32) lie within the bounds by hand, which still pin top-1 to two samples."""
    low, high = bounds
    assert (metrics["samples"], metrics["classes"]) == (samples, classes)
    for key in low:
        assert low[key] - 1e-6 <= metrics[key] <= high[key] + 1e-6, (key, metrics[key], low[key], high[key])
    assert high["top1"] - low["top1"] <= 2 / samples  # near ties are rare: the bounds still pin the metric


def expected_knn_top1(features: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Leave-one-out: the k most similar other inputs vote with weight exp(similarity / 0.07)."""
    count = len(labels)
    similarity = (features @ features.T).tolist()
    hits = 0
    for i in range(count):
        others = sorted((j for j in range(count) if j != i), key=lambda j: -similarity[i][j])[:k]
        votes: dict[int, float] = {}
        for j in others:
            votes[int(labels[j])] = votes.get(int(labels[j]), 0.0) + torch.tensor(similarity[i][j] / 0.07).exp().item()
        hits += max(votes, key=votes.get) == labels[i]
    return hits / count
