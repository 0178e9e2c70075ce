"""Synthetic tool-use data: templated conversations and Toolformer-style teacher filtering."""

from retool_jax.data.synth.teacher import (
  KeptCall,
  Proposal,
  chat_context,
  filter_calls,
  gsm8k_item,
  model_loss,
  number_positions,
  render_call,
  table_proposer,
  teacher_examples,
  to_chat,
)
from retool_jax.data.synth.templates import TASKS, Task, templated_examples

__all__ = [
  "TASKS",
  "KeptCall",
  "Proposal",
  "Task",
  "chat_context",
  "filter_calls",
  "gsm8k_item",
  "model_loss",
  "number_positions",
  "render_call",
  "table_proposer",
  "teacher_examples",
  "templated_examples",
  "to_chat",
]
