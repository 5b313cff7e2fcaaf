"""The mixed key scheme against the hardened one: the key holder's cost and the attacks on the input transform,
paired over seeds (docs/privacy.md, "The mixed scheme").

    python scripts/infl_mixing_study.py --seeds 0 1 2 3 4 -- --dataset proteomics

Per seed, ``infl-train``'s preset (the flags after ``--``) is trained under ``--key-scheme hardened`` and
``mixed`` with the same split, initialisation and seeded key (``infl_seed_study.key_study``: right key, guessed
keys, no key, and the adaptive attacker with ``--adaptive-samples`` labelled validation samples). Then, on each
trained model, the transform itself is attacked from the analytic attack's reconstructions of every training
sample's batch-1 gradient (on one common scale, ``public_panel.common_scale_inputs``; the same number of samples
under both schemes), with validation + test as the attacker's public panel:

- ``public_panel``: the signed-permutation matcher (``attacks.public_panel``);
- ``covariance``: principal-axis alignment (``attacks.covariance_alignment``), for any orthogonal transform, with
  the number of axes k it chooses on its panel, and (``covariance_k{k}_abs_r``) with k fixed at 4, 8, 16 and 32;
- ``random_guess``: a random signed permutation (chance); ``public_prior``: the panel's first axis, no observation.

Each is scored by ``feature_identity`` (share of features whose reconstruction is mostly that feature; chance
about 1/F), the median |Pearson| of the reconstructions with the true samples, and the test accuracy of the model
queried through the guess with the adaptive attacker's prior key vector (no key, no label; the attacker picks the
global sign, which ``x / kappa`` leaves open, as the one the model is more confident under). Prints one JSON line
per seed and scheme, then a summary line (mean, std with ddof 1, per-seed values; ``mixed_minus_hardened``
paired).
"""

import argparse
import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from infl_seed_study import adaptive_accuracy, config_for_seed, headline, trained_classifier
from infl_jax import keys as keylib
from infl_jax.attacks import adaptive, analytic, covariance_alignment as ca, gradient_inversion as gi, metrics
from infl_jax.attacks import public_panel as pp
from infl_jax.key_scheme import client_view, scramble, unscramble
from infl_jax.main import train_and_evaluate
from infl_jax.privacy.attack_models import attack_programs, split_test_accuracy
from infl_jax.tasks.classification import load_data
from infl_jax.tasks.label_skew import fit_to_federation
from runkit.cli import run_cli

SCHEMES = ("hardened", "mixed")
FIXED_COMPONENTS = (4, 8, 16, 32)


def recovered_inputs(programs, variables, x_model, y, coords, chunk: int = 22) -> np.ndarray:
  """The analytic attack's reading of every sample's batch-1 gradient, on one common scale."""
  kernels, biases = [], []
  for start in range(0, len(x_model), chunk):  # the kernel gradients are [n, F, units]: chunks bound the memory
    observed = programs.observe(variables, jnp.asarray(x_model[start:start + chunk]),
                                jnp.asarray(y[start:start + chunk]), coords)
    kernel, bias = analytic.find_first_layer(observed, programs.first_layer)
    kernels.append(np.asarray(kernel))
    biases.append(np.asarray(bias))
  return np.asarray(pp.common_scale_inputs(jnp.asarray(np.concatenate(kernels)), jnp.asarray(np.concatenate(biases))),
                    np.float64)


def query_accuracy(programs, variables, k0, split, forward, panel) -> float:
  """Test accuracy of the model queried through ``forward`` (raw -> model input), with the global sign the
  model is more confident under on the panel (no label used)."""
  def confidence(sign):
    probs = jax.nn.softmax(programs.logits_with_key_vector(variables, (sign * forward(panel)).astype(np.float32), k0))
    return float(jnp.mean(jnp.max(probs, -1)))

  sign = 1.0 if confidence(1.0) >= confidence(-1.0) else -1.0
  x = (sign * forward(split.test_x)).astype(np.float32)
  return split_test_accuracy(split, programs.logits_with_key_vector(variables, x, k0))


def _scores(name, truth_x, recon, identity, accuracy) -> dict:
  abs_r = float(np.median(metrics.omics_metrics(truth_x, recon)["abs_pearson"]))
  return {f"{name}_identified": identity["identified"], f"{name}_identified_with_sign": identity["identified_with_sign"],
          f"{name}_abs_r": abs_r, f"{name}_accuracy": accuracy}


