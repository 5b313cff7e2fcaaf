"""The classification metrics (numpy) against scikit-learn's, and the shape buckets of inference."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

from infl_jax.tasks.classification import binary_auc, classification_metrics, cross_entropy, softmax


def _sklearn_metrics(y, logits, num_classes):
  probs = softmax(logits)
  present = [c for c in range(num_classes) if 0 < np.sum(y == c) < len(y)]
  if num_classes == 2:
    auc = roc_auc_score(y == 1, probs[:, 1])
  else:
    counts = np.array([np.sum(y == c) for c in present], float)
    auc = np.dot([roc_auc_score(y == c, probs[:, c]) for c in present], counts) / counts.sum()
  return {"accuracy": accuracy_score(y, probs.argmax(-1)),
          "f1_weighted": f1_score(y, probs.argmax(-1), average="weighted", labels=np.arange(num_classes),
                                  zero_division=0),
          "auc_weighted": auc}


@pytest.mark.parametrize("num_classes,n,ties", [(2, 30, False), (2, 41, True), (5, 60, False), (7, 25, True)])
def test_metrics_equal_sklearn(num_classes, n, ties):
  rng = np.random.default_rng(num_classes * 100 + n)
  y = rng.integers(0, num_classes, n)
  y[:2] = [0, 1]
  logits = rng.normal(size=(n, num_classes))
  if ties:  # coarse logits: many tied scores, which AUC counts one half
    logits = np.round(logits)
  ours = classification_metrics(y, logits, num_classes)
  ref = _sklearn_metrics(y, logits, num_classes)
  for name in ref:
    assert ours[name] == pytest.approx(ref[name], abs=1e-12), name
  assert cross_entropy(logits, y) == pytest.approx(log_loss(y, softmax(logits), labels=np.arange(num_classes)))


def test_auc_by_hand_and_absent_class():
  # Positives score 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4, 0.9>0.1, 0.4=0.4 -> 1/2, 0.4>0.1) = 3.5 / 4.
  assert binary_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.4, 0.1])) == 0.875
  y = np.array([0, 0, 1, 1])  # class 2 absent: its AUC is undefined and left out, its F1 weight is 0
  logits = np.array([[3.0, 0, 0], [0, 3, 0], [0, 3, 0], [0, 0, 3]])
  m = classification_metrics(y, logits, 3)
  assert m["accuracy"] == 0.5
  assert m["f1_weighted"] == pytest.approx(f1_score(y, logits.argmax(-1), average="weighted", labels=[0, 1, 2],
                                                    zero_division=0))
