"""train.init_from: weights into a fresh model, experts by global index, strict one-line errors
found from names and shapes before the workdir is touched."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from limoe.checkpoints import load_model
from limoe.checkpoints.model_file import CONFIG_KEY, save_model_file
from limoe.checkpoints.warm_start import check_init_from, warm_start
from limoe.config import load_config, to_dict
from limoe.distributed import ExpertSharding
from limoe.errors import LimoeError
from limoe.model.moe import EXPERT_PARAMETERS
from limoe.model.tower import Limoe, build_model
from tests.helpers import refused, run_args

CONFIG = load_config("demo")


def _model(seed: int, sharding: ExpertSharding = ExpertSharding(), config=CONFIG) -> Limoe:
    torch.manual_seed(seed)
    return Limoe(config.model, sharding=sharding)


def _write(state: dict, path, config=CONFIG):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={CONFIG_KEY: json.dumps(to_dict(config))})
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / "model.safetensors"
    save_model_file(_model(0), CONFIG, path)
    return path


def _from(source, *overrides: str):
    return load_config("demo", [f"train.init_from={source}", *overrides])


def test_a_fresh_model_gets_every_weight_of_the_file(source):
    original, model = _model(0).state_dict(), _model(1)
    assert not torch.equal(model.image_positions, original["image_positions"])
    assert warm_start(model, _from(source)) == len(original)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_each_expert_parallel_rank_takes_its_own_experts_by_global_index(source):
    original = _model(0).state_dict()
    model = _model(1, ExpertSharding(size=2, rank=1))  # experts 2 and 3 of 4 live here as local 0 and 1
    warm_start(model, _from(source, "distributed.expert_parallel_size=2"))
    state = model.state_dict()
    for name in EXPERT_PARAMETERS:
        assert state[f"blocks.1.mlp.{name}"].shape[0] == 2
        for local, index in ((0, 2), (1, 3)):
            assert torch.equal(state[f"blocks.1.mlp.{name}"][local], original[f"blocks.1.mlp.{name}"][index]), name
    assert torch.equal(state["embedders.text.token_embed.weight"], original["embedders.text.token_embed.weight"])


def test_siglips_bias_is_kept_at_its_initial_value_when_the_source_has_none(source):
    """A CLIP-trained or pretrained model into a SigLIP run: every tower weight moves, the bias starts fresh."""
    config = _from(source, "loss.contrastive=siglip")
    model = build_model(config)
    assert warm_start(model, config) == len(_model(0).state_dict())
    assert model.logit_bias.item() == config.loss.logit_bias_init


@pytest.mark.parametrize("change, message", [
    ("missing", "has no tensor image_positions"),
    ("shape", "tensor text_positions has shape (8, 128)"),
    ("unknown", "holds tensor classifier.weight, which the limoe-tiny"),
    ("architecture", "has no tensor blocks.3.norm1.weight"),
])
def test_a_source_that_does_not_fit_is_one_line_naming_the_tensor(tmp_path, change, message):
    state = _model(0).state_dict()
    if change == "missing":
        del state["image_positions"]
    elif change == "shape":
        state["text_positions"] = state["text_positions"][:8]
    elif change == "unknown":
        state["classifier.weight"] = torch.zeros(2, 2)
    else:  # a 3-block model's file into the 4-block demo model
        small = load_config("demo", ["model.depth=3", "model.moe.layers=[1]"])
        state = _model(0, config=small).state_dict()
    config = _from(_write(state, tmp_path / "bad.safetensors"))
    for check in (lambda: check_init_from(config), lambda: warm_start(_model(1), config)):
        with pytest.raises(LimoeError) as error:
            check()
        assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("source", ["nothing.safetensors", "garbage.safetensors", "empty_workdir",
                                    "no_config.safetensors"])
def test_limoe_train_refuses_a_bad_source_in_one_line_and_leaves_the_workdir_alone(tmp_path, source):
    """no_config: the demo model's very tensors, saved without limoe's embedded config."""
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "empty_workdir").mkdir()
    save_file({k: v.contiguous() for k, v in _model(0).state_dict().items()}, str(tmp_path / "no_config.safetensors"))
    workdir = tmp_path / "run"
    line = refused(run_args("train", workdir, f"train.init_from={tmp_path / source}", "data.workers=0"))
    assert "train.init_from" in line.split(";")[0], line
    assert not workdir.exists()


@pytest.fixture(scope="module")
def dense_source(tmp_path_factory):
    """An exported dense twin of the demo model (its MoE blocks as plain MLPs)."""
    config = load_config("demo", ["model.dense=true"])
    path = tmp_path_factory.mktemp("dense") / "dense.safetensors"
    save_model_file(_model(0, config=config), config, path)
    return path


@pytest.mark.parametrize("sharding", [ExpertSharding(), ExpertSharding(size=2, rank=1)], ids=["1 rank", "rank 1 of 2"])
def test_a_dense_twin_upcycles_into_the_moe_model(dense_source, sharding):
    """Every expert equals the dense MLP it came from; the router keeps the fresh model's
    initialisation; every other tensor is the dense model's."""
    dense = load_file(str(dense_source))
    overrides = [] if sharding.size == 1 else ["distributed.expert_parallel_size=2"]
    config = _from(dense_source, *overrides)
    check_init_from(config)  # the up-front check accepts it too
    fresh, model = _model(1, sharding).state_dict(), _model(1, sharding)
    warm_start(model, config)
    state = model.state_dict()
    for block in CONFIG.model.moe_layers:
        mlp = f"blocks.{block}.mlp."
        for linear in ("fc1", "fc2"):
            for kind in ("weight", "bias"):
                experts = state[f"{mlp}{linear}_{kind}"]  # [E_l, ...]
                assert experts.shape[0] == CONFIG.model.moe.num_experts // sharding.size
                for expert in experts:
                    assert torch.equal(expert, dense[f"{mlp}{linear}.{kind}"])
        assert torch.equal(state[f"{mlp}router_weight"], fresh[f"{mlp}router_weight"])
    for name, tensor in dense.items():
        if name in state:
            assert torch.equal(state[name], tensor), name


