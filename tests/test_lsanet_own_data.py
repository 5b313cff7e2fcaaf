"""`lsanet-train --data`: your own npz or image folder, `--source tfds`, `--label-seed`, and the errors bad
data meet (one line, exit status 2, the workdir left as found).

Every training run is 1 epoch of the plain VGG-16-BN at width 1/16 on tiny data of one of two shapes
(3 or 11 grey classes, 30/6/9 or 33/11/11 images), so the runs of one shape share compiled programs
through a per-module compilation cache.
"""
import json
import os
import pathlib

import numpy as np
import pytest

from lsanet_jax.config import TrainConfig
from lsanet_jax.data import write_medmnist_npz
from lsanet_jax.data.own_data import OwnDataError, load_own_data
from lsanet_jax.main import main

REPO = pathlib.Path(__file__).resolve().parents[1]
# VGG-16-BN compiles fastest of the backbones on CPU (plain, width 1/16: about 2/3 of ResNet-18's time).
RUN = ["--variant", "plain", "--backbone", "vgg16_bn", "--width", "0.0625", "--epochs", "1", "--batch-size", "32"]
PER_CLASS = {"train": 10, "val": 2, "test": 3}  # 3 classes: 30/6/9; a flat folder of 15 per class draws the same


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  import jax
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  saved = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for k, v in saved.items():
    jax.config.update(k, v)


def class_images(label: int, n: int, size=(28, 28), seed=0) -> np.ndarray:
  """Grey uint8 images whose class shows as a bright row."""
  rng = np.random.default_rng(seed * 100 + label)
  images = rng.integers(0, 80, (n, size[1], size[0]), dtype=np.uint8)
  images[:, (3 * label) % size[1], :] = 250
  return images


def split_arrays(n_classes: int, per_class: dict, flat_labels: bool = False) -> dict:
  arrays = {}
  for i, (split, n) in enumerate(per_class.items()):
    labels = np.repeat(np.arange(n_classes), n)
    arrays[f"{split}_images"] = np.concatenate([class_images(c, n, seed=i) for c in range(n_classes)])
    arrays[f"{split}_labels"] = labels if flat_labels else labels[:, None]
  return arrays


def save_png(path: pathlib.Path, pixels: np.ndarray, fmt: str = "PNG") -> None:
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path, format=fmt)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
  """The fixtures on disk: 3- and 11-class npz files, image folders with and without split subfolders."""
  root = tmp_path_factory.mktemp("own")
  write_medmnist_npz(root / "three.npz", split_arrays(3, PER_CLASS, flat_labels=True))
  eleven = split_arrays(11, {"train": 3, "val": 1, "test": 1})
  write_medmnist_npz(root / "eleven.npz", eleven)
  write_medmnist_npz(root / "manual" / "organamnist.npz", eleven)  # the same arrays as MedMNIST, for TFDS
  names = ("benign", "malignant", "normal")
  for split, n in PER_CLASS.items():
    for label, name in enumerate(names):
      for i, pixels in enumerate(class_images(label, n, seed=1)):
        save_png(root / "split" / split / name / f"{i}.png", pixels)
  for label, name in enumerate(names):  # 32x20 images (resized to 28x28), one of them a JPEG
    for i, pixels in enumerate(class_images(label, 15, size=(32, 20), seed=2)):
      save_png(root / "flat" / name / f"img{i}.{'jpg' if i == 0 else 'png'}", pixels,
               "JPEG" if i == 0 else "PNG")
  return root


def summary(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / "summary.json").read_text())


