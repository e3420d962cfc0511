"""`mrloss.ops.options.LossOptions`: validated once at construction, frozen, and the one list the integrations, the
training config and the verl launcher derive their loss options from."""

import dataclasses
import typing

import pytest
import torch

from mrloss import LinearCrossEntropyLoss, LossOptions, linear_cross_entropy
from mrloss.ops.options import MODEL_OPTIONS, OPTION_NAMES, PER_CALL, RETURN_FLAGS, loss_options


def test_defaults_are_those_of_linear_cross_entropy():
    """Every LossOptions field is a keyword of linear_cross_entropy with the same default (the user's API)."""
    import inspect

    parameters = inspect.signature(linear_cross_entropy).parameters
    defaults = LossOptions()
    for name in OPTION_NAMES:
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert parameters[name].default == getattr(defaults, name), name
    keywords = {name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords - set(OPTION_NAMES) == {"bias", "normalizer"}  # the tensors / the per-step value


BAD_OPTIONS = [
    (dict(shift=2), TypeError, r"shift must be a bool \(True or False\), got 2"),
    (dict(shift=1), TypeError, r"shift must be a bool"),
    (dict(shift="yes"), TypeError, r"shift must be a bool"),
    (dict(shift=torch.tensor(True)), TypeError, r"shift must be a bool"),
    (dict(return_token_losses=1), TypeError, r"return_token_losses must be a bool"),
    (dict(return_z_loss=None), TypeError, r"return_z_loss must be a bool"),
    (dict(return_token_metrics="true"), TypeError, r"return_token_metrics must be a bool"),
    (dict(reduction="avg"), ValueError, r"unknown reduction 'avg'; expected one of \('mean', 'sum', 'none'\)"),
    (dict(backend="cuda"), ValueError, r"unknown backend 'cuda'"),
    (dict(memory="tiny"), ValueError, r"unknown memory 'tiny'; expected one of \('fast', 'low'\)"),
    (dict(ignore_index=-100.0), ValueError, r"ignore_index must be an int, got -100.0"),
    (dict(ignore_index=True), ValueError, r"ignore_index must be an int"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be a positive int or None, got 0"),
    (dict(chunk_size=2.0), ValueError, r"chunk_size must be a positive int"),
    (dict(chunk_size=True), ValueError, r"chunk_size must be a positive int"),
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be a float in \[0, 1\], got -0.1"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be a float in \[0, 1\]"),
    (dict(label_smoothing=float("nan")), ValueError, r"label_smoothing must be a float in \[0, 1\]"),
    (dict(label_smoothing=True), ValueError, r"label_smoothing must be a float"),
    (dict(softcap=0.0), ValueError, r"softcap must be a finite float > 0 or None, got 0.0"),
    (dict(softcap=float("inf")), ValueError, r"softcap must be a finite float > 0"),
    (dict(softcap="30"), ValueError, r"softcap must be a finite float > 0"),
    (dict(z_loss_scale=-1e-4), ValueError, r"z_loss_scale must be a finite float >= 0, got -0.0001"),
    (dict(z_loss_scale=float("nan")), ValueError, r"z_loss_scale must be a finite float >= 0"),
]


@pytest.mark.parametrize("options,error,message", BAD_OPTIONS)
def test_bad_options_are_refused_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        LossOptions(**options)


@pytest.mark.parametrize("options,error,message", BAD_OPTIONS[:4])
def test_bad_options_are_refused_by_every_entry_point(options, error, message):
    """The one check runs for the function, the module (at construction, before any call) and the reference."""
    from mrloss.ops.reference import reference_linear_cross_entropy

    hidden, weight, targets = torch.randn(2, 5, 4), torch.randn(7, 4), torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(error, match=message):
        linear_cross_entropy(hidden, weight, targets, **options)
    with pytest.raises(error, match=message):
        LinearCrossEntropyLoss(**options)
    with pytest.raises(error, match=message):
        reference_linear_cross_entropy(hidden, weight, targets, **options)


def test_frozen_and_numbers_stored_as_floats():
    options = LossOptions(label_smoothing=1, softcap=30, z_loss_scale=0)
    assert (options.label_smoothing, options.softcap, options.z_loss_scale) == (1.0, 30.0, 0.0)
    assert all(isinstance(value, float) for value in (options.label_smoothing, options.softcap, options.z_loss_scale))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.shift = True
    assert dataclasses.replace(options, shift=True).shift and not options.shift
    with pytest.raises(TypeError, match="shift must be a bool"):
        dataclasses.replace(options, shift=2)  # replace validates too


def test_returns_output_when_any_flag_is_set():
    assert not LossOptions().returns_output
    for flag in RETURN_FLAGS:
        assert LossOptions(**{flag: True}).returns_output, flag


def test_model_options_are_the_fields_not_decided_per_call():
    per_call = {f.name for f in dataclasses.fields(LossOptions) if f.metadata.get(PER_CALL)}
    assert per_call == {"reduction", "shift", *RETURN_FLAGS}
    assert set(MODEL_OPTIONS) == set(OPTION_NAMES) - per_call
    assert set(MODEL_OPTIONS) == {"ignore_index", "softcap", "label_smoothing", "backend", "chunk_size", "memory",
                                  "z_loss_scale"}  # fmt: skip


def test_loss_options_names_the_caller_and_the_unknown_keywords():
    assert loss_options({"shift": True}, caller="f") == LossOptions(shift=True)
    base = LossOptions(reduction="sum", softcap=3.0)
    assert loss_options({"softcap": 5.0}, caller="f", base=base) == LossOptions(reduction="sum", softcap=5.0)
    with pytest.raises(TypeError, match=r"my_loss: unknown option\(s\) \['reduce'\]; expected some of"):
        loss_options({"reduce": "sum"}, caller="my_loss")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['shift'\]"):
        loss_options({"shift": True}, caller="f", allowed=MODEL_OPTIONS)


def test_integrations_and_config_derive_from_the_fields():
    """A new LossOptions field reaches heads.LOSS_OPTIONS, the training config's loss section (typed as in
    LossOptions), `mrloss train`'s options and the verl launcher's overrides without another edit."""
    from mrloss.integrations import heads
    from mrloss.training.config import LOSS_CONFIG_OPTIONS, ConfigError, LossConfig, config_from_dict

    assert heads.LOSS_OPTIONS == MODEL_OPTIONS
    assert LOSS_CONFIG_OPTIONS == tuple(name for name in MODEL_OPTIONS if name != "ignore_index")
    assert [f.name for f in dataclasses.fields(LossConfig)] == list(LOSS_CONFIG_OPTIONS)
    hints, config_hints = typing.get_type_hints(LossOptions), typing.get_type_hints(LossConfig)
    assert all(config_hints[name] == hints[name] for name in LOSS_CONFIG_OPTIONS)
    assert LossOptions(**dataclasses.asdict(LossConfig())) == LossOptions()
    with pytest.raises(ConfigError, match=r"config loss.memory: expected one of \['fast', 'low'\], got 'tiny'"):
        config_from_dict({"loss": {"memory": "tiny"}})
    with pytest.raises(ConfigError, match=r"config loss: z_loss_scale must be a finite float >= 0, got -1.0"):
        config_from_dict({"loss": {"z_loss_scale": -1}})  # the rule of LossOptions, checked with the config
    with pytest.raises(ValueError, match="z_loss_scale must be a finite float"):
        heads.check_loss_options({"z_loss_scale": -1.0}, caller="test")
    with pytest.raises(TypeError, match=r"test: unknown loss option\(s\) \['shift'\]"):
        heads.check_loss_options({"shift": True}, caller="test")