def test_upcycling_from_a_model_of_another_width_is_one_line_naming_the_tensor(tmp_path):
    config = load_config("demo", ["model.dense=true", "model.mlp_dim=64"])
    path = tmp_path / "dense.safetensors"
    save_model_file(_model(0, config=config), config, path)
    with pytest.raises(LimoeError, match=r"tensor blocks\.0\.mlp\.fc1\.weight has shape \(64, "):
        check_init_from(_from(path))


def test_fine_tuning_from_an_export_starts_from_the_same_function(source):
    """A model started from an exported file computes what the exported model computes."""
    exported, _ = load_model(source)
    model = _model(1).eval()
    warm_start(model, _from(source))
    images, tokens = torch.rand(4, 3, 64, 64), torch.randint(1, 100, (4, 16))
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), exported.encode_image(images))
        assert torch.equal(model.encode_text(tokens), exported.encode_text(tokens))


AUDIO = ["model.modalities=[image, text, audio]", "model.audio.n_mels=48", "model.audio.clip_seconds=0.37"]
VIDEO = ["model.modalities=[image, text, video]", "model.video.frames=6", "train.init_video_from_image=true"]
AUDIO_TENSORS = {"embedders.audio.patch_embed.weight", "embedders.audio.patch_embed.bias", "audio_positions",
                 "projections.audio.weight"}  # and the pooling head's, pools.audio.*


def _seeded(config, seed: int = 1) -> Limoe:
    torch.manual_seed(seed)
    return build_model(config)


@pytest.mark.parametrize("extra, overrides", [
    ("audio", [*AUDIO, "model.audio.patch_size=8"]),
    ("video", [*VIDEO[:2], "model.video.tubelet_frames=3"]),
])
def test_an_image_text_model_seeds_a_wider_one_whose_new_modality_starts_fresh(source, caplog, extra, overrides):
    """PolyViT's and ImageBind's start: every tensor the source has moves bit for bit; the new
    modality's embedder, pooling head, projection and positions are what the same seed draws
    without a source."""
    config = _from(source, *overrides)
    stored, fresh, model = load_file(str(source)), _seeded(config).state_dict(), _seeded(config)
    with caplog.at_level("WARNING", logger="limoe.checkpoints.warm_start"):
        assert warm_start(model, config) == len(stored)
    state = model.state_dict()
    new = {name for name in state if name not in stored}
    assert {name.replace("audio", extra) for name in AUDIO_TENSORS} <= new
    assert any(name.startswith(f"pools.{extra}.") for name in new)
    assert all(extra in name for name in new), new
    for name, tensor in state.items():
        assert torch.equal(tensor, stored[name] if name in stored else fresh[name]), name
    positions = f"{extra}_positions"
    assert not torch.equal(state[positions], getattr(_seeded(config, seed=2), positions))  # the seed's own draw
    [line] = [record.getMessage() for record in caplog.records]
    assert f"; fresh (not in the source): {extra} embedder, pooling head, projection, positions" in line
    assert "kept at the initial value" not in line and "from the image ones" not in line and "\n" not in line


