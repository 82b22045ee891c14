"""User data files -> validated records: LLaVA conversations, caption pairs, preference pairs.

Formats read (JSON list or JSONL, one record per line):

  conversation  LLaVA's instruction data (llava_v1_5_mix665k.json):
                {"id", "image": path | [paths] (optional), "conversations":
                 [{"from": "human" | "gpt" | "system", "value": "... <image> ..."}, ...]}
  caption       image + caption for pretraining: {"id", "image", "caption"} (or "text"), or
                LLaVA's pretrain JSON (blip_laion_cc_sbu_558k.json): a conversation whose
                assistant turn is the caption (the instruction is dropped: LLaVA's "plain"
                template trains [image tokens] caption </s>).
  preference    TRL's names: {"prompt", "chosen", "rejected", "images" (optional)}; prompt a
                string or a list of {"role", "content"} messages, chosen / rejected a string
                or a list with one assistant message; content may be TRL's multimodal parts
                [{"type": "image"}, {"type": "text", "text": ...}]. Insight-V's
                {"id", "image", "prompt", "answer", "chosen", "rejected"} is read too.

`parse(raw, kind, source)` turns one raw record into the common form

  {'id': str, 'source': 'file:line', 'images': [relative paths],
   'messages': [{'role', 'content'}] (conversation; the prompt for preference; for a caption
               record from LLaVA's pretrain JSON, the conversation it came from),
   'caption': str (caption), 'chosen' / 'rejected': str (preference)}

and raises `BadSample(reason, ...)` for what the bad-input policy handles (see REASONS).
`image_instructions(messages, n)` picks the text an instruction-aware Q-Former (InstructBLIP)
reads for each image.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np

IMAGE_TAG = '<image>'
KINDS = ('conversation', 'caption', 'preference')
# LLaVA / ShareGPT role names -> chat-template roles.
ROLE_NAMES = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
              'system': 'system'}
# Why a sample can be dropped under bad_input='skip' (the keys of the skip counts).
REASONS = ('bad_record', 'bad_image', 'image_tag_mismatch', 'too_many_images',
           'empty_conversation', 'no_assistant_turn', 'unknown_role', 'too_long')


class BadSample(ValueError):
  """A sample the bad-input policy decides about: `reason` is one of REASONS; the message
  names the file (and line) and the sample id."""

  def __init__(self, reason: str, source: str, sample_id: str, detail: str):
    assert reason in REASONS, reason
    self.reason, self.source, self.sample_id = reason, source, sample_id
    super().__init__(f'{source}: sample {sample_id!r}: {detail} [{reason}]')

  def __reduce__(self):   # so the error crosses grain's worker processes intact
    return (_rebuild_bad_sample, (self.reason, self.source, self.sample_id, str(self)))


def _rebuild_bad_sample(reason, source, sample_id, message):
  e = BadSample.__new__(BadSample)
  e.reason, e.source, e.sample_id = reason, source, sample_id
  ValueError.__init__(e, message)
  return e


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
class UnparsableRecord(str):
  """A JSONL line that is not JSON (the string says why); `parse` makes it a bad record."""


class JsonRecords:
  """Random access to the raw records of JSON / JSONL files: `len`, `[i] -> (raw, 'file:line')`.

  A JSON list is parsed once and kept as compact strings; JSONL is indexed by line offsets
  and read lazily, so worker processes get a small object. Both are picklable (grain sends the
  source to its worker processes). A line or file that is not JSON is an error naming it.
  """

  def __init__(self, paths: Sequence[str]):
    self.paths = [os.fspath(p) for p in paths]
    if not self.paths:
      raise ValueError('no data files given')
    self._items: list[tuple[int, int, str | int]] = []   # (file, index / line, JSON | offset)
    for f, path in enumerate(self.paths):
      if not os.path.exists(path):
        raise FileNotFoundError(f'data file {path!r} does not exist')
      if path.endswith('.jsonl'):
        offset = 0
        with open(path, 'rb') as fh:
          for lineno, line in enumerate(fh, 1):
            if line.strip():
              self._items.append((f, lineno, offset))
            offset += len(line)
      else:
        with open(path, encoding='utf-8') as fh:
          try:
            data = json.load(fh)
          except json.JSONDecodeError as e:
            raise ValueError(f'{path}: not valid JSON ({e}); JSONL files must end in .jsonl')
        if not isinstance(data, list):
          raise ValueError(f'{path}: expected a JSON list of records, got {type(data).__name__}')
        self._items += [(f, k, json.dumps(r, ensure_ascii=False)) for k, r in enumerate(data)]

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, i: int) -> tuple[Any, str]:
    f, pos, payload = self._items[i]
    path = self.paths[f]
    if isinstance(payload, str):
      return json.loads(payload), f'{path}[{pos}]'
    with open(path, 'rb') as fh:
      fh.seek(payload)
      line = fh.readline()
    where = f'{path}:{pos}'
    try:
      return json.loads(line), where
    except json.JSONDecodeError as e:   # a bad sample like any other: the policy decides
      return UnparsableRecord(f'not a JSON record ({e})'), where


def record_id(raw: Any, index: int) -> str:
  """The record's own id, or its index in the file list."""
  if isinstance(raw, dict) and raw.get('id') is not None:
    return str(raw['id'])
  return f'#{index}'


