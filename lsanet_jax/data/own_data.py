"""Your own images as MedMNIST-format arrays: an npz in MedMNIST's layout, or a folder of images in class
subfolders (`lsanet-train --data PATH`).

- **npz**: keys train_images, train_labels, val_images, val_labels, test_images, test_labels. Images
  (N, H, W) or (N, H, W, C) with C = 1, 3 or 4 (alpha dropped), uint8 (other integers within 0..255,
  booleans as 0/255), or floats in [0, 1] (scaled by 255); every split of the same H, W, C. Labels (N,)
  or (N, 1) class indices 0..C-1, or (N, K) 0/1 for K labels (multi-label); integers, or floats holding
  whole numbers.
- **folder**: `DIR/<class>/*.png|jpg|jpeg`, or `DIR/train/<class>/...` with optional `DIR/val/` and
  `DIR/test/` in the same form. Classes are the subfolder names of the training folder, sorted (numerically
  when every name is a number); label i is the i-th. A split without its folder is drawn from the training
  images, stratified by class and seeded: 10% of every class for validation, 20% for test (a class keeps at
  least one training image). Read with Pillow (EXIF orientation applied); greyscale when every image is
  greyscale (modes 1, L, LA, I;16, 16-bit scaled to 8), else RGB (alpha and palettes converted by Pillow).

Images of another size are resized to size x size with Pillow's bilinear filter (antialiased when shrinking;
the aspect ratio is not kept, nothing is cropped). Grey images get one channel, or three with as_rgb.
Task: multi-label for (N, K > 1) labels, else binary-class for 2 classes, else multi-class; the class count
is 1 + the largest label. `task` / `num_classes` override the inference and are checked against the labels.

Every problem raises OwnDataError naming `--data`, the file and the fix.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np

from runkit.errors import UserInputError

from lsanet_jax.data.medmnist import MULTI_LABEL, SPLITS, MedMNISTData

# The --task choices; "multi-label" stands for MedMNIST's "multi-label, binary-class".
TASKS = {"multi-class": "multi-class", "binary-class": "binary-class", "multi-label": MULTI_LABEL,
         "ordinal-regression": "ordinal-regression"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DRAWN_FRACTIONS = {"val": 0.1, "test": 0.2}  # of every class, for a split without its own folder
_GREY_MODES = ("1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N")


class OwnDataError(UserInputError):
  """--data names a file or folder that cannot be read as a labelled image data set."""


def load_own_data(path, size: int = 28, *, as_rgb: bool = False, task: str = "", num_classes: int = 0,
                  seed: int = 0) -> MedMNISTData:
  """Reads path (an npz or an image folder, see the module doc) as MedMNISTData of size x size images.

  task: one of TASKS ('' infers it); num_classes: 0 infers it; seed: the draw of missing splits."""
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise OwnDataError(f"--data {path}: no such file or folder")
  if task and task not in TASKS:
    raise OwnDataError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
  if path.is_dir():
    if task == "multi-label":
      raise OwnDataError(f"--data {path}: a folder of class subfolders gives one class per image; "
                         "--task multi-label needs an npz with (N, K) 0/1 labels")
    arrays, details = read_image_folder(path, size, seed)
    kind = "image-folder"
  else:
    arrays = read_npz(path)
    kind = "npz"
    details = {"original_image_shape": list(np.shape(arrays["train_images"])[1:])}
  where = f"--data {path}"
  images = check_images(arrays, where)
  labels = {s: check_labels(arrays[f"{s}_labels"], f"{s}_labels", images[s].shape[0], where) for s in SPLITS}
  resolved_task, n_classes = infer_task(labels, task, num_classes, where, details.get("classes"))
  check_classes(labels, resolved_task, n_classes, where, details.get("classes"))
  out = {}
  for split in SPLITS:
    x = resize_images(images[split], size) if images[split].shape[1] != size or images[split].shape[2] != size \
        else images[split]
    if x.shape[-1] == 1 and as_rgb:
      x = np.repeat(x, 3, axis=-1)
    out[f"{split}_images"], out[f"{split}_labels"] = np.ascontiguousarray(x), labels[split]
  details = {"kind": kind, "path": str(path.absolute()), **details}
  sites = check_sites(arrays.get("train_sites"), images["train"].shape[0], where) if kind == "npz" else None
  return MedMNISTData(flag=path.stem if kind == "npz" else path.name, task=resolved_task, n_classes=n_classes,
                      source=str(path.absolute()), source_kind=kind, details=details, train_sites=sites, **out)


def check_sites(sites, n_images: int, where: str) -> np.ndarray | None:
  """An npz's optional train_sites: one site name or number per training image (lsanet-federated's
  --partition sites)."""
  if sites is None:
    return None
  sites = np.asarray(sites)
  if sites.shape not in ((n_images,), (n_images, 1)) or sites.dtype.kind not in "iuUS":
    raise OwnDataError(f"{where}: train_sites has shape {sites.shape} and dtype {sites.dtype}; give one site name "
                       f"or integer per training image, shape ({n_images},)")
  return sites.reshape(n_images).astype(str)


# ----------------------------------------------------------------------------------------- npz files
def read_npz(path: pathlib.Path) -> dict:
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # zipfile/pickle/IO errors all mean the file is unusable
    raise OwnDataError(f"--data {path} is neither a folder nor a readable npz file ({type(e).__name__}: {e}); "
                       "give an npz with train_/val_/test_images and _labels, or a folder of class subfolders") \
        from None
  keys = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
  missing = [k for k in keys if k not in arrays]
  if missing:
    raise OwnDataError(f"--data {path}: missing key(s) {', '.join(missing)}; an npz in MedMNIST's layout has "
                       f"{', '.join(keys)}")
  return arrays


def check_images(arrays: dict, where: str) -> dict:
  """{split: uint8 (N, H, W, C)} with C 1 or 3, every split of the same shape."""
  out = {}
  for split in SPLITS:
    name, x = f"{split}_images", np.asarray(arrays[f"{split}_images"])
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
      raise OwnDataError(f"{where}: {name} has shape {x.shape}; expected (N, H, W) or (N, H, W, C) with "
                         "C = 1, 3 or 4 channels")
    if x.shape[0] == 0:
      raise OwnDataError(f"{where}: {name} holds no image; every split needs at least one")
    out[split] = _to_uint8(x[..., :3], name, where)
  shapes = {s: out[s].shape[1:] for s in SPLITS}
  if len(set(shapes.values())) > 1:
    listed = ", ".join(f"{s} {h}x{w}x{c}" for s, (h, w, c) in shapes.items())
    raise OwnDataError(f"{where}: the splits' images differ in shape ({listed}); give every split the same "
                       "height, width and channels")
  return out


def _to_uint8(x: np.ndarray, name: str, where: str) -> np.ndarray:
  if x.dtype == np.uint8:
    return x
  if x.dtype == bool:  # masks: white on black
    return x.astype(np.uint8) * 255
  if np.issubdtype(x.dtype, np.integer):
    if x.min() < 0 or x.max() > 255:
      raise OwnDataError(f"{where}: {name} ({x.dtype}) ranges from {x.min()} to {x.max()}; give uint8 0..255")
    return x.astype(np.uint8)
  if np.issubdtype(x.dtype, np.floating):
    if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
      raise OwnDataError(f"{where}: {name} ({x.dtype}) holds values outside [0, 1]; give floats in [0, 1] "
                         "or uint8 0..255")
    return np.round(x * 255).astype(np.uint8)
  raise OwnDataError(f"{where}: {name} has dtype {x.dtype}; give uint8 0..255 or floats in [0, 1]")


def check_labels(y, name: str, n_images: int, where: str) -> np.ndarray:
  """int32 (N, 1) class indices or (N, K) 0/1; refuses non-integers, negatives and a count mismatch."""
  y = np.asarray(y)
  if y.ndim == 1:
    y = y[:, None]
  if y.ndim != 2 or y.shape[0] != n_images or y.shape[1] == 0:
    raise OwnDataError(f"{where}: {name} has shape {y.shape}, expected ({n_images},) or ({n_images}, 1) class "
                       f"indices, or ({n_images}, K) 0/1 labels, one row per image")
  if y.dtype == bool:
    y = y.astype(np.int32)
  elif np.issubdtype(y.dtype, np.floating):
    if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
      bad = y[~np.isfinite(y) | (y != np.round(y))].flat[0]
      raise OwnDataError(f"{where}: {name} holds the non-integer label {bad}; labels are class indices 0..C-1")
  elif not np.issubdtype(y.dtype, np.integer):
    raise OwnDataError(f"{where}: {name} has dtype {y.dtype}; labels are integer class indices 0..C-1")
  if y.min() < 0:
    raise OwnDataError(f"{where}: {name} holds the negative label {y.min()}; labels are class indices 0..C-1")
  if y.max() > np.iinfo(np.int32).max:
    raise OwnDataError(f"{where}: {name} holds the label {y.max()}; labels are class indices 0..C-1")
  return y.astype(np.int32)


def infer_task(labels: dict, task: str, num_classes: int, where: str, classes=None) -> tuple[str, int]:
  """(MedMNIST task name, class count) from the labels, or checked against --task / --num-classes."""
  width = {labels[s].shape[1] for s in SPLITS}
  if len(width) > 1:
    raise OwnDataError(f"{where}: the splits' labels differ in width ({', '.join(map(str, sorted(width)))} "
                       "columns); give every split the same label layout")
  width = width.pop()
  high = max(int(labels[s].max()) for s in SPLITS)
  if width > 1:
    if task not in ("", "multi-label"):
      raise OwnDataError(f"{where}: labels with {width} columns are multi-label; drop --task {task} or give "
                         "(N, 1) class indices")
    if high > 1:
      raise OwnDataError(f"{where}: multi-label labels ({width} columns) must be 0 or 1, found {high}")
    if num_classes and num_classes != width:
      raise OwnDataError(f"{where}: --num-classes {num_classes} but the multi-label labels have {width} columns")
    return MULTI_LABEL, width
  if task == "multi-label":
    raise OwnDataError(f"{where}: --task multi-label needs (N, K) 0/1 labels with K > 1 columns; the labels "
                       "are one class index per image")
  if classes and num_classes and num_classes != len(classes):
    raise OwnDataError(f"{where}: --num-classes {num_classes} but the folder has {len(classes)} class "
                       "subfolders; drop --num-classes")
  n_classes = num_classes or (len(classes) if classes else high + 1)
  if high >= n_classes:
    raise OwnDataError(f"{where}: a label is {high}, out of range for --num-classes {n_classes} (labels "
                       f"0..{n_classes - 1}); raise --num-classes or fix the labels")
  if n_classes < 2:
    raise OwnDataError(f"{where}: every label is 0, a single class; a classifier needs at least two")
  if task == "binary-class" and n_classes != 2:
    raise OwnDataError(f"{where}: --task binary-class needs 2 classes, the labels have {n_classes}")
  return TASKS[task] if task else ("binary-class" if n_classes == 2 else "multi-class"), n_classes


def check_classes(labels: dict, task: str, n_classes: int, where: str, classes=None) -> None:
  """Every class needs a training image: a class never trained on has an output no loss reaches."""
  if task == MULTI_LABEL:
    return
  counts = np.bincount(labels["train"][:, 0], minlength=n_classes)
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    named = ", ".join(repr(classes[i]) if classes else str(i) for i in empty[:10])
    raise OwnDataError(f"{where}: class(es) {named} of {n_classes} have no training image; give each class "
                       "training images, or relabel so that the classes are 0..C-1 without gaps")


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 (N, H, W, C) -> (N, size, size, C), Pillow's bilinear filter (antialiased when shrinking)."""
  image_module = _pillow()
  out = np.empty((images.shape[0], size, size, images.shape[-1]), np.uint8)
  for i, x in enumerate(images):
    for c in range(x.shape[-1]):  # channel by channel: Pillow has no mode for every channel count
      resized = image_module.fromarray(x[..., c]).resize((size, size), image_module.BILINEAR)
      out[i, ..., c] = np.asarray(resized)
  return out


