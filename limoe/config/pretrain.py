"""`pretrain`: the masked-modelling stages that `limoe pretrain` runs before contrastive training."""

from __future__ import annotations

from dataclasses import dataclass

from limoe.config.keys import setting
from limoe.errors import LimoeError
from limoe.modalities import DEFAULT_MODALITIES, MODALITIES


@dataclass(frozen=True)
class PretrainConfig:
    """`limoe pretrain`: OmniVec2's masked stages, unimodal then bimodal (see docs/TRAINING.md).

    The run takes `unimodal_steps + bimodal_steps` steps, which must equal `train.steps`. The
    defaults are MAE's (image), AudioMAE's (audio), VideoMAE's (video) and BERT's (text); OmniVec2
    published no ratios.
    """

    modalities: tuple[str, ...] = setting(
        DEFAULT_MODALITIES, "what data.train's (and data.heldout's) pairs hold: the modality whose patches are masked "
                            "(image: MAE, audio: AudioMAE, from audio shards, or video: VideoMAE, from video shards), then "
                            "text, the captions'")
    unimodal_steps: int = setting(50_000, "steps of masked image (audio, video) modelling alternating with masked "
                                          "language modelling", "[0, inf)")
    bimodal_steps: int = setting(50_000, "then steps of the same two tasks, each given the other modality through "
                                         "training-only cross-attention fusion", "[0, inf)")
    image_mask_ratio: float = setting(0.75, "share of an image's patches hidden from the encoder (MAE: 0.75)",
                                      "[0, 1)")
    audio_mask_ratio: float = setting(0.8, "share of a clip's spectrogram patches hidden from the encoder (AudioMAE: "
                                           "0.8); read with modalities [audio, text]", "[0, 1)")
    video_mask_ratio: float = setting(0.9, "share of a clip's tubelets hidden from the encoder, by tubes: the same "
                                           "grid positions at every tubelet step (VideoMAE: 0.9); read with "
                                           "modalities [video, text]", "[0, 1)")
    text_mask_ratio: float = setting(0.15, "share of caption tokens predicted (BERT: 0.15)", "(0, 1)")
    text_replace_with_mask: float = setting(0.8, "of the predicted tokens, the share shown as the learned mask "
                                                 "embedding (BERT: 0.8)", "[0, 1]")
    text_replace_with_random: float = setting(0.1, "… the share replaced by a random token (BERT: 0.1); the rest "
                                                   "stay unchanged", "[0, 1]")
    decoder_width: int = setting(512, "width of MAE's pixel decoder (MAE ViT-L: 512)", "[1, inf)")
    decoder_depth: int = setting(8, "blocks of the pixel decoder (MAE ViT-L: 8)", "[1, inf)")
    decoder_heads: int = setting(16, "attention heads of the pixel decoder (MAE ViT-L: 16)", "[1, inf)")
    fusion_depth: int = setting(1, "cross-attention fusion blocks per direction (training only, dropped by the "
                                   "export)", "[1, inf)")
    image_loss_weight: float = setting(1.0, "weight of the masked-image loss", "[0, inf)")
    audio_loss_weight: float = setting(1.0, "weight of the masked-audio loss", "[0, inf)")
    video_loss_weight: float = setting(1.0, "weight of the masked-video loss", "[0, inf)")
    text_loss_weight: float = setting(1.0, "weight of the masked-token loss", "[0, inf)")

    def __post_init__(self):
        patched = set(MODALITIES) - {"text"}
        if len(self.modalities) != 2 or self.modalities[0] not in patched or self.modalities[1] != "text":
            raise LimoeError(f"pretrain.modalities must name the modality whose patches are masked, then text: "
                             f"[image, text], [audio, text] or [video, text], got {list(self.modalities)}.")
        if self.text_replace_with_mask + self.text_replace_with_random > 1:
            raise LimoeError(
                "pretrain.text_replace_with_mask and pretrain.text_replace_with_random are shares of the masked tokens, "
                "together at most 1 (BERT: 0.8 and 0.1)."
            )
        if self.decoder_width % self.decoder_heads:
            raise LimoeError(
                f"pretrain.decoder_width {self.decoder_width} is not divisible by pretrain.decoder_heads {self.decoder_heads}."
            )

    def mask_ratio(self, modality: str) -> float:
        """The share of `modality`'s patches hidden from the encoder."""
        return {"image": self.image_mask_ratio, "audio": self.audio_mask_ratio, "video": self.video_mask_ratio}[modality]

    def loss_weight(self, modality: str) -> float:
        """The weight of the loss of the steps that predict `modality`."""
        return {"image": self.image_loss_weight, "audio": self.audio_loss_weight, "video": self.video_loss_weight,
                "text": self.text_loss_weight}[modality]
