"""Secret keys that are secret (docs/design.md, "Keys"): keys from the OS's CSPRNG, nothing outside the key
file rebuilds a key, key files that are checked, and a resume that refuses another key.

One tiny training (module fixture) serves the scan of its workdir and the resume with a foreign key; the
rest are unit tests and CLI checks that stop before any training.
"""

import base64
import contextlib
import hashlib
import io
import json
import stat
import warnings

import jax
import numpy as np
import pytest

from infl_jax import keys as keylib
from infl_jax.config import TrainConfig
from infl_jax.main import DEFAULT_KEY_NAME, build_parser, config_from_args, load_or_create_key, main
from infl_jax.privacy import hardened
from infl_jax.key_scheme import study_views
from infl_jax.tasks.common import resume_settings
from runkit.checkpoint import Checkpointer

TINY = ["--dataset", "proteomics", "--model", "mlp", "--hidden", "16", "--rounds", "2", "--local-epochs", "1",
        "--batch-size", "16", "--n-top-features", "200", "--checkpoint-every", "1", "--no-central-baseline"]


def _one_line_error(capsys, *needles) -> str:
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def _key_for(argv, workdir):
  """The key a default infl-train run in ``workdir`` would load or create (no training)."""
  args = build_parser().parse_args([*argv, "--workdir", str(workdir)])
  workdir.mkdir(parents=True, exist_ok=True)
  return load_or_create_key(args, config_from_args(args), workdir)


# ---------------------------------------------------------------------------------------------
# Keys from the OS's CSPRNG


def test_generate_key_without_seed_draws_fresh_key_material():
  a, b = keylib.generate_key(), keylib.generate_key()
  assert a != b and a.material != b.material and a.fingerprint != b.fingerprint
  assert not np.array_equal(a.coords, b.coords)
  assert len(a.material) == 32 and a.source == "os-random" and a.seed is None and not a.seeded
  assert a.material.hex() not in repr(a) and "hidden" in repr(a)
  # The coordinates are a function of the material: rebuilt from it exactly, in every mode.
  for mode in ("uniform", "normal", "constant"):
    key = keylib.generate_key(mode=mode, version=3)
    assert keylib.key_from_material(key.material, mode, 3) == key
  seeded = keylib.generate_key(seed=7)
  assert seeded.source == "seed (insecure)" and seeded.seed == 7 and seeded == keylib.generate_key(7)


def test_default_infl_train_runs_create_different_key_files(tmp_path, capsys):
  first, second = _key_for([], tmp_path / "a"), _key_for([], tmp_path / "b")
  assert first != second and not first.seeded and not second.seeded
  files = [(tmp_path / w / DEFAULT_KEY_NAME) for w in ("a", "b")]
  assert files[0].read_bytes() != files[1].read_bytes()
  assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
  assert keylib.load_key(files[0]) == first  # the file holds the key itself, not a way to redraw it
  assert "INSECURE" in build_parser().format_help()  # --key-seed says what it costs
  assert first.fingerprint in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Nothing outside the key file rebuilds the key


def _integers(value):
  if isinstance(value, bool):
    return
  if isinstance(value, int):
    yield value
  elif isinstance(value, dict):
    for v in value.values():
      yield from _integers(v)
  elif isinstance(value, list):
    for v in value:
      yield from _integers(v)


def _json_documents(blob: bytes):
  for text in [blob.decode("utf-8", "ignore")] + blob.decode("utf-8", "ignore").splitlines():
    try:
      yield json.loads(text)
    except ValueError:
      pass


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """One tiny default ``infl-train`` run: ``(workdir, key, output it printed)``."""
  workdir = tmp_path_factory.mktemp("run") / "w"
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = main([*TINY, "--workdir", str(workdir)])
  assert status == 0, err.getvalue()
  return workdir, keylib.load_key(workdir / DEFAULT_KEY_NAME), (out.getvalue() + err.getvalue()).encode()


