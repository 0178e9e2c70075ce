"""The prompt contract: which tokenizer a model was trained with and how its prompts were rendered.

A trainer records it in its run folder (`prompt_contract.json` plus a copy of the tokenizer in `tokenizer/`);
the Hugging Face export writes it beside the weights. `python -m retool_jax.chat` and `python -m
retool_jax.evaluate` read it from the checkpoint they are given, so a model meets the prompts it learned from:

    record_contract(workdir, tokenizer_dir, tools_in_prompt=False, call_formats=("code",))
    contract = find_contract("runs/demo_cpu/rl/checkpoints")        # or None
    contract.tokenizer_path()                                        # absolute tokenizer folder

The JSON is plain so that other servers (SGLang) can follow it: `system_prompt` (null = none), `tools_in_prompt`
(whether tool schemas were rendered into the system prompt), `call_formats` (`tool_call`: `<tool_call>{json}
</tool_call>`; `code`: ReTool `<code>...</code>`), `observation_format` (`qwen`: a `<tool_response>` user turn;
`retool`: `<interpreter>` inline after `</code>`; `auto`: by the call's format), `enable_thinking` and
`prompt_style` (how data-set problems were worded, see `retool_jax.data.prompts`; null when not from one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat.parse import FORMATS
from retool_jax.fields import check_fields

CONTRACT_FILE = "prompt_contract.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "retool_jax.prompt_contract.v1"
OBSERVATION_FORMATS = ("auto", "qwen", "retool")
# How far above a checkpoint path the contract is looked for: step folder -> checkpoints/ -> run folder.
SEARCH_DEPTH = 3
TOKENIZER_FILES = re.compile(
  r"^(tokenizer.*|vocab\..*|merges\.txt|special_tokens_map\.json|added_tokens\.json"
  r"|chat_template.*|.*\.tiktoken|.*\.model)$"
)


class ContractError(ValueError):
  """A prompt contract that cannot be read or used; the message names the file and field."""


class TokenizerMismatchError(ContractError):
  """A tokenizer whose ids do not all fit the model's embedding."""


@dataclasses.dataclass(frozen=True)
class PromptContract:
  """How a model's prompts were rendered. `tokenizer`: a folder, relative to `base` unless absolute."""

  tokenizer: str
  system_prompt: str | None = None
  tools_in_prompt: bool = True
  call_formats: tuple[str, ...] = ("tool_call", "code")
  observation_format: str = "auto"
  enable_thinking: bool = True
  prompt_style: str | None = None
  base: str | None = dataclasses.field(default=None, compare=False)  # the folder the contract was read from

  def __post_init__(self):
    object.__setattr__(self, "call_formats", tuple(self.call_formats))
    _check_fields(dataclasses.asdict(self), where="PromptContract")

  def tokenizer_path(self) -> Path:
    """The tokenizer folder, made absolute against the folder the contract came from."""
    path = Path(self.tokenizer)
    return path if path.is_absolute() or self.base is None else Path(self.base) / path

  def to_json(self) -> dict[str, Any]:
    record = {k: v for k, v in dataclasses.asdict(self).items() if k != "base"}
    return {"format": FORMAT, **record, "call_formats": list(self.call_formats)}

  @classmethod
  def from_json(cls, record: Any, *, where: str = "prompt contract", base: str | None = None) -> PromptContract:
    if not isinstance(record, Mapping):
      raise ContractError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if record.get("format") != FORMAT:
      raise ContractError(f"{where}: format is {record.get('format')!r}; expected {FORMAT!r}")
    fields = {f.name for f in dataclasses.fields(cls)} - {"base"}
    values = {k: v for k, v in record.items() if k != "format"}
    check_fields(values, fields, where, error=ContractError)
    if "tokenizer" not in values:
      raise ContractError(f"{where}: missing field 'tokenizer'")
    _check_fields(values, where=where)
    return cls(**values, base=base)

  def describe(self) -> str:
    """One line for people: what the prompts look like."""
    schemas = "tool schemas in the system prompt" if self.tools_in_prompt else "no tool schemas in the prompt"
    system = "a system prompt" if self.system_prompt else "no system prompt"
    thinking = "thinking on" if self.enable_thinking else "thinking off"
    return (
      f"tokenizer {self.tokenizer_path()}, {system}, {schemas}, calls {'/'.join(self.call_formats)}, "
      f"observations {self.observation_format}, {thinking}"
    )


