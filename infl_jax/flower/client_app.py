"""The ClientApp: a site answers the server's query, train and evaluate messages (Flower's Message API).

Every message reaches the site in a fresh process (Flower runs a ClientApp process per message): the site reads
its key file and its prepared data (``site.py``) and compiles its local update once, from the compilation cache
after the first time. The key never leaves this module's process: replies hold updates, sample counts, the key
version and metrics only (docs/design.md, "Deploying on Flower").

Train messages come in two shapes: the plain one (``params`` arrays, a ``train`` config) and, with SecAgg+, the
legacy FitIns that Flower's SecAggPlusWorkflow sends, whose reply goes through ``secaggplus_mod``. With SCAFFOLD
both carry the server's control variate ``c``, and the site's change of its own ``c_i`` goes back with its update:
beside it on the plain path, inside the same masked vector with SecAgg+; ``c_i`` stays in the site's state folder.
"""

from __future__ import annotations

import functools

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

if TYPE_CHECKING:
  from infl_jax.flower.site import Site

# JAX, the model and the data code load only in the processes that train, evaluate or describe the site: Flower
# starts a process per message, and SecAgg+'s key-exchange stages need none of them.

__all__ = ["app"]


@functools.cache
def _site(run_items: tuple, node_items: tuple) -> "Site":
  from infl_jax.flower.settings import run_settings, site_spec
  from infl_jax.flower.site import Site

  config = run_settings(dict(run_items)).config
  return Site(config, site_spec(dict(node_items)))


def site_of(context: Context) -> "Site":
  from runkit.cli import enable_compilation_cache

  enable_compilation_cache()  # a ClientApp process per message: the local update compiles once per site, then loads
  return _site(tuple(sorted(context.run_config.items())), tuple(sorted(context.node_config.items())))


@functools.cache
def _variables_template(site: "Site"):
  """The model's variables' structure (shapes only; nothing is compiled or run)."""
  import jax

  from infl_jax.tasks import classification as cls

  n_features = site.data.x.shape[1]
  return jax.eval_shape(lambda: cls._init(site.model, n_features, jax.random.key(0)))


def _split_variables(site: "Site"):
  template = dict(_variables_template(site))
  params = template.pop("params")
  return params, template


def _secagg_mod(msg: Message, context: Context, call_next):
  # SecAgg+ applies to the train messages of its workflow only (they carry its config record).
  if msg.metadata.message_type == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
    return secaggplus_mod(msg, context, call_next)
  return call_next(msg, context)


