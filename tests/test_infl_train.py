"""infl-train end to end: resume equals an uninterrupted run, no key material at the server, clear errors."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from infl_jax import keys as keylib
from runkit.checkpoint import CheckpointError, Checkpointer
from infl_jax.config import TrainConfig
from infl_jax.federated import ServerState
from infl_jax.main import main, train_and_evaluate

SMALL = dict(model="mlp", hidden=(16,), rounds=4, local_epochs=1, batch_size=16, checkpoint_every=1,
             central_baseline=False, n_top_features=200)


def _config(**kw):
  return TrainConfig.for_dataset("proteomics", **{**SMALL, **kw})


def _final_state(workdir, config, key):
  # train_and_evaluate records the key's fingerprint in the run's settings (docs/design.md, "Keys").
  fingerprint, defaults = dataclasses.replace(config, key_fingerprint=key.fingerprint).resume_fingerprint()
  ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", config=fingerprint, config_defaults=defaults)
  step = ckpt.latest_step()
  metadata = ckpt._manager.item_metadata(step)["state"]
  template = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), dict(metadata))
  state, extra = ckpt.restore(template)
  ckpt.close()
  return state, extra


@pytest.fixture(scope="module")
def key():
  return keylib.generate_key(3)


def test_resume_is_bit_identical_to_uninterrupted_run(tmp_path, key):
  config = _config()
  full = train_and_evaluate(config, tmp_path / "full", key, show_progress=False)
  train_and_evaluate(config, tmp_path / "split", key, stop_after_round=2, show_progress=False)
  resumed = train_and_evaluate(config, tmp_path / "split", key, resume=True, show_progress=False)
  a, _ = _final_state(tmp_path / "full", config, key)
  b, _ = _final_state(tmp_path / "split", config, key)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert full["test"] == resumed["test"]
  rows = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert rows == [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]


def test_server_state_and_checkpoint_hold_no_key_material(tmp_path, key):
  config = _config(rounds=2)
  train_and_evaluate(config, tmp_path, key, show_progress=False)
  saved, extra = _final_state(tmp_path, config, key)
  assert set(saved) == {"state", "selected"}  # the newest state and the one model selection keeps
  state = saved["state"]
  assert set(state) == set(ServerState._fields) == set(saved["selected"])
  coords = np.asarray(key.coords, np.float32)
  for leaf in jax.tree_util.tree_leaves(saved):
    leaf = np.asarray(leaf)
    assert leaf.shape != coords.shape
    if leaf.dtype == np.float32 and leaf.size:
      assert not np.isin(coords.ravel(), leaf.ravel()).any(), "a key coordinate appears in the server state"
  needles = [coords.tobytes()[i:i + 16] for i in range(0, 64, 16)] + [json.dumps(coords.tolist()[0])[:12].encode()]
  for path in (tmp_path / "checkpoints").rglob("*"):
    if path.is_file():
      blob = path.read_bytes()
      assert not any(n in blob for n in needles), f"key bytes found in {path}"
      assert b"coords" not in blob and b"key_seed" not in blob


def test_cli_prints_all_key_modes_and_refuses_to_clobber(tmp_path, capsys):
  args = ["--dataset", "proteomics", "--model", "mlp", "--hidden", "16", "--rounds", "2", "--batch-size", "16",
          "--n-top-features", "200", "--no-central-baseline", "--workdir", str(tmp_path / "run")]
  assert main(args) == 0
  out = capsys.readouterr().out
  for name in ("right_key", "wrong_key_same_mode", "wrong_key_other_mode", "no_inr"):
    assert name in out
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert set(summary["test"]) == {"right_key", "wrong_key_same_mode", "wrong_key_other_mode", "no_inr"}
  key_file = tmp_path / "run" / "client_secret.key"
  assert key_file.stat().st_mode & 0o777 == 0o600
  before = key_file.read_bytes()
  assert main(args) == 2
  assert "already holds a run" in capsys.readouterr().err
  assert main(args + ["--resume", "--key-seed", "5"]) == 2
  assert "already holds a key" in capsys.readouterr().err
  assert key_file.read_bytes() == before


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "no_such_set"], "unknown dataset"),
    (["--dataset", "proteomics", "--label-key", "Age_missing"], "Age_missing"),
    (["--resume"], "holds no checkpoint"),
])
def test_cli_bad_input_gives_clear_error(tmp_path, capsys, extra, message):
  assert main(["--workdir", str(tmp_path / "w"), "--rounds", "1"] + extra) == 2
  err = capsys.readouterr().err
  assert "error: " in err and message in err


def test_corrupted_and_incompatible_checkpoints_are_refused(tmp_path, key):
  config = _config(rounds=2)
  train_and_evaluate(config, tmp_path, key, show_progress=False)
  with pytest.raises(CheckpointError, match="different settings"):
    train_and_evaluate(_config(rounds=3, hidden=(32,)), tmp_path, key, resume=True, show_progress=False)
  for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(b"\0" * 7)
  with pytest.raises(CheckpointError, match="corrupted"):
    train_and_evaluate(_config(rounds=3), tmp_path, key, resume=True, show_progress=False)


def test_wrong_key_version_is_refused(tmp_path):
  with pytest.raises(ValueError, match="key version 2"):
    train_and_evaluate(_config(), tmp_path, keylib.generate_key(0, version=2), show_progress=False)
