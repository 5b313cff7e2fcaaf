#!/usr/bin/env python
"""LSANet speed: training images/s against PyTorch eager ResNet-18, on-device epochs, compile times.

  PYTHONPATH=. python benchmarks/lsanet_speed.py --out lsanet_speed.json      # accelerator sizes
  PYTHONPATH=. python benchmarks/lsanet_speed.py --small --no-torch           # CPU smoke run

Sections (each timed on its own, errors recorded in the JSON, never fatal):
  step/*   one training step at batch 256 (28 px, 3 channels, 9 classes): our LSANet (ResNet-18,
           28-px stem, DKS branches after stages 2 and 3, LSA, knowledge synergy; the `lsanet`
           variant, its real lsanet_jax.steps.train_step with Adam) and the plain Flax ResNet-18
           (`plain` variant), fp32 and bf16 (bf16 compute, float32 parameters); PyTorch eager
           ResNet-18 with the same 28-px stem (3x3/1 conv, no max-pool; torch_models.resnet18),
           Adam, fp32 and bf16 autocast. images/s = batch / median step time; steps are timed in
           chunks of Sizes.chunk steps (ours: one lax.scan call per chunk, as in training; see
           --step-loop), each closed by a device sync.
  epoch/*  one epoch of a PathMNIST-sized training set (90,000 images 28x28x3 uint8, 9 classes)
           resident on the device, run by lsanet_jax.steps.make_train_epoch (one lax.scan-compiled
           function per epoch) at the LSANet default batch size (TrainConfig.batch_size); the
           second epoch is the one reported (the first runs right after compiling).
  compile  seconds to lower and compile each jitted function, reported next to each entry.

All data are synthetic (uniform random pixels and labels): speed does not depend on the pixels.
Torch is imported only inside the reference section; without it those entries say so. The
report, timing and errors are harness.py's.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from typing import Callable

import jax
import numpy as np
import optax

import harness
from lsanet_jax import train
from lsanet_jax.backbones import count_params
from lsanet_jax.config import TrainConfig
from lsanet_jax.models import head_names
from lsanet_jax.steps import STEP_STATE_KEYS, make_train_epoch, steps_per_epoch, train_step

NUM_CLASSES = 9  # PathMNIST
IMAGE_SHAPE = (28, 28, 3)
TARGET_EPOCH_S = 3.0
TARGET_SPEEDUP = 1.5
SECTIONS = ("lsanet", "torch", "epoch", "plain")


@dataclasses.dataclass(frozen=True)
class Sizes:
  width: float = 1.0
  step_batch: int = 256
  epoch_images: int = 90_000
  epoch_batch: int = 0  # 0: TrainConfig's default
  warmup_steps: int = 5
  chunk: int = 10  # steps per timed chunk
  chunks: int = 15  # at most this many timed chunks (fewer when the section's budget runs out)
  timed_epochs: int = 2


FULL = Sizes()
SMALL = Sizes(width=0.125, step_batch=16, epoch_images=64, epoch_batch=16, warmup_steps=1,
              chunk=2, chunks=3, timed_epochs=1)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true", help="CPU sizes: width 0.125, batch 16, 64 images")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  p.add_argument("--out", default=None, help="also write the JSON here (rewritten after each section)")
  p.add_argument("--sections", default="all", help=f"comma-separated subset of: {','.join(SECTIONS)} (default all)")
  p.add_argument("--section-budget", type=float, default=30.0,
                 help="seconds of timed runs per entry (compiles not counted)")
  p.add_argument("--total-budget", type=float, default=420.0,
                 help="entries that would start after this many seconds are skipped")
  p.add_argument("--step-loop", default="scan", choices=["scan", "call"],
                 help="our step entries: 'scan' runs --chunk steps per jitted call in a lax.scan "
                      "(how training runs), 'call' one jitted call per step")
  p.add_argument("--only", default="",
                 help="comma-separated entries to run, e.g. epoch/lsanet_bf16 (default: all of --sections)")
  p.add_argument("--width", type=float, default=None, help="override the width multiplier")
  p.add_argument("--step-batch", type=int, default=None, help="override the step batch size")
  p.add_argument("--epoch-images", type=int, default=None, help="override the epoch's image count")
  args = p.parse_args(argv)
  chosen = set(SECTIONS) if args.sections == "all" else set(args.sections.split(","))
  if not chosen <= set(SECTIONS):
    p.error(f"unknown --sections {sorted(chosen - set(SECTIONS))}; choose from {sorted(SECTIONS)}")
  args.sections = chosen
  overrides = {k: v for k, v in (("width", args.width), ("step_batch", args.step_batch),
                                 ("epoch_images", args.epoch_images)) if v is not None}
  for name, value in overrides.items():
    if not value > 0:
      p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
  args.sizes = dataclasses.replace(SMALL if args.small else FULL, **overrides)
  return args


def synthetic_batch(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, (n, 1)).astype(np.int32)
  return images, labels


def time_chunks(run_chunk: Callable[[int], None], sync: Callable[[], None], sizes: Sizes,
                budget_s: float) -> list[float]:
  """Seconds per step of each timed chunk (at least 3 chunks, more while the budget lasts)."""
  def chunk():
    run_chunk(sizes.chunk)
    sync()

  times = harness.repeat_within_budget(chunk, max_repeats=sizes.chunks, min_repeats=3, budget_s=budget_s)
  return [seconds / sizes.chunk for seconds in times]


def step_summary(per_step: list[float], batch: int, compile_s: float | None, **extra) -> dict:
  median = statistics.median(per_step)
  return {"images_per_s": batch / median, "step_ms_median": 1e3 * median,
          "step_ms_min": 1e3 * min(per_step), "timed_chunks": len(per_step), "batch": batch,
          "compile_s": compile_s, **extra}


# ------------------------------------------------------------------------------------- ours (JAX)
@functools.cache
def initial_variables(variant: str, width: float) -> dict:
  """The initial weights, computed once per (variant, width): compiling the initialiser took several
  seconds of every entry on the H100, and fp32/bf16 share the float32 weights."""
  model = train.build_model(TrainConfig.for_variant(variant, width=width), NUM_CLASSES)
  return train.init_variables(model, IMAGE_SHAPE, train.init_key(0))


def initial_state(model, tx, variant: str, width: float) -> dict:
  return train.create_train_state(model, tx, IMAGE_SHAPE, None, variables=initial_variables(variant, width))


def flax_step(variant: str, bf16: bool, sizes: Sizes, budget_s: float, step_loop: str = "scan") -> dict:
  """Our real train_step (loss, LSA weights, Adam) on one fixed batch, the state donated.

  step_loop "scan": each call runs `chunk` steps in one lax.scan, the way make_train_epoch runs
  training (no Python between steps); "call": one jitted call per step, which adds the dispatch
  of the whole state pytree (about a thousand arrays with the DKS branches) to every step."""
  config = TrainConfig.for_variant(variant, width=sizes.width, batch_size=sizes.step_batch, bf16=bf16)
  model = train.build_model(config, NUM_CLASSES)
  tx = optax.adam(config.learning_rate)
  state = initial_state(model, tx, variant, sizes.width)
  state = {k: state[k] for k in STEP_STATE_KEYS}
  images, labels = map(jax.device_put, synthetic_batch(sizes.step_batch))
  key = jax.random.key(0)
  one_step = functools.partial(train_step, model=model, tx=tx, config=config, task="multi-class")
  steps_per_call = sizes.chunk if step_loop == "scan" else 1

  def many_steps(state, images, labels, key):
    state, parts = jax.lax.scan(lambda s, k: one_step(s, images, labels, k), state,
                                jax.random.split(key, steps_per_call))
    return state, jax.tree_util.tree_map(lambda v: v[-1], parts)

  step = jax.jit(many_steps if step_loop == "scan" else one_step, donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, images, labels, key).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def run_chunk(n):
    for _ in range(n // steps_per_call):
      holder["state"], holder["parts"] = compiled(holder["state"], images, labels, key)

  sync = lambda: jax.block_until_ready(holder["state"])
  run_chunk(max(sizes.warmup_steps, steps_per_call))
  sync()
  per_step = time_chunks(run_chunk, sync, sizes, budget_s)
  return step_summary(per_step, sizes.step_batch, compile_s, variant=variant,
                      dtype="bf16 compute, fp32 params" if bf16 else "fp32",
                      step_loop=(f"lax.scan of {steps_per_call} steps per call" if step_loop == "scan"
                                 else "one jitted call per step"),
                      params=count_params(state["params"]), last_loss=float(holder["parts"]["loss"]),
                      heads=head_names(model.resolved_aux_stages(), config.lsa))


def flax_epoch(bf16: bool, sizes: Sizes, budget_s: float, batch: int = 0) -> dict:
  """One epoch with make_train_epoch's scan loop, the training set resident on the device."""
  batch = batch or sizes.epoch_batch or TrainConfig().batch_size
  config = TrainConfig.for_variant("lsanet", width=sizes.width, batch_size=batch, bf16=bf16, epoch_loop="scan")
  model = train.build_model(config, NUM_CLASSES)
  images, labels = map(jax.device_put, synthetic_batch(sizes.epoch_images, seed=1))
  tx = optax.adam(train.learning_rate_schedule(config, steps_per_epoch(batch, sizes.epoch_images)))
  train_epoch, steps = make_train_epoch(model, tx, config, "multi-class", sizes.epoch_images, "scan")
  state = initial_state(model, tx, "lsanet", sizes.width)
  t0 = time.perf_counter()
  compiled = train_epoch.lower(state, images, labels, train.epoch_key(0, 1)).compile()
  compile_s = time.perf_counter() - t0
  losses = []

  def run_epoch():
    nonlocal state
    state, metrics = compiled(state, images, labels, train.epoch_key(0, len(losses) + 1))
    jax.block_until_ready((state, metrics))
    losses.append(metrics["loss"])

  # The first epoch runs right after compiling; the second is the one reported.
  times = harness.repeat_within_budget(run_epoch, max_repeats=1 + sizes.timed_epochs, min_repeats=2,
                                       budget_s=budget_s)
  return {"seconds_per_epoch": times[1], "epoch_seconds": times, "compile_s": compile_s,
          "images": sizes.epoch_images, "batch": batch, "steps": steps,
          "images_per_s": sizes.epoch_images / times[1], "mean_loss_per_epoch": [float(v) for v in losses],
          "dtype": "bf16 compute, fp32 params" if bf16 else "fp32", "epoch_loop": "scan",
          "target_s": TARGET_EPOCH_S, "meets_target": times[1] <= TARGET_EPOCH_S}


