"""The mixed key scheme (infl_jax.key_scheme.input_mixer): a key-derived orthogonal mixing of the input features
within random blocks, exactly invertible by the key holder, drawn from the key material alone and never written
to a run's files; and the attacks on it where the answer is known (attacks.covariance_alignment, the public-panel
attacker)."""

from __future__ import annotations

import contextlib
import io
import json

import jax.numpy as jnp
import numpy as np
import pytest

from infl_jax import keys as keylib
from infl_jax.attacks import covariance_alignment as ca, metrics, public_panel as pp
from infl_jax.key_scheme import (MIXING_BLOCK, InputMixer, client_view, input_mixer, input_scrambler, scramble,
                                 study_views, unscramble)
from infl_jax.main import DEFAULT_KEY_NAME, main
from runkit.errors import UserInputError


def _matrix(mixer: InputMixer, f: int) -> np.ndarray:
  """The transform as a matrix: row i is where raw feature i goes (x_m = x @ M)."""
  return np.asarray(scramble(np.eye(f, dtype=np.float32), mixer), np.float64)


@pytest.mark.parametrize("f", [37, 64, 7])
def test_mixing_is_orthogonal_blockwise_and_exactly_invertible(f):
  key = keylib.generate_key()
  mixer = input_mixer(key, f)
  x = np.random.default_rng(0).normal(size=(5, f)).astype(np.float32)
  np.testing.assert_allclose(unscramble(scramble(x, mixer), mixer), x, atol=1e-6)
  xj = jnp.asarray(x)  # the same transform on jax arrays
  np.testing.assert_allclose(np.asarray(unscramble(scramble(xj, mixer), mixer)), x, atol=1e-6)
  np.testing.assert_allclose(np.asarray(scramble(xj, mixer)), scramble(x, mixer), atol=1e-6)
  full, rest = divmod(f, MIXING_BLOCK)
  assert mixer.blocks.shape == (full, MIXING_BLOCK, MIXING_BLOCK) and mixer.tail.shape == (rest, rest)
  for q in [*mixer.blocks, mixer.tail]:
    np.testing.assert_allclose(q @ q.T, np.eye(len(q)), atol=1e-6)  # M M^T = I per block
  m = _matrix(mixer, f)
  np.testing.assert_allclose(m @ m.T, np.eye(f), atol=1e-6)
  # Each output mixes exactly one block's features: the block's size many nonzero weights per column.
  sizes = sorted(np.sum(np.abs(m) > 1e-9, axis=0))
  assert sizes == sorted([MIXING_BLOCK] * (full * MIXING_BLOCK) + [rest] * rest)
  assert np.all(np.max(m ** 2, axis=0) < 1.0 - 1e-3)  # no output is a single feature


def test_mixing_comes_from_the_key_material_alone(tmp_path):
  a, b = keylib.generate_key(), keylib.generate_key()
  same = lambda u, v: all(np.array_equal(p, q) for p, q in zip(u, v))
  assert same(input_mixer(a, 50), input_mixer(a, 50))
  reloaded = keylib.load_key(keylib.save_key(a, tmp_path / "a.key"))  # reproducible from the SecretKey alone
  assert same(input_mixer(reloaded, 50), input_mixer(a, 50))
  others = [input_mixer(b, 50), input_mixer(a, 50, stream="genes"),
            input_mixer(keylib.key_from_material(a.material, a.mode, a.version + 1), 50),
            input_mixer(keylib.key_from_material(a.material, "normal", a.version), 50)]
  for other in others:  # another key, stream, version or mode: another transform
    assert not np.array_equal(other.permutation, input_mixer(a, 50).permutation)
    assert not np.allclose(other.blocks, input_mixer(a, 50).blocks)
  # Its own stream, apart from the hardened scramble's.
  assert not np.array_equal(input_mixer(a, 50).permutation, input_scrambler(a, 50).permutation)
  with pytest.raises(UserInputError, match="block"):
    input_mixer(a, 50, block=1)
  with pytest.raises(UserInputError, match="SecretKey"):
    input_mixer(np.zeros((128, 2)), 50)


