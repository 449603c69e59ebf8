import pytest

from dpfl.config import Config, PrivacyConfig, apply_overrides, load_config, parse_override
from dpfl.errors import ConfigError


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path):
    # Prepare
    cfg = load_config(None, ["privacy.target-epsilon=3", "federation.num-clients=7", "name='x'"])
    path = tmp_path / "c.toml"
    # Execute
    path.write_text(cfg.to_toml())
    again = load_config(path)
    # Assert
    assert again == cfg
    assert again.privacy.noise_multiplier is None and again.privacy.target_epsilon == 3.0


def test_flat_round_trip_matches_flower_run_config_shape():
    cfg = load_config(None, ["optimizer.lr=0.1", "lora.target-modules='q_proj,v_proj'"])
    flat = cfg.to_flat()
    assert flat["optimizer.lr"] == 0.1 and flat["lora.target-modules"] == "q_proj,v_proj"
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert Config.from_flat(flat) == cfg


def test_file_values_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 3\n[privacy]\nnoise-multiplier = 1.3\nclipping = "adaptive"\n')
    cfg = load_config(path, ["privacy.delta=1e-6", "data.batch-size=128"])
    assert cfg.seed == 3 and cfg.privacy.noise_multiplier == 1.3
    assert cfg.privacy.clipping == "adaptive" and cfg.privacy.delta == 1e-6
    assert cfg.data.batch_size == 128


