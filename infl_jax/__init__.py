"""INFL in JAX: key-embedded federated learning for omics, simulated with vmap over clients."""

__version__ = "0.1.0"
