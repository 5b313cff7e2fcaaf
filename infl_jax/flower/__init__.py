"""INFL sites on Flower: the same federated round deployed as a Flower ServerApp and ClientApp (docs/design.md,
"Deploying on Flower").

Each site (a Flower SuperNode) holds its own data and key file and trains with the simulation's jit-compiled
``client_update`` (``site.py``); the ServerApp (``server_app.py``) samples, aggregates with the engine's
``server_update`` and checkpoints with ``runkit.checkpoint``. ``client_app.py`` is the ClientApp, ``records.py``
the pytree <-> Flower record conversion and the server-side key-bytes audit, ``secagg.py`` the SecAgg+ path and
``local.py`` the console commands (one machine: a SuperLink and its SuperNodes as local processes).

flwr is imported only by the modules that need it (``pip install 'infl-jax[flower]'``), so ``import infl_jax``
works without it.
"""
