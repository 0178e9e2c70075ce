"""A chat longer than the model's context: the oldest whole turns are dropped (said once); /reset still clears."""

from flax import nnx

from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat import Trajectory, load_tokenizer, render_ids
from retool_jax.chat_cli import ChatSession, ChatSettings
from retool_jax.demo_task.tokenizer import VOCAB_SIZE, build_tokenizer
from retool_jax.models.qwen3 import Qwen3
from retool_jax.rollout import JaxEngine
from scripted_engine import ScriptedEngine
from tiny_qwen3 import tiny_config

TOK = load_tokenizer(QWEN3_TOKENIZER_DIR)
SYSTEM = "Answer briefly."
QUESTIONS = ("What is 2**10?", "And 3**4?", "And 5**3?")
ANSWERS = [f"{'It is a power of two. ' * 6}{a}.<|im_end|>" for a in (1024, 81, 125)]
NOTICE = "(the oldest turns are dropped"


class Console:
  def __init__(self, *lines):
    self.lines, self.out = list(lines), []

  def ask(self, prompt):
    if not self.lines:
      raise EOFError
    return self.lines.pop(0)

  def say(self, text):
    self.out.append(text)


def fresh(question):
  return tuple(render_ids(TOK, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]))


def test_trajectory_drop_keeps_ids_mask_and_logprobs_aligned():
  traj = Trajectory(TOK, [1, 2, 3])
  traj.add_generated([4, 5], [-0.4, -0.5])
  traj.drop(2, 4)
  assert (traj.ids, traj.loss_mask, traj.logprobs, traj.num_prompt_tokens) == (
    [1, 2, 5],
    [0, 0, 1],
    [0, 0, -0.5],
    2,
  )


def test_a_chat_past_128_tokens_drops_whole_old_turns_once_said_and_reset_still_clears():
  first = fresh(QUESTIONS[0])
  assert len(first) + len(TOK.encode(ANSWERS[0])) + 12 > 128 - 64  # the second turn leaves no room for a reply
  engine = ScriptedEngine(
    TOK, {first: [ANSWERS[0], ANSWERS[0]], **{fresh(q): [a] for q, a in zip(QUESTIONS[1:], ANSWERS[1:])}}
  )
  console = Console(*QUESTIONS, "/reset", QUESTIONS[0], "/exit")
  chat = ChatSession(
    engine, TOK, None, ChatSettings(max_context=128, system=SYSTEM), ask=console.ask, say=console.say
  )
  chat.loop()
  replies = [line for line in console.out if line.startswith("assistant> ")]
  assert replies == [f"assistant> {a.removesuffix('<|im_end|>')}" for a in (*ANSWERS, ANSWERS[0])]
  assert sum(line.startswith(NOTICE) for line in console.out) == 1 and chat.dropped_turns == 2
  assert not any(line.startswith("(the conversation is") for line in console.out)
  # each later question is sent as the conversation the template renders after the cut: system, that question
  assert [tuple(r.prompt_ids) for r in engine.requests] == [first, fresh(QUESTIONS[1]), fresh(QUESTIONS[2]), first]
  assert "(conversation cleared)" in console.out
  assert chat.messages == [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": QUESTIONS[0]},
    {"role": "assistant", "content": ANSWERS[0].removesuffix("<|im_end|>")},
  ]


def test_two_turns_on_a_128_token_model_are_both_answered():
  tokenizer = build_tokenizer()
  model = Qwen3(tiny_config(vocab_size=VOCAB_SIZE, max_position_embeddings=128), rngs=nnx.Rngs(0))
  engine = JaxEngine(model, tokenizer=tokenizer, max_length=128, max_batch_size=1)
  console = Console("What is 123 * 45?", "And 321 * 54?", "/exit")
  settings = ChatSettings(max_context=128, max_new_tokens=1024, enable_thinking=False, temperature=1.0)
  chat = ChatSession(engine, tokenizer, None, settings, ask=console.ask, say=console.say)
  chat.loop()
  assert not any(line.startswith("(the conversation is") for line in console.out), console.out
  # every turn got a reply: text, or the notice that it reached the token limit
  answered = [
    line for line in console.out if line.startswith("assistant> ") or line == "(reply cut at the token limit)"
  ]
  assert len(answered) >= 2, console.out
  assert sum(line.startswith(NOTICE) for line in console.out) == 1, console.out
  assert len(chat.trajectory) <= 128
