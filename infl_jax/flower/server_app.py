"""The ServerApp: the simulation's round, with the clients' work done at the sites.

Per round: the round's PRNG streams and client sample exactly as ``engine.fedavg``'s round draws them; each
sampled site gets the global variables, the round number and its own training key ``fold_in(train, client_id)``
(run randomness, not secret); the replies (update, n_k, key version) are summed with the engine's weights
(n_k, 0 for a stale key version) and applied with the engine's ``server_update``. Checkpoints are
``runkit.checkpoint``'s (orbax); a run whose workdir holds one resumes from it. With ``secagg``, the sums come
from Flower's SecAgg+ (``secagg.py``). With SCAFFOLD the server's state holds its control variate ``c`` (each site
keeps its own ``c_i``): ``c`` goes out with the global variables, the sum of the sites' changes comes back with
their updates and moves ``c`` in the engine's ``server_update``. Every reply passes through the key audit
(``records.KeyAudit``) before the server reads it; ``audit.json`` records what it saw. Evaluation happens at the
sites, with their keys.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import ArrayRecord, Array, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from infl_jax.federated import ServerState, algorithm_from_config, global_variables, round_keys
from infl_jax.federated.aggregate import weighted_sum
from infl_jax.federated.engine import UpdateSums
from infl_jax.flower import records
from infl_jax.flower.settings import FlowerRun, run_settings
from infl_jax.tasks import classification as cls
from infl_jax.tasks.common import resume_settings
from runkit.checkpoint import Checkpointer
from runkit.cli import enable_compilation_cache
from runkit.errors import UserInputError
from runkit.metrics_log import MetricsWriter, write_json_atomic

__all__ = ["app", "sampled_clients"]

log = logging.getLogger("infl_jax.flower")
app = ServerApp()


def sampled_clients(state: ServerState, num_clients: int, client_fraction: float) -> np.ndarray:
  """The client ids round ``state.round`` trains, drawn as ``engine.fedavg``'s round draws them."""
  num_sampled = max(1, round(client_fraction * num_clients))
  if num_sampled >= num_clients:
    return np.arange(num_clients)
  keys = round_keys(state)
  return np.asarray(jnp.sort(jax.random.choice(keys.sample, num_clients, (num_sampled,), replace=False)))


def _wait_for_sites(grid: Grid, run: FlowerRun) -> list[int]:
  deadline = time.monotonic() + run.wait_seconds
  while True:
    nodes = sorted(grid.get_node_ids())
    if len(nodes) >= run.min_sites:
      return nodes
    if time.monotonic() > deadline:
      raise UserInputError(f"only {len(nodes)} of min-sites={run.min_sites} sites connected within "
                           f"{run.wait_seconds:.0f} s; start the SuperNodes or lower run config min-sites")
    time.sleep(0.5)


def _replies(grid, messages, what: str) -> list[Message]:
  replies = list(grid.send_and_receive(messages))
  failed = [m for m in replies if m.has_error()]
  if failed or len(replies) != len(messages):
    detail = failed[0].error.reason if failed else f"{len(replies)} of {len(messages)} replied"
    raise RuntimeError(f"{what}: a site failed ({detail})")
  return replies


def _variables_record(state: ServerState) -> ArrayRecord:
  record = records.to_array_record(state.params, "params")
  for name, array in records.to_array_record(state.model_state, "state").items():
    record[name] = array
  return record


class _Sites:
  """The sites as the server knows them: node id per client id and their public facts."""

  def __init__(self, grid, nodes: list[int]):
    replies = _replies(grid, [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes], "query")
    self.facts = {}
    for reply in replies:
      facts = dict(reply.content.config_records["site"])
      self.facts[int(facts["client-id"])] = {**facts, "node": int(reply.metadata.src_node_id)}
    ids = sorted(self.facts)
    if ids != list(range(len(ids))):
      raise UserInputError(f"the sites' partition-id values are {ids}; give the {len(ids)} sites the ids "
                           f"0..{len(ids) - 1}, one each")
    for field in ("n-features", "n-classes", "features-digest", "classes-digest"):
      values = {f[field] for f in self.facts.values()}
      if len(values) != 1:
        raise UserInputError(f"the sites disagree on {field} ({sorted(map(str, values))}); every site needs the "
                             "same feature panel and label set")
    first = self.facts[0]
    self.num_clients = len(ids)
    self.n_features = int(first["n-features"])
    self.n_classes = int(first["n-classes"])

  def node(self, client_id: int) -> int:
    return self.facts[client_id]["node"]


