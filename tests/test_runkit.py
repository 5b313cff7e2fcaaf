"""runkit: configs declared once (dataclass fields -> CLI, ranges, resume fingerprint) and checkpoints
that resume across a setting added later."""

import argparse
import dataclasses

import numpy as np
import pytest

from infl_jax.config import TrainConfig
from infl_jax.main import build_parser, main
from runkit.checkpoint import CheckpointError, Checkpointer
from runkit.cli import CACHE_ENV, enable_compilation_cache, workdir_transaction
from runkit.config import add_config_arguments, check_ranges, option, resume_fingerprint, set_fields


@dataclasses.dataclass(frozen=True)
class Settings:
  epochs: int = option(10, "passes over the data", group="training", minimum=1)
  rate: float = option(0.1, "step size", flag="--lr", group="training", above=0)
  sizes: tuple[int, ...] = option((4, 2), "layer widths")
  mode: str = option("fast", "how", choices=("fast", "slow"))
  extra: bool = option(False, "an extra pass")
  dtype: str = option("float32", "bf16 compute", flag="--bf16", const="bfloat16")
  name: str | None = option(None, "a name", resume=False)


def _parse(argv):
  parser = argparse.ArgumentParser()
  add_config_arguments(parser, Settings)
  return Settings(**set_fields(Settings, parser.parse_args(argv)))


def test_the_cli_is_built_from_the_fields():
  assert _parse([]) == Settings()
  s = _parse(["--epochs", "3", "--lr", "0.5", "--sizes", "8,4,2", "--mode", "slow", "--extra", "--bf16",
              "--name", "a"])
  assert s == Settings(epochs=3, rate=0.5, sizes=(8, 4, 2), mode="slow", extra=True, dtype="bfloat16", name="a")
  assert _parse(["--no-extra"]).extra is False


@pytest.mark.parametrize("argv", [["--mode", "medium"], ["--epochs", "x"], ["--lr", "nan"], ["--sizes", "4,b"]])
def test_bad_values_are_refused_by_the_parser(argv):
  with pytest.raises(SystemExit) as exit_info:
    _parse(argv)
  assert exit_info.value.code == 2


def test_ranges_name_the_flag():
  check_ranges(Settings())
  with pytest.raises(ValueError, match=r"--epochs must be a finite number >= 1, got 0"):
    check_ranges(Settings(epochs=0))
  with pytest.raises(ValueError, match=r"--lr must be a finite number > 0"):
    check_ranges(Settings(rate=0.0))


def test_resume_fingerprint_leaves_out_what_does_not_change_the_result():
  fingerprint, defaults = resume_fingerprint(Settings(epochs=3, name="x"))
  assert fingerprint == {"epochs": 3, "rate": 0.1, "sizes": (4, 2), "mode": "fast", "extra": False, "dtype": "float32"}
  assert defaults["epochs"] == 10
  infl, _ = TrainConfig().resume_fingerprint()
  # Operational settings may change between a run and its resume; nothing about the key but its version.
  assert not {"rounds", "key_seed", "key_mode", "eval_every", "checkpoint_every", "keep_checkpoints",
              "central_baseline", "shard_clients"} & set(infl)
  assert {"key_version", "learning_rate", "compute_dtype", "dataset", "task"} <= set(infl)


def test_a_setting_added_later_resumes_at_its_default(tmp_path):
  state = {"w": np.arange(3, dtype=np.float32)}
  with Checkpointer(tmp_path, config={"lr": 0.1}) as old:  # written before "dtype" existed
    old.save(1, state, force=True)
  with Checkpointer(tmp_path, config={"lr": 0.1, "dtype": "float32"}, config_defaults={"dtype": "float32"}) as new:
    restored, _ = new.restore(state)
  np.testing.assert_array_equal(restored["w"], state["w"])
  with Checkpointer(tmp_path, config={"lr": 0.1, "dtype": "bfloat16"}, config_defaults={"dtype": "float32"}) as new:
    with pytest.raises(CheckpointError, match="dtype: saved 'float32' vs now 'bfloat16'"):
      new.restore(state)


