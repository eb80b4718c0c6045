"""`.ci/setup`: bad input is one line; in a fresh copy of the checkout it makes .venv from a
stock Python and README's commands run through it (slow: installs from PyPI)."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup(cwd, python, timeout=60):
  return subprocess.run(["bash", ".ci/setup"], cwd=cwd, capture_output=True, text=True,
                        env={**os.environ, "PYTHON": python}, timeout=timeout, check=False)


def test_a_missing_python_is_one_line():
  result = _setup(ROOT, "/nonexistent/python3")
  assert result.returncode == 2
  assert result.stderr == ("error: PYTHON=/nonexistent/python3 not found: install Python "
                           ">= 3.11 or set PYTHON to one\n")


def _stock_python() -> str:
  """Debian's or Ubuntu's own python3 where it refuses pip installs outside a venv (PEP
  668), else the Python these tests run on."""
  debian = "/usr/bin/python3"
  marker = ("import os, sysconfig; print(os.path.exists(os.path.join("
            "sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))")
  if os.path.exists(debian) and subprocess.run(
      [debian, "-c", marker], capture_output=True, text=True, check=False).stdout.strip() == "True":
    return debian
  return getattr(sys, "_base_executable", sys.executable)


def _fresh_copy(dest: pathlib.Path) -> None:
  """The checkout as a fresh clone of it would hold it, with uncommitted edits: tracked
  and not-ignored files only (no .venv, no logs)."""
  files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
  for name in filter(None, files):
    src = ROOT / name
    if src.is_file():
      (dest / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, dest / name)


@pytest.mark.slow
def test_fresh_checkout_installs_and_trains_through_its_venv(tmp_path):
  if shutil.which("git") is None:
    pytest.skip("needs git to list the checkout's files")
  checkout = tmp_path / "hggjax"
  _fresh_copy(checkout)
  result = _setup(checkout, _stock_python(), timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  venv_python = checkout / ".venv" / "bin" / "python"
  assert venv_python.exists()
  # README's first command, shortened: the installed package trains from the venv.
  run = subprocess.run(
      [str(venv_python), "-m", "train.cifar", "--dataset", "synthetic", "--steps", "2",
       "--devices", "2", "--batch-size", "8", "--eval-batch-size", "8", "--no-checkpoint",
       "--no-profile", "--log-dir", str(tmp_path / "run")],
      cwd=checkout, capture_output=True, text=True, timeout=900, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "final test accuracy" in run.stdout
  # A second setup keeps the venv.
  again = _setup(checkout, _stock_python(), timeout=900)
  assert again.returncode == 0 and venv_python.exists(), again.stderr[-3000:]
