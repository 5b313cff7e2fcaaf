"""``keyed(model)``: key an existing Flax model in one call.

The user's model keeps using plain ``nn.Dense``. ``keyed`` wraps it in a ``KeyedModel`` whose
``__call__(x, *args, key_coords=None, **kwargs)`` runs the user's model under a Flax method
interceptor (``nn.intercept_methods``): each ``nn.Dense`` computes ``W x + b`` as usual, and the
interceptor turns the result into the keyed layer's output ``W_eff x + b_eff`` (or adds the
positional INR bias), then applies FiLM after every Dense but the model's last one in call order.

Parameter tree: the user's model shares the wrapper's scope (``nn.share_scope``), so its
parameters keep their own structure; the INR parameters are children of the Dense they modulate
and the key encoder sits next to the model's top-level modules::

    params/<user's path to a Dense>/{kernel, bias}     ordinary W, b (copy plain weights here)
    params/<user's path to a Dense>/key_mod/{V1, norm, V2}     variant="modulation"
    params/<user's path to a Dense>/pos_bias/{L1, L2, L3}      variant="positional"
    params/<user's path to a Dense>/film/{A, norm, F1, F2}     every Dense but the last
    params/key_encoder/{W1, W2, norm}                          shared by all keyed layers

The key coordinates are an input of ``apply`` and never enter any variable collection.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from infl_jax.keyed.dense import KEY_HIDDEN, KeyModulation, keyed_kernel_and_bias, key_modulation
from infl_jax.keyed.dense import modulate_dense_output
from infl_jax.keyed.encoder import (
    COORD_DIM,
    ENCODER_HIDDEN,
    KEY_DIM,
    KeyEncoder,
    as_key_coords,
    encode_key,
)
from infl_jax.keyed.film import FILM_HIDDEN, FiLM
from infl_jax.keyed.positional import POSITIONAL_HIDDEN, PositionalBias, positional_bias

VARIANTS = ("modulation", "positional")
KEY_ENCODER_NAME = "key_encoder"
INR_CHILD_NAMES = ("key_mod", "pos_bias", "film")


def _is_dense_call(context) -> bool:
  return context.method_name == "__call__" and isinstance(context.module, nn.Dense)


def _path_str(path: Sequence[str]) -> str:
  return "/".join(path)


def _low_precision(dtype) -> Any:
  """A Dense's compute dtype if it is below float32 (bfloat16, float16), else None."""
  return dtype if dtype is not None and jnp.dtype(dtype).itemsize < 4 else None


class KeyedModel(nn.Module):
  """A user's Flax model with every ``nn.Dense`` keyed. Build it with ``keyed(...)``.

  ``__call__(x, *args, key_coords=None, **kwargs)`` forwards ``x, *args, **kwargs`` to the
  user's model. ``key_coords``: the secret key's coordinates ``[M, 2]`` (or a ``SecretKey``);
  ``None`` runs the model without the INR path (plain ``W, b``, no FiLM, key encoder unused).
  ``init`` always creates every INR parameter, whether or not it gets ``key_coords``.

  Mixed precision comes from the user's model: a ``nn.Dense(dtype=jnp.bfloat16)`` computes in
  bfloat16, its FiLM's matmuls follow, and the key path (encoder, ``s``, ``t``) and the
  modulation stay float32; every parameter stays float32.
  """

  model: nn.Module
  key_strength: float = 1.0
  film: bool = True
  variant: str = "modulation"
  # "last": FiLM after every Dense but the last one in call order (found by an abstract trace);
  # or the "/"-joined paths (relative to the model, e.g. "head" or "block_0/Dense_1") of the
  # Dense layers that get no FiLM.
  film_skip: str | tuple[str, ...] = "last"
  encoder_hidden: int = ENCODER_HIDDEN
  key_dim: int = KEY_DIM
  key_hidden: int = KEY_HIDDEN
  film_hidden: int = FILM_HIDDEN
  positional_hidden: int = POSITIONAL_HIDDEN
  coord_dim: int = COORD_DIM

  def setup(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"keyed(): variant must be one of {VARIANTS}, got {self.variant!r}")
    nn.share_scope(self, self.model)  # the user's parameter tree stays as it was
    self.key_encoder = KeyEncoder(self.encoder_hidden, self.key_dim, self.coord_dim)

  def __call__(self, x, *args, key_coords: Any = None, **kwargs):
    film_skip = self._film_skip_paths(x, args, kwargs) if self.film else ()
    use_inr = key_coords is not None
    if use_inr:
      k = self.key_encoder(as_key_coords(key_coords, self.coord_dim))
    elif self.is_initializing():
      # Key-less init still creates every INR parameter; the output stays the plain one.
      k = self.key_encoder(jnp.zeros((1, self.coord_dim), jnp.float32))
    else:
      return self.model(x, *args, **kwargs)
    prefix_len = len(self.path)

    def key_dense(next_fun, call_args, call_kwargs, context):
      if not _is_dense_call(context):
        return next_fun(*call_args, **call_kwargs)
      dense = context.module
      y_plain = next_fun(*call_args, **call_kwargs)
      bias = (
          nn.meta.unbox(dense.get_variable("params", "bias"))
          if dense.use_bias
          else jnp.zeros((dense.features,), y_plain.dtype)
      )
      if self.variant == "modulation":
        s, t = KeyModulation(
            dense.features, self.key_dim, self.key_hidden, name="key_mod", parent=dense
        )(k)
        y = modulate_dense_output(y_plain, bias, s, t, self.key_strength)
      else:
        y = y_plain + PositionalBias(
            dense.features, self.positional_hidden, name="pos_bias", parent=dense
        )()
      if self.film and _path_str(dense.path[prefix_len:]) not in film_skip:
        # FiLM's matmuls follow the Dense's compute dtype (e.g. a bfloat16 model); the key path
        # (k, s, t) stays float32.
        y = FiLM(self.key_strength, self.key_dim, self.film_hidden, dtype=_low_precision(dense.dtype),
                 name="film", parent=dense)(y, k)
      return y.astype(y_plain.dtype) if use_inr else y_plain

    with nn.intercept_methods(key_dense):
      return self.model(x, *args, **kwargs)

  def _film_skip_paths(self, x, args, kwargs) -> tuple[str, ...]:
    if isinstance(self.film_skip, str):
      if self.film_skip != "last":
        raise ValueError(
            f'keyed(): film_skip must be "last" or a tuple of Dense paths such as ("head",), '
            f"got {self.film_skip!r}"
        )
      return (dense_call_order(self.model, x, *args, rng_names=self.scope.rngs, **kwargs)[-1],)
    return tuple(self.film_skip)


