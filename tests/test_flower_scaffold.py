"""SCAFFOLD on Flower (docs/design.md, "Drift correction" and "Deploying on Flower"), in this process: the ServerApp's
``main`` and the sites' ClientApp exchange Flower messages, each through flwr's wire format, over ``_InProcessGrid``
(a stand-in for the SuperLink and SuperNodes that starts no process; the real deployment is
``tests/test_infl_flower.py``'s, six minutes long).

(a) Two plain rounds, the server stopped after round 1 and resumed from its checkpoint, each equal to a round of
    the simulation's SCAFFOLD on the same shares, seed and settings (round 1 from the same start, round 2 from the
    deployment's state after round 1): global variables, the server variate c (from the server's checkpoint) and
    every site's c_i (from its state folder), to 1e-5. Round 2 shows that the sites read the c_i they stored.
(b) c_i lives in the site's state folder only: no reply holds it (round 2; after a site's first round its change
    is c_i+ itself, since c_i starts at zero), and the file is the site's alone (mode 0o600).
(c) SecAgg+: the control change travels inside the masked vector: no reply holds an array or a site's change,
    and the unmasked sum moves c as the plain round does, within SecAgg+'s quantisation.
(c') A site whose key version is not the server's stores nothing and reports a zero change.
(d) The engine's deployment step (a state without the clients' rows, summed control changes) is the round's.

The proteomics preset's data and settings, with a narrower keyed network (``_small_model``) everywhere.
"""

import contextlib
import functools
import json
import os
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

flwr = pytest.importorskip("flwr", reason="the flower extra: pip install 'infl-jax[flower]'")

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.common.serde import message_from_proto, message_to_proto  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from infl_jax import keys as keylib, models  # noqa: E402
from infl_jax.federated import ServerState, Task, algorithm_from_config, global_variables, scaffold  # noqa: E402
from infl_jax.federated import stack_clients  # noqa: E402
from infl_jax.federated.engine import UpdateSums  # noqa: E402
from infl_jax.flower import client_app, records, server_app  # noqa: E402
from infl_jax.flower import site as site_module  # noqa: E402
from infl_jax.flower.settings import run_settings, site_spec  # noqa: E402
from infl_jax.flower.site import Site, SiteControls  # noqa: E402
from infl_jax.key_scheme import client_view  # noqa: E402
from infl_jax.tasks import classification as cls  # noqa: E402
from runkit.errors import UserInputError  # noqa: E402
from runkit.xla import LOOP, compiler_options  # noqa: E402

SITES = 3  # SecAgg+ needs at least 3
RUN = {"preset": "proteomics", "rounds": 2, "local-epochs": 2, "n-clients": SITES, "seed": 0, "min-sites": SITES,
       "wait-seconds": 5.0, "drift-correction": "scaffold", "evaluate": False}
# Round 1 of a site trained alone against the same site in the vmapped simulation: XLA's kernels for the two round
# differently in the last place (tests/test_infl_flower.py), which 2 local Adam steps leave far below this bound.
TOLERANCE = 1e-5


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _max_diff(a: dict, b: dict) -> float:
  assert sorted(a) == sorted(b)
  return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) for k in a)


@contextlib.contextmanager
def _identity(node_id: int):
  """Flower's record of which node this process is (a Message takes its sender from it)."""
  saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
  TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, node_id
  try:
    yield
  finally:
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class _InProcessGrid:
  """The SuperLink and the sites' SuperNodes in this process: a pushed message goes through flwr's wire format to
  the ClientApp of its node, with that node's Context (kept between messages, as a SuperNode keeps it: SecAgg+'s
  mod holds its state there), and its reply waits for the server's pull. Every reply is kept in ``replies``."""

  def __init__(self, node_configs: list[dict], run_config: dict):
    self.contexts = {1000 + i: Context(run_id=1, node_id=1000 + i, node_config=cfg, state=RecordDict(),
                                       run_config=run_config) for i, cfg in enumerate(node_configs)}
    self.run = type("Run", (), {"run_id": 1})()
    self.replies = []
    self._waiting = {}

  def get_node_ids(self):
    return list(self.contexts)

  def push_messages(self, messages):
    ids = []
    for message in messages:
      message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
      node = message.metadata.dst_node_id
      with _identity(node):
        reply = client_app.app(message_from_proto(message_to_proto(message)), self.contexts[node])
      reply = message_from_proto(message_to_proto(reply))
      self.replies.append(reply)
      self._waiting[message.metadata.message_id] = reply
      ids.append(message.metadata.message_id)
    return ids

  def pull_messages(self, message_ids):
    return [self._waiting.pop(i) for i in list(message_ids) if i in self._waiting]