# ----------------------------------------------------------------------------- PyTorch reference
def torch_step(bf16: bool, sizes: Sizes, budget_s: float) -> dict:
  import torch  # imported here only, so that everything else runs where it is missing
  import torch_models

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  model, source = torch_models.resnet18(NUM_CLASSES, sizes.width)
  model = model.to(device).train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  images, labels = synthetic_batch(sizes.step_batch)
  x_u8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)  # NCHW, as eager torch
  y = torch.from_numpy(labels[:, 0].astype(np.int64)).to(device)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  holder = {}

  def run_chunk(n):
    for _ in range(n):
      x = (x_u8.float() / 255.0 - 0.5) / 0.5  # the same preprocessing as ours, inside the step
      opt.zero_grad(set_to_none=True)
      with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
      loss.backward()
      opt.step()
    holder["loss"] = loss.detach()

  t0 = time.perf_counter()
  run_chunk(sizes.warmup_steps)  # eager: the warm-up is cuDNN's algorithm choice and allocations
  sync()
  warmup_s = time.perf_counter() - t0
  per_step = time_chunks(run_chunk, sync, sizes, budget_s)
  return step_summary(per_step, sizes.step_batch, compile_s=None, warmup_s=warmup_s,
                      dtype="bf16 autocast" if bf16 else "fp32", model=source,
                      torch=torch.__version__, device=str(device),
                      tf32_conv=bool(torch.backends.cudnn.allow_tf32),
                      last_loss=holder["loss"].item())


