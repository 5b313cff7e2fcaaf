"""Run settings as frozen dataclasses: each option is declared once, as a field, and the CLI is built from it.

    @dataclasses.dataclass(frozen=True)
    class TrainConfig:
      epochs: int = option(100, "passes over the training set", group="training", minimum=1)
      learning_rate: float = option(1e-3, "Adam step size", flag="--lr", group="training")

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)            # --epochs, --lr, grouped, typed, with help
    config = TrainConfig(**set_fields(TrainConfig, parser.parse_args()))

A field's metadata says how it appears on the command line (flag, choices, group, help) and whether a
resumed run must share it (``resume``): ``resume_fingerprint`` derives the resume check from that
instead of a hand-kept list.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, Callable, Sequence

__all__ = ["INT_MAX", "add_config_arguments", "check_ranges", "option", "resume_fingerprint", "set_fields"]

_NO_CLI = "no_cli"
# The ceiling of an integer setting that declares no maximum of its own: counts (rounds, epochs, sizes) end
# up in JAX's int32 arithmetic and shapes, where a larger value overflowed deep inside a compiled program
# (a 43-line traceback for --rounds 1000000000000) instead of being refused here.
INT_MAX = 2**31 - 1


def option(default: Any, help: str, *, flag: str | None = None, aliases: Sequence[str] = (), group: str = "run",
           choices: Sequence[Any] | None = None, resume: bool = True, const: Any = None,
           minimum: float | None = None, maximum: float | None = None, above: float | None = None,
           default_help: str | None = None, cli: bool = True) -> Any:
  """A dataclass field with its CLI description.

  flag: the option's name (default ``--field-name``); aliases: more names for it.
  group: the ``--help`` section it is listed under.
  resume: whether a resumed run must have the same value (False for settings that change how a run
    is carried out, not what it computes: the number of rounds, logging cadence, device layout).
  const: the option takes no value and stores ``const`` (e.g. ``--bf16`` storing "bfloat16").
  minimum/maximum (inclusive) and above (exclusive): range checks of a numeric value.
  default_help: what ``--help`` says the default is, where it is not the field's default.
  cli: False keeps the field off the command line (set from code only).
  """
  metadata = {"help": help, "flag": flag, "aliases": tuple(aliases), "group": group, "choices": choices,
              "resume": resume, "const": const, "minimum": minimum, "maximum": maximum, "above": above,
              "default_help": default_help, _NO_CLI: not cli}
  return dataclasses.field(default=default, metadata=metadata)


def _flag(field: dataclasses.Field) -> str:
  return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _base_type(annotation) -> tuple[type, bool]:
  """(type, optional) of an annotation such as ``int``, ``float | None`` or ``tuple[int, ...]``."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _base_type(args[0])[0], True
  return annotation, False


def _comma_separated(item_type: type, example: tuple = ()) -> Callable[[str], tuple]:
  """A parser of ``text`` such as "256,128"; its error message shows ``example`` (e.g. the default)."""
  example_text = ",".join(map(str, example or (1, 2)))

  def parse(text: str) -> tuple:
    try:
      return tuple(item_type(t) for t in text.split(",") if t.strip())
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"expected comma-separated {item_type.__name__}s such as {example_text}, got {text!r}") from None
  parse.__name__ = f"comma-separated {item_type.__name__}s"
  return parse


def _finite(kind: type) -> Callable[[str], Any]:
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
      raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
  parse.__name__ = kind.__name__
  return parse


def _cli_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
  hints = typing.get_type_hints(cls)
  return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata and not f.metadata[_NO_CLI]]


def _default_text(meta, kind, shown) -> str:
  """What ``--help`` gives as an option's default: its ``default_help``, else the value as typed."""
  if meta["default_help"] is not None:
    return meta["default_help"]
  if meta["const"] is not None:  # a switch such as --bf16 storing "bfloat16"
    return "on" if shown == meta["const"] else "off"
  if kind is bool:
    return "on" if shown else "off"
  if shown is None:
    return "unset"  # argparse's own "(default: None)" read as if None were a value to type
  return ",".join(map(str, shown)) if isinstance(shown, tuple) else str(shown)