app = ClientApp(mods=[_secagg_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
  return Message(RecordDict({"site": ConfigRecord(site_of(context).describe())}), reply_to=msg)


def _local_training(site: "Site", params, model_state, rng: np.ndarray, config, server_control):
  """``Site.train``, or SCAFFOLD's ``Site.train_corrected`` where the server sent its control variate; the train
  config names the round, the server's key version, and for SCAFFOLD the run and the server's newest checkpoint."""
  round_ = int(config["round"])
  if server_control is None:
    return site.train(params, model_state, rng, round_)
  return site.train_corrected(params, model_state, rng, round_, server_control, run=str(config["control-run"]),
                              resume_round=int(config["resume-round"]), key_version=int(config["key-version"]))


def _scaffold(site: "Site") -> bool:
  return site.config.drift_correction == "scaffold"


@app.train()
def train(msg: Message, context: Context) -> Message:
  from infl_jax.flower import records

  site = site_of(context)
  params_t, state_t = _split_variables(site)
  if "params" not in msg.content.array_records:
    return _train_legacy(site, msg, params_t, state_t)
  params = records.from_array_record(msg.content.array_records["params"], params_t, "params")
  model_state = records.from_array_record(msg.content.array_records["params"], state_t, "state")
  server_control = None
  if _scaffold(site):
    server_control = records.from_array_record(msg.content.array_records["control"], params_t, "control")
  rng = msg.content.array_records["rng"]["rng"].numpy()
  delta, model_state_k, loss, control_delta = _local_training(site, params, model_state, rng,
                                                              msg.content.config_records["train"], server_control)
  update = records.to_array_record(delta, "delta")
  for name, array in records.to_array_record(model_state_k, "state").items():
    update[name] = array
  metrics = MetricRecord({"num-samples": site.data.num_samples, "loss": float(loss), "key-version": site.key.version,
                          "client-id": site.data.client_id})
  content = RecordDict({"update": update, "train": metrics})
  if control_delta is not None:
    content.array_records["control-delta"] = records.to_array_record(control_delta, "control-delta")
  return Message(content, reply_to=msg)


def _train_legacy(site: "Site", msg: Message, params_t, state_t) -> Message:
  """SecAgg+: the vector summed under masks is [weighted by n_k] the parameter update, the model state's change and
  the loss, and with SCAFFOLD the change of the site's control variate; n_k is 0 when the site's key version is not
  the server's, so a stale update adds nothing. The server's parameters, model state and control variate arrive
  as one list, in that order."""
  import jax

  from infl_jax.flower import records

  fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
  leaves = parameters_to_ndarrays(fitins.parameters)
  n_params = len(jax.tree_util.tree_leaves(params_t))
  n_variables = n_params + len(jax.tree_util.tree_leaves(state_t))
  params = records.unflatten_leaves(params_t, leaves[:n_params])
  model_state = records.unflatten_leaves(state_t, leaves[n_params:n_variables])
  server_control = records.unflatten_leaves(params_t, leaves[n_variables:]) if _scaffold(site) else None
  rng = np.frombuffer(fitins.config["rng"], np.uint32)
  delta, model_state_k, loss, control_delta = _local_training(site, params, model_state, rng, fitins.config,
                                                              server_control)
  scale = np.float32(fitins.config["state-scale"])
  state_delta = jax.tree_util.tree_map(lambda a, b: (np.asarray(a) - np.asarray(b)) * scale, model_state_k,
                                       model_state)
  vector = records.flat_leaves(delta) + records.flat_leaves(state_delta) + [np.asarray([loss], np.float32)]
  if control_delta is not None:
    vector += _control_vector(control_delta, fitins.config, site.data.num_samples)
  accepted = site.key.version == int(fitins.config["key-version"])
  res = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(vector),
               num_examples=site.data.num_samples if accepted else 0,
               metrics={"num-samples": site.data.num_samples, "key-version": site.key.version,
                        "client-id": site.data.client_id})
  return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def _control_vector(control_delta, config, num_samples: int) -> list[np.ndarray]:
  """``c_i+ - c_i`` as it goes into the masked vector so that the server unmasks the plain sum over the sites:
  ``secaggplus_mod`` multiplies the whole vector by the site's weight n_k / max-weight, so this part goes in
  divided by it, times ``secagg-control-scale``. What the mod then quantises is the change times the scale; one
  beyond SecAgg+'s clipping range would be cut silently, so it fails the round instead."""
  from runkit.errors import UserInputError

  from infl_jax.flower import records

  scale, limit = float(config["control-scale"]), float(config["clipping-range"])
  scaled = [np.asarray(x, np.float64) * scale for x in records.flat_leaves(control_delta)]
  peak = max(float(np.max(np.abs(x), initial=0.0)) for x in scaled)
  if peak > limit:
    raise UserInputError(f"a site's control variate changed by {peak / scale:.3g}, which at secagg-control-scale="
                         f"{scale:g} exceeds SecAgg+'s clipping range {limit:g}; lower secagg-control-scale")
  weight = num_samples / float(config["max-weight"])
  return [(x / weight).astype(np.float32) for x in scaled]


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
  from infl_jax.flower import records

  site = site_of(context)
  params_t, state_t = _split_variables(site)
  params = records.from_array_record(msg.content.array_records["params"], params_t, "params")
  model_state = records.from_array_record(msg.content.array_records["params"], state_t, "state")
  metrics = site.evaluate({"params": params, **model_state})
  metrics["client-id"] = site.data.client_id
  return Message(RecordDict({"eval": MetricRecord(metrics)}), reply_to=msg)
