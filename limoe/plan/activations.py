"""Activation memory measured on the real code: what a training forward keeps for backward.

The config's model is built on the `meta` device and run under `FakeTensorMode` (shapes and
dtypes, no data, no memory), with the GPU's precision (bf16 autocast) and its expert ops (the
Triton ops' fake kernels). A dispatch mode notes every storage the forward creates; the ones still
alive when it returns are what backward will read: activations saved by autograd, the inputs a
checkpointed block keeps, and the bf16 copies of weights that autocast made and autograd saved.
So the numbers follow the code — a new layer, a different checkpointing granularity or a leaner
kernel changes them without anyone updating a formula.

Measured per checkpointing mode on one routing group's worth of examples of each combination of
modalities the run's steps encode together (`measured_inputs`: image-text pairs, an audio task's
or audio pretraining's audio-text pairs) and of each of those modalities alone (a classification step encodes its inputs
and its class prompts in separate passes), each made by its modality's `dummy_batch`: every
activation grows with the number of groups (weight copies, which do not, are told apart by their
origin), so the bytes per example hold at any micro-batch size. The contrastive loss is measured
on its own, since its logits grow with the local times the global batch; so is the audio
embedder's log-mel spectrogram, whose working set (the STFT and the power spectrum of every clip,
on the device) is freed before the first block runs, so it is a peak, not something kept.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from deepspeed.moe.utils import is_moe_param
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from limoe.config import Config
from limoe.modalities import DEFAULT_MODALITIES, MODALITIES, modality
from limoe.model.tower import build_model
from limoe.training.losses import ContrastiveLoss, auxiliary_loss
from limoe.training.objectives import ContrastiveObjective, normalized

CHECKPOINTING = ("none", "moe", "all")
LOSS_BATCHES = (32, 64)  # pairs at which the contrastive loss alone is measured
DENSE_BATCH = 8  # pairs measured for a model without routing groups
PAIRS = DEFAULT_MODALITIES  # what limoe train's steps without tasks encode together: image-text pairs


def together(modalities: Iterable[str]) -> tuple[str, ...]:
    """Modalities encoded in one forward, in registry order (the tower's): how profiles are keyed."""
    chosen = set(modalities)
    return tuple(name for name in MODALITIES if name in chosen)


def untasked_pairs(config: Config) -> tuple[str, ...]:
    """The modalities of `data.train`'s pairs in a run without tasks: `pretrain.modalities`, which is
    image–text unless `limoe pretrain` reads audio–text (`limoe train` refuses any other)."""
    return config.pretrain.modalities


def measured_inputs(config: Config) -> tuple[tuple[str, ...], ...]:
    """What the plan of `config` measures: the modalities each step encodes together (the pairs of
    a run without tasks, each task's two: a classification step's table of bytes per pair reads
    them), then each of them alone."""
    steps = [together(task.modalities) for task in config.tasks] or [together(untasked_pairs(config))]
    singles = together(name for step in steps for name in step)
    return tuple(dict.fromkeys([*steps, *((name,) for name in singles)]))


@dataclass(frozen=True)
class Kept:
    """Bytes of the storages created by a run and alive at its end, by where they come from."""

    activations: int  # derived from the inputs (anything not computed from parameters alone)
    shared_weight_copies: int  # computed from shared parameters alone (e.g. their bf16 casts)
    expert_weight_copies: int  # computed from expert parameters alone


def _tensors(values) -> list[torch.Tensor]:
    """The tensors among an op's arguments or results (aten ops nest them at most one list deep)."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


class KeptStorages(TorchDispatchMode):
    """Notes each storage an op creates, and whether it was computed from parameters alone."""

    def __init__(self, parameters: dict[StorageWeakRef, str], track_peak: bool = False):
        super().__init__()
        self.derived = dict(parameters)  # storage → "shared" / "expert": computed from parameters only
        self.created: dict[StorageWeakRef, tuple[int, str]] = {}  # storage → (bytes, origin)
        self.track_peak, self.peak = track_peak, 0  # the most bytes of created storages alive after an op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {StorageWeakRef(t.untyped_storage()) for t in _tensors(args)}
        origins = {self.derived.get(key, "activation") for key in inputs}
        origin = "activation" if not inputs or "activation" in origins else ("expert" if "expert" in origins else "shared")
        for tensor in _tensors(out if isinstance(out, (tuple, list)) else (out,)):
            key = StorageWeakRef(tensor.untyped_storage())
            if origin != "activation":
                self.derived.setdefault(key, origin)
            if key not in inputs:  # a view or an in-place result shares an input's storage: nothing new
                self.created.setdefault(key, (tensor.untyped_storage().nbytes(), origin))
        if self.track_peak:
            self.peak = max(self.peak, sum(nbytes for key, (nbytes, _) in self.created.items() if not key.expired()))
        return out

    def kept(self) -> Kept:
        """What is still alive now; unreachable cycles (checkpointing makes some) are collected first."""
        gc.collect()
        totals = {"activation": 0, "shared": 0, "expert": 0}
        for key, (nbytes, origin) in self.created.items():
            if not key.expired():
                totals[origin] += nbytes
        return Kept(totals["activation"], totals["shared"], totals["expert"])


@dataclass(frozen=True)
class ActivationProfile:
    """What one GPU keeps for backward, per checkpointing mode (bytes)."""

    per_example: dict[tuple[str, ...], dict[str, float]]  # modalities encoded together → mode → bytes per example
    shared_weight_copies: dict[str, int]  # mode → copies of shared weights kept (all ranks hold these)
    expert_weight_copies: dict[str, int]  # mode → copies of all E experts' weights kept (a rank holds E_local/E)
    logit_bytes: float  # per element of one rank's logits (B_local × B_global, or B_global² without local_loss)
    gathered_feature_bytes: float  # per pair of the global batch: the gathered features the loss keeps
    log_mel_per_clip: float = 0.0  # the log-mel spectrogram's working set per audio clip (freed before the tower)

    @property
    def per_pair(self) -> dict[str, float]:
        """Mode → bytes per image-text pair."""
        return self.per_example[PAIRS]


def _fake_module(config: Config) -> tuple[ContrastiveObjective, set[str]]:
    """The trained module with every expert (ep = 1) as fake CPU tensors, and its expert parameters' names."""
    model_config = dataclasses.replace(config.model, moe=dataclasses.replace(config.model.moe, backend="triton"))
    with torch.device("meta"):
        module = ContrastiveObjective(build_model(dataclasses.replace(config, model=model_config)), config)
    experts = {name for name, parameter in module.named_parameters() if is_moe_param(parameter)}
    with FakeTensorMode(allow_non_fake_inputs=True):
        module = module.to_empty(device="cpu")
    return module.train(), experts


def _kept_after(run: Callable[[], object], parameters: dict[StorageWeakRef, str]) -> Kept:
    tracker = KeptStorages(parameters)
    with tracker:
        output = run()
    kept = tracker.kept()
    del output
    return kept


def measure_activations(config: Config, bf16: bool,
                        inputs: Optional[tuple[tuple[str, ...], ...]] = None) -> ActivationProfile:
    """Run the config's model forward on each of `inputs` (modalities encoded together; by default
    `measured_inputs(config)`), as the training step does (uint8 images and clips normalised on the device,
    with its auxiliary losses), and its contrastive loss in fake mode."""
    inputs = inputs or measured_inputs(config)
    module, expert_names = _fake_module(config)
    parameters = {StorageWeakRef(p.untyped_storage()): "expert" if name in expert_names else "shared"
                  for name, p in module.named_parameters()}
    mode = next(module.parameters()).fake_mode
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=bf16)  # the CPU's bf16 autocast casts what CUDA's does here
    model_config = config.model
    batch = model_config.moe.group_size if model_config.moe_layers else DENSE_BATCH

    def forward(modalities: tuple[str, ...]):
        batches = {name: modality(name).dummy_batch(model_config, batch) for name in modalities}  # text: all routed
        with autocast:
            features, routing = module.model.encode(normalized(batches))
            scale = module.model.logit_scale.exp()  # the temperature the loss reads, as `Limoe.forward` makes it
            aux, _ = auxiliary_loss(routing, config.loss)
        return features, routing, scale, aux

    per_example = {together(modalities): {} for modalities in inputs}
    shared_copies, expert_copies = {}, {}
    with mode:
        for checkpointing in CHECKPOINTING:
            module.model.set_activation_checkpointing(checkpointing)
            for modalities, per_mode in per_example.items():
                kept = _kept_after(lambda: forward(modalities), parameters)
                per_mode[checkpointing] = kept.activations / batch
                if len(modalities) > 1:  # a pair's forward casts every weight; one modality's, only its share
                    shared_copies[checkpointing] = max(shared_copies.get(checkpointing, 0), kept.shared_weight_copies)
                    expert_copies[checkpointing] = max(expert_copies.get(checkpointing, 0), kept.expert_weight_copies)
        module.model.set_activation_checkpointing("none")
        log_mel = _log_mel_peak(module.model, batch) / batch if "audio" in model_config.modalities else 0.0
        logit_bytes, feature_bytes = _measure_loss(config, bf16)
    return ActivationProfile(per_example, shared_copies, expert_copies, logit_bytes, feature_bytes, log_mel)


