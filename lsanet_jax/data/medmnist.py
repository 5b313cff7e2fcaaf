"""MedMNIST 2D npz files: table of the 12 datasets, loading, validation, label-fraction subsets.

File format (MedMNIST v2/v3, CC BY 4.0; DermaMNIST CC BY-NC 4.0): `{flag}.npz` (28 px) or
`{flag}_{size}.npz` (64/128/224 px) with keys train_images, train_labels, val_images, val_labels,
test_images, test_labels; images uint8 (N, S, S) or (N, S, S, 3); labels integer (N, 1), or (N, 14)
0/1 for ChestMNIST.

`digits` is NOT MedMNIST: scikit-learn's real 8x8 handwritten digits (1,797 images) resized to the
28 px MedMNIST format in memory (or read from `digits.npz` in the root folder when present), so the
pipeline can be exercised on any machine.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from runkit.errors import UserInputError
from runkit.metrics_log import atomic_write

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
DEFAULT_ROOT = "~/.medmnist"
MULTI_LABEL = "multi-label, binary-class"


def _entry(task, n_channels, n_classes, n_samples, md5, license="CC BY 4.0"):
  return dict(task=task, n_channels=n_channels, n_classes=n_classes,
              n_samples=dict(zip(SPLITS, n_samples)), md5=dict(zip(SIZES, md5)), license=license)


# Tasks, channels, classes, split sizes and MD5 sums of the MedMNIST v3 files (Zenodo record
# 10519652), as listed in the official medmnist package (medmnist/info.py, version 3.0.2).
INFO = {
    "pathmnist": _entry("multi-class", 3, 9, (89996, 10004, 7180), (
        "a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
        "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec")),
    "chestmnist": _entry(MULTI_LABEL, 1, 14, (78468, 11219, 22433), (
        "02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
        "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa")),
    "dermamnist": _entry("multi-class", 3, 7, (7007, 1003, 2005), (
        "0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
        "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"), "CC BY-NC 4.0"),
    "octmnist": _entry("multi-class", 1, 4, (97477, 10832, 1000), (
        "c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
        "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3")),
    "pneumoniamnist": _entry("binary-class", 1, 2, (4708, 524, 624), (
        "28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
        "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1")),
    "retinamnist": _entry("ordinal-regression", 3, 5, (1080, 120, 400), (
        "bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
        "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348")),
    "breastmnist": _entry("binary-class", 1, 2, (546, 78, 156), (
        "750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
        "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b")),
    "bloodmnist": _entry("multi-class", 3, 8, (11959, 1712, 3421), (
        "7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
        "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601")),
    "tissuemnist": _entry("multi-class", 1, 8, (165466, 23640, 47280), (
        "ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
        "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c")),
    "organamnist": _entry("multi-class", 1, 11, (34561, 6491, 17778), (
        "68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
        "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170")),
    "organcmnist": _entry("multi-class", 1, 11, (12975, 2392, 8216), (
        "b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
        "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1")),
    "organsmnist": _entry("multi-class", 1, 11, (13932, 2452, 8827), (
        "9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
        "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1")),
    # Not MedMNIST: scikit-learn's digits in MedMNIST's 28 px format (see digits_as_medmnist).
    "digits": dict(task="multi-class", n_channels=1, n_classes=10, n_samples=None, md5={},
                   license="BSD-3-Clause (scikit-learn)", builtin=True),
}
MEDMNIST_FLAGS = tuple(f for f in INFO if not INFO[f].get("builtin"))


class MedMNISTError(UserInputError):
  """A MedMNIST file is missing or does not match the dataset's format."""


