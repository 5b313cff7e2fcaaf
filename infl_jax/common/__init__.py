"""Pieces both packages share: checkpointing, metrics logging and CLI helpers."""
