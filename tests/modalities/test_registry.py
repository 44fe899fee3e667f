"""The modality registry: a model's ids are positions in its own modalities, every per-modality
table follows them, the tower builds one embedder, pooling head and projection per modality of
the model, and for each modality beyond image and text: a model widened by it computes on
image-text batches what the image-text model with the same weights computes, it encodes alone
what it encodes beside text, and its model file saves and loads."""

import subprocess
import sys

import pytest
import torch

import limoe
from limoe import config as config_module
from limoe.checkpoints import load_model, save_model_file
from limoe.checkpoints.hub import save_model_folder
from limoe.config import Config, LossConfig, ModelConfig, load_model_config
from limoe.config.loss import MODALITY_DEFAULTS
from limoe.errors import LimoeError
from limoe.modalities import DEFAULT_MODALITIES, MODALITIES, PADDING, modality, registered
from limoe.model.tower import Limoe
from limoe.training.losses import ContrastiveLoss, auxiliary_loss
from tests.helpers import EXTRA, image_text_and_widened


def test_a_modality_id_is_its_place_in_the_model_s_modalities_and_padding_is_minus_one():
    assert [m.name for m in registered()] == list(MODALITIES) == ["image", "text", "audio", "video"]
    image_text = ModelConfig()
    assert image_text.modalities == DEFAULT_MODALITIES == ("image", "text")
    assert [image_text.modality_id(m) for m in ("image", "text")] == [0, 1]
    audio_text = ModelConfig(modalities=("text", "audio"))
    assert [audio_text.modality_id(m) for m in ("text", "audio")] == [0, 1]  # ids are per model
    everything = ModelConfig(modalities=("video", "audio", "image", "text"))  # any order, kept in registry order
    assert everything.modalities == ("image", "text", "audio", "video")
    assert [everything.modality_id(m) for m in ("audio", "video")] == [2, 3]
    assert PADDING == -1


def test_every_per_modality_key_has_a_default_for_every_registered_modality():
    assert config_module.MODALITIES is MODALITIES
    for key, defaults in MODALITY_DEFAULTS.items():
        assert list(defaults) == list(MODALITIES), key
        assert isinstance(getattr(LossConfig(), key), config_module.PerModality)
    # a run's loss config holds exactly its model's modalities, in the model's order
    loss = Config(model=ModelConfig(modalities=("image", "text", "audio"))).loss
    assert dict(loss.global_entropy_min_experts) == {"image": 8.0, "text": 3.0, "audio": 8.0}


@pytest.mark.parametrize("modalities, message", [
    (("image", "sound"), "model.modalities names 'sound', which is not a modality; use some of image, text, audio, "
                         "video"),
    (("text", "text"), "at most once"),
    ((), "at least one"),
])
def test_a_bad_list_of_modalities_is_named(modalities, message):
    with pytest.raises(LimoeError, match=message):
        ModelConfig(modalities=modalities)


def test_an_unregistered_modality_is_named_with_the_registered_ones():
    with pytest.raises(KeyError, match="'sound' is not a registered modality; these are: image, text, audio, video"):
        modality("sound")


def test_reading_the_names_loads_no_model_code():
    """The config imports the registry, so the registry's root must not pull in torch."""
    code = "import sys, limoe.modalities; print('torch' in sys.modules, 'limoe.modalities.image' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() \
        == ["False", "False"]


def test_the_tower_has_one_embedder_pool_and_projection_per_modality_in_registry_order():
    config = load_model_config("limoe-tiny", ["image_pool=cls", "text_pool=eos"])
    with torch.device("meta"):
        model = Limoe(config)
    assert list(model.embedders) == list(model.pools) == list(model.projections) == ["image", "text"]
    assert [model.pools[m].kind for m in model.pools] == ["cls", "eos"]
    # The tower holds each embedder's positions (and the class token) as its own parameters, ahead of
    # every submodule's: the parameter order the optimizer groups and the gradient norm's sum see.
    assert [name for name, _ in model.named_parameters()][:7] == [
        "image_positions", "image_cls_token", "text_positions", "logit_scale",
        "embedders.image.patch_embed.weight", "embedders.image.patch_embed.bias", "embedders.text.token_embed.weight"]


