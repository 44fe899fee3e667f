"""Config parsing: strict keys, types and ranges with dotted paths, overrides, layer helpers, and
the documentation of every key (`limoe config show`, docs/CONFIG.md)."""

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from limoe.config import (
    Config,
    config_from_dict,
    MoeConfig,
    ShardSource,
    every_n_layers,
    from_dict,
    last_n_layers,
    load_config,
    load_model_config,
    to_dict,
)
from limoe.config import CONFIG_DIR, setting
from limoe.config.docs import REFERENCE, Key, config_reference, describe_config, undocumented_keys, walk_all
from limoe.errors import LimoeError
from tests.helpers import refused, run_limoe, set_options

ROOT = Path(__file__).resolve().parents[1]


def test_layer_helpers_follow_vmoe_placement():
    assert every_n_layers(12, 2) == (1, 3, 5, 7, 9, 11)
    assert last_n_layers(32, 12) == (9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)
    with pytest.raises(LimoeError, match="last 7"):
        last_n_layers(12, 7)


def test_model_files_resolve_bases_and_layer_specs():
    b16 = load_model_config("limoe-b16")
    assert (b16.patch_size, b16.width, b16.depth) == (16, 768, 12)
    assert b16.moe.layers == (1, 3, 5, 7, 9, 11)
    assert load_model_config("limoe-h14").moe.num_experts == 32


def test_overrides_are_type_checked_and_dotted():
    config = load_config("demo", ["train.steps=7", "model.moe.layers=[1]", "optim.lr=1"])
    assert config.train.steps == 7 and config.model.moe.layers == (1,)
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    with pytest.raises(LimoeError, match="'train.steps' must be of type int"):
        load_config("demo", ["train.steps=many"])


def test_unknown_key_names_its_dotted_path_and_a_suggestion():
    with pytest.raises(LimoeError, match=r"unknown config key 'model\.moe\.num_expert' \(did you mean 'num_experts'"):
        load_config("demo", ["model.moe.num_expert=4"])


def test_exponent_notation_is_a_float_even_where_yaml_reads_a_string():
    assert load_config("demo", ["optim.lr=1e-3"]).optim.lr == 1e-3
    assert load_config("demo", ["optim.min_lr=2E5"]).optim.min_lr == 2e5
    with pytest.raises(LimoeError, match="'optim.lr' must be of type float"):
        load_config("demo", ["optim.lr=1e-3x"])


def test_wrong_type_and_bool_is_not_an_int():
    with pytest.raises(LimoeError, match="'model.depth' must be of type int"):
        from_dict(Config, {"model": {"depth": True}})
    with pytest.raises(LimoeError, match="one of"):
        from_dict(Config, {"model": {"image_pool": "max"}})


def test_moe_index_beyond_depth_is_an_error():
    with pytest.raises(LimoeError, match="beyond the model's depth 4"):
        load_config("demo", ["model.moe.layers=[1, 4]"])


def test_shard_source_shorthand_and_round_trip():
    config = load_config("demo", ["data.train=/data/{00000..00003}.tar"])
    assert config.data.train == (ShardSource("/data/{00000..00003}.tar"),)
    assert from_dict(Config, to_dict(config)) == config


def test_open_clip_source_lists_and_upsampling_factors():
    assert load_config("demo", ["data.train=/a/{0..9}.tar::/b/{0..4}.tar"]).data.train == (
        ShardSource("/a/{0..9}.tar"), ShardSource("/b/{0..4}.tar"))
    sources = load_config("demo", ["data.train=[{shards: /a, upsampling: 1}, {shards: /b, upsampling: 2}]"]).data.train
    assert [s.upsampling for s in sources] == [1.0, 2.0] and all(s.weight is None for s in sources)
    with pytest.raises(LimoeError, match="give every source a weight, or none"):
        load_config("demo", ["data.train=[{shards: /a, weight: 2}, /b]"])
    with pytest.raises(LimoeError, match="not both"):
        load_config("demo", ["data.train=[{shards: /a, weight: 2, upsampling: 3}]"])


@dataclass(frozen=True)
class _Span:
    """A type the codec has never heard of, with a YAML shorthand: 'a-b' is the spans a..b-1 of length 1."""

    start: int = setting(0, "first index", "[0, inf)")
    length: int = setting(1, "indices covered", "[1, inf)")

    @classmethod
    def from_yaml_entry(cls, value):
        if isinstance(value, str):
            first, last = map(int, value.split("-"))
            return [{"start": start} for start in range(first, last)]
        return [value]


@dataclass(frozen=True)
class _Spans:
    """Spans."""

    spans: tuple[_Span, ...] = setting((), "spans", "[0, inf)")