def test_mixed_views_feed_each_party_its_own_transform():
  key = keylib.generate_key(seed=5)
  x = np.random.default_rng(0).normal(size=(4, 20)).astype(np.float32)
  view = client_view(key, "mixed", 20)
  assert isinstance(view.scramblers[""], InputMixer)
  np.testing.assert_allclose(view.inputs(x), scramble(x, input_mixer(key, 20)), atol=1e-6)
  views = study_views(key, "mixed", 20, seed=0)
  assert views["no_inr"].scramblers is None
  assert not np.allclose(views["wrong_key_same_mode"].inputs(x), view.inputs(x))  # a guess mixes with its own key
  two = client_view(key, "mixed", {"genes": 20, "lipids": 20})
  assert not np.allclose(two.scramblers["genes"].blocks, two.scramblers["lipids"].blocks)


def test_multi_omics_layers_are_mixed_each_with_its_own_stream_and_absent_rows_stay_zero():
  from infl_jax.tasks.multiomics import _inputs

  key = keylib.generate_key(seed=4)
  rng = np.random.default_rng(0)
  layers = {"genes": rng.normal(size=(3, 20)), "lipids": rng.normal(size=(3, 9))}
  layers["genes"][1] = 0.0  # a sample whose client does not hold this layer
  held = _inputs(client_view(key, "mixed", {m: x.shape[1] for m, x in layers.items()}), layers)
  for m, x in layers.items():
    np.testing.assert_allclose(held[m], scramble(x, input_mixer(key, x.shape[1], stream=m)), atol=1e-6)
    # Distances (the isometry loss) and squared errors (the reconstruction loss) are kept by an orthogonal map.
    np.testing.assert_allclose(np.linalg.norm(held[m][0] - held[m][2]), np.linalg.norm(x[0] - x[2]), rtol=1e-5)
  assert np.all(held["genes"][1] == 0.0)


TINY = ["--dataset", "proteomics", "--model", "mlp", "--hidden", "16", "--rounds", "2", "--local-epochs", "1",
        "--batch-size", "16", "--n-top-features", "200", "--checkpoint-every", "1", "--no-central-baseline",
        "--key-scheme", "mixed"]


def _needles(mixer: InputMixer) -> list[bytes]:
  """Byte strings that would betray the transform: its matrices 4 (float32) or 2 (float64) entries at a time,
  the heads of its permutations (int64, int32) and signs, and the JSON text of its matrix entries."""
  out = []
  for dtype in ("<f4", "<f8"):
    raw = np.ascontiguousarray(np.concatenate([mixer.blocks.ravel(), mixer.tail.ravel()]), dtype).tobytes()
    out += [raw[i:i + 16] for i in range(0, len(raw) - 15, 16)]
  for perm in (mixer.permutation, mixer.out_permutation):
    out += [np.ascontiguousarray(perm[:16], dtype).tobytes() for dtype in ("<i8", "<i4")]
  out.append(np.ascontiguousarray(mixer.signs[:32], "<f4").tobytes())
  out += [repr(float(v)).encode() for v in mixer.blocks.ravel()[:256] if len(repr(float(v))) >= 12]
  return out


