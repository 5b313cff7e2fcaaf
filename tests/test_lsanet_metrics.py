"""Official MedMNIST ACC/AUC on hand-computed cases for all four task types."""
import numpy as np
import pytest

from lsanet_jax.metrics import acc, auc, evaluate


def test_binary_uses_last_column():
  y = np.array([[0], [0], [1], [1]])
  score = np.array([[0.9, 0.1], [0.4, 0.6], [0.65, 0.35], [0.2, 0.8]])
  # positives' scores 0.35, 0.8 vs negatives' 0.1, 0.6: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.6 -> 3/4
  assert auc(y, score, "binary-class") == pytest.approx(0.75)
  # thresholds at 0.5 on column -1: predictions 0, 1, 0, 1 -> 2/4 correct
  assert acc(y, score, "binary-class") == pytest.approx(0.5)


def test_multiclass_is_mean_one_vs_rest_auc_and_argmax_acc():
  y = np.array([[0], [1], [2], [2]])
  score = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6], [0.1, 0.7, 0.2]])
  # class 0: pos 0.6 vs neg 0.5, 0.2, 0.1 -> 1; class 1: pos 0.4 vs 0.3, 0.2, 0.7 -> 2/3;
  # class 2: pos 0.6, 0.2 vs neg 0.1, 0.1 -> 1
  assert auc(y, score, "multi-class") == pytest.approx((1 + 2 / 3 + 1) / 3)
  assert acc(y, score, "multi-class") == pytest.approx(0.5)  # argmax 0, 0, 2, 1


def test_ordinal_regression_is_scored_like_multiclass():
  y = np.array([[0], [1], [2], [2]])
  score = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6], [0.1, 0.7, 0.2]])
  assert evaluate(y, score, "ordinal-regression") == evaluate(y, score, "multi-class")


def test_multilabel_averages_per_label_auc_and_acc():
  y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
  score = np.array([[0.9, 0.2], [0.3, 0.4], [0.4, 0.7], [0.1, 0.6]])
  # label 0: pos 0.9, 0.4 vs neg 0.3, 0.1 -> 1; label 1: pos 0.4, 0.7 vs neg 0.2, 0.6 -> 3/4
  assert auc(y, score, "multi-label, binary-class") == pytest.approx((1 + 0.75) / 2)
  # label 0 preds 1,0,0,0 -> 3/4; label 1 preds 0,0,1,1 -> 2/4
  assert acc(y, score, "multi-label, binary-class") == pytest.approx((0.75 + 0.5) / 2)


def test_undefined_class_auc_is_left_out_not_a_crash():
  y = np.array([[0], [0], [1]])  # class 2 absent
  score = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
  assert auc(y, score, "multi-class") == pytest.approx(1.0)


def test_bad_inputs():
  with pytest.raises(ValueError, match="unknown task"):
    auc(np.zeros((2, 1)), np.zeros((2, 2)), "regression")
  with pytest.raises(ValueError, match="rows"):
    acc(np.zeros((3, 1)), np.zeros((2, 2)), "multi-class")
