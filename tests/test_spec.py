"""The stored model spec (spec.py): frozen, the one source of the stored flags and their
defaults, and read from every schema a checkpoint was written in."""
import dataclasses
import json

import pytest

import config
import settings
from settings import flat, resolve, settings_of
from core import spec


def test_the_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.DEFAULTS.timesteps = 10
    assert spec.ModelSpec(channel_multiples=[1, 2]).channel_multiples == (1, 2)  # a tuple


def test_the_command_line_defaults_of_the_stored_flags_are_the_specs():
    """Every field is a flag whose default is the field's: a new field needs no other list."""
    parsed = vars(config.build_parser().parse_args([]))
    assert config.stored_keys() == spec.FIELDS
    assert {k: settings._as_list(parsed[k]) for k in spec.FIELDS} == spec.DEFAULTS.to_dict()


def _schema_3(**changes) -> dict:
    return {"format": 2, "schema": 3, "config": {**spec.DEFAULTS.to_dict(), **changes}}


def test_a_written_spec_reads_back_the_same():
    mine = spec.ModelSpec(img_size=[16, 32], num_channels=8, channel_multiples=[1, 2],
                          has_attn=[False, True], captions="files", augment=0.3)
    assert spec.read({"format": 2, "schema": 3, "config": mine.to_dict()}) == mine


def test_schema_1_is_three_dicts_and_means_what_it_was_trained_with():
    old = {"format": 1, "model_config": {"img_size": 8, "img_channels": 3, "num_channels": 4,
                                         "channel_multiples": [1, 2], "has_attn": [False, True],
                                         "num_blocks": 1, "dropout": 0.0, "vocab_size": 12,
                                         "text_len": 5},
           "diffusion_config": {"timesteps": 20, "beta_min": 1e-4, "beta_max": 0.5},
           "cond_config": {"captions": "files"}}
    c = spec.stored_dict(old)
    assert list(c) == spec.FIELDS  # the derived sizes left out, every field there
    assert (c["prediction"], c["schedule"], c["captions"]) == ("eps", "linear", "files")
    assert (c["augment"], c["sr_target"]) == (0.0, "image")


def test_schema_2_without_the_later_fields_means_no_augmentation_and_an_image_target():
    c = {k: v for k, v in spec.DEFAULTS.to_dict().items() if k not in ("augment", "sr_target")}
    read = spec.stored_dict({"format": 2, "config": {**c, "super_res": 8}})
    assert read["augment"] == 0.0 and read["sr_target"] == "image"  # not today's "residual"


@pytest.mark.parametrize("field", ["timesteps", "augment", "sr_target"])
def test_schema_3_must_hold_every_field_of_its_time(field):
    damaged = _schema_3()
    del damaged["config"][field]
    with pytest.raises(spec.SpecError, match=f"lacks '{field}'"):
        spec.stored_dict(damaged)


def test_a_field_newer_than_the_checkpoint_takes_its_default(monkeypatch):
    """A field first written by schema 4 is absent from a schema 3 checkpoint: its default."""
    newest = dataclasses.make_dataclass(
        "ModelSpec", [("ema_channels", int, dataclasses.field(default=7,
                                                              metadata={"since": 4}))],
        bases=(spec.ModelSpec,), frozen=True)
    monkeypatch.setattr(spec, "ModelSpec", newest)
    monkeypatch.setattr(spec, "FIELDS", [f.name for f in dataclasses.fields(newest)])
    monkeypatch.setattr(spec, "DEFAULTS", newest())
    assert spec.read(_schema_3(num_channels=8)) == newest(num_channels=8, ema_channels=7)


@pytest.mark.parametrize("ckpt, message", [
    ({"format": 2, "schema": 99, "config": {}}, "schema 99 is newer"),
    ({"format": 2}, "no model config"),
    ({"format": 2, "schema": 3, "config": ["not", "a", "dict"]}, "no model config")])
def test_what_cannot_be_read_says_why(ckpt, message):
    with pytest.raises(spec.SpecError, match=message):
        spec.stored_dict(ckpt)


