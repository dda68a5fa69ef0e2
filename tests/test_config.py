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
    cfg = load_config(write(tmp_path, GOOD), ["prune.steps=5", "prune.warmup_steps=5", "model.node_masks=true", "prune.node_target=0.5"])
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
    with pytest.raises(ConfigError, match=r"prune.keep_inputs: must be >= 0"):
        load_config(write(tmp_path, GOOD), ["prune.keep_inputs=-0.5"])
    assert load_config(write(tmp_path, GOOD), ["prune.keep_inputs=0.5"]).prune.keep_inputs == 0.5


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: {name_or_path: [\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["prune.steps=17"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_errors_name_the_command_line_flag_not_the_file(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    apply_overrides(cfg, ["prune.steps=-1"], source="command line (--steps)")
    with pytest.raises(ConfigError, match=r"^command line \(--steps\): prune.steps: must be >= 1"):
        cfg.validate("cfg.yaml")


def test_warmup_longer_than_steps_is_refused_naming_both_sources(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml: prune.warmup_steps: 10 is longer than prune.steps "
                                          r"\(5, from command line\)"):
        load_config(write(tmp_path, GOOD), ["prune.steps=5"])


@pytest.mark.parametrize("value", ["1.02", "-0.1"])
def test_edge_target_outside_a_fraction_is_refused(tmp_path, value):
    with pytest.raises(ConfigError, match=r"prune.edge_target: is the fraction of edges removed, in \[0, 1\]"):
        load_config(write(tmp_path, GOOD.replace("edge_target: 0.9", f"edge_target: {value}")))


def test_edge_target_above_one_needs_allow_overshoot(tmp_path):
    with pytest.raises(ConfigError, match="allow_overshoot"):
        load_config(write(tmp_path, GOOD.replace("edge_target: 0.9", "edge_target: 1.02")))
    cfg = load_config(write(tmp_path, GOOD.replace("edge_target: 0.9", "edge_target: 1.02, allow_overshoot: true")))
    assert cfg.prune.edge_target == 1.02


@pytest.mark.parametrize("key", ["data.output_scale", "prune.init_log_alpha", "prune.lr_masks"])
def test_nan_and_infinity_are_refused(tmp_path, key):
    for value in (".nan", ".inf"):
        with pytest.raises(ConfigError, match=f"command line: {key}: must be a finite number"):
            load_config(write(tmp_path, GOOD), [f"{key}={value}"])


def test_yaml_exponent_floats_are_accepted(tmp_path):
    cfg = load_config(write(tmp_path, GOOD.replace("lr_masks: 1", "lr_masks: 1e-3")), ["prune.lr_lambdas=5E-2"])
    assert cfg.prune.lr_masks == 1e-3 and cfg.prune.lr_lambdas == 0.05
    with pytest.raises(ConfigError, match="prune.steps must be int"):
        load_config(write(tmp_path, GOOD), ["prune.steps=1e3"])


def test_relative_paths_resolve_from_the_config_files_directory(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text("")
    path = tmp_path / "configs" / "cfg.yaml"
    path.write_text(GOOD.replace("data/tasks/x.jsonl", "../data/x.jsonl"))
    monkeypatch.chdir(tmp_path / "data")  # anywhere else
    cfg = load_config(path)
    assert cfg.data.path == str((tmp_path / "data" / "x.jsonl").resolve())
    assert cfg.model.name_or_path == "some/model"  # nothing there: a hub id, as written
