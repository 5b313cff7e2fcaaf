"""Omics data for federated experiments: AnnData/h5ad in, client-partitioned numpy arrays out.

    from infl_jax import data
    split = data.load_dataset("pbmc")                       # 5 clients, Dirichlet label skew
    split = data.load_dataset("proteomics", n_clients=4)    # each plate split in two
    split = data.load_dataset("cohort.h5ad", label_key="cancer_type", client_key="site")
    for x_k, y_k in split.client_arrays(): ...

Nothing here needs jax; anndata, scanpy and somadata are imported only when reading data.
"""

from infl_jax.data.anndata_io import PanelAlignment, align_feature_panels, load_sites, read_h5ad
from infl_jax.data.builtin import BUILTIN_DATASETS, available_datasets, load_builtin_anndata
from infl_jax.data.errors import DataError
from infl_jax.data.loader import load_dataset
from infl_jax.data.partition import (partition_by_column, partition_dirichlet, partition_dirichlet_balanced,
                                     partition_iid, partition_label_skew, stratified_holdout)
from infl_jax.data.preprocess import Preprocessor, Standardizer
from infl_jax.data.split import FederatedSplit, make_federated_split

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "FederatedSplit",
    "PanelAlignment",
    "Preprocessor",
    "Standardizer",
    "align_feature_panels",
    "available_datasets",
    "load_builtin_anndata",
    "load_dataset",
    "load_sites",
    "make_federated_split",
    "partition_by_column",
    "partition_dirichlet",
    "partition_dirichlet_balanced",
    "partition_iid",
    "partition_label_skew",
    "read_h5ad",
    "stratified_holdout",
]
