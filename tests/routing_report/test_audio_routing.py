"""`limoe routing --modality audio` on the shipped held-out instrument clips, checked against the
routing worked out here: every clip read straight from the shards and encoded with its caption in
one forward, each token's top-1 expert counted by the modality its embedder tagged it with.
Dropless capacity makes each token's expert independent of its batch-mates, so the command's
batches of an odd size (17) route as the one batch of the reference does."""

import json
import tarfile

import pytest
import torch
from PIL import Image

from limoe.checkpoints import load_model, save_model_file
from limoe.config import Config, load_model_config
from limoe.data.audio import decode_clip
from limoe.model.tower import build_model
from limoe.routing_report.pictures import LEGEND_PX
from tests.routing_report.by_hand import assert_counts_as_routed_by_hand, route_by_hand
from tests.helpers import AUDIO_HELDOUT as HELDOUT, refused, run_limoe

BATCHES = 4  # of 17: every one of the 64 held-out clips


def _samples() -> dict[str, tuple[torch.Tensor, str]]:
    """Each held-out sample's one-second centre clip [T] and first caption, by key, in shard order."""
    samples = {}
    for shard in sorted(HELDOUT.glob("*.tar.gz")):
        with tarfile.open(shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                members.setdefault(key, {})[extension] = tar.extractfile(member).read()
        for key, files in members.items():
            clip = torch.from_numpy(decode_clip(files["flac"], 16000, 1.0, "centre"))
            samples[key] = clip, json.loads(files["json"])["text"][0]
    return samples


@pytest.fixture(scope="module")
def routed(audio_checkpoint, tmp_path_factory):
    """The report's JSON and folder, and the reference: per MoE layer the top-1 expert [64, N] of
    every token and its modality id [64, N] (padding: none of the model's), the sample keys, the model."""
    output = tmp_path_factory.mktemp("routing")
    run_limoe(["routing", "--checkpoint", str(audio_checkpoint), "--data", str(HELDOUT), "--modality", "audio",
               "--output", str(output), "--device", "cpu", "--workers", "0", "--batch-size", "17",
               "--num-batches", str(BATCHES), "--capacity-factor", "dropless"])
    samples = _samples()
    model, _ = load_model(audio_checkpoint, capacity_factor="dropless")
    clips = torch.stack([clip for clip, _ in samples.values()])  # [64, T]
    by_hand = route_by_hand(model, "audio", clips, [caption for _, caption in samples.values()])
    return {"report": json.loads((output / "routing.json").read_text()), "output": output, **by_hand,
            "keys": list(samples), "model": model}


def test_audio_and_text_counts_are_the_tokens_routed_to_each_expert(routed):
    # 128 mels / 16 × 97 frames // 16 tokens a clip
    assert_counts_as_routed_by_hand(routed["report"], routed, routed["model"], "audio", 64 * 8 * 6)


def test_clip_pictures_are_frequency_by_time_grids_of_the_pictured_block(routed):
    checkpoint = routed["report"]["checkpoints"][0]
    audio = routed["model"].config.audio
    grid = (audio.n_mels // audio.patch_size, audio.frames // audio.patch_size)  # (8, 6): F × T
    audio_id = routed["model"].config.modalities.index("audio")
    experts = routed["experts"][-1]  # the last MoE block, pictured by default
    assert checkpoint["pictured_block"] == routed["model"].config.moe_layers[-1]
    assert [example["key"] for example in checkpoint["examples"]] == routed["keys"][:4]
    for index, example in enumerate(checkpoint["examples"]):
        # the clip's tokens run time-major: token t·F + f is frequency patch f of time patch t
        time_major = experts[index][routed["ids"][index] == audio_id].view(grid[1], grid[0])  # [T, F]
        assert example["patch_experts"] == time_major.T.tolist()
        assert torch.tensor(example["patch_kept"]).shape == grid and all(map(all, example["patch_kept"]))
    with Image.open(routed["output"] / "patch_experts.png") as picture:
        assert picture.size == (2 * 240, 4 * 260 + LEGEND_PX)  # a spectrogram and a map per clip


def test_a_model_without_audio_asked_for_audio_is_one_line_and_exit_2(tmp_path):
    config = Config(model=load_model_config("limoe-tiny"))
    save_model_file(build_model(config), config, tmp_path / "image_text.safetensors")
    refused(["routing", "--checkpoint", str(tmp_path / "image_text.safetensors"), "--data", str(HELDOUT),
             "--modality", "audio", "--output", str(tmp_path / "out"), "--device", "cpu", "--workers", "0"],
            "embeds image, text, not audio")
    assert not (tmp_path / "out").exists()
