"""``infl-train`` over two processes (jax.distributed, gloo collectives on CPU, one device each) against the
one-process run: the same server parameters, a resume across both processes, and one-line errors for bad
distributed flags (docs/design.md, "Multi-host simulation")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from infl_jax.main import main

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")
ocp = pytest.importorskip("orbax.checkpoint")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 5 IID clients, 3 of them sampled per round: on two devices the client axis is padded to 6, process 0
# holding clients 0-2 and process 1 clients 3-4 and the padding client.
SETTINGS = ["--label-key", "cell_type", "--n-clients", "5", "--client-fraction", "0.6", "--model", "mlp",
            "--hidden", "16", "--batch-size", "16", "--local-epochs", "1", "--no-central-baseline",
            "--checkpoint-every", "1"]
LAUNCH_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tiny_h5ad(tmp_path_factory):
  rng = np.random.default_rng(0)
  n, genes, types = 150, 24, 3  # 22 validation and 30 test samples: one inference shape (32 rows)
  y = np.arange(n) % types
  x = (rng.normal(0, 1.5, size=(types, genes))[y] + rng.normal(size=(n, genes))).astype(np.float32)
  obs = pd.DataFrame({"cell_type": pd.Categorical([f"type{c}" for c in y])}, index=[f"c{i}" for i in range(n)])
  path = tmp_path_factory.mktemp("data") / "tiny.h5ad"
  anndata.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(genes)])).write_h5ad(path)
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two(args: list[str]) -> list[subprocess.Popen]:
  """Starts ``infl-train ARGS`` as processes 0 and 1 of a two-process run on 127.0.0.1."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  address = f"127.0.0.1:{_free_port()}"
  procs = []
  try:
    for i in range(2):
      cmd = [sys.executable, "-m", "infl_jax.main", *args, "--coordinator-address", address, "--num-processes", "2",
             "--process-id", str(i)]
      procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True))
  except BaseException:
    _kill(procs)
    raise
  return procs


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
  """(exit code, stdout, stderr) of each process; kills both if either runs past the time limit."""
  try:
    outputs = [p.communicate(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
  finally:
    _kill(procs)


def _kill(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def _params(workdir, step: int) -> list[np.ndarray]:
  """The server parameters of checkpoint ``step``, read on this process's one device whatever wrote them."""
  import jax

  manager = ocp.CheckpointManager(os.path.abspath(workdir / "checkpoints"))
  try:
    tree = manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract, fallback_sharding=device)))["state"]
  finally:
    manager.close()
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(state["state"]["params"])]


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
  assert len(a) == len(b) > 0
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
def test_two_processes_compute_the_one_process_rounds_and_resume_across_both(tiny_h5ad, tmp_path):
  common = ["--dataset", str(tiny_h5ad), *SETTINGS]
  single, multi = tmp_path / "single", tmp_path / "multi"
  # Round 1 over two processes (started first: the one-process run here uses the core they leave idle),
  # then both restarted with --resume for round 2.
  started = _start_two([*common, "--rounds", "1", "--key-seed", "3", "--workdir", str(multi)])
  try:
    assert main([*common, "--rounds", "2", "--key-seed", "3", "--workdir", str(single)]) == 0
  finally:
    first = _finish(started)
  assert [code for code, _, _ in first] == [0, 0], [err[-3000:] for _, _, err in first]
  # Process 0 alone reports (gloo's own connection line goes to stdout in both).
  assert "test metrics after 1 rounds" in first[0][1] and "test metrics" not in first[1][1]
  assert "created a new secret key" in first[0][2] and "created a new secret key" not in first[1][2]
  assert _max_diff(_params(multi, 1), _params(single, 1)) < 1e-5
  assert [row["step"] for row in _metrics(multi)] == [1]

  second = _finish(_start_two([*common, "--rounds", "2", "--resume", "--workdir", str(multi)]))
  assert [code for code, _, _ in second] == [0, 0], [err[-3000:] for _, _, err in second]
  assert "test metrics after 2 rounds" in second[0][1] and "test metrics" not in second[1][1]
  moved = _max_diff(_params(single, 2), _params(single, 1))
  assert moved > 1e-4  # round 2 did train (10x the tolerance below)
  assert _max_diff(_params(multi, 2), _params(single, 2)) < 1e-5
  got, want = _metrics(multi), _metrics(single)
  assert [row["step"] for row in got] == [1, 2]
  for g, w in zip(got, want):
    assert g["num_sampled"] == w["num_sampled"] == 3 and g["num_accepted"] == w["num_accepted"]
    np.testing.assert_allclose(g["train_loss"], w["train_loss"], rtol=1e-5)
  summary = json.loads((multi / "summary.json").read_text())
  want_summary = json.loads((single / "summary.json").read_text())
  assert summary["rounds"] == 2 and summary["key"]["fingerprint"] == want_summary["key"]["fingerprint"]
  np.testing.assert_allclose(summary["test"]["right_key"]["accuracy"], want_summary["test"]["right_key"]["accuracy"])


@pytest.mark.parametrize("flags, expected", [
    (["--coordinator-address", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in 0..1"),
    (["--coordinator-address", "127.0.0.1", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator-address", "127.0.0.1:99999", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--num-processes", "2"], "add --coordinator-address, --process-id"),
    (["--coordinator-address", "127.0.0.1:1234", "--num-processes", "0", "--process-id", "0"],
     "--num-processes must be >= 1"),
])
def test_bad_distributed_flags_give_one_line_and_exit_2(tiny_h5ad, tmp_path, capsys, flags, expected):
  workdir = tmp_path / "run"
  assert main(["--dataset", str(tiny_h5ad), *SETTINGS, "--rounds", "1", "--workdir", str(workdir), *flags]) == 2
  err = capsys.readouterr().err.strip()
  assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert not workdir.exists()  # refused before anything was written
