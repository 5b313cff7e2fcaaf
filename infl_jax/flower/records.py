"""Pytrees in Flower records, and the server-side audit for key bytes in what the sites send.

A pytree travels as an ArrayRecord of its leaves, named by their tree paths; the receiver rebuilds it into a
template of the same structure (the server's state, or the model the site builds), so a message never carries
code or structure it must trust. The audit (``KeyAudit``) looks through every byte of every message a site sends
for patterns made from a key (docs/design.md, "Deploying on Flower"); it is how the deployment test shows that
nothing of the key reaches the server.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Iterable

import jax
import numpy as np

from infl_jax import keys as keylib
from infl_jax.key_scheme import input_scrambler

__all__ = ["KeyAudit", "key_patterns", "leaf_names", "message_blobs", "to_array_record", "from_array_record",
           "flat_leaves", "unflatten_leaves", "write_patterns"]


def leaf_names(tree) -> list[str]:
  """Each leaf's tree path, in leaf order: how a pytree's arrays are named in a record or a file."""
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def flat_leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def unflatten_leaves(template, leaves: Iterable[np.ndarray]):
  """``leaves`` (in ``template``'s leaf order) as ``template``'s pytree, each checked against its leaf's shape."""
  leaves = list(leaves)
  ref = jax.tree_util.tree_leaves(template)
  if len(leaves) != len(ref):
    raise ValueError(f"expected {len(ref)} arrays, got {len(leaves)}")
  out = []
  for a, r in zip(leaves, ref):
    a = np.asarray(a)
    if a.shape != np.shape(r):
      raise ValueError(f"array of shape {a.shape} where {np.shape(r)} was expected")
    out.append(a.astype(getattr(r, "dtype", None) or np.asarray(r).dtype, copy=False))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), out)


def to_array_record(tree, prefix: str = ""):
  from flwr.app import Array, ArrayRecord

  return ArrayRecord(array_dict={prefix + n: Array(np.ascontiguousarray(x))
                                 for n, x in zip(leaf_names(tree), flat_leaves(tree))})


def from_array_record(record, template, prefix: str = ""):
  names = leaf_names(template)
  missing = [n for n in names if prefix + n not in record]
  if missing:
    raise ValueError(f"the record lacks {len(missing)} array(s), e.g. {missing[0]!r}")
  return unflatten_leaves(template, [record[prefix + n].numpy() for n in names])


# ---------------------------------------------------------------------------------------------------------
# The key audit

# Shortest pattern searched: shorter byte strings occur by chance in megabytes of float32 parameters.
_MIN_PATTERN = 8


def key_patterns(key: keylib.SecretKey, key_file: pathlib.Path | None = None,
                 num_features: int | None = None) -> dict[str, bytes]:
  """Byte strings that would betray the key: its file, its material (raw, hex), its coordinates as float32 and
  float64 (whole, and each point's pair), and under ``hardened`` the head of its input permutation and signs."""
  pats: dict[str, bytes] = {"material": key.material, "material-hex": key.material.hex().encode()}
  if key_file is not None:
    text = pathlib.Path(key_file).read_bytes()
    pats["key-file"] = text
    record = json.loads(text)
    pats["key-file-material"] = str(record.get("material", "")).encode() or key.material
  for dtype in ("<f4", ">f4", "<f8"):
    coords = np.ascontiguousarray(key.coords, dtype)
    pats[f"coords-{dtype}"] = coords.tobytes()
    for i, row in enumerate(coords):
      pats[f"coords-{dtype}-point{i}"] = row.tobytes()
  if num_features is not None:
    s = input_scrambler(key, num_features)
    head = min(16, num_features)
    for dtype in ("<i8", "<i4"):
      pats[f"permutation-{dtype}"] = np.ascontiguousarray(s.permutation[:head], dtype).tobytes()
    pats["signs-f4"] = np.ascontiguousarray(s.signs[:max(head, 8)], "<f4").tobytes()
  return {k: v for k, v in pats.items() if len(v) >= _MIN_PATTERN}


