#!/usr/bin/env python
"""Why LSA's layer weights stay near 1/3: two focused experiments (docs/lsanet.md, "LSA layer weights").

    python scripts/lsanet_lsa_probe.py synthetic            # the LSA module alone, seconds
    python scripts/lsanet_lsa_probe.py run runs/digits      # a finished lsanet-train run (its last checkpoint)

``synthetic`` trains the LSA module (lsanet_jax.lsa.LayerSelectiveAttention with its fused classifier)
alone on three branches of synthetic features, with cross-entropy on the fused head and Adam: branches
of different usefulness (pure noise, weak class signal, strong class signal) and, as the control, three
equally useful branches. It prints the layer weights (α averaged over samples and channels, what
metrics.jsonl logs) after a number of steps, for the default step size and for variations: more steps,
a 10x step size on the selection layer, a lower softmax temperature.

``run WORKDIR`` reads the run's settings from its summary.json and its last checkpoint, and prints, on the
validation images, α at initialisation (same seed) and at the end: the layer weights, how selective α is
per channel (averaged over samples) and per sample and channel (largest weight, entropy over layers), how
far the selection layer moved from its initial values, and the gradient norms that reach it.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np


def synthetic(steps: int = 80, *, strengths=(0.0, 0.5, 1.5), lr: float = 1e-3, select_lr_mult: float = 1.0,
              temperature: float = 1.0, dim: int = 32, seed: int = 0, num: int = 512, classes: int = 4,
              features: int = 24) -> dict:
  """Trains the LSA module alone on branch features relu(strength_i * prototype_i[y] + noise); returns the
  layer weights at the first and the last step, the last loss and the mean largest per-sample weight."""
  import jax
  import jax.numpy as jnp
  import optax

  from lsanet_jax.lsa import LayerSelectiveAttention

  rng = np.random.default_rng(seed)
  y = jnp.asarray(rng.integers(0, classes, num))
  prototypes = rng.normal(size=(len(strengths), classes, features))
  feats = [jnp.asarray(np.maximum(0, s * prototypes[i][np.asarray(y)] + rng.normal(size=(num, features))),
                       jnp.float32) for i, s in enumerate(strengths)]
  lsa = LayerSelectiveAttention(classes, dim=dim)
  variables = lsa.init(jax.random.key(seed), feats, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  labels = jax.tree_util.tree_map_with_path(lambda p, _: "select" if p[0].key == "select" else "rest", params)
  tx = optax.multi_transform({"select": optax.adam(lr * select_lr_mult), "rest": optax.adam(lr)}, labels)
  opt_state = tx.init(params)

  def loss_fn(p, batch_stats):
    if temperature != 1.0:  # logits / T: the select layer's kernel and bias scaled by 1/T
      p = dict(p, select={k: w / temperature for k, w in p["select"].items()})
    (logits, alpha), updates = lsa.apply({"params": p, "batch_stats": batch_stats}, feats, train=True,
                                         mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (alpha, updates["batch_stats"])

  @jax.jit
  def step(p, opt_state, batch_stats):
    (loss, (alpha, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch_stats)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, batch_stats, loss, alpha

  first = None
  for _ in range(steps):
    params, opt_state, batch_stats, loss, alpha = step(params, opt_state, batch_stats)
    if first is None:
      first = np.asarray(alpha).mean(axis=(0, 2))
  alpha = np.asarray(alpha)
  return {"steps": steps, "strengths": list(strengths), "lr": lr, "select_lr_mult": select_lr_mult,
          "temperature": temperature, "layer_weights_first_step": [round(float(w), 3) for w in first],
          "layer_weights_last_step": [round(float(w), 3) for w in alpha.mean(axis=(0, 2))], "loss": round(float(loss), 4),
          "per_sample_max_weight": round(float(alpha.max(axis=1).mean()), 3)}


SYNTHETIC_SETTINGS = (
    dict(steps=80), dict(steps=1000), dict(steps=80, select_lr_mult=10.0), dict(steps=80, temperature=0.2),
    dict(steps=80, strengths=(1.0, 1.0, 1.0)), dict(steps=1000, strengths=(1.0, 1.0, 1.0)),
)


def alpha_statistics(alpha: np.ndarray) -> dict:
  """alpha (N, L, d): layer weights (mean over samples and channels), selectivity per channel after
  averaging over samples, per sample and channel (largest weight, entropy over layers / log L), and how
  much α varies over samples."""
  per_channel = alpha.mean(axis=0)  # (L, d)
  entropy = -(alpha * np.log(np.clip(alpha, 1e-12, None))).sum(axis=1) / np.log(alpha.shape[1])
  return {"layer_weights": [round(float(w), 4) for w in alpha.mean(axis=(0, 2))],
          "channel_mean_max_weight": round(float(per_channel.max(axis=0).mean()), 3),
          "channel_spread_per_layer": [round(float(w), 3) for w in per_channel.std(axis=1)],
          "sample_channel_max_weight": round(float(alpha.max(axis=1).mean()), 3),
          "sample_channel_entropy": round(float(entropy.mean()), 4),
          "std_over_samples": round(float(alpha.std(axis=0).mean()), 4)}


def probe_run(workdir) -> dict:
  """α statistics of a finished run's last checkpoint against its initialisation, on validation images."""
  import jax
  import jax.numpy as jnp
  import optax

  from lsanet_jax import steps, train
  from lsanet_jax.config import TrainConfig
  from lsanet_jax.losses import lsanet_loss
  from runkit.checkpoint import Checkpointer
  from runkit.cli import CHECKPOINT_SUBDIR
  from runkit.config import resume_fingerprint

  workdir = pathlib.Path(workdir)
  summary = json.loads((workdir / "summary.json").read_text())
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in summary["config"].items()}
  config = TrainConfig(**fields)
  if not config.lsa:
    raise SystemExit(f"error: {workdir} is a run without LSA")
  data = train.load_data(config)
  model = train.build_model(config, data.n_classes)
  num_train = summary["num_train"]
  tx = optax.adam(train.learning_rate_schedule(config, steps.steps_per_epoch(config.batch_size, num_train)))
  init = train.create_train_state(model, tx, data.train_images.shape[1:], train.init_key(config.seed))
  fingerprint, defaults = resume_fingerprint(config)
  with Checkpointer(workdir / CHECKPOINT_SUBDIR, keep=config.keep_checkpoints, config=fingerprint,
                    config_defaults=defaults) as checkpointer:
    final, next_epoch, _ = train.restore_checkpoint(checkpointer, init)
  x = steps.preprocess(jnp.asarray(data.val_images))
  rows = train.label_fraction_subset(data.train_labels, config.label_fraction, config.data_seed, data.task)
  batch = rows[:config.batch_size]
  xb, yb = jnp.asarray(data.train_images[batch]), jnp.asarray(data.train_labels[batch])
  out = {"workdir": str(workdir), "epoch": next_epoch - 1, "lsa_dim": config.lsa_dim}
  for name, state in (("init", init), ("end", final)):
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    alpha = np.asarray(model.apply(variables, x, train=False)["lsa_alpha"])

    def loss_fn(params, state=state):
      outputs, _ = model.apply({"params": params, "batch_stats": state["batch_stats"]}, steps.preprocess(xb),
                               train=True, mutable=["batch_stats"])
      return lsanet_loss(outputs, yb, data.task, dynamic_weights=config.dynamic_aux_weights,
                         synergy=config.synergy)[0]

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    out[name] = {**alpha_statistics(alpha), "train_batch_loss": round(float(loss), 4),
                 "grad_norm": {"lsa.select.kernel": float(jnp.linalg.norm(grads["lsa"]["select"]["kernel"])),
                               "lsa.select.bias": float(jnp.linalg.norm(grads["lsa"]["select"]["bias"])),
                               "lsa.classifier.kernel": float(jnp.linalg.norm(grads["lsa"]["classifier"]["kernel"])),
                               "head.classifier.kernel": float(jnp.linalg.norm(grads["head"]["classifier"]["kernel"]))}}
  select0, select1 = init["params"]["lsa"]["select"], final["params"]["lsa"]["select"]
  out["select_moved"] = {k: {"init_norm": float(jnp.linalg.norm(select0[k])),
                             "change_norm": float(jnp.linalg.norm(select1[k] - select0[k]))} for k in select0}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="what", required=True)
  sub.add_parser("synthetic", help="the LSA module alone on synthetic branches")
  r = sub.add_parser("run", help="a finished lsanet-train run")
  r.add_argument("workdir")
  args = p.parse_args(argv)
  if args.what == "synthetic":
    for setting in SYNTHETIC_SETTINGS:
      print(json.dumps(synthetic(**setting)), flush=True)
  else:
    print(json.dumps(probe_run(args.workdir), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
