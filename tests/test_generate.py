"""Greedy decoding with the KV cache equals Hugging Face `generate` (greedy) on the same weights."""

import numpy as np
import torch

from hf_models import save_hf_model
from retool_jax.models import qwen3_hf
from retool_jax.models.generate import greedy_generate


def test_greedy_matches_hf_generate(tmp_path):
  hf = save_hf_model("dense_untied_gqa2", tmp_path, seed=7)
  model = qwen3_hf.load_hf(tmp_path)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 128, n).tolist() for n in (9, 4)]
  ours = greedy_generate(model, prompts, max_new_tokens=12)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      ref = hf.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
      )[0, len(prompt) :].tolist()
    assert got == ref


def test_greedy_stops_at_eos(tmp_path):
  save_hf_model("dense_tied_mqa_hd12", tmp_path, seed=3)
  model = qwen3_hf.load_hf(tmp_path)
  prompt = [5, 6, 7]
  free = greedy_generate(model, [prompt], max_new_tokens=10)[0]
  eos = free[4]
  stopped = greedy_generate(model, [prompt], max_new_tokens=10, eos_token_ids=[eos])[0]
  assert stopped == free[: free.index(eos) + 1]
