"""Samples -> fixed-shape numpy rows: one sample per row (padded to a bucket length), several
samples per row (packing, with segment ids and per-sample positions), or preference pairs.

A sample is a dict of one tokenised example:
  input_ids int32 [N], loss_mask float32 [N], turn_ids int32 [N], pixel_values float32 [n, H, W, 3]
(preference: chosen_/rejected_ input_ids and loss_mask, pixel_values); for an
instruction-aware Q-Former (InstructBLIP) also each image's instruction,
  qformer_input_ids / qformer_attention_mask int32 [n, L] (padded to L = qformer_max_len).

LLaVA-NeXT (AnyRes) samples have pixel_values [n, tiles, H, W, 3] and image_sizes int32 [n, 2].

Batches keep them per image slot, aligned with pixel_values [R, M, H, W, 3] (AnyRes:
[R, M, tiles, H, W, 3] and image_sizes [R, M, 2], zero for an empty slot):
  qformer_input_ids / qformer_attention_mask int32 [R, M, L]
so a packed row's images each carry their own sample's instruction (collate functions take
`qformer=(L, pad_id)`; None = no Q-Former instruction).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TEXT_KEYS = ('input_ids', 'loss_mask', 'turn_ids')


def length(sample: dict) -> int:
  """Tokens the sample needs in a row (the longer side of a preference pair)."""
  if 'input_ids' in sample:
    return len(sample['input_ids'])
  return max(len(sample['chosen_input_ids']), len(sample['rejected_input_ids']))


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= n (buckets sorted ascending; the last is max_len)."""
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f'{n} tokens exceed the largest bucket {buckets[-1]}')


def _empty_rows(rows, seq_len, max_images, image_shape, pad_id, qformer, *int_keys):
  """Padding-filled batch buffers: text [rows, seq_len] (+ `int_keys`, zeros), image slots."""
  out = {'input_ids': np.full((rows, seq_len), pad_id, np.int32),
         'attention_mask': np.zeros((rows, seq_len), np.int32),
         'loss_mask': np.zeros((rows, seq_len), np.float32)}
  out.update({k: np.zeros((rows, seq_len), np.int32) for k in int_keys})
  out.update(_image_slots(rows, max_images, image_shape, qformer))
  return out


def _image_slots(rows: int, max_images: int, image_shape, qformer) -> dict[str, np.ndarray]:
  """Empty image slots: pixel_values [R, M, H, W, 3], num_images [R], and with
  qformer=(L, pad_id) the slots' instructions [R, M, L] (pad ids, mask 0). An AnyRes
  image_shape (tiles, H, W, 3) also gives image_sizes int32 [R, M, 2] (0 = empty slot)."""
  out = {'pixel_values': np.zeros((rows, max_images) + tuple(image_shape), np.float32),
         'num_images': np.zeros((rows,), np.int32)}
  if len(image_shape) == 4:
    out['image_sizes'] = np.zeros((rows, max_images, 2), np.int32)
  if qformer is not None:
    length, pad = qformer
    out['qformer_input_ids'] = np.full((rows, max_images, length), pad, np.int32)
    out['qformer_attention_mask'] = np.zeros((rows, max_images, length), np.int32)
  return out


def _put_images(out: dict, row: int, slot: int, sample: dict) -> int:
  """The sample's images (and their instructions) into row `row` from image slot `slot` on;
  returns the number of images."""
  k = len(sample['pixel_values'])
  out['pixel_values'][row, slot:slot + k] = sample['pixel_values']
  if 'image_sizes' in out:
    out['image_sizes'][row, slot:slot + k] = sample['image_sizes']
  if 'qformer_input_ids' in out:
    for key in ('qformer_input_ids', 'qformer_attention_mask'):
      out[key][row, slot:slot + k] = sample[key]
  return k