def _upsampled_twice(kernel: torch.Tensor) -> torch.Tensor:
    """[..., p, p] → [..., 2p, 2p] by bilinear interpolation with half-pixel centres, written out:
    output j sits at input j/2 − 1/4, so it is 3/4 of its nearer input and 1/4 of the other
    (clamped at the edges)."""
    p = kernel.shape[-1]
    weights = torch.zeros(2 * p, p, dtype=torch.float64)  # [2p, p]
    for k in range(p):
        weights[2 * k, k] += 0.75
        weights[2 * k, max(k - 1, 0)] += 0.25
        weights[2 * k + 1, k] += 0.75
        weights[2 * k + 1, min(k + 1, p - 1)] += 0.25
    return (weights @ kernel.double() @ weights.T).float()


@pytest.mark.parametrize("audio_patch", [8, 16], ids=["same patch size", "twice the image's"])
def test_the_audio_patch_convolution_can_start_from_the_image_one(source, caplog, audio_patch):
    """AST's start: the image kernel [d, 3, 8, 8] summed over RGB → [d, 1, 8, 8] (resized to 16×16
    when the audio patches are), the image bias; the rest of audio still starts fresh."""
    config = _from(source, *AUDIO, f"model.audio.patch_size={audio_patch}", "train.init_audio_patches_from_image=true")
    stored, fresh, model = load_file(str(source)), _seeded(config).state_dict(), _seeded(config)
    with caplog.at_level("WARNING", logger="limoe.checkpoints.warm_start"):
        warm_start(model, config)
    image = stored["embedders.image.patch_embed.weight"]  # [d, 3, 8, 8]
    expected = (image[:, 0] + image[:, 1] + image[:, 2])[:, None]  # [d, 1, 8, 8]
    if audio_patch == 16:
        expected = _upsampled_twice(expected)  # [d, 1, 16, 16]
    state = model.state_dict()
    torch.testing.assert_close(state["embedders.audio.patch_embed.weight"], expected)
    assert torch.equal(state["embedders.audio.patch_embed.bias"], stored["embedders.image.patch_embed.bias"])
    assert torch.equal(state["audio_positions"], fresh["audio_positions"])
    assert "audio embedder (its patch convolution from the image one, summed over RGB), pooling head" in caplog.text


def test_a_source_of_another_shape_is_still_refused_when_audio_starts_fresh(tmp_path):
    state = _model(0).state_dict()
    state["text_positions"] = state["text_positions"][:8]
    path = _write(state, tmp_path / "short.safetensors")
    line = refused(run_args("train", tmp_path / "run", f"train.init_from={path}", *AUDIO, "data.workers=0"),
                   "tensor text_positions has shape (8, 128)")
    assert "audio" not in line
    assert not (tmp_path / "run").exists()


def test_a_source_missing_part_of_a_modality_is_refused_not_started_fresh(tmp_path):
    """Only a modality the source holds nothing of starts fresh; half an image embedder is an error."""
    state = _model(0).state_dict()
    del state["pools.image.map.probe"]
    config = _from(_write(state, tmp_path / "half.safetensors"), *AUDIO)
    with pytest.raises(LimoeError, match=r"has no tensor pools\.image\.map\.probe"):
        check_init_from(config)


def test_audio_patches_from_image_are_refused_where_they_cannot_apply(tmp_path, source):
    """Without a source, or a source that has audio of its own: one line naming the option."""
    with pytest.raises(LimoeError, match="set train.init_from and include audio"):
        load_config("demo", [*AUDIO, "train.init_audio_patches_from_image=true"])
    config = load_config("demo", AUDIO)
    path = tmp_path / "audio.safetensors"
    save_model_file(_seeded(config), config, path)
    with pytest.raises(LimoeError, match="has audio tensors of its own, which are loaded; drop the option"):
        check_init_from(_from(path, *AUDIO, "train.init_audio_patches_from_image=true"))


