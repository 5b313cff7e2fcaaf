"""Gradient inversion (DLG / iDLG family), vmapped over targets and restarts.

The attacker observes a gradient (or a client update) ``g`` and optimises a dummy input and a
soft label (plus, for the adaptive attacker, any other unknown such as the key vector) so that
the gradient they produce matches ``g``:

    loss = l2_weight * ||g_dummy - g||^2 + cosine_weight * (1 - cos(g_dummy, g))

with Adam (lr 0.1 in the reference). With ``use_idlg`` the label is not optimised but guessed
iDLG-style: for one sample under softmax cross-entropy the last layer's bias gradient is
``softmax - onehot``, negative only at the true class.

``invert`` is one pure function: ``lax.scan`` over steps, ``vmap`` over restarts and over targets,
so all attacks run as one compiled program (many at once on an accelerator).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from runkit.errors import UserInputError

__all__ = ["InversionConfig", "InversionResult", "gradient_match_loss", "idlg_label", "invert",
           "normalized_gd", "simulated_update_fn", "soft_cross_entropy"]

PyTree = Any
OPTIMIZERS = ("adam", "normalized_gd")


def normalize_by_global_norm() -> optax.GradientTransformation:
  """Rescales the update to unit global norm (so the learning rate is the step length)."""

  def update(grads, state, params=None):
    del params
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
    return jax.tree_util.tree_map(lambda g: g / (norm + 1e-20), grads), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def normalized_gd(learning_rate) -> optax.GradientTransformation:
  """Gradient descent with steps of length ``learning_rate`` (a float or an optax schedule)."""
  return optax.chain(normalize_by_global_norm(), optax.sgd(learning_rate))


class InversionConfig(NamedTuple):
  steps: int = 300
  learning_rate: float = 0.1
  restarts: int = 2
  l2_weight: float = 1.0
  cosine_weight: float = 1.0
  relative_l2: bool = False  # divide the L2 term by ||g||^2 (scale-free; the reference does not)
  use_idlg: bool = True
  init_scale: float = 1.0  # dummy inputs start at N(0, init_scale^2) (standardised omics data)
  # "adam" (the reference) or "normalized_gd": steps of length learning_rate along the gradient
  # direction, which converges much faster on the near scale-free cosine objective.
  optimizer: str = "adam"
  cosine_decay: bool = False  # decay the learning rate to 1% over the steps (cosine schedule)

  def validate(self) -> "InversionConfig":
    for name in ("steps", "restarts"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserInputError(f"InversionConfig.{name} must be an integer >= 1, got {value!r}")
    for name in ("learning_rate", "init_scale"):
      if not getattr(self, name) > 0:
        raise UserInputError(f"InversionConfig.{name} must be > 0, got {getattr(self, name)!r}")
    if self.optimizer not in OPTIMIZERS:
      raise UserInputError(f"InversionConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if self.l2_weight < 0 or self.cosine_weight < 0 or self.l2_weight + self.cosine_weight == 0:
      raise UserInputError("InversionConfig: l2_weight and cosine_weight must be >= 0 and not both 0")
    return self


class InversionResult(NamedTuple):
  x: jax.Array  # [T, F...] best restart's input per target
  label_probs: jax.Array  # [T, C]
  extra: PyTree  # best restart's extra unknowns, leading axis T
  loss: jax.Array  # [T] best final matching loss
  all_loss: jax.Array  # [T, R]


def soft_cross_entropy(logits: jax.Array, label_probs: jax.Array) -> jax.Array:
  return -jnp.sum(label_probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def idlg_label(last_bias_grad: jax.Array) -> jax.Array:
  """The label of a single-sample cross-entropy gradient: the class whose last-layer bias gradient
  is the most negative. ``last_bias_grad`` [..., C] -> int32 [...]."""
  return jnp.argmin(last_bias_grad, axis=-1).astype(jnp.int32)


def _flat(tree: PyTree) -> jax.Array:
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree_util.tree_leaves(tree)])


def gradient_match_loss(g_dummy: PyTree, g_target: PyTree, l2_weight: float = 1.0,
                        cosine_weight: float = 1.0, relative_l2: bool = False) -> jax.Array:
  a, b = _flat(g_dummy), _flat(g_target)
  l2 = jnp.sum(jnp.square(a - b))
  if relative_l2:
    l2 = l2 / (jnp.sum(jnp.square(b)) + 1e-12)
  cos = jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-12)
  return l2_weight * l2 + cosine_weight * (1.0 - cos)


def simulated_update_fn(loss_fn: Callable[[PyTree, jax.Array, jax.Array, PyTree], jax.Array], params: PyTree, *,
                        local_steps: int, learning_rate: float) -> Callable:
  """A ``gradient_fn`` for attacks on FedAvg updates of one sample: the attacker's model of the
  client's ``local_steps`` SGD steps (``loss_fn(params, x, label_probs, extra)``), returning the update
  ``params_after - params`` that the client sends."""
  if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
    raise UserInputError(f"simulated_update_fn: local_steps must be an integer >= 1, got {local_steps!r}")

  def update_fn(x, label_probs, extra):
    def step(p, _):
      g = jax.grad(loss_fn)(p, x, label_probs, extra)
      return jax.tree_util.tree_map(lambda a, b: a - learning_rate * b, p, g), None

    trained, _ = jax.lax.scan(step, params, None, length=local_steps)
    return jax.tree_util.tree_map(jnp.subtract, trained, params)

  return update_fn


def invert(gradient_fn: Callable[[jax.Array, jax.Array, PyTree], PyTree], targets: PyTree, rng: jax.Array,
           input_shape: tuple[int, ...], num_classes: int, config: InversionConfig = InversionConfig(), *,
           labels: jax.Array | None = None, extra_init: PyTree = ()) -> InversionResult:
  """Runs ``config.restarts`` attacks on each of the ``T`` observed gradients ``targets`` (leading axis T).

  ``gradient_fn(x, label_probs, extra) -> gradient tree`` (same structure as one target) is what
  the attacker believes the client computed: ``x`` has ``input_shape``, ``label_probs`` [C].
  ``labels`` [T] (e.g. from ``idlg_label``) fixes the labels when ``config.use_idlg``; without it the
  soft label is optimised too. ``extra_init``: further unknowns the attacker optimises jointly
  (e.g. the key vector), the same starting point for every attack.
  """
  config = config.validate()
  leaves = jax.tree_util.tree_leaves(targets)
  if not leaves:
    raise UserInputError("gradient inversion: the observed gradient tree is empty")
  num_targets = leaves[0].shape[0]
  if any(leaf.shape[:1] != (num_targets,) for leaf in leaves):
    raise UserInputError("gradient inversion: every leaf of `targets` needs the same leading axis (one per target)")
  fixed_label = config.use_idlg and labels is not None
  if fixed_label and jnp.shape(labels) != (num_targets,):
    raise UserInputError(f"gradient inversion: labels must have shape ({num_targets},), got {jnp.shape(labels)}")
  if labels is None:
    labels = jnp.zeros((num_targets,), jnp.int32)
  # A step whose gradient overflows (saturated softmax, huge dummy) is skipped, not propagated.
  lr = (optax.cosine_decay_schedule(config.learning_rate, config.steps, alpha=0.01) if config.cosine_decay
        else config.learning_rate)
  base = optax.adam(lr) if config.optimizer == "adam" else normalized_gd(lr)
  opt = optax.chain(optax.zero_nans(), base)

  def attack_one(target, label, attack_rng):
    x_rng, y_rng = jax.random.split(attack_rng)
    variables = (config.init_scale * jax.random.normal(x_rng, input_shape, jnp.float32),
                 0.01 * jax.random.normal(y_rng, (num_classes,), jnp.float32), extra_init)

    def label_probs(logits):
      return jax.nn.one_hot(label, num_classes) if fixed_label else jax.nn.softmax(logits)

    def objective(v):
      x, logits, extra = v
      g = gradient_fn(x, label_probs(logits), extra)
      return gradient_match_loss(g, target, config.l2_weight, config.cosine_weight, config.relative_l2)

    def step(carry, _):
      v, opt_state = carry
      loss, grads = jax.value_and_grad(objective)(v)
      updates, opt_state = opt.update(grads, opt_state, v)
      return (optax.apply_updates(v, updates), opt_state), loss

    (v, _), _ = jax.lax.scan(step, (variables, opt.init(variables)), None, length=config.steps)
    final = objective(v)
    x, logits, extra = v
    return x, label_probs(logits), extra, jnp.where(jnp.isfinite(final), final, jnp.inf)

  def attack_target(target, label, target_rng):
    rngs = jax.random.split(target_rng, config.restarts)
    x, probs, extra, loss = jax.vmap(attack_one, in_axes=(None, None, 0))(target, label, rngs)
    best = jnp.argmin(loss)
    pick = lambda t: jax.tree_util.tree_map(lambda a: a[best], t)
    return pick(x), pick(probs), pick(extra), loss[best], loss

  rngs = jax.random.split(rng, num_targets)
  x, probs, extra, loss, all_loss = jax.vmap(attack_target)(targets, labels, rngs)
  return InversionResult(x, probs, extra, loss, all_loss)
