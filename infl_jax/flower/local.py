"""Console commands: run an INFL app on a Flower SuperLink (``infl-flower-run``), and a whole federation on one
machine (``infl-flower-local``: a SuperLink and one SuperNode per site as local processes, loopback only).

The Flower app that ``flwr run`` ships is generated (``write_app``): a ``pyproject.toml`` naming this package's
ServerApp and ClientApp, with the run config keys of ``settings.RUN_DEFAULTS``. The sites and the SuperLink import
``infl_jax`` from their own environment, so the app carries no code.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from infl_jax.flower.settings import RUN_DEFAULTS
from runkit.cli import ArgumentParser, run_cli
from runkit.errors import UserInputError

__all__ = ["LocalFederation", "failure_cause", "flower_command", "free_port", "free_ports", "run_app", "write_app",
           "write_connection"]


def _toml_value(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (int, float)):
    return repr(value)
  return json.dumps(str(value))


def write_app(directory) -> pathlib.Path:
  """The Flower app folder ``flwr run`` builds its FAB from."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  config = "\n".join(f"{k} = {_toml_value(v)}" for k, v in RUN_DEFAULTS.items())
  (directory / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "infl-flower"
version = "1.0.0"
description = "INFL (infl_jax) on Flower: keyed federated classification"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "infl-jax"

[tool.flwr.app.components]
serverapp = "infl_jax.flower.server_app:app"
clientapp = "infl_jax.flower.client_app:app"

[tool.flwr.app.config]
{config}
""")
  return directory


def write_connection(flwr_home, address: str, name: str = "infl") -> pathlib.Path:
  """A Flower CLI config (``$FLWR_HOME/config.toml``) whose default SuperLink connection is ``address`` (insecure:
  for loopback or a private network only)."""
  home = pathlib.Path(flwr_home)
  home.mkdir(parents=True, exist_ok=True)
  path = home / "config.toml"
  path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\ninsecure = true\n')
  return path


def free_ports(count: int) -> list[int]:
  """``count`` distinct free loopback ports (all held open while drawn, so no two are the same)."""
  with contextlib.ExitStack() as stack:
    socks = [stack.enter_context(socket.socket()) for _ in range(count)]
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]


def free_port() -> int:
  return free_ports(1)[0]


def _descendants(pid: int) -> list[int]:
  """Every live process below ``pid`` (children, their children, ...), read from /proc; [] where there is none."""
  children: dict[int, list[int]] = {}
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    with contextlib.suppress(OSError, ValueError, IndexError):
      fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
      children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
  found, todo = [], [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      found.append(child)
      todo.append(child)
  return found


def flower_command(name: str) -> str:
  """The path of Flower's console command ``name`` (``flower-superlink``, ``flower-supernode``, ``flwr``): beside
  the running Python first, then on PATH.

  pip puts an environment's console scripts beside its python, so ``venv/bin/python -m ...`` finds a venv's Flower
  without the venv activated (its folder is then not on PATH). In a venv ``sys.executable`` is a symbolic link to
  the base interpreter: the link's own folder is the venv's, so it is not resolved.
  """
  here = os.path.dirname(os.path.abspath(sys.executable)) if sys.executable else ""
  # No empty entry: shutil.which would read it as the current folder.
  folders = [f for f in [here, *os.environ.get("PATH", "").split(os.pathsep)] if f]
  found = shutil.which(name, path=os.pathsep.join(folders))
  if found is None:
    raise UserInputError(f"Flower's {name} command is neither beside {sys.executable} nor on PATH; install the"
                         " flower extra into this Python's environment: pip install 'infl-lsanet-jax[flower]'")
  return found


def _path_with(folders: Sequence[str], path: str) -> str:
  """``path`` (a PATH value) with ``folders`` first, each once."""
  entries = [*folders, *path.split(os.pathsep)]
  return os.pathsep.join(dict.fromkeys(f for f in entries if f))


def _run_config_arg(run_config: dict) -> str:
  return " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())


def _flwr_run_command(app_dir, run_config: dict) -> list[str]:
  cmd = [flower_command("flwr"), "run", str(app_dir), "--stream"]
  if run_config:
    cmd += ["--run-config", _run_config_arg(run_config)]
  return cmd


def run_app(app_dir, run_config: dict, *, flwr_home, timeout: float = 600.0, log=None) -> None:
  """``flwr run`` of the app against the connection in ``flwr_home``, streaming its logs to ``log``; returns when
  the run ends (a failed run raises)."""
  env = dict(os.environ, FLWR_HOME=str(flwr_home))
  out = subprocess.run(_flwr_run_command(app_dir, run_config), env=env, stdout=log or subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout, text=True)
  if out.returncode != 0:
    raise RuntimeError(f"flwr run exited with {out.returncode}" + (f": {out.stdout[-2000:]}" if out.stdout else ""))


# A traceback's last line, "RuntimeError: query: a site failed (...)", after Flower's colour codes are removed.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception)): (.+)")
# How Flower quotes a site's exception in its error reply: "<class 'pkg.mod.KeyFileError'>:<'no key file at ...'>".
_FLOWER_REASON = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>:<['\"](.*)['\"]>")


def failure_cause(log_text: str) -> str | None:
  """The last exception line of a ``flwr run --stream`` log (what the ServerApp raised, a site's failure
  included), as ``Type: message`` with Flower's quoting of a site's exception undone; None where there is none."""
  for line in reversed(_ANSI.sub("", log_text).splitlines()):
    match = _EXCEPTION_LINE.fullmatch(line.strip())
    if match:
      return _FLOWER_REASON.sub(r"\1: \2", f"{match.group(1)}: {match.group(2)}")
  return None


# The app declares no dependencies and the server runs infl_jax from its own environment: without this flag (a
# SuperLink's default in flwr 1.42; SuperNodes default to off) the ServerApp first builds a fresh one with ``uv sync``.
_NO_RUNTIME_INSTALL = ("--disable-runtime-dependency-installation",)


class LocalFederation:
  """A SuperLink and SuperNodes as local processes on 127.0.0.1 (insecure, free ports), stopped on exit.

  ``sites``: one node config dict per SuperNode. Logs go to ``logdir``. ``stop_superlink(kill=True)``, then
  ``stop_supernodes``, ``start_superlink`` and ``start_supernodes`` crash and restart the server mid-run: the
  SuperLink keeps its state in memory, so the SuperNodes start again with it.
  """

  def __init__(self, sites: Sequence[dict], logdir, *, env: dict | None = None):
    self.sites = list(sites)
    self.logdir = pathlib.Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    # SuperExec's 1 s between task polls is paid per message at every site; on loopback a tenth is cheap.
    self.env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1", **os.environ, **(env or {})}
    self.port, *self.node_ports = free_ports(1 + len(self.sites))
    self.address = f"127.0.0.1:{self.port}"
    self.superlink = None
    self.supernodes: list[subprocess.Popen] = []
    self.flwr_home = self.logdir / "flwr-home"
    self.env["FLWR_HOME"] = str(self.flwr_home)
    # Resolved before any process starts, so a missing Flower is one line. The SuperLink and SuperNodes start
    # Flower's other commands (flower-superexec, flwr-serverapp, flwr-clientapp) by name from PATH: the folder they
    # were found in goes first there, for an environment that is not activated.
    self.commands = {name: flower_command(name) for name in ("flower-superlink", "flower-supernode")}
    self.env["PATH"] = _path_with([os.path.dirname(c) for c in self.commands.values()], self.env.get("PATH", ""))
    write_connection(self.flwr_home, self.address)

  def _spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
    log = open(self.logdir / f"{name}.log", "a")
    # Own process group: stopping it stops the processes Flower starts under it (SuperExec, app processes).
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

  def start_superlink(self, timeout: float = 30.0) -> None:
    # State in memory: a restarted SuperLink no longer knows the SuperNodes, answers them 401 and they stop, so a
    # server restart restarts them too (``--database FILE`` keeps the state, but on 2 busy cores its SQLite
    # answered "database is locked" to a SuperNode and the run lost that site).
    self.superlink = self._spawn([self.commands["flower-superlink"], "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.port), *_NO_RUNTIME_INSTALL], "superlink")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
        return
      if self.superlink.poll() is not None:
        break
      time.sleep(0.2)
    raise RuntimeError(f"the SuperLink did not start (see {self.logdir / 'superlink.log'})")

  def start_supernodes(self) -> None:
    for i, node_config in enumerate(self.sites):
      cmd = [self.commands["flower-supernode"], "--insecure", "--superlink", self.address, "--host", "127.0.0.1",
             "--port", str(self.node_ports[i]), "--node-config", _run_config_arg(node_config)]
      self.supernodes.append(self._spawn(cmd, f"supernode-{i}"))

  @staticmethod
  def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Sends ``sig`` to the process group of a process this class started, SIGKILL if it outlives ``timeout``."""
    if proc is None or proc.poll() is not None:
      return
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, sig)
    try:
      proc.wait(timeout)
    except subprocess.TimeoutExpired:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
      proc.wait(timeout)

  def stop_superlink(self, *, kill: bool = False) -> None:
    """Stops the SuperLink: SIGTERM to its process group; with ``kill``, SIGKILL to it and to every process it
    started (Flower detaches its SuperExec and the ServerApp processes into their own sessions), which leaves the
    server no chance to clean up, as a crash or a power cut would."""
    if kill and self.superlink is not None and self.superlink.poll() is None:
      for pid in _descendants(self.superlink.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
          os.kill(pid, signal.SIGKILL)
    self.stop_process(self.superlink, sig=signal.SIGKILL if kill else signal.SIGTERM)
    self.superlink = None

  def stop_supernodes(self) -> None:
    for proc in self.supernodes:
      self.stop_process(proc)
    self.supernodes = []

  def close(self) -> None:
    self.stop_supernodes()
    self.stop_superlink()

  def check_alive(self) -> None:
    dead = [i for i, p in enumerate(self.supernodes) if p.poll() is not None]
    if dead:
      raise RuntimeError(f"SuperNode(s) {dead} exited (see {self.logdir}/supernode-*.log)")

  def __enter__(self) -> "LocalFederation":
    try:
      self.start_superlink()
      self.start_supernodes()
    except BaseException:
      self.close()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def run(self, app_dir, run_config: dict, timeout: float = 600.0) -> None:
    """``flwr run`` to its end; raises if the ServerApp did not write its ``result.json``, naming the cause (the
    last exception line of this run's streamed log, ``failure_cause``).

    ``flwr run`` exits 0 even when the ServerApp raised (flwr 1.42 reports that only in the streamed log), so the
    result file is what tells a finished run from a failed one; the ServerApp runs here, with this process's cwd.
    """
    result = pathlib.Path(run_config.get("workdir", RUN_DEFAULTS["workdir"])).expanduser() / "result.json"
    log_path = self.logdir / "flwr-run.log"
    started = time.time()
    with open(log_path, "a") as log:
      start = log.tell()
      run_app(app_dir, run_config, flwr_home=self.flwr_home, timeout=timeout, log=log)
    if not result.is_file() or result.stat().st_mtime < started:
      # The cause is in this run's part of the log: the ServerApp's traceback, whose last line names the problem
      # (a site's missing key or data file comes back as the site's exception, quoted in the server's).
      with open(log_path, "rb") as log:
        log.seek(start)
        cause = failure_cause(log.read().decode(errors="replace"))
      raise RuntimeError(f"the ServerApp failed: it wrote no {result} ({f'{cause}; ' if cause else ''}see {log_path})")

  def start_run(self, app_dir, run_config: dict) -> subprocess.Popen:
    """``flwr run`` started in the background (its logs in ``flwr-run.log``); the caller waits for or ends it."""
    return self._spawn(_flwr_run_command(app_dir, run_config), "flwr-run")


# ---------------------------------------------------------------------------------------------------------
# Console commands


def _parse_run_config(items: Sequence[str]) -> dict:
  out = {}
  for item in items:
    if "=" not in item:
      raise UserInputError(f"--run-config {item!r}: write KEY=VALUE, e.g. --run-config rounds=3")
    k, v = item.split("=", 1)
    if k not in RUN_DEFAULTS:
      raise UserInputError(f"--run-config {k}: unknown key; the keys are {', '.join(sorted(RUN_DEFAULTS))}")
    default = RUN_DEFAULTS[k]
    try:
      out[k] = (v.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(v))
    except ValueError:
      raise UserInputError(f"--run-config {k}={v!r}: expected a {type(default).__name__}") from None
  return out


def _run_main(argv: Sequence[str] | None) -> None:
  parser = ArgumentParser(prog="infl-flower-run", description="Run INFL training on a Flower SuperLink whose sites "
                          "(SuperNodes) are up: writes the Flower app and calls `flwr run`.")
  parser.add_argument("--superlink", required=True, help="the SuperLink's address, e.g. 10.0.0.5:9093")
  parser.add_argument("--run-config", nargs="*", default=[], metavar="KEY=VALUE",
                      help=f"run settings ({', '.join(sorted(RUN_DEFAULTS))})")
  parser.add_argument("--app-dir", default=None, help="where to write the Flower app (default: a temporary folder)")
  args = parser.parse_args(argv)
  run_config = _parse_run_config(args.run_config)
  if ":" not in args.superlink:
    raise UserInputError(f"--superlink {args.superlink!r}: give HOST:PORT, e.g. --superlink 10.0.0.5:9093")
  with tempfile.TemporaryDirectory(prefix="infl-flower-") as tmp:
    app_dir = write_app(args.app_dir or pathlib.Path(tmp) / "app")
    home = pathlib.Path(tmp) / "flwr-home"
    write_connection(home, args.superlink)
    run_app(app_dir, run_config, flwr_home=home, timeout=None, log=sys.stdout)


def run_main(argv: Sequence[str] | None = None) -> int:
  return run_cli(_run_main, argv)


def _local_main(argv: Sequence[str] | None) -> None:
  parser = ArgumentParser(prog="infl-flower-local", description="A whole INFL federation on one machine: a Flower "
                          "SuperLink and one SuperNode per site on 127.0.0.1, then the run.")
  parser.add_argument("--site", action="append", required=True, metavar="NODE_CONFIG",
                      help="one site's node config, e.g. 'data=\"proteomics\" partition-id=0 key-file=\"k0.json\"' "
                      "(repeat per site; with --run-config drift-correction=scaffold add state-dir=\"FOLDER\", where "
                      "the site keeps its control variate)")
  parser.add_argument("--run-config", nargs="*", default=[], metavar="KEY=VALUE")
  parser.add_argument("--logdir", required=True, help="folder for the processes' logs")
  args = parser.parse_args(argv)
  run_config = _parse_run_config(args.run_config)
  run_config.setdefault("min-sites", len(args.site))
  sites = []
  for text in args.site:
    node = {}
    for item in shlex.split(text):
      if "=" not in item:
        raise UserInputError(f"--site {text!r}: write KEY=VALUE pairs, e.g. data=\"proteomics\" partition-id=0")
      k, v = item.split("=", 1)
      node[k] = int(v) if v.isdigit() else v
    sites.append(node)
  logdir = pathlib.Path(args.logdir)
  with LocalFederation(sites, logdir) as fed:
    app_dir = write_app(logdir / "app")
    try:
      fed.run(app_dir, run_config)
    except RuntimeError as e:  # a failed run is reported as bad input is: one line, exit status 2
      raise UserInputError(str(e)) from None
  print(f"done: see {run_config.get('workdir', RUN_DEFAULTS['workdir'])}/result.json")


def local_main(argv: Sequence[str] | None = None) -> int:
  return run_cli(_local_main, argv)
