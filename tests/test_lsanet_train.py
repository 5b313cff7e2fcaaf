"""End-to-end `lsanet-train` runs on scikit-learn's digits written as a 28 px MedMNIST npz: the ablation ladder
and what reuses its runs (resume, checkpoint interval, refused checkpoints), and the CLI's checks.

The runs that train without the ladder are in test_lsanet_train_runs.py: a file runs on one test worker, so the
two files train in parallel. They still run in CI.
"""
import dataclasses
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lsanet_jax.config import VARIANTS, TrainConfig
from lsanet_jax.main import main
from lsanet_runs import digits_root, read_rows, summary  # noqa: F401 (digits_root is a fixture)

TINY = ["--flag", "digits", "--width", "0.125", "--lsa-dim", "32"]
LADDER = {"plain": {"main"}, "ds": {"aux1", "aux2", "main"},
          "ds_lsa": {"aux1", "aux2", "main", "fused"}, "lsanet": {"aux1", "aux2", "main", "fused"}}


def checkpoint_arrays(workdir, step):
  import orbax.checkpoint as ocp
  import jax
  restored = ocp.StandardCheckpointer().restore(pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "state")
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(restored)}


@pytest.fixture(scope="module")
def ladder_runs(digits_root, tmp_path_factory):
  """Every rung of the ablation ladder, 10% of the labels, 3 epochs (one step each).

  lsanet keeps a checkpoint of every epoch (the reference of the --checkpoint-every test below), and so does
  plain (copied by the refused-checkpoint test); ds and ds_lsa save only their last epoch's (each save takes
  about a second, and nothing reads their checkpoints)."""
  base = tmp_path_factory.mktemp("ladder")
  runs = {}
  for variant in LADDER:
    workdir = base / variant
    sparse = ["--checkpoint-every", "3"] if variant in ("ds", "ds_lsa") else []
    rc = main(TINY + ["--root", str(digits_root), "--label-fraction", "0.1", "--epochs", "3",
                      "--variant", variant, "--workdir", str(workdir)] + sparse)
    assert rc == 0, variant
    runs[variant] = workdir
  return runs


@pytest.fixture(scope="module")
def stopped_and_resumed(ladder_runs, digits_root, tmp_path_factory):
  """The ladder's LSANet rung again, stopped after epoch 2 and resumed, checkpointing every 3 epochs.

  One run serves the resume test and the --checkpoint-every test: both train the reference's settings
  (--checkpoint-every and --keep-checkpoints change only which checkpoints are kept), and every
  resumed process compiles its epoch program again (a restored state's arrays are committed to the
  device, which changes the program's cache key), the costliest part of each test."""
  workdir = tmp_path_factory.mktemp("resumed") / "run"
  args = TINY + ["--root", str(digits_root), "--label-fraction", "0.1", "--epochs", "3", "--variant", "lsanet",
                 "--workdir", str(workdir), "--checkpoint-every", "3", "--keep-checkpoints", "5"]
  saved = lambda: sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert main(args + ["--stop-after-epochs", "2"]) == 0
  stopped = {"summary_written": (workdir / "summary.json").exists(), "rows": read_rows(workdir), "saved": saved()}
  assert main(args + ["--resume"]) == 0
  return {"workdir": workdir, "stopped": stopped, "saved": saved()}


@pytest.mark.slow
def test_every_rung_of_the_ablation_ladder_reports_every_head(ladder_runs):
  for variant, heads in LADDER.items():
    s = summary(ladder_runs[variant])
    assert set(s["heads"]) == heads, variant
    assert s["num_train"] == 126  # stratified 10% of 1,257
    for h in heads:
      assert set(s["heads"][h]) == {"test_acc", "test_auc", "val_acc", "val_auc"}
    rows = read_rows(ladder_runs[variant])
    # 126 labelled images against 180 validation and 360 test images: auto --eval-every validates at the
    # last epoch only, and test is scored once, for the summary.
    assert s["validation_interval"] == 3 and s["best_epoch"] == 3
    assert [any(k.startswith("val_") for k in r) for r in rows] == [False, False, True]
    assert not any(k.startswith("test_") for r in rows for k in r)
    assert ("loss_synergy" in rows[0]) == (variant == "lsanet")
    assert ("lsa_weight_main" in rows[0]) == (variant in ("ds_lsa", "lsanet"))
    if variant == "ds":
      assert rows[0]["weight_aux1"] == 1.0  # fixed DKS weights without LSA
    if variant == "ds_lsa":
      layer_weights = [rows[0][f"lsa_weight_{h}"] for h in ("aux1", "aux2", "main")]
      assert sum(layer_weights) == pytest.approx(1.0, abs=1e-5)
      assert rows[0]["weight_aux1"] == pytest.approx(3 * rows[0]["lsa_weight_aux1"], rel=1e-5)
  assert summary(ladder_runs["plain"])["params"].keys() == {"total", "backbone"}


