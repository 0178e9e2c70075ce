"""TFDS builders over local files, one per dataset the loaders know.

Each builder runs the matching loader on local json / jsonl / parquet files and stores its records, in file
order, as the string features of `codec` (ArrayRecord files by default, so prepared data is read by index
without TensorFlow). Files come from the builder config's `files` (split -> path, absolute or relative to
the manual directory) or, by default, from `<split>.jsonl`, `<split>.json` or `<split>.parquet` in the
manual directory. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from retool_jax.data.chat_sft import load_chat_sft, load_preference_pairs
from retool_jax.data.io import BUILDERS as FILE_TYPES
from retool_jax.data.math_datasets import load_aime, load_dapo_math, load_gsm8k, load_math500
from retool_jax.data.records import ChatExample, Example, PreferencePair
from retool_jax.data.retool_sft import STYLES, load_retool_sft
from retool_jax.data.tfds import codec

FEATURE_DOCS = {
  "prompt": "JSON: the prompt messages",
  "ground_truth": "the reference answer the rewards compare against",
  "messages": "JSON: the conversation (OpenAI-style messages)",
  "tools": "JSON: the tool schemas shown to the model, or null",
  "chosen": "JSON: the preferred continuation (messages)",
  "rejected": "JSON: the rejected continuation (messages)",
  "metadata": "JSON: where the record came from",
}


def record_features(record_type: type) -> tfds.features.FeaturesDict:
  """The feature spec of `record_type`: one text feature per field."""
  return tfds.features.FeaturesDict(
    {name: tfds.features.Text(doc=FEATURE_DOCS[name]) for name in codec.field_names(record_type)}
  )


@dataclasses.dataclass(eq=False)
class LocalFilesConfig(tfds.core.BuilderConfig):
  """`files`: split -> json / jsonl / parquet path, absolute or relative to the manual directory.

  Left empty, every split of the builder whose `<split>.jsonl|.json|.parquet` is in the manual directory.
  """

  files: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)
class MathConfig(LocalFilesConfig):
  """Math problems with their prompt built in `prompt_style` (as in `build_prompt`)."""

  prompt_style: str = "raw"
  system_prompt: str | None = None


@dataclasses.dataclass(eq=False)
class ReToolSftConfig(LocalFilesConfig):
  """ReTool-SFT conversations in `style` ``inline`` or ``tool_calls``."""

  style: str = "inline"


def _math_configs() -> list[MathConfig]:
  return [
    MathConfig(name="raw", description="The dataset's own prompt (the bare problem when it has none)."),
    MathConfig(name="retool", prompt_style="retool", description="The ReTool prompt around the bare problem."),
  ]


class LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared machinery: locate the split files, run the loader, store the records in file order."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  RECORD: type = Example
  SPLITS: tuple[str, ...] = ("train", "validation", "test")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put the dataset's files in the manual directory as <split>.jsonl, <split>.json or <split>.parquet, or name "
    "them in the builder config: files={'train': '/path/to/file.jsonl'}."
  )
  HOMEPAGE = ""

  def __init__(self, *, file_format: str | None = None, **kwargs: Any):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def load(self, path: Path) -> list[Any]:
    """The records of one file (the loader's output)."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(self.__doc__ or "").strip(),
      features=record_features(self.RECORD),
      disable_shuffling=True,  # file order; the input pipeline shuffles
      homepage=self.HOMEPAGE or None,
    )

  def _split_files(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Path]:
    files = dict(getattr(self.builder_config, "files", None) or {})
    if any(not Path(p).is_absolute() for p in files.values()) or not files:
      try:
        manual = Path(dl_manager.manual_dir)
      except AssertionError as e:
        raise FileNotFoundError(f"{self.name}: no data files. {self.MANUAL_DOWNLOAD_INSTRUCTIONS} ({e})") from e
    if not files:
      for split in self.SPLITS:
        found = [manual / f"{split}{ext}" for ext in FILE_TYPES if (manual / f"{split}{ext}").is_file()]
        if len(found) > 1:
          raise ValueError(f"{self.name}: split {split!r} has several files: {[str(p) for p in found]}")
        if found:
          files[split] = str(found[0])
      if not files:
        names = [f"{s}{ext}" for s in self.SPLITS for ext in FILE_TYPES]
        raise FileNotFoundError(f"{self.name}: none of {names} is in the manual directory {manual}")
    paths = {}
    for split, name in files.items():
      path = Path(name) if Path(name).is_absolute() else manual / name
      if not path.is_file():
        raise FileNotFoundError(f"{self.name}: file for split {split!r} not found: {path}")
      paths[split] = path
    return paths

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    return {split: self._generate_examples(path) for split, path in self._split_files(dl_manager).items()}

  def _generate_examples(self, path: Path):
    for i, record in enumerate(self.load(path)):
      yield i, codec.encode(record, where=f"{path}: row {i}")


