import pytest

from edgeprune.config import ConfigError, ExperimentConfig, apply_overrides, load_config, save_config

GOOD = """
model: {name_or_path: some/model, dtype: bfloat16}
data: {path: data/tasks/x.jsonl}
prune: {edge_target: 0.9, steps: 20, warmup_steps: 10, lr_masks: 1}
run: {output_dir: runs/x, seed: 3}
"""


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_loads_into_dataclasses_with_int_to_float(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.model.dtype == "bfloat16" and cfg.prune.steps == 20
    assert cfg.prune.lr_masks == 1.0 and isinstance(cfg.prune.lr_masks, float)
    assert cfg.run.seed == 3 and cfg.prune.batch_size == ExperimentConfig().prune.batch_size


def test_overrides_parse_yaml_scalars(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["prune.steps=5", "model.node_masks=true", "prune.node_target=0.5"])
    assert cfg.prune.steps == 5 and cfg.model.node_masks is True and cfg.prune.node_target == 0.5


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml: unknown key 'prune.stepz'"):
        load_config(write(tmp_path, GOOD.replace("steps: 20", "stepz: 20")))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trainer.lr'"):
        load_config(write(tmp_path, GOOD + "trainer: {lr: 1}\n"))


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"prune.steps must be int, got 'many'"):
        load_config(write(tmp_path, GOOD.replace("steps: 20", "steps: many")))
    with pytest.raises(ConfigError, match=r"command line: prune.batch_size must be int, got 2.5"):
        apply_overrides(ExperimentConfig(), ["prune.batch_size=2.5"])


def test_bad_values_name_field(tmp_path):
    with pytest.raises(ConfigError, match="model.dtype"):
        load_config(write(tmp_path, GOOD.replace("bfloat16", "int8")))
    with pytest.raises(ConfigError, match="prune.node_target.*node_masks"):
        load_config(write(tmp_path, GOOD), ["prune.node_target=0.5"])
    with pytest.raises(ConfigError, match="model.name_or_path: required"):
        load_config(write(tmp_path, GOOD.replace("name_or_path: some/model, ", "")))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: {name_or_path: [\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["prune.steps=7"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
