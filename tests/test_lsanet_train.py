"""End-to-end `lsanet-train` runs on scikit-learn's digits written as a 28 px MedMNIST npz.

The runs marked slow train real (narrow) networks on CPU; together they take about 2.5 minutes
on 2 cores. They still run in CI.
"""
import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lsanet_jax.config import VARIANTS, TrainConfig
from lsanet_jax.data import digits_as_medmnist, write_medmnist_npz
from lsanet_jax.main import main

TINY = ["--flag", "digits", "--width", "0.125", "--lsa-dim", "32"]
LADDER = {"plain": {"main"}, "ds": {"aux1", "aux2", "main"},
          "ds_lsa": {"aux1", "aux2", "main", "fused"}, "lsanet": {"aux1", "aux2", "main", "fused"}}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Runs with identical settings (the resume test repeats the ladder's LSANet rung) reuse the
  XLA executables instead of compiling them again; restored afterwards."""
  import jax
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  saved = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for k, v in saved.items():
    jax.config.update(k, v)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("medmnist")
  write_medmnist_npz(root / "digits.npz", digits_as_medmnist(seed=0))
  return root


def read_rows(workdir):
  """metrics.jsonl without the seconds each epoch took (training, evaluation, both)."""
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]


def summary(workdir):
  return json.loads((pathlib.Path(workdir) / "summary.json").read_text())


def checkpoint_arrays(workdir, step):
  import orbax.checkpoint as ocp
  import jax
  restored = ocp.StandardCheckpointer().restore(pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "state")
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(restored)}


@pytest.mark.slow
def test_lsanet_resnet18_learns_digits(digits_root, tmp_path):
  workdir = tmp_path / "run"
  rc = main(TINY + ["--root", str(digits_root), "--epochs", "8", "--workdir", str(workdir)])
  assert rc == 0
  s = summary(workdir)
  assert s["selection_head"] == "fused" and s["data_source"].endswith("digits.npz")
  assert s["data"]["kind"] == "medmnist-npz" and s["validation_interval"] == 1
  assert set(s["heads"]) == {"aux1", "aux2", "main", "fused"}
  assert s["heads"]["fused"]["test_acc"] >= 0.90, s["heads"]
  assert s["heads"]["main"]["test_acc"] >= 0.90, s["heads"]
  rows = read_rows(workdir)
  assert [r["epoch"] for r in rows] == list(range(1, 9))
  assert rows[-1]["loss"] < rows[0]["loss"] / 3
  assert rows[-1]["lr"] == pytest.approx(1e-5)  # x0.1 after epoch 4 and after epoch 6
  for name in ("curves.png", "lsa_weights.png"):
    assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ladder_runs(digits_root, tmp_path_factory):
  """Every rung of the ablation ladder, 10% of the labels, 3 epochs (one step each)."""
  base = tmp_path_factory.mktemp("ladder")
  runs = {}
  for variant in LADDER:
    workdir = base / variant
    rc = main(TINY + ["--root", str(digits_root), "--label-fraction", "0.1", "--epochs", "3",
                      "--variant", variant, "--workdir", str(workdir)])
    assert rc == 0, variant
    runs[variant] = workdir
  return runs


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
def test_stopped_and_resumed_run_is_bit_identical(ladder_runs, digits_root, tmp_path):
  reference = ladder_runs["lsanet"]
  workdir = tmp_path / "resumed"
  args = TINY + ["--root", str(digits_root), "--label-fraction", "0.1", "--epochs", "3",
                 "--variant", "lsanet", "--workdir", str(workdir)]
  assert main(args + ["--stop-after-epochs", "2"]) == 0
  assert not (workdir / "summary.json").exists()
  assert len(read_rows(workdir)) == 2
  assert main(args + ["--resume"]) == 0
  assert read_rows(workdir) == read_rows(reference)
  timeless = lambda s: {k: v for k, v in s.items() if k != "seconds_this_invocation"}
  assert timeless(summary(workdir)) == timeless(summary(reference))
  resumed, uninterrupted = checkpoint_arrays(workdir, 3), checkpoint_arrays(reference, 3)
  assert resumed.keys() == uninterrupted.keys() and len(resumed) > 100
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)


@pytest.mark.slow
def test_checkpoint_every_saves_fewer_epochs_and_trains_the_same(ladder_runs, digits_root, tmp_path):
  reference = ladder_runs["plain"]  # every epoch checkpointed
  workdir = tmp_path / "sparse"
  args = TINY + ["--root", str(digits_root), "--label-fraction", "0.1", "--epochs", "3", "--variant", "plain",
                 "--workdir", str(workdir), "--checkpoint-every", "3", "--keep-checkpoints", "5"]
  saved = lambda: sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert main(args + ["--stop-after-epochs", "2"]) == 0
  assert saved() == ["2"]  # epoch 1 is not on the interval; the epoch a run stops at always is
  assert main(args + ["--resume"]) == 0
  assert saved() == ["2", "3"]  # the last epoch always is
  assert read_rows(workdir) == read_rows(reference)
  untimed = lambda s: {k: v for k, v in s.items() if k not in ("seconds_this_invocation", "config")}
  assert untimed(summary(workdir)) == untimed(summary(reference))
  assert summary(workdir)["config"]["checkpoint_every"] == 3


@pytest.mark.slow
def test_augmented_bf16_run(digits_root, tmp_path):
  rc = main(TINY + ["--root", str(digits_root), "--label-fraction", "0.1", "--epochs", "2",
                    "--variant", "plain", "--augment", "--bf16", "--workdir", str(tmp_path / "r")])
  assert rc == 0
  assert np.isfinite(read_rows(tmp_path / "r")[-1]["loss"])


@pytest.mark.slow
def test_corrupted_or_mismatched_checkpoint_is_refused(ladder_runs, digits_root, tmp_path, capsys):
  workdir = tmp_path / "copy"
  shutil.copytree(ladder_runs["plain"], workdir)
  args = TINY + ["--root", str(digits_root), "--label-fraction", "0.1", "--epochs", "3",
                 "--variant", "plain", "--workdir", str(workdir), "--resume"]
  assert main(args[:-1] + ["--width", "0.25", "--resume"]) == 2
  assert "different settings" in capsys.readouterr().err
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


@pytest.mark.slow
def test_scan_epoch_matches_host_loop_epoch():
  """The accelerator default (one lax.scan-compiled epoch) computes what the CPU loop computes."""
  import jax
  import optax
  from lsanet_jax import steps, train
  config = TrainConfig(flag="digits", width=0.0625, batch_size=16, augment=True, **VARIANTS["plain"])
  model = train.build_model(config, 10)
  tx = optax.adam(1e-3)
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8))
  labels = jax.device_put(rng.integers(0, 10, (40, 1)).astype(np.int32))
  results = {}
  for loop in ("scan", "host"):
    state = train.create_train_state(model, tx, (28, 28, 1), train.init_key(0))
    epoch, num_steps = steps.make_train_epoch(model, tx, config, "multi-class", 40, loop)
    results[loop] = epoch(state, images, labels, train.epoch_key(0, 1))
  assert num_steps == 3
  (s_scan, m_scan), (s_host, m_host) = results["scan"], results["host"]
  assert int(s_scan["step"]) == int(s_host["step"]) == 3
  for key in m_scan:
    np.testing.assert_allclose(m_scan[key], m_host[key], rtol=1e-4, atol=1e-5, err_msg=key)
  for a, b in zip(jax.tree_util.tree_leaves(s_scan["params"]), jax.tree_util.tree_leaves(s_host["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


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


@pytest.mark.slow
def test_multilabel_chest_format_trains_with_bce_and_bernoulli_synergy(tmp_path):
  from lsanet_jax import train
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", 48), ("val", 16), ("test", 16)):
    labels = (rng.random((n, 14)) < 0.3).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
    images[:, :8, :8] += (labels[:, :1, None] * 150).astype(np.uint8)  # label 0 is visible
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
  write_medmnist_npz(tmp_path / "chestmnist.npz", arrays)
  config = TrainConfig(flag="chestmnist", root=str(tmp_path), width=0.0625, aux="light", lsa_dim=8, epochs=2,
                       batch_size=16, label_fraction=0.5)
  result = train.train_and_evaluate(config, tmp_path / "run", show_progress=False)
  history = read_rows(tmp_path / "run")
  assert len(history) == 2 and all(np.isfinite(r["loss"]) and r["loss_synergy"] >= 0 for r in history)
  assert result["heads"] == summary(tmp_path / "run")["heads"] and result["task"] == "multi-label, binary-class"
  assert set(result["heads"]) == {"aux1", "aux2", "main", "fused"}
  for head in result["heads"].values():
    assert 0.0 <= head["test_auc"] <= 1.0 and 0.0 <= head["test_acc"] <= 1.0


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