def test_infl_train_help_lists_every_setting_once():
  text = build_parser().format_help()
  for field in dataclasses.fields(TrainConfig):
    flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
    if field.metadata.get("no_cli"):  # set by the run itself (the key's fingerprint), not by the user
      assert flag not in text, flag
      continue
    assert flag in text, flag
  assert "(default: None)" not in text


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be a finite number >= 1"),
    (["--client-fraction", "0"], "--client-fraction must be a finite number > 0"),
    (["--batch-size", "0"], "--batch-size must be a finite number >= 1"),
    (["--local-epochs", "-1"], "--local-epochs must be a finite number >= 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be a finite number >= 1"),
])
def test_infl_train_out_of_range_settings_exit_2_before_touching_the_workdir(tmp_path, capsys, argv, message):
  workdir = tmp_path / "run"
  assert main(argv + ["--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0]
  assert not workdir.exists()


def test_ranges_refuse_nan_infinity_and_bad_tuple_items():
  with pytest.raises(ValueError, match=r"--lr must be a finite number > 0, got nan"):
    check_ranges(Settings(rate=float("nan")))
  with pytest.raises(ValueError, match=r"--epochs must be a finite number >= 1, got inf"):
    check_ranges(Settings(epochs=float("inf")))

  @dataclasses.dataclass(frozen=True)
  class Widths:
    hidden: tuple[int, ...] = option((4,), "widths", minimum=1)
    seed: int = option(0, "seed", minimum=0, maximum=2**32 - 1)

  check_ranges(Widths(hidden=(8, 1), seed=2**32 - 1))
  with pytest.raises(ValueError, match=r"--hidden must each be a finite number >= 1, got 8,0"):
    check_ranges(Widths(hidden=(8, 0)))
  with pytest.raises(ValueError, match=r"--seed must be a finite number >= 0 and <= 4294967295, got 1000"):
    check_ranges(Widths(seed=10**400))  # too large for a float: no OverflowError


def test_help_shows_every_default_once():
  parser = argparse.ArgumentParser()
  add_config_arguments(parser, Settings)
  helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
  assert all(h.count("(default:") == 1 for h in helps.values()), helps
  assert helps["sizes"].endswith("(default: 4,2)") and helps["name"].endswith("(default: unset)")
  assert helps["dtype"].endswith("(default: off)") and helps["extra"].endswith("(default: off)")


def _tree(folder):
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_failed_run_takes_back_what_it_created(tmp_path):
  work = tmp_path / "w"
  (work / "old").mkdir(parents=True)
  (work / "old" / "a.txt").write_text("a")
  before = _tree(work)
  with pytest.raises(RuntimeError), workdir_transaction(work):
    (work / "old" / "b.txt").write_text("new file in an old folder")
    (work / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)  # an unfinished save
    (work / "metrics.jsonl").write_text("{}")
    raise RuntimeError("bad data")
  assert _tree(work) == before
  # A folder (with parents) the run created goes too.
  with pytest.raises(KeyError), workdir_transaction(tmp_path / "new" / "deep" / "w", create=True) as created:
    (created / "key").write_text("k")
    raise KeyError("x")
  assert not (tmp_path / "new").exists()


def test_a_failed_run_keeps_everything_once_a_checkpoint_exists(tmp_path):
  work = tmp_path / "w"
  with pytest.raises(RuntimeError), workdir_transaction(work, create=True):
    (work / "client_secret.key").write_text("k")
    (work / "checkpoints" / "5").mkdir(parents=True)
    raise RuntimeError("round 7 failed")
  assert _tree(work) == ["checkpoints", "checkpoints/5", "client_secret.key"]


def test_a_failed_run_gives_files_outside_the_workdir_their_former_state(tmp_path):
  kept, made = tmp_path / "kept.key", tmp_path / "made.key"
  kept.write_bytes(b"old")
  kept.chmod(0o600)
  with pytest.raises(RuntimeError), workdir_transaction(tmp_path / "w", files=[kept, made]):
    kept.write_bytes(b"new")
    made.write_bytes(b"new")
    raise RuntimeError("x")
  assert kept.read_bytes() == b"old" and kept.stat().st_mode & 0o777 == 0o600 and not made.exists()
  with workdir_transaction(tmp_path / "w", files=[kept]):  # a run that succeeds keeps its writes
    kept.write_bytes(b"new")
  assert kept.read_bytes() == b"new"


def test_a_corrupted_checkpoint_is_named_in_one_short_message(tmp_path):
  state = {"w": np.arange(300, dtype=np.float32), "b": {"x": np.ones((4, 5), np.float32)}}
  with Checkpointer(tmp_path, config={"lr": 0.1}) as ckpt:
    ckpt.save(1, state, force=True)
    ckpt.save(2, state, force=True)
  for path in (tmp_path / "2").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[:5])
  with Checkpointer(tmp_path, config={"lr": 0.1}) as ckpt:
    with pytest.raises(CheckpointError) as error:
      ckpt.restore(state)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and len(message) < 400, message
    assert str(tmp_path / "2") in message and "corrupted" in message and "tensorstore_spec" not in message
    assert "previous checkpoint (step 1)" in message
    restored, _ = ckpt.restore(state, step=1)  # the earlier one still reads
  np.testing.assert_array_equal(restored["w"], state["w"])


@pytest.fixture
def jax_cache_config():
  """Restores JAX's cache settings (and makes it reopen its folder) after a test changed them."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  saved = {k: getattr(jax.config, k) for k in keys}
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


def test_compilation_cache_fills_the_folder_it_is_given(tmp_path, monkeypatch, jax_cache_config):
  import jax
  import jax.numpy as jnp
  monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
  folder = enable_compilation_cache(min_compile_time_secs=0)
  assert folder == tmp_path / "cache" and jax.config.jax_compilation_cache_dir == str(folder)
  jax.jit(lambda x: jnp.sin(x) * 3.25 + 0.5)(jnp.arange(11.0)).block_until_ready()
  assert any(folder.iterdir())


def test_compilation_cache_folder_and_off_switches(tmp_path, monkeypatch, capsys, jax_cache_config):
  import jax
  jax.config.update("jax_compilation_cache_dir", None)
  monkeypatch.delenv(CACHE_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert enable_compilation_cache() == tmp_path / "xdg" / "infl-lsanet-jax" / "jax"
  jax.config.update("jax_compilation_cache_dir", None)
  assert enable_compilation_cache(enabled=False) is None
  monkeypatch.setenv(CACHE_ENV, "off")
  assert enable_compilation_cache() is None and jax.config.jax_compilation_cache_dir is None
  # A folder that cannot be made (here under a file; a read-only home alike) leaves the cache off.
  (tmp_path / "file").write_text("")
  monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file" / "cache"))
  assert enable_compilation_cache() is None and jax.config.jax_compilation_cache_dir is None
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("warning: compilation cache off")
