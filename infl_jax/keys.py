"""Secret keys of INFL: M=128 coordinates in d=2 drawn from secret key material (docs/design.md, "Keys").

A key's secret is its *key material*: 32 bytes. ``generate_key()`` draws them from the operating
system's CSPRNG (``secrets.token_bytes``), so no two users share a key and none can be enumerated.
``generate_key(seed=...)`` uses the seed itself as the material: reproducible for tests and seed
studies, but INSECURE (anyone who knows or guesses the seed rebuilds the key).

The coordinates are what a keyed model takes as ``apply(..., key_coords=key.coords)``. They are an
input, never a parameter: the server and the other clients never see them. They come from numpy's
PCG64 bit stream seeded by ``SeedSequence([material as a little-endian integer, version])``, turned
into floats by plain arithmetic here (not by numpy's distribution code, which may change between numpy
versions), so the same (material, mode, version) gives the same key on every machine; a seeded key
keeps the coordinates of earlier releases. A new version of the same material is a new key (rotation).

Nothing outside the key file rebuilds a key: runs record its ``fingerprint`` (a truncated SHA-256 of
the key), and the wrong keys of the key study are attacker guesses derived from public values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import secrets
import stat
import tempfile
import warnings
from typing import Any

import numpy as np

from runkit.errors import UserInputError

__all__ = ["KEY_MODES", "InsecureKeyWarning", "KeyFileError", "SecretKey", "generate_key", "key_from_material",
           "load_key", "other_mode_key", "save_key", "seed_material", "wrong_key_like"]

KEY_MODES = ("uniform", "normal", "ones", "zeros", "constant")
N_POINTS = 128
DIM = 2
FILE_FORMAT = "infl-secret-key"
FILE_FORMAT_VERSION = 2  # 1: seed, mode, version and coordinates (seed-derived keys only; still read)
KEY_FILE_PERMISSIONS = 0o600
MATERIAL_BYTES = 32  # 256 bits from the CSPRNG; SeedSequence's 128-bit pool bounds the coordinates' entropy
SOURCE_RANDOM = "os-random"
SOURCE_SEED = "seed (insecure)"
# Domain tags keep the hashes of one key apart: a fingerprint is never a scramble seed or a guess.
_FINGERPRINT_TAG = b"infl-key-fingerprint-v1\0"
_GUESS_TAG = b"infl-key-guess-v1\0"


class KeyFileError(UserInputError):
  """A key file that cannot be written or read; the message names the problem and the fix."""


class InsecureKeyWarning(UserWarning):
  """A key made from an integer seed: whoever knows or guesses the seed rebuilds it."""


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
    raise ValueError(f"key coordinates must have shape [M, {DIM}] (M points in {DIM}-d, M={N_POINTS} by "
                     f"default), got shape {coords.shape}")
  if not np.all(np.isfinite(coords)):
    raise ValueError("key coordinates must be finite (found NaN or inf)")
  coords.setflags(write=False)
  return coords


def _check_material(material: Any) -> bytes:
  if not isinstance(material, (bytes, bytearray)) or len(material) != MATERIAL_BYTES:
    got = f"{len(material)} bytes" if isinstance(material, (bytes, bytearray)) else type(material).__name__
    raise ValueError(f"key material must be {MATERIAL_BYTES} bytes (secrets.token_bytes({MATERIAL_BYTES})), "
                     f"got {got}")
  return bytes(material)


def seed_material(seed: int) -> bytes:
  """The key material of ``generate_key(seed=...)``: the seed itself, 32 little-endian bytes (so seeded
  keys keep the coordinates that ``SeedSequence([seed, version])`` gave in earlier releases)."""
  seed = _check_int("seed", seed, 0)
  if seed >= 2 ** (8 * MATERIAL_BYTES):
    raise ValueError(f"seed must be < 2**{8 * MATERIAL_BYTES}, got {seed}")
  return seed.to_bytes(MATERIAL_BYTES, "little")


@dataclasses.dataclass(frozen=True, eq=False)
class SecretKey:
  """A secret key: its ``material`` (32 secret bytes), ``mode``, ``version`` and its coordinates
  (float32 ``[M, 2]``, read-only). ``seeded``: the material is an integer seed (``generate_key(seed=...)``
  or a format-1 key file), reproducible but insecure.

  ``repr`` hides the material and the coordinates, so a key can be logged without leaking it;
  ``fingerprint`` names the key in records without revealing anything that rebuilds it.
  """

  material: bytes
  mode: str
  version: int
  coords: np.ndarray
  seeded: bool = False

  def __post_init__(self):
    object.__setattr__(self, "material", _check_material(self.material))
    object.__setattr__(self, "mode", _check_mode(self.mode))
    object.__setattr__(self, "version", _check_int("version", self.version, 0))
    object.__setattr__(self, "coords", _check_coords(self.coords))
    object.__setattr__(self, "seeded", bool(self.seeded))

  @property
  def n_points(self) -> int:
    return int(self.coords.shape[0])

  @property
  def dim(self) -> int:
    return int(self.coords.shape[1])

  @property
  def seed(self) -> int | None:
    """The seed of a seeded key, None for a key from the OS's random source."""
    return int.from_bytes(self.material, "little") if self.seeded else None

  @property
  def source(self) -> str:
    return SOURCE_SEED if self.seeded else SOURCE_RANDOM

  @property
  def fingerprint(self) -> str:
    """16 hex digits of SHA-256 over a domain tag, the material, mode, version and coordinates: equal for
    equal keys, and a one-way function of 256 secret bits (for a seeded key it confirms a guessed seed,
    one more reason such keys are insecure)."""
    header = json.dumps([self.mode, self.version, list(self.coords.shape)]).encode()
    digest = hashlib.sha256(_FINGERPRINT_TAG + self.material + header + _coords_bytes(self.coords))
    return digest.hexdigest()[:16]

  def public_record(self) -> dict[str, Any]:
    """What a run may record about its key (summary.json): nothing that rebuilds it."""
    return {"fingerprint": self.fingerprint, "source": self.source, "mode": self.mode, "version": self.version,
            "n_points": self.n_points}

  def __eq__(self, other):
    if not isinstance(other, SecretKey):
      return NotImplemented
    same = (self.material, self.mode, self.version) == (other.material, other.mode, other.version)
    return same and np.array_equal(self.coords, other.coords)

  def __hash__(self):
    return hash((self.material, self.mode, self.version, self.coords.tobytes()))

  def __repr__(self):
    return (
        f"SecretKey(mode={self.mode!r}, version={self.version}, n_points={self.n_points}, "
        f"source={self.source!r}, fingerprint={self.fingerprint!r}, material=<hidden>, coords=<hidden>)"
    )


