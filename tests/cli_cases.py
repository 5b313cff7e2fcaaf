"""What the CLI failure tests share: a CLI's exit status, a folder's entries, and a small valid h5ad."""

import pathlib

import numpy as np


def exit_status(main, argv) -> int:
  """``main(argv)``'s exit status; argparse's own errors leave through SystemExit."""
  try:
    return main(argv)
  except SystemExit as e:
    return e.code


def entries(folder: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def write_small_h5ad(path: pathlib.Path, *, cells: int = 40, label: str = "cell_type") -> pathlib.Path:
  """``cells`` cells x 12 genes, two classes in obs[label], two sites in obs["site"]."""
  import anndata
  import pandas as pd

  rng = np.random.default_rng(0)
  obs = pd.DataFrame({label: rng.choice(["B", "T"], cells), "site": rng.choice(["a", "b"], cells)},
                     index=[f"c{i}" for i in range(cells)])
  anndata.AnnData(X=rng.normal(size=(cells, 12)).astype(np.float32), obs=obs).write_h5ad(path)
  return path
