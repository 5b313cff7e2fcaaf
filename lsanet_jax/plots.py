"""PNG figures of a run from its metrics.jsonl rows: training curves and LSA layer weights."""
from __future__ import annotations

import pathlib


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # files only; no display on servers
  import matplotlib.pyplot as plt
  return plt


def plot_training_curves(rows: list[dict], path, step: str = "epoch") -> pathlib.Path:
  """Loss (total and per head) and validation AUC/ACC per head over epochs (or rows' ``step``, e.g. round)."""
  plt = _pyplot()
  epochs = [r[step] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for key in sorted(k for k in rows[0] if k.startswith("loss")):
    axes[0].plot(epochs, [r.get(key) for r in rows], label=key.replace("loss_", "") if key != "loss" else "total")
  axes[0].set(title="training loss", xlabel=step, yscale="log")
  validated = [r for r in rows if any(k.startswith("val_") for k in r)]  # every --eval-every epochs
  for ax, metric in zip(axes[1:], ("auc", "acc")):
    for key in sorted(k for k in (validated or [{}])[0] if k.startswith(f"val_{metric}_")):
      ax.plot([r[step] for r in validated], [r.get(key) for r in validated], marker=".",
              label=key.split("_", 2)[2])
    ax.set(title=f"validation {metric.upper()}", xlabel=step)
  for ax in axes:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_lsa_weights(rows: list[dict], path) -> pathlib.Path | None:
  """Mean LSA layer weight of every branch over epochs (None when the run has no LSA)."""
  keys = sorted(k for k in rows[0] if k.startswith("lsa_weight_")) if rows else []
  if not keys:
    return None
  plt = _pyplot()
  epochs = [r["epoch"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4))
  for key in keys:
    ax.plot(epochs, [r.get(key) for r in rows], marker="o", label=key.replace("lsa_weight_", ""))
  ax.set(title="LSA layer weights (mean over batch and channels)", xlabel="epoch", ylabel="weight")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
