"""A tensorflow-datasets builder that reads the MedMNIST npz files from a manual folder, and the reader
`lsanet-train --source tfds` trains from.

tensorflow-datasets is optional (extras `tfds` and `test`) and imported only when a function here runs,
never when lsanet_jax is imported. TensorFlow is NOT needed: the builder writes ArrayRecord files (TFDS's
default TFRecord format needs TensorFlow to write) and stores images as zlib-compressed uint8 tensors
(tfds.features.Image needs TensorFlow to encode PNG); both are read back with `as_data_source`.

  builder = builder_class()(config="bloodmnist_28", data_dir="~/tensorflow_datasets")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="~/.medmnist"))
  source = builder.as_data_source(split="train")          # random access, no TensorFlow
  data = load_tfds("bloodmnist", 28, "~/tensorflow_datasets", manual_dir="~/.medmnist")   # MedMNISTData

Each example is {"image": uint8 (S, S, C), "label": int64 class, or (14,) int64 for ChestMNIST,
"index": the row in the npz split}; the reader puts the rows back in the npz's order, so a run from TFDS
trains on exactly what a run from the npz trains on.
"""
from __future__ import annotations

import functools
import pathlib

import numpy as np

from lsanet_jax.data.medmnist import (DEFAULT_ROOT, INFO, MEDMNIST_FLAGS, MULTI_LABEL, SIZES, SPLITS,
                                      MedMNISTData, MedMNISTError, channels_last, load_medmnist,
                                      npz_filename, validate_arrays)

DEFAULT_DATA_DIR = "~/tensorflow_datasets"  # TFDS's own default


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise MedMNISTError("the TFDS view of MedMNIST needs tensorflow-datasets (TensorFlow is not needed): "
                        "pip install 'infl-lsanet-jax[tfds]', or read the npz files (--source npz)") from e
  return tfds


@functools.cache  # TFDS registers a builder class by name: the class is defined once per process
def builder_class():
  """Returns the `MedMNIST` GeneratorBasedBuilder class (imports tensorflow_datasets now)."""
  tfds = _tfds()

  class MedMNISTConfig(tfds.core.BuilderConfig):
    def __init__(self, *, flag: str, size: int, **kwargs):
      super().__init__(name=f"{flag}_{size}", description=f"{flag} at {size} px", **kwargs)
      self.flag, self.size = flag, size

  class MedMNIST(tfds.core.GeneratorBasedBuilder):
    """MedMNIST v3 2D datasets from npz files placed in the manual folder."""
    VERSION = tfds.core.Version("3.1.0")
    RELEASE_NOTES = {
        "3.0.0": "MedMNIST v3 files; images as tfds Image (needed TensorFlow).",
        "3.1.0": "Images as zlib-compressed uint8 tensors, the npz row index kept, ArrayRecord files by "
                 "default: built and read without TensorFlow.",
    }
    BUILDER_CONFIGS = [MedMNISTConfig(flag=f, size=s) for f in MEDMNIST_FLAGS for s in SIZES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place {flag}.npz / {flag}_{size}.npz from https://zenodo.org/records/10519652 in the "
        "manual folder (default ~/.medmnist), or fetch them with lsanet-train --download.")

    def __init__(self, *, file_format: str = "array_record", **kwargs):
      super().__init__(file_format=file_format, **kwargs)

    def _info(self):
      info = INFO[self.builder_config.flag]
      size, channels = self.builder_config.size, info["n_channels"]
      if info["task"] == MULTI_LABEL:
        label = tfds.features.Tensor(shape=(info["n_classes"],), dtype=np.int64)
      else:
        label = tfds.features.ClassLabel(num_classes=info["n_classes"])
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=(size, size, channels), dtype=np.uint8, encoding="zlib"),
              "label": label,
              "index": tfds.features.Scalar(dtype=np.int64)}),
          supervised_keys=("image", "label"),
          homepage="https://medmnist.com/")

    def _split_generators(self, dl_manager):
      data = load_medmnist(self.builder_config.flag, dl_manager.manual_dir, self.builder_config.size)
      return {split: self._generate_examples(*data.split(split)) for split in SPLITS}

    def _generate_examples(self, images, labels):
      multi = INFO[self.builder_config.flag]["task"] == MULTI_LABEL
      for i in range(images.shape[0]):
        yield i, {"image": images[i], "label": labels[i].astype(np.int64) if multi else int(labels[i, 0]),
                  "index": i}

  return MedMNIST


def build_tfds(flag: str, size: int = 28, data_dir=DEFAULT_DATA_DIR, *, manual_dir=DEFAULT_ROOT):
  """The prepared builder of {flag}_{size} in data_dir, built from the npz in manual_dir if it is not there."""
  tfds = _tfds()
  if flag not in MEDMNIST_FLAGS or size not in SIZES:
    raise MedMNISTError(f"--source tfds holds the 12 MedMNIST data sets at {', '.join(map(str, SIZES))} px; "
                        f"{flag!r} at {size} px is not one of them: use --source npz")
  builder = builder_class()(config=f"{flag}_{size}", data_dir=str(pathlib.Path(data_dir).expanduser()))
  if not builder.is_prepared():
    npz = pathlib.Path(manual_dir).expanduser() / npz_filename(flag, size)
    if not npz.exists():  # TFDS would only assert that the manual folder is empty
      raise MedMNISTError(f"{builder.data_dir} holds no built {flag}_{size} and {npz} is not there to build it "
                          "from: put the npz in --root (or pass --download), or point --tfds-data-dir at the "
                          "folder of the built dataset")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(npz.parent)))
  return builder


def load_tfds(flag: str, size: int = 28, data_dir=DEFAULT_DATA_DIR, *, manual_dir=DEFAULT_ROOT,
              as_rgb: bool = False) -> MedMNISTData:
  """{flag}_{size} from the TFDS dataset in data_dir (built there from manual_dir's npz when missing),
  in the npz's row order and validated like the npz."""
  builder = build_tfds(flag, size, data_dir, manual_dir=manual_dir)
  info = INFO[flag]
  arrays = {}
  for split in SPLITS:
    source = builder.as_data_source(split=split)
    examples = source.__getitems__(range(len(source)))  # one batched read
    examples = sorted(examples, key=lambda e: int(e["index"]))
    images = np.stack([e["image"] for e in examples])
    arrays[f"{split}_images"] = images[..., 0] if info["n_channels"] == 1 else images
    arrays[f"{split}_labels"] = np.array([np.atleast_1d(e["label"]) for e in examples], np.int64)
  where = str(builder.data_dir)
  validate_arrays(flag, size, arrays, where)
  return MedMNISTData(flag=flag, task=info["task"], n_classes=info["n_classes"], source=where,
                      source_kind="tfds", details={"builder": builder.info.full_name},
                      **channels_last(arrays, as_rgb))
