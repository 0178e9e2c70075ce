"""Teacher mode (Toolformer-style filtering): keep only the tool calls that help a model predict the text.

For a response text `x` and a proposed call `c` at character `i`, the call is executed to get its result `r`,
and a model's loss on the continuation `x[i:]` is compared under three prefixes::

    L+  = loss(x[i:] | x[:i] + e(c, r))        the call and its result
    L-  = min(loss(x[i:] | x[:i]),             no call
              loss(x[i:] | x[:i] + e(c, "")))  the call without its result

The call is kept when `L- - L+ >= threshold`. `loss(prefix, continuation)` is any callable returning the mean
negative log-likelihood of the continuation (`model_loss` scores it with a `Qwen3`); calls are proposed by any
callable (`retool_jax.rollout.proposer.engine_proposer` asks a model, through any `Engine`, to write a
`<tool_call>` at candidate positions).
`context` maps the prompt to the text the model sees before the response (`chat_context`: the chat template up
to the assistant turn), the same for proposing and scoring. Kept calls are executed for real: every result in
the output was produced by the tool.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retool_jax.chat.parse import CODE_TOOL
from retool_jax.chat.render import render_text
from retool_jax.chat.tokenizer import encode_text
from retool_jax.data.records import ChatExample
from retool_jax.models.logprobs import token_logprobs

LossFn = Callable[[str, str], float]
ContextFn = Callable[[str], str]


@dataclasses.dataclass(frozen=True)
class Proposal:
  """A call proposed at character `position` of a response (inserted before `text[position:]`)."""

  position: int
  name: str
  arguments: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class KeptCall:
  position: int
  name: str
  arguments: dict[str, Any]
  output: str
  gain: float  # L- - L+


ProposeFn = Callable[[str, str], Sequence[Proposal]]


def render_call(name: str, arguments: dict[str, Any], output: str | None) -> str:
  """The call (and its result, when given) as the model sees it in the Qwen chat format."""
  call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
  text = f"<tool_call>\n{call}\n</tool_call>\n"
  return text + (f"<tool_response>\n{output}\n</tool_response>\n" if output is not None else "")


def filter_calls(
  prompt: str,
  response: str,
  proposals: Iterable[Proposal],
  registry: Any,
  loss: LossFn,
  *,
  threshold: float = 0.1,
  context: ContextFn | None = None,
) -> list[KeptCall]:
  """Executes each proposal and keeps those whose result lowers `loss` on the continuation by `threshold`.

  The scored prefix is `context(prompt)` (default: the prompt itself) followed by the response up to the call.
  """
  kept = []
  head = context(prompt) if context is not None else prompt
  for p in proposals:
    if not 0 < p.position <= len(response):
      continue
    result = registry.call_sync(p.name, p.arguments)
    if not result.ok:
      continue
    prefix, continuation = head + response[: p.position], response[p.position :]
    with_result = loss(prefix + render_call(p.name, p.arguments, result.output), continuation)
    without = min(loss(prefix, continuation), loss(prefix + render_call(p.name, p.arguments, ""), continuation))
    gain = without - with_result
    if gain >= threshold:
      kept.append(KeptCall(p.position, p.name, dict(p.arguments), result.output, gain))
  return kept


def to_chat(prompt: str, response: str, calls: Sequence[KeptCall], tools: list[dict] | None) -> ChatExample:
  """A response with its kept calls as a conversation: text up to each call, the call, its real result, ..."""
  messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
  cursor = 0
  for call in sorted(calls, key=lambda c: c.position):
    function = {"name": call.name, "arguments": call.arguments}
    messages.append(
      {
        "role": "assistant",
        "content": response[cursor : call.position].strip(),
        "tool_calls": [{"type": "function", "function": function}],
      }
    )
    messages.append({"role": "tool", "content": call.output})
    cursor = call.position
  messages.append({"role": "assistant", "content": response[cursor:].strip()})
  metadata = {"source": "synth_teacher", "gains": [round(c.gain, 4) for c in calls]}
  return ChatExample(messages, tools, metadata)


def teacher_examples(
  items: Iterable[tuple[str, str]],
  propose: ProposeFn,
  registry: Any,
  loss: LossFn,
  *,
  threshold: float = 0.1,
  keep_without_calls: bool = False,
  context: ContextFn | None = None,
) -> list[ChatExample]:
  """Runs teacher mode over `(prompt, response)` pairs; returns conversations with their useful calls."""
  out = []
  for prompt, response in items:
    proposals = propose(prompt, response)
    calls = filter_calls(prompt, response, proposals, registry, loss, threshold=threshold, context=context)
    if calls or keep_without_calls:
      used = {c.name for c in calls}
      tools = [s for s in registry.schemas() if s.get("function", {}).get("name") in used] or None
      out.append(to_chat(prompt, response, calls, tools))
  return out


_CALC_ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]*)>>")


def gsm8k_item(
  question: str, solution: str, answer: str, tool: str = CODE_TOOL
) -> tuple[str, str, list[Proposal]]:
  """A GSM8K problem as `(prompt, response, proposals)` for teacher mode.

  The response is the worked solution without its `<<expr=result>>` annotations, ending in a boxed answer;
  each annotation becomes a proposal to compute `expr` with the code tool at that point (GSM8K's own number
  stays in the text, so the filter measures whether a real computation makes it easier to predict).
  """
  pieces, proposals, cursor, length = [], [], 0, 0
  for m in _CALC_ANNOTATION.finditer(solution):
    pieces.append(solution[cursor : m.start()])
    length += m.start() - cursor
    proposals.append(Proposal(length, tool, {"code": f"print({m.group(1).strip()})"}))
    cursor = m.end()
  pieces.append(solution[cursor:])
  response = "".join(pieces).rstrip() + f"\nThe answer is \\boxed{{{answer}}}."
  return question, response, proposals


def table_proposer(items: Iterable[tuple[str, str, list[Proposal]]]) -> tuple[list[tuple[str, str]], ProposeFn]:
  """Splits precomputed `(prompt, response, proposals)` into teacher inputs and a proposer that looks them up."""
  items = list(items)
  table = {(p, r): proposals for p, r, proposals in items}
  return [(p, r) for p, r, _ in items], lambda prompt, response: table.get((prompt, response), [])


_NUMBER_START = re.compile(r"(?<![\w.])[-+]?\d")


def number_positions(response: str) -> list[int]:
  """Candidate call positions: the start of every number in `response` (where a computed result helps)."""
  return [m.start() for m in _NUMBER_START.finditer(response) if m.start() > 0]


def chat_context(tokenizer: Any, *, tools: Any = None, enable_thinking: bool = True) -> ContextFn:
  """`prompt -> text`: the prompt as a user turn in the chat template, ending where the assistant's reply starts."""

  def context(prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return render_text(tokenizer, messages, tools=tools, enable_thinking=enable_thinking)

  return context


def model_loss(model: Any, tokenizer: Any, *, min_bucket: int = 64) -> LossFn:
  """`loss(prefix, continuation)`: a `Qwen3`'s mean negative log-likelihood of the continuation's tokens.

  Prefix and continuation are tokenised separately (the continuation's ids are those the model would write
  after the prefix). Sequences are padded at the end to a power of two (at least `min_bucket`), so a handful
  of compiled shapes serve every call; padding after the scored tokens cannot change them (causal attention).
  """
  graphdef, params = nnx.split(model)

  @jax.jit
  def logprobs(params, ids_1T):
    return token_logprobs(nnx.merge(graphdef, params), ids_1T[:, :-1], ids_1T[:, 1:]).logprobs_BT[0]

  def loss(prefix: str, continuation: str) -> float:
    prefix_ids, cont_ids = encode_text(tokenizer, prefix), encode_text(tokenizer, continuation)
    ids = prefix_ids + cont_ids
    first = max(len(prefix_ids), 1)  # the first token of an empty prefix has nothing to be predicted from
    if first >= len(ids):
      return 0.0
    size = max(min_bucket, 1 << (len(ids) - 1).bit_length())
    padded = np.zeros((1, size), np.int32)
    padded[0, : len(ids)] = ids
    lp = np.asarray(logprobs(params, jnp.asarray(padded)))
    return float(-lp[first - 1 : len(ids) - 1].mean())

  return loss
