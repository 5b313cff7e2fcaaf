"""The label-efficiency study's aggregation, tables, figure and parameter split, from fake per-cell rows
(no training; a few seconds)."""
import pathlib

import numpy as np
import pytest

from script_modules import load_module

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
  return load_module(REPO / "scripts" / "lsanet_label_study.py", "lsanet_label_study")


def row(variant, fraction, seed, main_acc, fused_acc=None, label_seed=None, num_train=10, epochs=60, lsa=None):
  heads = {"main": {"test_acc": main_acc, "test_auc": main_acc / 2 + 0.5, "val_acc": 0.0, "val_auc": 0.0}}
  if fused_acc is not None:
    heads["fused"] = {"test_acc": fused_acc, "test_auc": fused_acc / 2 + 0.5, "val_acc": 0.0, "val_auc": 0.0}
  return {"variant": variant, "fraction": fraction, "seed": seed, "label_seed": seed if label_seed is None else label_seed,
          "num_train": num_train, "epochs": epochs, "heads": heads, "lsa_weights": lsa}


@pytest.fixture
def rows():
  # Listed out of seed order on purpose: the aggregates list replicates in seed order.
  return [
      row("plain", 0.01, 2, 0.50), row("plain", 0.01, 0, 0.40), row("plain", 0.01, 1, 0.60),
      row("lsanet", 0.01, 0, 0.45, 0.50, lsa={"aux1": 0.33, "aux2": 0.33, "main": 0.34}),
      row("lsanet", 0.01, 1, 0.60, 0.70, lsa={"aux1": 0.30, "aux2": 0.35, "main": 0.35}),
      row("lsanet", 0.01, 2, 0.40, 0.50, lsa={"aux1": 0.36, "aux2": 0.31, "main": 0.33}),
      row("plain", 1.0, 0, 0.90, num_train=1257, epochs=6),
      row("lsanet", 1.0, 0, 0.95, 0.97, num_train=1257, epochs=6, lsa={"aux1": 0.3, "aux2": 0.3, "main": 0.4}),
  ]


def find(entries, **match):
  found = [e for e in entries if all(e[k] == v for k, v in match.items())]
  assert len(found) == 1, (match, found)
  return found[0]


def test_mean_and_sample_std_per_series_fraction_and_metric(study, rows):
  agg = study.aggregate(rows)
  plain = find(agg, series="plain/main", fraction=0.01, metric="test_acc")
  assert plain["n"] == 3 and plain["values"] == [0.40, 0.60, 0.50]  # seed order 0, 1, 2
  assert plain["replicates"] == [[0, 0], [1, 1], [2, 2]]
  assert plain["mean"] == pytest.approx(0.5)
  assert plain["std"] == pytest.approx(np.std([0.4, 0.6, 0.5], ddof=1)) == pytest.approx(0.1)
  fused = find(agg, series="lsanet/fused", fraction=0.01, metric="test_auc")
  assert fused["mean"] == pytest.approx(np.mean([0.75, 0.85, 0.75]))
  single = find(agg, series="lsanet/main", fraction=1.0, metric="test_acc")
  assert single["n"] == 1 and single["std"] is None and single["num_train"] == [1257]
  # plain has no fused head: no such series
  assert not [e for e in agg if e["series"] == "plain/fused"]


def test_paired_differences_match_replicates_and_count_wins(study, rows):
  rows = rows + [row("lsanet", 0.01, 7, 0.99, 0.99)]  # no plain partner: left out of the pairs
  paired = study.paired_differences(rows)
  d = find(paired, series="lsanet/fused", fraction=0.01, metric="test_acc")
  assert d["baseline"] == "plain/main" and d["replicates"] == [[0, 0], [1, 1], [2, 2]]
  np.testing.assert_allclose(d["values"], [0.10, 0.10, 0.00], atol=1e-12)
  assert d["mean"] == pytest.approx(0.2 / 3)
  assert d["std"] == pytest.approx(np.std([0.1, 0.1, 0.0], ddof=1))
  assert (d["wins"], d["ties"], d["losses"]) == (2, 1, 0)
  m = find(paired, series="lsanet/main", fraction=0.01, metric="test_acc")
  np.testing.assert_allclose(m["values"], [0.05, 0.0, -0.10], atol=1e-12)
  assert (m["wins"], m["ties"], m["losses"]) == (1, 1, 1)
  # pairs need the same label seed as well as the same seed
  shifted = [dict(r, label_seed=r["label_seed"] + 100) if r["variant"] == "lsanet" else r for r in rows]
  assert study.paired_differences(shifted) == []


