"""`serve-app submit`: run `python -m serve_app.job CONFIG` as a Ray job, the working dir uploaded
with it (never virtualenvs or secrets)."""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path
from typing import Any

from serve_app.config import read_yaml
from serve_app.ops import CliError
from serve_app.ops.dashboard import use_local_token
from serve_app.ops.serve_config import serve_config, shipped_configs_dir

ENTRYPOINT = "serve_app.job"  # `python -m serve_app.job CONFIG` (cluster/job_entrypoint.py is the same)


# Never uploaded with a job's working dir (virtualenvs alone can be gigabytes), whatever
# .gitignore says: secrets (env files, keys, certificates, cloud credentials) stay on this machine.
UPLOAD_EXCLUDES = [".venv", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".mypy_cache",
                   ".ruff_cache", "bench/out",
                   ".env", ".env.*", "**/.env", "**/.env.*", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks",
                   "*.keystore", "id_rsa*", "id_ed25519*", "id_ecdsa*", ".netrc", ".npmrc", ".pypirc",
                   ".aws", ".ssh", ".gnupg", ".docker", ".kube", "*credentials*.json", "*.tfstate", "*.tfvars"]


BATCH_ENTRYPOINT = "serve_app.bulk.job"  # `python -m serve_app.bulk.job CONFIG --input IN --output OUT`


def job_request(config: str, working_dir: str, batch: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    """The entrypoint and runtime_env: the working dir travels with the job (uploaded to the head).
    A shipped config (`serve-app configs`) outside the working dir travels alone, in a folder of
    its own: the cluster's own serve_app (its image) serves it."""
    root, path = Path(working_dir).resolve(), Path(config).resolve()
    try:
        relative = path.relative_to(root)
    except ValueError:
        if path.parent != shipped_configs_dir().resolve():
            raise CliError(f"config {config} must be inside the working dir {root} (it is uploaded with it)") from None
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="serve-app-job-"))
        relative = Path(path.name)
        (root / relative).write_text(path.read_text())
    # `python` is the cluster's interpreter, not ours: the job runs on the head node.
    module, extra = (ENTRYPOINT, []) if batch is None else (BATCH_ENTRYPOINT, batch)
    entrypoint = shlex.join(["python", "-m", module, relative.as_posix(), *extra])
    return entrypoint, {"working_dir": str(root), "excludes": UPLOAD_EXCLUDES}


async def follow_logs(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def submit_job(config: str, address: str, working_dir: str, wait: bool = True, batch: list[str] | None = None) -> int:
    """Submit the job (a bad config fails here, not minutes later on the cluster), print its id,
    and with `wait` follow its logs; the exit code says whether it succeeded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    serve_config(read_yaml(config))
    entrypoint, runtime_env = job_request(config, working_dir, batch)
    print(f"uploading {runtime_env['working_dir']} (without virtualenvs, .git, caches, .env files, keys and "
          f"certificates) to run `{entrypoint}`", file=sys.stderr, flush=True)
    use_local_token()
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(job_id, flush=True)
    if not wait:
        return 0
    asyncio.run(follow_logs(client, job_id))
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1
