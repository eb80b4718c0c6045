"""README's Python examples run as written (each in a fresh interpreter), and CI runs the
commands README gives."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def _commands(script: str) -> list[str]:
  """The shell commands of `script`, comments and blank lines dropped."""
  return [c for c in (line.split("#")[0].strip() for line in script.splitlines()) if c]


def test_readme_has_examples():
  assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
  result = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


def test_ci_runs_the_commands_readme_gives():
  install, test = _commands(re.findall(r"```bash\n(.*?)```", README, re.S)[0])
  setup, train = install.split(" && ")
  assert setup == "bash .ci/setup"
  # Both run in the environment setup makes, never in whatever python3 comes first.
  assert train.split()[0] == test.split()[0] == ".venv/bin/python"
  ci = _commands((ROOT / ".ci" / "run").read_text())
  assert ci[-2:] == [setup, test], ci
