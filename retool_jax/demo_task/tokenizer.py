"""A small character-level tokenizer for the demo task that keeps the Qwen3 chat format.

Every printable ASCII character is one token; the Qwen3 markers (`<|im_start|>`, `<|im_end|>`, `<tool_call>`,
`<think>`, ...) and the ReTool tags the task uses (`<code>`, `<interpreter>`, `<answer>`, `\\boxed{`, code fences)
are single added tokens. The Qwen3 chat template is attached, so `apply_chat_template` and the rest of the chat
layer work unchanged; a tiny model with a ~120-token vocabulary trains in seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

from retool_jax.assets import QWEN3_TOKENIZER_DIR

# Special tokens (skipped by `decode(skip_special_tokens=True)`), then the Qwen3 tags that are ordinary added
# tokens, then the task's own multi-character tags.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_TAGS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
TASK_TAGS = (
  "<code>",
  "</code>",
  "<interpreter>",
  "</interpreter>",
  "<answer>",
  "</answer>",
  "\\boxed{",
  "```python",
  "```",
  "print(",
)
CHARACTERS = tuple(sorted(set(string.printable) - set("\x0b\x0c\r")))
UNK = "<|unk|>"
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
# Every token in id order: what `build_tokenizer` assigns (vocabulary first, then the added tokens in order).
TOKENS = (UNK, *CHARACTERS, *SPECIAL_TOKENS, *QWEN_TAGS, *TASK_TAGS)
VOCAB_SIZE = -(-len(TOKENS) // 64) * 64  # the model's embedding rows: the tokens, rounded up to 64


def token_id(token: str) -> int:
  """The id `build_tokenizer()` gives `token`, without building it (what the demo's configs need)."""
  return TOKENS.index(token)


def build_tokenizer():
  """A `PreTrainedTokenizerFast` (character level, Qwen3 chat template, EOS `<|im_end|>`)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models  # noqa: PLC0415  only to build one (as below)
  from transformers import PreTrainedTokenizerFast  # noqa: PLC0415  slow to import; `token_id` needs only TOKENS

  vocab = {tok: i for i, tok in enumerate((UNK, *CHARACTERS))}
  backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
  backend.decoder = decoders.Fuse()
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_TAGS + TASK_TAGS])
  return PreTrainedTokenizerFast(
    tokenizer_object=backend,
    chat_template=qwen3_chat_template(),
    eos_token=EOS_TOKEN,
    pad_token=PAD_TOKEN,
    unk_token=UNK,
    clean_up_tokenization_spaces=False,
  )


def qwen3_chat_template() -> str:
  """The Qwen3 chat template shipped with the package."""
  with open(Path(QWEN3_TOKENIZER_DIR) / "tokenizer_config.json", encoding="utf-8") as f:
    return json.load(f)["chat_template"]


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> str:
  """Writes the tokenizer so `load_tokenizer(directory)` / `AutoTokenizer.from_pretrained` read it back."""
  tokenizer.save_pretrained(os.fspath(directory))
  return os.fspath(directory)
