"""Atomic, resumable checkpoints of a training state pytree (orbax underneath).

A checkpoint holds two items: ``state`` (a pytree of arrays: parameters, optimizer
state, PRNG key data, counters) and ``meta`` (JSON: the run's config, so an
incompatible resume is refused, plus whatever JSON the caller passes as ``extra``).
Orbax writes each step into a temporary folder and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import pathlib


import jax
import numpy as np
import orbax.checkpoint as ocp

from runkit.errors import CheckpointError

__all__ = ["CheckpointError", "Checkpointer"]


def _normalise_config(config: dict | None) -> dict:
  # Round-trip through JSON so tuples/lists and numpy scalars compare equal after restore.
  return json.loads(json.dumps(config or {}, sort_keys=True, default=_json_default))


def _json_default(obj):
  if isinstance(obj, (np.generic,)):
    return obj.item()
  if isinstance(obj, pathlib.Path):
    return str(obj)
  raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


class Checkpointer:
  """Saves every ``save_every`` steps, keeps the newest ``keep``, restores with checks."""

  def __init__(self, directory, *, save_every: int = 1, keep: int = 3, config: dict | None = None,
               config_defaults: dict | None = None):
    """config: the settings a resume must match (see ``runkit.config.resume_fingerprint``);
    config_defaults: their defaults, which stand in for settings an older checkpoint does not record."""
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = pathlib.Path(directory).absolute()
    self.config = _normalise_config(config)
    self.config_defaults = _normalise_config(config_defaults)
    self._save_every = save_every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=False,
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )

  def save(self, step: int, state, *, extra: dict | None = None, force: bool = False) -> bool:
    """Writes ``state`` at ``step`` if it falls on the interval (or ``force``); returns whether it did."""
    if not force and step % self._save_every != 0:
      return False
    meta = {"config": self.config, "extra": _normalise_config(extra)}
    self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    self._manager.wait_until_finished()
    return True

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, state_template, step: int | None = None):
    """Returns ``(state, extra)`` from ``step`` (default: the latest), checked against the template."""
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no checkpoint found in {self.directory}; start without --resume to begin a new run")
    elif step not in self.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available steps: {self.all_steps()}")

    advice = (f"delete {self.directory / str(step)} to resume from an earlier step "
              f"(available: {self.all_steps()}), or start a fresh --workdir")
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      raise CheckpointError(f"checkpoint step {step} in {self.directory} has unreadable metadata "
                            f"({type(e).__name__}: {e}); {advice}") from e
    if not isinstance(meta, dict) or "config" not in meta:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} was not written by this library; {advice}")
    self._check_config(meta["config"])

    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_template)
    self._check_structure(step, abstract)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} could not be read, it is probably "
                            f"corrupted ({type(e).__name__}: {e}); {advice}") from e
    return restored, meta.get("extra", {})

  def _check_config(self, saved: dict) -> None:
    saved = {**{k: v for k, v in self.config_defaults.items() if k in self.config}, **saved}
    diffs = {k: (saved.get(k), self.config.get(k))
             for k in sorted(set(saved) | set(self.config)) if saved.get(k) != self.config.get(k)}
    if diffs:
      lines = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, a, b in ((k, *v) for k, v in diffs.items()))
      raise CheckpointError(f"checkpoint in {self.directory} belongs to a run with different settings ({lines}); "
                            "resume with the original settings or use a new --workdir")

  def _check_structure(self, step: int, abstract) -> None:
    try:
      saved = self._manager.item_metadata(step)["state"]
    except Exception as e:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} has unreadable array metadata "
                            f"({type(e).__name__}: {e}); it is probably corrupted: delete that step folder to resume "
                            f"from an earlier step (available: {self.all_steps()}), or start a fresh --workdir") from e
    if saved is None:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} has no array metadata; it is incomplete "
                            "or was not written by this library")
    saved_tree = getattr(saved, "tree", saved)
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
    have = {jax.tree_util.keystr(p): tuple(getattr(x, "shape", ()))
            for p, x in jax.tree_util.tree_leaves_with_path(saved_tree)}
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or wrong:
      detail = []
      if missing:
        detail.append(f"missing {missing[:5]}")
      if unexpected:
        detail.append(f"unexpected {unexpected[:5]}")
      if wrong:
        detail.append("shape mismatch " + ", ".join(f"{k}: saved {have[k]} vs model {want[k]}" for k in wrong[:5]))
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not fit this model/optimizer "
                            f"({'; '.join(detail)}); resume with the settings that wrote it or use a new --workdir")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