@dataclasses.dataclass
class MedMNISTData:
  """Images uint8 (N, S, S, C); labels int32 (N, 1), or (N, K) 0/1 for multi-label tasks (ChestMNIST: 14).

  source: the file or folder read; source_kind: how ("medmnist-npz", "builtin", "tfds", "npz",
  "image-folder"); details: what summary.json reports about the source beyond that (classes, drawn
  splits, conversions)."""
  flag: str
  task: str
  n_classes: int
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  source: str = ""
  source_kind: str = "medmnist-npz"
  details: dict = dataclasses.field(default_factory=dict)
  # The site (hospital, scanner) each training image came from, where the data say so (an npz's
  # train_sites); None otherwise. Federated runs can split the images by it.
  train_sites: np.ndarray | None = None

  def split(self, name):
    return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")

  @property
  def n_channels(self) -> int:
    return self.train_images.shape[-1]

  @property
  def image_size(self) -> int:
    return self.train_images.shape[1]


def check_flag(flag: str) -> dict:
  if flag not in INFO:
    raise MedMNISTError(f"unknown dataset flag {flag!r}; choose one of {', '.join(INFO)} "
                        "(the 12 MedMNIST 2D datasets, or 'digits' for the built-in stand-in)")
  return INFO[flag]


def check_size(size: int) -> int:
  if size not in SIZES:
    raise MedMNISTError(f"unknown image size {size}; MedMNIST ships {', '.join(map(str, SIZES))}")
  return size


def npz_filename(flag: str, size: int = 28) -> str:
  check_flag(flag)
  check_size(size)
  return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def validate_arrays(flag: str, size: int, arrays, source: str = "") -> None:
  """Raises MedMNISTError naming the first problem with the arrays of one npz file."""
  info = check_flag(flag)
  where = f" in {source}" if source else ""
  fix = ("re-download the file (lsanet-train --download, or medmnist's own downloader) "
         "or rewrite it with lsanet_jax.data.write_medmnist_npz")
  keys = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
  missing = [k for k in keys if k not in arrays]
  if missing:
    raise MedMNISTError(f"{flag}: missing key(s) {missing}{where}; a MedMNIST npz has keys "
                        f"{keys}; {fix}")
  for split in SPLITS:
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.dtype != np.uint8:
      raise MedMNISTError(f"{flag}: {split}_images has dtype {images.dtype}{where}, expected uint8; {fix}")
    want = f"(N, {size}, {size}) or (N, {size}, {size}, 3)"
    grey_ok = images.ndim == 3 and images.shape[1:] == (size, size)
    rgb_ok = images.ndim == 4 and images.shape[1:] == (size, size, 3)
    if not (grey_ok or rgb_ok):
      raise MedMNISTError(f"{flag}: {split}_images has shape {images.shape}{where}, expected {want} "
                          f"for size {size}; pass the matching --size or {fix}")
    if (images.ndim == 4) != (info["n_channels"] == 3):
      raise MedMNISTError(f"{flag}: {split}_images has {1 if images.ndim == 3 else 3} channel(s)"
                          f"{where} but {flag} has {info['n_channels']}; {fix}")
    if not np.issubdtype(labels.dtype, np.integer):
      raise MedMNISTError(f"{flag}: {split}_labels has dtype {labels.dtype}{where}, expected integers; {fix}")
    width = info["n_classes"] if info["task"] == MULTI_LABEL else 1
    if labels.ndim != 2 or labels.shape != (images.shape[0], width):
      raise MedMNISTError(f"{flag}: {split}_labels has shape {labels.shape}{where}, expected "
                          f"({images.shape[0]}, {width}) to match {split}_images; {fix}")
    high = 1 if info["task"] == MULTI_LABEL else info["n_classes"] - 1
    if labels.size and (labels.min() < 0 or labels.max() > high):
      raise MedMNISTError(f"{flag}: {split}_labels range from {labels.min()} to {labels.max()}{where}, "
                          f"but {flag} ({info['task']}) needs labels in [0, {high}]; {fix}")


