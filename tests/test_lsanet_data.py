"""MedMNIST npz loading and validation, label-fraction subsets, verified download, TFDS builder."""
import functools
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest

from lsanet_jax.data import (INFO, MedMNISTError, digits_as_medmnist, label_fraction_subset,
                             load_medmnist, npz_filename, write_medmnist_npz)
from lsanet_jax.data.download import DownloadError, download_medmnist, file_md5


def fake_arrays(flag, size=28, n=(20, 6, 8), seed=0):
  """Arrays in exactly the MedMNIST layout, with the dataset's channels and label form."""
  info = INFO[flag]
  rng = np.random.default_rng(seed)
  out = {}
  for split, count in zip(("train", "val", "test"), n):
    shape = (count, size, size) + ((3,) if info["n_channels"] == 3 else ())
    out[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
    if info["task"] == "multi-label, binary-class":
      out[f"{split}_labels"] = rng.integers(0, 2, size=(count, info["n_classes"]), dtype=np.uint8)
    else:
      out[f"{split}_labels"] = (np.arange(count) % info["n_classes"]).astype(np.uint8)[:, None]
  return out


@pytest.mark.parametrize("flag", [f for f in INFO if f != "digits"])
def test_all_twelve_2d_datasets_load(tmp_path, flag):
  write_medmnist_npz(tmp_path / npz_filename(flag), fake_arrays(flag))
  data = load_medmnist(flag, tmp_path)
  assert data.train_images.shape == (20, 28, 28, INFO[flag]["n_channels"])
  assert data.train_labels.dtype == np.int32
  assert data.task == INFO[flag]["task"]


def test_sizes_name_files_and_grey_becomes_rgb(tmp_path):
  assert npz_filename("pneumoniamnist", 28) == "pneumoniamnist.npz"
  assert npz_filename("pneumoniamnist", 64) == "pneumoniamnist_64.npz"
  write_medmnist_npz(tmp_path / "pneumoniamnist_64.npz", fake_arrays("pneumoniamnist", 64))
  grey = load_medmnist("pneumoniamnist", tmp_path, 64)
  rgb = load_medmnist("pneumoniamnist", tmp_path, 64, as_rgb=True)
  assert grey.test_images.shape == (8, 64, 64, 1)
  assert rgb.test_images.shape == (8, 64, 64, 3)
  np.testing.assert_array_equal(rgb.test_images[..., 2], grey.test_images[..., 0])


@pytest.mark.parametrize("corrupt, message", [
    (lambda a: a.pop("val_labels"), "missing key"),
    (lambda a: a.__setitem__("train_images", a["train_images"][:, :27]), "shape"),
    (lambda a: a.__setitem__("test_labels", a["test_labels"] + 9), r"range from 9 .* \[0, 7\]"),
    (lambda a: a.__setitem__("train_images", a["train_images"].astype(np.float32)), "uint8"),
    (lambda a: a.__setitem__("val_images", np.repeat(a["val_images"][..., None], 3, -1)), "channel"),
    (lambda a: a.__setitem__("val_labels", a["val_labels"][:-1]), "val_labels has shape"),
])
def test_bad_files_give_clear_errors(tmp_path, corrupt, message):
  arrays = fake_arrays("tissuemnist")
  corrupt(arrays)
  write_medmnist_npz(tmp_path / "tissuemnist.npz", arrays)
  with pytest.raises(MedMNISTError, match=message):
    load_medmnist("tissuemnist", tmp_path)


def test_missing_file_unknown_flag_and_unreadable_file(tmp_path):
  with pytest.raises(MedMNISTError, match="not found.*--download"):
    load_medmnist("bloodmnist", tmp_path)
  with pytest.raises(MedMNISTError, match="unknown dataset flag 'bloodmnst'"):
    load_medmnist("bloodmnst", tmp_path)
  with pytest.raises(MedMNISTError, match="unknown image size"):
    load_medmnist("bloodmnist", tmp_path, 32)
  (tmp_path / "bloodmnist.npz").write_bytes(b"not a zip")
  with pytest.raises(MedMNISTError, match="not a readable npz"):
    load_medmnist("bloodmnist", tmp_path)


def test_chest_multilabel_labels_are_validated(tmp_path):
  arrays = fake_arrays("chestmnist")
  arrays["train_labels"][0, 3] = 2
  write_medmnist_npz(tmp_path / "chestmnist.npz", arrays)
  with pytest.raises(MedMNISTError, match=r"\[0, 1\]"):
    load_medmnist("chestmnist", tmp_path)


def test_label_fraction_is_stratified_seeded_and_nested_in_the_split():
  labels = np.repeat(np.arange(5), [100, 200, 300, 50, 350])[:, None]
  for fraction in (0.01, 0.05, 0.1, 0.25):
    idx = label_fraction_subset(labels, fraction, seed=3, task="multi-class")
    counts = np.bincount(labels[idx, 0], minlength=5)
    expected = np.maximum(1, np.round(fraction * np.array([100, 200, 300, 50, 350])))
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(idx, label_fraction_subset(labels, fraction, 3, "multi-class"))
  assert len(label_fraction_subset(labels, 1.0, 0, "multi-class")) == 1000
  assert not np.array_equal(label_fraction_subset(labels, 0.1, 0, "multi-class"),
                            label_fraction_subset(labels, 0.1, 1, "multi-class"))
  with pytest.raises(MedMNISTError, match="label fraction"):
    label_fraction_subset(labels, 0.0, 0, "multi-class")


def test_digits_stand_in_is_in_medmnist_format(tmp_path):
  arrays = digits_as_medmnist(seed=0)
  assert arrays["train_images"].shape == (1257, 28, 28) and arrays["train_images"].dtype == np.uint8
  assert sum(arrays[f"{s}_labels"].shape[0] for s in ("train", "val", "test")) == 1797
  assert set(np.unique(arrays["test_labels"])) == set(range(10))
  write_medmnist_npz(tmp_path / "digits.npz", arrays)
  from_file = load_medmnist("digits", tmp_path)
  in_memory = load_medmnist("digits", tmp_path / "empty")
  np.testing.assert_array_equal(from_file.val_images, in_memory.val_images)


# ------------------------------------------------------------------------------------ download
@pytest.fixture
def served_file(tmp_path):
  src = tmp_path / "server"
  write_medmnist_npz(src / "breastmnist.npz", fake_arrays("breastmnist"))
  return src, file_md5(src / "breastmnist.npz")


def test_download_from_file_url_verifies_md5(tmp_path, served_file):
  src, md5 = served_file
  dest = download_medmnist("breastmnist", tmp_path / "root", url_template=src.as_uri() + "/{filename}",
                           md5=md5)
  assert file_md5(dest) == md5
  assert load_medmnist("breastmnist", tmp_path / "root").train_images.shape == (20, 28, 28, 1)


def test_download_over_loopback_http_and_reject_bad_checksum(tmp_path, served_file):
  src, md5 = served_file
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(src))
  handler.log_message = lambda *a: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    url = f"http://127.0.0.1:{server.server_address[1]}/{{filename}}"
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="MD5 .* expected 0+1"):
      download_medmnist("breastmnist", root, url_template=url, md5="0" * 31 + "1")
    assert list(root.iterdir()) == []  # nothing half-written left behind
    # The official checksum is for the real file, so the fake one is refused without md5=.
    with pytest.raises(DownloadError, match=INFO["breastmnist"]["md5"][28]):
      download_medmnist("breastmnist", root, url_template=url)
    assert file_md5(download_medmnist("breastmnist", root, url_template=url, md5=md5)) == md5
    with pytest.raises(DownloadError, match="could not download"):
      download_medmnist("breastmnist", tmp_path / "r2", url_template=url.replace("{filename}", "x/{filename}"), md5=md5)
  finally:
    server.shutdown()
    server.server_close()