@pytest.mark.parametrize("positions, tubelet", [("joint", 2), ("separable", 3)])
def test_video_tensors_start_from_the_image_ones_in_the_central_frame(source, caplog, positions, tubelet):
    """ViViT's start: the tubelet kernel [d, 3, t, 8, 8] is the image kernel in frame t // 2 (1 for
    t = 2 and t = 3), zeros elsewhere; joint positions are the 64 image positions once per tubelet
    step, separable ones the image's with a zero temporal table; bias, pooling head and projection
    are copies. Every image and text tensor moves bit for bit."""
    config = _from(source, *VIDEO, f"model.video.tubelet_frames={tubelet}", f"model.video.positions={positions}")
    stored, model = load_file(str(source)), _seeded(config)
    with caplog.at_level("WARNING", logger="limoe.checkpoints.warm_start"):
        warm_start(model, config)
    state, steps = model.state_dict(), 6 // tubelet
    kernel = state["embedders.video.patch_embed.weight"]  # [d, 3, t, 8, 8]
    assert kernel.shape[2] == tubelet
    for frame in range(tubelet):
        expected = stored["embedders.image.patch_embed.weight"] if frame == 1 else torch.zeros_like(kernel[:, :, 0])
        assert torch.equal(kernel[:, :, frame], expected), frame
    image_positions = stored["image_positions"]  # [64, d]
    if positions == "joint":
        assert torch.equal(state["video_positions"], torch.cat([image_positions] * steps))  # [64 · steps, d]
    else:
        assert torch.equal(state["video_positions"], image_positions)
        assert torch.equal(state["video_temporal_positions"], torch.zeros(steps, image_positions.shape[1]))
    for name, tensor in state.items():
        if name in stored:
            assert torch.equal(tensor, stored[name]), name
        elif name.startswith(("embedders.video.patch_embed.bias", "pools.video.", "projections.video.")):
            assert torch.equal(tensor, stored[name.replace("video", "image", 1)]), name
    assert "(from the image ones: tubelet kernel in the central frame, positions tiled over time)" in caplog.text


@pytest.mark.parametrize("positions, tubelet, pool, adapters", [("joint", 2, "map", 0), ("separable", 3, "mean", 1)])
def test_a_clip_of_one_frame_repeated_embeds_as_the_image_model_embeds_that_frame(tmp_path, positions, tubelet, pool,
                                                                                 adapters):
    """What makes the video features of a still clip the image features of its frame, exactly:
    each tubelet of equal frames meets only the central-frame kernel, so it embeds as its image
    patch, and with positions tiled over time (a zero temporal table) the clip's tokens are the
    image's tokens once per tubelet step. Attention over k copies of every key gives the same
    weighted mean (each weight divided by k, each value counted k times), MLPs and experts act per
    token, and the pooling (attention with a probe, or the mean) sees the same copies; the pooling
    head, projection and adapter blocks are the image's. Routing must be dropless (at a finite capacity the copies
    could overflow an expert the image's tokens fit in) and noise-free (evaluation). Not with `cls`
    pooling: the class token is one key beside k copies of each patch, so its share of every
    attention changes."""
    dropless = ["model.moe.eval_capacity_factor=null", f"model.image_pool={pool}",
                f"model.modality_adapter_layers={adapters}"]
    image_text = load_config("demo", dropless)
    path = tmp_path / "image_text.safetensors"
    save_model_file(_seeded(image_text, seed=0), image_text, path)
    config = _from(path, *VIDEO, *dropless, f"model.video.pool={pool}", f"model.video.tubelet_frames={tubelet}",
                   f"model.video.positions={positions}")
    model = _seeded(config).eval()
    warm_start(model, config)
    image_model, _ = load_model(path)
    torch.manual_seed(3)
    frames = torch.randn(3, 3, 64, 64)  # normalised images [B, 3, S, S]
    with torch.no_grad():
        expected = image_model.encode_image(frames)
        still = model.encode_video(frames[:, None].expand(-1, 6, -1, -1, -1))  # [B, 6, 3, S, S]
    torch.testing.assert_close(still, expected, atol=2e-6, rtol=0)
    assert not torch.allclose(model.encode_video(torch.randn(3, 6, 3, 64, 64)), expected, atol=1e-2)


def test_video_from_image_is_refused_when_the_source_has_video_of_its_own(tmp_path):
    config = load_config("demo", VIDEO[:2])
    path = tmp_path / "video.safetensors"
    save_model_file(_seeded(config), config, path)
    with pytest.raises(LimoeError, match="has video tensors of its own, which are loaded; drop the option"):
        check_init_from(_from(path, *VIDEO))