def test_any_type_can_give_the_codec_a_yaml_shorthand_for_list_entries():
    decoded = from_dict(_Spans, {"spans": ["3-5", {"start": 9, "length": 2}]})
    assert decoded.spans == (_Span(3), _Span(4), _Span(9, 2))
    with pytest.raises(LimoeError, match=re.escape("'spans[2].length' is 0; it must be an integer in [1, inf)")):
        from_dict(_Spans, {"spans": ["3-5", {"start": 9, "length": 0}]})  # paths count the expanded entries
    with pytest.raises(LimoeError, match=re.escape("config key 'spans[0]' must be a mapping, got 7.")):
        from_dict(_Spans, {"spans": 7})


def test_a_section_checks_its_own_keys_when_built_alone():
    with pytest.raises(LimoeError, match=re.escape("model.moe.top_k: only top-1 routing is implemented; set it to 1.")):
        MoeConfig(top_k=2)


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(LimoeError, match="does not exist"):
        load_config("no/such/file.yaml")
    with pytest.raises(LimoeError, match="no models config named 'limoe-xl'"):
        load_model_config("limoe-xl")


def test_pretraining_config_builds_on_the_training_demo():
    config = load_config(None, kind="pretrain")  # configs/pretrain/demo.yaml, whose base is configs/train/demo.yaml
    assert config.model.name == "limoe-tiny" and config.optim.warmup_steps == 30
    assert (config.pretrain.unimodal_steps, config.pretrain.bimodal_steps, config.train.steps) == (500, 100, 600)
    assert (config.pretrain.decoder_width, config.pretrain.image_mask_ratio, config.pretrain.text_mask_ratio) == (64, 0.75, 0.15)
    assert load_config("demo").pretrain.decoder_width == 512  # MAE's default where a config says nothing


@pytest.mark.parametrize("override, message", [
    ("pretrain.text_replace_with_random=0.3", "together at most 1"),
    ("train.unmasked_steps=700", "train.unmasked_steps 700 is more than train.steps 600"),
    ("pretrain.image_mask_ratio=1.0", "'pretrain.image_mask_ratio' is 1.0; it must be a number in [0, 1)"),
    ("pretrain.decoder_heads=5", "not divisible by pretrain.decoder_heads 5"),
])
def test_bad_pretraining_settings_are_clear_errors(override, message):
    with pytest.raises(LimoeError, match=re.escape(message)):
        load_config(None, [override], kind="pretrain")


# ---------------------------------------------------------------------------------------------
# Ranges: one line naming the key, the value and the interval, before anything is built or read


@pytest.mark.parametrize("override, message", [
    ("model.patch_size=0", "'model.patch_size' is 0; it must be an integer in [1, inf)"),
    ("model.heads=0", "'model.heads' is 0; it must be an integer in [1, inf)"),
    ("model.depth=0", "'model.depth' is 0; it must be an integer in [1, inf)"),
    ("model.moe.layers=every 0", "'every 0' places no experts"),
    ("model.moe.train_capacity_factor=0", "'model.moe.train_capacity_factor' is 0.0; it must be a number in (0, inf)"),
    ("distributed.expert_parallel_size=0", "'distributed.expert_parallel_size' is 0"),
    ("optim.lr=.nan", "'optim.lr' is nan; it must be a number in (0, inf)"),
    ("optim.lr=-1", "'optim.lr' is -1.0"),
    ("optim.betas=[0.9, 1.0]", "'optim.betas[1]' is 1.0; it must be a number in [0, 1)"),
    ("loss.local_entropy={image: .inf, text: 0}", "'loss.local_entropy.image' is inf"),
    ("loss.global_entropy_min_experts={audio: 0.5}", "'loss.global_entropy_min_experts.audio' is 0.5"),
    ("model.audio.patch_size=0", "'model.audio.patch_size' is 0; it must be an integer in [1, 4096]"),
    ("train.batch_size=0", "'train.batch_size' is 0; it must be an integer in [1, 10000000]"),
    ("train.batch_size=1000000000000000000000", "'train.batch_size' is 1000000000000000000000"),
    ("data.workers=-1", "'data.workers' is -1; it must be an integer in [0, inf)"),
    ("data.train=[{shards: a, weight: 0}]", "'data.train[0].weight' is 0.0; it must be a number in (0, inf)"),
    ("train.checkpoint_every=0", "'train.checkpoint_every' is 0"),
    ("train.keep_checkpoints=0", "'train.keep_checkpoints' is 0; it must be an integer in [1, inf)"),
])
def test_out_of_range_values_fail_in_one_line_before_data_or_model(tmp_path, override, message):
    """`data.train` names no real shards, so reaching the data would give another error."""
    args = ["train", "--workdir", str(tmp_path), "--set", "data.train=/no/such/shards", "--set", override]
    if override.startswith("data.train"):
        args = args[:3] + args[5:]
    refused(args, message)
    assert not any(tmp_path.iterdir())


def test_info_checks_ranges_too():
    refused(["info", "limoe-tiny", "--set", "heads=0"], "'model.heads' is 0")


