"""SecAgg+ rounds: the server learns only the n_k-weighted sum of the sites' updates (Flower's SecAggPlusWorkflow
with ``secaggplus_mod`` at the sites).

In flwr 1.42 SecAggPlusWorkflow is written for the legacy Strategy API: it takes a ``LegacyContext`` and asks its
strategy's ``configure_fit`` for the FitIns to send and its ``aggregate_fit`` for what to do with the unmasked
result, and ``secaggplus_mod`` reads the site's reply as a FitRes (parameters, num_examples). There is no Message
API version of it, so this module drives it with a small Strategy (``_InflStrategy``) whose ``configure_fit``
sends the sampled sites the global variables, the round and their training keys, and whose ``aggregate_fit``
receives the workflow's weighted mean and hands it to the engine's ``server_update``. What a site puts in the
masked vector: its parameter update, the change of its model state (times ``secagg-state-scale``, 2^-10: BatchNorm
variances grow to thousands in a round) and its loss; its weight n_k (0 for a stale
key version, so a stale update adds nothing). SecAgg+ clips and quantises (``secagg-clipping-range``,
``secagg-quantization-range``), so the mean differs from the plain round's by at most a few quantisation steps
(docs/design.md, "Deploying on Flower").

SCAFFOLD: the FitIns parameters carry the server's control variate after the global variables, and each site's
change of its own variate rides in the same masked vector (after the loss), divided there by the site's weight so
that the unmasked result is the plain sum over the sites times ``secagg-control-scale``: the server learns the sum
the engine's ``server_update`` needs, never one site's change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WorkflowKey
from flwr.app import ArrayRecord, ConfigRecord, Context

from infl_jax.federated import ServerState, round_keys
from infl_jax.federated.engine import UpdateSums
from infl_jax.flower import records

__all__ = ["SecAggRounds"]


class _InflStrategy(Strategy):
  """Just enough of a legacy Strategy for SecAggPlusWorkflow: one round's FitIns out, the unmasked mean in."""

  def __init__(self):
    self.instructions = {}  # node id -> FitIns of the round under way
    self.mean = None
    self.metrics = []

  def initialize_parameters(self, client_manager):
    return None

  def configure_fit(self, server_round, parameters, client_manager):
    proxies = client_manager.all()
    return [(proxies[str(nid)], fitins) for nid, fitins in self.instructions.items()]

  def aggregate_fit(self, server_round, results, failures):
    if failures:
      raise RuntimeError(f"SecAgg+ round {server_round}: {len(failures)} site(s) failed ({failures[0]})")
    self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
    self.metrics = [dict(fitres.metrics) for _, fitres in results]
    return ndarrays_to_parameters([]), {}

  def configure_evaluate(self, server_round, parameters, client_manager):
    return []

  def aggregate_evaluate(self, server_round, results, failures):
    return None, {}

  def evaluate(self, server_round, parameters):
    return None


class SecAggRounds:
  def __init__(self, grid, sites, algo, config, run, context: Context):
    self.grid = grid
    self.sites = sites
    self.algo = algo
    self.config = config
    self.strategy = _InflStrategy()
    self.context = LegacyContext(context, config=ServerConfig(num_rounds=config.rounds), strategy=self.strategy)
    run_id = grid.run.run_id
    for cid in range(sites.num_clients):
      self.context.client_manager.register(GridClientProxy(sites.node(cid), grid, run_id))
    total = float(sum(int(f["num-samples"]) for f in sites.facts.values()))
    n = sites.num_clients
    # Each site shares its masks' secrets with all the others; any n - 1 of them unmask (the workflow requires a
    # threshold below the number of shares, and at least 2). A site that drops out fails the round (engine rule:
    # a sampled site's update is part of the round), it does not bias it.
    self.workflow = SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=max(2, n - 1), max_weight=total,
                                       clipping_range=run.clipping_range, quantization_range=run.quantization_range)
    self.state_scale = float(run.state_scale)
    # What a SCAFFOLD site needs to put its control change into the vector (client_app._control_vector).
    self.control_settings = {"control-scale": float(run.control_scale), "clipping-range": float(run.clipping_range),
                             "max-weight": total}
    self._update = jax.jit(self._server_update, static_argnames=("num_sampled",))

  def _server_update(self, state, mean_delta, mean_state_delta, mean_loss, weight, num_accepted, control_delta,
                     num_sampled):
    # server_update divides the sums by their weight: give it the mean times the weight.
    scale = lambda tree: jax.tree_util.tree_map(lambda m: m * weight, tree)
    model_state = jax.tree_util.tree_map(lambda s, d: s + d, state.model_state, mean_state_delta)
    sums = UpdateSums(delta=scale(mean_delta), model_state=scale(model_state), loss=mean_loss * weight,
                      weight=weight, num_accepted=num_accepted, control_delta=control_delta)
    return self.algo.server_update(state, sums, num_sampled, None, num_clients=self.sites.num_clients)

  def run(self, state: ServerState, sampled: np.ndarray, control_config: dict):
    """One SecAgg+ round; ``control_config``: SCAFFOLD's run name and resume round for the sites ({} else)."""
    keys = round_keys(state)
    variables = records.flat_leaves(state.params) + records.flat_leaves(state.model_state)
    controls = [] if state.controls is None else records.flat_leaves(state.controls["server"])
    parameters = ndarrays_to_parameters(variables + controls)
    train_config = {"round": int(state.round), "key-version": int(state.key_version), "state-scale": self.state_scale,
                    **control_config, **(self.control_settings if controls else {})}
    self.strategy.instructions = {}
    for cid in sampled:
      rng = np.asarray(jax.random.key_data(jax.random.fold_in(keys.train, int(cid))), np.uint32)
      self.strategy.instructions[self.sites.node(int(cid))] = FitIns(parameters, {**train_config,
                                                                                  "rng": rng.tobytes()})
    self.strategy.mean = None
    self.context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: int(state.round) + 1})
    self.context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    self.workflow(self.grid, self.context)
    accepted = [m for m in self.strategy.metrics if int(m["key-version"]) == int(state.key_version)]
    if self.strategy.mean is None or not accepted:
      raise RuntimeError(f"SecAgg+ round {int(state.round) + 1} gave no aggregate (no site with key version "
                         f"{int(state.key_version)} answered)")
    weight = float(sum(int(m["num-samples"]) for m in accepted)) if self.config.weighting == "samples" else None
    if weight is None:
      raise RuntimeError("SecAgg+ weights by n_k; run it with weighting=samples")
    mean = [jnp.asarray(a, jnp.float32) for a in self.strategy.mean]
    n_params = len(jax.tree_util.tree_leaves(state.params))
    n_variables = len(variables)
    mean_delta = records.unflatten_leaves(state.params, mean[:n_params])
    mean_state_delta = records.unflatten_leaves(
        state.model_state, [m / self.state_scale for m in mean[n_params:n_variables]])
    control_delta = None
    if controls:
      # The unmasked part is sum_k w_k x_k / sum_k w_k with w_k = n_k / max-weight and x_k a site's change times
      # the control scale over w_k: times sum_k w_k (the accepted sites' weight over max-weight), over the scale.
      factor = weight / (self.control_settings["max-weight"] * self.control_settings["control-scale"])
      control_delta = records.unflatten_leaves(state.params, [m * factor for m in mean[n_variables + 1:]])
    return self._update(state, mean_delta, mean_state_delta, mean[n_variables][0], jnp.float32(weight),
                        jnp.int32(len(accepted)), control_delta, num_sampled=len(sampled))
