"""How far apart do keys end up inside a keyed model? (docs/design.md, "The known weakness".)

The model sees the key only through the 16-dim vector k (a mean over 128 points of a smooth
function), so different keys can give nearly the same k and nearly the same keyed weights.
``key_sensitivity`` measures it for given variables; it reports, it does not judge.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from infl_jax.keyed.transform import key_vector, keyed_weights


def _cosine(a, b) -> float:
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _relative_difference(reference: dict, other: dict, index: int) -> float:
  ref = np.concatenate([np.asarray(reference[p][index]).ravel() for p in sorted(reference)])
  oth = np.concatenate([np.asarray(other[p][index]).ravel() for p in sorted(reference)])
  return float(np.linalg.norm(oth - ref) / np.linalg.norm(ref))


def key_sensitivity(
    variables: Mapping,
    right_key_coords: Any,
    other_keys: Mapping[str, Any],
    key_strength: float,
    *,
    model=None,
    x=None,
) -> dict[str, dict[str, float]]:
  """For each other key (``None`` = no INR path), compared with the right key:

  ``k_cosine`` (cosine similarity of the key vectors; absent for ``None``), ``weight_rel_diff``
  and ``bias_rel_diff`` (||W_eff(other) - W_eff(right)|| / ||W_eff(right)|| over all keyed Dense
  layers), and, when ``model`` and ``x`` are given, ``output_rel_diff`` of the model's outputs
  (eval mode, FiLM included).
  """
  right_k = key_vector(variables, right_key_coords)
  right_w = keyed_weights(variables, right_key_coords, key_strength)
  right_y = None
  if model is not None and x is not None:
    right_y = model.apply(variables, x, key_coords=right_key_coords)
  report = {}
  for name, coords in other_keys.items():
    w = keyed_weights(variables, coords, key_strength)
    row = {
        "weight_rel_diff": _relative_difference(right_w, w, 0),
        "bias_rel_diff": _relative_difference(right_w, w, 1),
    }
    if coords is not None:
      row["k_cosine"] = _cosine(right_k, key_vector(variables, coords))
    if right_y is not None:
      y = model.apply(variables, x, key_coords=coords)
      row["output_rel_diff"] = float(jnp.linalg.norm(y - right_y) / jnp.linalg.norm(right_y))
    report[name] = row
  return report