@pytest.mark.slow
def test_stopped_and_resumed_run_is_bit_identical(ladder_runs, stopped_and_resumed):
  reference, workdir = ladder_runs["lsanet"], stopped_and_resumed["workdir"]
  assert not stopped_and_resumed["stopped"]["summary_written"]
  assert len(stopped_and_resumed["stopped"]["rows"]) == 2
  assert read_rows(workdir) == read_rows(reference)
  # Everything but the time and the two checkpointing settings (not part of the resume check) is equal.
  kept = ("checkpoint_every", "keep_checkpoints")
  timeless = lambda s: {k: v if k != "config" else {c: x for c, x in v.items() if c not in kept}
                        for k, v in s.items() if k != "seconds_this_invocation"}
  assert timeless(summary(workdir)) == timeless(summary(reference))
  resumed, uninterrupted = checkpoint_arrays(workdir, 3), checkpoint_arrays(reference, 3)
  assert resumed.keys() == uninterrupted.keys() and len(resumed) > 100
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)


@pytest.mark.slow
def test_checkpoint_every_saves_fewer_epochs_and_trains_the_same(ladder_runs, stopped_and_resumed):
  reference, workdir = ladder_runs["lsanet"], stopped_and_resumed["workdir"]  # reference: every epoch checkpointed
  # Epoch 1 is not on the interval; the epoch a run stops at always is saved, and so is the last epoch.
  assert stopped_and_resumed["stopped"]["saved"] == ["2"]
  assert stopped_and_resumed["saved"] == ["2", "3"]
  assert read_rows(workdir) == read_rows(reference)
  untimed = lambda s: {k: v for k, v in s.items() if k not in ("seconds_this_invocation", "config")}
  assert untimed(summary(workdir)) == untimed(summary(reference))
  assert summary(workdir)["config"]["checkpoint_every"] == 3
  assert summary(reference)["config"]["checkpoint_every"] == 1


