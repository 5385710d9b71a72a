"""`make lock`, the one command that refreshes the locks, reproduces the committed ones from
pyproject.toml (nothing uploaded after LOCK_DATE is considered, so this holds on any later day)."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_make_lock_reproduces_the_committed_locks(tmp_path):
    done = subprocess.run(["make", "lock", f"LOCK_DIR={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("cpu.lock", "cuda.lock", "model.lock", "shared-versions.txt"):
        made = (tmp_path / name).read_text().replace(str(tmp_path), "requirements")  # "via -c <dir>/..."
        assert made == (ROOT / "requirements" / name).read_text(), name