def collate(samples: Sequence[dict], rows: int, seq_len: int, max_images: int, image_shape,
            pad_id: int, pairs: bool = False, qformer: tuple[int, int] | None = None
            ) -> dict[str, np.ndarray]:
  """One sample per row, right-padded to seq_len; rows beyond len(samples) are empty (all
  masks 0), so a short final batch keeps its shape without adding loss.

  Returns input_ids, attention_mask, turn_ids [R, T] int32, loss_mask [R, T] float32,
  pixel_values [R, M, H, W, 3] float32 (unused slots zero), num_images [R] int32, with
  qformer=(L, pad_id) qformer_input_ids / qformer_attention_mask [R, M, L] int32; or with
  pairs=True (preference samples) `collate_pairs`' arrays.
  """
  if pairs:
    return collate_pairs(samples, rows, seq_len, max_images, image_shape, pad_id, qformer)
  out = _empty_rows(rows, seq_len, max_images, image_shape, pad_id, qformer, 'turn_ids')
  for r, s in enumerate(samples):
    n = len(s['input_ids'])
    for key in TEXT_KEYS:
      out[key][r, :n] = s[key]
    out['attention_mask'][r, :n] = 1
    out['num_images'][r] = _put_images(out, r, 0, s)
  return out


def collate_pairs(samples, rows, seq_len, max_images, image_shape, pad_id, qformer=None):
  """Preference pairs: chosen_/rejected_ {input_ids, attention_mask, loss_mask} [R, T] and the
  pair's shared pixel_values [R, M, H, W, 3] (and instructions [R, M, L])."""
  out = {}
  for side in ('chosen', 'rejected'):
    out[f'{side}_input_ids'] = np.full((rows, seq_len), pad_id, np.int32)
    out[f'{side}_attention_mask'] = np.zeros((rows, seq_len), np.int32)
    out[f'{side}_loss_mask'] = np.zeros((rows, seq_len), np.float32)
  out.update(_image_slots(rows, max_images, image_shape, qformer))
  for r, s in enumerate(samples):
    for side in ('chosen', 'rejected'):
      n = len(s[f'{side}_input_ids'])
      out[f'{side}_input_ids'][r, :n] = s[f'{side}_input_ids']
      out[f'{side}_attention_mask'][r, :n] = 1
      out[f'{side}_loss_mask'][r, :n] = s[f'{side}_loss_mask']
    out['num_images'][r] = _put_images(out, r, 0, s)
  return out


def first_fit(bins: list[list[dict]], used: list[list[int]], sample: dict, seq_len: int,
              max_images: int) -> bool:
  """Put `sample` into the first bin with room for its tokens and images; False if none has."""
  n, k = len(sample['input_ids']), len(sample['pixel_values'])
  for b, (tokens, imgs) in enumerate(used):
    if tokens + n <= seq_len and imgs + k <= max_images:
      bins[b].append(sample)
      used[b][0] += n
      used[b][1] += k
      return True
  return False


def collate_packed(bins: Sequence[Sequence[dict]], rows: int, seq_len: int, max_images: int,
                   image_shape, pad_id: int, qformer: tuple[int, int] | None = None
                   ) -> dict[str, np.ndarray]:
  """Several samples per row, concatenated in bin order.

  Besides collate()'s arrays (turn_ids dropped: answer indices would collide across samples):
    segment_ids [R, T] int32  1, 2, ... per sample of the row, 0 on padding: attention stays
                              inside a sample;
    positions   [R, T] int32  0.. within each sample: RoPE sees every sample from position 0.
  The loss mask stays each sample's own (a sample's first token is never a target, so no
  token is predicted across a boundary). A row's images are its samples' images in order, each
  slot with its own sample's Q-Former instruction (the model's image features fill the row's
  image tokens in the same order, so every sample's tokens get its own images' queries).
  """
  out = _empty_rows(rows, seq_len, max_images, image_shape, pad_id, qformer, 'segment_ids',
                    'positions')
  for r, samples in enumerate(bins):
    t = k = 0
    for seg, s in enumerate(samples, 1):
      n = len(s['input_ids'])
      out['input_ids'][r, t:t + n] = s['input_ids']
      out['loss_mask'][r, t:t + n] = s['loss_mask']
      out['attention_mask'][r, t:t + n] = 1
      out['segment_ids'][r, t:t + n] = seg
      out['positions'][r, t:t + n] = np.arange(n)
      t, k = t + n, k + _put_images(out, r, k, s)
    out['num_images'][r] = k
  return out
