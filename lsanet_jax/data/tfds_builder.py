"""A tensorflow-datasets builder that reads the MedMNIST npz files from a manual folder.

tensorflow-datasets is optional (extra `tfds`) and imported only when `builder_class()` runs:

  builder = builder_class()(config="bloodmnist_28", data_dir=..., )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="~/.medmnist"))
  ds = builder.as_dataset(split="train")

Each example is {"image": uint8 (S, S, C), "label": int64 class, or (14,) int64 for ChestMNIST}.
"""
from __future__ import annotations

from lsanet_jax.data.medmnist import INFO, MEDMNIST_FLAGS, MULTI_LABEL, SIZES, load_medmnist


def builder_class():
  """Returns the `MedMNIST` GeneratorBasedBuilder class (imports tensorflow_datasets now)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("the TFDS view of MedMNIST needs tensorflow-datasets: "
                      "pip install 'infl-lsanet-jax[tfds]'") from e

  class MedMNISTConfig(tfds.core.BuilderConfig):
    def __init__(self, *, flag: str, size: int, **kwargs):
      super().__init__(name=f"{flag}_{size}", version=tfds.core.Version("3.0.0"),
                       description=f"{flag} at {size} px", **kwargs)
      self.flag, self.size = flag, size

  class MedMNIST(tfds.core.GeneratorBasedBuilder):
    """MedMNIST v3 2D datasets from npz files placed in the manual folder."""
    VERSION = tfds.core.Version("3.0.0")
    BUILDER_CONFIGS = [MedMNISTConfig(flag=f, size=s) for f in MEDMNIST_FLAGS for s in SIZES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place {flag}.npz / {flag}_{size}.npz from https://zenodo.org/records/10519652 in the "
        "manual folder (default ~/.medmnist), or fetch them with lsanet-train --download.")

    def _info(self):
      info = INFO[self.builder_config.flag]
      size, channels = self.builder_config.size, info["n_channels"]
      if info["task"] == MULTI_LABEL:
        label = tfds.features.Tensor(shape=(info["n_classes"],), dtype="int64")
      else:
        label = tfds.features.ClassLabel(num_classes=info["n_classes"])
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(size, size, channels)), "label": label}),
          supervised_keys=("image", "label"),
          homepage="https://medmnist.com/")

    def _split_generators(self, dl_manager):
      data = load_medmnist(self.builder_config.flag, dl_manager.manual_dir, self.builder_config.size)
      return {split: self._generate_examples(*data.split(split)) for split in ("train", "val", "test")}

    def _generate_examples(self, images, labels):
      multi = INFO[self.builder_config.flag]["task"] == MULTI_LABEL
      for i in range(images.shape[0]):
        yield i, {"image": images[i], "label": labels[i].astype("int64") if multi else int(labels[i, 0])}

  return MedMNIST