def _serve(grid: _InProcessGrid, run_config: dict) -> None:
  with _identity(SUPERLINK_NODE_ID):
    server_app.main(grid, Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                                  run_config=run_config))


def _final(workdir) -> dict:
  with np.load(workdir / "final_params.npz") as f:
    return {k: f[k] for k in f.files}


def _server_state(workdir, step: int, template: ServerState) -> ServerState:
  """The server's state after round ``step``, from its checkpoint (as host arrays: orbax's are committed to a
  device, which the simulation's compiled round would take for new input and compile again)."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, {"state": template._asdict()})
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state", abstract)
  return ServerState(**jax.device_get(restored["state"]))


def _site_controls(state_dir) -> dict[int, dict]:
  """A site's stored variates by round."""
  (folder,) = state_dir.glob("scaffold-*")
  out = {}
  for path in sorted(folder.glob("round-*.npz")):
    assert os.stat(path).st_mode & 0o777 == 0o600
    with np.load(path) as f:
      out[int(path.stem.split("-")[1])] = {k: f[k] for k in f.files}
  return out


def _found_in_replies(replies, tree: dict) -> list[str]:
  """The leaves of ``tree`` (float32, each as a whole; zeros left out, they occur anywhere) in any reply's bytes."""
  blobs = [b for reply in replies for _, b in records.message_blobs(reply.content)]
  patterns = {k: np.ascontiguousarray(v, "<f4").tobytes() for k, v in tree.items() if np.any(v)}
  return sorted(k for k, pat in patterns.items() if any(pat in b for b in blobs))


def _small_model(config, num_classes):
  """The preset's keyed MLP at width 8: the proteomics network's 118 parameter leaves take 37 s to compile into the
  vmapped round on 2 busy cores, this one a third of that; what is tested is the deployment's arithmetic."""
  return models.make_mlp_classifier((8,), num_classes, key_strength=config.key_strength, norm="batch",
                                    dropout_rate=config.dropout, variant=config.variant)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  # The server, the sites (this process's ClientApp) and the simulation all build the model here.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(cls, "create_model", _small_model)
    yield _simulate(tmp_path_factory.mktemp("flower-scaffold"))
  # Programs compiled for the small model must not serve a later test of the same settings.
  for cached in (site_module._local_program, client_app._site, client_app._variables_template):
    cached.cache_clear()


def _simulate(root):
  key = keylib.generate_key(seed=11)
  key_file = keylib.save_key(key, root / "site-key.json")
  config = run_settings(RUN).config
  assert config.drift_correction == "scaffold"
  raw = cls.load_data(config)
  split = cls.client_split(raw, client_view(key, config.key_scheme, raw.n_features))
  model = cls.create_model(config, split.n_classes)
  algo = algorithm_from_config(config, cls.classification_task(model))
  init_rng, server_rng, _ = jax.random.split(jax.random.key(config.seed), 3)
  init = functools.partial(algo.init, cls.init_variables(model, split.n_features, init_rng), server_rng,
                           key_version=config.key_version)
  round_fn = jax.jit(algo.round, compiler_options=compiler_options(LOOP))  # as jit_round compiles it
  clients = cls.client_data(split, config.key_version)
  simulate = lambda state: round_fn(state, clients, key.coords)[0]
  return {"root": root, "key_file": key_file, "simulate": simulate, "start": init(num_clients=SITES),
          "deployed": init(client_controls=False)}


def _compared(flower: dict, simulated: ServerState) -> dict:
  """Max |flower - simulation| of the global variables, the server variate c and each site's c_i."""
  diffs = {"variables": _max_diff(flower["variables"], _flat(global_variables(simulated))),
           "c": _max_diff(flower["c"], _flat(simulated.controls["server"]))}
  for i, c_i in enumerate(flower["c_i"]):
    diffs[f"c_{i}"] = _max_diff(c_i, _flat(jax.tree_util.tree_map(lambda c: c[i], simulated.controls["clients"])))
  return diffs


def _sites(setup, name: str) -> list[dict]:
  return [{"data": "proteomics", "partition-id": i, "key-file": str(setup["key_file"]),
           "cache-dir": str(setup["root"] / f"cache{i}"), "state-dir": str(setup["root"] / name / f"site{i}")}
          for i in range(SITES)]


