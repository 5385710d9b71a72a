"""The shipped serve config YAMLs are valid Ray Serve configs whose args are valid for us."""

from pathlib import Path

import pytest
from ray.serve.schema import ServeDeploySchema

from serve_app.app import build_app, deployment_options
from serve_app.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_the_three_configs_ship_and_serve_what_their_names_say():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "fractional_gpu.yaml", "multi_gpu.yaml"}
    root = CONFIGS[0].parent
    [local] = load_config(root / "local.yaml").models
    assert local.source == "builtin:smollm2-135m-instruct" and local.placement.gpus_per_replica == 0
    assert 0 < load_config(root / "fractional_gpu.yaml").models[0].placement.gpus_per_replica < 1
    assert load_config(root / "multi_gpu.yaml").models[0].placement.gpus_per_replica >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_valid_serve_config_and_builds(path):
    import yaml

    ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    config = load_config(path)
    router = build_app(config)._bound_deployment
    assert router.name == "router"  # the ingress, with options derived from the server config
    assert router.ray_actor_options == {"num_cpus": config.server.router_num_cpus}
    assert router._deployment_config.max_ongoing_requests == config.server.router_max_ongoing_requests
    models = router.init_args[1]  # one bound deployment per model, with its placement's resources
    assert sorted(models) == sorted(m.name for m in config.models)
    for model in config.models:
        bound = models[model.name]._bound_deployment
        assert bound.name == f"model-{model.name}"
        assert bound.ray_actor_options == deployment_options(model)["ray_actor_options"]


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
