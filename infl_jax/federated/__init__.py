"""The federated engine: clients stacked on a leading axis, local training scanned, vmapped and jitted.

A federated algorithm is a pair of pure functions, like an optax transformation:

    algo = fedavg(task, client_optimizer=optax.adam(5e-4), batch_size=100)
    server_state = algo.init(variables, rng)
    server_state, metrics = jax.jit(algo.round)(server_state, clients, context)

``algorithm_from_config`` builds ``algo`` from run settings and ``run_rounds`` is the one round
loop (metrics, checkpoints, resume). Across devices, the same round takes ``shard_clients(clients, client_mesh())`` instead of
``clients`` (see ``sharding.py``).
"""

from infl_jax.federated.aggregate import weighted_mean
from infl_jax.federated.builder import algorithm_from_config, client_optimizer_from_config
from infl_jax.federated.client_data import ClientData, stack_clients
from infl_jax.federated.engine import (FederatedAlgorithm, RoundKeys, ServerState, cosine_round_schedule,
                                      fedavg, global_variables, round_keys, scaffold, server_optimizer)
from infl_jax.federated.local import LocalConfig, client_update, corrected_client_update
from infl_jax.federated.loop import RoundsResult, RunDir, TrainingDiverged, jit_round, run_rounds
from infl_jax.federated.sharding import CLIENT_AXIS, ShardedClientData, client_mesh, shard_clients
from infl_jax.federated.task import Task

__all__ = [
    "CLIENT_AXIS",
    "ClientData",
    "FederatedAlgorithm",
    "LocalConfig",
    "RoundKeys",
    "RoundsResult",
    "RunDir",
    "ServerState",
    "ShardedClientData",
    "Task",
    "TrainingDiverged",
    "algorithm_from_config",
    "client_optimizer_from_config",
    "client_mesh",
    "client_update",
    "corrected_client_update",
    "cosine_round_schedule",
    "fedavg",
    "global_variables",
    "jit_round",
    "round_keys",
    "run_rounds",
    "scaffold",
    "server_optimizer",
    "shard_clients",
    "stack_clients",
    "weighted_mean",
]