def _coords_bytes(coords: np.ndarray) -> bytes:
  return np.ascontiguousarray(coords, dtype="<f4").tobytes()


def _uniform01(material: bytes, version: int, size: int) -> np.ndarray:
  """``size`` floats in [0, 1) from the top 53 bits of PCG64's raw output (version-stable)."""
  entropy = int.from_bytes(material, "little")  # a seeded key's material is its seed: the old stream
  bit_generator = np.random.PCG64(np.random.SeedSequence([entropy, version]))
  raw = bit_generator.random_raw(size)
  return (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53


def generate_key(seed: int | None = None, mode: str = "uniform", version: int = 1, n_points: int = N_POINTS,
                 dim: int = DIM) -> SecretKey:
  """A new key. Without ``seed`` (the default, and the only secure choice) its material is 32 bytes from
  the OS's CSPRNG; with ``seed``, the seed is the material: reproducible but INSECURE, for tests and
  experiments only (anyone who knows the seed rebuilds the key). See ``key_from_material`` for the modes.
  """
  if seed is None:
    material, seeded = secrets.token_bytes(MATERIAL_BYTES), False
  else:
    material, seeded = seed_material(seed), True
  return key_from_material(material, mode, version, n_points, dim, seeded=seeded)


def key_from_material(material: bytes, mode: str = "uniform", version: int = 1, n_points: int = N_POINTS,
                      dim: int = DIM, *, seeded: bool = False) -> SecretKey:
  """The key of ``material`` (32 bytes), ``mode`` and ``version``: deterministic, the same on every machine.

  Modes: ``uniform`` U[-1, 1]^d (the reference default); ``normal`` N(0, 1) (Box-Muller);
  ``ones`` / ``zeros`` (all points 1 / 0: the material plays no part in the coordinates, useful as
  wrong keys in evaluations); ``constant`` (every coordinate the same value from U[-1, 1]).
  """
  material = _check_material(material)
  version = _check_int("version", version, 0)
  n_points = _check_int("n_points", n_points, 1)
  dim = _check_int("dim", dim, 1)
  if dim != DIM:
    raise ValueError(f"keyed models take {DIM}-d key points (coords [M, {DIM}]), got dim={dim}")
  shape = (n_points, dim)
  mode = _check_mode(mode)
  if mode == "uniform":
    coords = 2.0 * _uniform01(material, version, n_points * dim) - 1.0
  elif mode == "normal":
    u1, u2 = np.split(_uniform01(material, version, 2 * n_points * dim), 2)
    coords = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)
  elif mode == "ones":
    coords = np.ones(shape)
  elif mode == "zeros":
    coords = np.zeros(shape)
  else:  # constant
    coords = np.full(shape, 2.0 * _uniform01(material, version, 1)[0] - 1.0)
  return SecretKey(material, mode, version, np.reshape(coords, shape).astype(np.float32), seeded)


