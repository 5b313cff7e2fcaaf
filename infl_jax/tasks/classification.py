"""Sample classification (cohort, cell type): cross-entropy, accuracy, weighted F1 and AUC."""

from __future__ import annotations

import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from infl_jax.federated import Task

__all__ = ["accepts_kwarg", "accepts_mask", "classification_metrics", "classification_task", "predict_logits"]


def accepts_kwarg(model: nn.Module, name: str) -> bool:
  """Whether the model (or the user model that ``keyed`` wraps) takes keyword ``name``."""
  inner = getattr(model, "model", model)
  return name in inspect.signature(type(inner).__call__).parameters


def accepts_mask(model: nn.Module) -> bool:
  """Whether the model takes ``mask=`` to keep padding rows out of BatchNorm statistics."""
  return accepts_kwarg(model, "mask")


def _mode_kwargs(model: nn.Module, train: bool) -> dict:
  return {"train": train} if accepts_kwarg(model, "train") else {}


def classification_task(model: nn.Module) -> Task:
  """Mask-weighted softmax cross-entropy; ``context`` is the key coordinates (None: no INR path).

  ``train=`` and ``mask=`` are passed only to models whose ``__call__`` takes them, so a
  plain user model keyed with ``keyed(...)`` works as it is.
  """
  extra_kwargs = _mode_kwargs(model, True)
  mask_kwarg = accepts_mask(model)

  def loss(params, model_state, batch, mask, rng, context):
    extra = dict(extra_kwargs, **({"mask": mask > 0} if mask_kwarg else {}))
    logits, updates = model.apply({"params": params, **model_state}, batch["x"], key_coords=context,
                                  rngs={"dropout": rng}, mutable=list(model_state.keys()), **extra)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["y"])
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0), updates

  return Task(loss=loss)


def predict_logits(model: nn.Module, variables, x: np.ndarray, key_coords: Any = None,
                   batch_size: int = 4096) -> np.ndarray:
  """Inference-mode logits, in fixed-size batches so one compiled function serves any input size."""
  mode = _mode_kwargs(model, False)
  apply = jax.jit(lambda v, xb, c: model.apply(v, xb, key_coords=c, **mode))
  x = np.asarray(x, np.float32)
  n = x.shape[0]
  size = min(batch_size, n)
  out = []
  for start in range(0, n, size):
    xb = x[start:start + size]
    pad = size - xb.shape[0]
    xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)]) if pad else xb
    out.append(np.asarray(apply(variables, xb, key_coords))[: size - pad])
  return np.concatenate(out)


def classification_metrics(y_true: np.ndarray, logits: np.ndarray, num_classes: int) -> dict[str, float]:
  """Accuracy, weighted F1, and one-vs-rest ROC AUC weighted by class prevalence.

  AUC is averaged over the classes present in ``y_true`` (a class absent from a small
  test split has no defined AUC), each weighted by its count, as scikit-learn's
  ``average="weighted"`` does.
  """
  from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

  y_true = np.asarray(y_true)
  logits = np.asarray(logits, np.float64)
  if logits.shape != (y_true.shape[0], num_classes):
    raise ValueError(f"logits have shape {logits.shape}, expected ({y_true.shape[0]}, {num_classes})")
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  pred = probs.argmax(-1)
  present = [c for c in range(num_classes) if 0 < np.sum(y_true == c) < len(y_true)]
  if present:
    counts = np.array([np.sum(y_true == c) for c in present], np.float64)
    aucs = np.array([roc_auc_score(y_true == c, probs[:, c]) for c in present])
    auc = float(np.sum(aucs * counts) / counts.sum())
    if num_classes == 2:
      auc = float(roc_auc_score(y_true == 1, probs[:, 1]))
  else:
    auc = float("nan")
  return {
      "accuracy": float(accuracy_score(y_true, pred)),
      "f1_weighted": float(f1_score(y_true, pred, average="weighted", labels=np.arange(num_classes),
                                    zero_division=0)),
      "auc_weighted": auc,
  }
