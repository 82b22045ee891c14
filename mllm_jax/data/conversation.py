"""Conversations and captions -> token ids, loss mask and answer ids, for any HF tokenizer.

Assistant spans come from the tokenizer's own chat template by incremental rendering: the tokens
that appear between render(messages[:i], add_generation_prompt=True) and render(messages[:i+1])
are assistant turn i (its content and end-of-turn token). Nothing here knows a template, so the
demo tokenizer, Llama-3 and Qwen (ChatML) tokenizers share one code path.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

ROLES = ('system', 'user', 'assistant')
Tokenized = tuple[np.ndarray, np.ndarray, np.ndarray]   # ids int32 [N], loss f32 [N], turn int32 [N]


def image_token_id(tokenizer, image_token: str = '<image>') -> int:
  """Id of `image_token`; it must be a single token of the vocabulary (an added token)."""
  tid = tokenizer.convert_tokens_to_ids(image_token)
  if tid is None or tid == tokenizer.unk_token_id or tokenizer.encode(
      image_token, add_special_tokens=False) != [tid]:
    raise ValueError(f'tokenizer {tokenizer.name_or_path!r} has no single token {image_token!r}; '
                     f"add it with tokenizer.add_special_tokens({{'extra_special_tokens': "
                     f"[{image_token!r}]}}) (and resize the LLM's embeddings)")
  return tid


def _render(tokenizer, messages, add_generation_prompt=False) -> list[int]:
  text = tokenizer.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
  return tokenizer.encode(text, add_special_tokens=False)   # the template adds BOS itself


@functools.lru_cache(maxsize=16)
def _special_ids(tokenizer, vocab_size: int) -> frozenset[int]:   # vocab_size: stale-cache key
  return frozenset(tokenizer.all_special_ids) | {
      i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


@functools.lru_cache(maxsize=16)
def _check_generation_prompt(tokenizer, template: str) -> None:
  probe = [{'role': 'user', 'content': 'hi'}]
  if _render(tokenizer, probe, True) == _render(tokenizer, probe):
    raise ValueError(f'chat template of {tokenizer.name_or_path!r} ignores '
                     'add_generation_prompt, so assistant headers cannot be told from answers')


def _end_of_span(tokenizer, ids: Sequence[int], start: int, end: int) -> int:
  """Drop the separator some templates put after the end-of-turn token (ChatML's '\\n' after
  <|im_end|>): the model should learn to stop at the special token, nothing after it."""
  special = _special_ids(tokenizer, len(tokenizer))
  last = max((p for p in range(start, end) if ids[p] in special), default=None)
  if last is not None and not tokenizer.decode(ids[last + 1:end]).strip():
    return last + 1
  return end


def _expand_images(ids, loss, turns, image_id: int, num_image_tokens) -> Tokenized:
  """Repeat each image token `num_image_tokens` times at id level (an int, or one count per
  image in order: LLaVA-NeXT's depend on the image's size); images are never targets."""
  ids = np.asarray(ids, np.int32)
  is_img = ids == image_id
  reps = np.ones(len(ids), np.int64)
  if np.ndim(num_image_tokens) == 0:
    reps[is_img] = num_image_tokens
  else:
    counts = np.asarray(num_image_tokens, np.int64)
    if len(counts) != is_img.sum():
      raise ValueError(f'{int(is_img.sum())} image tags but {len(counts)} per-image token '
                       'counts')
    reps[is_img] = counts
  loss, turns = np.where(is_img, 0, loss), np.where(is_img, 0, turns)
  return (np.repeat(ids, reps), np.repeat(loss, reps).astype(np.float32),
          np.repeat(turns, reps).astype(np.int32))


def _fit(out: Tokenized, max_len: int | None, truncate: bool, image_id: int) -> Tokenized:
  n = len(out[0])
  if max_len is None or n <= max_len:
    return out
  if not truncate:
    raise ValueError(f'sequence has {n} tokens > max_len={max_len}')
  if (out[0][max_len:] == image_id).any():   # a cut image would desync tokens from pixels
    raise ValueError(f'sequence has {n} tokens > max_len={max_len} and truncating it would cut '
                     f'image tokens (last one at position '
                     f'{int(np.nonzero(out[0] == image_id)[0][-1])})')
  return tuple(x[:max_len] for x in out)


def tokenize_conversation(tokenizer, messages: Sequence[dict[str, str]], *,
                          image_token: str = '<image>', num_image_tokens: int | Sequence[int],
                          max_len: int | None = None, truncate: bool = False,
                          cache: dict | None = None) -> Tokenized:
  """Chat messages -> (ids int32 [N], loss_mask float32 [N], turn_ids int32 [N]).

  messages: [{'role': 'system'|'user'|'assistant', 'content': str}, ...], rendered with the
    tokenizer's chat template; each `image_token` in the text becomes `num_image_tokens` ids
    (or the i-th image `num_image_tokens[i]`).
  loss_mask is 1 exactly on assistant content + end-of-turn token(s); turn_ids gives those
  tokens the 1-based index of their assistant turn (0 elsewhere).
  max_len: longer sequences raise, or with truncate=True are cut (never through image tokens).
  cache: optional dict memoising the tokens of conversation prefixes, for datasets whose
    prompts repeat (pass the same dict on every call; the caller bounds its size).
  """
  if not messages:
    raise ValueError('empty conversation')
  for i, m in enumerate(messages):
    if m.get('role') not in ROLES:
      raise ValueError(f'message {i} has unknown role {m.get("role")!r}; expected one of {ROLES}')
    if not isinstance(m.get('content'), str):
      raise ValueError(f'message {i} ({m["role"]}) content must be a string, '
                       f'got {type(m.get("content")).__name__}')
  if messages[0]['role'] == 'assistant':
    raise ValueError('conversation starts with an assistant turn; it needs a user or system '
                     'turn before the first answer')
  if not any(m['role'] == 'assistant' for m in messages):
    raise ValueError('conversation has no assistant turn, so nothing to train on')
  image_id = image_token_id(tokenizer, image_token)
  _check_generation_prompt(tokenizer, str(tokenizer.chat_template))

  messages = list(messages)

  def render(n, add_generation_prompt=False):   # tokens of messages[:n]
    if cache is None:
      return _render(tokenizer, messages[:n], add_generation_prompt)
    key = (tuple((m['role'], m['content']) for m in messages[:n]), add_generation_prompt)
    if key not in cache:
      cache[key] = _render(tokenizer, messages[:n], add_generation_prompt)
    return cache[key]

  ids = render(len(messages))
  loss, turns = np.zeros(len(ids), np.float32), np.zeros(len(ids), np.int32)
  turn = 0
  for i, m in enumerate(messages):
    if m['role'] != 'assistant':
      continue
    turn += 1
    prompt, done = render(i, add_generation_prompt=True), render(i + 1)
    for n, part in ((i, prompt), (i + 1, done)):
      if ids[:len(part)] != part:
        raise ValueError(
            f'chat template of {tokenizer.name_or_path!r} is not prefix-consistent: the tokens '
            f'of messages[:{n}] are not a prefix of those of the whole conversation, so the '
            f'tokens of assistant turn {turn} cannot be located')
    end = _end_of_span(tokenizer, ids, len(prompt), len(done))
    loss[len(prompt):end], turns[len(prompt):end] = 1.0, turn
  out = _expand_images(ids, loss, turns, image_id, num_image_tokens)
  return _fit(out, max_len, truncate, image_id)


def tokenize_caption(tokenizer, caption: str, *, image_token: str = '<image>',
                     num_image_tokens: int | Sequence[int], num_images: int = 1,
                     max_len: int | None = None, truncate: bool = False) -> Tokenized:
  """LLaVA "plain" pretraining: [bos] [image tokens] caption [eos], loss on caption + eos.

  Returns (ids int32 [N], loss_mask float32 [N], turn_ids int32 [N]) with turn_ids 1 on targets.
  """
  if tokenizer.eos_token_id is None:
    raise ValueError(f'tokenizer {tokenizer.name_or_path!r} has no eos token to end captions')
  image_id = image_token_id(tokenizer, image_token)
  bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
  text = tokenizer.encode(caption, add_special_tokens=False) + [tokenizer.eos_token_id]
  ids = bos + [image_id] * num_images + text
  target = [0] * (len(ids) - len(text)) + [1] * len(text)
  out = _expand_images(ids, target, target, image_id, num_image_tokens)
  return _fit(out, max_len, truncate, image_id)