def _guess(key: SecretKey, seed: int | None, mode: str, what: str) -> SecretKey:
  """An attacker's guess of mode ``mode``: a seeded key whose seed hashes the run's ``seed`` (else the
  key's public fingerprint) with ``what``; never derived from the key's material."""
  basis = f"{what}:{mode}:" + (f"seed {int(seed)}" if seed is not None else key.fingerprint)
  guess_seed = int.from_bytes(hashlib.sha256(_GUESS_TAG + basis.encode()).digest(), "little")
  return generate_key(guess_seed, mode, key.version, key.n_points, key.dim)


def wrong_key_like(key: SecretKey, seed: int | None = None) -> SecretKey:
  """An attacker's guess of the same mode and version: another key, made from ``seed`` (the run's
  ``--seed``, so the key study is reproducible) or, without it, from the key's public fingerprint."""
  if key.mode in ("ones", "zeros"):
    raise ValueError(
        f"a {key.mode!r} key does not depend on its material, so no other key of that mode exists; "
        "use other_mode_key(key) instead"
    )
  wrong = _guess(key, seed, key.mode, "same-mode")
  if np.array_equal(wrong.coords, key.coords):  # only if the key itself was made as this guess
    raise ValueError("the guessed key is the key itself; pass another seed")
  return wrong


def other_mode_key(key: SecretKey, mode: str | None = None, seed: int | None = None) -> SecretKey:
  """An attacker's guess of another mode (default: ``normal``, or ``uniform`` when the key already is
  normal) and the key's version, made like ``wrong_key_like``'s from ``seed`` or the fingerprint."""
  mode = mode or ("uniform" if key.mode == "normal" else "normal")
  if _check_mode(mode) == key.mode:
    raise ValueError(f"other_mode_key(): the key already has mode {mode!r}; pick another mode")
  return _guess(key, seed, mode, "other-mode")


# --------------------------------------------------------------------------------------------
# Key files (docs/design.md, "Keys"): format 2 is JSON holding the material, source, mode, version,
# n_points, dim, fingerprint and a SHA-256 checksum over the rest; format 1 (a seed and the coordinates,
# with their checksum) is still read.


def _checksum(record: dict) -> str:
  body = {k: v for k, v in record.items() if k != "checksum"}
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _key_record(key: SecretKey) -> dict[str, Any]:
  record = {"format": FILE_FORMAT, "format_version": FILE_FORMAT_VERSION, "material": key.material.hex(),
            "source": key.source, "mode": key.mode, "version": key.version, "n_points": key.n_points,
            "dim": key.dim, "fingerprint": key.fingerprint}
  record["checksum"] = _checksum(record)
  return record


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
    raise KeyFileError(f"{path} already exists; refusing to overwrite a secret key. Choose another path, or "
                       "pass overwrite=True if you really mean to replace it.")
  record = _key_record(key)
  try:  # mkstemp creates the file 0o600 from the start, so the key is never readable by others
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  except OSError as error:  # named after the key file, not the temporary file beside it (the cause says why)
    raise KeyFileError(f"cannot write the key file {path}: {error.strerror}; save it in a writable folder") from error
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