class MathBuilder(LocalFilesBuilder, skip_registration=True):
  BUILDER_CONFIGS = _math_configs()
  DEFAULT_BUILDER_CONFIG_NAME = "raw"
  LOADER: Any = None

  def load(self, path: Path) -> list[Example]:
    config = self.builder_config
    return type(self).LOADER(path, prompt_style=config.prompt_style, system_prompt=config.system_prompt)


class DapoMath17k(MathBuilder):
  """DAPO-Math-17k (slime, original or ROLL schema) as `Example` records."""

  name = "dapo_math_17k"
  SPLITS = ("train",)
  LOADER = load_dapo_math
  HOMEPAGE = "https://huggingface.co/datasets/BytedTsinghua-SIA/DAPO-Math-17k"


class Aime2024(MathBuilder):
  """AIME 2024 (Qwen2.5-Math or ReTool evaluation files) as `Example` records."""

  name = "aime2024"
  SPLITS = ("test",)
  LOADER = load_aime


class Aime2025(Aime2024):
  """AIME 2025 (Qwen2.5-Math or ReTool evaluation files) as `Example` records."""

  name = "aime2025"


class Math500(MathBuilder):
  """MATH-500 as `Example` records."""

  name = "math500"
  SPLITS = ("test",)
  LOADER = load_math500
  HOMEPAGE = "https://huggingface.co/datasets/HuggingFaceH4/MATH-500"


class Gsm8k(MathBuilder):
  """GSM8K as `Example` records (ground truth: the number after `####`)."""

  name = "gsm8k"
  SPLITS = ("train", "test")
  LOADER = load_gsm8k
  HOMEPAGE = "https://github.com/openai/grade-school-math"


class RetoolSft(LocalFilesBuilder):
  """ReTool-SFT conversations as `ChatExample` records."""

  name = "retool_sft"
  RECORD = ChatExample
  SPLITS = ("train",)
  BUILDER_CONFIGS = [ReToolSftConfig(name=style, style=style) for style in STYLES]
  DEFAULT_BUILDER_CONFIG_NAME = "inline"
  HOMEPAGE = "https://huggingface.co/datasets/JoeYing/ReTool-SFT"

  def load(self, path: Path) -> list[ChatExample]:
    return load_retool_sft(path, style=self.builder_config.style)


class ChatSft(LocalFilesBuilder):
  """Chat SFT conversations `{"messages", "tools"}` from local files as `ChatExample` records."""

  name = "chat_sft"
  RECORD = ChatExample
  BUILDER_CONFIGS = [LocalFilesConfig(name="default")]

  def load(self, path: Path) -> list[ChatExample]:
    return load_chat_sft(path)


class PreferencePairs(LocalFilesBuilder):
  """DPO pairs `{"prompt", "chosen", "rejected"}` from local files as `PreferencePair` records."""

  name = "preference_pairs"
  RECORD = PreferencePair
  BUILDER_CONFIGS = [LocalFilesConfig(name="default")]

  def load(self, path: Path) -> list[PreferencePair]:
    return load_preference_pairs(path)


BUILDERS: dict[str, type[LocalFilesBuilder]] = {
  b.name: b for b in (DapoMath17k, Aime2024, Aime2025, Math500, Gsm8k, RetoolSft, ChatSft, PreferencePairs)
}


def prepare(
  name: str,
  *,
  data_dir: str | os.PathLike,
  manual_dir: str | os.PathLike | None = None,
  config: str | tfds.core.BuilderConfig | None = None,
) -> tfds.core.DatasetBuilder:
  """Builds the dataset `name` (a key of `BUILDERS`) from local files under `data_dir`, once; returns the builder.

  `manual_dir` holds the files (default `<data_dir>/downloads/manual`); `config` is a config name or object.
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
  builder = BUILDERS[name](data_dir=os.fspath(data_dir), config=config)
  download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
  builder.download_and_prepare(download_config=download_config)
  return builder