def dense_call_order(model: nn.Module, x, *args, rng_names=(), **kwargs) -> list[str]:
  """Paths (``"/"``-joined, relative to ``model``) of the ``nn.Dense`` calls, in call order.

  Found by an abstract trace (``jax.eval_shape`` of ``model.init``): no FLOPs, no parameters.
  """
  plain = model.clone(parent=None, _deep_clone=True)
  leaves, treedef = jax.tree.flatten((x, args, kwargs))
  is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
  calls: list[str] = []

  def record(next_fun, call_args, call_kwargs, context):
    if _is_dense_call(context):
      calls.append(_path_str(context.module.path))
    return next_fun(*call_args, **call_kwargs)

  def init(*arrays):
    arrays = iter(arrays)
    full = [next(arrays) if a else leaf for leaf, a in zip(leaves, is_array)]
    x_, args_, kwargs_ = jax.tree.unflatten(treedef, full)
    rngs = {name: jax.random.key(0) for name in set(rng_names) | {"params"}}
    with nn.intercept_methods(record):
      return plain.init(rngs, x_, *args_, **kwargs_)

  abstract = [jax.ShapeDtypeStruct(l.shape, l.dtype) for l, a in zip(leaves, is_array) if a]
  try:
    jax.eval_shape(init, *abstract)
  except Exception as error:  # noqa: BLE001 - re-raised with the fix
    raise ValueError(
        "keyed(): could not trace the model to find its last nn.Dense (for FiLM placement): "
        f"{type(error).__name__}: {error}. Pass film_skip=(<path of the output Dense>,) "
        'explicitly, e.g. film_skip=("head",).'
    ) from error
  if not calls:
    raise ValueError(
        f"keyed(): {type(model).__name__} calls no flax.linen.Dense layer, so there is nothing "
        "to key; build the model's dense layers with nn.Dense."
    )
  return calls