def _check_fields(values: Mapping[str, Any], *, where: str) -> None:
  def expect(name: str, ok: bool, what: str) -> None:
    if name in values and not ok:
      raise ContractError(f"{where}: field {name!r} must be {what}, got {values[name]!r}")

  expect("tokenizer", isinstance(values.get("tokenizer"), str) and bool(values.get("tokenizer")), "a folder path")
  expect("system_prompt", values.get("system_prompt") is None or isinstance(values["system_prompt"], str), "str")
  expect("prompt_style", values.get("prompt_style") is None or isinstance(values["prompt_style"], str), "str")
  for name in ("tools_in_prompt", "enable_thinking"):
    expect(name, isinstance(values.get(name), bool), "true or false")
  formats = values.get("call_formats")
  expect(
    "call_formats",
    isinstance(formats, (list, tuple)) and bool(formats) and all(f in FORMATS for f in formats),
    f"a non-empty list of {list(FORMATS)}",
  )
  expect(
    "observation_format", values.get("observation_format") in OBSERVATION_FORMATS, f"one of {OBSERVATION_FORMATS}"
  )


# ---- files ----------------------------------------------------------------------------------------


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
  """Copies the tokenizer files of folder `src` into `dst` (created); returns their names."""
  src, dst = Path(src), Path(dst)
  if not src.is_dir():
    raise FileNotFoundError(f"tokenizer folder {src} does not exist")
  names = sorted(p.name for p in src.iterdir() if p.is_file() and TOKENIZER_FILES.match(p.name))
  if not names:
    raise FileNotFoundError(f"no tokenizer files in {src}")
  dst.mkdir(parents=True, exist_ok=True)
  for name in names:
    if (src / name).resolve() != (dst / name).resolve():
      shutil.copy2(src / name, dst / name)
  return names


