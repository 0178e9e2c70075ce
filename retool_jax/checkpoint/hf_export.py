"""Parameters -> a Hugging Face folder (sharded safetensors, index, config, generation config, tokenizer, and the
prompt contract `prompt_contract.json` when one is given: how prompts must be rendered for this model).

Used by `orbax_to_hf`, by weight sync to SGLang and by the demo. The folder is written beside its destination
and renamed into place, so a reader (an inference server, `from_pretrained`) never sees half a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from typing import Any, Callable, Mapping

import numpy as np
from flax import nnx

from retool_jax.chat.prompt_contract import (
  CONTRACT_FILE,
  PromptContract,
  copy_tokenizer_files,
  write_contract,
)
from retool_jax.models.qwen3 import Qwen3
from retool_jax.models.qwen3_config import Qwen3Config
from retool_jax.models.qwen3_hf import hf_shapes, hf_tensors
from retool_jax.models.safetensors_io import write_sharded

GENERATION_CONFIG = "generation_config.json"


def hf_config_json(cfg: Qwen3Config, dtype: np.dtype, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
  out = {**cfg.to_hf(), **(base or {})}
  out["torch_dtype"] = dtype.name
  if "dtype" in out:
    out["dtype"] = dtype.name
  return out


def generation_config_json(cfg: Qwen3Config) -> dict[str, Any]:
  out = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
  if cfg.pad_token_id is not None:
    out["pad_token_id"] = cfg.pad_token_id
  return out


def copy_tokenizer(tokenizer_dir: str | os.PathLike, out_dir: str) -> list[str]:
  return copy_tokenizer_files(tokenizer_dir, out_dir)


def write_hf(
  params: Qwen3 | nnx.State,
  cfg: Qwen3Config | None,
  dst: str | os.PathLike,
  *,
  dtype=None,
  hf_config: Mapping[str, Any] | None = None,
  generation_config: Mapping[str, Any] | None = None,
  tokenizer: str | os.PathLike | None = None,
  contract: PromptContract | None = None,
  max_shard_bytes: int = 4 << 30,
  overwrite: bool = False,
  on_tensor: Callable[[str], None] | None = None,
) -> list[str]:
  """Writes `params` (a model, or a state whose leaves index by layer) as a HF folder; returns the file names.

  `cfg` may be None for a `Qwen3` model. `dtype` defaults to the config's `param_dtype`. `hf_config` entries
  (e.g. the original checkpoint's config) override the generated `config.json`. `contract` is written beside the
  weights, with its tokenizer copied into the folder (from `tokenizer` if given). An existing `dst` is an error
  unless `overwrite`, in which case it is replaced only once the new folder is complete.
  """
  if cfg is None:
    if not isinstance(params, Qwen3):
      raise ValueError("write_hf needs a Qwen3Config when given parameters rather than a Qwen3 model")
    cfg = params.config
  out_dtype = np.dtype(dtype if dtype is not None else cfg.param_dtype)
  dst = os.path.abspath(os.fspath(dst))
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"{dst} already exists; choose a new destination or remove it")
  parent, name = os.path.split(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    specs = [(key, shape, out_dtype) for key, shape in hf_shapes(cfg).items()]

    def tensors():
      for key, value in hf_tensors(params, cfg, dtype=out_dtype):
        if on_tensor is not None:
          on_tensor(key)
        yield key, value

    files = write_sharded(tmp, specs, tensors(), max_shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config_json(cfg, out_dtype, hf_config), f, indent=2)
    with open(os.path.join(tmp, GENERATION_CONFIG), "w") as f:
      json.dump(dict(generation_config or generation_config_json(cfg)), f, indent=2)
    files += ["config.json", GENERATION_CONFIG]
    if contract is not None and tokenizer is None:
      tokenizer = contract.tokenizer_path()
    if tokenizer is not None:
      files += copy_tokenizer(tokenizer, tmp)
    if contract is not None:
      write_contract(tmp, dataclasses.replace(contract, tokenizer=".", base=None))
      files.append(CONTRACT_FILE)
    if os.path.exists(dst):
      old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
      os.rename(dst, old)
      os.rename(tmp, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return files
