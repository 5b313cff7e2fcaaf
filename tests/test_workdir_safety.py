"""A workdir two runs cannot corrupt, and clear errors for workdir and key-file inputs (docs/design.md,
"Run folders").

The workdir's lock: a second run on a folder in use is refused (exit 2, one line naming the first run),
never taking anything of the first run's back; the lock of a killed run is taken over. Bad --workdir and
--key-file values: exit 2, one line naming the path and the fix in the CLI's words, no traceback, the
folder (and the key file's path) as they were. A run that fails on its data makes no key and says
nothing about one.

Two real processes race in one test (the run that gets the lock waits at a gate until the other has been
refused, so the outcome does not depend on timing); the stale lock is a killed process's. The rest run
the CLIs in-process; three of them train a tiny model for one round (seconds, compile cache shared).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from cli_cases import entries, exit_status, one_line_error, write_small_h5ad
from infl_jax import keys as keylib
from infl_jax import main as infl
from lsanet_jax import main as lsanet
from runkit.cli import LOCK_NAME, locked_run

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--label-key", "cell", "--client-key", "site", "--no-central-baseline", "--rounds", "1", "--hidden", "8",
        "--batch-size", "8"]
LSANET = ["--flag", "digits", "--epochs", "1"]
WAIT_S = 240


@pytest.fixture(scope="module")
def good_h5ad(tmp_path_factory):
  pytest.importorskip("anndata")
  return write_small_h5ad(tmp_path_factory.mktemp("h5ad") / "good.h5ad", label="cell")


@pytest.fixture
def user_folder(tmp_path):
  """A workdir that already holds the user's own files, which no refused run may touch."""
  w = tmp_path / "w"
  (w / "notes").mkdir(parents=True)
  (w / "notes" / "plan.txt").write_text("mine")
  return w


@contextlib.contextmanager
def read_only(folder: pathlib.Path):
  """``folder`` unwritable for everyone, root included: root ignores permission bits, not the immutable
  attribute (chattr +i, on ext4 and most Linux file systems, as in CI)."""
  if os.geteuid() != 0:
    folder.chmod(0o555)
    try:
      yield folder
    finally:
      folder.chmod(0o755)
    return
  subprocess.run(["chattr", "+i", str(folder)], check=True, capture_output=True)
  try:
    yield folder
  finally:
    subprocess.run(["chattr", "-i", str(folder)], check=True, capture_output=True)


def _env(tmp_path) -> dict:
  # The conftest's compile cache is shared with the subprocesses: they compile the same round.
  keep = ("INFL_JAX_CACHE_DIR", "XLA_FLAGS")
  return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path),
          **{k: os.environ[k] for k in keep if k in os.environ}}


def _wait_for(predicate, what: str):
  deadline = time.monotonic() + WAIT_S
  while not predicate():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The lock


# infl-train, whose run waits at a gate once it holds the workdir (its key file already made) until GO exists.
GATED = """
import os, sys, time
from infl_jax import main
real = main.train_and_evaluate
def gated(*args, **kwargs):
  open(os.environ["READY"], "w").close()
  while not os.path.exists(os.environ["GO"]):
    time.sleep(0.05)
  return real(*args, **kwargs)
main.train_and_evaluate = gated
sys.exit(main.main(sys.argv[1:]))
"""


def test_two_runs_started_at_once_on_one_new_workdir(good_h5ad, tmp_path):
  workdir = tmp_path / "runs" / "x"
  env = dict(_env(tmp_path), READY=str(tmp_path / "ready"), GO=str(tmp_path / "go"))
  argv = [sys.executable, "-c", GATED, "--dataset", str(good_h5ad), *TINY, "--workdir", str(workdir)]
  procs = [subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  try:
    # One holds the workdir and waits at the gate; the other must be refused meanwhile.
    _wait_for(lambda: ((tmp_path / "ready").exists() and any(p.poll() is not None for p in procs))
              or all(p.poll() is not None for p in procs), "the refusal")
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    out, err = loser.communicate()
    assert loser.returncode == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert re.fullmatch(rf"error: --workdir {re.escape(str(workdir))} is in use by another run \(pid {winner.pid} on "
                        rf"host {re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\); wait "
                        r"for it to finish or choose another --workdir", lines[0]), lines[0]
    # The refused run took back nothing of the winner's: its key file is there, the folder too.
    key_file = workdir / infl.DEFAULT_KEY_NAME
    assert key_file.is_file() and (workdir / LOCK_NAME).is_file()
    made = key_file.read_bytes()
    (tmp_path / "go").touch()
    out, err = winner.communicate(timeout=WAIT_S)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert winner.returncode == 0, err[-3000:]
  assert "created a new secret key" in err and "in use" not in err
  assert key_file.read_bytes() == made
  key = keylib.load_key(key_file)
  assert json.loads((workdir / "summary.json").read_text())["key"]["fingerprint"] == key.fingerprint
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows] == [1]  # one run's rows only
  assert not (workdir / LOCK_NAME).exists()  # the lock file goes with the run
  assert sorted(p.name for p in workdir.parent.iterdir()) == ["x"]  # no staging folder left beside it


