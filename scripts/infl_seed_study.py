"""Test accuracy of infl-train's presets over several seeds, as the figures in the README were made.

    python scripts/infl_seed_study.py --dataset proteomics --seeds 0 1 2 3 4
    python scripts/infl_seed_study.py --dataset proteomics --seeds 0 1 2 3 4 --hardened-cost

Prints one JSON line per seed, then one with mean, std (ddof 1) and the per-seed values.
``--hardened-cost`` instead trains the key holder's model on the faithful and on the hardened
(input-scrambled) split with the same seed and reports both right-key accuracies.
"""

import argparse
import json
import tempfile

import jax
import numpy as np

from infl_jax import keys as keylib
from infl_jax.config import TrainConfig
from infl_jax.federated import global_variables
from infl_jax.main import train_and_evaluate
from infl_jax.tasks import classification


def key_study(dataset: str, seed: int) -> dict:
  config = TrainConfig.for_dataset(dataset, seed=seed, eval_every=10**6, checkpoint_every=10**6)
  with tempfile.TemporaryDirectory() as workdir:
    summary = train_and_evaluate(config, workdir, keylib.generate_key(seed), show_progress=False)
  row = {name: m["accuracy"] for name, m in summary["test"].items()}
  row["central_right_key"] = summary["central_right_key_test"]["accuracy"]
  return row


def hardened_cost(dataset: str, seed: int) -> dict:
  from infl_jax.privacy.hardened import harden_split

  config = TrainConfig.for_dataset(dataset, seed=seed)
  key = keylib.generate_key(seed)
  split = classification.load_data(config)
  init_rng, server_rng, _ = jax.random.split(jax.random.key(seed), 3)
  row = {}
  for name, data in (("faithful", split), ("hardened", harden_split(split, key))):
    model = classification.create_model(config, data.n_classes)
    state = classification.fit(config, model, classification.client_data(data, config.key_version), data.n_features,
                               key.coords, init_rng=init_rng, server_rng=server_rng)
    row[name] = classification.evaluate(model, global_variables(state), data.test_x,
                                        data.test_y, data.n_classes, key.coords)["accuracy"]
  return row


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="proteomics")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  p.add_argument("--hardened-cost", action="store_true")
  args = p.parse_args()
  study = hardened_cost if args.hardened_cost else key_study
  rows = []
  for seed in args.seeds:
    rows.append(study(args.dataset, seed))
    print(json.dumps({"seed": seed, **rows[-1]}), flush=True)
  values = {k: [r[k] for r in rows] for k in rows[0]}
  print(json.dumps({k: {"mean": round(float(np.mean(v)), 3),
                        "std": round(float(np.std(v, ddof=1)), 3) if len(v) > 1 else None,
                        "per_seed": [round(x, 3) for x in v]} for k, v in values.items()}))


if __name__ == "__main__":
  main()