def _pillow():
  try:
    from PIL import Image
  except ImportError as e:  # Pillow comes with matplotlib, a dependency; a stripped environment may lack it
    raise OwnDataError("reading or resizing images needs Pillow: pip install pillow") from e
  return Image


# ------------------------------------------------------------------------------------- image folders
def _natural_key(name: str):
  return (0, int(name), name) if re.fullmatch(r"\d+", name) else (1, 0, name)


def _subfolders(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: _natural_key(p.name))


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def list_image_folder(root: pathlib.Path) -> tuple[list[str], dict]:
  """(class names, {split: [(file, label)]}) of a folder; splits without a folder are absent."""
  where = f"--data {root}"
  split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
  if split_dirs and "train" not in split_dirs:
    raise OwnDataError(f"{where}: has {'/ and '.join(split_dirs)}/ but no train/ folder; add train/<class>/ "
                       "folders, or put the class folders directly in the data folder")
  train_root = split_dirs.get("train", root)
  classes = [p.name for p in _subfolders(train_root)]
  if len(classes) < 2:
    raise OwnDataError(f"{where}: {train_root} holds {len(classes)} class subfolder(s); give one subfolder of "
                       "images per class (at least two), e.g. DIR/cat/*.png and DIR/dog/*.png")
  files = {}
  for split, folder in {"train": train_root, **split_dirs}.items():
    present = [p.name for p in _subfolders(folder)]
    unknown = sorted(set(present) - set(classes))
    if unknown:
      raise OwnDataError(f"{where}: {folder} has class folder(s) {', '.join(unknown)} that {train_root} "
                         f"lacks; the training folder names every class")
    files[split] = []
    for label, name in enumerate(classes):
      found = _image_files(folder / name) if (folder / name).is_dir() else []
      if split == "train" and not found:
        raise OwnDataError(f"{where}: class folder {folder / name} holds no image "
                           f"({'/'.join(IMAGE_SUFFIXES)}); every class needs training images")
      files[split] += [(f, label) for f in found]
  return classes, files