def load_medmnist(flag: str, root=DEFAULT_ROOT, size: int = 28, *, as_rgb: bool = False,
                  seed: int = 0) -> MedMNISTData:
  """Loads `{flag}.npz`/`{flag}_{size}.npz` from root after validating it.

  Grey images get a channel axis (N, S, S, 1), or three identical channels with as_rgb=True.
  flag 'digits' without a digits.npz in root builds the stand-in in memory (seeded split)."""
  info = check_flag(flag)
  check_size(size)
  path = pathlib.Path(root).expanduser() / npz_filename(flag, size)
  if info.get("builtin") and not path.exists():
    if size != 28:
      raise MedMNISTError(f"the built-in {flag!r} data set exists at 28 px only; drop --size")
    arrays, source, kind = digits_as_medmnist(seed=seed), f"scikit-learn digits (seed {seed})", "builtin"
  else:
    if not path.exists():
      raise MedMNISTError(
          f"{path} not found. Put the MedMNIST file there (https://zenodo.org/records/10519652), "
          f"pass --download to fetch and checksum-verify it, or point --root at the folder "
          f"holding {path.name}")
    try:
      with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile/pickle/IO errors all mean the file is unusable
      raise MedMNISTError(f"{path} is not a readable npz file ({type(e).__name__}: {e}); "
                          "delete it and download it again") from e
    source, kind = str(path), "medmnist-npz"
  validate_arrays(flag, size, arrays, source)
  return MedMNISTData(flag=flag, task=info["task"], n_classes=info["n_classes"], source=source,
                      source_kind=kind, **channels_last(arrays, as_rgb))


def channels_last(arrays: dict, as_rgb: bool = False) -> dict:
  """Validated MedMNIST arrays as MedMNISTData fields: grey images get a channel axis (N, S, S, 1), or
  three identical channels with as_rgb; labels int32."""
  out = {}
  for split in SPLITS:
    images = arrays[f"{split}_images"]
    if images.ndim == 3:
      images = images[..., None]
      if as_rgb:
        images = np.repeat(images, 3, axis=-1)
    out[f"{split}_images"] = np.ascontiguousarray(images)
    out[f"{split}_labels"] = arrays[f"{split}_labels"].astype(np.int32)
  return out


def label_fraction_subset(labels: np.ndarray, fraction: float, seed: int, task: str) -> np.ndarray:
  """Sorted indices of a stratified, seeded `fraction` of the rows (at least one per class).

  Multi-class/binary/ordinal stratify on the class; multi-label on 'any positive label'."""
  if not 0 < fraction <= 1:
    raise MedMNISTError(f"label fraction must be in (0, 1], got {fraction}; e.g. 0.01, 0.1, 1.0")
  n = labels.shape[0]
  if fraction == 1:
    return np.arange(n)
  strata = (labels.max(axis=1) if task == MULTI_LABEL else labels.reshape(n))
  rng = np.random.default_rng(seed)
  chosen = []
  for value in np.unique(strata):
    members = np.flatnonzero(strata == value)
    take = max(1, int(round(fraction * len(members))))
    chosen.append(rng.choice(members, size=take, replace=False))
  return np.sort(np.concatenate(chosen))


def digits_as_medmnist(seed: int = 0, size: int = 28) -> dict:
  """scikit-learn's 8x8 digits as MedMNIST-format arrays: uint8 (N, 28, 28), labels (N, 1),
  stratified seeded 70/10/20 train/val/test split."""
  import jax
  import jax.numpy as jnp
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  small = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
  big = jax.image.resize(jnp.asarray(small), (small.shape[0], size, size), method="linear")
  images = np.clip(np.round(np.asarray(big) * 255.0), 0, 255).astype(np.uint8)
  labels = digits.target.astype(np.int64)[:, None]
  idx = np.arange(len(labels))
  train, rest = train_test_split(idx, test_size=0.3, stratify=labels[:, 0], random_state=seed)
  val, test = train_test_split(rest, test_size=2 / 3, stratify=labels[rest, 0], random_state=seed)
  out = {}
  for name, part in (("train", train), ("val", val), ("test", test)):
    out[f"{name}_images"], out[f"{name}_labels"] = images[np.sort(part)], labels[np.sort(part)]
  return out


def write_medmnist_npz(path, arrays: dict) -> pathlib.Path:
  """Writes arrays in the MedMNIST npz layout, atomically, readable as the umask allows (a data set
  is meant to be shared)."""
  path = pathlib.Path(path).expanduser()
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic_write(path, "wb") as f:
    np.savez_compressed(f, **arrays)
  return path
