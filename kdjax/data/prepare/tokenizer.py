"""A Hugging Face tokenizer directory read without transformers: ``tokenizer.json`` through the
``tokenizers`` library, special tokens and the chat template from ``tokenizer_config.json``.

The chat template is rendered as ``transformers``' ``apply_chat_template``
renders it: a sandboxed jinja2 environment with ``trim_blocks`` and
``lstrip_blocks``, the loop-control extension, its ``tojson`` filter,
``raise_exception``, ``strftime_now``, ``namespace``, and the named special
tokens (``bos_token``, ``eos_token`` …) as template variables; the rendered
text is then encoded without the tokenizer's own special tokens (the template
writes them).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kdjax.errors import ConfigError

SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING = ("reasoning_content", "thinking", "reasoning")  # the names a message's reasoning goes by


@dataclasses.dataclass(frozen=True)
class TokenizerBundle:
  """A tokenizer and what ``tokenizer_config.json`` says about it.

  Attributes:
    tokenizer: the ``tokenizers.Tokenizer``.
    files: the files it was read from (copied next to a prepared dataset).
    special: named special tokens → text (``{"eos_token": "<|im_end|>", …}``).
    chat_template: the jinja2 chat template, or ``None``.
    vocab_size: logits width a model of this tokenizer has (its ``config.json``'s
      ``vocab_size`` when that is larger, else the tokenizer's size).
  """

  tokenizer: object
  files: tuple[Path, ...]
  special: dict
  chat_template: str | None
  vocab_size: int

  def token_id(self, name: str) -> int | None:
    """The id of special token ``name`` (``"eos_token"``), or ``None`` when it has none."""
    text = self.special.get(name)
    return None if text is None else self.tokenizer.token_to_id(text)


def _token_text(value) -> str | None:
  """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": …}``."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _template(config: dict, path: Path) -> str | None:
  """The default chat template: a string, or the entry named ``default`` of a list of named ones."""
  t = config.get("chat_template")
  if t is None and (path / "chat_template.jinja").is_file():
    return (path / "chat_template.jinja").read_text()
  if isinstance(t, list):
    named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
    t = named.get("default")
  return t if isinstance(t, str) else None


def _read_json(f: Path) -> dict:
  try:
    return json.loads(f.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f"tokenizer: cannot read {str(f)!r}: {str(e).splitlines()[0]}") from None


def load(path: str | Path) -> TokenizerBundle:
  """The tokenizer in directory ``path`` (or the ``tokenizer.json`` file ``path``); ``ConfigError`` when
  there is none or it cannot be read."""
  from tokenizers import Tokenizer

  p = Path(path).expanduser()
  d = p.parent if p.is_file() else p
  f = p if p.is_file() else p / "tokenizer.json"
  if not f.is_file():
    raise ConfigError(
      f"tokenizer: no tokenizer.json at {str(path)!r}; pass a Hugging Face checkpoint directory (or its "
      f"tokenizer.json), e.g. one downloaded with `huggingface-cli download ORG/MODEL --local-dir DIR`"
    )
  try:
    tok = Tokenizer.from_file(str(f))
  except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exceptions on a bad file
    raise ConfigError(f"tokenizer: {str(f)!r} is not a tokenizers file: {str(e).splitlines()[0]}") from None
  files = [f]
  config = {}
  if (d / "tokenizer_config.json").is_file():
    config = _read_json(d / "tokenizer_config.json")
    files.append(d / "tokenizer_config.json")
  files += [d / n for n in ("special_tokens_map.json", "chat_template.jinja") if (d / n).is_file()]
  special = {k: t for k in SPECIAL if (t := _token_text(config.get(k))) is not None}
  size = tok.get_vocab_size(with_added_tokens=True)
  model_vocab = _read_json(d / "config.json").get("vocab_size") if (d / "config.json").is_file() else None
  vocab = max(size, model_vocab) if isinstance(model_vocab, int) else size
  return TokenizerBundle(tok, tuple(files), special, _template(config, d), vocab)


# ----------------------------------------------------------------- chat templates
def _generation_extension():
  """The ``{% generation %}…{% endgeneration %}`` block transformers' templates may mark assistant text with
  (rendered as its body)."""
  import jinja2
  from jinja2.ext import Extension

  class Generation(Extension):
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  return Generation


def _compile(template: str):
  """``template`` compiled in the environment transformers renders chat templates in."""
  from datetime import datetime

  import jinja2
  from jinja2.ext import loopcontrols
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_generation_extension(), loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals.update(
    raise_exception=raise_exception,
    strftime_now=lambda fmt: datetime.now().strftime(fmt),
    namespace=jinja2.utils.Namespace,
    dict=dict,
  )
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ConfigError(f"chat template: jinja2 syntax error at line {e.lineno}: {e.message}") from None


def _message(m: dict) -> dict:
  """A message as transformers hands it to a template: ``None`` values dropped, reasoning under all its names."""
  m = {k: v for k, v in m.items() if v is not None}
  reasoning = next((m[k] for k in _REASONING if m.get(k) is not None), None)
  return m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning}


class ChatTemplate:
  """``render(messages, add_generation_prompt)`` → text, as ``apply_chat_template(tokenize=False)``."""

  def __init__(self, bundle: TokenizerBundle):
    if bundle.chat_template is None:
      raise ConfigError(
        "tokenizer: chat messages need a chat template and tokenizer_config.json has no chat_template; "
        "use prompt/response fields instead, or add the checkpoint's chat template"
      )
    self.compiled = _compile(bundle.chat_template)
    self.special = dict(bundle.special)

  def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    import jinja2

    try:
      return self.compiled.render(
        messages=[_message(m) for m in messages],
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **self.special,
      )
    except jinja2.exceptions.TemplateError as e:
      raise ConfigError(f"chat template: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