def test_no_file_of_the_run_but_the_key_file_holds_or_rebuilds_the_key(trained_run):
  workdir, key, printed = trained_run
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["key"] == {"fingerprint": key.fingerprint, "source": "os-random", "mode": key.mode,
                            "version": key.version, "n_points": 128}
  assert "key_seed" not in summary["config"] and summary["config"]["key_fingerprint"] == key.fingerprint
  coords = np.ascontiguousarray(key.coords, "<f4").tobytes()
  needles = [key.material, key.material.hex().encode(), key.material.hex().upper().encode(),
             base64.b64encode(key.material), base64.urlsafe_b64encode(key.material),
             base64.b64encode(key.material).rstrip(b"="), b"key_seed"]
  needles += [coords[i:i + 16] for i in range(0, len(coords), 16)]  # 4 float32 coordinates at a time
  needles += [r.encode() for r in map(repr, key.coords.astype(float).ravel()) if len(r) >= 10]
  files = [p for p in workdir.rglob("*") if p.is_file() and p.name != DEFAULT_KEY_NAME]
  assert {"summary.json", "metrics.jsonl"} <= {p.name for p in files}
  assert any("checkpoints" in p.parts for p in files)
  integers = set()
  for name, blob in [(str(p), p.read_bytes()) for p in files] + [("the printed output", printed)]:
    found = [n[:12] for n in needles if n in blob]
    assert not found, f"key material or coordinates {found} in {name}"
    for document in _json_documents(blob):
      integers.update(i for i in _integers(document) if 0 <= i < 2**256)
  assert integers  # the records do hold numbers: none of them is a seed of the key
  assert all(keylib.generate_key(seed=i, mode=key.mode, version=key.version) != key for i in integers)


def test_wrong_keys_are_guesses_from_the_run_seed_not_from_the_key():
  a, b = keylib.generate_key(), keylib.generate_key()
  for scheme in ("faithful", "hardened", "mixed"):
    guess = lambda key, seed, name: study_views(key, scheme, 6, seed=seed)[name]
    for name in ("wrong_key_same_mode", "wrong_key_other_mode"):
      # The same guess whatever the key: nothing of the key's material goes into it, nor into its scramble.
      assert _same_view(guess(a, 3, name), guess(b, 3, name))
      assert not _same_view(guess(a, 3, name), guess(a, 4, name))
      assert not np.array_equal(guess(a, 3, name).coords, a.coords)


def _same_view(u, v) -> bool:
  same_scramble = (u.scramblers is None) == (v.scramblers is None) and (
      u.scramblers is None or all(np.array_equal(x, y) for x, y in zip(u.scramblers[""], v.scramblers[""])))
  return np.array_equal(u.coords, v.coords) and same_scramble


  # Without a seed: reproducible per key, from its public fingerprint.
  np.testing.assert_array_equal(keylib.wrong_key_like(a).coords, keylib.wrong_key_like(a).coords)
  assert keylib.wrong_key_like(keylib.generate_key(seed=0)) != keylib.generate_key(seed=1)  # not "seed + 1"


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_with_a_foreign_key_file_is_refused(trained_run, tmp_path, capsys):
  workdir, key, _ = trained_run
  foreign = keylib.save_key(keylib.generate_key(), tmp_path / "foreign.key")
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  assert main([*TINY, "--workdir", str(workdir), "--resume", "--key-file", str(foreign)]) == 2
  line = _one_line_error(capsys, "differs from the run's", key.fingerprint, keylib.load_key(foreign).fingerprint,
                         "--key-file")
  assert "the key file's fingerprint" in line
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_overwrite_key_with_resume_is_refused_before_anything_is_written(tmp_path, capsys):
  key_file = keylib.save_key(keylib.generate_key(), tmp_path / "site.key")
  before = key_file.read_bytes()
  argv = [*TINY, "--workdir", str(tmp_path / "w"), "--resume", "--overwrite-key", "--key-file", str(key_file)]
  assert main(argv) == 2
  _one_line_error(capsys, "--overwrite-key", "--resume")
  assert key_file.read_bytes() == before and not (tmp_path / "w").exists()


def test_checkpoint_without_a_key_fingerprint_still_resumes(tmp_path):
  """A run checkpointed before runs recorded their key: resumed with any key, as before."""
  config = TrainConfig.for_dataset("proteomics", key_fingerprint=keylib.generate_key().fingerprint)
  fingerprint, defaults = resume_settings(config)
  old = {k: v for k, v in fingerprint.items() if k != "key_fingerprint"}
  state = {"w": np.arange(3, dtype=np.float32)}
  with Checkpointer(tmp_path, config=old) as ckpt:
    ckpt.save(1, state, force=True)
  with Checkpointer(tmp_path, config=fingerprint, config_defaults=defaults) as ckpt:
    restored, _ = ckpt.restore(jax.tree_util.tree_map(np.zeros_like, state))
  np.testing.assert_array_equal(restored["w"], state["w"])