def metric_rows(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def assert_trained(workdir, kind: str, n_classes: int, sizes: tuple) -> dict:
  s = summary(workdir)
  assert s["data"]["kind"] == kind and s["data"]["n_classes"] == n_classes
  assert tuple(s["data"]["split_sizes"].values()) == sizes
  assert s["data"]["image_shape"] == [28, 28, 1]
  assert set(s["heads"]) == {"main"} and s["best_epoch"] == 1
  assert 0 <= s["heads"]["main"]["test_auc"] <= 1
  rows = metric_rows(workdir)
  assert len(rows) == 1 and "val_auc_main" in rows[0]
  assert not any(k.startswith("test_") for k in rows[0])  # test is scored once, for the summary
  return s


# ------------------------------------------------------------------------------------ runs that train
def test_npz_with_three_classes(own, tmp_path):
  assert main(["--data", str(own / "three.npz"), *RUN, "--workdir", str(tmp_path / "w")]) == 0
  s = assert_trained(tmp_path / "w", "npz", 3, (30, 6, 9))
  assert s["dataset"] == "three" and s["task"] == "multi-class"
  assert s["data_source"] == s["data"]["path"] == str((own / "three.npz").absolute())
  assert s["config"]["data"] == str(own / "three.npz") and s["config"]["flag"] == ""
  assert s["seeds"] == {"init_and_batches": 0, "data_draws": 0, "label_seed_given": False}


def test_folder_with_split_subfolders(own, tmp_path):
  assert main(["--data", str(own / "split"), *RUN, "--workdir", str(tmp_path / "w")]) == 0
  s = assert_trained(tmp_path / "w", "image-folder", 3, (30, 6, 9))
  assert s["data"]["classes"] == ["benign", "malignant", "normal"] and s["data"]["drawn_splits"] == []


def test_flat_folder_draws_val_and_test_from_the_label_seed(own, tmp_path):
  argv = ["--data", str(own / "flat"), *RUN, "--label-seed", "3", "--workdir", str(tmp_path / "w")]
  assert main(argv) == 0
  s = assert_trained(tmp_path / "w", "image-folder", 3, (30, 6, 9))
  assert s["data"]["drawn_splits"] == ["val", "test"]
  assert s["data"]["original_size"] == {"min": [20, 32], "max": [20, 32]} and s["data"]["converted_to"] == "L (grey)"
  assert s["seeds"] == {"init_and_batches": 0, "data_draws": 3, "label_seed_given": True}


def test_npz_with_eleven_classes_and_the_same_data_through_tfds(own, tmp_path):
  argv = ["--data", str(own / "eleven.npz"), "--num-classes", "11", "--task", "multi-class", *RUN]
  assert main(argv + ["--workdir", str(tmp_path / "npz")]) == 0
  from_npz = assert_trained(tmp_path / "npz", "npz", 11, (33, 11, 11))
  pytest.importorskip("tensorflow_datasets")
  argv = ["--flag", "organamnist", "--root", str(own / "manual"), "--source", "tfds",
          "--tfds-data-dir", str(tmp_path / "tfds"), *RUN]
  assert main(argv + ["--workdir", str(tmp_path / "tfds_run")]) == 0
  from_tfds = assert_trained(tmp_path / "tfds_run", "tfds", 11, (33, 11, 11))
  assert "med_mnist/organamnist_28/3.1.0" in from_tfds["data_source"]
  # The TFDS reader keeps the npz's row order, so the two runs train on exactly the same batches.
  assert from_tfds["heads"]["main"] == pytest.approx(from_npz["heads"]["main"])


# ------------------------------------------------------------------------------- the data layer alone
def test_folder_of_mixed_grey_and_colour_images_becomes_rgb(tmp_path):
  grey = class_images(0, 10, size=(40, 40))
  for i, pixels in enumerate(grey):
    save_png(tmp_path / "d" / "a" / f"{i}.png", pixels)
    if i < 9:
      save_png(tmp_path / "d" / "b" / f"{i}.png", np.stack([pixels, pixels // 2, pixels // 3], -1))
  from PIL import Image
  Image.fromarray(np.zeros((40, 40, 4), np.uint8)).save(tmp_path / "d" / "b" / "rgba.png")  # alpha dropped
  save_png(tmp_path / "d" / "a" / "test" / "ignored.png", grey[0])  # folders inside a class are not read
  data = load_own_data(tmp_path / "d", 28, seed=0)
  assert data.train_images.shape[1:] == (28, 28, 3) and data.n_classes == 2 and data.task == "binary-class"
  assert [data.split(s)[0].shape[0] for s in ("train", "val", "test")] == [14, 2, 4]  # 70/10/20 per class
  grey_rows = np.concatenate([data.split(s)[0][data.split(s)[1][:, 0] == 0] for s in ("train", "val", "test")])
  np.testing.assert_array_equal(grey_rows[..., 0], grey_rows[..., 2])  # grey images are grey in RGB too


def test_npz_conversions_float_rgba_size_and_as_rgb(tmp_path):
  arrays = split_arrays(2, {"train": 4, "val": 2, "test": 2})
  for split in ("train", "val", "test"):
    x = arrays[f"{split}_images"]
    arrays[f"{split}_images"] = np.stack([x, x, x, np.full_like(x, 9)], -1).astype(np.float32) / 255
  write_medmnist_npz(tmp_path / "f.npz", arrays)
  data = load_own_data(tmp_path / "f.npz", 64)
  assert data.train_images.shape == (8, 64, 64, 3) and data.train_images.dtype == np.uint8
  assert data.details["original_image_shape"] == [28, 28, 4]
  write_medmnist_npz(tmp_path / "g.npz", split_arrays(2, {"train": 4, "val": 2, "test": 2}))
  assert load_own_data(tmp_path / "g.npz", as_rgb=True).test_images.shape == (4, 28, 28, 3)


def test_multilabel_npz_and_inference(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {f"{s}_images": rng.integers(0, 255, (6, 28, 28), dtype=np.uint8) for s in ("train", "val", "test")}
  arrays.update({f"{s}_labels": rng.integers(0, 2, (6, 5)).astype(bool) for s in ("train", "val", "test")})
  write_medmnist_npz(tmp_path / "m.npz", arrays)
  data = load_own_data(tmp_path / "m.npz")
  assert data.task == "multi-label, binary-class" and data.n_classes == 5 and data.train_labels.shape == (6, 5)
  arrays["train_labels"] = np.arange(6, dtype=np.float64) % 3  # whole numbers as floats are class indices
  arrays.update({f"{s}_labels": np.arange(6) % 3 for s in ("val", "test")})
  write_medmnist_npz(tmp_path / "o.npz", arrays)
  ordinal = load_own_data(tmp_path / "o.npz", task="ordinal-regression", num_classes=3)
  assert ordinal.task == "ordinal-regression" and ordinal.n_classes == 3
  with pytest.raises(OwnDataError, match="class.*3 of 4 have no training image"):
    load_own_data(tmp_path / "o.npz", num_classes=4)


def test_drawn_splits_are_stratified_and_follow_the_seed(own):
  first, again = load_own_data(own / "flat", seed=1), load_own_data(own / "flat", seed=1)
  other = load_own_data(own / "flat", seed=2)
  for data in (first, other):
    for split, n in PER_CLASS.items():
      np.testing.assert_array_equal(np.bincount(data.split(split)[1][:, 0]), [n] * 3)
  np.testing.assert_array_equal(first.val_images, again.val_images)
  assert not np.array_equal(first.val_images, other.val_images)


def test_label_seed_defaults_to_seed_and_eval_cadence():
  assert TrainConfig(seed=5).data_seed == 5 and TrainConfig(seed=5, label_seed=0).data_seed == 0
  config = TrainConfig(epochs=100)
  assert config.validation_interval(num_train=90_000, num_val=10_000, num_test=7_000) == 1
  # 1% of PathMNIST: 900 labelled images against 10,004 validation and 7,180 test images. Validating at
  # epochs 34, 68 and 100 (and one test pass) keeps the evaluation images within half the training images
  # (0.5 x 100 x 900 = 45,000); every 33 epochs would validate 4 times.
  assert config.validation_interval(900, 10_004, 7_180) == 34
  assert 3 * 10_004 + 7_180 <= 45_000 < 4 * 10_004 + 7_180
  assert TrainConfig(epochs=3).validation_interval(10, 1_000, 1_000) == 3  # only the last epoch
  assert TrainConfig(eval_every=4).validation_interval(10, 1_000, 1_000) == 4


def test_predict_scores_val_and_test_with_one_compiled_function():
  import jax
  import jax.numpy as jnp
  from lsanet_jax.steps import make_predict

  class TwoHeads:  # a stand-in model: logits are affine in the mean pixel
    def apply(self, variables, x, train):
      m = jnp.mean(x, axis=(1, 2, 3))[:, None]
      return {"logits": {"main": m * variables["w"], "fused": -m * variables["w"]}}

  images = jnp.asarray(np.arange(7 * 4, dtype=np.uint8).reshape(7, 2, 2, 1) * 9)
  predict = make_predict(TwoHeads(), "multi-class", 2, 3)
  variables = {"w": jnp.arange(3.0)}
  first = predict(variables, images[:6], 0, 3)
  rest = predict(variables, images[:6], 1, 2)
  assert predict._cache_size() == 1
  np.testing.assert_allclose(first["main"][2:6], rest["main"][:4], rtol=1e-6)
  np.testing.assert_array_equal(rest["fused"][4:], 0)  # rows past the asked batches stay zero
  x = (np.asarray(images[:6], np.float32) / 255 - 0.5) / 0.5
  expected = jax.nn.softmax(x.mean(axis=(1, 2, 3))[:, None] * np.arange(3.0))
  np.testing.assert_allclose(first["main"], expected, rtol=1e-5)


def test_no_module_of_lsanet_jax_imports_tensorflow_datasets_when_imported():
  """A GPU machine has no tensorflow-datasets: only functions that need it import it, when called."""
  import ast
  found = []
  for path in (REPO / "lsanet_jax").rglob("*.py"):
    # Module level, including under if/try, but not inside a function or class body.
    pending = list(ast.parse(path.read_text()).body)
    while pending:
      node = pending.pop()
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        continue
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("tensorflow_datasets", "tensorflow")]
      pending += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
  assert not found, found


# --------------------------------------------------------------------------------------------- errors
def entries(folder: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def exit_status(argv) -> int:
  try:
    return main(argv)
  except SystemExit as e:  # argparse's own errors
    return e.code


def bad_npz(tmp_path, change=lambda arrays: None) -> str:
  arrays = split_arrays(3, {"train": 4, "val": 2, "test": 2})
  change(arrays)
  return str(write_medmnist_npz(tmp_path / "bad.npz", arrays))


def bad_folder(tmp_path, change=lambda folder: None, *, splits: bool = False) -> str:
  top = tmp_path / "imgs"
  for name in ("a", "b"):
    for i in range(3):
      save_png(top / ("train" if splits else "") / name / f"{i}.png", class_images(0, 1)[0])
  change(top)
  return str(top)


def not_an_npz(tmp_path) -> str:
  (tmp_path / "x.csv").write_text("a,b\n")
  return str(tmp_path / "x.csv")


def _set(key, value):
  return lambda arrays: arrays.__setitem__(key, value(arrays))


NO_DATA = lambda tmp_path: None  # noqa: E731
BAD_INPUTS = {  # case: (makes --data, more arguments, what the error line says)
    "missing path": (lambda t: str(t / "nope.npz"), [], ["--data", "no such file"]),
    "not an npz": (not_an_npz, [], ["--data", "readable npz"]),
    "missing key": (lambda t: bad_npz(t, lambda a: a.pop("test_labels")), [], ["--data", "missing key(s) test_labels"]),
    "mismatched image shapes": (lambda t: bad_npz(t, _set("val_images", lambda a: a["val_images"][:, :20])), [],
                                ["--data", "differ in shape"]),
    "label count": (lambda t: bad_npz(t, _set("train_labels", lambda a: a["train_labels"][:-1])), [],
                    ["--data", "train_labels has shape (11, 1)"]),
    "negative label": (lambda t: bad_npz(t, _set("val_labels", lambda a: a["val_labels"] - 1)), [],
                       ["--data", "negative label -1"]),
    "non-integer label": (lambda t: bad_npz(t, _set("test_labels", lambda a: a["test_labels"] + 0.5)), [],
                          ["--data", "non-integer label 0.5"]),
    "label out of range": (bad_npz, ["--num-classes", "2"], ["--data", "out of range for --num-classes 2"]),
    "empty class in npz": (lambda t: bad_npz(t, _set("train_labels", lambda a: a["train_labels"] * 2)), [],
                           ["--data", "class(es) 1, 3 of 5 have no training image"]),
    "binary task, 3 classes": (bad_npz, ["--task", "binary-class"], ["--data", "--task binary-class needs 2 classes"]),
    "empty class folder": (lambda t: bad_folder(t, lambda d: (d / "c").mkdir()), [], ["--data", "holds no image"]),
    "unreadable image": (lambda t: bad_folder(t, lambda d: (d / "a" / "9.png").write_bytes(b"\x89PNG junk")), [],
                         ["--data", "cannot read the image", "9.png"]),
    "one class folder": (lambda t: bad_folder(t, lambda d: os.rename(d / "b", t / "elsewhere")), [],
                         ["--data", "1 class subfolder"]),
    "unknown class in val/": (lambda t: bad_folder(t, lambda d: save_png(d / "val" / "z" / "0.png",
                                                                         class_images(0, 1)[0]), splits=True),
                              [], ["--data", "class folder(s) z"]),
    "multi-label folder": (bad_folder, ["--task", "multi-label"], ["--data", "--task multi-label"]),
    "with --flag": (bad_npz, ["--flag", "bloodmnist"], ["--data", "--flag"]),
    "with --source tfds": (bad_npz, ["--source", "tfds"], ["--data", "--source"]),
    "with --download": (bad_npz, ["--download"], ["--data", "--download"]),
    "--num-classes 1": (bad_npz, ["--num-classes", "1"], ["--num-classes"]),
    "--task without --data": (NO_DATA, ["--flag", "digits", "--task", "multi-class"], ["--task", "--data"]),
    "--label-seed -1": (NO_DATA, ["--flag", "digits", "--label-seed", "-1"], ["--label-seed"]),
    "--eval-every -1": (NO_DATA, ["--flag", "digits", "--eval-every", "-1"], ["--eval-every"]),
    "tfds of digits": (NO_DATA, ["--flag", "digits", "--source", "tfds"], ["--source tfds", "digits"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_the_workdir(tmp_path, capsys, case):
  make, extra, needles = BAD_INPUTS[case]
  data = make(tmp_path)
  workdir = tmp_path / "w"
  (workdir / "notes").mkdir(parents=True)
  (workdir / "notes" / "plan.txt").write_text("mine")
  before = entries(workdir)
  argv = (["--data", data] if data else []) + extra + RUN + ["--workdir", str(workdir)]
  assert exit_status(argv) == 2
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  assert entries(workdir) == before
