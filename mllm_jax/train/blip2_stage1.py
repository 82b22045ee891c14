"""BLIP-2 stage 1 (representation learning): ITC + ITM + ITG losses, the train step and a
training entry point on the built-in scenes task's captions.

    python -m mllm_jax.train.blip2_stage1 --config configs/demo_blip2_stage1.py --workdir DIR

Losses (LAVIS `Blip2Qformer.forward`; N = batch, Q = queries, E = embed_dim, L = text length):
  ITC  image-text contrastive: sim[i, j] = max_q <img_i,q, txt_j> / temp [N, N]; CE of each
       image over the texts and of each text over the images, averaged
  ITM  image-text matching: N positive pairs, N (sampled hard negative image, text) and N
       (image, hard negative text) pairs through the Q-Former with bidirectional attention;
       2-class CE over the 3N pairs
  ITG  image-grounded text generation: causal next-token CE over the text, pads excluded
loss = itc_weight * ITC + itm_weight * ITM + itg_weight * ITG. The vision tower is frozen by
the stage's `trainable` regex (default: everything but `vision/`): it gets no gradient and no
optimiser state, as in `train.steps`. The stage-1 checkpoint (WORKDIR/stage1: params + model
JSON) starts stage 2 through `mllm_params_from_stage1` (or `--config.model.init_from`-free:
see docs/qformer.md).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mllm_jax.models.blip2_stage1 import TEMP_RANGE, QFormerPretrainer
from mllm_jax.models.config import Stage1Config
from mllm_jax.train import optim
from mllm_jax.train.steps import guarded_update

STAGE1_JSON = 'stage1_model.json'   # next to `params/` in a stage-1 checkpoint
DEC_TOKEN = '[DEC]'


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def itc_similarity(image_embeds, text_embeds):
  """image_embeds [N, Q, E], text_embeds [M, E] (unit length) -> [N, M]: for each image and
  text the largest cosine similarity over the image's Q query embeddings."""
  return jnp.max(jnp.einsum('nqe,me->nmq', image_embeds, text_embeds), axis=-1)


def _targets(positive, label_smoothing):
  """positive bool [N, N] -> soft targets [N, N]: each row spread over its positives (LAVIS'
  `image_ids` targets), then smoothed as torch's CE label_smoothing does."""
  t = positive.astype(jnp.float32)
  t = t / jnp.sum(t, axis=-1, keepdims=True)
  return optax.smooth_labels(t, label_smoothing) if label_smoothing else t


def itc_loss(sim, temp, positive=None, label_smoothing: float = 0.0):
  """Image-text contrastive loss.

  sim [N, N] (image i, text j; `itc_similarity`), temp [] (> 0), positive bool [N, N] (pairs
  that count as matched; default the diagonal: text i describes image i). Returns
  dict(loss [] = mean of the image->text and text->image cross-entropies of sim / temp,
  i2t_accuracy [] = fraction of images whose best text is a positive)."""
  n = sim.shape[0]
  if positive is None:
    positive = jnp.eye(n, dtype=bool)
  logits = sim.astype(jnp.float32) / temp
  i2t = optax.softmax_cross_entropy(logits, _targets(positive, label_smoothing))
  t2i = optax.softmax_cross_entropy(logits.T, _targets(positive.T, label_smoothing))
  hit = jnp.take_along_axis(positive, jnp.argmax(logits, axis=1)[:, None], axis=1)[:, 0]
  return dict(loss=(jnp.mean(i2t) + jnp.mean(t2i)) / 2, i2t_accuracy=jnp.mean(hit))


def sample_hard_negatives(key, sim, temp, positive=None):
  """For each text a negative image, and for each image a negative text, drawn from the softmax
  of their ITC similarities (sim / temp [N, N], no gradient) with the positives excluded.

  -> (neg_image [N]: image index for text j, neg_text [N]: text index for image i), int32.
  Every row needs a negative: a batch of N >= 2 whose rows aren't all positives."""
  n = sim.shape[0]
  if n < 2:
    raise ValueError(f'ITM hard negatives need a batch of at least 2 pairs, got {n}')
  if positive is None:
    positive = jnp.eye(n, dtype=bool)
  logits = jnp.where(positive, -jnp.inf, jax.lax.stop_gradient(sim) / temp)
  k_img, k_txt = jax.random.split(key)
  neg_image = jax.random.categorical(k_img, logits.T, axis=-1)   # text j -> image
  neg_text = jax.random.categorical(k_txt, logits, axis=-1)      # image i -> text
  return neg_image.astype(jnp.int32), neg_text.astype(jnp.int32)


def itm_pairs(neg_image, neg_text):
  """-> (image index [3N], text index [3N], label [3N]): N positive pairs (i, i), then
  (neg_image[j], j) and (i, neg_text[i]) with label 0 (LAVIS' order)."""
  n = neg_image.shape[0]
  r = jnp.arange(n, dtype=jnp.int32)
  image = jnp.concatenate([r, neg_image, r])
  text = jnp.concatenate([r, r, neg_text])
  label = jnp.concatenate([jnp.ones(n, jnp.int32), jnp.zeros(2 * n, jnp.int32)])
  return image, text, label


def itm_loss(logits, labels):
  """logits [P, 2] (class 1 = matched), labels int [P] -> dict(loss [] mean CE, accuracy [])."""
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return dict(loss=jnp.mean(ce), accuracy=jnp.mean(jnp.argmax(logits, -1) == labels))


def itg_loss(logits, input_ids, attention_mask, label_smoothing: float = 0.0):
  """Next-token CE of image-grounded generation: position t predicts input_ids[:, t + 1].

  logits [N, L, V] (fp32), input_ids / attention_mask [N, L] (pad = 0 in the mask, excluded
  as targets). -> dict(loss [] mean over target tokens, tokens [], accuracy [])."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets, mask = input_ids[:, 1:], attention_mask[:, 1:].astype(jnp.float32)
  onehot = jax.nn.one_hot(targets, logits.shape[-1])
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  ce = optax.softmax_cross_entropy(logits, onehot)
  tokens = jnp.maximum(jnp.sum(mask), 1.0)
  right = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return dict(loss=jnp.sum(ce * mask) / tokens, tokens=jnp.sum(mask),
              accuracy=jnp.sum(right * mask) / tokens)