def test_plain_rounds_with_a_restart_equal_the_simulation_and_keep_c_i_at_the_sites(setup):
  sites = _sites(setup, "plain")
  workdir = setup["root"] / "plain" / "server"
  run_config = {**RUN, "workdir": str(workdir)}
  first = _InProcessGrid(sites, run_config)
  _serve(first, {**run_config, "stop-after-round": 1})
  after_round_1 = _final(workdir)
  second = _InProcessGrid(sites, run_config)  # a restarted server: it resumes from round 1's checkpoint
  _serve(second, run_config)
  assert json.loads((workdir / "result.json").read_text())["resumed_from_round"] == 1

  # Round 1 against the simulation's round 1; round 2 against the simulation's round from the deployment's state
  # after round 1 (its server state from the checkpoint, the sites' c_i from their folders): a round that reads c_i
  # wrongly shows there, whereas the whole trajectory would mix in how the first round's last-bit differences grow.
  stored = [_site_controls(setup["root"] / "plain" / f"site{i}") for i in range(SITES)]
  # Versions by 0-based round: a server restarted from round 2's checkpoint would repeat nothing, one restarted from
  # round 1's would repeat round index 1 from version 0.
  assert all(sorted(versions) == [0, 1] for versions in stored)
  state_1 = _server_state(workdir, 1, setup["deployed"])
  names = records.leaf_names(state_1.params)
  c_i_1 = [records.unflatten_leaves(state_1.params, [versions[0][k] for k in names]) for versions in stored]
  simulated_2 = setup["simulate"](state_1._replace(controls={**state_1.controls, "clients": jax.tree_util.tree_map(
      lambda *rows: np.stack(rows), *c_i_1)}))
  state_2 = _server_state(workdir, 2, setup["deployed"])
  round_1 = _compared({"variables": after_round_1, "c": _flat(state_1.controls["server"]),
                       "c_i": [v[0] for v in stored]}, setup["simulate"](setup["start"]))
  round_2 = _compared({"variables": _final(workdir), "c": _flat(state_2.controls["server"]),
                       "c_i": [v[1] for v in stored]}, simulated_2)
  print("flower vs simulation, max abs, round 1:", {k: f"{v:.1e}" for k, v in round_1.items()},
        "round 2:", {k: f"{v:.1e}" for k, v in round_2.items()})
  assert max(round_1.values()) < TOLERANCE and max(round_2.values()) < TOLERANCE, (round_1, round_2)
  assert max(np.abs(v).max() for v in _flat(state_2.controls["server"]).values()) > 1e-2  # c moved

  # (b) What round 2's replies held: the update and the change of c_i, never c_i before or after the round.
  train = [r for r in second.replies if r.metadata.message_type == "train"]
  assert len(train) == SITES and all("control-delta" in r.content.array_records for r in train)
  for versions in stored:
    assert _found_in_replies(train, versions[0]) == [] and _found_in_replies(train, versions[1]) == []


def test_secagg_round_sums_the_control_changes_under_masks(setup):
  sites = _sites(setup, "secagg")
  workdir = setup["root"] / "secagg" / "server"
  grid = _InProcessGrid(sites, {**RUN, "workdir": str(workdir), "secagg": True})
  _serve(grid, {**RUN, "workdir": str(workdir), "secagg": True, "stop-after-round": 1})
  simulated = setup["simulate"](setup["start"])
  train = [r for r in grid.replies if r.metadata.message_type == "train"]
  assert len(train) == 4 * SITES  # SecAgg+'s four stages, each answered by every site
  # No reply holds an array, nor a site's change of c_i (after its first round that is c_i+ itself).
  stored = [_site_controls(setup["root"] / "secagg" / f"site{i}") for i in range(SITES)]
  assert sum(len(record) for r in train for record in r.content.array_records.values()) == 0
  assert all(_found_in_replies(train, versions[0]) == [] for versions in stored)
  # The sites computed what they compute without SecAgg+, and c moved by the unmasked sum: each site's change was
  # quantised in steps of 2 * 64 / 2^24 = 7.6e-6 (stochastic rounding: under one step each), the sum of 3 divided
  # by 3 clients: under 7.6e-6, bound 2e-5. Parameters and model state: tests/test_infl_flower.py's SecAgg+ bounds.
  final = _final(workdir)
  diffs = _compared({"variables": final, "c": _flat(_server_state(workdir, 1, setup["deployed"]).controls["server"]),
                     "c_i": [versions[0] for versions in stored]}, simulated)
  params = {k for k in final if k.startswith("['params']")}
  expected = _flat(global_variables(simulated))
  diff_params = _max_diff({k: final[k] for k in params}, {k: expected[k] for k in params})
  print(f"SecAgg+ vs simulation after round 1: {diffs}, parameters {diff_params:.1e}")
  assert max(diffs[f"c_{i}"] for i in range(SITES)) < TOLERANCE and diffs["c"] < 2e-5
  assert diff_params < 1e-4 and diffs["variables"] < 5e-2