@functools.cache
def torch_unavailable() -> tuple[str, str] | None:
  """(why the torch entries are skipped, a note for the report) where torch cannot be imported."""
  try:
    import torch  # noqa: F401
  except ImportError as e:
    return "torch not installed", f"PyTorch is not installed ({e}): no PyTorch reference columns"
  except Exception as e:  # noqa: BLE001 - e.g. a CUDA library torch cannot load
    return "torch failed to import", (f"PyTorch failed to import ({harness.error_string(e)}): "
                                      "no PyTorch reference columns")
  return None


# ------------------------------------------------------------------------------------------ driver
class SpeedReport(harness.Report):
  """The report with this benchmark's layout (that of the committed results): errors keyed by entry,
  each with its traceback beside it, and the total under ``total_s``."""

  seconds_key = "total_s"

  def record_error(self, where: str, text: str, trace: str) -> None:
    self.data["errors"][where] = text
    self.data["errors"][where + "_traceback"] = trace


def entries(args) -> dict[str, Callable[[float], dict]]:
  """``group/name`` -> measure(budget_s), in running order, for the chosen sections and --only."""
  sizes, loop = args.sizes, args.step_loop
  chosen = {}
  if "lsanet" in args.sections:
    chosen["step/lsanet_bf16"] = lambda b: flax_step("lsanet", True, sizes, b, loop)
    chosen["step/lsanet_fp32"] = lambda b: flax_step("lsanet", False, sizes, b, loop)
  if "torch" in args.sections:
    chosen["step/torch_fp32"] = lambda b: torch_step(False, sizes, b)
    chosen["step/torch_bf16"] = lambda b: torch_step(True, sizes, b)
  if "epoch" in args.sections:
    chosen["epoch/lsanet_bf16"] = lambda b: flax_epoch(True, sizes, b)
    chosen["epoch/lsanet_fp32"] = lambda b: flax_epoch(False, sizes, b)
  if "plain" in args.sections:
    chosen["step/plain_bf16"] = lambda b: flax_step("plain", True, sizes, b, loop)
    chosen["step/plain_fp32"] = lambda b: flax_step("plain", False, sizes, b, loop)
  if "epoch" in args.sections and not args.small:  # context: the same epoch at the step batch
    chosen[f"epoch/lsanet_bf16_batch{sizes.step_batch}"] = lambda b: flax_epoch(True, sizes, b, batch=sizes.step_batch)
  return chosen


