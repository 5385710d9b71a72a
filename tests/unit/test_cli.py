"""`serve-app` without a cluster: build, kuberay, and one-line errors."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from serve_app.cli import main
from serve_app.ops import CliError
from serve_app.ops.jobs import UPLOAD_EXCLUDES

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SERVE_APP = str(Path(sys.executable).parent / "serve-app")
TINY = {"name": "tiny", "source": "builtin:tiny-random-llama", "limits": {"max_new_tokens": 16},
        "sampling": {"max_new_tokens": 8}, "constraints": {"yn": {"type": "choice", "choices": ["yes", "no"]}}}


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, data: Any, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def built(capsys: pytest.CaptureFixture[str], path: str) -> dict[str, Any]:
    code, out, err = run_cli(capsys, "build", path)
    assert code == 0, err
    return dict(yaml.safe_load(out))


def code_version(config: dict[str, Any]) -> str:
    return get_app_code_version(ServeApplicationSchema.model_validate(config["applications"][0]))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_build_output_is_a_ray_serve_config_with_derived_deployment_options(capsys, config):
    output = built(capsys, str(config))
    schema = ServeDeploySchema.model_validate(output)
    [app] = schema.applications
    assert app.import_path == "serve_app.app:build_app"
    models = yaml.safe_load(config.read_text())["applications"][0]["args"]["models"]
    overrides = {d.name: d for d in app.deployments}
    for model in models:
        override = overrides[f"model-{model['name']}"]
        assert override.ray_actor_options.num_cpus == model["placement"]["num_cpus"]
        assert (override.ray_actor_options.num_gpus or 0) == model["placement"].get("gpus_per_replica", 0)
        assert set(override.user_config) == {"sampling", "limits", "constraints"}
        assert override.graceful_shutdown_timeout_s == 60
    # what `serve deploy` itself sends validates again
    ServeDeploySchema.model_validate(schema.model_dump(exclude_unset=True))


def test_build_wraps_a_bare_models_file_into_one_application(capsys, tmp_path):
    output = built(capsys, write(tmp_path, {"models": [TINY]}))
    [app] = output["applications"]
    assert (app["name"], app["route_prefix"]) == ("serve_app", "/")
    assert app["args"]["models"][0]["name"] == "tiny"
    assert "sampling" not in app["args"]["models"][0] and "constraints" not in app["args"]["models"][0]
    router, deployment = app["deployments"]
    assert router["name"] == "router" and router["ray_actor_options"] == {"num_cpus": 0.25}
    assert deployment["user_config"]["sampling"]["max_new_tokens"] == 8
    assert deployment["user_config"]["constraints"]["yn"]["choices"] == ["yes", "no"]


def test_sampling_change_keeps_the_code_version_so_serve_reconfigures_in_place(capsys, tmp_path):
    changed = {**TINY, "sampling": {"max_new_tokens": 2}}
    before = built(capsys, write(tmp_path, {"models": [TINY]}, "a.yaml"))
    after = built(capsys, write(tmp_path, {"models": [changed]}, "b.yaml"))
    assert code_version(before) == code_version(after)
    assert before["applications"][0]["deployments"] != after["applications"][0]["deployments"]


def test_version_change_changes_the_code_version_so_serve_replaces_replicas(capsys, tmp_path):
    before = built(capsys, write(tmp_path, {"models": [TINY]}, "a.yaml"))
    after = built(capsys, write(tmp_path, {"models": [{**TINY, "version": "2"}]}, "c.yaml"))
    assert code_version(before) != code_version(after)


def test_config_file_deployment_overrides_win_over_derived_ones(capsys, tmp_path):
    config = {"applications": [{"name": "x", "import_path": "serve_app.app:build_app", "args": {"models": [TINY]},
                                "deployments": [{"name": "model-tiny", "max_ongoing_requests": 7},
                                                {"name": "router", "num_replicas": 2}]}]}
    deployments = {d["name"]: d for d in built(capsys, write(tmp_path, config))["applications"][0]["deployments"]}
    assert deployments["model-tiny"]["max_ongoing_requests"] == 7
    assert "user_config" in deployments["model-tiny"]
    assert deployments["router"]["num_replicas"] == 2  # the file's own entry wins, key by key
    assert deployments["router"]["ray_actor_options"] == {"num_cpus": 0.25}  # derived from server.router_num_cpus


def manifest(capsys: pytest.CaptureFixture[str], config: str) -> dict[str, Any]:
    code, out, err = run_cli(capsys, "kuberay", config)
    assert code == 0, err
    return dict(yaml.safe_load(out))


def test_kuberay_manifest_is_a_rayservice_with_gpu_workers_matching_placement(capsys):
    service = manifest(capsys, "configs/multi_gpu.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_v2 = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_v2)
    assert serve_v2["http_options"] == {"host": "0.0.0.0", "port": 8000}
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    [group] = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 2  # gpus_per_replica: 2, one replica per pod
    assert limits["cpu"] == "4" and limits["memory"].endswith("Gi")
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 2)
    assert cluster["enableInTreeAutoscaling"] is True


def test_kuberay_packs_gpu_shares_onto_one_card_per_pod(capsys):
    cluster = manifest(capsys, "configs/fractional_gpu.yaml")["spec"]["rayClusterConfig"]
    [group] = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1  # four replicas of 0.25 share one card
    assert limits["cpu"] == "4"
    assert (group["replicas"], group["maxReplicas"]) == (1, 1)


def test_committed_rayservice_manifest_is_what_kuberay_generates(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = run_cli(capsys, "kuberay", "configs/multi_gpu.yaml")
    assert code == 0
    assert (ROOT / "cluster" / "rayservice.yaml").read_text() == out


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("serve-app: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_invalid_config_is_one_line_naming_the_field(capsys, tmp_path):
    bad = write(tmp_path, {"models": [{**TINY, "dtype": "fp8"}]})
    for command in ("build", "kuberay"):
        code, out, err = run_cli(capsys, command, bad)
        assert out == ""
        assert_one_line_error(code, err, "models.0.dtype", "fp8")


def test_missing_config_file_is_one_line(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "build", str(tmp_path / "nope.yaml"))[::2], "nope.yaml")


def test_submit_refuses_a_config_outside_the_working_dir(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, _, err = run_cli(capsys, "submit", write(tmp_path, {"models": [TINY]}), "--address", "http://127.0.0.1:1")
    assert_one_line_error(code, err, "must be inside the working dir")


def test_unreachable_cluster_is_one_line_from_the_installed_script(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    config = write(tmp_path, {"models": [TINY]})
    for args in (["deploy", config], ["status"]):
        done = subprocess.run([SERVE_APP, *args, "--address", f"http://127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=120)
        assert_one_line_error(done.returncode, done.stderr)
        assert done.stdout == ""


def test_build_with_model_needs_no_config_file(capsys):
    code, out, err = run_cli(capsys, "build", "--model", "Org/Some_Model v2", "--gpus", "0.5", "--replicas", "2")
    assert code == 0, err
    [app] = yaml.safe_load(out)["applications"]
    [model] = app["args"]["models"]
    assert model["name"] == "Some_Model-v2" and model["source"] == "Org/Some_Model v2"
    assert model["placement"] == {"gpus_per_replica": 0.5}
    assert model["autoscaling"] == {"min_replicas": 2, "max_replicas": 2}
    router, deployment = app["deployments"]
    assert router["name"] == "router" and router["ray_actor_options"] == {"num_cpus": 0.25}
    assert deployment["ray_actor_options"]["num_gpus"] == 0.5 and deployment["num_replicas"] == 2


@pytest.mark.parametrize("args", [["run"], ["build"], ["build", "configs/local.yaml", "--model", "x"]])
def test_run_and_build_want_exactly_one_of_config_and_model(capsys, args):
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "CONFIG")


def test_version_and_the_dashboard_address_from_the_environment(capsys, monkeypatch):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and re.match(r"serve-app \d+\.\d+\.\d+ \(ray \d", capsys.readouterr().out)
    monkeypatch.setenv("RAY_DASHBOARD_ADDRESS", "http://10.0.0.7:8265")
    from serve_app.cli import parser

    assert parser().parse_args(["status"]).address == "http://10.0.0.7:8265"
    assert parser().parse_args(["status", "--address", "http://h:1"]).address == "http://h:1"


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_configs_manifest_schedules_every_replica_at_its_maximum(capsys, monkeypatch, config):
    from serve_app.ops.kuberay import unschedulable

    monkeypatch.chdir(ROOT)
    service = manifest(capsys, config)
    assert unschedulable(service) == []
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert float(head["rayStartParams"]["num-cpus"]) >= 0.25  # the router runs there
    if config == "configs/fractional_gpu.yaml":  # what kept it from RUNNING: no CPU for the router anywhere
        head["rayStartParams"]["num-cpus"] = "0"
        [missing] = unschedulable(service)
        assert "/router#0 (0.25 CPU, 0 GPU)" in missing


def test_the_manifest_keeps_the_dashboard_on_the_pod_behind_a_token_and_mounts_the_models(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    cluster = manifest(capsys, "configs/multi_gpu.yaml")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "$(POD_IP)"
    for container in [head["template"]["spec"]["containers"][0]] + [
            g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "serve-app-ray-token", "key": "token"}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    [group] = cluster["workerGroupSpecs"]
    assert group["template"]["spec"]["containers"][0]["volumeMounts"] == [
        {"name": "models", "mountPath": "/models", "readOnly": True}]
    assert group["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "serve-app-models"


def test_a_manifest_whose_pods_cannot_hold_the_replicas_is_refused(capsys, tmp_path):
    config = {"applications": [{"name": "x", "import_path": "serve_app.app:build_app", "args": {"models": [TINY]},
                                "deployments": [{"name": "model-tiny", "ray_actor_options": {"num_cpus": 64}}]}]}
    code, _, err = run_cli(capsys, "kuberay", write(tmp_path, config))
    assert_one_line_error(code, err, "no room for x/model-tiny#0 (64 CPU, 0 GPU)")


def test_shipped_configs_are_listed_and_usable_by_name_from_anywhere(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    code, out, _ = run_cli(capsys, "configs")
    assert code == 0 and {line.split()[0] for line in out.splitlines()} == {"local", "fractional_gpu", "multi_gpu",
                                                                                  "vllm_cpu", "vllm_multi_gpu"}
    for name in ("local", "local.yaml", "configs/local.yaml"):
        code, out, err = run_cli(capsys, "build", name)
        assert code == 0, err
        assert yaml.safe_load(out)["applications"][0]["args"]["models"][0]["name"] == "smollm2-135m-instruct"


def test_submitting_a_shipped_config_from_outside_a_checkout_uploads_it_alone(monkeypatch, tmp_path):
    from serve_app.ops.jobs import job_request
    from serve_app.ops.serve_config import resolve_config

    monkeypatch.chdir(tmp_path)
    entrypoint, runtime_env = job_request(resolve_config("local"), ".")
    assert entrypoint == "python -m serve_app.job local.yaml"
    uploaded = Path(runtime_env["working_dir"])
    assert sorted(p.name for p in uploaded.iterdir()) == ["local.yaml"] and uploaded != tmp_path
    (tmp_path / "mine.yaml").write_text("models: []\n")
    assert job_request("mine.yaml", ".") == ("python -m serve_app.job mine.yaml",
                                              {"working_dir": str(tmp_path), "excludes": UPLOAD_EXCLUDES})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(CliError, match="must be inside the working dir"):
        job_request(str(tmp_path / "mine.yaml"), str(elsewhere))


@pytest.mark.slow
def test_the_wheel_carries_the_configs_and_the_job(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    [wheel] = tmp_path.glob("serve_app-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"serve_app/configs/local.yaml", "serve_app/configs/multi_gpu.yaml", "serve_app/job.py"} <= names
