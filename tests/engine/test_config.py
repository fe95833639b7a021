"""Recipes load into typed dataclasses; every mistake names its key and where it came from."""

import pytest
import yaml

from vipo.configs import builtin_recipes, find_recipe
from vipo.engine.config import ConfigError, RunConfig, describe, load_config, to_dict


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtin_demo_recipe_loads_and_round_trips(tmp_path):
    assert "demo" in builtin_recipes()
    cfg = load_config(find_recipe("demo"))
    assert isinstance(cfg, RunConfig) and cfg.loss.objective == "poly_dpo"
    again = load_config(write(tmp_path, yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


def test_unknown_key_names_the_key_the_file_and_the_allowed_keys(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 1.0e-8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "optim.lrr" in text and str(path) in text
    assert "lr, scale_lr, betas" in text


def test_unknown_section_lists_the_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'opt'.*model, data, reference, loss, optim, train"):
        load_config(write(tmp_path, "opt: {}\n"))


def test_wrong_type_names_the_key_and_the_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"train.max_steps must be int, got 'many'"):
        load_config(write(tmp_path, "train:\n  max_steps: many\n"))
    with pytest.raises(ConfigError, match=r"train.batch_pairs must be int, got 2.5"):
        load_config(write(tmp_path, "train:\n  batch_pairs: 2.5\n"))
    with pytest.raises(ConfigError, match=r"loss.objective must be one of 'sft', 'dpo', 'poly_dpo'"):
        load_config(write(tmp_path, "loss:\n  objective: ppo\n"))


def test_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-3\nloss:\n  alpha: 0.0\n")
    cfg = load_config(
        path, ["optim.lr=1e-8", "loss.alpha=8", "optim.betas=[0.9,0.99]", "optim.scale_lr=false"]
    )
    assert cfg.optim.lr == 1e-8 and isinstance(cfg.optim.lr, float)  # YAML reads 1e-8 as a string
    assert cfg.loss.alpha == 8.0 and isinstance(cfg.loss.alpha, float)
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.optim.scale_lr is False


def test_a_bad_override_is_named_as_coming_from_the_command_line(tmp_path):
    path = write(tmp_path, "loss:\n  alpha: 1.0\n")
    with pytest.raises(ConfigError, match=r"command-line override: unknown key 'loss.alfa'"):
        load_config(path, ["loss.alfa=8"])
    with pytest.raises(ConfigError, match=r"not of the form"):
        load_config(path, ["loss.alpha"])


def test_cross_field_rules_are_checked_after_overrides(tmp_path):
    path = write(tmp_path, "loss:\n  objective: dpo\n  alpha: 0.0\n")
    with pytest.raises(ConfigError, match="objective is 'dpo'"):
        load_config(path, ["loss.alpha=8"])
    assert load_config(path, ["loss.alpha=8", "loss.objective=poly_dpo"]).loss.alpha == 8.0
    with pytest.raises(ConfigError, match="train.batch_pairs must be >= 1"):
        load_config(path, ["train.batch_pairs=0"])


def test_yaml_is_never_executed(tmp_path):
    path = write(tmp_path, "loss: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_missing_recipe_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_is_documented():
    rows = describe()
    assert {"loss.beta", "loss.alpha", "optim.lr", "train.batch_pairs"} <= {r[0] for r in rows}
    undocumented = [key for key, _, _, help_text in rows if not help_text]
    assert not undocumented


def test_yaml_booleans_reach_string_choices_as_written(tmp_path):
    # YAML 1.1 reads `no` as False; train.mixed_precision's choices are "no" and "bf16".
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  mixed_precision: no\n")
    assert load_config(recipe).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision must be one of 'no', 'bf16', got True"):
        load_config(None, ["train.mixed_precision=yes"])
