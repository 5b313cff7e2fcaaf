"""Smoke tests of the benchmark scripts under benchmarks/: CPU-sized runs, real checks of their JSON."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fast_compile import FAST_COMPILE_XLA_FLAGS
from script_modules import load_module

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def _load_benchmark(name: str):
  # The scripts import their siblings (harness, torch_models, ...) as a script run from there would.
  if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
  return load_module(BENCHMARKS / f"{name}.py", f"benchmarks_{name}")


def test_infl_round_benchmark_small(tmp_path):
  out = tmp_path / "infl_round.json"
  # A subprocess, so --small's fast-compile XLA flag takes effect (XLA reads flags when it starts).
  # SGD clients let the vmap/jit-loop check reuse the timed rounds' compiled functions; one
  # residual block (BatchNorm included) keeps the three compiles CPU-sized.
  command = [sys.executable, str(REPO / "benchmarks" / "infl_round.py"), "--small", "--no-torch", "--clients", "2",
             "--num-blocks", "1", "--client-optimizer", "sgd", "--local-epochs", "1", "--large-clients", "5",
             "--large-chunk", "2",
             "--out", str(out)]
  # Without conftest's single-thread XLA flags, which double the compile time here; the check
  # compares two paths within one process, so a different thread split does not matter (nor the
  # compile settings, the same for both paths).
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
             XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
  completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
  assert completed.returncode == 0, completed.stderr[-3000:]
  printed = json.loads(completed.stdout)
  saved = json.loads(out.read_text())
  assert printed["results"] == saved["results"]
  assert saved["errors"] == [], saved["errors"]
  assert saved["synthetic_data"] is True

  for count in ("2",):
    row = saved["results"][count]
    for method in ("vmap", "jit_loop"):
      assert row[method]["rounds_per_s"] > 0
      assert row[method]["seconds_per_round"] > 0
    assert row["vmap"]["compile_s"] > 0
    assert row["torch_loop"] == {"skipped": "--no-torch or INFL_BENCH_NO_TORCH set"}
    assert row["ratio_vmap_over_jit_loop"] == pytest.approx(
        row["vmap"]["rounds_per_s"] / row["jit_loop"]["rounds_per_s"])
    assert row["ratio_vmap_over_torch"] is None
  assert [r["clients"] for r in saved["table"]] == [2]

  # The jit loop reproduces the vmapped round: same clients, same PRNG streams, same average.
  check = saved["check"]
  assert check["allclose"] is True
  assert check["max_abs_diff_params"] < 1e-5
  assert check["max_abs_param_change_in_round"] > 100 * check["max_abs_diff_params"]  # the round did move

  large = saved["large_round"]
  assert large["success"] is True, large
  assert (large["clients"], large["client_chunk_size"]) == (5, 2)  # a ragged last chunk
  assert large["round_s"] > 0 and large["params_finite"] is True


def test_infl_round_torch_reference_has_our_parameter_count():
  torch = pytest.importorskip("torch")
  bench = _load_benchmark("infl_workload")  # infl_round.py's workload
  for num_blocks in (0, 2):
    cfg = bench.BenchConfig(**dict(bench.SMALL, num_blocks=num_blocks))
    variables = bench.init_variables(bench.make_model(cfg), cfg, abstract=True)
    reference = bench.torch_reference_model(cfg)
    assert sum(p.numel() for p in reference.parameters()) == bench.param_count(variables["params"])
    buffers = sum(b.numel() for name, b in reference.named_buffers() if not name.endswith("num_batches_tracked"))
    assert buffers == bench.param_count(variables.get("batch_stats", {}))
    logits = reference(torch.zeros(5, cfg.features), torch.rand(128, 2) * 2 - 1)
    assert tuple(logits.shape) == (5, cfg.num_classes)


def test_lsanet_speed_benchmark_small(tmp_path):
  out = tmp_path / "lsanet_speed.json"
  # Two of the entries (one step benchmark in bf16, the scan-compiled epoch in fp32) keep the
  # compiles CPU-sized; the others run the same functions with another variant or dtype. With LLVM
  # optimisation off, a step inside lax.scan runs slowly on CPU (bf16 most: ~0.8 s at batch 8), so the
  # 8 timed and warm-up steps take a batch of 2.
  step_batch = 2
  command = [sys.executable, str(REPO / "benchmarks" / "lsanet_speed.py"), "--small", "--no-torch",
             "--only", "step/lsanet_bf16,epoch/lsanet_fp32", "--width", "0.0625", "--step-batch", str(step_batch),
             "--epoch-images", "32", "--out", str(out)]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
             XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
  completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
  assert completed.returncode == 0, completed.stderr[-3000:]
  printed = json.loads(completed.stdout)
  saved = json.loads(out.read_text())
  assert printed["step"] == saved["step"] and printed["epoch"] == saved["epoch"]
  assert saved["errors"] == {}, saved["errors"]
  assert saved["small"] is True and "synthetic" in saved["data"]
  assert saved["skipped"] == {}  # --only left the torch entries out before --no-torch applied
  step = saved["step"]["lsanet_bf16"]
  assert step["images_per_s"] > 0 and step["compile_s"] > 0 and step["batch"] == step_batch
  assert step["images_per_s"] == pytest.approx(step_batch / (step["step_ms_median"] / 1e3))
  assert step["heads"] == ["aux1", "aux2", "main", "fused"] and step["dtype"].startswith("bf16")
  assert step["last_loss"] > 0
  epoch = saved["epoch"]["lsanet_fp32"]
  assert epoch["steps"] == 2 and epoch["batch"] == 16 and epoch["images"] == 32
  assert epoch["seconds_per_epoch"] > 0 and epoch["compile_s"] > 0 and epoch["epoch_loop"] == "scan"
  assert len(epoch["epoch_seconds"]) == 2 and all(l > 0 for l in epoch["mean_loss_per_epoch"])
  assert saved["compile_s"] == {"step/lsanet_bf16": step["compile_s"], "epoch/lsanet_fp32": epoch["compile_s"]}
  assert saved["ratios"] == {}  # no torch columns, no ratios


def test_lsanet_federated_round_benchmark_small(tmp_path):
  bench = _load_benchmark("lsanet_federated_round")
  out = tmp_path / "round.json"
  assert bench.main(["--small", "--hospitals", "2", "--repeats", "1", "--out", str(out)]) == 0
  saved = json.loads(out.read_text())
  (entry,) = saved["rounds"]
  assert "error" not in entry, entry
  assert entry["hospitals"] == 2 and entry["images_per_hospital"] == 8
  assert entry["vmap_s"] > 0 and entry["jit_loop_s"] > 0
  assert entry["vmap_speedup_over_loop"] == pytest.approx(entry["jit_loop_s"] / entry["vmap_s"])
  assert entry["vmap_speedup_over_host_round"] == pytest.approx(entry["host_round_s"] / entry["vmap_s"])
