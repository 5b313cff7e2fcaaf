"""How a run fails: one line on stderr, no traceback from any thread, exit 2 (130 for Ctrl-C), and the
workdir as it was (docs/design.md, "One round, step by step": checkpoints and failures).

The cases users hit: a resume told to stop before the rounds it has done; counts that overflow JAX's int32;
a model too large for the machine (refused before XLA aborts the process); a full disk while a checkpoint
is written (a real one, a small tmpfs in a private mount namespace, where the tests may mount one; else
orbax's save fails with TensorStore's full-disk error); Ctrl-C while checkpoints are being written, then
--resume; a truncated or garbled checkpoint. Runs that train are ``infl-train`` in subprocesses (what a user
sees, threads and interpreter exit included) on a 60-cell file with a width-8 MLP; refusals that come before
training run in this process.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from infl_jax import main as infl
from lsanet_jax import main as lsanet
from runkit.errors import UserInputError

REPO = pathlib.Path(__file__).resolve().parents[1]
# infl-train with Python's own SIGINT handler: a process started in the background of a shell inherits an
# ignored SIGINT, which the interpreter would keep.
CLI = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
       "from infl_jax.main import main; sys.exit(main(sys.argv[1:]))")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}  # keeps the tests' compilation cache
# Lines a run may print besides its error: the key's notes (--key-seed).
NOTES = ("note: ", "created a new secret key")


@pytest.fixture(autouse=True)
def no_user_compilation_cache(monkeypatch):
  # In-process runs keep out of the user's cache (subprocesses use the tests' own, tests/conftest.py).
  monkeypatch.setenv("INFL_JAX_CACHE_DIR", "off")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
  import anndata
  import pandas as pd
  rng = np.random.default_rng(0)
  obs = pd.DataFrame({"cell": rng.choice(["B", "T"], 60), "site": rng.choice(["a", "b"], 60)},
                     index=[f"c{i}" for i in range(60)])
  path = tmp_path_factory.mktemp("data") / "good.h5ad"
  anndata.AnnData(X=rng.normal(size=(60, 12)).astype(np.float32), obs=obs).write_h5ad(path)
  return path


def settings(dataset: pathlib.Path) -> list[str]:
  return ["--dataset", str(dataset), "--label-key", "cell", "--client-key", "site", "--no-central-baseline",
          "--hidden", "8", "--checkpoint-every", "1"]


def infl_train(args, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                        env=ENV, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def finished_run(dataset, tmp_path_factory) -> pathlib.Path:
  """A finished 3-round run with a checkpoint after every round (rounds 1-3 kept)."""
  workdir = tmp_path_factory.mktemp("finished") / "w"
  done = infl_train(settings(dataset) + ["--rounds", "3", "--key-seed", "7", "--workdir", workdir])
  assert done.returncode == 0, done.stderr[-3000:]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2", "3"]
  return workdir


def copy_of(run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  workdir = tmp_path / "w"
  shutil.copytree(run, workdir, symlinks=True)
  return workdir


def snapshot(folder: pathlib.Path) -> dict[str, str]:
  """Every path under ``folder`` with its content's hash (folders: "dir")."""
  return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*"))}


def error_line(stderr: str) -> str:
  """The run's one error line, after checking that nothing else was said (no thread's traceback, no orbax
  log, no report of an abandoned read)."""
  for noise in ("Traceback", "Exception ignored", "ERROR:absl", "RuntimeWarning"):
    assert noise not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(NOTES)]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  return lines[0]


def test_resume_with_fewer_rounds_than_done_is_refused(dataset, finished_run, tmp_path):
  """It rewrote summary.json with "rounds: 1" beside a model trained for 3; as many rounds as done
  evaluates the finished run again."""
  workdir = copy_of(finished_run, tmp_path)
  before = snapshot(workdir)
  done = infl_train(settings(dataset) + ["--rounds", "1", "--resume", "--workdir", workdir])
  assert done.returncode == 2
  line = error_line(done.stderr)
  assert f"the run in {workdir} has done 3 rounds; --rounds 1 would go back; pass --rounds 3 or more" in line
  assert snapshot(workdir) == before

  again = infl_train(settings(dataset) + ["--rounds", "3", "--resume", "--workdir", workdir])
  assert again.returncode == 0, again.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["rounds"] == summary["config"]["rounds"] == 3
  assert summary["test"] == json.loads((finished_run / "summary.json").read_text())["test"]


def exit_status(main, argv) -> int:
  try:
    return main(argv)
  except SystemExit as e:
    return e.code