def test_every_shipped_config_and_every_default_is_in_range():
    for recipe in sorted((CONFIG_DIR / "train").glob("*.yaml")):
        if recipe.stem != "laion-recipe":  # a base for the others, with no model of its own
            load_config(recipe.stem)
    for item in walk_all(Config()):
        if isinstance(item, Key) and item.valid is not None:
            values = item.value if isinstance(item.value, tuple) else [item.value]
            numbers = [n for v in values for n in (dataclasses.astuple(v) if dataclasses.is_dataclass(v)
                                                   else v.values() if isinstance(v, Mapping) else [v])]
            assert all(n in item.valid for n in numbers if isinstance(n, (int, float))), item.path  # not null, 'all'


# ---------------------------------------------------------------------------------------------
# Every key documented: `limoe config show` and docs/CONFIG.md


def test_every_key_has_a_meaning_and_every_number_an_interval():
    assert undocumented_keys() == []


def test_a_key_added_without_setting_is_reported():
    @dataclass(frozen=True)
    class Section:
        """A section."""

        documented: int = setting(1, "a documented key", "[0, inf)")
        added: float = 0.5
        unranged: int = setting(2, "a number without an interval")

    assert undocumented_keys(Section()) == [
        "added: no meaning (declare it with setting(default, meaning, valid))",
        "added: holds numbers but declares no interval of valid values",
        "unranged: holds numbers but declares no interval of valid values",
    ]


def test_config_reference_in_docs_is_current():
    """Regenerate with `python -m limoe.config.docs` after changing a key in limoe/config/."""
    assert (ROOT / REFERENCE).read_text() == config_reference()


def test_config_show_prints_meanings_and_loads_back_as_the_same_config(tmp_path):
    overrides = ["optim.lr=3e-4", "data.train=/a::/b", "model.moe.eval_capacity_factor=null"]
    shown = run_limoe(["config", "show", "--config", "limoe-b16", *set_options(*overrides)])
    assert "  lr: 0.0003" in shown and "# peak learning rate" in shown and "valid: (0, inf)" in shown
    (tmp_path / "shown.yaml").write_text(shown)
    assert load_config(str(tmp_path / "shown.yaml")) == load_config("limoe-b16", overrides)
    assert describe_config(load_config("limoe-b16", overrides)) == shown


# ---------------------------------------------------------------------------------------------
# A model's modalities: the per-modality loss keys and tasks follow them


def test_per_modality_loss_keys_written_as_before_give_the_same_numbers():
    config = load_config(None, ["loss.local_entropy={image: 0.01, text: 0.01}",
                                "loss.global_entropy_min_experts={image: 4.0, text: 2.0}"])
    assert dict(config.loss.local_entropy) == {"image": 0.01, "text": 0.01}  # the floats the YAML gives, bit for bit
    assert config.loss == load_config(None).loss  # the demo writes the thresholds; the weights are the defaults
    assert list(config.loss.global_entropy) == ["image", "text"] and config.loss.global_entropy["text"] == 0.01


def test_a_model_modality_without_a_number_gets_its_default_and_the_others_keep_theirs():
    config = load_config(None, ["model.modalities=[image, text, audio]", "loss.local_entropy={text: 0.5}"])
    assert dict(config.loss.local_entropy) == {"image": 0.01, "text": 0.5, "audio": 0.01}
    # the demo writes {image: 4.0, text: 2.0}; audio's S is image's default, 8
    assert dict(config.loss.global_entropy_min_experts) == {"image": 4.0, "text": 2.0, "audio": 8.0}
    # a resolved config saved and read back is the same config
    assert config_from_dict(to_dict(config)) == config


@pytest.mark.parametrize("overrides, message", [
    (["loss.local_entropy={image: 0.01, text: 0.01, audio: 0.01}"],
     "config key 'loss.local_entropy' names 'audio', which is not one of model.modalities (image, text)"),
    (["model.modalities=[text, audio]"],  # the demo names image's S
     "config key 'loss.global_entropy_min_experts' names 'image', which is not one of model.modalities (text, audio)"),
    (["tasks=[{name: a, kind: contrastive, data: d, modalities: [audio, text]}]"],
     "task 'a': tasks[].modalities names 'audio', which is not one of model.modalities (image, text)"),
    (["tasks=[{name: a, kind: contrastive, data: d, modalities: [text]}]"],
     "task 'a': tasks[].modalities must name two different modalities, got ['text']"),
    (["model.modalities=[image, text, audio]", "model.audio.n_mels=100"],
     "model.audio.n_mels 100 is not a multiple of model.audio.patch_size 16"),
    (["model.modalities=[image, text, audio]", "model.audio.clip_seconds=0.1"],
     "model.audio.clip_seconds 0.1 gives 7 spectrogram frames, fewer than one patch of 16"),
])
def test_modality_settings_that_do_not_fit_the_model_are_one_line(overrides, message):
    with pytest.raises(LimoeError, match=re.escape(message)):
        load_config(None, overrides)


def test_tasks_default_to_the_image_text_pair():
    config = load_config(None, ["tasks=[{name: a, kind: contrastive, data: d}]", "schedule.kind=uniform"])
    assert config.tasks[0].modalities == ("image", "text")
