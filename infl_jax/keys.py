"""Secret keys of INFL: M=128 coordinates in d=2 drawn from a seed (docs/design.md, "Keys").

The seed, the mode and the version identify a key; the coordinates are what a keyed model takes
as ``apply(..., key_coords=key.coords)``. They are an input, never a parameter: the server and
the other clients never see them.

Coordinates come from numpy's PCG64 bit stream seeded by ``SeedSequence([seed, version])``,
turned into floats by plain arithmetic here (not by numpy's distribution code, which may change
between numpy versions), so the same (seed, mode, version) gives the same key on every machine.
A new version of the same seed is a new key (key rotation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import stat
import tempfile
import warnings
from typing import Any

import numpy as np

from runkit.errors import UserInputError

__all__ = [
    "KEY_MODES",
    "KeyFileError",
    "SecretKey",
    "generate_key",
    "load_key",
    "other_mode_key",
    "save_key",
    "wrong_key_like",
]

KEY_MODES = ("uniform", "normal", "ones", "zeros", "constant")
N_POINTS = 128
DIM = 2
FILE_FORMAT = "infl-secret-key"
FILE_FORMAT_VERSION = 1
KEY_FILE_PERMISSIONS = 0o600


class KeyFileError(UserInputError):
  """A key file that cannot be written or read; the message names the problem and the fix."""


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _check_mode(mode: Any) -> str:
  if mode not in KEY_MODES:
    raise ValueError(f"key mode must be one of {KEY_MODES}, got {mode!r}")
  return mode


def _check_coords(coords: Any) -> np.ndarray:
  try:
    coords = np.array(coords, dtype=np.float32)  # a private, owned copy
  except (TypeError, ValueError) as error:
    raise ValueError(f"key coordinates must be a numeric [M, {DIM}] array: {error}") from error
  if coords.ndim != 2 or coords.shape[1] != DIM or coords.shape[0] < 1:
    raise ValueError(
        f"key coordinates must have shape [M, {DIM}] (M points in {DIM}-d, M={N_POINTS} by "
        f"default), got shape {coords.shape}"
    )
  if not np.all(np.isfinite(coords)):
    raise ValueError("key coordinates must be finite (found NaN or inf)")
  coords.setflags(write=False)
  return coords


@dataclasses.dataclass(frozen=True, eq=False)
class SecretKey:
  """A secret key: ``seed``, ``mode``, ``version`` and its coordinates (float32 ``[M, 2]``).

  ``coords`` is read-only. ``repr`` hides the seed and the coordinates (anyone with the seed and
  mode can regenerate the key), so a key can be logged without leaking it.
  """

  seed: int
  mode: str
  version: int
  coords: np.ndarray

  def __post_init__(self):
    object.__setattr__(self, "seed", _check_int("seed", self.seed, 0))
    object.__setattr__(self, "mode", _check_mode(self.mode))
    object.__setattr__(self, "version", _check_int("version", self.version, 0))
    object.__setattr__(self, "coords", _check_coords(self.coords))

  @property
  def n_points(self) -> int:
    return int(self.coords.shape[0])

  @property
  def dim(self) -> int:
    return int(self.coords.shape[1])

  def __eq__(self, other):
    if not isinstance(other, SecretKey):
      return NotImplemented
    return (self.seed, self.mode, self.version) == (other.seed, other.mode, other.version) and (
        np.array_equal(self.coords, other.coords)
    )

  def __hash__(self):
    return hash((self.seed, self.mode, self.version, self.coords.tobytes()))

  def __repr__(self):
    return (
        f"SecretKey(mode={self.mode!r}, version={self.version}, n_points={self.n_points}, "
        "seed=<hidden>, coords=<hidden>)"
    )


def _uniform01(seed: int, version: int, size: int) -> np.ndarray:
  """``size`` floats in [0, 1) from the top 53 bits of PCG64's raw output (version-stable)."""
  bit_generator = np.random.PCG64(np.random.SeedSequence([seed, version]))
  raw = bit_generator.random_raw(size)
  return (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53


def generate_key(
    seed: int, mode: str = "uniform", version: int = 1, n_points: int = N_POINTS, dim: int = DIM
) -> SecretKey:
  """Draws a key's coordinates deterministically from (seed, mode, version).

  Modes: ``uniform`` U[-1, 1]^d (the reference default); ``normal`` N(0, 1) (Box-Muller);
  ``ones`` / ``zeros`` (all points 1 / 0: the seed plays no part, useful as wrong keys in
  evaluations); ``constant`` (every coordinate the same value, drawn from U[-1, 1] by the seed).
  """
  seed = _check_int("seed", seed, 0)
  version = _check_int("version", version, 0)
  n_points = _check_int("n_points", n_points, 1)
  dim = _check_int("dim", dim, 1)
  if dim != DIM:
    raise ValueError(f"keyed models take {DIM}-d key points (coords [M, {DIM}]), got dim={dim}")
  shape = (n_points, dim)
  mode = _check_mode(mode)
  if mode == "uniform":
    coords = 2.0 * _uniform01(seed, version, n_points * dim) - 1.0
  elif mode == "normal":
    u1, u2 = np.split(_uniform01(seed, version, 2 * n_points * dim), 2)
    coords = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)
  elif mode == "ones":
    coords = np.ones(shape)
  elif mode == "zeros":
    coords = np.zeros(shape)
  else:  # constant
    coords = np.full(shape, 2.0 * _uniform01(seed, version, 1)[0] - 1.0)
  return SecretKey(seed, mode, version, np.reshape(coords, shape).astype(np.float32))