@pytest.mark.parametrize("main, argv, flag", [
    (infl.main, ["--rounds", "1000000000000"], "--rounds"),
    (infl.main, ["--hidden", "64,4000000000"], "--hidden"),
    (infl.main, ["--local-epochs", "3000000000"], "--local-epochs"),
    (infl.main, ["--batch-size", "10000000000"], "--batch-size"),
    (infl.main, ["--n-top-features", "2147483648"], "--n-top-features"),
    (infl.main, ["--key-version", "2147483648"], "--key-version"),
    (infl.main, ["--eval-every", "99999999999"], "--eval-every"),
    (lsanet.main, ["--flag", "digits", "--epochs", "10000000000"], "--epochs"),
    (lsanet.main, ["--flag", "digits", "--batch-size", "2147483648"], "--batch-size"),
    (lsanet.main, ["--flag", "digits", "--lsa-dim", "99999999999"], "--lsa-dim"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("--") else None)
def test_counts_beyond_int32_are_refused_with_the_bound(tmp_path, capsys, main, argv, flag):
  """--rounds 1000000000000 overflowed int32 inside JAX (a 43-line traceback)."""
  workdir = tmp_path / "w"
  assert exit_status(main, argv + ["--workdir", str(workdir)]) == 2
  line = error_line(capsys.readouterr().err)
  assert line.startswith(f"error: {flag} must") and "<= 2147483647" in line, line
  assert not workdir.exists()


@pytest.mark.parametrize("existing", [True, False], ids=["existing-workdir", "new-workdir"])
def test_a_model_too_large_for_the_machine_is_refused_before_xla(dataset, tmp_path, capsys, existing):
  """--hidden 4000000000 (now also beyond int32) made XLA abort with a C++ stack trace, exit 134, leaving the
  key, an empty metrics.jsonl and checkpoints/ behind, so that a correct rerun there was refused."""
  workdir = tmp_path / "w"
  if existing:
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
  before = snapshot(workdir) if existing else None
  argv = settings(dataset) + ["--hidden", "2000000000", "--rounds", "1", "--key-seed", "3", "--workdir", str(workdir)]
  assert exit_status(infl.main, argv) == 2
  line = error_line(capsys.readouterr().err)
  assert line.startswith("error: --hidden 2000000000 needs about ") and (
      " TB of memory, mostly for parameters and optimizer state (2 clients training at once), and this " in line)
  assert re.search(r" training at once\), and this \w+ has \d", line) and line.endswith(
      "; choose a smaller --hidden (or fewer clients per round: --client-fraction)"), line
  if existing:
    assert snapshot(workdir) == before  # no key file: a rerun with --key-seed may start
  else:
    assert not workdir.exists()


def memory_needed(monkeypatch, dataset, features, clients, limit, chunk=None, **overrides):
  """None if a classification run of ``dataset``'s preset (``overrides`` on top) over ``clients`` (sample
  counts) with ``features`` inputs may start on a machine of ``limit`` bytes, else the refusal; nothing is
  allocated."""
  import jax

  from infl_jax.config import TrainConfig
  from infl_jax.federated import algorithm_from_config
  from infl_jax.federated.sharding import ClientSource
  from infl_jax.tasks import classification, common

  monkeypatch.setattr(common, "memory_available", lambda: (limit, "this machine has"))
  config = TrainConfig.for_dataset(dataset, **overrides)
  model = classification.create_model(config, 2)
  algo = algorithm_from_config(config, classification.classification_task(model), client_chunk_size=chunk)
  rng = jax.random.key(0)
  try:
    classification.check_model_fits(config, model, algo, features, ClientSource(np.asarray(clients), None), rng, rng,
                                    client_chunk_size=chunk)
  except UserInputError as e:
    return str(e)
  return None


def test_the_memory_estimate_lets_the_reference_runs_start(monkeypatch):
  """Refuses clear overshoots only: the proteomics reference (5,207 inputs, 4 clients) and the generic
  200 x 10,000 file (4 sites) start on a 4 GB machine, the benchmarks' 10,000-client round in chunks of
  1,000 (6.7 GB of client data) on an 80 GB GPU; each is refused by a machine of 1 MB, naming the setting."""
  GB = 10**9
  assert memory_needed(monkeypatch, "proteomics", 5207, [28, 30, 29, 27], 4 * GB) is None
  assert memory_needed(monkeypatch, "x.h5ad", 10_000, [50] * 4, 4 * GB) is None
  assert memory_needed(monkeypatch, "proteomics", 5207, [32] * 10_000, 80 * GB, chunk=1000) is None
  refused = memory_needed(monkeypatch, "proteomics", 5207, [28, 30, 29, 27], 10**6)
  assert refused.startswith("--model proteomics on 5207 input features needs about ") and (
      " MB of memory, mostly for parameters and optimizer state (4 clients training at once), and this machine "
      "has 1.0 MB; keep fewer features (--n-top-features)") in refused
  refused = memory_needed(monkeypatch, "x.h5ad", 10_000, [50] * 4, 10**6)
  assert refused.startswith("--hidden 256,128 needs about ") and "; choose a smaller --hidden" in refused
  refused = memory_needed(monkeypatch, "x.h5ad", 10, [50] * 4, 10**9, local_epochs=10**7)
  assert refused.startswith("--local-epochs 10000000 needs about ") and "choose fewer --local-epochs" in refused


# Runs inside a private mount namespace (unshare -m): mounts an 8 MB tmpfs, copies the run onto it, fills
# the disk to the last few pages (room for the lock file and metrics.jsonl's rewrite, not for a checkpoint),
# and resumes the run there; prints what it saw as JSON.
FULL_DISK = r"""
import hashlib, json, os, pathlib, shutil, subprocess, sys
mount, source, cli = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True).returncode:
  print(json.dumps({"mounted": False}))
  sys.exit()
workdir = mount / "w"
shutil.copytree(source, workdir, symlinks=True)
stats = os.statvfs(mount)
with open(mount / "filler", "wb") as f:
  f.write(bytes(stats.f_bavail * stats.f_frsize - 16 * 1024))
snapshot = lambda: {str(p.relative_to(workdir)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted(workdir.rglob("*"))}
before = snapshot()
done = subprocess.run([sys.executable, "-c", cli, *sys.argv[4:], "--workdir", str(workdir)], capture_output=True,
                      text=True)
print(json.dumps({"mounted": True, "workdir": str(workdir), "rc": done.returncode, "stderr": done.stderr,
                  "before": before, "after": snapshot()}))
"""

# Where no tmpfs can be mounted (not root): orbax's save fails with the error TensorStore raises on a full
# disk, where runkit.checkpoint catches it.
FULL_DISK_INJECTED = r"""
import signal, sys
import orbax.checkpoint as ocp
real_save = ocp.CheckpointManager.save
def save(self, step, *args, **kwargs):
  if step == 4:
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "state" in OCDBT database at local file "x": Failed to write '
                     "970752 bytes to file 4: No space left on device [os_error_code='28']")
  return real_save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
signal.signal(signal.SIGINT, signal.default_int_handler)
from infl_jax.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(dataset, finished_run, tmp_path):
  """Orbax printed hundreds of lines (its threads' tracebacks and logs) and no message; now one line, the
  half-written checkpoint removed, metrics.jsonl cut back to the last complete one: the folder as it was."""
  args = settings(dataset) + ["--rounds", "4", "--resume"]
  mount = tmp_path / "disk"
  mount.mkdir()
  seen = {"mounted": False}
  if shutil.which("unshare") and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0:
    done = subprocess.run(["unshare", "-m", sys.executable, "-c", FULL_DISK, mount, finished_run, CLI, *args],
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
  if not seen["mounted"]:
    workdir = copy_of(finished_run, tmp_path)
    before = snapshot(workdir)
    done = subprocess.run([sys.executable, "-c", FULL_DISK_INJECTED, *args, "--workdir", workdir],
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    seen = {"workdir": str(workdir), "rc": done.returncode, "stderr": done.stderr, "before": before,
            "after": snapshot(workdir)}
  assert seen["rc"] == 2, seen["stderr"][-3000:]
  line = error_line(seen["stderr"])
  assert line == (f"error: no space left on device writing the checkpoint of round 4 in {seen['workdir']}/checkpoints; "
                  "free space (or move the run folder to a disk with room), then rerun with --resume")
  assert seen["after"] == seen["before"]


def checkpoint_folders(workdir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir()) if (workdir / "checkpoints").is_dir() else []


def start_infl_train(args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", CLI, *map(str, args)], cwd=REPO, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def interrupt_while_saving(args, workdir: pathlib.Path) -> tuple[int, str]:
  """Starts ``infl-train args`` in ``workdir`` and sends it a SIGINT once it is past its first checkpoint,
  as soon as a checkpoint folder is being written; returns its exit status and stderr."""
  run = start_infl_train(args + ["--workdir", workdir])
  deadline = time.monotonic() + 120
  while run.poll() is None and time.monotonic() < deadline:
    names = checkpoint_folders(workdir)
    if any(n.isdigit() for n in names) and any("orbax-checkpoint-tmp" in n for n in names):
      break
    time.sleep(0.002)
  run.send_signal(signal.SIGINT)  # (nothing, if it has finished)
  stderr = run.communicate(timeout=120)[1]
  return run.returncode, stderr


def test_ctrl_c_while_saving_then_resume_ends_as_an_uninterrupted_run(dataset, tmp_path):
  """Ctrl-C during a save printed up to 131 lines of the checkpoint threads' tracebacks and left a
  "*.orbax-checkpoint-tmp" folder. A real SIGINT, sent while a checkpoint folder is being written."""
  args = settings(dataset) + ["--rounds", "12", "--key-seed", "5"]
  reference = tmp_path / "reference"
  uninterrupted = start_infl_train(args + ["--workdir", reference])  # alongside
  try:
    for attempt in range(3):
      workdir = tmp_path / f"interrupted{attempt}"
      status, stderr = interrupt_while_saving(args, workdir)
      if status != 0:  # 0: it finished before the signal came; again
        break
    assert status == 130, stderr[-3000:]
    for noise in ("Traceback", "Exception ignored", "ERROR:absl"):
      assert noise not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(NOTES)]
    assert len(lines) == 1 and lines[0].startswith("interrupted: ") and "--resume" in lines[0], stderr[-3000:]
    folders = checkpoint_folders(workdir)
    assert folders and all(n.isdigit() for n in folders), folders  # no temporary folder left
    assert int(folders[-1]) < 12

    resumed = infl_train(settings(dataset) + ["--rounds", "12", "--resume", "--workdir", workdir])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()[-3000:]
  finally:
    if uninterrupted.poll() is None:
      uninterrupted.kill()
      uninterrupted.wait()
  rows = lambda w: (w / "metrics.jsonl").read_text().splitlines()
  assert rows(workdir) == rows(reference)  # every round's loss and validation scores, exactly
  summary = lambda w: json.loads((w / "summary.json").read_text())
  assert summary(workdir)["test"] == summary(reference)["test"]
  assert summary(workdir)["evaluated_round"] == summary(reference)["evaluated_round"]


def resume_damaged(dataset, finished_run, tmp_path, damage) -> tuple[str, pathlib.Path]:
  """Resumes a copy of the finished run whose checkpoint of round 3 ``damage`` spoilt; returns the error
  line after checking the folder is byte for byte as before."""
  workdir = copy_of(finished_run, tmp_path)
  damage(workdir / "checkpoints" / "3")
  before = snapshot(workdir)
  done = infl_train(settings(dataset) + ["--rounds", "4", "--resume", "--workdir", workdir])
  assert done.returncode == 2, done.stderr[-3000:]
  assert snapshot(workdir) == before
  return error_line(done.stderr), workdir


def test_a_truncated_checkpoint_is_one_line_not_hundreds(dataset, finished_run, tmp_path):
  """Truncated array metadata: orbax abandoned its reads of the arrays, and each abandoned read, closed when
  collected, reported "Exception ignored in: <coroutine ...>" with 60 lines of TensorStore spec (3,218
  lines in all) after the one-line error."""
  def truncate(step):
    path = step / "state" / "array_metadatas" / "process_0"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

  line, workdir = resume_damaged(dataset, finished_run, tmp_path, truncate)
  assert line.startswith(f"error: checkpoint round 3 at {workdir / 'checkpoints' / '3'} is unreadable (corrupted "
                         "or incomplete: "), line
  assert line.endswith("delete that folder to resume from the previous checkpoint (round 2), or start again in a "
                       "new --workdir"), line


def test_a_garbled_checkpoint_says_what_is_wrong(dataset, finished_run, tmp_path):
  """Data files cut to 5 bytes: the error embedded orbax's wrapper text, "<bound method pybind11_... spec of
  TensorStore({", instead of TensorStore's reason."""
  def garble(step):
    for path in (step / "state").rglob("*"):
      if path.is_file() and path.parent.name == "d":
        path.write_bytes(path.read_bytes()[:5])

  line, workdir = resume_damaged(dataset, finished_run, tmp_path, garble)
  assert "<bound method" not in line and "TensorStore" not in line, line
  reason = line.split("(corrupted or incomplete: ", 1)[1].split("); ", 1)[0]
  assert reason.startswith("Requested byte range [0, ") and reason.endswith(") is not valid for value of size 5"), line
  assert f"checkpoint round 3 at {workdir / 'checkpoints' / '3'}" in line and "(round 2)" in line
