"""Optimiser (optax AdamW, warmup + cosine, clipping) and the trainable/frozen split.

Trainable parameters are chosen by a regex over '/'-joined parameter paths (e.g.
`connector/.*`). The optimiser only ever sees the trainable subtree: frozen parameters get no
optimiser state and no gradient buffers (gradient accumulation carries trainable grads only).
"""
from __future__ import annotations

import re

import flax
import jax
import optax


def path_str(path) -> str:
  return '/'.join(str(p) for p in path)


def trainable_mask(params, pattern: str, key: str = 'trainable') -> dict:
  """Flat {path: bool} of which parameters match `pattern` (re.fullmatch on 'a/b/c' paths)."""
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ValueError(f'{key}={pattern!r} is not a valid regex: {e}') from None
  mask = {k: rx.fullmatch(k) is not None for k in flat}
  if not any(mask.values()):
    top = sorted({k.split('/')[0] for k in flat})
    raise ValueError(f'{key}={pattern!r} matches no parameter; top-level groups: {top}, '
                     f'e.g. {next(iter(flat))!r}')
  return mask


def split_params(params, mask: dict):
  """-> (trainable, frozen) nested dicts (disjoint, same paths as `params`)."""
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  train = {k: v for k, v in flat.items() if mask[k]}
  frozen = {k: v for k, v in flat.items() if not mask[k]}
  unflat = lambda d: flax.traverse_util.unflatten_dict(d, sep='/')
  return unflat(train), unflat(frozen)


def merge_params(trainable, frozen):
  flat = flax.traverse_util.flatten_dict(frozen, sep='/')
  flat.update(flax.traverse_util.flatten_dict(trainable, sep='/'))
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def learning_rate_schedule(cfg, total_steps: int):
  """Linear warmup to `lr`, then cosine decay to `lr * final_lr_ratio` at `total_steps`."""
  warmup = int(round(cfg.warmup_ratio * total_steps)) if cfg.warmup_steps < 0 else cfg.warmup_steps
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.lr * cfg.final_lr_ratio)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with weight decay on matrices only (not norms, biases, embeddings' 1-D params)."""
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay,
                           mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  return optax.chain(*parts)