# ---------------------------------------------------------------------------------------------
# Key files


def test_shared_key_file_is_refused_unless_allowed(tmp_path, capsys):
  workdir = tmp_path / "w"
  key = _key_for([], workdir)
  key_file = workdir / DEFAULT_KEY_NAME
  key_file.chmod(0o644)
  capsys.readouterr()
  assert main([*TINY, "--workdir", str(tmp_path / "other"), "--key-file", str(key_file)]) == 2
  _one_line_error(capsys, f"chmod 600 {key_file}")
  with pytest.raises(keylib.KeyFileError, match="chmod 600"):
    keylib.load_key(key_file)
  assert _key_for(["--allow-shared-key-file"], workdir) == key
  key_file.chmod(0o640)  # group-readable is refused too
  with pytest.raises(keylib.KeyFileError, match="group or others"):
    keylib.load_key(key_file)


def test_corrupted_key_file_is_refused(tmp_path):
  key = keylib.generate_key()
  path = keylib.save_key(key, tmp_path / "k.key")
  good = path.read_bytes()
  record = json.loads(good)
  position = good.index(record["material"].encode()) + 5
  flipped = bytearray(good)
  flipped[position] = ord("0") if flipped[position] != ord("0") else ord("1")
  path.write_bytes(bytes(flipped))
  with pytest.raises(keylib.KeyFileError, match="corrupted: checksum mismatch; restore it from your backup"):
    keylib.load_key(path)
  # A fingerprint that does not belong to the material, under a checksum recomputed to match.
  forged = dict(record, fingerprint="0" * 16)
  forged["checksum"] = keylib._checksum(forged)
  path.write_text(json.dumps(forged))
  with pytest.raises(keylib.KeyFileError, match="fingerprint mismatch"):
    keylib.load_key(path)
  path.write_bytes(good[: len(good) // 2])
  with pytest.raises(keylib.KeyFileError, match="corrupted"):
    keylib.load_key(path)
  path.write_bytes(good)
  assert keylib.load_key(path) == key
  with pytest.raises(keylib.KeyFileError, match="already exists"):
    keylib.save_key(keylib.generate_key(), path)
  assert path.read_bytes() == good


def test_version_1_key_file_still_loads(tmp_path):
  old = keylib.generate_key(seed=11, mode="normal", version=2)
  coords = np.ascontiguousarray(old.coords, "<f4")
  record = {"format": "infl-secret-key", "format_version": 1, "seed": 11, "mode": "normal", "version": 2,
            "n_points": 128, "dim": 2, "coords_sha256": hashlib.sha256(coords.tobytes()).hexdigest(),
            "coords": coords.astype(np.float64).tolist()}
  path = tmp_path / "old.key"
  path.write_text(json.dumps(record))
  path.chmod(0o600)
  with pytest.warns(keylib.InsecureKeyWarning, match="format 1.*seed-derived.*insecure"):
    loaded = keylib.load_key(path)
  assert loaded == old and loaded.seeded and loaded.fingerprint == old.fingerprint
  record["coords"][0][0] += 0.001
  path.write_text(json.dumps(record))
  with pytest.raises(keylib.KeyFileError, match="checksum mismatch"):
    keylib.load_key(path)


# ---------------------------------------------------------------------------------------------
# Hardened scramble


def test_hardened_scramble_comes_from_the_key_material(tmp_path):
  a, b = keylib.generate_key(), keylib.generate_key()
  sa, sb = hardened.input_scrambler(a, 64), hardened.input_scrambler(b, 64)
  assert not np.array_equal(sa.permutation, sb.permutation)
  again = hardened.input_scrambler(keylib.load_key(keylib.save_key(a, tmp_path / "a.key")), 64)
  np.testing.assert_array_equal(sa.permutation, again.permutation)
  np.testing.assert_array_equal(sa.signs, again.signs)
  x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
  np.testing.assert_allclose(hardened.unscramble(hardened.scramble(x, sa), sa), x)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a CSPRNG key file loads without the insecure-key note
    keylib.load_key(tmp_path / "a.key")
