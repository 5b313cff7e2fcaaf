"""MedMNIST (and the built-in digits stand-in) as device-ready numpy arrays."""
from lsanet_jax.data.medmnist import (INFO, MedMNISTData, MedMNISTError, digits_as_medmnist,
                                      label_fraction_subset, load_medmnist, npz_filename,
                                      validate_arrays, write_medmnist_npz)

__all__ = ["INFO", "MedMNISTData", "MedMNISTError", "digits_as_medmnist", "label_fraction_subset",
           "load_medmnist", "npz_filename", "validate_arrays", "write_medmnist_npz"]
