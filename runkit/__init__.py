"""The run kit both packages share: configs declared once, CLI plumbing, errors, checkpoints and metrics logs.

It imports neither ``infl_jax`` nor ``lsanet_jax``; both import it.
"""
