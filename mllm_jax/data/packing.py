"""Samples -> fixed-shape numpy rows: one sample per row (padded to a bucket length), several
samples per row (packing, with segment ids and per-sample positions), or preference pairs.

A sample is a dict of one tokenised example:
  input_ids int32 [N], loss_mask float32 [N], turn_ids int32 [N], pixel_values float32 [n, H, W, 3]
(preference: chosen_/rejected_ input_ids and loss_mask, pixel_values).
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


def _empty_rows(rows, seq_len, max_images, image_shape, pad_id, *int_keys):
  """Padding-filled batch buffers: text [rows, seq_len] (+ `int_keys`, zeros), image slots."""
  out = {'input_ids': np.full((rows, seq_len), pad_id, np.int32),
         'attention_mask': np.zeros((rows, seq_len), np.int32),
         'loss_mask': np.zeros((rows, seq_len), np.float32)}
  out.update({k: np.zeros((rows, seq_len), np.int32) for k in int_keys})
  out.update(pixel_values=_pixels(rows, max_images, image_shape),
             num_images=np.zeros((rows,), np.int32))
  return out


def _pixels(rows: int, max_images: int, image_shape) -> np.ndarray:
  return np.zeros((rows, max_images) + tuple(image_shape), np.float32)


def collate(samples: Sequence[dict], rows: int, seq_len: int, max_images: int, image_shape,
            pad_id: int, pairs: bool = False) -> dict[str, np.ndarray]:
  """One sample per row, right-padded to seq_len; rows beyond len(samples) are empty (all
  masks 0), so a short final batch keeps its shape without adding loss.

  Returns input_ids, attention_mask, turn_ids [R, T] int32, loss_mask [R, T] float32,
  pixel_values [R, M, H, W, 3] float32 (unused slots zero), num_images [R] int32; or with
  pairs=True (preference samples) `collate_pairs`' arrays.
  """
  if pairs:
    return collate_pairs(samples, rows, seq_len, max_images, image_shape, pad_id)
  out = _empty_rows(rows, seq_len, max_images, image_shape, pad_id, 'turn_ids')
  for r, s in enumerate(samples):
    n, k = len(s['input_ids']), len(s['pixel_values'])
    for key in TEXT_KEYS:
      out[key][r, :n] = s[key]
    out['attention_mask'][r, :n] = 1
    out['pixel_values'][r, :k] = s['pixel_values']
    out['num_images'][r] = k
  return out


def collate_pairs(samples, rows, seq_len, max_images, image_shape, pad_id):
  """Preference pairs: chosen_/rejected_ {input_ids, attention_mask, loss_mask} [R, T] and the
  pair's shared pixel_values [R, M, H, W, 3]."""
  out = {}
  for side in ('chosen', 'rejected'):
    out[f'{side}_input_ids'] = np.full((rows, seq_len), pad_id, np.int32)
    out[f'{side}_attention_mask'] = np.zeros((rows, seq_len), np.int32)
    out[f'{side}_loss_mask'] = np.zeros((rows, seq_len), np.float32)
  out['pixel_values'] = _pixels(rows, max_images, image_shape)
  out['num_images'] = np.zeros((rows,), np.int32)
  for r, s in enumerate(samples):
    for side in ('chosen', 'rejected'):
      n = len(s[f'{side}_input_ids'])
      out[f'{side}_input_ids'][r, :n] = s[f'{side}_input_ids']
      out[f'{side}_attention_mask'][r, :n] = 1
      out[f'{side}_loss_mask'][r, :n] = s[f'{side}_loss_mask']
    k = len(s['pixel_values'])
    out['pixel_values'][r, :k] = s['pixel_values']
    out['num_images'][r] = k
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
                   image_shape, pad_id: int) -> dict[str, np.ndarray]:
  """Several samples per row, concatenated in bin order.

  Besides collate()'s arrays (turn_ids dropped: answer indices would collide across samples):
    segment_ids [R, T] int32  1, 2, ... per sample of the row, 0 on padding: attention stays
                              inside a sample;
    positions   [R, T] int32  0.. within each sample: RoPE sees every sample from position 0.
  The loss mask stays each sample's own (a sample's first token is never a target, so no
  token is predicted across a boundary). A row's images are its samples' images in order.
  """
  out = _empty_rows(rows, seq_len, max_images, image_shape, pad_id, 'segment_ids', 'positions')
  for r, samples in enumerate(bins):
    t = k = 0
    for seg, s in enumerate(samples, 1):
      n, m = len(s['input_ids']), len(s['pixel_values'])
      out['input_ids'][r, t:t + n] = s['input_ids']
      out['loss_mask'][r, t:t + n] = s['loss_mask']
      out['attention_mask'][r, t:t + n] = 1
      out['segment_ids'][r, t:t + n] = seg
      out['positions'][r, t:t + n] = np.arange(n)
      out['pixel_values'][r, k:k + m] = s['pixel_values']
      t, k = t + n, k + m
    out['num_images'][r] = k
  return out
