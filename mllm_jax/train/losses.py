"""Losses and metrics on fp32 logits. All return sums; the caller divides by global counts so
that gradient accumulation and sharding never change the normalisation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def next_token_loss(logits, input_ids, loss_mask):
  """Cross-entropy of predicting input_ids[:, t] from position t-1, on loss-masked tokens only.

  logits [B, T, V] (fp32); input_ids [B, T]; loss_mask [B, T] (1 = token t is a target).
  Returns dict(loss_sum, tokens, correct): sums over the batch (scalars, fp32).
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = input_ids[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return dict(loss_sum=jnp.sum(ce * mask), tokens=jnp.sum(mask), correct=jnp.sum(correct * mask))


def answer_accuracy(logits, input_ids, turn_ids, max_turns: int = 16):
  """Exact-match answers under teacher forcing (= what greedy decoding would produce).

  turn_ids [B, T]: 1-based answer index for target tokens, 0 elsewhere. An answer counts as
  right iff every one of its tokens is the argmax. Returns dict(answers, answers_right).
  """
  wrong = jnp.argmax(logits[:, :-1], -1) != input_ids[:, 1:]
  turns = jax.nn.one_hot(turn_ids[:, 1:], max_turns + 1, dtype=jnp.int32)[..., 1:]   # [B,T-1,K]
  present = turns.sum(1) > 0
  n_wrong = (turns * wrong[..., None]).sum(1)
  return dict(answers=present.sum().astype(jnp.float32),
              answers_right=(present & (n_wrong == 0)).sum().astype(jnp.float32))