def _read_v2(path: pathlib.Path, record: dict, corrupted: str) -> SecretKey:
  missing = [f for f in ("material", "source", "mode", "version", "n_points", "dim", "fingerprint", "checksum")
             if f not in record]
  if missing:
    raise KeyFileError(f"{corrupted}: missing field(s) {missing}")
  if record["checksum"] != _checksum(record):
    raise KeyFileError(f"key file {path} is corrupted: checksum mismatch; restore it from your backup")
  if record["source"] not in (SOURCE_RANDOM, SOURCE_SEED):
    raise KeyFileError(f"{corrupted}: unknown source {record['source']!r}")
  try:
    key = key_from_material(bytes.fromhex(record["material"]), record["mode"], record["version"],
                            record["n_points"], record["dim"], seeded=record["source"] == SOURCE_SEED)
  except (TypeError, ValueError) as error:
    raise KeyFileError(f"{corrupted}: {error}") from None
  if key.fingerprint != record["fingerprint"]:
    raise KeyFileError(f"key file {path} is corrupted: fingerprint mismatch; restore it from your backup")
  return key


def _read_v1(path: pathlib.Path, record: dict, corrupted: str) -> SecretKey:
  """A format-1 file: a seed-derived key, with its coordinates and their checksum."""
  missing = [f for f in ("seed", "mode", "version", "coords", "coords_sha256") if f not in record]
  if missing:
    raise KeyFileError(f"{corrupted}: missing field(s) {missing}")
  try:
    coords = np.asarray(record["coords"], dtype=np.float64)
  except (TypeError, ValueError) as error:
    raise KeyFileError(f"{corrupted}: coords is not a numeric [M, {DIM}] array ({error})") from None
  if coords.ndim != 2 or coords.shape[1] != DIM or coords.shape[0] < 1:
    raise KeyFileError(f"key file {path} holds coordinates of shape {coords.shape}; a key has shape [M, {DIM}] "
                       f"(M={N_POINTS} by default). Regenerate it with generate_key + save_key.")
  if "n_points" in record and record["n_points"] != coords.shape[0]:
    raise KeyFileError(f"{corrupted}: header says n_points={record['n_points']} but it holds {coords.shape[0]}")
  coords = coords.astype(np.float32)
  if hashlib.sha256(_coords_bytes(coords)).hexdigest() != record["coords_sha256"]:
    raise KeyFileError(f"key file {path} is corrupted: checksum mismatch; restore it from your backup")
  try:
    return SecretKey(seed_material(record["seed"]), record["mode"], record["version"], coords, seeded=True)
  except ValueError as error:
    raise KeyFileError(f"{corrupted}: {error}") from None


def load_key(path, allow_shared: bool = False) -> SecretKey:
  """Reads a key file written by ``save_key`` (format 2, or format 1) and validates it.

  Raises ``KeyFileError`` naming the problem and the fix for a missing, corrupted or malformed file
  (checksum or fingerprint mismatch, wrong shape, unknown mode, ...), and for a file that group or
  others may access unless ``allow_shared``. A seed-derived key loads with an ``InsecureKeyWarning``.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise KeyFileError(f"no key file at {path}; create one with infl_jax.keys.save_key")
  permissions = stat.S_IMODE(path.stat().st_mode)
  if permissions & 0o077 and not allow_shared:
    raise KeyFileError(f"key file {path} is accessible by group or others (mode {oct(permissions)}); run: "
                       f"chmod 600 {path} (or pass --allow-shared-key-file if it is shared on purpose)")
  corrupted = f"key file {path} is corrupted or not an INFL key file"
  try:
    record = json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise KeyFileError(f"{corrupted}: {error}") from None
  if not isinstance(record, dict) or record.get("format") != FILE_FORMAT:
    raise KeyFileError(f"{corrupted}: missing \"format\": \"{FILE_FORMAT}\"")
  reader = {1: _read_v1, 2: _read_v2}.get(record.get("format_version"))
  if reader is None:
    raise KeyFileError(f"key file {path} has format_version {record.get('format_version')!r}; this version of "
                       f"infl_jax reads format_version 1 and {FILE_FORMAT_VERSION}")
  key = reader(path, record, corrupted)
  if key.seeded:
    old = " (format 1)" if record["format_version"] == 1 else ""
    warnings.warn(f"key file {path}{old} holds a seed-derived key: reproducible but insecure, anyone who knows "
                  "the seed rebuilds it; make a new key (without --key-seed) for new runs", InsecureKeyWarning,
                  stacklevel=2)
  return key
