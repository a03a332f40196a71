"""``kdjax prepare text`` and ``kdjax prepare images``: a user's own data stored as a dataset used by name.

    kdjax prepare text FILE.jsonl|FILE.parquet --tokenizer DIR --name NAME [--data_dir DIR]
        [--max_length 512] [--overflow error|truncate|drop] [--pack]
        [--prompt_field prompt] [--response_field response] [--messages_field messages] [--chat]
        [--test FILE | --test_size N] [--seed 0] [--overwrite]
    kdjax prepare images FILE.npz|FILE.npy|DIR --name NAME [--labels FILE.npy] [--data_dir DIR]
        [--test_size N] [--seed 0] [--overwrite]

``text`` reads prompt/response pairs or chat ``messages`` (rendered with the
tokenizer's chat template, ``--chat`` renders pairs as a user/assistant
exchange too), scores only response/assistant tokens, limits examples to
``--max_length`` tokens — the model's context; rows hold ``max_length − 1``
positions — (a longer example is an error unless ``--overflow truncate`` or
``drop``) and with ``--pack`` puts several examples in one training row
(``segment_ids``/``positions`` keep them apart). It prints one summary line. Train on the result with ``--data.name NAME --data.view
tokens`` (and ``--data.data_dir DIR``). Library: :func:`kdjax.data.prepare.text`
and :func:`kdjax.data.prepare.images`.
"""

from __future__ import annotations

from kdjax.cli.exits import CliError
from kdjax.cli.flags import int_opt, pop_opt

KINDS = ("text", "images")


def _opt(args: list[str], name: str, default=None, is_bool: bool = False):
  """``--name VALUE`` with underscores or dashes (``--max_length`` / ``--max-length``)."""
  v = default
  for flag in dict.fromkeys((f"--{name}", f"--{name.replace('_', '-')}")):
    v = pop_opt(args, flag, v, is_bool=is_bool)
  return v


def _int(args: list[str], name: str, default: int, minimum: int = 0) -> int:
  """``--name N`` (underscores or dashes): an integer ≥ ``minimum``."""
  v = _opt(args, name)
  return default if v is None else int_opt([f"--{name}", v], f"--{name}", default, minimum)


def _common(args: list[str]) -> dict:
  data_dir = _opt(args, "data_dir") or pop_opt(args, "--data.data_dir")
  name = _opt(args, "name")
  if not name:
    raise CliError("kdjax prepare: --name NAME is required (the dataset's name for --data.name)")
  return dict(
    name=name,
    data_dir=data_dir,
    test_size=_int(args, "test_size", 0),
    seed=_int(args, "seed", 0),
    overwrite=bool(_opt(args, "overwrite", False, is_bool=True)),
  )


def _path(args: list[str], kind: str) -> str:
  unknown = [a for a in args if a.startswith("-")]
  if unknown:
    raise CliError(f"kdjax prepare {kind}: unknown option {unknown[0]} (see `kdjax prepare {kind} --help`)")
  if len(args) != 1:
    raise CliError(f"kdjax prepare {kind} takes one input path, got {len(args)}: {' '.join(args) or 'none'}")
  return args[0]


def _text(args: list[str]):
  from kdjax.data import prepare

  tokenizer = _opt(args, "tokenizer")
  if not tokenizer:
    raise CliError("kdjax prepare text: --tokenizer DIR is required (a Hugging Face checkpoint's tokenizer.json)")
  fields = prepare.Fields(
    prompt=_opt(args, "prompt_field", "prompt"),
    response=_opt(args, "response_field", "response"),
    messages=_opt(args, "messages_field", "messages"),
    chat=bool(_opt(args, "chat", False, is_bool=True)),
  )
  kw = dict(
    max_length=_int(args, "max_length", 512, minimum=2),
    overflow=_opt(args, "overflow", "error"),
    pack=bool(_opt(args, "pack", False, is_bool=True)),
    test=_opt(args, "test"),
    **_common(args),
  )
  return prepare.text(_path(args, "text"), tokenizer, fields=fields, **kw)


def _images(args: list[str]):
  from kdjax.data import prepare

  labels = _opt(args, "labels")
  kw = _common(args)
  return prepare.images(_path(args, "images"), labels=labels, **kw)


def cmd_prepare_own(argv: list[str]) -> int:
  """``kdjax prepare text|images …`` (see the module docstring); prints the summary line."""
  kind, args = argv[0], list(argv[1:])
  if any(a in ("-h", "--help") for a in args):
    print(__doc__)
    return 0
  done = _text(args) if kind == "text" else _images(args)
  print(done.summary)
  return 0