@pytest.mark.parametrize("cli", ["infl", "lsanet"])
@pytest.mark.parametrize("existing", [True, False], ids=["existing-workdir", "new-workdir"])
def test_a_run_is_refused_while_another_holds_the_workdir(good_h5ad, user_folder, tmp_path, capsys, cli, existing):
  workdir = user_folder if existing else tmp_path / "new"
  main, argv = ((infl.main, ["--dataset", str(good_h5ad), *TINY]) if cli == "infl" else (lsanet.main, LSANET))
  with locked_run(workdir, resume=False):
    before = entries(workdir)
    assert exit_status(main, [*argv, "--workdir", str(workdir)]) == 2
    one_line_error(capsys, f"--workdir {workdir} is in use by another run (pid {os.getpid()} on host "
                   f"{socket.gethostname()}, started ", "); wait for it to finish or choose another --workdir")
    assert entries(workdir) == before
  # The holder's run ended (without writing anything): its lock file goes with it.
  assert entries(workdir) == (["notes", "notes/plan.txt"] if existing else [])


HOLD = """
import sys, time
from runkit.cli import locked_run
with locked_run(sys.argv[1], resume=False):
  print("locked", flush=True)
  time.sleep(600)
"""


def test_the_lock_of_a_killed_run_is_taken_over(good_h5ad, tmp_path, capsys):
  workdir = tmp_path / "x"
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], env=_env(tmp_path), stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    assert json.loads((workdir / LOCK_NAME).read_text())["pid"] == holder.pid
    assert exit_status(infl.main, ["--dataset", str(good_h5ad), *TINY, "--workdir", str(workdir)]) == 2
    one_line_error(capsys, f"pid {holder.pid}")  # held: refused
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert (workdir / LOCK_NAME).exists()  # the killed run's lock file stays, its lock does not
  assert infl.main(["--dataset", str(good_h5ad), *TINY, "--workdir", str(workdir)]) == 0
  err = capsys.readouterr().err
  assert "in use" not in err and "error:" not in err
  key = keylib.load_key(workdir / infl.DEFAULT_KEY_NAME)
  # Case 5's other half: a run that keeps its key says so, with the key's fingerprint.
  assert f"created a new secret key in {workdir / infl.DEFAULT_KEY_NAME}" in err and key.fingerprint in err
  assert (workdir / "summary.json").is_file() and not (workdir / LOCK_NAME).exists()


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
  from runkit import cli

  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(cli.fcntl, "flock", no_locks)
  with locked_run(tmp_path / "w", resume=False) as workdir:
    (workdir / "metrics.jsonl").write_text("{}\n")
  assert entries(tmp_path / "w") == ["metrics.jsonl"]
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"warning: --workdir {tmp_path / 'w'}: its file system offers no locks (No locks available); "
                 "nothing stops a second run there"]


# ---------------------------------------------------------------------------------------------
# Bad --workdir values


@pytest.mark.parametrize("cli", ["infl", "lsanet"])
def test_an_empty_workdir_is_refused(good_h5ad, tmp_path, monkeypatch, capsys, cli):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  (cwd / "mine.txt").write_text("mine")
  monkeypatch.chdir(cwd)
  main, argv = ((infl.main, ["--dataset", str(good_h5ad), *TINY]) if cli == "infl" else (lsanet.main, LSANET))
  assert exit_status(main, [*argv, "--workdir", ""]) == 2
  assert one_line_error(capsys) == "error: --workdir is empty; name a folder for the run"
  assert entries(cwd) == ["mine.txt"]


@pytest.mark.parametrize("cli", ["infl", "lsanet"])
def test_a_workdir_that_is_a_file_is_refused(good_h5ad, tmp_path, capsys, cli):
  main, argv = ((infl.main, ["--dataset", str(good_h5ad), *TINY]) if cli == "infl" else (lsanet.main, LSANET))
  a_file = tmp_path / "results.txt"
  a_file.write_text("mine")
  assert exit_status(main, [*argv, "--workdir", str(a_file)]) == 2
  one_line_error(capsys, f"--workdir {a_file} is a file, not a folder; choose another --workdir")
  assert exit_status(main, [*argv, "--workdir", str(a_file / "run")]) == 2
  one_line_error(capsys, f"--workdir {a_file / 'run'} lies under {a_file}, which is a file", "choose another --workdir")
  assert entries(tmp_path) == ["results.txt"] and a_file.read_text() == "mine"


