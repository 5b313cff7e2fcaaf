"""Keyed ("implicit neural representation") layers of INFL, as pure functions and linen modules.

Plug-and-play: ``keyed(model, key_strength=...)`` keys a user's Flax model built with
``nn.Dense``; ``apply(variables, x, ..., key_coords=coords)`` runs it with a key,
``key_coords=None`` without the INR path.
"""

from infl_jax.keyed.dense import (
    KeyedDense,
    KeyModulation,
    key_modulation,
    keyed_dense_apply,
    keyed_kernel_and_bias,
    modulate_dense_output,
)
from infl_jax.keyed.diagnostics import key_sensitivity
from infl_jax.keyed.encoder import COORD_DIM, KEY_DIM, KeyEncoder, as_key_coords, encode_key
from infl_jax.keyed.film import FiLM, film_apply
from infl_jax.keyed.positional import (
    PositionalBias,
    PositionalDense,
    neuron_coordinates,
    positional_bias,
    positional_dense_apply,
    positional_encoding,
)
from infl_jax.keyed.transform import (
    KeyedModel,
    copy_plain_params,
    dense_call_order,
    key_vector,
    keyed,
    keyed_weights,
    plain_variables,
)

__all__ = [
    "COORD_DIM",
    "KEY_DIM",
    "FiLM",
    "KeyEncoder",
    "KeyModulation",
    "KeyedDense",
    "KeyedModel",
    "PositionalBias",
    "PositionalDense",
    "as_key_coords",
    "copy_plain_params",
    "dense_call_order",
    "encode_key",
    "film_apply",
    "key_modulation",
    "key_sensitivity",
    "key_vector",
    "keyed",
    "keyed_dense_apply",
    "keyed_kernel_and_bias",
    "keyed_weights",
    "modulate_dense_output",
    "neuron_coordinates",
    "plain_variables",
    "positional_bias",
    "positional_dense_apply",
    "positional_encoding",
]
