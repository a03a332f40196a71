"""Flags: a command's own options, and ``--a.b value`` overrides of the frozen config tree.

tyro types and parses the overrides; this module checks the flag names first
and turns tyro's error box into one line, so a misspelt field or a bad value
is reported like any other bad input.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import re
import typing
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from kdjax.cli.exits import CliError
from kdjax.config import Experiment, ModelConfig
from kdjax.errors import ConfigError

# ---------------------------------------------------------------------------
# A command's own options, taken out of its argument list before the overrides are parsed


def pop_opt(args: list[str], flag: str, default=None, multi: bool = False, is_bool: bool = False):
  """Remove ``flag VALUE`` / ``flag=VALUE`` (or a bare ``flag`` when ``is_bool``) from ``args``.

  Returns the last value (or ``default``), or every value when ``multi``.
  """
  vals, out, i = [], [], 0
  while i < len(args):
    a = args[i]
    if a == flag:
      if is_bool:
        vals.append(True)
        i += 1
        continue
      if i + 1 >= len(args):
        raise CliError(f"{flag} needs a value")
      vals.append(args[i + 1])
      i += 2
    elif a.startswith(flag + "="):
      vals.append(a.split("=", 1)[1])
      i += 1
    else:
      out.append(a)
      i += 1
  args[:] = out
  if multi:
    return vals
  return vals[-1] if vals else default


def int_opt(args: list[str], flag: str, default: int, minimum: int = 0) -> int:
  """Remove ``flag N`` from ``args``: an integer ≥ ``minimum``."""
  v = pop_opt(args, flag)
  if v is None:
    return default
  try:
    n = int(v)
  except ValueError:
    raise CliError(f"{flag} expects an integer, got {v!r}") from None
  if n < minimum:
    raise CliError(f"{flag} must be ≥ {minimum}, got {n}")
  return n


def workdir_alias(rest: list[str]) -> None:
  """``--workdir DIR`` is shorthand for ``--run.workdir DIR``."""
  for i, a in enumerate(rest):
    if a == "--workdir":
      rest[i] = "--run.workdir"
    elif a.startswith("--workdir="):
      rest[i] = "--run.workdir=" + a.split("=", 1)[1]


# ---------------------------------------------------------------------------
# Config overrides: `--a.b value` on the frozen dataclass tree (tyro does the typing)


def field_paths(cls: type, prefix: str = "") -> dict[str, Any]:
  """Every leaf field of a config dataclass tree by its dotted path, with its type."""
  out: dict[str, Any] = {}
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    t = hints[f.name]
    name = prefix + f.name
    if isinstance(f.default, object) and dataclasses.is_dataclass(f.default):
      out.update(field_paths(type(f.default), name + "."))
    else:
      out[name] = t
  return out


def _check_flags(args: Sequence[str]) -> None:
  """Refuse a flag that names no field, suggesting the nearest one (tyro's own message is a page)."""
  paths = field_paths(Experiment)
  for a in args:
    if a.startswith("--"):
      key = a[2:].split("=", 1)[0].replace("-", "_")
      if key in ("help", "h"):
        continue
      head, _, leaf = key.rpartition(".")
      negated = (f"{head}." if head else "") + leaf.removeprefix("no_")
      if leaf.startswith("no_") and paths.get(negated) is bool:  # tyro's --run.no-quiet form
        continue
      if key not in paths:
        near = difflib.get_close_matches(key, list(paths), n=1)
        hint = f"; did you mean --{near[0]}?" if near else "; see --help for the fields"
        raise CliError(f"unknown flag --{key}{hint}")


def _tyro_message(text: str) -> str:
  """The one-line gist of tyro's error box (unicode, ASCII or plain layout).

  The box is split into sections at its rules; the title ("Value error") is
  skipped and the first section that says something is returned, with tyro's
  "Error parsing optim: " prefix removed when the message names the field.
  """
  sections, cur = [], []
  for line in text.splitlines():
    s = line.strip(" │╭╰╮╯|+")
    if not s.strip("─-") or s.startswith(("─", "-")):  # a rule or the title bar: a new section
      sections.append(cur)
      cur = []
    else:
      cur.append(s)
  sections.append(cur)
  said = [" ".join(sec) for sec in sections if any(c in " ".join(sec) for c in ":'\".")]
  msg = said[0].removeprefix("Error parsing ") if said else ""
  m = re.match(r"^[A-Za-z_][\w.]*: ([a-z_][\w./]*: .*)$", msg)  # "optim: optim.lr: must be > 0" → the inner part
  return m.group(1) if m else msg


def _model_list(values: Sequence[str], flag: str) -> tuple[ModelConfig, ...]:
  """``NAME`` or ``NAME=CHECKPOINT`` items → ``ModelConfig``s (for ``--extra_teachers``)."""
  out = []
  for v in values:
    name, _, path = v.partition("=")
    if not name:
      raise CliError(f"{flag} expects NAME or NAME=CHECKPOINT items, got {v!r}")
    out.append(ModelConfig(name=name, checkpoint=path or None))
  return tuple(out)


def _pop_model_list(args: list[str], cfg: Experiment) -> Experiment:
  """Take ``--extra_teachers A=DIR B=DIR …`` (a tuple of models tyro cannot parse) out of ``args``."""
  for i, a in enumerate(args):
    key = a[2:].split("=", 1)[0].replace("-", "_") if a.startswith("--") else ""
    if key == "extra_teachers":
      j = i + 1
      vals = [a.split("=", 1)[1]] if "=" in a else []  # --extra_teachers=NAME[=DIR]
      while j < len(args) and not args[j].startswith("--"):
        vals.append(args[j])
        j += 1
      del args[i:j]
      try:
        return _pop_model_list(args, dataclasses.replace(cfg, extra_teachers=_model_list(vals, "--extra_teachers")))
      except ConfigError as e:  # a model the config refuses
        raise CliError(str(e)) from None
  return cfg


def apply_overrides(cfg: Experiment, args: Sequence[str]) -> Experiment:
  """``cfg`` with ``--field.path value`` overrides applied (tyro parses).

  ``--extra_teachers NAME[=CHECKPOINT] …`` (a tuple of models) is parsed here.
  """
  import tyro

  args = list(args)
  cfg = _pop_model_list(args, cfg)
  if not args:
    return cfg
  if "--help" in args or "-h" in args:
    return tyro.cli(Experiment, default=cfg, args=args)
  _check_flags(args)
  err = io.StringIO()
  try:
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
      return tyro.cli(Experiment, default=cfg, args=args)
  except SystemExit:
    raise CliError(_tyro_message(err.getvalue()) or f"bad arguments {' '.join(args)!r}; see --help") from None
  except ConfigError as e:  # __post_init__ validation
    raise CliError(str(e)) from None
