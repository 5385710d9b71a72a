"""`serve-app`: thin commands over Ray's own tools for running this app on a Ray cluster.

    serve-app run CONFIG [--port 8000]              local Ray + Serve in the foreground (`make serve`)
    serve-app run --model HF_ID_OR_DIR [--gpus N]   the same for one model, no config file
    serve-app build CONFIG | --model ...            print the complete Ray Serve config `serve deploy` takes
    serve-app deploy CONFIG --address URL [--wait]  build, then PUT it to the dashboard as `serve deploy` does
    serve-app status --address URL [--json] [--api-key KEY]  apps, deployments, replicas: placement, fallback
    serve-app submit CONFIG --address URL           run `python -m serve_app.job CONFIG` as a Ray job
    serve-app batch CONFIG | --model ... --input IN --output OUT   bulk generation over a file, on Ray Data
    serve-app submit CONFIG --address URL --batch --input IN --output OUT   the same as a Ray job
    serve-app configs                               the configs shipped with the package, usable by name
    serve-app kuberay CONFIG                        print a KubeRay RayService manifest

CONFIG is one of `configs/*.yaml` (a Ray Serve config whose `args` are ours) or a bare ``models:``
file. This module is the argparse face; each job lives in serve_app/ops/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from serve_app.bulk.job import add_batch_options
from serve_app.config import ConfigError, read_yaml
from serve_app.ops import CliError, one_line
from serve_app.ops.dashboard import DEFAULT_DASHBOARD, collect_status, default_api_key, deploy_config, wait_running
from serve_app.ops.jobs import ENTRYPOINT, submit_job
from serve_app.ops.kuberay import kuberay_manifest, ray_version
from serve_app.ops.serve_config import dump_yaml, resolve_config, serve_config, shipped_configs
from serve_app.ops.status_text import format_status

# -- the commands ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from serve_app.serve import main as serve_main

    argv = ["--host", args.host, "--port", str(args.port), "--timeout-s", str(args.timeout_s)]
    return serve_main(argv + model_argv(args) if args.model else [config_of(args), *argv])


def build(args: argparse.Namespace) -> int:
    from serve_app.serve import model_application

    config = config_of(args)
    data = {"applications": [model_application(args)]} if args.model else read_yaml(config)
    print(dump_yaml(serve_config(data)), end="")
    return 0


def config_of(args: argparse.Namespace) -> str:
    """CONFIG, checking that exactly one of CONFIG and --model was given ("" with --model)."""
    if args.model and args.config:
        raise CliError("give CONFIG or --model, not both")
    if not args.model and not args.config:
        raise CliError("give CONFIG (a YAML file) or --model HF_ID_OR_DIR")
    return str(args.config or "")


def model_argv(args: argparse.Namespace) -> list[str]:
    config_of(args)
    argv = ["--model", args.model, "--engine", args.engine, "--gpus", str(args.gpus), "--dtype", args.dtype,
            "--replicas", str(args.replicas)]
    return argv + (["--name", args.name] if args.name else [])


def deploy(args: argparse.Namespace) -> int:
    built = serve_config(read_yaml(args.config))
    deploy_config(args.address, built)
    names = [app["name"] for app in built["applications"]]
    print(f"deploy request for {', '.join(names)} accepted by {args.address}", file=sys.stderr)
    if args.wait:
        wait_running(args.address, names, args.timeout_s)
        print(f"{', '.join(names)} RUNNING", file=sys.stderr)
    return 0


def status(args: argparse.Namespace) -> int:
    result = collect_status(args.address, args.api_key or default_api_key())
    print(json.dumps(result, indent=2, default=str) if args.json else format_status(result))
    return 0


def submit(args: argparse.Namespace) -> int:
    extra = batch_argv(args) if args.batch else None
    return submit_job(args.config, args.address, args.working_dir, wait=not args.no_wait, batch=extra)


def batch(args: argparse.Namespace) -> int:
    from serve_app.bulk.job import run_command
    from serve_app.config import load_config, parse_config
    from serve_app.serve import model_application

    config = parse_config(model_application(args)["args"]) if args.model else load_config(config_of(args))
    return run_command(args, config)


def batch_argv(args: argparse.Namespace) -> list[str]:
    """`submit --batch`: the batch options as `python -m serve_app.bulk.job` takes them on the cluster."""
    if not args.input or not args.output:
        raise CliError("--batch needs --input and --output")
    if not os.path.isabs(args.output):
        raise CliError("--output: give an absolute path on the cluster's head node (a relative one would be "
                       "written inside the job's uploaded copy of the working dir)")
    argv = []
    for option in ("input", "output", "prompt_column", "id_column", "schema", "system", "max_tokens", "served_model"):
        value = getattr(args, option)
        if value is not None:
            argv += [f"--{option.replace('_', '-')}", str(value)]
    return argv


def configs(args: argparse.Namespace) -> int:
    for name, path in shipped_configs().items():
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{name:<16} {path}  {first}")
    return 0


def kuberay(args: argparse.Namespace) -> int:
    print(kuberay_manifest(args.config, args.name, args.image), end="")
    return 0


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("serve_app")
    except PackageNotFoundError:  # run from a checkout without installing
        from serve_app import __version__

        return str(__version__)


# -- the parser --------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="serve-app", description=__doc__.split("\n", 1)[0])
    root.add_argument("--version", action="version", version=f"serve-app {package_version()} (ray {ray_version()})")
    commands = root.add_subparsers(dest="command", required=True)
    for add in (_run, _build, _deploy, _status, _submit, _batch, _configs, _kuberay):
        add(commands)
    return root


def _run(commands: argparse._SubParsersAction) -> None:
    from serve_app.serve import READY_TIMEOUT_S, add_model_options

    sub = commands.add_parser("run", help="serve CONFIG (or --model) on a local Ray cluster, in the foreground")
    sub.add_argument("config", nargs="?")
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=8000)
    sub.add_argument("--timeout-s", type=float, default=READY_TIMEOUT_S, help="how long to wait for ready")
    add_model_options(sub)
    sub.set_defaults(handler=run)


def _build(commands: argparse._SubParsersAction) -> None:
    from serve_app.serve import add_model_options

    sub = commands.add_parser("build", help="print the complete Ray Serve config built from CONFIG (or --model)")
    sub.add_argument("config", nargs="?")
    add_model_options(sub)
    sub.set_defaults(handler=build)


def _deploy(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("deploy", help="deploy CONFIG to a running cluster (as `serve deploy`)")
    sub.add_argument("config")
    _address(sub)
    sub.add_argument("--wait", action="store_true", help="return once every app is RUNNING")
    sub.add_argument("--timeout-s", type=float, default=600)
    sub.set_defaults(handler=deploy)


def _status(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("status", help="apps, deployments and replicas (placement, CPU fallback)")
    _address(sub)
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--api-key", help="bearer key for the app's routes (default: first of SERVE_APP_API_KEYS)")
    sub.set_defaults(handler=status)


def _submit(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("submit", help=f"run {ENTRYPOINT} CONFIG as a Ray job")
    sub.add_argument("config")
    _address(sub)
    sub.add_argument("--working-dir", default=".", help="uploaded with the job; must hold CONFIG (a shipped config "
                     "travels alone)")
    sub.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sub.add_argument("--batch", action="store_true", help="run `serve-app batch CONFIG` with the options below "
                     "as the job (input read, output written on the head node)")
    add_batch_options(sub, required=False)
    sub.set_defaults(handler=submit)


def _batch(commands: argparse._SubParsersAction) -> None:
    from serve_app.serve import add_model_options

    sub = commands.add_parser("batch", help="answer every request of a file (OpenAI batch format or a table) "
                              "on Ray Data; a rerun skips what OUT holds")
    sub.add_argument("config", nargs="?")
    add_model_options(sub)
    add_batch_options(sub)
    sub.set_defaults(handler=batch)


def _configs(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("configs", help="list the configs shipped with the package (usable by name)")
    sub.set_defaults(handler=configs)


def _kuberay(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("kuberay", help="print a KubeRay RayService manifest for CONFIG")
    sub.add_argument("config")
    sub.add_argument("--name", default="serve-app")
    sub.add_argument("--image", default=f"rayproject/ray:{ray_version()}-py311-gpu")
    sub.set_defaults(handler=kuberay)


def _address(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_DASHBOARD,
                     help=f"the Ray dashboard's HTTP address (default: $RAY_DASHBOARD_ADDRESS, else "
                     f"{DEFAULT_DASHBOARD})")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "config", None):
        args.config = resolve_config(args.config)
    try:
        return int(args.handler(args))
    except ConfigError as error:
        head, *problems = str(error).split("\n")
        message = one_line(f"{head} {'; '.join(p.strip() for p in problems)}")
    except CliError as error:
        message = str(error)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # cluster unreachable, HTTP errors from Ray's clients: one line, no traceback
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        message = f"{type(error).__name__}: {one_line(lines[0])}"
    print(f"serve-app: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