def test_target_epsilon_override_replaces_a_file_noise_multiplier(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[privacy]\nnoise-multiplier = 1.3\n")
    cfg = load_config(path, ["privacy.target-epsilon=2.5"])
    assert cfg.privacy.target_epsilon == 2.5 and cfg.privacy.noise_multiplier is None
    back = load_config(path, ["privacy.target-epsilon=2.5", "privacy.noise-multiplier=0.9"])
    assert back.privacy.noise_multiplier == 0.9 and back.privacy.target_epsilon is None


def test_int_accepted_for_float_and_values_parsed_as_toml():
    assert parse_override("privacy.noise-multiplier=2") == ("privacy.noise-multiplier", 2)
    assert parse_override("model.name=cnn") == ("model.name", "cnn")  # bare word: a string
    assert parse_override("privacy.enabled=false") == ("privacy.enabled", False)
    assert parse_override("privacy.target-epsilon=none") == ("privacy.target-epsilon", None)
    cfg = load_config(None, ["privacy.noise-multiplier=2"])
    assert cfg.privacy.noise_multiplier == 2.0 and isinstance(cfg.privacy.noise_multiplier, float)


def test_privacy_disabled_needs_no_noise():
    cfg = load_config(None, ["privacy.enabled=false", "privacy.noise-multiplier=none"])
    assert not cfg.privacy.enabled


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.privacy.delta = 0.1  # type: ignore[misc]


def test_apply_overrides_does_not_mutate_its_input():
    data = {"privacy": {"noise-multiplier": 1.0}}
    apply_overrides(data, ["privacy.target-epsilon=1"])
    assert data == {"privacy": {"noise-multiplier": 1.0}}


BAD_OVERRIDES = [
    (["privacy.target-epsilon=-1"], "privacy.target-epsilon must be a finite number > 0"),
    (["privacy.target-epsilon=0"], "privacy.target-epsilon must be a finite number > 0"),
    (["privacy.target-epsilon=inf"], "privacy.target-epsilon must be a finite number > 0"),
    (["privacy.delta=1"], r"privacy.delta must be in \(0, 1\)"),
    (["privacy.delta=0"], r"privacy.delta must be in \(0, 1\)"),
    (["privacy.delta=1.5"], r"privacy.delta must be in \(0, 1\)"),
    (["privacy.noise-multiplier=-0.5"], "privacy.noise-multiplier must be a finite number >= 0"),
    (["privacy.clip-norm=0"], "privacy.clip-norm must be a finite number > 0"),
    (["privacy.clip-norm=-1"], "privacy.clip-norm must be a finite number > 0"),
    (["privacy.clipping=bogus"], "privacy.clipping must be one of flat, per-layer"),
    (["privacy.accountant=moments"], "privacy.accountant must be one of rdp, prv, pld, gdp"),
    (["privacy.level=group"], "privacy.level must be one of sample, user"),
    (["privacy.enabled=3"], "privacy.enabled must be true or false"),
    (["privacy.delta='small'"], "privacy.delta must be a number"),
    (["privacy.noise-multiplier=none"], "set privacy.noise-multiplier or privacy.target-epsilon"),
    (["privacy.bogus=1"], "unknown key privacy.bogus; valid keys of \\[privacy\\]: accountant"),
    (["privacy.noise_multiplier=1"], "keys use dashes"),
    (["bogus.key=1"], "unknown config key 'bogus'; valid: name, seed, task, data"),
    (["a.b.c=1"], "must look like section.key"),
    (["privacy=1"], "must be a table"),
    (["noequals"], "must look like section.key=value"),
    (["privacy.delta=nan"], "NaN"),
    (["optimizer.lr=0"], r"optimizer.lr must be in \(0, 1000\]"),
    (["optimizer.lr=1e308"], r"optimizer.lr must be in \(0, 1000\]"),
    (["seed=99999999999999999999"], r"seed must be an integer in \[0, 2\*\*63 - 1\]"),
    (["training.epochs=1e9"], r"training.epochs must be in \(0, 100000\]"),
    (["training.device='gpu'"], "training.device must be auto, cpu, cuda or cuda:N"),
    (["optimizer.momentum=1"], r"optimizer.momentum must be in \[0, 1\)"),
    (["optimizer.weight-decay=-1"], "optimizer.weight-decay must be a finite number >= 0"),
    (["optimizer.name=lbfgs"], "optimizer.name must be one of sgd, adam, adamw"),
    (["data.batch-size=0"], "data.batch-size must be an integer >= 1"),
    (["data.batch-size=1.5"], "data.batch-size must be an integer"),
    (["data.test-fraction=1"], r"data.test-fraction must be in \(0, 1\)"),
    (["training.epochs=0"], r"training.epochs must be in \(0, 100000\]"),
    (["training.max-steps=0"], "training.max-steps must be an integer >= 1"),
    (["federation.num-clients=0"], "federation.num-clients must be an integer >= 1"),
    (["federation.rounds=0"], "federation.rounds must be an integer"),
    (["federation.fraction=0"], r"federation.fraction must be in \(0, 1\]"),
    (["federation.fraction=1.5"], r"federation.fraction must be in \(0, 1\]"),
    (["federation.partition=random"], "federation.partition must be one of iid, dirichlet"),
    (["federation.dirichlet-alpha=0"], "federation.dirichlet-alpha must be a finite number > 0"),
    (["lora.r=-1"], "lora.r must be an integer >= 0"),
    (["lora.dropout=1"], r"lora.dropout must be in \[0, 1\)"),
    (["lora.target-modules=','"], "lora.target-modules must name at least one module"),
    (["store.path=''"], "store.path cannot be empty"),
    (["seed=-1"], "seed must be an integer in"),
    (["name=''"], "name must be a non-empty string"),
]


@pytest.mark.parametrize("overrides,match", BAD_OVERRIDES)
def test_every_validation_error_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_both_noise_settings_in_one_file_is_an_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[privacy]\nnoise-multiplier = 1.0\ntarget-epsilon = 3.0\n")
    with pytest.raises(ConfigError, match="both set"):
        load_config(path)


def test_both_noise_settings_in_the_dataclass_is_an_error():
    with pytest.raises(ConfigError, match="both set"):
        PrivacyConfig(noise_multiplier=1.0, target_epsilon=1.0)


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[privacy\nnoise = ")
    with pytest.raises(ConfigError, match="malformed TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_nan_in_a_file_is_rejected(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optimizer]\nlr = nan\n")
    with pytest.raises(ConfigError, match="optimizer.lr"):
        load_config(path)