def test_official_md5_table_is_complete():
  for flag, info in INFO.items():
    if info.get("builtin"):
      continue
    assert set(info["md5"]) == {28, 64, 128, 224}
    assert all(len(v) == 32 and int(v, 16) >= 0 for v in info["md5"].values())
  assert len([f for f in INFO if not INFO[f].get("builtin")]) == 12


def test_tfds_builder_reads_the_manual_folder_of_all_twelve(tmp_path):
  """Each of the 12 MedMNIST sets built from a manual folder of tiny npz files (without TensorFlow: the
  builder writes ArrayRecord files) reads back as exactly the npz's arrays, in the npz's order."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from lsanet_jax.data.tfds_builder import builder_class, load_tfds
  for flag in (f for f in INFO if f != "digits"):
    write_medmnist_npz(tmp_path / "manual" / npz_filename(flag), fake_arrays(flag, n=(6, 3, 4)))
  builder = builder_class()(config="bloodmnist_28", data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
  examples = builder.as_data_source(split="val")
  assert len(examples) == 3 and examples[0]["image"].shape == (28, 28, 3) and examples[0]["image"].dtype == np.uint8
  for flag in (f for f in INFO if f != "digits"):
    data = load_tfds(flag, 28, tmp_path / "tfds", manual_dir=tmp_path / "manual")
    npz = load_medmnist(flag, tmp_path / "manual")
    assert data.source_kind == "tfds" and data.task == npz.task, flag
    for split in ("train", "val", "test"):
      np.testing.assert_array_equal(data.split(split)[0], npz.split(split)[0], err_msg=flag)
      np.testing.assert_array_equal(data.split(split)[1], npz.split(split)[1], err_msg=flag)


def test_tfds_needs_the_npz_to_build_from(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from lsanet_jax.data.tfds_builder import load_tfds
  with pytest.raises(MedMNISTError, match=r"holds no built breastmnist_28 and .*breastmnist.npz is not there"):
    load_tfds("breastmnist", 28, tmp_path / "tfds", manual_dir=tmp_path / "manual")
  with pytest.raises(MedMNISTError, match="--source npz"):
    load_tfds("digits", 28, tmp_path / "tfds")


def test_written_and_downloaded_files_get_the_umask_permissions(tmp_path, served_file):
  src, md5 = served_file
  old = os.umask(0o027)
  try:
    written = write_medmnist_npz(tmp_path / "w" / "breastmnist.npz", fake_arrays("breastmnist"))
    fetched = download_medmnist("breastmnist", tmp_path / "d", url_template=src.as_uri() + "/{filename}", md5=md5)
  finally:
    os.umask(old)
  assert written.stat().st_mode & 0o777 == 0o640 and fetched.stat().st_mode & 0o777 == 0o640