def test_a_mixed_run_writes_no_part_of_its_transform(tmp_path):
  workdir = tmp_path / "w"
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = main([*TINY, "--workdir", str(workdir)])
  assert status == 0, err.getvalue()
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["key_scheme"] == "mixed" and summary["config"]["key_scheme"] == "mixed"
  assert summary["test"]["right_key"]["accuracy"] > 0  # the key holder's run went through
  key = keylib.load_key(workdir / DEFAULT_KEY_NAME)
  needles = _needles(input_mixer(key, 200))
  files = [p for p in workdir.rglob("*") if p.is_file() and p.name != DEFAULT_KEY_NAME]
  assert {"summary.json", "metrics.jsonl"} <= {p.name for p in files}
  assert any("checkpoints" in p.parts for p in files)
  printed = (out.getvalue() + err.getvalue()).encode()
  for name, blob in [(str(p), p.read_bytes()) for p in files] + [("the printed output", printed)]:
    found = [n[:8].hex() for n in needles if n in blob]
    assert not found, f"part of the mixed transform {found[:3]} in {name}"


def test_mixed_on_a_task_that_cannot_use_it_is_a_one_line_error(tmp_path, capsys):
  assert main(["--dataset", "perturbation_sim", "--key-scheme", "mixed", "--workdir", str(tmp_path / "p")]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "--key-scheme mixed" in lines[0], lines
  assert not (tmp_path / "p").exists()


def _distinct_features(rng, n, f):
  """As tests/test_hardened_attacks.py: 4 shared factors, then each feature through its own skewing map."""
  z = rng.normal(size=(n, 4)) @ rng.normal(size=(4, f)) + 0.7 * rng.normal(size=(n, f))
  z = z / z.std(0)
  a = np.linspace(-1.0, 1.0, f)[rng.permutation(f)]
  return np.expm1(a * z) / a


def test_panel_attacker_that_breaks_the_scramble_does_not_identify_mixed_features():
  f = 40
  x = _distinct_features(np.random.default_rng(0), 900, f)
  targets, panel = x[:300], x[300:]
  key = keylib.generate_key(seed=1)
  found = {}
  for name, truth in (("hardened", input_scrambler(key, f)), ("mixed", input_mixer(key, f))):
    recovered = scramble(targets, truth) * -3.0  # one common scale, of unknown size and sign
    guess = pp.public_panel_attack(recovered, panel).scrambler
    found[name] = ca.feature_identity(lambda r, t=truth: scramble(r, t), lambda r, g=guess: unscramble(r, g), f)
    if name == "hardened":  # feature_identity is the share of positions (and signs) the matcher recovers
      assert found[name] == pytest.approx({"identified": pp.match_accuracy(guess, truth)["position"],
                                           "identified_with_sign": pp.match_accuracy(guess, truth)["position_and_sign"]})
  assert found["hardened"]["identified_with_sign"] >= 0.8, found
  # No output of the mixed transform is one feature: a permutation guess can identify one only where a block's
  # weight happens to be concentrated (|q|^2 > 1/2), which the key's blocks of 16 and 8 give rarely.
  assert found["mixed"]["identified"] <= 0.1, found


def test_covariance_alignment_sees_any_orthogonal_transform_alike():
  f = 48
  x = _distinct_features(np.random.default_rng(2), 600, f)
  targets, panel = x[:200], x[200:]
  key = keylib.generate_key(seed=3)
  r = {}
  for name, truth in (("hardened", input_scrambler(key, f)), ("mixed", input_mixer(key, f))):
    recovered = scramble(targets, truth) * 0.5
    alignment = ca.align_covariance(recovered, panel, components=4)
    r[name] = np.median(metrics.omics_metrics(targets, alignment.reconstruct(recovered))["abs_pearson"])
    # A rank-4 guess identifies no single feature; the true inverse identifies all, a random one ~1/F.
    assert ca.feature_identity(lambda v, t=truth: scramble(v, t), alignment.linear, f)["identified"] == 0.0
    assert ca.feature_identity(lambda v, t=truth: scramble(v, t), lambda v, t=truth: unscramble(v, t), f) == {
        "identified": 1.0, "identified_with_sign": 1.0}
  assert r["hardened"] == pytest.approx(r["mixed"], abs=1e-4)  # principal axes move with any orthogonal map
  assert r["mixed"] > 0.5  # the top principal subspace of a factor model is most of a sample's profile
