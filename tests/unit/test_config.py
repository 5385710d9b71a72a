import textwrap

import pytest

from serve_app.config import AppConfig, ConfigError, load_config, parse_config

MINIMAL = {"models": [{"name": "m", "source": "builtin:tiny-random-llama"}]}


def with_model(**fields):
    return {"models": [{"name": "m", "source": "x", **fields}]}


def test_minimal_config_gets_documented_defaults():
    config = parse_config(MINIMAL)
    model = config.models[0]
    assert model.dtype == "auto"
    assert model.placement.gpus_per_replica == 0
    assert model.placement.cpu_fallback is True
    assert model.backends.json_schema == "cascade"
    assert model.backends.cascade == ["llguidance", "xgrammar", "outlines_core"]
    assert model.sampling.close_json is True and model.sampling.repetition_penalty == 1.0


def test_unknown_field_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"models\.0\.placement\.gpu_per_replica: Extra inputs"):
        parse_config(with_model(placement={"gpu_per_replica": 1}))


def test_wrong_dtype_names_the_allowed_values():
    with pytest.raises(ConfigError) as error:
        parse_config(with_model(dtype="fp8"))
    message = str(error.value)
    assert "models.0.dtype" in message
    for allowed in ("'auto'", "'float32'", "'float16'", "'bfloat16'"):
        assert allowed in message
    assert "'fp8'" in message


@pytest.mark.parametrize("share", [0, 0.25, 0.5, 1, 2, 4])
def test_gpu_shares_that_make_sense_are_accepted(share):
    assert parse_config(with_model(placement={"gpus_per_replica": share})).models[0].placement.gpus_per_replica == share


@pytest.mark.parametrize("share", [1.5, -1])
def test_fractions_above_one_and_negatives_are_rejected(share):
    with pytest.raises(ConfigError, match="gpus_per_replica"):
        parse_config(with_model(placement={"gpus_per_replica": share}))


def test_duplicate_model_names_are_rejected():
    with pytest.raises(ConfigError, match="repeated: m"):
        parse_config({"models": [{"name": "m", "source": "a"}, {"name": "m", "source": "b"}]})


def test_min_replicas_above_max_is_rejected():
    with pytest.raises(ConfigError, match="min_replicas"):
        parse_config(with_model(autoscaling={"min_replicas": 3, "max_replicas": 2}))


def test_default_max_tokens_above_the_limit_is_rejected():
    with pytest.raises(ConfigError, match="limits.max_new_tokens"):
        parse_config(with_model(sampling={"max_new_tokens": 100}, limits={"max_new_tokens": 50}))


def test_a_bad_constraint_in_the_registry_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match=r"constraints\.phone"):
        parse_config(with_model(constraints={"phone": {"type": "regex", "pattern": "(unclosed"}}))


def test_registry_constraints_are_typed():
    config = parse_config(with_model(constraints={
        "yesno": {"type": "choice", "choices": ["yes", "no"]},
        "person": {"type": "json_schema", "schema": {"type": "object"}},
    }))
    registry = config.models[0].constraints
    assert registry["yesno"].type == "choice"
    assert registry["person"].json_schema == {"type": "object"}


def test_load_config_reads_yaml(tmp_path):
    path = tmp_path / "app.yaml"
    path.write_text(textwrap.dedent("""
        models:
          - name: small
            source: builtin:tiny-random-llama
            placement: {gpus_per_replica: 0.5}
    """))
    config = load_config(path)
    assert isinstance(config, AppConfig)
    assert config.model("small").placement.gpus_per_replica == 0.5


def test_load_config_accepts_a_ray_serve_config_file(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(textwrap.dedent("""
        applications:
          - name: app
            import_path: serve_app.app:build_app
            args:
              models:
                - {name: small, source: builtin:tiny-random-llama}
    """))
    assert load_config(path).models[0].name == "small"


def test_load_config_reports_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