def attack_transform(model, variables, split, key, scheme: str, seed: int) -> dict:
  """The attacks on the transform of a trained model (module docstring)."""
  f = split.n_features
  truth = client_view(key, scheme, f).scramblers[""]
  programs = attack_programs(model, f, split.n_classes, gi.InversionConfig())
  x, y = split.train_x.astype(np.float64), split.train_y
  panel = np.concatenate([split.val_x, split.test_x]).astype(np.float64)
  recovered = recovered_inputs(programs, variables, scramble(x, truth).astype(np.float32), y, jnp.asarray(key.coords))
  usable = np.any(recovered != 0, axis=1)
  k0 = adaptive.prior_key_vector(variables, key.mode)
  forward = lambda r: scramble(r, truth)
  row = {"recovered_samples": int(usable.sum()), "panel_samples": len(panel),
         # the analytic attack's reading taken as it is, without the key (the table's "inversion without the key")
         "as_read_abs_r": float(np.median(metrics.omics_metrics(x[usable], recovered[usable])["abs_pearson"]))}
  guesses = {"public_panel": pp.public_panel_attack(recovered[usable], panel, pp.PanelConfig(seed=seed)).scrambler,
             "random_guess": pp.random_scrambler(f, np.random.default_rng(seed + 12))}
  for name, guess in guesses.items():
    identity = ca.feature_identity(forward, lambda r, g=guess: unscramble(r, g), f)
    accuracy = query_accuracy(programs, variables, k0, split, lambda r, g=guess: scramble(r, g), panel)
    row.update(_scores(name, x[usable], unscramble(recovered[usable], guess), identity, accuracy))
  alignment = ca.align_covariance(recovered[usable], panel, seed=seed)
  identity = ca.feature_identity(forward, alignment.linear, f)
  accuracy = query_accuracy(programs, variables, k0, split, alignment.forward, panel)
  row.update(_scores("covariance", x[usable], alignment.reconstruct(recovered[usable]), identity, accuracy))
  row["covariance_components"] = alignment.rec_axes.shape[1]
  for k in FIXED_COMPONENTS:  # what the alignment gives with more axes than the attacker's own choice
    fixed = ca.align_covariance(recovered[usable], panel, components=k)
    row[f"covariance_k{k}_abs_r"] = float(np.median(metrics.omics_metrics(
        x[usable], fixed.reconstruct(recovered[usable]))["abs_pearson"]))
  row["public_prior_abs_r"] = float(np.median(metrics.omics_metrics(
      x[usable], pp.public_prior(panel, int(usable.sum())))["abs_pearson"]))
  return row


def run_scheme(train_flags, seed: int, scheme: str, adaptive_samples: int) -> dict:
  config = config_for_seed([*train_flags, "--key-scheme", scheme], seed)
  key = keylib.generate_key(seed=seed)  # seeded on purpose: both schemes get the same key (never saved)
  with tempfile.TemporaryDirectory() as workdir:
    summary = train_and_evaluate(config, workdir, key, show_progress=False)
    row = headline(summary)
    row[f"adaptive_n{adaptive_samples}"] = adaptive_accuracy(config, workdir, key, adaptive_samples)
    split = load_data(config)
    fitted, _ = fit_to_federation(config, split)
    model, variables = trained_classifier(fitted, workdir, key, split)
  row.update(attack_transform(model, variables, split, key, scheme, seed))
  return row


def summarise(rows: list[dict]) -> dict:
  out = {}
  for scheme in SCHEMES:
    mine = [r for r in rows if r["scheme"] == scheme]
    out[scheme] = {k: {"mean": round(float(np.mean([r[k] for r in mine])), 4),
                       "std": round(float(np.std([r[k] for r in mine], ddof=1)), 4) if len(mine) > 1 else None,
                       "per_seed": [round(float(r[k]), 4) for r in mine]}
                   for k, v in mine[0].items() if isinstance(v, (int, float)) and k != "seed"}
  by_seed = {(r["seed"], r["scheme"]): r["right_key"] for r in rows}
  diffs = [by_seed[(s, "mixed")] - by_seed[(s, "hardened")] for s in sorted({r["seed"] for r in rows})]
  out["mixed_minus_hardened_right_key"] = {"mean": round(float(np.mean(diffs)), 4),
                                           "std": round(float(np.std(diffs, ddof=1)), 4) if len(diffs) > 1 else None,
                                           "per_seed": [round(d, 4) for d in diffs]}
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  p.add_argument("--adaptive-samples", type=int, default=20, metavar="N")
  p.add_argument("train_flags", nargs=argparse.REMAINDER, help="infl-train flags, after --")
  args = p.parse_args(argv)
  train_flags = [f for f in args.train_flags if f != "--"] or ["--dataset", "proteomics"]
  rows = []
  for seed in args.seeds:
    for scheme in SCHEMES:
      rows.append({"seed": seed, "scheme": scheme, **run_scheme(train_flags, seed, scheme, args.adaptive_samples)})
      print(json.dumps(rows[-1]), flush=True)
  print(json.dumps(summarise(rows)), flush=True)


if __name__ == "__main__":
  sys.exit(run_cli(main))
