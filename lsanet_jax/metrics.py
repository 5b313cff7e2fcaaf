"""The official MedMNIST ACC and AUC (medmnist.Evaluator's getACC/getAUC), on numpy arrays.

Scores are probabilities: softmax outputs for multi-class, binary and ordinal tasks, sigmoid outputs
for multi-label. AUC: binary uses the last score column; multi-label averages per-label AUCs;
multi-class and ordinal average one-vs-rest AUCs. ACC: argmax; binary `score[:, -1] > 0.5`;
multi-label per-label accuracy at 0.5, averaged over labels.

One deliberate difference: where a class (or label) has only one value in y_true its AUC is
undefined and the official code raises; here it is left out of the average (NaN if none is left),
so small label-fraction validation splits do not crash a run.
"""
from __future__ import annotations

import numpy as np

TASKS = ("binary-class", "multi-class", "multi-label, binary-class", "ordinal-regression")


def _check(y_true, y_score, task):
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; one of {TASKS}")
  y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)
  if y_score.ndim == 1:
    y_score = y_score[:, None]
  if y_true.shape[0] != y_score.shape[0]:
    raise ValueError(f"y_true has {y_true.shape[0]} rows, y_score {y_score.shape[0]}")
  if task == "multi-label, binary-class":
    y_true = y_true.reshape(y_score.shape)
  else:
    y_true = y_true.reshape(-1)
  return y_true, y_score


def _mean_defined_auc(columns):
  from sklearn.metrics import roc_auc_score  # here, not at the top: importing scikit-learn costs every CLI start ~3 s

  aucs = [roc_auc_score(t, s) for t, s in columns if 0 < np.sum(t) < len(t)]
  return float(np.mean(aucs)) if aucs else float("nan")


def auc(y_true, y_score, task: str) -> float:
  y_true, y_score = _check(y_true, y_score, task)
  if task == "multi-label, binary-class":
    return _mean_defined_auc((y_true[:, i], y_score[:, i]) for i in range(y_score.shape[1]))
  if task == "binary-class":
    return _mean_defined_auc([(y_true, y_score[:, -1])])
  return _mean_defined_auc(((y_true == i).astype(float), y_score[:, i])
                           for i in range(y_score.shape[1]))


def acc(y_true, y_score, task: str, threshold: float = 0.5) -> float:
  y_true, y_score = _check(y_true, y_score, task)
  if task == "multi-label, binary-class":
    return float(np.mean(np.mean((y_score > threshold) == y_true.astype(bool), axis=0)))
  if task == "binary-class":
    return float(np.mean((y_score[:, -1] > threshold) == y_true.astype(bool)))
  return float(np.mean(np.argmax(y_score, axis=-1) == y_true))


def evaluate(y_true, y_score, task: str) -> dict:
  return {"acc": acc(y_true, y_score, task), "auc": auc(y_true, y_score, task)}