def _aggregate_program(algo, weighting: str, num_clients: int | None = None):
  """The engine's sums over the replies (same weights, same ``weighted_sum`` over the stacked updates in client
  order, added to zeros as the engine's scan adds its one chunk) and its ``server_update``. SCAFFOLD's control
  changes (``control_deltas``) are summed over the accepted sites, unweighted, as the engine sums them."""

  def step(state, deltas, model_states, losses, num_samples, versions, control_deltas=None):
    n_k = num_samples.astype(jnp.float32)
    base = n_k if weighting == "samples" else jnp.ones_like(n_k)
    accepted = versions == state.key_version
    w = jnp.where(accepted, base, 0.0)
    zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
    control_delta = None
    if control_deltas is not None:
      control_delta = add(zeros(state.params), weighted_sum(control_deltas, accepted.astype(jnp.float32)))
    sums = UpdateSums(delta=add(zeros(state.params), weighted_sum(deltas, w)),
                      model_state=add(zeros(state.model_state), weighted_sum(model_states, w)),
                      loss=jnp.float32(0.0) + jnp.dot(w, losses), weight=jnp.sum(w),
                      num_accepted=jnp.sum(accepted).astype(jnp.int32), control_delta=control_delta)
    return algo.server_update(state, sums, int(losses.shape[0]), None, num_clients=num_clients)

  return jax.jit(step)


def _plain_round(grid, sites: _Sites, state: ServerState, sampled: np.ndarray, step, control_config: dict):
  """One round without SecAgg+; ``control_config``: SCAFFOLD's run name and resume round for the sites ({} else)."""
  keys = round_keys(state)
  variables = _variables_record(state)
  train_config = {"round": int(state.round), "key-version": int(state.key_version), **control_config}
  messages = []
  for cid in sampled:
    rng = np.asarray(jax.random.key_data(jax.random.fold_in(keys.train, int(cid))), np.uint32)
    content = RecordDict({"params": variables, "rng": ArrayRecord(array_dict={"rng": Array(rng)}),
                          "train": ConfigRecord(train_config)})
    if state.controls is not None:  # SCAFFOLD: the server's variate c, an average over the sites and no secret
      content.array_records["control"] = records.to_array_record(state.controls["server"], "control")
    messages.append(Message(content, dst_node_id=sites.node(int(cid)), message_type="train"))
  by_client = {}
  for reply in _replies(grid, messages, f"round {int(state.round) + 1}"):
    metrics = reply.content.metric_records["train"]
    by_client[int(metrics["client-id"])] = reply
  ordered = [by_client[int(c)] for c in sampled]  # the engine's order: sampled client ids, ascending
  deltas = [records.from_array_record(r.content.array_records["update"], state.params, "delta") for r in ordered]
  states = [records.from_array_record(r.content.array_records["update"], state.model_state, "state") for r in ordered]
  stack = lambda trees: jax.tree_util.tree_map(lambda *xs: jnp.asarray(np.stack(xs)), *trees)
  metric = lambda name, dtype: jnp.asarray([r.content.metric_records["train"][name] for r in ordered], dtype)
  control_deltas = None
  if state.controls is not None:
    control_deltas = stack([records.from_array_record(r.content.array_records["control-delta"], state.params,
                                                      "control-delta") for r in ordered])
  return step(state, stack(deltas), stack(states), metric("loss", jnp.float32), metric("num-samples", jnp.int32),
              metric("key-version", jnp.int32), control_deltas)


def _evaluate(grid, sites: _Sites, state: ServerState) -> dict:
  variables = _variables_record(state)
  messages = [Message(RecordDict({"params": variables}), dst_node_id=sites.node(c), message_type="evaluate")
              for c in range(sites.num_clients)]
  per_site = {}
  for reply in _replies(grid, messages, "evaluate"):
    m = dict(reply.content.metric_records["eval"])
    per_site[int(m.pop("client-id"))] = m
  pooled = {}
  for split in ("val", "test"):
    n = np.asarray([per_site[c][f"{split}-n"] for c in sorted(per_site)])
    for name in ("accuracy", "f1_weighted", "auc_weighted", "loss"):
      values = np.asarray([per_site[c][f"{split}-{name}"] for c in sorted(per_site)])
      pooled[f"{split}_{name}"] = float(np.dot(values, n) / n.sum())
  return {"per_site": {str(c): per_site[c] for c in sorted(per_site)}, "sample_weighted": pooled}


