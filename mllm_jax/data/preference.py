"""Preference pairs on the built-in scenes task: the right answer vs a wrong one.

Pair i of a split is the first question of scenes sample i (single image); chosen is its
answer, rejected a different answer that the same question gets elsewhere in the train stream:
a wrong colour or shape, a wrong count, a wrong position, or "yes" about an object that is not
there (a hallucination) - so the pairs test what the image shows, not the answer format.

Batch (B pairs, T = max_len, H = W = image_size):
    chosen_input_ids / rejected_input_ids            int32   [B, T] (right-padded)
    chosen_attention_mask / rejected_attention_mask  int32   [B, T]
    chosen_loss_mask / rejected_loss_mask            float32 [B, T] (the answer + end of turn)
    pixel_values                                     float32 [B, 1, H, W, 3] (normalised)
With a `qformer_tokenizer` (InstructBLIP), also the instruction both sides share, as the SFT
data builds it (`synthetic.QFormerInstructions`: the question, image tags removed):
    qformer_input_ids / qformer_attention_mask       int32   [B, qformer_max_len]
A pair whose chosen equals its rejected is skipped and counted (`skipped`).
"""
from __future__ import annotations

import collections
import functools
from typing import Sequence

import numpy as np

from mllm_jax.data import conversation, images, synthetic


@functools.lru_cache(maxsize=4)
def answers_by_question(seed: int = 0, num_samples: int = 4000) -> dict[str, tuple[str, ...]]:
  """Every answer each (first-turn) question gets in the first `num_samples` train samples."""
  seen = collections.defaultdict(set)
  for i in range(num_samples):
    s = synthetic.make_sample(i, split='train', seed=seed, image_size=None,
                              two_image_fraction=0.0)
    seen[_question(s)].add(s.messages[1]['content'])
  return {q: tuple(sorted(a)) for q, a in seen.items()}


def _question(sample) -> str:
  return sample.messages[0]['content'].rsplit('\n', 1)[-1]


class PreferenceTask:
  """Fixed-shape preference batches of the scenes task (see module doc)."""

  def __init__(self, tokenizer, split: str = 'train', seed: int = 0, image_size: int = 32,
               num_image_tokens: int = 16, max_len: int = 128,
               image_mean: Sequence[float] = images.CLIP_MEAN,
               image_std: Sequence[float] = images.CLIP_STD, image_token: str = '<image>',
               qformer_tokenizer=None, qformer_max_len: int = 32):
    self.tokenizer, self.split, self.seed = tokenizer, split, seed
    self.qformer_tokenizer, self.qformer_max_len = qformer_tokenizer, qformer_max_len
    self.instructions = (None if qformer_tokenizer is None else
                         synthetic.QFormerInstructions(qformer_tokenizer, qformer_max_len))
    self.image_size, self.num_image_tokens, self.max_len = image_size, num_image_tokens, max_len
    self.image_mean, self.image_std, self.image_token = image_mean, image_std, image_token
    self.answers = answers_by_question(seed)
    self.skipped = 0
    self._cache: dict = {}

  def pair(self, index: int, with_image: bool = True):
    """(sample, chosen answer, rejected answer) of pair `index`."""
    s = synthetic.make_sample(index, split=self.split, seed=self.seed,
                              image_size=self.image_size if with_image else None,
                              two_image_fraction=0.0, image_tag=self.image_token)
    chosen = s.messages[1]['content']
    wrong = [a for a in self.answers.get(_question(s), ()) if a != chosen]
    if not wrong:
      return s, chosen, chosen
    rng = np.random.default_rng((self.seed, index, 7))
    return s, chosen, wrong[rng.integers(len(wrong))]

  def _tokens(self, user: str, answer: str):
    key = (user, answer)
    if key not in self._cache:
      if len(self._cache) > 50_000:
        self._cache.clear()
      self._cache[key] = conversation.tokenize_conversation(
          self.tokenizer, [{'role': 'user', 'content': user},
                           {'role': 'assistant', 'content': answer}],
          image_token=self.image_token, num_image_tokens=self.num_image_tokens,
          max_len=self.max_len)[:2]
    return self._cache[key]

  def usable(self, start: int, n: int) -> tuple[list[int], int]:
    """The first `n` pair indices from `start` on whose chosen != rejected, and the index after
    the last one (text only: no image is rendered)."""
    out, index = [], start
    while len(out) < n:
      _, chosen, rejected = self.pair(index, with_image=False)
      if chosen == rejected:
        self.skipped += 1
      else:
        out.append(index)
      index += 1
    return out, index

  def train_iterator(self, batch_size: int, accum: int = 1, process_index: int = 0,
                     process_count: int = 1) -> synthetic.IndexIterator:
    """Each step's global batch is the next `batch_size` usable pairs; this process builds its
    rows as [accum, batch_size / (process_count * accum), ...]; state = next pair index."""
    return synthetic.IndexIterator(self.usable, self.batch_of, batch_size, accum,
                                   process_index, process_count, drop=())

  def batch(self, start: int, batch_size: int) -> dict[str, np.ndarray]:
    """Pairs from index `start` on (skipping chosen == rejected) as fixed-shape arrays."""
    return self.batch_of(self.usable(start, batch_size)[0])

  def batch_of(self, indices) -> dict[str, np.ndarray]:
    """Pairs `indices` (each with chosen != rejected) as fixed-shape arrays."""
    b, t, s = len(indices), self.max_len, self.image_size
    out = {}
    for side in ('chosen', 'rejected'):
      out[f'{side}_input_ids'] = np.full((b, t), self.tokenizer.pad_token_id, np.int32)
      out[f'{side}_attention_mask'] = np.zeros((b, t), np.int32)
      out[f'{side}_loss_mask'] = np.zeros((b, t), np.float32)
    pixels = np.zeros((b, 1, s, s, 3), np.uint8)
    pairs = [self.pair(index) for index in indices]
    if self.instructions is not None:   # the prompt's question, shared by chosen and rejected
      out.update(self.instructions([synthetic.questions(p[0].messages[:1]) for p in pairs],
                                   [f'pair {i} of split {self.split!r}' for i in indices]))
    for row, (sample, chosen, rejected) in enumerate(pairs):
      for side, answer in (('chosen', chosen), ('rejected', rejected)):
        ids, loss = self._tokens(sample.messages[0]['content'], answer)
        out[f'{side}_input_ids'][row, :len(ids)] = ids
        out[f'{side}_attention_mask'][row, :len(ids)] = 1
        out[f'{side}_loss_mask'][row, :len(ids)] = loss
      pixels[row, 0] = sample.images[0]
    out['pixel_values'] = images.normalize(pixels, self.image_mean, self.image_std)
    return out
