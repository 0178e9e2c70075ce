"""Data: math problem sets, SFT / DPO / ToolBench / ReTool-SFT conversations, packing, the input pipeline (on grain),
synthetic tool use."""

from retool_jax.data.chat_sft import dumps_example, load_chat_sft, load_preference_pairs
from retool_jax.data.io import read_rows
from retool_jax.data.math_datasets import (
  SCHEMAS,
  detect_schema,
  load_aime,
  load_dapo_math,
  load_gsm8k,
  load_math,
  load_math500,
)
from retool_jax.data.packing import PackedRows, pack_sequences
from retool_jax.data.pipeline import Batch, InputPipeline, global_batch
from retool_jax.data.prompts import PROMPT_STYLES, build_prompt, retool_template
from retool_jax.data.records import ChatExample, Example, PreferencePair
from retool_jax.data.retool_sft import convert_retool_record, load_retool_sft, split_retool_turn
from retool_jax.data.toolbench import convert_toolbench_record, load_toolbench

__all__ = [
  "PROMPT_STYLES",
  "SCHEMAS",
  "Batch",
  "ChatExample",
  "Example",
  "InputPipeline",
  "PackedRows",
  "PreferencePair",
  "build_prompt",
  "convert_retool_record",
  "convert_toolbench_record",
  "detect_schema",
  "dumps_example",
  "global_batch",
  "load_aime",
  "load_chat_sft",
  "load_dapo_math",
  "load_gsm8k",
  "load_math",
  "load_math500",
  "load_preference_pairs",
  "load_retool_sft",
  "load_toolbench",
  "pack_sequences",
  "read_rows",
  "retool_template",
  "split_retool_turn",
]
