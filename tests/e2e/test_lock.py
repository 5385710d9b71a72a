"""`make lock`, the one command that refreshes the locks, has the committed locks as its fixed
point: run over them it changes nothing, so they resolve `pyproject.toml` as it stands (a
dependency added, dropped or re-pinned without relocking shows up as a diff). It keeps locked
versions, so a release the registry backfills before LOCK_DATE cannot move them."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ("cpu.lock", "cuda.lock", "model.lock", "shared-versions.txt")

pytestmark = pytest.mark.slow


def test_make_lock_over_the_committed_locks_changes_nothing(tmp_path):
    for name in LOCKS:
        shutil.copy(ROOT / "requirements" / name, tmp_path / name)
    done = subprocess.run(["make", "lock", f"LOCK_DIR={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in LOCKS:
        made = (tmp_path / name).read_text().replace(str(tmp_path), "requirements")  # "via -c <dir>/..."
        assert made == (ROOT / "requirements" / name).read_text(), name