def write_patterns(path, patterns: dict[str, bytes]) -> None:
  """The audit's pattern file (hex); test and audit use only, kept off the server in a real deployment."""
  path = pathlib.Path(path)
  path.write_text(json.dumps({k: v.hex() for k, v in patterns.items()}))
  path.chmod(0o600)


def _value_blobs(value) -> list[bytes]:
  if isinstance(value, (bytes, bytearray)):
    return [bytes(value)]
  if isinstance(value, str):
    return [value.encode()]
  if isinstance(value, bool):
    return []
  if isinstance(value, (int, float)):
    return [np.float64(value).tobytes(), np.float32(value).tobytes()]
  if isinstance(value, (list, tuple)):
    return [b for v in value for b in _value_blobs(v)]
  return [repr(value).encode()]


def message_blobs(content) -> list[tuple[str, bytes]]:
  """Every payload byte of a Flower RecordDict: its arrays' buffers and its configs' and metrics' values (numbers
  as float64 and float32), each named by where it sits."""
  out = []
  for rname, record in content.array_records.items():
    for aname in record.keys():
      out.append((f"{rname}/{aname}", bytes(record[aname].data)))
  for kind, records in (("config", content.config_records), ("metric", content.metric_records)):
    for rname, record in records.items():
      for k, v in record.items():
        out.extend((f"{kind}:{rname}/{k}", b) for b in _value_blobs(v))
        out.append((f"{kind}:{rname}/{k}#name", str(k).encode()))
  return out


class KeyAudit:
  """Sees every message from the sites (the server wraps its Grid with it) and records, per message, its kind and
  size and every key pattern found; ``summary()`` is written to the run's ``audit.json``."""

  def __init__(self, patterns: dict[str, bytes] | None = None):
    self.patterns = patterns or {}
    self.messages: list[dict[str, Any]] = []

  @classmethod
  def from_file(cls, path) -> "KeyAudit":
    record = json.loads(pathlib.Path(path).read_text())
    return cls({k: bytes.fromhex(v) for k, v in record.items()})

  def inspect(self, message) -> None:
    blobs = [] if message.has_error() else message_blobs(message.content)
    found = sorted({f"{pname} in {where}" for where, blob in blobs for pname, pat in self.patterns.items()
                    if pat in blob})
    arrays = 0 if message.has_error() else sum(len(r) for r in message.content.array_records.values())
    self.messages.append({"type": message.metadata.message_type, "src": int(message.metadata.src_node_id),
                          "bytes": sum(len(b) for _, b in blobs), "arrays": arrays, "found": found,
                          "error": message.has_error()})

  def summary(self) -> dict[str, Any]:
    return {"patterns": len(self.patterns), "messages": self.messages,
            "found": [f for m in self.messages for f in m["found"]]}


class AuditedGrid:
  """A Flower Grid whose replies all pass through ``audit.inspect`` before anyone on the server reads them.

  ``send_and_receive`` polls for the replies every ``poll_seconds``: flwr 1.42's own loop sleeps 3 s between
  pulls, which a round pays once per exchange (SecAgg+ has four) whatever the sites' speed.
  """

  def __init__(self, grid, audit: KeyAudit, poll_seconds: float = 0.2):
    self._grid = grid
    self._audit = audit
    self._poll_seconds = poll_seconds

  def send_and_receive(self, messages, *, timeout=None):
    pending = set(self._grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies = []
    while pending:
      for reply in self.pull_messages(pending):
        pending.discard(reply.metadata.reply_to_message_id)
        replies.append(reply)
      if not pending or (deadline is not None and time.monotonic() >= deadline):
        break
      time.sleep(self._poll_seconds)
    return replies

  def pull_messages(self, message_ids):
    replies = list(self._grid.pull_messages(message_ids))
    for reply in replies:
      self._audit.inspect(reply)
    return replies

  def __getattr__(self, name):
    return getattr(self._grid, name)
