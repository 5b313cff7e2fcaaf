"""Federated LSANet: the imaging task on the omics package's federated engine (docs/design.md, "Federated LSANet").

``lsanet_jax.federated`` is the one part of ``lsanet_jax`` that imports ``infl_jax``, and only its method-agnostic
engine (``infl_jax.federated``: rounds, local training, the round loop, the host-driven round), partitions
(``infl_jax.data.partition``) and keys (``infl_jax.keys``, ``infl_jax.keyed``); ``infl_jax`` never imports
``lsanet_jax``.
"""
