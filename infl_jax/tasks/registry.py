"""The task registry: every task ``infl-train --task`` can run, by name.

A task plugs in with a module that defines ``run(config, workdir, key, *, resume, stop_after_round,
show_progress) -> summary`` (which writes summary.json) and ``format_summary(summary) -> str``, and
one line here (docs/design.md, "How a task plugs in").
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from infl_jax.tasks import classification, multiomics, perturbation, spatial

__all__ = ["TASKS", "TaskRunner"]


class TaskRunner(NamedTuple):
  run: Callable[..., dict]
  format_summary: Callable[[dict], str]


TASKS: dict[str, TaskRunner] = {
    "classification": TaskRunner(classification.run, classification.format_summary),
    "multiomics": TaskRunner(multiomics.run, multiomics.format_summary),
    "spatial": TaskRunner(spatial.run, spatial.format_summary),
    "perturbation": TaskRunner(perturbation.run, perturbation.format_summary),
}