def draw_missing_splits(files: dict, seed: int) -> tuple[dict, list[str]]:
  """Moves DRAWN_FRACTIONS of every class of the training files into the splits that have no folder;
  stratified, seeded, every class keeping at least one training image."""
  missing = [s for s in ("val", "test") if s not in files]
  if not missing:
    return files, []
  rng = np.random.default_rng(seed)
  train = files["train"]
  labels = np.array([label for _, label in train])
  chosen = {s: [] for s in ("train", *missing)}
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    start = 0
    for split in missing:
      take = min(int(round(DRAWN_FRACTIONS[split] * len(members))), len(members) - start - 1)
      chosen[split] += list(members[start:start + take])
      start += take
    chosen["train"] += list(members[start:])
  out = dict(files)
  for split, rows in chosen.items():
    out[split] = [train[i] for i in sorted(rows)]
  return out, missing


def read_images(paths: list[pathlib.Path], size: int, rgb: bool, where: str) -> np.ndarray:
  """uint8 (N, size, size, 1 or 3) of the image files, converted and resized by Pillow."""
  image_module = _pillow()
  from PIL import ImageOps as ops_module
  out = np.empty((len(paths), size, size, 3 if rgb else 1), np.uint8)
  for i, path in enumerate(paths):
    try:
      with image_module.open(path) as img:
        img.load()
        img = ops_module.exif_transpose(img)  # photos stored sideways with an orientation tag stand upright
        if img.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert would clip, so scale to 8 bits
          img = image_module.fromarray(np.round(np.asarray(img, np.float64) / 257).astype(np.uint8))
        img = img.convert("RGB" if rgb else "L")
        if img.size != (size, size):
          img = img.resize((size, size), image_module.BILINEAR)
        pixels = np.asarray(img)
    except (OSError, ValueError, SyntaxError, image_module.DecompressionBombError) as e:  # Pillow's read errors
      raise OwnDataError(f"{where}: cannot read the image {path} ({type(e).__name__}: {e}); replace or "
                         "remove it") from None
    out[i] = pixels.reshape(size, size, -1)
  return out


