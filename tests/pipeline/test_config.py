from pathlib import Path

import pytest

from pipeline.app.config import Config, ConfigError, config_from_dict, load_config, with_overrides

REPO = Path(__file__).resolve().parents[2]


def test_documented_config_is_valid_and_equals_defaults() -> None:
    assert load_config(REPO / "config.yaml") == Config()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": {"nam": "x"}}, "model.nam: unknown key, expected one of name, backbone"),
        ({"modle": {}}, "modle: unknown key"),
        ({"model": {"input_size": "big"}}, "model.input_size = 'big': expected int"),
        ({"model": {"input_size": 16}}, "model.input_size = 16: out of range, expected a value >= 32"),
        ({"model": {"patchcore": {"coreset_ratio": 0}}}, "coreset_ratio = 0: out of range, expected a value > 0.0"),
        (
            {"model": {"patchcore": {"coreset_ratio": 1.5}}},
            "coreset_ratio = 1.5: out of range, expected a value > 0.0 and <= 1.0",
        ),
        ({"model": {"name": "effnet"}}, "model.name = 'effnet': expected one of patchcore, padim, efficientad"),
        ({"model": {"backbone": "vgg16"}}, "model.backbone = 'vgg16': expected one of efficientnet_lite0"),
        ({"fit": {"batch_size": True}}, "fit.batch_size = True: expected int"),
        ({"model": {"layers": []}}, "model.layers = []: expected"),
        ({"fit": 3}, "fit = 3: expected a mapping"),
    ],
)
def test_invalid_values_name_key_value_and_allowed(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert message in str(err.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  sigma: -1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: model\.sigma = -1: out of range"):
        load_config(path)
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML"):
        load_config(path)
    path.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_ints_accepted_for_floats_and_lists_for_tuples() -> None:
    c = config_from_dict({"model": {"sigma": 2, "layers": ["stride8"]}})
    assert c.model.sigma == 2.0 and isinstance(c.model.sigma, float)
    assert c.model.layers == ("stride8",)


def test_overrides_apply_and_validate() -> None:
    c = with_overrides(Config(), {"model.name": "padim", "model.backbone": None, "fit.seed": 7})
    assert c.model.name == "padim" and c.model.backbone == "efficientnet_lite0" and c.fit.seed == 7
    with pytest.raises(ConfigError, match="command line: fit.seed = -1"):
        with_overrides(Config(), {"fit.seed": -1})


@pytest.mark.parametrize(
    ("model", "settings", "border"),
    [
        ("patchcore", {}, ("zeros", 0)),
        ("padim", {}, ("circular", 16)),
        ("patchcore", {"border_mode": "circular"}, ("circular", 16)),
        ("padim", {"border_mode": "zeros"}, ("zeros", 0)),
        ("patchcore", {"border_mode": "reflect", "border_pad": 32}, ("reflect", 32)),
    ],
)
def test_border_left_open_is_each_models_own(model: str, settings: dict, border: tuple[str, int]) -> None:
    assert config_from_dict({"model": {"name": model, **settings}}).model.border() == border


def test_unknown_border_mode_names_the_field() -> None:
    with pytest.raises(ConfigError, match="model.border_mode"):
        config_from_dict({"model": {"border_mode": "mirror"}})


def test_environment_overrides_the_file_and_is_validated_the_same(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("metrics:\n  port: 9200\n  host: 127.0.0.1\nmodel:\n  patchcore:\n    coreset_ratio: 0.3\n")
    env = {
        "LINEWATCH_METRICS__HOST": "0.0.0.0",
        "LINEWATCH_MODEL__PATCHCORE__CORESET_RATIO": "0.2",
        "LINEWATCH_STORE__ENABLED": "false",
        "LINEWATCH_PIPELINE__SOURCES": '[{spec: "camera:0", id: top}]',
        "LINEWATCH_FAILPOINT": "not a config key",  # no "__": not read as a setting
    }
    config = load_config(path, env)
    assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", 9200)
    assert config.model.patchcore.coreset_ratio == 0.2 and config.store.enabled is False
    assert config.pipeline.sources[0].spec == "camera:0" and config.pipeline.sources[0].id == "top"
    # The command line still wins over the environment.
    assert with_overrides(config, {"metrics.port": 9300}).metrics.port == 9300


def test_linewatch_config_names_the_file_unless_one_is_given(tmp_path: Path) -> None:
    env_file, flag_file = tmp_path / "env.yaml", tmp_path / "flag.yaml"
    env_file.write_text("metrics:\n  port: 9201\n")
    flag_file.write_text("metrics:\n  port: 9202\n")
    assert load_config(None, {"LINEWATCH_CONFIG": str(env_file)}).metrics.port == 9201
    assert load_config(flag_file, {"LINEWATCH_CONFIG": str(env_file)}).metrics.port == 9202
    assert load_config(None, {}) == Config()
    with pytest.raises(ConfigError, match=r"^/nowhere/c\.yaml: config file does not exist$"):
        load_config(None, {"LINEWATCH_CONFIG": "/nowhere/c.yaml"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LINEWATCH_METRICS__PORT": "abc"}, "LINEWATCH_METRICS__PORT: metrics.port = 'abc': expected int"),
        ({"LINEWATCH_METRICS__PROT": "1"}, "LINEWATCH_METRICS__PROT: metrics.prot: unknown key"),
        ({"LINEWATCH_METRIX__PORT": "1"}, "LINEWATCH_METRIX__PORT: metrix: unknown key"),
        ({"LINEWATCH_UI__PORT": "70000"}, "LINEWATCH_UI__PORT: ui.port = 70000: out of range"),
        ({"LINEWATCH_UI__PORT": "[1"}, "LINEWATCH_UI__PORT: not a valid YAML value"),
    ],
)
def test_bad_environment_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