def wrong_key_like(key: SecretKey, seed_offset: int = 1) -> SecretKey:
  """A key of the same mode and version but another seed (``key.seed + seed_offset``)."""
  if seed_offset == 0:
    raise ValueError("seed_offset must be nonzero, or the 'wrong' key is the right one")
  if key.mode in ("ones", "zeros"):
    raise ValueError(
        f"a {key.mode!r} key does not depend on its seed, so no other seed gives another key; "
        "use other_mode_key(key) instead"
    )
  wrong = generate_key(key.seed + seed_offset, key.mode, key.version, key.n_points, key.dim)
  if np.array_equal(wrong.coords, key.coords):  # cannot happen for uniform/normal/constant
    raise ValueError("the other seed produced the same coordinates; try another seed_offset")
  return wrong


def other_mode_key(key: SecretKey, mode: str | None = None) -> SecretKey:
  """A key with the same seed and version but another mode (default: ``normal``, or ``uniform``
  when the key already is normal)."""
  mode = mode or ("uniform" if key.mode == "normal" else "normal")
  if _check_mode(mode) == key.mode:
    raise ValueError(f"other_mode_key(): the key already has mode {mode!r}; pick another mode")
  return generate_key(key.seed, mode, key.version, key.n_points, key.dim)


# --------------------------------------------------------------------------------------------
# Key files: JSON holding (seed, mode, version, coordinates) and a checksum of the coordinates.


def _coords_checksum(coords: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(coords, dtype="<f4").tobytes()).hexdigest()


