"""The shipped serve config YAMLs are valid Ray Serve configs whose args are valid for us."""

from pathlib import Path

import pytest
from ray.serve.schema import ServeDeploySchema

from serve_app.app import build_app, deployment_options
from serve_app.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_the_three_configs_ship():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "fractional_gpu.yaml", "multi_gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_valid_serve_config_and_builds(path):
    import yaml

    ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    config = load_config(path)
    assert build_app(config) is not None


def test_actor_options_follow_the_placement():
    root = Path(__file__).resolve().parents[2] / "configs"
    [fractional] = load_config(root / "fractional_gpu.yaml").models
    assert deployment_options(fractional)["ray_actor_options"]["num_gpus"] == 0.25
    assert deployment_options(fractional)["num_replicas"] == 4
    [multi] = load_config(root / "multi_gpu.yaml").models
    assert deployment_options(multi)["ray_actor_options"]["num_gpus"] == 2
    assert deployment_options(multi)["autoscaling_config"]["max_replicas"] == 2
    [local] = load_config(root / "local.yaml").models
    assert "num_gpus" not in deployment_options(local)["ray_actor_options"]
