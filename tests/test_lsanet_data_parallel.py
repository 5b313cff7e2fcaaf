"""Data-parallel LSANet training (batch split over a 'data' mesh axis) equals one-device training.

Runs in a subprocess because the 4 host devices must be requested before jax is imported."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
from fast_compile import FAST_COMPILE_XLA_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
from lsanet_jax import steps, train
from lsanet_jax.config import TrainConfig
from lsanet_jax.main import main
from runkit.cli import enable_compilation_cache

assert jax.device_count() == 4, jax.devices()
# The compilation cache the command below turns on (the same folder): the initialiser here is the
# command's (same model, 28 px images, seed 0), so it is compiled once for both.
enable_compilation_cache()
config = TrainConfig(flag="digits", width=0.0625, lsa_dim=8, batch_size=8, aux="light",
                     lsa=True, dynamic_aux_weights=True, synergy=True)
# float64 compute and SGD: the data-parallel step sums in a different order, and a 4-channel
# model's BatchNorm backward amplifies float32 rounding to ~1e-3 relative gradient differences
# (Adam's normalisation would spread them to every near-zero gradient); in float64 the two runs
# must agree to rounding, which a per-device BatchNorm (2 images each) could never do.
model = train.build_model(config, 10).clone(dtype=jnp.float64)
tx = optax.sgd(0.02)
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8)
labels = rng.integers(0, 10, (32, 1)).astype(np.int32)
variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                   train.init_variables(model, (28, 28, 1), train.init_key(0)))

results = {}
for name, mesh in (("single", None), ("data_parallel", steps.data_parallel_mesh(8))):
  state = steps.replicate(train.create_train_state(model, tx, (28, 28, 1), None, variables), mesh)
  put = jax.device_put if mesh is None else (lambda x: steps.replicate(x, mesh))
  epoch, num_steps = steps.make_train_epoch(model, tx, config, "multi-class", 32, "host", mesh)
  state, metrics = epoch(state, put(images), put(labels), train.epoch_key(0, 1))
  results[name] = (state, metrics, num_steps)

(s1, m1, num_steps), (s4, m4, _) = results["single"], results["data_parallel"]
out = {"steps": num_steps, "step": int(s4["step"]),
       "replicated": all(len(x.sharding.device_set) == 4 and x.sharding.is_fully_replicated
                         for x in jax.tree_util.tree_leaves(s4["params"])),
       "max_param_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                             for a, b in zip(jax.tree_util.tree_leaves(s1["params"]),
                                             jax.tree_util.tree_leaves(s4["params"]))),
       "max_stats_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                             for a, b in zip(jax.tree_util.tree_leaves(s1["batch_stats"]),
                                             jax.tree_util.tree_leaves(s4["batch_stats"]))),
       "max_param_change": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                               for a, b in zip(jax.tree_util.tree_leaves(s1["params"]),
                                               jax.tree_util.tree_leaves(variables["params"]))),
       "metrics": {k: [float(m1[k]), float(m4[k])] for k in m1}}
try:
  steps.make_train_epoch(model, tx, config.__class__(batch_size=6), "multi-class", 32, "host",
                         steps.data_parallel_mesh(8))
  steps.data_parallel_mesh(6)
except ValueError as e:
  out["indivisible_error"] = str(e)
out["cli_rc"] = main(["--flag", "digits", "--data-parallel", "--batch-size", "6",
                      "--workdir", "unused_dp_workdir"])
# The whole command, data parallel: replicated data and state, split train and eval batches. A tenth of
# the training labels (still two batches of 64, the last one wrapped around) leaves the validation and
# test splits whole.
out["cli_run_rc"] = main(["--flag", "digits", "--data-parallel", "--batch-size", "64", "--epochs", "1",
                          "--label-fraction", "0.1", "--width", "0.0625", "--lsa-dim", "8", "--aux", "light",
                          "--workdir", "dp_run"])
print("RESULT" + json.dumps(out))
"""


def test_data_parallel_epochs_equal_single_device_epochs(tmp_path):
  # The fast-compile flags compile the training steps here 3-4x faster; the single-device and data-parallel runs
  # are compiled alike.
  env = dict(os.environ, PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false "
                       + FAST_COMPILE_XLA_FLAGS,
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=tmp_path,
                        env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert out["steps"] == 4 and out["step"] == 4
  assert out["replicated"]
  # Training moved the weights by far more than the two runs differ: same batches, same updates,
  # BatchNorm statistics over the global batch.
  assert out["max_param_change"] > 1e-2
  assert out["max_param_diff"] < 1e-6, out
  assert out["max_stats_diff"] < 1e-6, out
  for key, (single, parallel) in out["metrics"].items():
    assert abs(single - parallel) <= 1e-5 * max(1.0, abs(single)), (key, single, parallel)
  assert "divisible by 4" in out["indivisible_error"] and "--batch-size" in out["indivisible_error"]
  assert out["cli_rc"] == 2
  assert "divisible by 4" in proc.stderr
  assert not (tmp_path / "unused_dp_workdir").exists()
  assert out["cli_run_rc"] == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "dp_run" / "summary.json").read_text())
  assert summary["config"]["data_parallel"] is True
  assert set(summary["heads"]) == {"aux1", "aux2", "main", "fused"}
  assert all(0.0 <= h["test_auc"] <= 1.0 for h in summary["heads"].values())


def test_data_parallel_error_names_a_training_set_smaller_than_the_batch():
  from lsanet_jax import steps

  four = [object()] * 4  # the check runs before any device is touched
  with pytest.raises(steps.DataParallelError, match="training set holds 6 images, fewer than --batch-size 8"):
    steps.data_parallel_mesh(8, four, num_train=6)
  with pytest.raises(steps.DataParallelError, match="divisible by 4"):
    steps.data_parallel_mesh(6, four, num_train=100)
