"""End-to-end `lsanet-train` runs that need no ablation-ladder run: learning on digits, augmentation with bf16,
the scanned epoch against the host loop, and the multi-label format (test_lsanet_train.py holds the ladder)."""
import numpy as np
import pytest

from lsanet_jax.config import VARIANTS, TrainConfig
from lsanet_jax.data import write_medmnist_npz
from lsanet_jax.main import main
from lsanet_runs import digits_root, read_rows, summary  # noqa: F401 (digits_root is a fixture)

TINY = ["--flag", "digits", "--width", "0.125", "--lsa-dim", "32"]


@pytest.mark.slow
def test_lsanet_resnet18_learns_digits(digits_root, tmp_path):
  # 4 epochs of batches of 16 (316 steps) instead of 8 of 128 (80 steps): on CPU a small batch costs much
  # less per image, so this trains in less than half the time and learns more. Over seeds 0-3 the test
  # accuracy of the fused head was 0.967-0.983 and of the main head 0.956-0.978 (8 x 128, seed 0: 0.933 and
  # 0.939), against 0.10 by chance, and the last epoch's loss was 6.1-7.4x below the first's: the thresholds
  # keep their margin. One checkpoint, at the end (a save takes about a second; none is read here).
  workdir = tmp_path / "run"
  rc = main(TINY + ["--root", str(digits_root), "--epochs", "4", "--batch-size", "16", "--checkpoint-every", "4",
                    "--workdir", str(workdir)])
  assert rc == 0
  s = summary(workdir)
  assert s["selection_head"] == "fused" and s["data_source"].endswith("digits.npz")
  assert s["data"]["kind"] == "medmnist-npz" and s["validation_interval"] == 1
  assert set(s["heads"]) == {"aux1", "aux2", "main", "fused"}
  assert s["heads"]["fused"]["test_acc"] >= 0.90, s["heads"]
  assert s["heads"]["main"]["test_acc"] >= 0.90, s["heads"]
  rows = read_rows(workdir)
  assert [r["epoch"] for r in rows] == list(range(1, 5))
  assert rows[-1]["loss"] < rows[0]["loss"] / 3
  assert rows[-1]["lr"] == pytest.approx(1e-5)  # x0.1 after epoch 2 and after epoch 3
  for name in ("curves.png", "lsa_weights.png"):
    assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_augmented_bf16_run(digits_root, tmp_path):
  # Width 1/16 as in test_scan_epoch_matches_host_loop_epoch: parameters are initialised by the float32
  # twin, so the two tests share that compiled program. One checkpoint, at the end.
  rc = main(["--flag", "digits", "--width", "0.0625", "--root", str(digits_root), "--label-fraction", "0.1",
             "--epochs", "2", "--checkpoint-every", "2", "--variant", "plain", "--augment", "--bf16",
             "--workdir", str(tmp_path / "r")])
  assert rc == 0
  assert np.isfinite(read_rows(tmp_path / "r")[-1]["loss"])


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
  variables = train.init_variables(model, (28, 28, 1), train.init_key(0))  # one start for both loops
  results = {}
  for loop in ("scan", "host"):
    state = train.create_train_state(model, tx, (28, 28, 1), None, variables)
    epoch, num_steps = steps.make_train_epoch(model, tx, config, "multi-class", 40, loop)
    results[loop] = epoch(state, images, labels, train.epoch_key(0, 1))
  assert num_steps == 3
  (s_scan, m_scan), (s_host, m_host) = results["scan"], results["host"]
  assert int(s_scan["step"]) == int(s_host["step"]) == 3
  for key in m_scan:
    np.testing.assert_allclose(m_scan[key], m_host[key], rtol=1e-4, atol=1e-5, err_msg=key)
  for a, b in zip(jax.tree_util.tree_leaves(s_scan["params"]), jax.tree_util.tree_leaves(s_host["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


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
                       batch_size=16, label_fraction=0.5, checkpoint_every=2)  # one checkpoint (a save takes ~1 s)
  result = train.train_and_evaluate(config, tmp_path / "run", show_progress=False)
  history = read_rows(tmp_path / "run")
  assert len(history) == 2 and all(np.isfinite(r["loss"]) and r["loss_synergy"] >= 0 for r in history)
  assert result["heads"] == summary(tmp_path / "run")["heads"] and result["task"] == "multi-label, binary-class"
  assert set(result["heads"]) == {"aux1", "aux2", "main", "fused"}
  for head in result["heads"].values():
    assert 0.0 <= head["test_auc"] <= 1.0 and 0.0 <= head["test_acc"] <= 1.0
