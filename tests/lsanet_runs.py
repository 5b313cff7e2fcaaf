"""Fixtures and readers shared by the lsanet-train end-to-end test files."""

import json
import pathlib

import pytest

from lsanet_jax.data import digits_as_medmnist, write_medmnist_npz


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("medmnist")
  write_medmnist_npz(root / "digits.npz", digits_as_medmnist(seed=0))
  return root


def read_rows(workdir):
  """metrics.jsonl without the seconds each epoch took (training, evaluation, both)."""
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]


def summary(workdir):
  return json.loads((pathlib.Path(workdir) / "summary.json").read_text())