@pytest.mark.parametrize("cli", ["infl", "lsanet"])
def test_a_read_only_workdir_is_refused(good_h5ad, user_folder, tmp_path, capsys, cli):
  main, argv = ((infl.main, ["--dataset", str(good_h5ad), *TINY]) if cli == "infl" else (lsanet.main, LSANET))
  before = entries(user_folder)
  with read_only(user_folder):
    assert exit_status(main, [*argv, "--workdir", str(user_folder)]) == 2
    one_line_error(capsys, f"--workdir {user_folder} is not writable (", "make it writable or choose another --workdir")
    new = user_folder / "runs" / "x"  # a new folder where none can be made
    assert exit_status(main, [*argv, "--workdir", str(new)]) == 2
    one_line_error(capsys, f"cannot create --workdir {new}: {user_folder} is not writable (",
                   "choose another --workdir")
  assert entries(user_folder) == before


# ---------------------------------------------------------------------------------------------
# Bad --key-file values: the workdir is new, so a refused run must leave no folder at all


def _refused_key_file(good_h5ad, tmp_path, capsys, key_file, *needles, extra=()):
  workdir = tmp_path / "runs" / "x"
  argv = ["--dataset", str(good_h5ad), *TINY, "--workdir", str(workdir), "--key-file", str(key_file), *extra]
  assert infl.main(argv) == 2
  line = one_line_error(capsys, *needles)
  assert "overwrite=True" not in line and "save_key" not in line and ".tmp" not in line
  assert not (tmp_path / "runs").exists()
  return line


def test_a_key_file_that_is_a_folder_is_refused(good_h5ad, tmp_path, capsys):
  keys = tmp_path / "keys"
  keys.mkdir()
  _refused_key_file(good_h5ad, tmp_path, capsys, keys, f"--key-file {keys} is a folder, not a key file",
                    f"e.g. --key-file {keys / infl.DEFAULT_KEY_NAME}")
  assert entries(keys) == []


def test_a_key_file_in_a_read_only_folder_is_refused(good_h5ad, tmp_path, capsys):
  keys = tmp_path / "keys"
  keys.mkdir()
  with read_only(keys):
    _refused_key_file(good_h5ad, tmp_path, capsys, keys / "site.key",
                      f"cannot write --key-file {keys / 'site.key'}: {keys} is not writable (",
                      "point --key-file to a writable folder")
  assert entries(keys) == []


def test_a_key_file_that_is_a_broken_link_is_refused_in_the_clis_words(good_h5ad, tmp_path, capsys):
  link = tmp_path / "site.key"
  link.symlink_to(tmp_path / "gone" / "site.key")
  _refused_key_file(good_h5ad, tmp_path, capsys, link, f"--key-file {link} is a broken symbolic link",
                    "--overwrite-key")
  assert link.is_symlink() and os.readlink(link) == str(tmp_path / "gone" / "site.key")
  # A run that replaced the link (--overwrite-key) and then failed on its data puts the link back.
  _refused_key_file(good_h5ad, tmp_path, capsys, link, "celltype", extra=["--overwrite-key", "--label-key",
                                                                          "celltype"])
  assert link.is_symlink() and os.readlink(link) == str(tmp_path / "gone" / "site.key")


def test_an_empty_key_file_argument_is_refused(good_h5ad, tmp_path, capsys):
  _refused_key_file(good_h5ad, tmp_path, capsys, "", "--key-file is empty; name a file for the key")


# ---------------------------------------------------------------------------------------------
# The "created a new secret key" line


def test_a_run_that_fails_on_its_data_makes_no_key_and_says_nothing_of_one(good_h5ad, tmp_path, capsys):
  workdir = tmp_path / "runs" / "x"
  argv = ["--dataset", str(good_h5ad), *TINY, "--label-key", "celltype", "--workdir", str(workdir)]
  assert infl.main(argv) == 2
  one_line_error(capsys, "celltype", "--label-key")  # and no "created a new secret key" line
  assert not (tmp_path / "runs").exists()


def test_a_run_interrupted_after_its_first_checkpoint_still_names_its_new_key(good_h5ad, tmp_path, monkeypatch,
                                                                              capsys):
  real = infl.train_and_evaluate

  def interrupted(*args, **kwargs):  # Ctrl-C once round 1 is checkpointed
    real(*args, **{**kwargs, "stop_after_round": 1})
    raise KeyboardInterrupt

  monkeypatch.setattr(infl, "train_and_evaluate", interrupted)
  workdir = tmp_path / "x"
  argv = ["--dataset", str(good_h5ad), *TINY, "--rounds", "2", "--checkpoint-every", "1", "--workdir", str(workdir)]
  assert infl.main(argv) == 130
  err = capsys.readouterr().err.strip().splitlines()
  key = keylib.load_key(workdir / infl.DEFAULT_KEY_NAME)
  assert err[-2].startswith(f"created a new secret key in {workdir / infl.DEFAULT_KEY_NAME}")
  assert key.fingerprint in err[-2]
  assert err[-1].startswith("interrupted: rerun with --resume")
  assert not (workdir / LOCK_NAME).exists()