def test_every_flag_is_a_field_of_its_groups_part_of_the_settings():
    """Each group of the parser fills one part of configs.Settings: the part's fields are its
    groups' flags, no more and no fewer, and the model part is the ModelSpec."""
    from core import configs
    parser = config.build_parser()
    by_part = {}
    for g in parser.flag_groups:
        by_part.setdefault(g.part, set()).update(a.dest for a in g.actions)
    assert set(by_part) == set(configs.PART_TYPES)
    for part, flags in by_part.items():
        assert {f.name for f in dataclasses.fields(configs.PART_TYPES[part])} == flags, part
    assert configs.PART_TYPES["model"] is spec.ModelSpec
    assert {g.title for g in parser.flag_groups if g.part == "model"} == set(config.STORED_GROUPS)


def test_the_settings_are_frozen_and_hold_what_was_typed(settings):
    s = settings(["--batch-size", "6", "--prompt", "red hair", "blue hair", "--has-attn", "f",
                  "t", "--channel-multiples", "1", "2", "--img-size", "8"])
    assert s.train.batch_size == 6 and s.sample.prompt == ("red hair", "blue hair")
    assert s.model.has_attn == (False, True)  # lists are held as tuples
    for part in (s, s.data, s.model, s.train, s.sample, s.edit, s.evaluation, s.output):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, dataclasses.fields(part)[0].name, None)
    assert flat(settings_of(flat(s))) == flat(s)  # a round trip
    assert json.loads(json.dumps(s.to_dict()))["train"]["batch_size"] == 6


def test_resolve_works_values_out_into_new_objects_and_leaves_the_parsed_flags_alone():
    args, typed = config.parse_args(["--train", "--demo", "--super-res", "8", "--img-size", "16"])
    before = dict(vars(args))
    s, ckpt = resolve(args, typed)
    assert vars(args) == before and ckpt is None
    assert (s.model.num_channels, s.model.img_size, s.train.epochs) == (32, 16, 10)  # the preset
    assert (s.model.prediction, s.train.t_sampling) == ("x0", "uniform")  # an SR model's
    assert s.train.device in ("cpu", "cuda") and s.train.lr == 1e-3  # the preset's lr


@pytest.mark.parametrize("flags,drawn", [
    ([], ("dpm++", 10, "karras")),  # the default recipe's model: 10 Karras-spaced steps
    (["--sample-steps", "20"], ("dpm++", 20, "karras")),
    (["--spacing", "uniform"], ("dpm++", 20, "uniform")),  # spacing typed: the flags' defaults
    (["--spacing", "karras"], ("dpm++", 10, "karras")),
    (["--sampler", "ddim"], ("ddim", 50, "uniform")),
    (["--t-sampling", "uniform"], ("dpm++", 20, "uniform")),  # not what was measured
    (["--captions", "folders"], ("dpm++", 20, "uniform")),
    (["--prediction", "x0"], ("dpm++", 20, "uniform")),
    (["--prediction", "eps"], ("ddpm", 0, "uniform")),
])
def test_dpm_solver_takes_ten_karras_steps_only_on_the_models_it_was_measured_on(flags, drawn):
    s, _ = resolve(*config.parse_args(["--train", "--data-folders", "faces", *flags]))
    assert (s.sample.sampler, s.sample.steps, s.sample.spacing) == drawn


def test_a_cascade_stage_chooses_its_own_steps_and_spacing_unless_they_were_typed():
    base, _ = resolve(*config.parse_args(["--train", "--data-folders", "faces"]))
    assert (base.sample.steps, base.sample.spacing) == (10, "karras")
    stage = settings.cascade_args(base, set())
    assert (stage.sample_steps, stage.spacing) == (None, "uniform")  # the parser's defaults
    typed, _ = resolve(*config.parse_args(["--train", "--data-folders", "faces",
                                           "--sample-steps", "7"]))
    stage = settings.cascade_args(typed, {"sample_steps"})
    assert (stage.sample_steps, stage.spacing) == (7, "uniform")