def save_key(key: SecretKey, path, overwrite: bool = False) -> pathlib.Path:
  """Writes ``key`` to ``path`` atomically, readable by its owner only (mode 0o600).

  An existing file is never replaced unless ``overwrite=True``: losing a key makes the models
  trained with it unusable. Returns the path written.
  """
  if not isinstance(key, SecretKey):
    raise TypeError(f"save_key() takes a SecretKey, got {type(key).__name__}")
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    raise KeyFileError(f"{path} is a directory; give a file name for the key, e.g. {path}/key.json")
  if path.exists() and not overwrite:
    raise KeyFileError(
        f"{path} already exists; refusing to overwrite a secret key. Choose another path, or "
        "pass overwrite=True if you really mean to replace it."
    )
  path.parent.mkdir(parents=True, exist_ok=True)
  record = {
      "format": FILE_FORMAT,
      "format_version": FILE_FORMAT_VERSION,
      "seed": key.seed,
      "mode": key.mode,
      "version": key.version,
      "n_points": key.n_points,
      "dim": key.dim,
      "coords_sha256": _coords_checksum(key.coords),
      "coords": key.coords.astype(np.float64).tolist(),  # float32 -> float64 is exact
  }
  # mkstemp creates the file 0o600 from the start, so the key is never readable by others.
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, KEY_FILE_PERMISSIONS)
    with os.fdopen(fd, "w") as f:
      json.dump(record, f)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    if overwrite:
      os.replace(tmp, path)
    else:
      try:
        os.link(tmp, path)  # atomic and fails if the path appeared in the meantime
      except FileExistsError:
        raise KeyFileError(
            f"{path} already exists; refusing to overwrite a secret key. Choose another path, "
            "or pass overwrite=True."
        ) from None
      except OSError:  # file system without hard links
        if path.exists():
          raise KeyFileError(f"{path} already exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)
  finally:
    pathlib.Path(tmp).unlink(missing_ok=True)
  return path


def load_key(path) -> SecretKey:
  """Reads a key file written by ``save_key`` and validates it.

  Raises ``KeyFileError`` naming the problem for a missing, corrupted or malformed file (wrong
  coordinate shape, checksum mismatch, unknown mode, ...). Warns when the file is readable by
  other users.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise KeyFileError(f"no key file at {path}; create one with infl_jax.keys.save_key")
  if stat.S_IMODE(path.stat().st_mode) & 0o077:
    warnings.warn(
        f"key file {path} is readable by other users (mode {oct(stat.S_IMODE(path.stat().st_mode))}); "
        f"run: chmod 600 {path}",
        stacklevel=2,
    )
  corrupted = f"key file {path} is corrupted or not an INFL key file"
  try:
    record = json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise KeyFileError(f"{corrupted}: {error}") from None
  if not isinstance(record, dict) or record.get("format") != FILE_FORMAT:
    raise KeyFileError(f"{corrupted}: missing \"format\": \"{FILE_FORMAT}\"")
  if record.get("format_version") != FILE_FORMAT_VERSION:
    raise KeyFileError(
        f"key file {path} has format_version {record.get('format_version')!r}; this version of "
        f"infl_jax reads format_version {FILE_FORMAT_VERSION}"
    )
  missing = [f for f in ("seed", "mode", "version", "coords", "coords_sha256") if f not in record]
  if missing:
    raise KeyFileError(f"{corrupted}: missing field(s) {missing}")
  try:
    coords = np.asarray(record["coords"], dtype=np.float64)
  except (TypeError, ValueError) as error:
    raise KeyFileError(f"{corrupted}: coords is not a numeric [M, {DIM}] array ({error})") from None
  if coords.ndim != 2 or coords.shape[1] != DIM or coords.shape[0] < 1:
    raise KeyFileError(
        f"key file {path} holds coordinates of shape {coords.shape}; a key has shape "
        f"[M, {DIM}] (M={N_POINTS} by default). Regenerate it with generate_key + save_key."
    )
  if "n_points" in record and record["n_points"] != coords.shape[0]:
    raise KeyFileError(
        f"{corrupted}: header says n_points={record['n_points']} but it holds {coords.shape[0]}"
    )
  coords = coords.astype(np.float32)
  if _coords_checksum(coords) != record["coords_sha256"]:
    raise KeyFileError(f"{corrupted}: the coordinates do not match their checksum")
  try:
    return SecretKey(record["seed"], record["mode"], record["version"], coords)
  except ValueError as error:
    raise KeyFileError(f"{corrupted}: {error}") from None
