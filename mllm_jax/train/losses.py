"""Losses and metrics on fp32 logits. All return sums; the caller divides by global counts so
that gradient accumulation and sharding never change the normalisation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _ce_sums(logits, targets, mask):
  """Sums of CE, mask and exact hits over fp32 logits [..., V] and targets/mask [...]."""
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  # A hit is "the target's logit is the largest": one reduction that fuses with the softmax's
  # own max, rather than a separate argmax pass over [..., V] (they differ only on exact ties).
  target_logit = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  correct = (target_logit >= jnp.max(logits, -1)).astype(jnp.float32)
  return dict(loss_sum=jnp.sum(ce * mask), tokens=jnp.sum(mask), correct=jnp.sum(correct * mask))


def next_token_loss(logits, input_ids, loss_mask):
  """Cross-entropy of predicting input_ids[:, t] from position t-1, on loss-masked tokens only.

  logits [B, T, V] (fp32); input_ids [B, T]; loss_mask [B, T] (1 = token t is a target).
  Returns dict(loss_sum, tokens, correct): sums over the batch (scalars, fp32).
  """
  return _ce_sums(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:].astype(jnp.float32))


def chunked_next_token_loss(hidden, logits_fn, input_ids, loss_mask, chunk: int):
  """`next_token_loss(logits_fn(hidden), ...)` without the [B, T, V] logits.

  hidden [B, T, E] (final-normed hidden states); logits_fn [B, C, E] -> [B, C, V].
  Each row's predicting positions are reordered so that the loss positions come first (a
  stable sort, so the order within them is kept), then the head and the cross-entropy run on
  [B, chunk] slices in a scan; a slice with no loss position in any row is skipped (lax.cond).
  Positions that carry no loss (image tokens, prompts) thus cost no vocabulary projection, and
  the peak logits memory is [B, chunk, V] per live slice instead of [B, T, V].
  """
  b, t, e = hidden.shape
  mask = loss_mask[:, 1:].astype(jnp.float32)
  order = jnp.argsort(mask <= 0, axis=1, stable=True)                     # [B, T-1]
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
  h, tgt, m = take(hidden[:, :-1]), take(input_ids[:, 1:]), take(mask)
  n = -(-(t - 1) // chunk)
  pad = n * chunk - (t - 1)
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    tgt, m = jnp.pad(tgt, ((0, 0), (0, pad))), jnp.pad(m, ((0, 0), (0, pad)))
  split = lambda x: jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)
  zeros = dict(loss_sum=jnp.zeros((), jnp.float32), tokens=jnp.zeros((), jnp.float32),
               correct=jnp.zeros((), jnp.float32))

  def body(acc, xs):
    hc, tc, mc = xs
    out = jax.lax.cond(jnp.any(mc > 0), lambda: _ce_sums(logits_fn(hc), tc, mc), lambda: zeros)
    return jax.tree.map(jnp.add, acc, out), None

  out, _ = jax.lax.scan(body, zeros, (split(h), split(tgt), split(m)))
  return out


def compact_next_token_loss(hidden, logits_fn, input_ids, loss_mask, width: int):
  """`next_token_loss(logits_fn(hidden), ...)` with the head run only at `width` positions a row.

  hidden [B, T, E] (final-normed); logits_fn [B, W, E] -> [B, W, V]. Each row's predicting
  positions are stably reordered so its loss positions come first, and only the first `width`
  of them go through the vocabulary projection: in LLaVA-style data most positions (image
  tokens, prompts) carry no loss, and the head + softmax over a 32k vocabulary is the largest
  single cost of a small model's step. Exact when no row has more than `width` loss positions;
  the caller checks that (`row_loss_tokens`) and uses another path for batches that do.
  """
  b, t, _ = hidden.shape
  mask = loss_mask[:, 1:].astype(jnp.float32)
  width = min(width, t - 1)
  order = jnp.argsort(mask <= 0, axis=1, stable=True)[:, :width]           # [B, W]
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
  return _ce_sums(logits_fn(take(hidden[:, :-1])), take(input_ids[:, 1:]), take(mask))


def row_loss_tokens(loss_mask) -> int:
  """The most loss positions any row of a host batch has (loss_mask [..., T] numpy)."""
  import numpy as np
  m = np.asarray(loss_mask)
  return int((m[..., 1:] > 0).sum(-1).max()) if m.size else 0


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