def write_contract(folder: str | os.PathLike, contract: PromptContract) -> Path:
  """Writes `folder/prompt_contract.json` (the tokenizer path as the contract holds it); returns the file."""
  path = Path(folder) / CONTRACT_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{CONTRACT_FILE}.partial")
  tmp.write_text(json.dumps(contract.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  os.replace(tmp, path)
  return path


def record_contract(
  folder: str | os.PathLike,
  tokenizer: str | os.PathLike,
  *,
  system_prompt: str | None = None,
  tools_in_prompt: bool = True,
  call_formats: Sequence[str] = ("tool_call", "code"),
  observation_format: str = "auto",
  enable_thinking: bool = True,
  prompt_style: str | None = None,
) -> PromptContract:
  """Copies `tokenizer` (a folder) into `folder/tokenizer` and writes the contract there; returns it.

  The call a trainer makes where it writes its run folder's `config.json`.
  """
  copy_tokenizer_files(tokenizer, Path(folder) / TOKENIZER_DIR)
  contract = PromptContract(
    TOKENIZER_DIR,
    system_prompt=system_prompt,
    tools_in_prompt=tools_in_prompt,
    call_formats=tuple(call_formats),
    observation_format=observation_format,
    enable_thinking=enable_thinking,
    prompt_style=prompt_style,
    base=os.fspath(Path(folder).resolve()),
  )
  write_contract(folder, contract)
  return contract


def record_rollout_contract(
  folder: str | os.PathLike,
  tokenizer: str | os.PathLike,
  multiturn: Any,
  *,
  tools_in_prompt: bool,
  system_prompt: str | None = None,
  prompt_style: str | None = None,
) -> PromptContract:
  """`record_contract` with the call formats, observation format and thinking of a `MultiTurnConfig`."""
  return record_contract(
    folder,
    tokenizer,
    system_prompt=system_prompt,
    tools_in_prompt=tools_in_prompt,
    call_formats=multiturn.call_formats,
    observation_format=multiturn.observation_format,
    enable_thinking=multiturn.enable_thinking,
    prompt_style=prompt_style,
  )


def _bundled_tokenizer() -> str:
  return str(QWEN3_TOKENIZER_DIR)


def record_sft_contract(folder: str | os.PathLike, data: Any) -> PromptContract | None:
  """The contract of an SFT run on `data` (the trainer's `config.data`); None for pre-tokenised data."""
  if data.format not in ("retool_sft", "chat"):
    return None  # token rows and synthetic sequences carry no prompt format
  inline = data.format == "retool_sft" and data.style == "inline"
  return record_contract(
    folder,
    data.tokenizer or _bundled_tokenizer(),
    call_formats=("code",) if inline else ("tool_call", "code"),
    enable_thinking=data.enable_thinking,
  )


def record_rl_contract(folder: str | os.PathLike, config: Any, multiturn: Any) -> PromptContract:
  """The contract of an RL run (`config.data`, `config.tools`, `config.tools_in_prompt`) with rollouts `multiturn`."""
  return record_rollout_contract(
    folder,
    config.data.tokenizer or _bundled_tokenizer(),
    multiturn,
    tools_in_prompt=config.tools != "none" and config.get("tools_in_prompt", True),
    prompt_style=config.data.prompt_style,
  )


def load_contract(path: str | os.PathLike) -> PromptContract:
  """Reads a `prompt_contract.json` (or the one in folder `path`)."""
  path = Path(path)
  if path.is_dir():
    path = path / CONTRACT_FILE
  try:
    record = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise FileNotFoundError(f"no prompt contract at {path}") from None
  except (ValueError, UnicodeDecodeError) as e:
    raise ContractError(f"{path}: not valid JSON ({e})") from None
  return PromptContract.from_json(record, where=os.fspath(path), base=os.fspath(path.parent.resolve()))


def contract_file(checkpoint: str | os.PathLike) -> Path | None:
  """The `prompt_contract.json` of a checkpoint: in its folder or up to `SEARCH_DEPTH` folders above it."""
  path = Path(checkpoint).resolve()
  for folder in [path, *path.parents][: SEARCH_DEPTH + 1]:
    if (folder / CONTRACT_FILE).is_file():
      return folder / CONTRACT_FILE
  return None


def find_contract(checkpoint: str | os.PathLike | None) -> PromptContract | None:
  """The contract recorded for `checkpoint` (an Orbax step, checkpoints root, or HF folder), else None."""
  if checkpoint is None or "://" in os.fspath(checkpoint):
    return None
  path = contract_file(checkpoint)
  return load_contract(path) if path is not None else None


# ---- tokenizer and model ----------------------------------------------------------------------------


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, *, tokenizer_name: str, model_name: str) -> None:
  """Raises `TokenizerMismatchError` naming both when a token id of `tokenizer` is outside `[0, vocab_size)`."""
  size = len(tokenizer)
  special = {t: tokenizer.convert_tokens_to_ids(t) for t in getattr(tokenizer, "all_special_tokens", [])}
  outside = {t: i for t, i in special.items() if i is not None and not 0 <= i < vocab_size}
  if size <= vocab_size and not outside:
    return
  what = f"{size} tokens"
  if outside:
    shown = sorted(outside.items(), key=lambda x: x[1])
    what += ", special token(s) " + ", ".join(f"{t!r}={i}" for t, i in shown[:3])
    what += f" and {len(shown) - 3} more" if len(shown) > 3 else ""
  raise TokenizerMismatchError(
    f"tokenizer {tokenizer_name} does not fit model {model_name}: the tokenizer has {what}, the model's "
    f"vocabulary has {vocab_size} ids. Use the tokenizer the model was trained with (--tokenizer, or the "
    f"{TOKENIZER_DIR}/ folder beside the checkpoint's {CONTRACT_FILE})"
  )
