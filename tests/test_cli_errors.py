"""Both CLIs meet bad arguments and failures cleanly: exit status 2, one line naming the flag (or the
file) and the fix, no traceback, and a workdir left as it was found.

Argument errors are refused before any data is loaded, so these run in seconds; the corrupted
checkpoint case runs lsanet-train in a subprocess with a stand-in model state (no compilation).
"""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from cli_cases import entries, exit_status, one_line_error as assert_one_line_error, write_small_h5ad
from infl_jax import main as infl
from lsanet_jax import main as lsanet

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_compilation_cache(monkeypatch):
  # The CLIs turn JAX's persistent cache on in the user's home; tests keep out of it.
  monkeypatch.setenv("INFL_JAX_CACHE_DIR", "off")


@pytest.fixture
def workdir(tmp_path):
  """A workdir with the user's own files in it, which no failed run may touch."""
  w = tmp_path / "w"
  (w / "notes").mkdir(parents=True)
  (w / "notes" / "plan.txt").write_text("mine")
  (w / "README").write_text("mine too")
  return w


@pytest.mark.parametrize("argv, flag", [
    (["--local-epochs", "-1"], "--local-epochs"),
    (["--client-fraction", "0"], "--client-fraction"),
    (["--client-fraction", "1.5"], "--client-fraction"),
    (["--batch-size", "0"], "--batch-size"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--learning-rate", "nan"], "--learning-rate"),
    (["--learning-rate", "inf"], "--learning-rate"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--rounds", "0"], "--rounds"),
    (["--rounds", "-3"], "--rounds"),
    (["--rounds", "two"], "--rounds"),
    (["--n-clients", "0"], "--n-clients"),
    (["--dropout", "1"], "--dropout"),
    (["--alpha", "0"], "--alpha"),
    (["--eval-every", "0"], "--eval-every"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--key-strength", "-1"], "--key-strength"),
    (["--server-learning-rate", "0"], "--server-learning-rate"),
    (["--weight-decay", "-1e-4"], "--weight-decay"),
    (["--hidden", "64,x"], "--hidden"),
    (["--partition", "random"], "--partition"),
    (["--key-seed", "-1"], "--key-seed"),
    (["--drift-correction", "fedsgd"], "--drift-correction"),
    (["--drift-correction", "scaffold", "--shard-clients"], "--drift-correction scaffold does not run with "
                                                            "--shard-clients"),
    (["--drift-correction", "scaffold", "--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
      "--process-id", "0"], "--drift-correction scaffold does not run over several processes"),
])
def test_infl_train_bad_arguments(workdir, capsys, argv, flag):
  before = entries(workdir)
  assert exit_status(infl.main, argv + ["--workdir", str(workdir)]) == 2
  assert_one_line_error(capsys, flag)
  assert entries(workdir) == before


@pytest.mark.parametrize("argv, flag", [
    (["--aux-stages", "9"], "--aux-stages"),
    (["--aux-stages", "0"], "--aux-stages"),
    (["--aux-stages", "two"], "--aux-stages"),
    (["--width", "0"], "--width"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--label-fraction", "0"], "--label-fraction"),
    (["--label-fraction", "2"], "--label-fraction"),
    (["--lsa-dim", "0"], "--lsa-dim"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--seed", "-1"], "--seed"),
    (["--stop-after-epochs", "0"], "--stop-after-epochs"),
    (["--size", "7"], "--size"),
    (["--variant", "plain", "--lsa"], "--lsa"),
])
def test_lsanet_train_bad_arguments(workdir, capsys, argv, flag):
  before = entries(workdir)
  assert exit_status(lsanet.main, ["--flag", "digits"] + argv + ["--workdir", str(workdir)]) == 2
  assert_one_line_error(capsys, flag)
  assert entries(workdir) == before


@pytest.fixture(scope="module")
def tiny_h5ad(tmp_path_factory):
  pytest.importorskip("anndata")
  return write_small_h5ad(tmp_path_factory.mktemp("h5ad") / "tiny.h5ad")


@pytest.mark.parametrize("existing", [True, False], ids=["existing-workdir", "new-workdir"])
@pytest.mark.parametrize("case", ["missing-file", "bad-label-key"])
def test_infl_train_failed_run_leaves_the_workdir_as_it_was(tiny_h5ad, workdir, tmp_path, capsys, case, existing):
  dataset, extra = ((tiny_h5ad.parent / "missing.h5ad", []) if case == "missing-file"
                    else (tiny_h5ad, ["--label-key", "celltype"]))
  target = workdir if existing else tmp_path / "runs" / "new"
  before = entries(workdir)
  argv = ["--dataset", str(dataset), *extra, "--rounds", "1", "--key-seed", "3", "--workdir", str(target)]
  assert infl.main(argv) == 2
  err = capsys.readouterr().err
  assert "error: " in err and "Traceback" not in err
  assert ("missing.h5ad" if case == "missing-file" else "celltype") in err
  if existing:
    assert entries(workdir) == before  # in particular no client_secret.key: a rerun with --key-seed may start
  else:
    assert not (tmp_path / "runs").exists()


def test_infl_train_failed_run_restores_a_replaced_key_file(tmp_path, capsys):
  key_file = tmp_path / "keys" / "site.key"
  key_file.parent.mkdir()
  key_file.write_bytes(b"the clients' old key")
  key_file.chmod(0o600)
  argv = ["--dataset", str(tmp_path / "missing.h5ad"), "--key-file", str(key_file), "--overwrite-key",
          "--workdir", str(tmp_path / "w")]
  assert infl.main(argv) == 2
  assert "missing.h5ad" in capsys.readouterr().err
  assert key_file.read_bytes() == b"the clients' old key" and key_file.stat().st_mode & 0o777 == 0o600
  assert not (tmp_path / "w").exists()


def test_lsanet_train_failed_run_leaves_the_workdir_as_it_was(workdir, monkeypatch, capsys):
  """A failure in the first epoch, once checkpoints/ and metrics.jsonl exist, takes them back."""
  from lsanet_jax import train
  from runkit.errors import UserInputError

  def fail(*_):
    raise UserInputError("simulated failure in the first epoch")

  # A stand-in state skips the model's compilation; the run fails before it would be used.
  monkeypatch.setattr(train, "create_train_state", lambda *a, **k: {"w": np.zeros(3, np.float32)})
  monkeypatch.setattr(train, "epoch_key", fail)
  made = []
  real_writer = train.MetricsWriter
  monkeypatch.setattr(train, "MetricsWriter", lambda *a, **k: made.append(a[0]) or real_writer(*a, **k))
  before = entries(workdir)
  assert lsanet.main(["--flag", "digits", "--epochs", "1", "--workdir", str(workdir)]) == 2
  assert_one_line_error(capsys, "simulated failure")
  assert made, "the run did not get as far as the metrics file"
  assert entries(workdir) == before


@pytest.mark.parametrize("where", ["loss", "predictions"])
def test_lsanet_train_divergence_is_one_line(workdir, monkeypatch, capsys, where):
  """A NaN train loss, or NaN predictions (jaxlib 0.12 made them in bfloat16 once: lsanet_jax/lsa.py), ended
  in scikit-learn's traceback from the AUC; now one line naming the flags to change, the workdir as it was."""
  from lsanet_jax import train

  def epoch(state, images, labels, key):
    return state, {"loss": np.float32("nan" if where == "loss" else 1.0)}

  def predict(variables, images, first_batch, num_batches, key_coords=None):
    return {"main": np.full((images.shape[0], 10), np.nan, np.float32)}

  # A stand-in state and functions skip the model's compilation.
  stand_in = {"params": {"w": np.zeros(3, np.float32)}, "batch_stats": {}, "step": np.int32(1)}
  monkeypatch.setattr(train, "create_train_state", lambda *a, **k: stand_in)
  monkeypatch.setattr(train, "make_train_epoch", lambda *a, **k: (epoch, 1))
  monkeypatch.setattr(train, "make_predict", lambda *a, **k: predict)
  before = entries(workdir)
  assert lsanet.main(["--flag", "digits", "--epochs", "1", "--workdir", str(workdir)]) == 2
  said = {"loss": "training diverged in epoch 1 (train loss nan)",
          "predictions": "the main head's val predictions are NaN or infinite"}[where]
  assert_one_line_error(capsys, said, "lower --lr (or leave out --bf16)", "new --workdir")
  assert entries(workdir) == before


def test_corrupted_checkpoint_is_reported_in_one_short_message(tmp_path):
  from lsanet_jax.train import state_to_checkpoint
  from runkit.checkpoint import Checkpointer
  from runkit.config import resume_fingerprint

  workdir = tmp_path / "w"
  argv = ["--flag", "digits", "--epochs", "3", "--workdir", str(workdir), "--resume"]
  config = lsanet.config_from_args(lsanet.build_parser().parse_args(argv))
  fingerprint, defaults = resume_fingerprint(config)
  state = state_to_checkpoint({"w": np.arange(300, dtype=np.float32)})
  with Checkpointer(workdir / "checkpoints", config=fingerprint, config_defaults=defaults) as ckpt:
    for step in (1, 2):
      ckpt.save(step, state, extra={"epoch": step, "best": None}, force=True)
  for f in (workdir / "checkpoints" / "2").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:5])  # truncated array data
  before = entries(workdir)
  # The subprocess gives the model the stand-in state too, so that it fails at the restore, not compiling.
  script = ("import sys, numpy as np; from lsanet_jax import main, train; "
            "train.create_train_state = lambda *a, **k: {'w': np.zeros(300, np.float32)}; "
            "sys.exit(main.main(sys.argv[1:]))")
  done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=REPO,
                        timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
                                          "INFL_JAX_CACHE_DIR": "off", "HOME": str(tmp_path)})
  assert done.returncode == 2, done.stderr[-3000:]
  lines = done.stderr.strip().splitlines()
  assert 1 <= len(lines) <= 3 and lines[0].startswith("error: "), done.stderr[-3000:]
  assert str(workdir / "checkpoints" / "2") in done.stderr and "Traceback" not in done.stderr
  assert re.search(r"delete that folder to resume from the previous checkpoint \(step 1\)", done.stderr)
  assert entries(workdir) == before  # a checkpoint exists: the failed resume keeps everything


@pytest.mark.parametrize("build_parser", [infl.build_parser, lsanet.build_parser], ids=["infl", "lsanet"])
def test_help_shows_each_default_once_and_never_none(build_parser):
  parser = build_parser()
  for action in parser._actions:
    if action.option_strings and action.help and action.dest not in ("help", "workdir"):
      assert action.help.count("(default:") <= 1, action.help
      assert "(default: None)" not in action.help, action.help
  assert "(default: None)" not in parser.format_help()
