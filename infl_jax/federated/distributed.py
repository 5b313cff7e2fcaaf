"""One simulation over several processes (``jax.distributed``): checking the settings and starting the runtime.

    initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # before anything touches a device

Every process runs the same program; the round's client axis is split over every process's devices
(``sharding.py``) and the round's sums are psum-ed across processes (on CPU with gloo collectives).
Process 0 is the primary: it writes the records (metrics.jsonl, summary.json, the key file of a new
run); orbax writes each checkpoint once, and every process restores it (docs/design.md, "Multi-host
simulation").
"""

from __future__ import annotations

import jax

from runkit.errors import UserInputError

__all__ = ["check_settings", "initialize", "is_primary"]


def check_settings(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
  """Whether these settings ask for a multi-process run; a ``UserInputError`` naming the flag where they
  are incomplete or out of range. All three or none: a process guessing its id from the environment (as
  ``jax.distributed`` may on a cluster) would be a second, silent way to start a run."""
  given = {"--coordinator-address": coordinator_address, "--num-processes": num_processes,
           "--process-id": process_id}
  if all(v is None for v in given.values()):
    return False
  missing = [flag for flag, value in given.items() if value is None]
  if missing:
    raise UserInputError(f"a multi-process run needs --coordinator-address, --num-processes and --process-id "
                         f"together; add {', '.join(missing)}")
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserInputError(f"--coordinator-address must be HOST:PORT (e.g. 10.0.0.1:1234, PORT in 1..65535), got "
                         f"{coordinator_address!r}")
  if num_processes < 1:
    raise UserInputError(f"--num-processes must be >= 1, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise UserInputError(f"--process-id must be in 0..{num_processes - 1} for --num-processes {num_processes}, "
                         f"got {process_id}")
  return True


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               timeout_s: int = 300) -> None:
  """Starts JAX's multi-process runtime; call it before any JAX computation. On CPU the collectives go
  through gloo (jax's CPU default has none across processes). Waits up to ``timeout_s`` for every
  process to join; a process that cannot is told so in one line."""
  check_settings(coordinator_address, num_processes, process_id)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id, initialization_timeout=timeout_s)
  except RuntimeError as e:  # jax already started, or the coordinator unreachable
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserInputError(f"process {process_id}: could not join the {num_processes}-process run at "
                         f"{coordinator_address} ({first[:200]}); start every process with the same "
                         "--coordinator-address and --num-processes, each with its own --process-id") from None


def is_primary() -> bool:
  """Whether this process writes the run's records (process 0; the only process of a one-process run)."""
  return jax.process_index() == 0
