"""DP-FedAvg: accounting against dp_accounting, clipping and noise through the engine's hooks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dp_accounting
from dp_accounting.rdp import RdpAccountant
from runkit.errors import UserInputError
from infl_jax.federated import Task, fedavg, stack_clients
from infl_jax.privacy import dp as dplib


def _reference_epsilon(z, q, rounds, delta):
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
  accountant = RdpAccountant()
  accountant.compose(event)
  return accountant.get_epsilon(delta)


@pytest.mark.parametrize("z,q,rounds,delta", [(3.757, 1.0, 80, 1e-5), (1.1, 0.25, 200, 1e-5), (0.8, 0.5, 30, 1e-3)])
def test_epsilon_equals_dp_accounting(z, q, rounds, delta):
  assert dplib.dp_epsilon(z, q, rounds, delta) == pytest.approx(_reference_epsilon(z, q, rounds, delta), rel=1e-9)


def test_full_participation_is_plain_gaussian_composition():
  # q = 1: the Poisson-sampled event must not change anything.
  accountant = RdpAccountant()
  accountant.compose(dp_accounting.GaussianDpEvent(2.0), 10)
  assert dplib.dp_epsilon(2.0, 1.0, 10, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.parametrize("target", [1.0, 3.0, 10.0])
def test_noise_for_target_epsilon_inverts_epsilon(target):
  z = dplib.noise_multiplier_for_epsilon(target, 0.5, 50, 1e-5)
  assert dplib.dp_epsilon(z, 0.5, 50, 1e-5) <= target + 1e-6
  assert dplib.dp_epsilon(z * 0.99, 0.5, 50, 1e-5) > target  # the smallest such noise, within tolerance


def test_clip_by_global_norm_hand_computed():
  tree = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # norm 5
  clipped = dplib.clip_by_global_norm(tree, jnp.float32(1.0))
  np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(clipped["b"], [[0.8]], rtol=1e-6)
  same = dplib.clip_by_global_norm(tree, jnp.float32(10.0))
  np.testing.assert_allclose(same["a"], tree["a"])


def _mean_task():
  # One full-batch SGD step (lr 1) moves w to the client's sample mean: update = mean - w.
  def loss(params, state, batch, mask, rng, context):
    per_row = 0.5 * jnp.sum((params["w"] - batch["x"]) ** 2, axis=-1)
    return jnp.sum(per_row * mask) / jnp.sum(mask), state

  return Task(loss=loss)


def _dp_round(xs, clip, noise, seed=0):
  clients = stack_clients([{"x": x} for x in xs])
  transform, noise_fn = dplib.dp_fedavg_hooks()
  algo = fedavg(dplib.dp_task(_mean_task()), optax.sgd(1.0), batch_size=max(len(x) for x in xs),
                weighting="uniform", update_transform=transform, aggregate_noise=noise_fn)
  dim = xs[0].shape[1]
  state = algo.init({"params": {"w": jnp.zeros(dim)}}, jax.random.key(seed))
  state, _ = jax.jit(algo.round)(state, clients, dplib.DPContext.make(None, clip, noise))
  return np.asarray(state.params["w"])


def test_engine_clips_each_client_update():
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(6, 4)).astype(np.float32) + 5 * (i + 1) for i in range(3)]
  w = _dp_round(xs, clip=0.5, noise=0.0)
  # Each client's update is its mean (w starts at 0), clipped to norm 0.5; the server averages them.
  expected = np.mean([x.mean(0) * min(1, 0.5 / np.linalg.norm(x.mean(0))) for x in xs], 0)
  np.testing.assert_allclose(w, expected, rtol=1e-5)
  assert np.linalg.norm(_dp_round(xs[:1], clip=0.5, noise=0.0)) == pytest.approx(0.5, rel=1e-5)


def test_engine_noise_has_the_accounted_scale():
  xs = [np.zeros((2, 4000), np.float32) for _ in range(4)]  # zero updates: what moves is noise
  w = _dp_round(xs, clip=2.0, noise=3.0)
  assert np.std(w) == pytest.approx(3.0 * 2.0 / 4, rel=0.05)
  assert abs(np.mean(w)) < 0.05


def test_bad_inputs_give_clear_errors():
  with pytest.raises(UserInputError, match="sampling_rate"):
    dplib.dp_epsilon(1.0, 1.5, 10)
  with pytest.raises(UserInputError, match="rounds"):
    dplib.dp_epsilon(1.0, 0.5, 0)
  with pytest.raises(UserInputError, match="delta"):
    dplib.dp_epsilon(1.0, 0.5, 10, delta=0.0)
  with pytest.raises(UserInputError, match="noise_multiplier"):
    dplib.dp_epsilon(0.0, 0.5, 10)
  with pytest.raises(UserInputError, match="target_epsilon"):
    dplib.noise_multiplier_for_epsilon(-1.0, 0.5, 10)
  with pytest.raises(UserInputError, match="clip_norm"):
    dplib.DPContext.make(None, 0.0, 1.0)
