"""The stored model spec (spec.py): frozen, the one source of the stored flags and their
defaults, and read from every schema a checkpoint was written in."""
import dataclasses

import pytest

import config
import spec


def test_the_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.DEFAULTS.timesteps = 10
    assert spec.ModelSpec(channel_multiples=[1, 2]).channel_multiples == (1, 2)  # a tuple


def test_the_command_line_defaults_of_the_stored_flags_are_the_specs():
    """Every field is a flag whose default is the field's: a new field needs no other list."""
    parsed = vars(config.build_parser().parse_args([]))
    assert config.stored_keys() == spec.FIELDS
    assert {k: config._as_list(parsed[k]) for k in spec.FIELDS} == spec.DEFAULTS.to_dict()


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