def _log_mel_peak(model, batch: int) -> int:
    """The most bytes the audio embedder's log-mel spectrogram of `batch` clips holds at once (fake mode)."""
    waveforms = modality("audio").dummy_batch(model.config, batch)  # [B, T] float32
    tracker = KeptStorages({}, track_peak=True)
    with tracker:
        model.embedders["audio"].log_mel(waveforms)  # [B, n_mels, frames]
    return tracker.peak


def _measure_loss(config: Config, bf16: bool) -> tuple[float, float]:
    """Bytes the contrastive loss keeps, fitted as a·B² + b·B over two batch sizes of one process."""
    loss = ContrastiveLoss(config.loss.contrastive, config.loss.local_loss, rank_and_world_size=(0, 1))
    scale = torch.zeros(1, requires_grad=True)
    kept = []
    for batch in LOSS_BATCHES:
        features = [torch.empty(batch, config.model.embed_dim, requires_grad=True) for _ in range(2)]

        def run():
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                return loss(*features, scale)

        kept.append(_kept_after(run, {}).activations)
    (b1, b2), (k1, k2) = LOSS_BATCHES, kept
    quadratic = (k2 / b2 - k1 / b1) / (b2 - b1)
    return quadratic, max(0.0, k1 / b1 - quadratic * b1)
