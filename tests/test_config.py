"""`mrloss.training.config`: the shipped configs load; unknown keys and wrong types are errors naming the key path."""

from pathlib import Path

import pytest
from helpers import run_cli

from mrloss.training.config import Config, ConfigError, apply_overrides, config_from_dict, load_config

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "mrloss/configs").glob("multi_region_*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_three_shipped_configs_load_with_their_format():
    assert [p.name for p in SHIPPED] == [
        "multi_region_position_based.yaml",
        "multi_region_structured.yaml",
        "multi_region_tag_based.yaml",
    ]
    for path in SHIPPED:
        config = load_config(path)
        assert path.stem.endswith(config.data.format)
        assert config.data.train_files and config.model.path is None
        # the example data set sits where the config says, or is written there on first use
        assert config.data.write_examples or all(Path(f).exists() for f in config.data.train_files)


def test_builtin_configs_by_name_and_unknown_names(tmp_path, monkeypatch, capsys):
    from mrloss.configs import builtin_configs, main

    monkeypatch.chdir(tmp_path)  # a built-in name works from any directory
    assert list(builtin_configs()) == ["position_based", "structured", "tag_based"]
    for name in ("tag_based", "multi_region_tag_based", "multi_region_tag_based.yaml"):
        assert load_config(name).data.format == "tag_based"
    (tmp_path / "tag_based").write_text("data:\n  train_files: mine.jsonl\n")  # a file of that name wins
    assert load_config("tag_based").data.train_files == ["mine.jsonl"]
    with pytest.raises(ConfigError, match="not found .built-in configs: position_based, structured, tag_based"):
        load_config("tag")
    assert main([]) == 0 and "tag_based" in capsys.readouterr().out
    assert main(["structured"]) == 0 and "format: structured" in capsys.readouterr().out
    assert main(["nope"]) == 2 and "no built-in config 'nope'" in capsys.readouterr().err


def test_defaults_and_overrides_parse_as_yaml(tmp_path):
    path = write(tmp_path, "data:\n  train_files: a.jsonl\ntrainer:\n  learning_rate: 1e-3\n")
    config = load_config(
        path,
        [
            "trainer.max_steps=3",
            "model.path=null",
            "data.val_files=[b.jsonl, c.jsonl]",
            "weighting.dynamic_weights={difficulty_scaling: true}",
            "loss.softcap=30",
        ],
    )
    assert config.data.train_files == ["a.jsonl"]  # one string is a list of one
    assert config.trainer.learning_rate == 1e-3  # YAML reads 1e-3 as a string; accepted for a float
    assert config.trainer.max_steps == 3 and config.model.path is None
    assert config.data.val_files == ["b.jsonl", "c.jsonl"]
    assert config.weighting.dynamic_weights == {"difficulty_scaling": True}
    assert config.loss.softcap == 30.0 and isinstance(config.loss.softcap, float)
    assert config.trainer.epochs == 1.0 and config.data.truncation == "right"  # defaults
    assert config_from_dict(config.to_dict()) == config  # round trip


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"data": {"train_files": ["a"], "max_lenght": 5}}, r"config data\.max_lenght: unknown key .*max_length"),
        ({"datas": {}}, r"config datas: unknown key"),
        (
            {"data": {"train_files": ["a"]}, "trainer": {"epochs": "three"}},
            r"config trainer\.epochs: expected float, got str 'three'",
        ),
        (
            {"data": {"train_files": ["a"]}, "trainer": {"max_steps": 2.5}},
            r"config trainer\.max_steps: expected int or null",
        ),
        (
            {"data": {"train_files": ["a"]}, "trainer": {"max_steps": True}},
            r"config trainer\.max_steps: expected int or null",
        ),
        ({"data": {"train_files": ["a", 3]}}, r"config data\.train_files\[1\]: expected str"),
        (
            {"data": {"train_files": ["a"], "format": "tags"}},
            r"config data\.format: expected one of \['auto', 'position_based'",
        ),
        ({"data": {"train_files": ["a"], "pack": "yes"}}, r"config data\.pack: expected bool"),
        ({"data": {"train_files": ["a"]}, "trainer": 5}, r"config trainer: expected a mapping"),
        (
            {"data": {"train_files": ["a"]}, "weighting": {"dynamic_weights": [1]}},
            r"config weighting\.dynamic_weights: expected dict or null",
        ),
    ],
)
def test_schema_errors_name_the_key_path(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_file_and_override_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.train_files: required"):
        load_config(write(tmp_path, "trainer:\n  epochs: 2\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"override 'trainer\.epochs': expected key\.sub=value"):
        apply_overrides({}, ["trainer.epochs"])
    with pytest.raises(ConfigError, match=r"config trainer\.max_step: unknown key"):
        load_config(write(tmp_path, "data:\n  train_files: [a]\n"), ["trainer.max_step=3"])
    with pytest.raises(ConfigError, match=r"config trainer\.epochs is not a section"):
        apply_overrides({"trainer": {"epochs": 1}}, ["trainer.epochs.x=3"])
    defaults_only = load_config(None, ["data.train_files=x.jsonl"])
    assert defaults_only.trainer == Config().trainer and defaults_only.data.train_files == ["x.jsonl"]


def test_override_values_keep_a_hash():
    """Before: trainer.output_dir=/data/run #2 became /data/run (YAML read ' #2' as a comment)."""
    from mrloss.training.config import apply_overrides

    raw = apply_overrides({}, ["trainer.output_dir=/data/run #2", "trainer.max_steps=3", "data.train_files=[a, b]"])
    assert raw == {"trainer": {"output_dir": "/data/run #2", "max_steps": 3}, "data": {"train_files": ["a", "b"]}}


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.5])
def test_label_smoothing_outside_0_1_is_a_config_error(label_smoothing):
    """Before: accepted by the config, an error of the loss at the first step."""
    from mrloss.training.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="config loss.label_smoothing: expected a value >= 0 and <= 1, got"):
        config_from_dict({"loss": {"label_smoothing": label_smoothing}})
    assert config_from_dict({"loss": {"label_smoothing": 1}}).loss.label_smoothing == 1.0


def test_recursive_yaml_anchor_is_one_line(tmp_path, capsys):
    """Before: RecursionError."""
    config = tmp_path / "c.yaml"
    config.write_text("data: &loop\n  train_files: [a.jsonl]\n  val_files: *loop\n")
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2 and "data.val_files: a YAML alias refers to its own anchor" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "weighting.dynamic_weights.difficulty_scalling=true",
            "config weighting.dynamic_weights: unknown key(s) ['difficulty_scalling']; allowed keys are",
        ),
        (
            "weighting.region_dependencies={region_dependencies: {a: {requires: [a]}}}",
            "config weighting.region_dependencies: dependency cycle a -> a",
        ),
        ("trainer.seed=-1", "config trainer.seed: expected a value >= 0 and <= 4294967295, got -1"),
        ("model.num_heads=3", "config model.num_heads: model.hidden_size 64 is not a multiple of 3 heads"),
        ("model.num_kv_heads=3", "config model.num_kv_heads: model.num_heads 4 is not a multiple of 3 key/value heads"),
    ],
    ids=["weighting-key", "dependency-cycle", "seed", "num-heads", "num-kv-heads"],
)
def test_config_mistakes_are_one_line(override, message, tmp_path, capsys):
    """Before (#23 tracebacks): a traceback each (num_kv_heads only at the first training step)."""
    from mrloss.cli import main

    assert main(["train", "--config", "tag_based", f"trainer.output_dir={tmp_path}/run", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mrloss train: {message}") and err.count("\n") == 1, err