@app.main()
def main(grid: Grid, context: Context) -> None:
  run = run_settings(context.run_config)
  enable_compilation_cache()
  config = run.config
  audit = records.KeyAudit.from_file(run.audit_patterns) if run.audit_patterns else records.KeyAudit()
  grid = records.AuditedGrid(grid, audit)
  run.workdir.mkdir(parents=True, exist_ok=True)
  try:
    _train(grid, run, config, context)
  finally:
    write_json_atomic(run.workdir / "audit.json", audit.summary())


def _train(grid, run: FlowerRun, config, context: Context) -> None:
  sites = _Sites(grid, _wait_for_sites(grid, run))
  model = cls.create_model(config, sites.n_classes)
  algo = algorithm_from_config(config, cls.classification_task(model))
  init_rng, server_rng, _ = jax.random.split(jax.random.key(config.seed), 3)  # as classification.run splits it
  # SCAFFOLD: the state holds the server's control variate only; each site keeps its own.
  state = algo.init(cls.init_variables(model, sites.n_features, init_rng), server_rng, key_version=config.key_version,
                    client_controls=False)

  fingerprint, defaults = resume_settings(dataclasses.replace(config, key_fingerprint=None))
  fingerprint.update({"deployment": "flower", "secagg": run.secagg, "sites": sites.num_clients})
  checkpointer = Checkpointer(run.workdir / "checkpoints", save_every=run.checkpoint_every,
                              keep=run.keep_checkpoints, config=fingerprint, config_defaults=defaults)
  history: list[dict] = []
  resumed_from = None
  # The sites file their control variates under this name: a resumed run finds its own, a new run starts afresh.
  control_run = uuid.uuid4().hex
  if checkpointer.latest_step() is not None:
    restored, extra = checkpointer.restore({"state": state._asdict()})
    state = ServerState(**restored["state"])
    history = extra.get("history", [])
    control_run = extra.get("control-run", control_run)
    resumed_from = int(state.round)
    log.info("resumed from round %d", resumed_from)
  # On resume metrics.jsonl keeps the rounds up to the checkpoint's: a server killed after a later round's line
  # but before its checkpoint would otherwise log that round twice.
  metrics_log = MetricsWriter(run.workdir, resume_from_step=resumed_from)

  if run.secagg:
    from infl_jax.flower.secagg import SecAggRounds
    rounds = SecAggRounds(grid, sites, algo, config, run, context)
    round_fn = rounds.run
  else:
    step = _aggregate_program(algo, config.weighting, sites.num_clients)
    round_fn = lambda s, sampled, control_config: _plain_round(grid, sites, s, sampled, step, control_config)

  try:
    while int(state.round) < config.rounds:
      t0 = time.perf_counter()
      sampled = sampled_clients(state, sites.num_clients, config.client_fraction)
      control_config = {}
      if state.controls is not None:
        # A restart resumes from the newest checkpoint: the sites keep the variates a repeat from there needs.
        control_config = {"control-run": control_run, "resume-round": int(checkpointer.latest_step() or 0)}
      state, metrics = round_fn(state, sampled, control_config)
      done = int(state.round)
      row = {"round": done, **{k: float(v) for k, v in jax.device_get(metrics).items()},
             "seconds": time.perf_counter() - t0}
      history.append(row)
      stop = run.stop_after_round > 0 and done >= run.stop_after_round
      checkpointer.save(done, {"state": state._asdict()}, extra={"history": history, "control-run": control_run},
                        force=(done == config.rounds or stop))
      metrics_log.write(done, row)
      if stop:
        break
  finally:
    metrics_log.close()
    checkpointer.close()

  result = {"rounds": int(state.round), "resumed_from_round": resumed_from, "history": history,
            "sites": sites.num_clients, "secagg": run.secagg}
  if run.evaluate and int(state.round) == config.rounds:
    result["evaluation"] = _evaluate(grid, sites, state)
  variables = global_variables(state)
  np.savez(run.workdir / "final_params.npz",
           **{jax.tree_util.keystr(p): np.asarray(x)
              for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]})
  write_json_atomic(run.workdir / "result.json", result)