def keyed(
    model: nn.Module,
    *,
    key_strength: float = 1.0,
    film: bool = True,
    variant: str = "modulation",
    film_skip: str | Sequence[str] = "last",
    name: str | None = None,
    **sizes: int,
) -> KeyedModel:
  """Keys a user's Flax model: every ``nn.Dense`` becomes a keyed layer. One call.

  Args:
    model: any linen Module built with ``nn.Dense`` (unbound, as you would ``init`` it).
    key_strength: lambda, the privacy knob (reference: proteomics 20, perturbation 5, spatial and
      multi-omics 1). ``0`` gives exactly the plain model.
    film: add the activation-dependent FiLM after every Dense but the skipped ones.
    variant: ``"modulation"`` (keyed weights, section 2) or ``"positional"`` (the older
      per-neuron positional INR bias; key-independent on its own, FiLM keys it).
    film_skip: ``"last"`` (the last Dense in call order) or paths of Dense layers, relative to
      the model, that get no FiLM (``()`` for FiLM after every Dense).
    name: the module name when the keyed model is a submodule of a bigger model. Without it,
      a model built inside a compact method keeps its own place and name (``keyed(MLP())(x)``
      has the parameter path ``MLP_0``, as ``MLP()(x)`` would).
    **sizes: ``encoder_hidden`` (32), ``key_dim`` (16), ``key_hidden`` (8), ``film_hidden``
      (8), ``positional_hidden`` (8), ``coord_dim`` (2).

  Returns:
    a ``KeyedModel``: ``apply(variables, x, *args, key_coords=coords_or_None, **kwargs)``.
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f"keyed() takes a flax.linen Module, got {type(model).__name__}")
  if variant not in VARIANTS:
    raise ValueError(f"keyed(): variant must be one of {VARIANTS}, got {variant!r}")
  if not np.isfinite(key_strength) or key_strength < 0:
    raise ValueError(f"keyed(): key_strength must be a finite number >= 0, got {key_strength}")
  allowed = set(KeyedModel.__dataclass_fields__) - {
      "model", "key_strength", "film", "variant", "film_skip", "parent", "name"
  }
  unknown = set(sizes) - allowed
  if unknown:
    raise TypeError(f"keyed(): unknown size argument(s) {sorted(unknown)}; known: {sorted(allowed)}")
  if not isinstance(film_skip, str):
    film_skip = tuple(film_skip)
  if name is not None:
    # A model built inside a compact method is already a child of the enclosing module (and its
    # parameters would live under its own auto-name); detach it so they live under ``name``.
    model = model.clone(parent=None)
  return KeyedModel(
      model,
      key_strength=float(key_strength),
      film=film,
      variant=variant,
      film_skip=film_skip,
      name=name,
      **sizes,
  )


# --------------------------------------------------------------------------------------------
# Helpers over variables trees (pure; work on any tree produced by a KeyedModel).


def _params(variables: Mapping) -> Mapping:
  return variables["params"] if "params" in variables else variables


def key_vector(variables: Mapping, key_coords: Any, *, encoder_name: str = KEY_ENCODER_NAME):
  """The 16-dim key vector ``k`` a keyed model computes from ``key_coords``.

  ``variables``: the model's variables (or just its ``params``).
  """
  params = _params(variables)
  if encoder_name not in params:
    raise KeyError(
        f"key_vector(): no {encoder_name!r} in the parameters (top-level keys: "
        f"{sorted(params)}); pass the variables of a model built with keyed(...)."
    )
  return encode_key(params[encoder_name], as_key_coords(key_coords))


def _dense_subtrees(params: Mapping, path=()):
  """Yields ``(path, subtree)`` of every dict holding a ``kernel`` and an INR child."""
  if "kernel" in params and any(name in params for name in INR_CHILD_NAMES[:2]):
    yield path, params
  for name, child in params.items():
    if isinstance(child, Mapping):
      yield from _dense_subtrees(child, path + (name,))


def keyed_weights(
    variables: Mapping, key_coords: Any, key_strength: float
) -> dict[str, tuple[jax.Array, jax.Array]]:
  """``{dense path: (W_eff [in, out], b_eff [out])}`` of every keyed Dense for ``key_coords``.

  ``key_coords=None`` gives the plain ``(W, b)``. FiLM is activation-dependent and not part of
  these effective weights.
  """
  params = _params(variables)
  k = None if key_coords is None else key_vector(params, key_coords)
  out = {}
  for path, dense in _dense_subtrees(params):
    kernel = dense["kernel"]
    bias = dense.get("bias", jnp.zeros(kernel.shape[-1], kernel.dtype))
    if k is not None and "key_mod" in dense:
      kernel, bias = keyed_kernel_and_bias(
          kernel, bias, *key_modulation(dense["key_mod"], k), key_strength
      )
    elif k is not None:
      bias = bias + positional_bias(dense["pos_bias"], kernel.shape[-1])
    out[_path_str(path)] = (kernel, bias)
  return out


def plain_variables(keyed_variables: Mapping) -> dict:
  """The variables of the un-keyed model: INR children and the key encoder removed."""
  flat = traverse_util.flatten_dict(dict(keyed_variables))
  kept = {}
  for path, leaf in flat.items():
    is_encoder = len(path) > 1 and path[0] == "params" and path[1] == KEY_ENCODER_NAME
    is_inr = any(
        name in INR_CHILD_NAMES and (*path[:i], "kernel") in flat for i, name in enumerate(path)
    )
    if not (is_encoder or is_inr):
      kept[path] = leaf
  return traverse_util.unflatten_dict(kept)


def copy_plain_params(keyed_variables: Mapping, plain_variables_: Mapping) -> dict:
  """Copies a plain model's variables (``params``, ``batch_stats``, ...) into a keyed tree.

  Every leaf of the plain tree must exist in the keyed tree with the same shape; the INR
  parameters and the key encoder keep their values. Raises ``ValueError`` naming the first
  mismatch.
  """
  target = traverse_util.flatten_dict(dict(keyed_variables))
  for path, leaf in traverse_util.flatten_dict(dict(plain_variables_)).items():
    name = "/".join(map(str, path))
    if path not in target:
      raise ValueError(
          f"copy_plain_params(): {name} is in the plain model but not in the keyed one; key the "
          "same model class with the same settings (keyed(PlainModel(...)))."
      )
    if np.shape(target[path]) != np.shape(leaf):
      raise ValueError(
          f"copy_plain_params(): {name} has shape {np.shape(leaf)} in the plain model but "
          f"{np.shape(target[path])} in the keyed one; build both with the same sizes."
      )
    target[path] = leaf
  return traverse_util.unflatten_dict(target)
