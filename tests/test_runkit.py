"""runkit: configs declared once (dataclass fields -> CLI, ranges, resume fingerprint) and checkpoints
that resume across a setting added later."""

import argparse
import dataclasses

import numpy as np
import pytest

from infl_jax.config import TrainConfig
from infl_jax.main import build_parser, main
from runkit.checkpoint import CheckpointError, Checkpointer
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
