"""The README's Python examples run as written, in order, and its test command is the one CI runs."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
  return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_python_examples_run_in_order(tmp_path):
  blocks = _blocks("python")
  assert len(blocks) >= 2
  # One interpreter for all blocks, as a reader pasting them one after the other; the run folder they
  # name ("runs/...") lands in tmp_path.
  out = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  accuracy = float(re.search(r"held-out accuracy with the key: ([0-9.]+)", out.stdout).group(1))
  assert accuracy >= 0.85  # three wine cultivars; a model that did not learn scores ~0.4
  assert (tmp_path / "runs" / "wine" / "metrics.jsonl").read_text().count("\n") == 30


def test_readme_test_command_is_what_ci_runs():
  commands = [line for block in _blocks("bash") for line in block.splitlines() if "pytest" in line]
  assert len(commands) == 1, commands
  assert commands[0].strip() in (ROOT / ".ci" / "run").read_text()
