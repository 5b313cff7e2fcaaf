"""Benchmark: one federated LSANet round of 8 / 64 / 256 CNN hospitals, vmapped in one jitted round, against
a jitted loop over the same hospitals, side by side in one process.

    PYTHONPATH=. python benchmarks/lsanet_federated_round.py --out lsanet_federated_round.json   # accelerator
    PYTHONPATH=. python benchmarks/lsanet_federated_round.py --small --out /tmp/small.json       # CPU smoke run

Workload: LSANet on ResNet-18 (28-px stem, every branch, LSA and synergy: ``lsanet-federated``'s defaults), one
local epoch of ``--images`` synthetic PathMNIST-shaped images per hospital (28x28x3 uint8, 9 classes; speed does
not depend on the values), batch 32, Adam, FedAvg of parameters and BatchNorm statistics; the round is
``lsanet_jax.federated.train.build_algorithm``'s, as a run builds it. Columns per hospital count:

  vmap      ``jax.jit(algorithm.round)``: hospitals vmapped (``--chunk`` at a time, scanned), data on device.
  jit_loop  ``jax.jit`` of one hospital's ``client_update`` called in a Python loop over the hospitals (the
            weighted sum of updates added on device), the way a per-client framework runs a round.
  host      ``infl_jax.federated.host_round``: the same round, each hospital's local steps one jitted step at a
            time (what ``lsanet-federated`` runs on CPU).

Each is compiled and run once untimed, then timed ``--repeats`` times (median seconds, hospitals per second,
and vmap's speed-up over the loop). ``--small``: width 1/16, the plain VGG-16-BN, 2 and 4 hospitals of 8 images.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from harness import environment, error_string, get_logger, median_seconds  # noqa: E402

from infl_jax.federated import client_update, stack_clients  # noqa: E402
from infl_jax.federated.engine import round_keys  # noqa: E402
from infl_jax.federated.host_round import host_round  # noqa: E402
from infl_jax.federated.local import LocalConfig  # noqa: E402
from lsanet_jax import train as central  # noqa: E402
from lsanet_jax.federated.config import FederatedConfig  # noqa: E402
from lsanet_jax.federated.task import lsanet_task  # noqa: E402
from lsanet_jax.federated.train import build_algorithm  # noqa: E402

log = get_logger("lsanet_federated_round")


def hospitals(count: int, images: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return stack_clients([{"images": rng.integers(0, 256, (images, 28, 28, 3), dtype=np.uint8),
                         "labels": rng.integers(0, 9, (images, 1)).astype(np.int32)} for _ in range(count)])


def measure(config: FederatedConfig, count: int, images: int, repeats: int) -> dict:
  model = central.build_model(config, 9)
  variables = central.init_variables(model, (28, 28, 3), central.init_key(0))
  algorithm = build_algorithm(dataclasses.replace(config, client_chunk_size=min(config.client_chunk_size or count,
                                                                               count)),
                              model, "multi-class", variables)
  state = algorithm.init(variables, jax.random.key(1), num_clients=count)
  clients = hospitals(count, images)
  round_fn = jax.jit(algorithm.round)
  out = {"hospitals": count, "images_per_hospital": images}
  out["vmap_s"] = median_seconds(lambda: round_fn(state, clients, None), repeats)

  # The loop: the engine's own local training per hospital (the task, optimizer and local settings
  # build_algorithm gives the round), summed on device.
  spec_task = lsanet_task(model, "multi-class", dynamic_weights=config.dynamic_aux_weights, synergy=config.synergy,
                          augment=config.augment)
  optimizer = optax.adam(config.learning_rate)
  local = LocalConfig(local_epochs=config.epochs, batch_size=config.batch_size, wrap_last_batch=True)
  update = jax.jit(lambda p, s, d, n, r: client_update(spec_task, optimizer, local, p, s, d, n, r, None))
  # The global parameters are an argument, not constants compiled into the program.
  add = jax.jit(lambda acc, p, g, w: jax.tree_util.tree_map(lambda a, x, g0: a + w * (x - g0), acc, p, g))

  def loop():
    train = round_keys(state).train
    total = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    for k in range(count):
      data = jax.tree_util.tree_map(lambda x: x[k], clients.data)
      params, _, _ = update(state.params, state.model_state, data, clients.num_samples[k], jax.random.fold_in(train, k))
      total = add(total, params, state.params, 1.0 / count)
    return total

  out["jit_loop_s"] = median_seconds(loop, repeats)
  # What lsanet-federated runs on CPU: the same round with each hospital's steps driven from Python.
  stepped = host_round(algorithm)
  out["host_round_s"] = median_seconds(lambda: stepped(state, clients, None), repeats)
  out["vmap_hospitals_per_s"] = count / out["vmap_s"]
  out["vmap_speedup_over_loop"] = out["jit_loop_s"] / out["vmap_s"]
  out["vmap_speedup_over_host_round"] = out["host_round_s"] / out["vmap_s"]
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--small", action="store_true", help="CPU smoke run: a tiny CNN, 2 and 4 hospitals")
  parser.add_argument("--hospitals", type=int, nargs="+", default=None, help="default 8 64 256 (--small: 2 4)")
  parser.add_argument("--images", type=int, default=None, help="images per hospital (default 64; --small: 8)")
  parser.add_argument("--chunk", type=int, default=64, help="hospitals vmapped at once (default 64)")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  if args.small:
    config = FederatedConfig.for_variant("plain", flag="digits", backbone="vgg16_bn", width=0.0625, batch_size=4)
  else:
    config = FederatedConfig.for_variant("lsanet", flag="pathmnist", batch_size=32)
  config = dataclasses.replace(config, client_chunk_size=args.chunk)
  counts = args.hospitals or ([2, 4] if args.small else [8, 64, 256])
  images = args.images or (8 if args.small else 64)
  report = {"benchmark": "lsanet_federated_round", "environment": environment(), "small": args.small,
            "model": {"variant": "plain" if args.small else "lsanet", "backbone": config.backbone,
                      "width": config.width}, "rounds": []}
  for count in counts:
    log.info("round of %d hospitals", count)
    try:
      report["rounds"].append(measure(config, count, images, args.repeats))
    except Exception as e:  # noqa: BLE001 - one size failing (e.g. out of memory) must not lose the others
      report["rounds"].append({"hospitals": count, "error": error_string(e)})
    args.out.write_text(json.dumps(report, indent=1) + "\n")
  print(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
