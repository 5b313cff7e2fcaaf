"""The privacy evaluation's report: ``table.csv`` (every row), ``table.md`` (the readable summary), the
two privacy-utility plots and the seed search's plot, all from the ``results`` that
``runner.run_evaluation`` returns."""

from __future__ import annotations

import csv
import math
import pathlib

__all__ = ["TABLE_COLUMNS", "plot_privacy_utility", "write_tables"]

TABLE_COLUMNS = ("model", "lambda", "hardened", "dp_epsilon", "dp_noise_multiplier", "attacker", "attack",
                 "test_accuracy", "abs_pearson", "abs_spearman", "mse", "nmse", "top50_overlap", "label_recovered")
_MARKDOWN_COLUMNS = ("model", "attacker", "attack", "test_accuracy", "abs_pearson", "abs_spearman", "nmse",
                     "top50_overlap", "label_recovered")


def _fmt(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return "nan" if not math.isfinite(value) else f"{value:.3g}"
  return str(value)


def _markdown_table(header: list[str], rows: list[list]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def write_tables(results: dict, workdir) -> None:
  workdir = pathlib.Path(workdir)
  rows = results["rows"]
  columns = list(TABLE_COLUMNS) + sorted({k for r in rows for k in r} - set(TABLE_COLUMNS))
  with open(workdir / "table.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows({c: r.get(c) for c in columns} for r in rows)

  lines = _markdown_table(list(_MARKDOWN_COLUMNS), [[r.get(c) for c in _MARKDOWN_COLUMNS] for r in rows])
  samples = results["config"]["adaptive_samples"]
  # One row per model: the adaptive attacker's accuracy does not depend on the attack.
  adaptive = [r for r in rows if r["attacker"] == "adaptive" and r["attack"] == "analytic"]
  lines += ["", "Adaptive attacker's test accuracy with n labelled samples:", ""]
  lines += _markdown_table(["model"] + [f"n={n}" for n in samples],
                           [[r["model"]] + [r.get(f"test_accuracy_adaptive_n{n}") for n in samples] for r in adaptive])
  mia_columns = sorted({k for m in results["membership"].values() for k in m})
  lines += ["", "Membership inference on the final global model (members: training set; non-members: "
            "validation + test; queried with the right key):", ""]
  lines += _markdown_table(["model"] + mia_columns,
                           [[name] + [m.get(c) for c in mia_columns] for name, m in results["membership"].items()])
  lines += _scramble_lines(results)
  lines += ["", f"chance accuracy (majority class of the test split): {results['chance_accuracy']:.3f}; "
            f"total time {results['total_seconds']:.0f} s"]
  (workdir / "table.md").write_text("\n".join(lines) + "\n")


_SCRAMBLE_COLUMNS = ("model", "attacker", "panel_recovered_samples", "panel_samples", "scramble_position_recovered",
                     "scramble_position_sign_recovered", "abs_pearson", "test_accuracy")
_SECONDS_PER_YEAR = 365.25 * 86400


def _scramble_lines(results: dict) -> list[str]:
  """The attacks on the hardened model's scramble: public panel, its baselines, the seed search."""
  attackers = ("public_panel", "random_guess", "public_prior", "seed_search")
  rows = [r for r in results["rows"] if r["attacker"] in attackers]
  if not rows:
    return []
  lines = ["", "Attacks on the hardened model's scramble (analytic reconstructions of the targets unscrambled by "
           "the attacker's guess; positions: share of features placed right; signs: up to one flip of all):", ""]
  lines += _markdown_table(list(_SCRAMBLE_COLUMNS), [[r.get(c) for c in _SCRAMBLE_COLUMNS] for r in rows])
  for name, record in results.get("seed_search", {}).items():
    rate = record["per_second"]
    lines += ["", f"Seed search on {name}: {len(record['seeds'])} seeds tried, lowest score at seed "
              f"{record['best_seed']} (the key's seed: {record['key_seed']}); {rate:.0f} candidates/s end to end "
              f"(derivation {record['derive_per_second']:.0f}/s, jitted test {record['score_per_second']:.0f}/s); "
              f"all 2^32 seeds: {2.0 ** 32 / rate / 86400:.1f} days at this rate; 2^256 key materials: "
              f"{2.0 ** 256 / rate / _SECONDS_PER_YEAR:.1e} years"]
  return lines


def _save(plt, fig, ax, results: dict, xlabel: str, title: str, path: pathlib.Path) -> None:
  ax.set_xlabel(xlabel)
  ax.set_ylabel("attack success: median |Pearson r|")
  ax.set_ylim(-0.02, 1.05)
  ax.set_title(f"{results['dataset']}: {title}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _plot_over_lambda(plt, results: dict, path: pathlib.Path) -> None:
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for attack, marker in (("gradient_inversion", "o"), ("analytic", "^")):
    for hardened, color in ((False, "tab:blue"), (True, "tab:red")):
      # The realistic attacker: a wrong key of the same mode (at lambda 0 every attacker is the same).
      selected = [r for r in results["rows"]
                  if r["dp_epsilon"] is None and r["hardened"] == hardened and r["attack"] == attack
                  and (r["attacker"] == "wrong_key_same_mode" or (r["lambda"] == 0 and r["attacker"] == "right_key"))]
      if not selected:
        continue
      xs = [r["key_holder_accuracy"] for r in selected]
      ys = [r["abs_pearson"] for r in selected]
      ax.scatter(xs, ys, marker=marker, color=color,
                 label=f"{'hardened' if hardened else 'faithful'}: {attack.replace('_', ' ')}, wrong key (same mode)")
      for r, x, y in zip(selected, xs, ys):
        ax.annotate(f"λ{r['lambda']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
  _save(plt, fig, ax, results, "key holder's test accuracy", "privacy vs utility over λ", path)


def _plot_over_epsilon(plt, results: dict, path: pathlib.Path) -> None:
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for attack, marker in (("gradient_inversion", "o"), ("analytic", "^")):
    selected = [r for r in results["rows"] if r["attack"] == attack and r["attacker"] == "right_key" and
                (r["dp_epsilon"] is not None or (r["lambda"] == 0 and not r["hardened"]))]
    xs = [r["test_accuracy"] for r in selected]
    ys = [r["abs_pearson"] for r in selected]
    ax.scatter(xs, ys, marker=marker, label=attack.replace("_", " "))
    for r, x, y in zip(selected, xs, ys):
      ax.annotate("no DP" if r["dp_epsilon"] is None else f"ε{r['dp_epsilon']:g}", (x, y), fontsize=7,
                  xytext=(3, 3), textcoords="offset points")
  _save(plt, fig, ax, results, "test accuracy", "DP-FedAvg, privacy vs utility", path)


def _plot_seed_search(plt, results: dict, path: pathlib.Path) -> None:
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name, record in results["seed_search"].items():
    ax.plot(record["seeds"], record["scores"], lw=0.7, label=name)
    if record["key_seed"] in record["seeds"]:
      i = record["seeds"].index(record["key_seed"])
      ax.scatter([record["key_seed"]], [record["scores"][i]], color="tab:red", zorder=3, label="the key's seed")
  ax.set_xlabel("candidate seed")
  ax.set_ylabel("test score (lower: more like the key)")
  ax.set_title(f"{results['dataset']}: brute force over seed-derived keys")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_privacy_utility(results: dict, workdir) -> None:
  """Two PNGs: attack success (median |Pearson|) against utility, over lambda (the key holder's
  accuracy; faithful, with hardened at the main lambda) and over DP epsilon (test accuracy); a third,
  ``seed_search.png``, with every candidate's score when the seed search ran."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  workdir = pathlib.Path(workdir)
  _plot_over_lambda(plt, results, workdir / "privacy_utility_lambda.png")
  _plot_over_epsilon(plt, results, workdir / "privacy_utility_dp.png")
  if results.get("seed_search"):
    _plot_seed_search(plt, results, workdir / "seed_search.png")
