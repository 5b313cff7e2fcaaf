"""MedMNIST (and the built-in digits stand-in) and your own images as device-ready numpy arrays.

The TFDS view (lsanet_jax.data.tfds_builder) is imported from its module: it needs tensorflow-datasets."""
from lsanet_jax.data.medmnist import (INFO, MedMNISTData, MedMNISTError, digits_as_medmnist,
                                      label_fraction_subset, load_medmnist, npz_filename,
                                      validate_arrays, write_medmnist_npz)
from lsanet_jax.data.own_data import OwnDataError, load_own_data

__all__ = ["INFO", "MedMNISTData", "MedMNISTError", "OwnDataError", "digits_as_medmnist", "label_fraction_subset",
           "load_medmnist", "load_own_data", "npz_filename", "validate_arrays", "write_medmnist_npz"]
