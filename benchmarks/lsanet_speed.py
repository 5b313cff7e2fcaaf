#!/usr/bin/env python
"""LSANet speed: training images/s against PyTorch eager ResNet-18, on-device epochs, compile times.

  PYTHONPATH=. python benchmarks/lsanet_speed.py --out lsanet_speed.json      # accelerator sizes
  PYTHONPATH=. python benchmarks/lsanet_speed.py --small --no-torch           # CPU smoke run

Sections (each timed on its own, errors recorded in the JSON, never fatal):
  step/*   one training step at batch 256 (28 px, 3 channels, 9 classes): our LSANet (ResNet-18,
           28-px stem, DKS branches after stages 2 and 3, LSA, knowledge synergy; the `lsanet`
           variant of lsanet_jax.train, its real train_step with Adam) and the plain Flax
           ResNet-18 (`plain` variant), fp32 and bf16 (bf16 compute, float32 parameters); PyTorch
           eager ResNet-18 with the same 28-px stem (3x3/1 conv, no max-pool), Adam, fp32 and
           bf16 autocast. images/s = batch / median step time; steps are timed in chunks of
           Sizes.chunk steps (ours: one lax.scan call per chunk, as in training; see
           --step-loop), each closed by a device sync.
  epoch/*  one epoch of a PathMNIST-sized training set (90,000 images 28x28x3 uint8, 9 classes)
           resident on the device, run by lsanet_jax.train.make_train_epoch (one lax.scan-compiled
           function per epoch) at the LSANet default batch size (TrainConfig.batch_size); the
           second epoch is the one reported (the first runs right after compiling).
  compile  seconds to lower and compile each jitted function, reported next to each entry.

All data are synthetic (uniform random pixels and labels): speed does not depend on the pixels.
Torch is imported only inside the reference section; without it those entries say so.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import platform
import statistics
import sys
import time
import traceback

import numpy as np

NUM_CLASSES = 9  # PathMNIST
IMAGE_SHAPE = (28, 28, 3)
TARGET_EPOCH_S = 3.0
TARGET_SPEEDUP = 1.5


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
  p.add_argument("--sections", default="all",
                 help="comma-separated subset of: lsanet,torch,epoch,plain (default all)")
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
  sections = {"lsanet", "torch", "epoch", "plain"}
  chosen = sections if args.sections == "all" else set(args.sections.split(","))
  if not chosen <= sections:
    p.error(f"unknown --sections {sorted(chosen - sections)}; choose from {sorted(sections)}")
  args.sections = chosen
  sizes = SMALL if args.small else FULL
  overrides = {k: v for k, v in (("width", args.width), ("step_batch", args.step_batch),
                                 ("epoch_images", args.epoch_images)) if v is not None}
  for name, value in overrides.items():
    if not value > 0:
      p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
  args.sizes = dataclasses.replace(sizes, **overrides)
  return args


def synthetic_batch(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, (n, 1)).astype(np.int32)
  return images, labels


def time_chunks(run_chunk, sync, sizes: Sizes, budget_s: float) -> list[float]:
  """Seconds per step of each timed chunk (at least 3 chunks, more while the budget lasts)."""
  per_step = []
  started = time.perf_counter()
  while len(per_step) < sizes.chunks and (len(per_step) < 3 or time.perf_counter() - started < budget_s):
    t0 = time.perf_counter()
    run_chunk(sizes.chunk)
    sync()
    per_step.append((time.perf_counter() - t0) / sizes.chunk)
  return per_step


def step_summary(per_step: list[float], batch: int, compile_s: float, **extra) -> dict:
  median = statistics.median(per_step)
  return {"images_per_s": batch / median, "step_ms_median": 1e3 * median,
          "step_ms_min": 1e3 * min(per_step), "timed_chunks": len(per_step), "batch": batch,
          "compile_s": compile_s, **extra}


# ------------------------------------------------------------------------------------- ours (JAX)
_INITIAL_VARIABLES = {}


def initial_state(model, tx, variant: str, width: float) -> dict:
  """create_train_state with the initial weights computed once per (variant, width): compiling
  the initialiser took several seconds of every entry on the H100, and fp32/bf16 share the
  float32 weights."""
  from lsanet_jax import train
  key = (variant, width)
  if key not in _INITIAL_VARIABLES:
    _INITIAL_VARIABLES[key] = train.init_variables(model, IMAGE_SHAPE, train.init_key(0))
  return train.create_train_state(model, tx, IMAGE_SHAPE, None, variables=_INITIAL_VARIABLES[key])


def flax_step(variant: str, bf16: bool, sizes: Sizes, budget_s: float, step_loop: str = "scan") -> dict:
  """Our real train_step (loss, LSA weights, Adam) on one fixed batch, the state donated.

  step_loop "scan": each call runs `chunk` steps in one lax.scan, the way make_train_epoch runs
  training (no Python between steps); "call": one jitted call per step, which adds the dispatch
  of the whole state pytree (about a thousand arrays with the DKS branches) to every step."""
  import jax
  import optax
  from lsanet_jax import train

  config = train.TrainConfig(width=sizes.width, batch_size=sizes.step_batch, bf16=bf16,
                             **train.VARIANTS[variant])
  model = train.build_model(config, NUM_CLASSES)
  tx = optax.adam(config.learning_rate)
  state = initial_state(model, tx, variant, sizes.width)
  state = {k: state[k] for k in train.STEP_STATE_KEYS}
  images, labels = map(jax.device_put, synthetic_batch(sizes.step_batch))
  key = jax.random.key(0)
  one_step = functools.partial(train.train_step, model=model, tx=tx, config=config, task="multi-class")
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
      holder["state"], parts = compiled(holder["state"], images, labels, key)
    holder["parts"] = parts

  sync = lambda: jax.block_until_ready(holder["state"])
  run_chunk(max(sizes.warmup_steps, steps_per_call))
  sync()
  per_step = time_chunks(run_chunk, sync, sizes, budget_s)
  loss = float(holder["parts"]["loss"])
  return step_summary(per_step, sizes.step_batch, compile_s, variant=variant,
                      dtype="bf16 compute, fp32 params" if bf16 else "fp32",
                      step_loop=(f"lax.scan of {steps_per_call} steps per call" if step_loop == "scan"
                                 else "one jitted call per step"),
                      params=train.count_params(state["params"]), last_loss=loss,
                      heads=train.head_names(model.resolved_aux_stages(), config.lsa))


# ----------------------------------------------------------------------------- PyTorch reference
def torch_resnet18(num_classes: int, width: float):
  """ResNet-18 with MedMNIST's 28-px stem (3x3 stride-1 conv, no max-pool): torchvision's when it
  is importable and width is 1, else an identical hand-written one (that also takes a width)."""
  from torch import nn

  if width == 1.0:
    try:
      import torchvision
      model = torchvision.models.resnet18(num_classes=num_classes)
      model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
      model.maxpool = nn.Identity()
      return model, f"torchvision {torchvision.__version__} resnet18, 28-px stem"
    except ImportError:
      pass

  def scaled(c):
    return max(1, int(round(c * width)))

  class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return self.relu(out + identity)

  widths = [scaled(c) for c in (64, 128, 256, 512)]
  layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
  cin = widths[0]
  for i, w in enumerate(widths):
    stride = 1 if i == 0 else 2
    layers += [BasicBlock(cin, w, stride), BasicBlock(w, w, 1)]
    cin = w
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
  return nn.Sequential(*layers), f"hand-written torch ResNet-18 (torchvision layout), 28-px stem, width {width}"


def torch_step(bf16: bool, sizes: Sizes, budget_s: float) -> dict:
  import torch
  import torch.nn.functional as F

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  model, source = torch_resnet18(NUM_CLASSES, sizes.width)
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
        loss = F.cross_entropy(model(x), y)
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


# ------------------------------------------------------------------------------------ epoch (ours)
def flax_epoch(bf16: bool, sizes: Sizes, budget_s: float, batch: int = 0) -> dict:
  """One epoch with make_train_epoch's scan loop, the training set resident on the device."""
  import jax
  import optax
  from lsanet_jax import train

  batch = batch or sizes.epoch_batch or train.TrainConfig().batch_size
  config = train.TrainConfig(width=sizes.width, batch_size=batch, bf16=bf16, epoch_loop="scan",
                             **train.VARIANTS["lsanet"])
  model = train.build_model(config, NUM_CLASSES)
  images, labels = map(jax.device_put, synthetic_batch(sizes.epoch_images, seed=1))
  steps = -(-sizes.epoch_images // min(batch, sizes.epoch_images))
  tx = optax.adam(train.learning_rate_schedule(config, steps))
  train_epoch, steps = train.make_train_epoch(model, tx, config, "multi-class", sizes.epoch_images,
                                              "scan")
  state = initial_state(model, tx, "lsanet", sizes.width)
  t0 = time.perf_counter()
  compiled = train_epoch.lower(state, images, labels, train.epoch_key(0, 1)).compile()
  compile_s = time.perf_counter() - t0
  times, losses = [], []
  started = time.perf_counter()
  for epoch in range(1, 2 + sizes.timed_epochs):
    if epoch > 2 and time.perf_counter() - started > budget_s:
      break
    t0 = time.perf_counter()
    state, metrics = compiled(state, images, labels, train.epoch_key(0, epoch))
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
  return {"seconds_per_epoch": times[1], "epoch_seconds": times, "compile_s": compile_s,
          "images": sizes.epoch_images, "batch": batch, "steps": steps,
          "images_per_s": sizes.epoch_images / times[1], "mean_loss_per_epoch": losses,
          "dtype": "bf16 compute, fp32 params" if bf16 else "fp32", "epoch_loop": "scan",
          "target_s": TARGET_EPOCH_S, "meets_target": times[1] <= TARGET_EPOCH_S}


# ------------------------------------------------------------------------------------------ driver
def environment() -> dict:
  import jax
  import flax
  info = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind}
  return info


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
    best_ours = max(("lsanet_fp32", "lsanet_bf16"), key=lambda n: rate(n) or 0)
    out["lsanet_best_over_torch_best"] = max(ours_rates) / max(torch_rates)
    out["lsanet_best_is"] = best_ours
    out["target"] = TARGET_SPEEDUP
    out["meets_target"] = max(ours_rates) / max(torch_rates) >= TARGET_SPEEDUP
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  sizes = args.sizes
  started = time.perf_counter()
  report = {"benchmark": "lsanet_speed", "small": args.small, "sizes": dataclasses.asdict(sizes),
            "data": "synthetic uniform random uint8 images (28x28x3) and labels (9 classes)",
            "step": {}, "epoch": {}, "errors": {}, "skipped": {}, "notes": []}

  def save():
    report["total_s"] = time.perf_counter() - started
    text = json.dumps(report, indent=2, default=str)
    if args.out:
      pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
      pathlib.Path(args.out).write_text(text + "\n")
    return text

  try:
    report["environment"] = environment()
  except Exception as e:  # noqa: BLE001 - the report must still come out
    report["errors"]["environment"] = f"{type(e).__name__}: {e}"

  entries = []
  if "lsanet" in args.sections:
    entries += [("step", "lsanet_bf16", lambda b: flax_step("lsanet", True, sizes, b, args.step_loop)),
                ("step", "lsanet_fp32", lambda b: flax_step("lsanet", False, sizes, b, args.step_loop))]
  if "torch" in args.sections:
    entries += [("step", "torch_fp32", lambda b: torch_step(False, sizes, b)),
                ("step", "torch_bf16", lambda b: torch_step(True, sizes, b))]
  if "epoch" in args.sections:
    entries += [("epoch", "lsanet_bf16", lambda b: flax_epoch(True, sizes, b)),
                ("epoch", "lsanet_fp32", lambda b: flax_epoch(False, sizes, b))]
  if "plain" in args.sections:
    entries += [("step", "plain_bf16", lambda b: flax_step("plain", True, sizes, b, args.step_loop)),
                ("step", "plain_fp32", lambda b: flax_step("plain", False, sizes, b, args.step_loop))]
  if "epoch" in args.sections and not args.small:  # context: the same epoch at the step batch
    entries += [("epoch", f"lsanet_bf16_batch{sizes.step_batch}",
                 lambda b: flax_epoch(True, sizes, b, batch=sizes.step_batch))]

  if args.only:
    wanted = set(args.only.split(","))
    unknown = wanted - {f"{g}/{n}" for g, n, _ in entries}
    if unknown:
      report["errors"]["--only"] = f"no such entries {sorted(unknown)} in --sections {sorted(args.sections)}"
    entries = [e for e in entries if f"{e[0]}/{e[1]}" in wanted]
  torch_missing = None
  for group, name, run in entries:
    label = f"{group}/{name}"
    if name.startswith("torch"):
      if args.no_torch:
        report["skipped"][label] = "--no-torch"
        continue
      if torch_missing is None:
        try:
          import torch  # noqa: F401
          torch_missing = False
        except ImportError as e:
          torch_missing = True
          report["notes"].append(f"PyTorch is not installed ({e}): no PyTorch reference columns")
      if torch_missing:
        report["skipped"][label] = "torch not installed"
        continue
    if time.perf_counter() - started > args.total_budget:
      report["skipped"][label] = f"--total-budget {args.total_budget:.0f} s used up"
      continue
    t0 = time.perf_counter()
    try:
      report[group][name] = run(args.section_budget)
      report[group][name]["section_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - one failing entry must not cost the others
      report["errors"][label] = f"{type(e).__name__}: {e}"
      report["errors"][label + "_traceback"] = traceback.format_exc(limit=8)
    print(f"[lsanet_speed] {label} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    report["ratios"] = ratios(report["step"])
    save()

  report["ratios"] = ratios(report["step"])
  report["compile_s"] = {f"{g}/{n}": e.get("compile_s") for g in ("step", "epoch")
                         for n, e in report[g].items() if e.get("compile_s") is not None}
  if args.small:
    report["notes"].append("--small: CPU-sized model and data; the targets apply to the full sizes "
                           "on an accelerator only")
  print(save())
  return 0


if __name__ == "__main__":
  sys.exit(main())