def skip_reason(args, report: SpeedReport, label: str) -> str | None:
  if label.startswith("step/torch"):
    if args.no_torch:
      return "--no-torch"
    if torch_unavailable() is not None:
      reason, note = torch_unavailable()
      if note not in report.data["notes"]:
        report.data["notes"].append(note)
      return reason
  if report.elapsed() > args.total_budget:
    return f"--total-budget {args.total_budget:.0f} s used up"
  return None


def run(args, report: SpeedReport) -> None:
  data = report.data
  data["environment"] = report.attempt("environment", harness.environment)
  chosen = entries(args)
  if args.only:
    wanted = set(args.only.split(","))
    if wanted - set(chosen):
      data["errors"]["--only"] = f"no such entries {sorted(wanted - set(chosen))} in --sections {sorted(args.sections)}"
    chosen = {label: measure for label, measure in chosen.items() if label in wanted}
  for label, measure in chosen.items():
    skipped = skip_reason(args, report, label)
    if skipped is not None:
      data["skipped"][label] = skipped
      continue
    group, name = label.split("/")
    t0 = time.perf_counter()
    result = report.attempt(label, lambda: measure(args.section_budget))
    if "error" not in result:
      data[group][name] = dict(result, section_s=time.perf_counter() - t0)
    report.log.info("%s done in %.1f s", label, time.perf_counter() - t0)
    data["ratios"] = ratios(data["step"])
    report.save()


def ratios(step: dict) -> dict:
  rate = lambda name: step.get(name, {}).get("images_per_s")
  out = {}
  for ours in ("lsanet_fp32", "lsanet_bf16", "plain_fp32", "plain_bf16"):
    for ref in ("torch_fp32", "torch_bf16"):
      if rate(ours) and rate(ref):
        out[f"{ours}_over_{ref}"] = rate(ours) / rate(ref)
  torch_rates = [r for r in (rate("torch_fp32"), rate("torch_bf16")) if r]
  ours_rates = [r for r in (rate("lsanet_fp32"), rate("lsanet_bf16")) if r]
  if torch_rates and ours_rates:
    out["lsanet_best_over_torch_best"] = max(ours_rates) / max(torch_rates)
    out["lsanet_best_is"] = max(("lsanet_fp32", "lsanet_bf16"), key=lambda n: rate(n) or 0)
    out["target"] = TARGET_SPEEDUP
    out["meets_target"] = max(ours_rates) / max(torch_rates) >= TARGET_SPEEDUP
  return out


def summarise(args, report: SpeedReport) -> None:
  data = report.data
  data["ratios"] = ratios(data["step"])
  data["compile_s"] = {f"{g}/{n}": e.get("compile_s") for g in ("step", "epoch")
                       for n, e in data[g].items() if e.get("compile_s") is not None}
  if args.small:
    data["notes"].append("--small: CPU-sized model and data; the targets apply to the full sizes "
                         "on an accelerator only")


def main(argv=None) -> int:
  args = parse_args(argv)
  report = SpeedReport("lsanet_speed", {
      "small": args.small, "sizes": dataclasses.asdict(args.sizes),
      "data": "synthetic uniform random uint8 images (28x28x3) and labels (9 classes)",
      "step": {}, "epoch": {}, "errors": {}, "skipped": {}, "notes": [],
  }, args.out)
  report.run(lambda: run(args, report), summarize=lambda: summarise(args, report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