def _image_headers(paths: list[pathlib.Path], where: str) -> tuple[set[str], set[tuple[int, int]]]:
  """(modes, (width, height) sizes) of the image files, from their headers."""
  image_module = _pillow()
  modes, sizes = set(), set()
  for path in paths:
    try:
      with image_module.open(path) as img:  # reads the header only
        modes.add(img.mode)
        sizes.add(img.size)
    except (OSError, ValueError, SyntaxError, image_module.DecompressionBombError) as e:
      raise OwnDataError(f"{where}: cannot read the image {path} ({type(e).__name__}: {e}); replace or "
                         "remove it") from None
  return modes, sizes


def read_image_folder(root: pathlib.Path, size: int, seed: int) -> tuple[dict, dict]:
  """MedMNIST-layout arrays of a folder of class subfolders (see the module doc) and what was done."""
  where = f"--data {root}"
  classes, files = list_image_folder(root)
  files, drawn = draw_missing_splits(files, seed)
  every_file = [f for split in SPLITS for f, _ in files[split]]
  modes, sizes = _image_headers(every_file, where)
  rgb = not modes <= set(_GREY_MODES)
  arrays = {}
  for split in SPLITS:
    paths = [f for f, _ in files[split]]
    if not paths:
      raise OwnDataError(f"{where}: the {split} split holds no image; add a {split}/ folder or more images "
                         f"per class (a drawn split takes {DRAWN_FRACTIONS.get(split, 0):.0%} of each class)")
    arrays[f"{split}_images"] = read_images(paths, size, rgb, where)
    arrays[f"{split}_labels"] = np.array([[label] for _, label in files[split]], np.int32)
  widths, heights = zip(*sizes)
  details = {"classes": classes, "drawn_splits": drawn, "image_modes": sorted(modes),
             "original_size": {"min": [min(heights), min(widths)], "max": [max(heights), max(widths)]},
             "converted_to": "RGB" if rgb else "L (grey)"}
  return arrays, details