def add_config_arguments(parser: argparse.ArgumentParser, cls, *, defaults: dict | None = None,
                         choices: dict[str, Sequence[Any]] | None = None,
                         exclude: Sequence[str] = ()) -> dict[str, argparse._ArgumentGroup]:
  """Adds one option per field of ``cls`` (grouped by ``group``), every argparse default None so that
  ``set_fields`` can tell what the user set.

  defaults: values that ``--help`` shows instead of the fields' own (e.g. a preset's).
  choices: allowed values known only above the config's layer (e.g. the registered task names).
  Returns the argument groups by name, for options that are not settings to join them.
  """
  groups: dict[str, argparse._ArgumentGroup] = {}
  for field, annotation in _cli_fields(cls):
    if field.name in exclude:
      continue
    meta = field.metadata
    kind, _ = _base_type(annotation)
    group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
    shown = (defaults or {}).get(field.name, field.default)
    help_text = f"{meta['help']} (default: {_default_text(meta, kind, shown)})"
    kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": help_text}
    names = [_flag(field), *meta["aliases"]]
    if meta["const"] is not None:
      kwargs.update(action="store_const", const=meta["const"])
    elif kind is bool:
      kwargs.update(action=argparse.BooleanOptionalAction)
    else:
      if typing.get_origin(kind) is tuple:
        kwargs["type"] = _comma_separated(typing.get_args(kind)[0], shown or ())
      elif kind in (int, float):
        kwargs["type"] = _finite(kind)
      else:
        kwargs["type"] = kind
      allowed = (choices or {}).get(field.name, meta["choices"])
      if allowed is not None:
        kwargs["choices"] = list(allowed)
    group.add_argument(*names, **kwargs)
  return groups


def set_fields(cls, args: argparse.Namespace) -> dict[str, Any]:
  """The fields of ``cls`` that the command line set (argparse value not None)."""
  names = {f.name for f, _ in _cli_fields(cls)}
  return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _number_text(bound) -> str:
  return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int_field(annotation) -> bool:
  kind, _ = _base_type(annotation)
  return kind is int or (typing.get_origin(kind) is tuple and typing.get_args(kind)[:1] == (int,))


def check_ranges(config) -> None:
  """Raises ValueError naming the option (as typed on the command line) whose value is out of range:
  NaN and infinities always (every comparison with NaN is False, so a bound alone lets it through),
  and the field's bounds; a tuple such as ``--hidden 256,128`` is checked element by element. An
  integer field without a maximum of its own is bounded by ``INT_MAX`` (int32)."""
  hints = typing.get_type_hints(type(config))
  for field in dataclasses.fields(config):
    meta, value = field.metadata, getattr(config, field.name)
    values = value if isinstance(value, tuple) else (value,)
    low, high, above = meta.get("minimum"), meta.get("maximum"), meta.get("above")
    ceiling = INT_MAX if high is None and _is_int_field(hints.get(field.name)) else None
    for item in filter(_is_number, values):
      finite = isinstance(item, int) or math.isfinite(item)  # (a huge int would overflow isfinite)
      if ceiling is not None and finite and item > ceiling:
        high = ceiling  # named only where it is what the value broke
      if finite and (low is None or item >= low) and (high is None or item <= high) and (above is None or item > above):
        continue
      bounds = [f"{op} {_number_text(b)}" for op, b in ((">=", low), (">", above), ("<=", high)) if b is not None]
      each, got = (" each", ",".join(map(str, value))) if isinstance(value, tuple) else ("", repr(value))
      raise ValueError(f"{_flag(field)} must{each} be a finite number {' and '.join(bounds)}, "
                       f"got {got}")


def resume_fingerprint(config) -> tuple[dict, dict]:
  """``(fingerprint, defaults)``: the settings a resumed run must share with the run that wrote the
  checkpoint (every field whose metadata does not say ``resume=False``), and their defaults.

  A setting missing from an older checkpoint's fingerprint did not exist when it was written, so
  that run used what is now the default: the checkpointer accepts it when the new value is the default.
  """
  fingerprint, defaults = {}, {}
  for field in dataclasses.fields(config):
    if field.metadata.get("resume", True):
      fingerprint[field.name] = getattr(config, field.name)
      defaults[field.name] = field.default
  return fingerprint, defaults