def in_eval_split(sample_id: str, fraction: float) -> bool:
  """Stable held-out split by id: the same records are held out on every run and host."""
  if fraction <= 0:
    return False
  h = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], 'little')
  return h / 2 ** 64 < fraction


def split_indices(records: JsonRecords, fraction: float, split: str) -> np.ndarray:
  """Indices of `records` in `split` ('train' or 'eval') of a held-out `fraction` by id."""
  keep = [in_eval_split(record_id(records[i][0], i), fraction) == (split == 'eval')
          for i in range(len(records))]
  return np.nonzero(keep)[0]


# ----------------------------------------------------------------------------------------------
# Raw record -> common form
# ----------------------------------------------------------------------------------------------
def _image_list(value, bad) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):
    return [value]
  if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
    return list(value)
  raise bad('bad_record', f'images must be a path or a list of paths, got {value!r:.80}')


def _content(value, bad) -> str:
  """A message's content: a string, or TRL's parts ({'type': 'image'} -> '<image>')."""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    out = []
    for part in value:
      if isinstance(part, dict) and part.get('type') == 'image':
        out.append(IMAGE_TAG)
      elif isinstance(part, dict) and part.get('type') == 'text' and isinstance(
          part.get('text'), str):
        out.append(part['text'])
      else:
        raise bad('bad_record', f'unknown message content part {part!r:.80}')
    return ''.join(out)
  raise bad('bad_record', f'message content must be a string or a list of parts, got '
            f'{type(value).__name__}')


def _messages(turns, bad, role_key='from', content_key='value') -> list[dict[str, str]]:
  if not isinstance(turns, list):
    raise bad('bad_record', f'conversation must be a list of turns, got {type(turns).__name__}')
  out = []
  for i, t in enumerate(turns):
    if not isinstance(t, dict):
      raise bad('bad_record', f'turn {i} is not an object: {t!r:.80}')
    rk, ck = (role_key, content_key) if role_key in t else ('role', 'content')
    role = t.get(rk)
    if role not in ROLE_NAMES:
      raise bad('unknown_role', f'turn {i} has unknown role {role!r}; expected one of '
                f'{sorted(ROLE_NAMES)}')
    out.append({'role': ROLE_NAMES[role], 'content': _content(t.get(ck), bad)})
  return out


def check_conversation(messages, bad) -> None:
  """The structural checks of a chat the tokenizer's template can render and we can train on."""
  if not messages:
    raise bad('empty_conversation', 'the conversation has no turns')
  if not any(m['role'] == 'assistant' for m in messages):
    raise bad('no_assistant_turn', 'the conversation has no assistant turn to train on')
  if messages[0]['role'] == 'assistant':
    raise bad('bad_record', 'the conversation starts with an assistant turn')


def check_image_tags(texts: Sequence[str], images: Sequence[str], bad) -> None:
  n_tags = sum(t.count(IMAGE_TAG) for t in texts)
  if n_tags != len(images):
    raise bad('image_tag_mismatch', f'{n_tags} {IMAGE_TAG} tag(s) in the text but '
              f'{len(images)} image(s)')


def _tag_prompt(messages, images) -> None:
  """TRL / Insight-V prompts often carry no image tag: put one per image at the start of the
  first user turn (where LLaVA's preprocessing puts it). A prompt with some tags is kept."""
  if images and not any(IMAGE_TAG in m['content'] for m in messages):
    first = next((m for m in messages if m['role'] == 'user'), None)
    if first is not None:
      first['content'] = f'{IMAGE_TAG}\n' * len(images) + first['content']


def _answer(value, bad, name) -> str:
  """chosen / rejected: a string or [one assistant message]."""
  if isinstance(value, str):
    return value
  if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
    role = value[0].get('role', value[0].get('from'))
    if ROLE_NAMES.get(role) != 'assistant':
      raise bad('unknown_role' if role not in ROLE_NAMES else 'bad_record',
                f'{name} must be an assistant message, got role {role!r}')
    return _content(value[0].get('content', value[0].get('value')), bad)
  raise bad('bad_record', f'{name} must be a string or a list with one assistant message')


