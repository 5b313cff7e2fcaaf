"""The round loop's model selection, divergence stop and resume, and the round learning-rate schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infl_jax.federated import (RunDir, Task, TrainingDiverged, cosine_round_schedule, fedavg, run_rounds,
                                stack_clients)


def _mean_task():
  def loss(params, state, batch, mask, rng, context):
    per_row = 0.5 * jnp.sum((params["w"] - batch["x"]) ** 2, axis=-1)
    return jnp.sum(per_row * mask) / jnp.sum(mask), state

  return Task(loss=loss)


def _clients():
  rng = np.random.default_rng(0)
  return stack_clients([{"x": rng.normal(size=(n, 3)).astype(np.float32) + i} for i, n in enumerate([4, 7, 5])])


def _algo(**kwargs):
  return fedavg(_mean_task(), optax.sgd(0.1), local_epochs=1, batch_size=2, **kwargs)


def _score_peaking_at(peak):
  # A validation score computed from the round only, so the selected round is known by hand.
  return lambda state, done: {"val_score": -abs(done - peak)}


def test_cosine_round_schedule_hand_values():
  factor = cosine_round_schedule(10, final_fraction=0.1)
  values = [float(factor(jnp.int32(r))) for r in (0, 5, 10, 15)]
  np.testing.assert_allclose(values, [1.0, 0.55, 0.1, 0.1], rtol=1e-6)


def test_round_schedule_scales_every_client_step():
  clients = _clients()
  state = _algo().init({"params": {"w": jnp.zeros(3)}}, jax.random.key(0))
  frozen, _ = jax.jit(_algo(client_lr_schedule=lambda r: 0.0).round)(state, clients, None)
  np.testing.assert_array_equal(frozen.params["w"], state.params["w"])
  plain, _ = jax.jit(_algo().round)(state, clients, None)
  unit, _ = jax.jit(_algo(client_lr_schedule=lambda r: 1.0).round)(state, clients, None)
  np.testing.assert_array_equal(unit.params["w"], plain.params["w"])


def test_selection_keeps_the_best_scoring_round():
  algo = _algo()
  state = algo.init({"params": {"w": jnp.zeros(3)}}, jax.random.key(0))
  result = run_rounds(jax.jit(algo.round), state, _clients(), None, rounds=6,
                      extra_metrics=_score_peaking_at(3), select=lambda row: row["val_score"])
  assert int(result.selected.round) == 3 and int(result.state.round) == 6
  assert result.best_or_last is result.selected
  unselected = run_rounds(jax.jit(algo.round), state, _clients(), None, rounds=6)
  assert unselected.selected is None and int(unselected.best_or_last.round) == 6
  # A score that never comes (no validation rows) leaves the last round, never the untrained start.
  unscored = run_rounds(jax.jit(algo.round), state, _clients(), None, rounds=3, select=lambda row: None)
  assert unscored.selected is None and int(unscored.best_or_last.round) == 3


def test_resumed_selection_equals_uninterrupted(tmp_path):
  algo, clients = _algo(), _clients()
  state = algo.init({"params": {"w": jnp.zeros(3)}}, jax.random.key(0))
  kwargs = dict(rounds=8, extra_metrics=_score_peaking_at(5), select=lambda row: row["val_score"])
  whole = run_rounds(jax.jit(algo.round), state, clients, None, run_dir=RunDir(tmp_path / "a"), **kwargs)
  run_rounds(jax.jit(algo.round), state, clients, None, run_dir=RunDir(tmp_path / "b", checkpoint_every=2),
             should_stop=lambda _, done: done >= 6, **kwargs)  # stops after the best round
  resumed = run_rounds(jax.jit(algo.round), state, clients, None,
                       run_dir=RunDir(tmp_path / "b", checkpoint_every=2, resume=True), **kwargs)
  assert int(resumed.selected.round) == int(whole.selected.round) == 5
  np.testing.assert_array_equal(resumed.selected.params["w"], whole.selected.params["w"])
  np.testing.assert_array_equal(resumed.state.params["w"], whole.state.params["w"])


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  algo = _algo()
  state = algo.init({"params": {"w": jnp.zeros(3)}}, jax.random.key(0))

  def round_fn(state, clients, context):
    state, metrics = algo.round(state, clients, context)
    return state, dict(metrics, train_loss=jnp.where(state.round >= 4, jnp.nan, metrics["train_loss"]))

  with pytest.raises(TrainingDiverged, match=r"round 4 .*round 2\).*--learning-rate"):
    run_rounds(jax.jit(round_fn), state, _clients(), None, rounds=10,
               run_dir=RunDir(tmp_path, checkpoint_every=2))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