def test_markdown_tables_show_mean_std_and_per_seed_values(study, rows):
  agg, paired = study.aggregate(rows), study.paired_differences(rows)
  text = study.markdown_tables(agg, paired, rows)
  assert "**test ACC**" in text and "**test AUC**" in text
  lines = [line for line in text.splitlines() if line.startswith("| 1% |")]
  assert len(lines) == 2  # one per metric
  acc = lines[0].split(" | ")
  assert acc[1:3] == ["10", "60"]  # labelled images, epochs
  assert acc[3] == "0.500 ± 0.100 [0.400, 0.600, 0.500]"
  assert "+0.067 ± 0.058 [+0.100, +0.100, +0.000] 2/1/0" in lines[0]
  full = next(line for line in text.splitlines() if line.startswith("| 100% |"))
  assert "0.950 (n=1) [0.950]" in full and "| 1257 | 6 |" in full


def test_lsa_weight_summary_per_fraction(study, rows):
  summary = study.lsa_weight_summary(rows)
  assert [s["fraction"] for s in summary] == [0.01, 1.0]
  aux1 = summary[0]["branches"]["aux1"]
  assert summary[0]["n"] == 3
  assert aux1["mean"] == pytest.approx(0.33) and aux1["min"] == 0.30 and aux1["max"] == 0.36
  assert "0.3300 [0.3000, 0.3600]" in study.lsa_table(summary)


def test_plot_writes_a_png(study, rows, tmp_path):
  path = study.plot(study.aggregate(rows), tmp_path / "figures" / "study.png", title="fake")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fraction_maps(study):
  assert study.parse_fraction_map("0.01:60,1:6", [0.01, 1.0]) == {0.01: 60, 1.0: 6}
  assert study.parse_fraction_map("5", [0.01, 1.0]) == {0.01: 5, 1.0: 5}
  with pytest.raises(SystemExit, match="0.1"):
    study.parse_fraction_map("0.01:60", [0.01, 0.1])


def test_head_parameter_split(study):
  def leaf(*shape):
    return np.zeros(shape)
  params = {
      "stem": {"conv": {"kernel": leaf(3, 3, 1, 4)}},                      # 36
      "stage1": {"conv": {"kernel": leaf(3, 3, 4, 4)}},                    # 144
      "head": {"classifier": {"kernel": leaf(4, 10), "bias": leaf(10)}},   # 50
      "aux1_stage2": {"conv": {"kernel": leaf(3, 3, 4, 4)}},               # 144
      "aux1_head": {"classifier": {"kernel": leaf(4, 10), "bias": leaf(10)}},  # 50
      "lsa": {"select": {"kernel": leaf(2, 8)}, "classifier": {"kernel": leaf(4, 10)}},  # 16 + 40
  }
  counts = study.head_param_counts(params)
  assert counts["all"] == 36 + 144 + 50 + 144 + 50 + 56
  assert counts["main"] == 36 + 144 + 50
  assert counts["fused"] == 36 + 144 + 144 + 56  # no main or auxiliary classifier, the LSA one kept
  assert "fused" not in study.head_param_counts({k: v for k, v in params.items() if k in ("stem", "head")})


def test_study_refuses_the_flags_it_sets(study, tmp_path):
  with pytest.raises(SystemExit, match="--seed"):
    study.main(["--out", str(tmp_path), "--", "--flag", "digits", "--seed", "3"])
  with pytest.raises(SystemExit, match="one value per"):
    study.main(["--out", str(tmp_path), "--seeds", "0,1", "--label-seeds", "0", "--", "--flag", "digits"])


def test_cost_table_lists_every_head_with_its_flops_against_plain(study):
  costs = {"heads": [
      {"series": "plain/main", "params": 700, "flops": 50.0, "what": "backbone"},
      {"series": "lsanet/main", "params": 700, "flops": 50.0, "what": "backbone"},
      {"series": "lsanet/fused", "params": 1900, "flops": 85.0, "what": "all branches"},
  ]}
  lines = study.cost_table(costs).splitlines()
  assert lines[0].startswith("| model / head | parameters needed | FLOPs per image")
  assert lines[2] == "| plain/main | 700 | 50 | 1.00× | backbone |"
  assert lines[4] == "| lsanet/fused | 1,900 | 85 | 1.70× | all branches |"