def parse(raw: Any, kind: str, source: str, index: int = 0) -> dict:
  """One raw record of `kind` (see KINDS) -> the common form (module doc). Raises BadSample."""
  sid = record_id(raw, index)

  def bad(reason, detail):
    return BadSample(reason, source, sid, detail)

  if isinstance(raw, UnparsableRecord):
    raise bad('bad_record', str(raw))
  if not isinstance(raw, dict):
    raise bad('bad_record', f'a record must be a JSON object, got {type(raw).__name__}')
  out: dict = {'id': sid, 'source': source}
  if kind == 'conversation':
    if 'conversations' not in raw:
      raise bad('bad_record', 'no "conversations" key')
    out['images'] = _image_list(raw.get('image', raw.get('images')), bad)
    out['messages'] = _messages(raw['conversations'], bad)
    check_conversation(out['messages'], bad)
    check_image_tags([m['content'] for m in out['messages']], out['images'], bad)
  elif kind == 'caption':
    out['images'] = _image_list(raw.get('image', raw.get('images')), bad)
    if 'conversations' in raw:   # LLaVA pretrain JSON: the assistant turn is the caption
      msgs = _messages(raw['conversations'], bad)
      check_conversation(msgs, bad)
      check_image_tags([m['content'] for m in msgs], out['images'], bad)
      out['caption'] = [m['content'] for m in msgs if m['role'] == 'assistant'][-1]
      out['messages'] = msgs
    else:
      caption = raw.get('caption', raw.get('text'))
      if not isinstance(caption, str):
        raise bad('bad_record', 'a caption record needs a "caption" (or "text") string')
      out['caption'] = caption
    if not out['images']:
      raise bad('image_tag_mismatch', 'a caption record needs an image')
    if not out['caption'].strip():
      raise bad('no_assistant_turn', 'empty caption')
  elif kind == 'preference':
    for key in ('prompt', 'chosen', 'rejected'):
      if key not in raw:
        raise bad('bad_record', f'no {key!r} key (preference records need prompt, chosen, '
                  'rejected)')
    out['images'] = _image_list(raw.get('images', raw.get('image')), bad)
    prompt = raw['prompt']
    if isinstance(prompt, str):
      msgs = [{'role': 'user', 'content': prompt}] if prompt.strip() else []
    else:
      msgs = _messages(prompt, bad)
    if not msgs:
      raise bad('empty_conversation', 'empty prompt')
    if msgs[-1]['role'] == 'assistant':
      raise bad('bad_record', 'the prompt ends with an assistant turn')
    _tag_prompt(msgs, out['images'])
    out['messages'] = msgs
    out['chosen'], out['rejected'] = (_answer(raw[k], bad, k) for k in ('chosen', 'rejected'))
    for k in ('chosen', 'rejected'):
      if not out[k].strip():
        raise bad('no_assistant_turn', f'empty {k} answer')
    check_image_tags([m['content'] for m in msgs], out['images'], bad)
  else:
    raise ValueError(f'unknown record kind {kind!r}; expected one of {KINDS}')
  return out


def image_instructions(messages: Sequence[dict], n_images: int) -> list[str]:
  """The instruction an instruction-aware Q-Former (InstructBLIP) reads for each image, in
  image order: the text of the turn that carries the image's tag (InstructBlipProcessor's
  instruction is the prompt that comes with the image), tags removed and whitespace collapsed;
  if nothing is left (a turn that is only the tag), the text of the next user turn that has
  some. Later turns of a multi-turn chat are not read: an image's query outputs are computed
  once, with the question that comes with it, as they are when generating. Two images of one
  turn share its text."""
  clean = lambda text: ' '.join(text.replace(IMAGE_TAG, ' ').split())
  out = []
  for j, m in enumerate(messages):
    if IMAGE_TAG not in m['content']:
      continue
    text = clean(m['content'])
    if not text:
      text = next((t for t in (clean(u['content']) for u in messages[j + 1:]
                               if u['role'] == 'user') if t), '')
    out += [text] * m['content'].count(IMAGE_TAG)
  if len(out) != n_images:   # parse() checked the tags; only a caller's mistake gets here
    raise ValueError(f'{len(out)} {IMAGE_TAG} tags for {n_images} images')
  return out


def kind_for_task(task: str) -> str:
  """The record kind a training task reads: caption -> caption, vqa -> conversation, dpo /
  reward -> preference."""
  kinds = {'caption': 'caption', 'vqa': 'conversation', 'sft': 'conversation',
           'dpo': 'preference', 'reward': 'preference'}
  if task not in kinds:
    raise ValueError(f'no file-based data for task {task!r}; expected one of {sorted(kinds)}')
  return kinds[task]
