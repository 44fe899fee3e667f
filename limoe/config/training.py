"""`train`: how long a run is, how big its batches, on what device and precision, and how often it
logs, saves and evaluates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from limoe.config.keys import setting
from limoe.errors import LimoeError


@dataclass(frozen=True)
class TrainConfig:
    """How long, how big a batch, on what, and how often to log and save."""

    steps: int = setting(100_000, "optimizer steps of the whole run", "[1, inf)")
    batch_size: int = setting(16_384, "pairs per step, summed over all data-parallel ranks", "[1, 10000000]")
    seed: int = setting(0, "seeds the weights, the data order and the router noise", "[0, 4294967295]")
    log_every: int = setting(50, "steps between lines of metrics.jsonl", "[1, inf)")
    checkpoint_every: int = setting(1000, "steps between checkpoints", "[1, inf)")
    keep_checkpoints: int = setting(2, "newest checkpoints kept on disk", "[1, inf)")
    routing_stats_every: int = setting(500, "steps between per-layer routing statistics", "[1, inf)")
    skip_nonfinite_steps: bool = setting(False, "skip and count steps with a non-finite loss instead of stopping")
    precision: Literal["auto", "fp32", "bf16"] = setting("auto", "auto: bf16 autocast on GPU, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto: CUDA when a GPU is visible")
    micro_batch_size: Optional[int] = setting(None, "pairs per GPU per forward, a multiple of model.moe.group_size "
                                                    "that divides the per-GPU batch; the gradient is the whole "
                                                    "batch's (feature caching); null: the whole per-GPU batch",
                                              "[1, inf)")
    activation_checkpointing: Literal["none", "moe", "all"] = setting(
        "none", "recompute blocks in backward instead of keeping their activations: none, the MoE blocks, or all")
    compile: bool = setting(False, "torch.compile the tower inside the engine (Inductor); off until measured faster "
                                   "on a GPU")
    report_to: tuple[Literal["tensorboard", "wandb"], ...] = setting(
        ("tensorboard",), "where the scalars go besides metrics.jsonl (open_clip's --report-to): tensorboard "
                          "(workdir/tensorboard), wandb (pip install 'limoe[wandb]'; WANDB_PROJECT, WANDB_MODE); [] "
                          "for neither")
    eval_every: int = setting(0, "steps between evaluations of the live model on eval.zeroshot and eval.retrieval "
                                 "(and eval.audio's; also at the last step); 0: none", "[0, inf)")
    init_from: Optional[str] = setting(None, "weights to start a fresh run from: an exported .safetensors file or a "
                                             "workdir of the same architecture (e.g. limoe pretrain's), or of its "
                                             "dense twin (sparse upcycling); optimizer and step start fresh; ignored "
                                             "when the workdir has a checkpoint; the tensors of a modality the "
                                             "source lacks (e.g. audio or video, from an image-text model) start "
                                             "fresh")
    init_audio_patches_from_image: bool = setting(
        False, "with train.init_from a model without audio: start the audio patch convolution from the source's image "
               "one, its kernel summed over RGB (AST's ImageNet start; bilinearly resized when the patch sizes "
               "differ) and its bias copied; false: as freshly initialised")
    init_video_from_image: bool = setting(
        False, "with train.init_from a model without video: start every video tensor from the source's image one "
               "(ViViT's central-frame start): the tubelet kernel is the image patch kernel in frame t // 2 of the "
               "tubelet (the later middle one for even t), zeros in the others, with the image bias; the positions "
               "are the image's tiled over time (separable: the image's, the temporal table zero); the class "
               "token, pooling head, projection and adapter blocks are copies. A clip of one frame repeated then "
               "embeds as the image model embeds that frame (with map or mean pooling and dropless routing). Needs "
               "model.video.pool equal to model.image_pool; "
               "false: video starts as freshly initialised")
    image_mask_ratio: float = setting(0.0, "FLIP: share of each image's patches dropped before the tower in training "
                                           "(0: off; FLIP uses 0.5); evaluation never masks", "[0, 1)")
    audio_mask_ratio: float = setting(0.0, "FLIP for audio: share of each clip's spectrogram patches dropped before "
                                           "the tower in training, drawn per clip as for images (0: off); "
                                           "evaluation never masks", "[0, 1)")
    video_mask_ratio: float = setting(0.0, "FLIP for video: share of each clip's frame-grid positions dropped before "
                                           "the tower in training, in every tubelet step alike (tube masking; 0: "
                                           "off); evaluation never masks", "[0, 1)")
    unmasked_steps: int = setting(0, "FLIP: the last steps of the run see whole images and clips (at most "
                                     "train.steps)", "[0, inf)")

    def __post_init__(self):
        if self.unmasked_steps > self.steps:
            raise LimoeError(f"train.unmasked_steps {self.unmasked_steps} is more than train.steps {self.steps}; "
                             f"lower it.")
