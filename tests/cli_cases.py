"""What the CLI failure tests share: a CLI's exit status, its one-line error, a folder's entries, and a small
valid h5ad."""

import pathlib

import numpy as np


def exit_status(main, argv) -> int:
  """``main(argv)``'s exit status; argparse's own errors leave through SystemExit."""
  try:
    return main(argv)
  except SystemExit as e:
    return e.code


def one_line_error(capsys, *needles) -> str:
  """The one line a CLI printed on stderr, after checking it is an error, alone, with every needle and no traceback."""
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


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
