"""Experiment files: found by path or short name, their named configs, and the config a command line asks for.

The experiments kdjax ships are the package ``kdjax.experiments`` (in a source
checkout, the top-level ``experiments/`` folder), so a short name such as
``mnist1d_kd`` resolves the same from a checkout and from an installed wheel.
"""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

from kdjax.cli.exits import CliError
from kdjax.cli.flags import apply_overrides, workdir_alias
from kdjax.config import Experiment

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


def load_experiment(ref: str) -> types.ModuleType:
  """Import an experiment file by path or short name."""
  cands = [
    Path(ref),
    Path(ref + ".py"),
    EXPERIMENTS_DIR / ref,
    EXPERIMENTS_DIR / (ref + ".py"),
    Path("experiments") / (ref + ".py"),
  ]
  path = next((c for c in cands if c.is_file()), None)
  if path is None:
    known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.py")) if EXPERIMENTS_DIR.is_dir() else []
    raise CliError(f"unknown experiment {ref!r}; known: {', '.join(known)} (or pass a path to a .py file)")
  spec = importlib.util.spec_from_file_location(f"kdjax_experiment_{path.stem}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def config_names(mod: types.ModuleType) -> list[str]:
  """The experiment's named configs (``CONFIGS``), in file order."""
  return list(getattr(mod, "CONFIGS", {}).keys())


def base_config(mod: types.ModuleType, name: str | None) -> Experiment:
  """The named config ``name``, else ``get_config()``, else the first of ``CONFIGS`` — checked to be an
  :class:`~kdjax.config.Experiment`."""
  configs = getattr(mod, "CONFIGS", None)
  if name:
    if not configs or name not in configs:
      known = ", ".join(config_names(mod)) or "(only the default)"
      raise CliError(f"experiment {_short(mod)!r} has no config {name!r}; available: {known}")
    return _experiment(mod, configs[name], f"CONFIGS[{name!r}]")
  if hasattr(mod, "get_config"):
    return _experiment(mod, mod.get_config, "get_config()")
  if configs:
    first = next(iter(configs))
    return _experiment(mod, configs[first], f"CONFIGS[{first!r}]")
  raise CliError(f"{mod.__file__} defines neither get_config() nor CONFIGS")


def _short(mod: types.ModuleType) -> str:
  return mod.__name__.removeprefix("kdjax_experiment_")


def _experiment(mod: types.ModuleType, made, what: str) -> Experiment:
  """``made`` (called if callable) when it is an Experiment; else one line naming the file and what it gave."""
  cfg = made() if callable(made) else made
  if not isinstance(cfg, Experiment):
    raise CliError(
      f"experiment {mod.__file__}: {what} gave {type(cfg).__name__} {_brief(cfg)}, not a kdjax.config.Experiment; "
      f"return one (e.g. kdjax.config.Experiment(...) or a .replace(...) of one)"
    )
  return cfg


def _brief(value) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def split_exp_args(argv: list[str]) -> tuple[str, str | None, list[str]]:
  """``EXPERIMENT [CONFIG] FLAGS…`` → (experiment, config name or None, flags)."""
  if not argv or argv[0].startswith("-"):
    raise CliError("missing EXPERIMENT (a path like experiments/mnist1d_kd.py or a short name like mnist1d_kd)")
  exp = argv[0]
  name = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else None
  rest = argv[2:] if name else argv[1:]
  return exp, name, rest


def _teacher_run(mod: types.ModuleType, cfg: Experiment) -> Experiment:
  """The run that trains ``cfg``'s teacher: the experiment's ``teacher_config(cfg)``, else its teacher as the student."""
  teacher_cfg = getattr(mod, "teacher_config", None)
  if teacher_cfg:
    return _experiment(mod, teacher_cfg(cfg), "teacher_config(cfg)")
  return cfg.replace(mode="teacher", student=cfg.teacher)


# build_config's mode → the run it configures from the experiment's config: ``kdjax distill`` and
# ``kdjax train-teacher``
RUNS = {None: lambda mod, cfg: cfg, "teacher": _teacher_run}


def build_config(argv: list[str], *, mode: str | None = None) -> Experiment:
  """The validated config of ``EXPERIMENT [CONFIG] --field value …`` (its teacher's when ``mode="teacher"``)."""
  exp, name, rest = split_exp_args(argv)
  workdir_alias(rest)
  mod = load_experiment(exp)
  cfg = RUNS[mode](mod, base_config(mod, name))
  cfg = apply_overrides(cfg, rest)
  from kdjax.methods import registry

  registry.check_names(cfg.method)
  return cfg