@pytest.mark.slow
def test_corrupted_or_mismatched_checkpoint_is_refused(ladder_runs, digits_root, tmp_path, capsys):
  workdir = tmp_path / "copy"
  shutil.copytree(ladder_runs["plain"], workdir)
  args = TINY + ["--root", str(digits_root), "--label-fraction", "0.1", "--epochs", "3",
                 "--variant", "plain", "--workdir", str(workdir), "--resume"]
  # Another model (the ds rung's: auxiliary branches, so other arrays than the checkpoint's); its
  # initialisation, which runs before the checkpoint is read, is compiled already (the ladder's ds run).
  assert main(args[:-1] + ["--variant", "ds", "--resume"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "different settings" in err and "aux: saved 'none' vs now 'dks'" in err
  for f in (workdir / "checkpoints" / "3" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\0garbage")
  assert main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "checkpoint step 3" in err and "corrupted" in err


@pytest.mark.parametrize("argv, message", [
    (["--flag", "bloodmnst"], "unknown dataset flag 'bloodmnst'"),
    (["--flag", "bloodmnist"], "bloodmnist.npz not found"),
    (["--flag", "digits", "--variant", "plain", "--lsa"], "LSA fuses the auxiliary branches"),
    (["--flag", "digits", "--label-fraction", "0"], "--label-fraction must be a finite number > 0 and <= 1"),
    (["--flag", "digits", "--aux-stages", "4"], "--aux-stages: auxiliary branches can attach after stages 1..3"),
    (["--flag", "digits", "--keep-checkpoints", "0"], "--keep-checkpoints must be"),
])
def test_cli_bad_inputs(tmp_path, capsys, argv, message):
  assert main(argv + ["--root", str(tmp_path / "empty"), "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err
  assert not (tmp_path / "w").exists()  # a refused run leaves nothing behind


def test_cli_aux_stages_must_be_numbers(tmp_path, capsys):
  # Parsed by argparse like every typed option: usage, the message and exit status 2.
  with pytest.raises(SystemExit) as exited:
    main(["--flag", "digits", "--aux-stages", "two", "--workdir", str(tmp_path / "w")])
  assert exited.value.code == 2
  assert "error: argument --aux-stages: expected comma-separated ints such as 1,2, got 'two'" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def test_help_lists_every_config_option(capsys):
  with pytest.raises(SystemExit) as exited:
    main(["--help"])
  assert exited.value.code == 0
  help_text = capsys.readouterr().out
  for field in dataclasses.fields(TrainConfig):
    flag = field.metadata["flag"] or "--" + field.name.replace("_", "-")
    listed = f"{flag} " in help_text or f"{flag}," in help_text or f"{flag}\n" in help_text
    assert listed == (not field.metadata["no_cli"]), flag
    if field.type == "bool" and field.metadata["const"] is None:
      assert f"--no-{flag[2:]}" in help_text, flag
  for flag in ("--variant", "--download", "--download-url-template", "--workdir", "--resume", "--stop-after-epochs"):
    assert f"{flag} " in help_text, flag
  assert "--label-seed" in help_text and "(default: --seed)" in help_text


def test_variant_presets_and_the_switches_that_override_them():
  assert TrainConfig() == TrainConfig.for_variant("lsanet")
  for variant, switches in VARIANTS.items():
    config = TrainConfig.for_variant(variant, width=0.5)
    assert {k: getattr(config, k) for k in switches} == switches and config.width == 0.5
  # Switching LSA off also switches off the dynamic weights that come from it, unless they are set.
  assert not TrainConfig.for_variant("lsanet", lsa=False).dynamic_aux_weights
  assert TrainConfig.for_variant("lsanet", lsa=False, dynamic_aux_weights=True).dynamic_aux_weights
  # No auxiliary branches also means no knowledge synergy, unless it is set.
  assert not TrainConfig.for_variant("lsanet", aux="none", lsa=False).synergy
  assert TrainConfig.for_variant("plain", aux="light").aux == "light"
  with pytest.raises(ValueError, match="LSA fuses the auxiliary branches"):
    TrainConfig.for_variant("plain", lsa=True).validate()
  with pytest.raises(ValueError, match="unknown variant"):
    TrainConfig.for_variant("dks")


def test_resume_check_covers_every_setting_that_changes_the_result():
  from runkit.config import resume_fingerprint
  fingerprint, defaults = resume_fingerprint(TrainConfig())
  # Where the files lie (and whether MedMNIST comes from its npz or the TFDS dataset built from it), the
  # device layout and how many (and how often) checkpoints are kept do not change what is trained; everything else does
  # (and checkpoints written before the config moved recorded the same set).
  assert set(fingerprint) == {f.name for f in dataclasses.fields(TrainConfig)} - {
      "root", "source", "tfds_data_dir", "data_parallel", "keep_checkpoints", "checkpoint_every"}
  assert set(defaults) == set(fingerprint)


def test_existing_run_is_not_overwritten(tmp_path, capsys):
  (tmp_path / "w" / "checkpoints" / "1").mkdir(parents=True)
  assert main(["--flag", "digits", "--workdir", str(tmp_path / "w"), "--epochs", "1"]) == 2
  assert "--resume" in capsys.readouterr().err


def test_script_entry_point_runs():
  repo = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, str(repo / "scripts" / "lsanet_train.py"), "--help"],
                       capture_output=True, text=True, cwd=repo, timeout=600,
                       env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
  assert out.returncode == 0 and "--label-fraction" in out.stdout


def test_preprocess_normalises_and_augments_within_bounds():
  import jax
  import jax.numpy as jnp
  from lsanet_jax.steps import preprocess
  images = jnp.asarray((np.arange(2 * 28 * 28) % 256).astype(np.uint8).reshape(2, 28, 28, 1))
  plain = preprocess(images)
  np.testing.assert_allclose(plain, (np.asarray(images) / 255.0 - 0.5) / 0.5, atol=1e-6)
  augmented = preprocess(images, jax.random.key(0), augment=True)
  assert augmented.shape == plain.shape
  assert float(augmented.min()) >= -1.0 and float(augmented.max()) <= 1.0
  assert not np.allclose(augmented, plain)


def test_cli_download_refuses_a_file_with_the_wrong_checksum(tmp_path, capsys):
  mirror = tmp_path / "mirror"
  mirror.mkdir()
  (mirror / "breastmnist.npz").write_bytes(b"not the official file")
  argv = ["--flag", "breastmnist", "--root", str(tmp_path / "root"), "--download",
          "--download-url-template", mirror.as_uri() + "/{filename}", "--workdir", str(tmp_path / "w")]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert "expected 750601b1f35ba3300ea97c75c52ff8f6" in err
  assert not (tmp_path / "root" / "breastmnist.npz").exists() and not (tmp_path / "w").exists()
