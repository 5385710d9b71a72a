"""Our config (a bare ``models:`` file, or a Ray Serve config whose ``args`` are ours) -> the
complete Ray Serve config `serve deploy` takes; the configs shipped with the package.

Under `serve deploy`, Ray Serve takes an application's code version from its ``import_path``,
``runtime_env`` and ``args``: any change of ``args`` rebuilds the app and replaces every replica,
while a change of a deployment's ``user_config`` alone is applied in place by ``reconfigure``. So
the build moves what replicas apply in place (sampling defaults, the constraint registry) out of
``args`` into each model deployment's ``user_config``; ``limits`` are in both, because the router
validates requests against them too (changing a limit rolls the app).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from serve_app.config import IN_PLACE_ONLY, AppConfig, ConfigError, ModelConfig, ServerConfig, parse_config

IMPORT_PATH = "serve_app.app:build_app"


DEFAULT_APPLICATION = {"name": "serve_app", "route_prefix": "/", "import_path": IMPORT_PATH}


def app_args(config: AppConfig) -> dict[str, Any]:
    """What replicas and router need at construction; unset fields stay unset, so `args` read like the input."""
    dumped = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
    dumped["models"] = [{key: value for key, value in model.items() if key not in IN_PLACE_ONLY}
                        for model in dumped["models"]]
    return dumped


def deployment_override(model: ModelConfig, server: ServerConfig) -> dict[str, Any]:
    """Serve's per-deployment options for one model, in the config schema's terms."""
    from serve_app.app import deployment_options  # here: `status` and `submit` need none of the app's code

    options = deployment_options(model, server)
    # Under `serve deploy` the code version comes from `args` (where ModelConfig.version is), not from
    # the deployment's `version` option, which the config schema does not even accept.
    options.pop("version", None)
    return options


def merge_overrides(derived: list[dict[str, Any]], given: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The config file's own `deployments` entries win, key by key, over what we derive."""
    by_name = {entry["name"]: entry for entry in given}
    merged = [{**entry, **by_name.pop(entry["name"], {})} for entry in derived]
    return merged + list(by_name.values())


def build_application(application: dict[str, Any]) -> dict[str, Any]:
    if application.get("import_path", IMPORT_PATH) != IMPORT_PATH:
        return application  # someone else's app in the same file: pass it through untouched
    config = parse_config(application.get("args", {}))
    from serve_app.app import router_options

    # The router too, with the options the config gives it (else Serve keeps the decorator's).
    derived = [router_options(config.server)] + [deployment_override(model, config.server) for model in config.models]
    return {**DEFAULT_APPLICATION, **application,
            "args": app_args(config),
            "deployments": merge_overrides(derived, application.get("deployments", []))}


def serve_config(data: dict[str, Any]) -> dict[str, Any]:
    """Ours or a Ray Serve config file -> a complete Ray Serve config, validated by Ray's own schema."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    top = dict(data) if "applications" in data else {"applications": [{**DEFAULT_APPLICATION, "args": data}]}
    top["applications"] = [build_application(app) for app in top["applications"]]
    try:
        ServeDeploySchema.model_validate(top)
    except ValidationError as error:
        raise ConfigError(f"not a valid Ray Serve config: {error}") from None
    return top


def our_configs(built: dict[str, Any]) -> list[AppConfig]:
    return [parse_config(app["args"]) for app in built["applications"] if app.get("import_path") == IMPORT_PATH]


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=100)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (RayService's serveConfigV2) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockDumper.add_representer(str, _represent_str)


def shipped_configs_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("serve_app") / "configs"))


def shipped_configs() -> dict[str, Path]:
    folder = shipped_configs_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def resolve_config(config: str) -> str:
    """CONFIG as given when that file exists; else a shipped config by name (`local`,
    `local.yaml` or `configs/local.yaml`), so the commands work outside a checkout."""
    if Path(config).exists():
        return config
    stem = Path(config).name.removesuffix(".yaml").removesuffix(".yml")
    shipped = shipped_configs()
    if stem in shipped and Path(config).parent in (Path("."), Path("configs")):
        return str(shipped[stem])
    return config