def test_each_dummy_batch_is_what_the_model_takes():
    config = load_model_config("limoe-tiny", ["image_size=16", "context_length=5", "audio.clip_seconds=0.5",
                                              "video.frames=6"])
    images, tokens, waveforms, clips = (modality(m).dummy_batch(config, 3) for m in MODALITIES)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert tokens.shape == (3, 5) and tokens.dtype == torch.long and bool((tokens != 0).all())  # all real: all routed
    assert waveforms.shape == (3, 8000) and waveforms.dtype == torch.float32
    assert clips.shape == (3, 6, 3, 16, 16) and clips.dtype == torch.uint8


@pytest.mark.parametrize("extra", list(EXTRA))
def test_a_widened_model_computes_on_image_text_batches_what_the_image_text_model_does(extra):
    """Bit for bit, in training mode with router noise and capacity drops: the extra modality's
    weights are drawn after everything the image-text model draws, and its routing statistics
    column stays empty."""
    image_text, small, widened, large = image_text_and_widened(extra)
    torch.manual_seed(1)
    images, tokens = torch.randn(6, 3, 64, 64), torch.randint(1, 1000, (6, 16))
    tokens[:, 9:] = 0
    contrastive = ContrastiveLoss("clip", rank_and_world_size=(0, 1))
    results = []
    for config, model in ((image_text, small), (widened, large)):
        torch.manual_seed(2)  # the same router noise: training mode, with capacity drops
        output = model.train()(images, tokens)
        aux, parts = auxiliary_loss(output.routing, config.loss)
        results.append((output, contrastive(*output[:3]) + aux, parts))
    (ours, our_loss, our_parts), (theirs, their_loss, their_parts) = results[0], results[1]
    assert torch.equal(ours.image_features, theirs.image_features)
    assert torch.equal(ours.text_features, theirs.text_features)
    assert torch.equal(our_loss, their_loss)
    assert their_parts[f"local_entropy_{extra}"].item() == 0.0 and their_parts[f"global_entropy_{extra}"].item() == 0.0
    for mine, wide in zip(ours.routing, theirs.routing):
        assert wide.present.shape[1] == 3 and not wide.present[:, 2].any()  # the extra modality's column: no groups
        assert torch.equal(mine.present, wide.present[:, :2]) and torch.equal(mine.routed, wide.routed[:2])
        assert torch.equal(mine.token_entropy, wide.token_entropy[:, :2]) and not wide.routed[2].any()


@pytest.mark.parametrize("extra", list(EXTRA))
def test_a_modality_alone_equals_its_features_in_a_joint_forward_with_text_when_dropless(extra):
    overrides, shape = EXTRA[extra]
    torch.manual_seed(0)
    model = Limoe(load_model_config("limoe-tiny", [*overrides, "moe.eval_capacity_factor=null"])).eval()
    inputs, tokens = torch.randn(5, *shape), torch.randint(1, 1000, (5, 16))
    tokens[:, 7:] = 0
    with torch.no_grad():
        joint, routing = model.encode({extra: inputs, "text": tokens})
        alone = getattr(model, f"encode_{extra}")(inputs)
    torch.testing.assert_close(alone, joint[extra], atol=1e-5, rtol=1e-4)
    assert routing[0].present[:, 0].sum() == 0 and routing[0].present[:, 1:].all()  # no image tokens in any group


@pytest.mark.parametrize("extra", list(EXTRA))
def test_a_widened_model_file_saves_and_loads(tmp_path, extra, offline_hub):
    """As a model file, a model folder and `hf-hub:` (the folder in an offline cache), by
    open_clip's entry point too: the same features of the extra modality, bit for bit."""
    cache, publish = offline_hub
    _, _, widened, large = image_text_and_widened(extra)
    path = tmp_path / "model.safetensors"
    save_model_file(large, widened, path)
    save_model_folder(large, widened, tmp_path / "folder", repo_id=f"org/{extra}")
    publish(tmp_path / "folder", f"org/{extra}")
    loaded, config = load_model(path)
    assert config.model.modalities == ("image", "text", extra)
    assert getattr(config.model, extra) == getattr(widened.model, extra)
    assert dict(config.loss.local_entropy) == {"image": 0.01, "text": 0.01, extra: 0.01}
    inputs = torch.randn(2, *EXTRA[extra][1])
    models = [loaded, *(limoe.create_model(str(name), cache_dir=cache) for name in (tmp_path / "folder",
                                                                                      f"hf-hub:org/{extra}"))]
    with torch.no_grad():
        expected = large.eval().encode({extra: inputs})[0][extra]
        for model in models:
            assert torch.equal(model.encode({extra: inputs})[0][extra], expected)
        assert torch.equal(getattr(models[-1], f"encode_{extra}")(inputs), expected)