def test_a_stale_site_keeps_its_variate_and_reports_no_change(setup):
  """As the engine's rejected client: it trains, its c_i stays, and its change counts as zero (so SecAgg+'s sum,
  where the server cannot drop a site's share, is right too)."""
  spec = site_spec(_sites(setup, "stale")[0])
  site = Site(run_settings(RUN).config, spec)
  params = jax.device_get(setup["deployed"].params)
  rng = np.asarray(jax.random.key_data(jax.random.key(1)))
  out = site.train_corrected(params, jax.device_get(setup["deployed"].model_state), rng, 0,
                             jax.tree_util.tree_map(np.ones_like, params), run="ab12cd34", resume_round=0,
                             key_version=site.key.version + 1)
  assert all(not np.any(x) for x in jax.tree_util.tree_leaves(out[3]))
  assert any(np.any(x) for x in jax.tree_util.tree_leaves(out[0]))  # it did train
  assert not list(spec.state_dir.rglob("*.npz"))


def test_site_controls_keep_what_a_resumed_server_can_ask_for(tmp_path):
  template = {"w": np.zeros(3, np.float32)}
  store = SiteControls(tmp_path, "ab12cd34")
  np.testing.assert_array_equal(store.load(0, template)["w"], 0.0)  # zeros before the site's first round
  for r in (0, 2, 3):  # the site trained in rounds 0, 2 and 3; the server's newest checkpoint is at round 2
    store.store(r, {"w": np.full(3, r + 1.0, np.float32)}, resume_round=min(r, 2))
  # A server resumed at round 2 repeats it from round 0's variate, round 3 from round 2's; nothing older is needed.
  assert sorted(store._versions()) == [0, 2, 3]
  assert store.load(2, template)["w"][0] == 1.0 and store.load(3, template)["w"][0] == 3.0
  store.store(4, {"w": np.full(3, 5.0, np.float32)}, resume_round=4)
  assert sorted(store._versions()) == [3, 4]
  store.store(2, {"w": np.full(3, 9.0, np.float32)}, resume_round=2)  # a restart at round 2 drops the lost rounds
  assert sorted(store._versions()) == [2]
  assert SiteControls(tmp_path, "ef567890").load(5, template)["w"][0] == 0.0  # another run starts afresh
  with pytest.raises(UserInputError, match="hex name"):
    SiteControls(tmp_path, "../elsewhere")


def test_deployment_step_moves_c_as_the_round_does():
  """server_update on a state without the clients' rows, given the summed control changes, is the round's step."""

  def loss(params, state, batch, mask, rng, context):
    return jnp.sum(0.5 * (params["w"] - batch["y"]) ** 2 * mask) / jnp.maximum(jnp.sum(mask), 1.0), state

  algo = scaffold(Task(loss=loss), optax.sgd(0.1), local_epochs=2, batch_size=1)
  clients = stack_clients([{"y": np.asarray([y], np.float32)} for y in (1.0, 3.0, 4.0)], key_version=1)
  variables = {"params": {"w": jnp.float32(0.0)}}
  simulated = algo.init(variables, jax.random.key(0), num_clients=3)
  after, _ = algo.round(simulated, clients, None)
  deployed = algo.init(variables, jax.random.key(0), client_controls=False)
  assert set(deployed.controls) == {"server"}
  change = jax.tree_util.tree_map(lambda c: jnp.sum(c, axis=0), after.controls["clients"])  # c_i = 0 before
  delta = after.params["w"] - simulated.params["w"]
  sums = UpdateSums(delta={"w": delta * 3}, model_state={}, loss=jnp.float32(0.0), weight=jnp.float32(3.0),
                    num_accepted=jnp.int32(3), control_delta=change)
  stepped, _ = algo.server_update(deployed, sums, 3, None, num_clients=3)
  np.testing.assert_allclose(stepped.params["w"], after.params["w"], rtol=1e-6)
  np.testing.assert_allclose(stepped.controls["server"]["w"], after.controls["server"]["w"], rtol=1e-6)
  with pytest.raises(ValueError, match="num_clients"):
    algo.server_update(deployed, sums, 3, None)
  with pytest.raises(ValueError, match="the server's control variate only"):
    algo.round(deployed, clients, None)


def test_bad_settings_meet_one_line(tmp_path):
  for value in ("auto", "fedprox"):
    with pytest.raises(UserInputError, match="drift-correction=.* must be one of none, scaffold"):
      run_settings({"drift-correction": value})
  with pytest.raises(UserInputError, match="secagg-control-scale"):
    run_settings({"secagg-control-scale": 0.0})
  assert run_settings({}).config.drift_correction == "none"
  config = run_settings({"drift-correction": "scaffold"}).config
  spec = site_spec({"data": "proteomics", "partition-id": 0, "key-file": str(tmp_path / "k.json")})
  with pytest.raises(UserInputError, match="state-dir") as error:
    Site(config, spec)
  assert "\n" not in str(error.value)
