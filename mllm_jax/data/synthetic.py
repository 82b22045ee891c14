"""The built-in "scenes" vision-language task: coloured shapes in the quadrants of a dark canvas.

Nothing is downloaded. Sample `i` of a split is a pure function of (seed, split, i), so batches
don't depend on batch size or call order, and the `eval` split never shares a seed with `train`.

  caption: "a red circle at the top left and a blue square at the bottom right."
  vqa:     1-3 turns of one- or two-word answers (colour, shape, count, position, exists);
           ~10% of samples show two scenes and compare them (compare, total).

Every answer depends on the image: a model that ignores the pixels is at `chance_accuracy()`.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Sequence

import numpy as np

from mllm_jax.data import conversation, images

SHAPES = ('square', 'circle', 'triangle')
COLOURS = {'red': (220, 40, 40), 'green': (40, 190, 60), 'blue': (50, 90, 230),
           'yellow': (230, 210, 40)}
QUADRANTS = ('top left', 'top right', 'bottom left', 'bottom right')   # index = 2 * row + col
NUMBERS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six')
SPLITS = {'train': 0, 'eval': 1}
QUESTION_KINDS = ('colour', 'shape', 'count', 'position', 'exists', 'compare', 'total')
MAX_OBJECTS = 3
MAX_TURNS = 3
_FIRST_TURN_KINDS = ('colour', 'shape', 'count', 'position', 'exists')
_ATTRIBUTE_KINDS = ('colour', 'shape', 'position')


@dataclasses.dataclass(frozen=True)
class SceneObject:
  shape: str
  colour: str
  quadrant: int   # index into QUADRANTS


Scene = tuple[SceneObject, ...]   # sorted by quadrant: the order captions mention objects in


@dataclasses.dataclass
class Sample:
  """One raw record. `messages` for vqa, `caption` for caption; `kinds` has one entry per answer."""
  index: int
  scenes: tuple[Scene, ...]
  kinds: tuple[str, ...]
  messages: list[dict[str, str]] | None = None
  caption: str | None = None
  images: list[np.ndarray] | None = None   # uint8 [H, W, 3] per scene


def random_scene(rng: np.random.Generator) -> Scene:
  """1..MAX_OBJECTS objects with random shape and colour, each in its own quadrant."""
  n = int(rng.integers(1, MAX_OBJECTS + 1))
  quadrants = np.sort(rng.choice(len(QUADRANTS), n, replace=False))
  colours = list(COLOURS)
  return tuple(SceneObject(SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))],
                           int(q)) for q in quadrants)


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[:size, :size] + 0.5
  return yy[:, :1], xx[:1, :]                    # [size, 1], [1, size]: broadcast, not copied


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
  """Draw `scene` on a dark size x size canvas -> uint8 [size, size, 3].

  Each object fills 55-80% of its quadrant's width at a random offset inside the quadrant, in
  its colour +-20 per channel, so no two renderings are pixel-identical.
  """
  img = np.full((size, size, 3), rng.integers(0, 40), np.uint8)
  half = size / 2
  yy, xx = _pixel_centres(size)
  for obj in scene:
    r = half * rng.uniform(0.275, 0.4)           # half-extent of the shape
    margin = 0.05 * half
    row, col = divmod(obj.quadrant, 2)
    cx = col * half + rng.uniform(r + margin, half - r - margin)
    cy = row * half + rng.uniform(r + margin, half - r - margin)
    dx, dy = xx - cx, yy - cy
    if obj.shape == 'square':
      mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif obj.shape == 'circle':
      mask = dx * dx + dy * dy <= r * r
    elif obj.shape == 'triangle':                # apex up, base 2r wide, height 2r
      mask = (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
    else:
      raise ValueError(f'no renderer for shape {obj.shape!r}')
    colour = np.asarray(COLOURS[obj.colour]) + rng.integers(-20, 21, 3)
    img[mask] = np.clip(colour, 0, 255).astype(np.uint8)
  return img


def scene_caption(scene: Scene) -> str:
  parts = [f'a {o.colour} {o.shape} at the {QUADRANTS[o.quadrant]}' for o in scene]
  head = ', '.join(parts[:-1])
  return (f'{head} and {parts[-1]}' if head else parts[-1]) + '.'


# Questions are (kind, question, answer). No turn may give a later answer away, or a model could
# score without looking: "is there a red circle?" - "yes" answers "what colour is the circle?",
# so does "where is the red circle?", a named quadrant rules out answers to "where is ...?", and
# "what colour is the circle?" (asked only of a lone circle) says no other object is a circle.
# Colours, shapes and quadrants are drawn independently, so these rules keep answers blind-proof:
#   - count / exists / position / two-image questions stand alone (single-turn conversations);
#   - follow-ups ask colours (nothing earlier constrains them), or further shapes after shape
#     questions only (one quadrant's shape says nothing of another's).
def _attribute_questions(scene: Scene, kind: str):
  out = []
  for o in scene:
    if kind == 'colour' and sum(p.shape == o.shape for p in scene) == 1:
      out.append(('colour', f'what colour is the {o.shape}?', o.colour))
    elif kind == 'shape':
      out.append(('shape', f'what shape is at the {QUADRANTS[o.quadrant]}?', o.shape))
    elif kind == 'position' and sum((p.shape, p.colour) == (o.shape, o.colour) for p in scene) == 1:
      out.append(('position', f'where is the {o.colour} {o.shape}?', QUADRANTS[o.quadrant]))
  return out


def _presence_question(scene: Scene, kind: str, rng: np.random.Generator):
  if kind == 'count':
    targets = SHAPES + ('object',)               # 'object': count everything
    shape = targets[rng.integers(len(targets))]
    if shape == 'object':
      return ('count', 'how many objects are there?', NUMBERS[len(scene)])
    return ('count', f'how many {shape}s are there?', NUMBERS[sum(o.shape == shape for o in scene)])
  # exists: balanced 50/50; a "yes" names a present object, a "no" an absent combination.
  present = sorted({(o.colour, o.shape) for o in scene})
  if rng.random() < 0.5:
    (colour, shape), answer = present[rng.integers(len(present))], 'yes'
  else:
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    (colour, shape), answer = absent[rng.integers(len(absent))], 'no'
  return ('exists', f'is there a {colour} {shape}?', answer)


def _vqa_turns(scene: Scene, rng: np.random.Generator):
  """1..MAX_TURNS (kind, question, answer) about one scene, without give-aways between turns."""
  n_turns = int(rng.integers(1, MAX_TURNS + 1))
  attrs = {k: _attribute_questions(scene, k) for k in _ATTRIBUTE_KINDS}
  kinds = [k for k in _FIRST_TURN_KINDS if k in ('count', 'exists') or attrs[k]]
  kind = kinds[rng.integers(len(kinds))]
  if kind in ('count', 'exists'):
    return [_presence_question(scene, kind, rng)]
  if kind == 'position':   # it names an object's colour and shape: standalone too
    n_turns = 1
  turns = [attrs[kind][rng.integers(len(attrs[kind]))]]
  while len(turns) < n_turns:
    allowed = ('colour', 'shape') if all(t[0] == 'shape' for t in turns) else ('colour',)
    # Pick the kind before looking at the scene: falling back to whichever kind has questions
    # left would tie the kind to the answers (no colour question <=> no lone shape).
    cands = [q for q in attrs[allowed[rng.integers(len(allowed))]] if q not in turns]
    if not cands:
      break
    turns.append(cands[rng.integers(len(cands))])
  return turns


def _two_image_turn(a: Scene, b: Scene, rng: np.random.Generator):
  options = [('total', 'how many objects are there in the two images together?',
              NUMBERS[len(a) + len(b)])]
  if len(a) != len(b):
    options.append(('compare', 'which image has more objects?',
                    'first' if len(a) > len(b) else 'second'))
  return options[rng.integers(len(options))]


def make_sample(index: int, *, kind: str = 'vqa', split: str = 'train', seed: int = 0,
                image_size: int | None = 32, two_image_fraction: float = 0.1,
                image_tag: str = '<image>') -> Sample:
  """Sample `index` of `split`: a pure function of its arguments. image_size=None skips pixels."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {sorted(SPLITS)}')
  if kind not in ('caption', 'vqa'):
    raise ValueError(f"unknown task kind {kind!r}; expected 'caption' or 'vqa'")
  key = (seed, SPLITS[split], index)
  rng = np.random.default_rng(key + (0,))
  scenes = (random_scene(rng),)
  if kind == 'caption':
    sample = Sample(index, scenes, ('caption',), caption=scene_caption(scenes[0]))
  else:
    # Always draw both numbers so the rest of the stream doesn't depend on two_image_fraction.
    two_images, other = rng.random() < two_image_fraction, random_scene(rng)
    if two_images:
      scenes += (other,)
      turns = [_two_image_turn(*scenes, rng)]
    else:
      turns = _vqa_turns(scenes[0], rng)
    messages = []
    for t, (_, question, answer) in enumerate(turns):
      prefix = f'{image_tag}\n' * len(scenes) if t == 0 else ''
      messages += [{'role': 'user', 'content': prefix + question},
                   {'role': 'assistant', 'content': answer}]
    sample = Sample(index, scenes, tuple(t[0] for t in turns), messages=messages)
  if image_size is not None:   # pixels from their own stream: text never depends on image_size
    img_rng = np.random.default_rng(key + (1,))
    sample.images = [render_scene(s, image_size, img_rng) for s in scenes]
  return sample


def _answered_questions(split: str, num_samples: int, seed: int, two_image_fraction: float):
  for i in range(num_samples):
    s = make_sample(i, split=split, seed=seed, image_size=None,
                    two_image_fraction=two_image_fraction)
    for kind, q, a in zip(s.kinds, s.messages[::2], s.messages[1::2]):
      yield kind, q['content'].rsplit('\n', 1)[-1], a['content']


def chance_accuracy(num_samples: int = 4000, *, seed: int = 0,
                    two_image_fraction: float = 0.1) -> dict[str, float]:
  """Held-out exact-match accuracy of a blind model, per question kind and overall ('all').

  The blind model answers each question with its most frequent answer on `num_samples` train
  samples (it never sees the image); it is scored on the first `num_samples` eval samples.
  """
  counts = collections.defaultdict(collections.Counter)   # question -> answer counts
  for _, q, a in _answered_questions('train', num_samples, seed, two_image_fraction):
    counts[q][a] += 1
  hits, totals = collections.Counter(), collections.Counter()
  for kind, q, a in _answered_questions('eval', num_samples, seed, two_image_fraction):
    guess = counts[q].most_common(1)[0][0] if counts[q] else None
    for key in (kind, 'all'):
      hits[key] += guess == a
      totals[key] += 1
  return {k: hits[k] / totals[k] for k in totals}


CAPTION_INSTRUCTION = 'A short image caption:'   # one of InstructBLIP's captioning prompts


def instruction(sample: Sample) -> str:
  """The text an instruction-aware Q-Former reads: the sample's questions (image tags removed),
  or `CAPTION_INSTRUCTION` for a caption."""
  if sample.caption is not None:
    return CAPTION_INSTRUCTION
  return questions(sample.messages)


def questions(messages) -> str:
  """The user turns of `messages` without their image tags (each tag is a line of its own
  before the text), joined by spaces."""
  return ' '.join(m['content'].split('\n')[-1] for m in messages if m['role'] == 'user')


class QFormerInstructions:
  """Instruction texts -> an instruction-aware Q-Former's input rows: each tokenised with its
  tokenizer (memoised, bounded), right-padded with its pad id to `max_len`. The built-in tasks,
  the file pipeline (in its grain workers) and iterative DPO all tokenise through it.

    rows = QFormerInstructions(tokenizer, max_len)(texts, wheres)
    rows['qformer_input_ids'], rows['qformer_attention_mask']   # int32 [len(texts), max_len]

  An instruction longer than `max_len` is an error (`too_long(message)` builds it; default
  ValueError), or with `truncate` is cut as the tokenizer truncates (special tokens kept, as
  LAVIS' InstructBLIP tokenises it).
  """

  def __init__(self, tokenizer, max_len: int, truncate: bool = False):
    if tokenizer.pad_token_id is None:
      raise ValueError('the Q-Former tokenizer has no pad token (config.data.qformer_tokenizer)')
    self.tokenizer, self.max_len, self.truncate = tokenizer, max_len, truncate
    self._cache: dict = {}

  def __getstate__(self):   # the memo stays in its process (grain workers get an empty one)
    return {**self.__dict__, '_cache': {}}

  def ids(self, text: str, what: str, too_long: Callable[[str], Exception] = ValueError
          ) -> list[int]:
    """Token ids of `text`, which `what` names in the error (e.g. 'sample 3: its Q-Former
    instruction')."""
    if text not in self._cache:
      if len(self._cache) >= 100_000:
        self._cache.clear()
      self._cache[text] = self.tokenizer(text)['input_ids']
    ids = self._cache[text]
    if len(ids) <= self.max_len:
      return ids
    if not self.truncate:
      raise too_long(f'{what} ({text[:60]!r}) has {len(ids)} tokens > '
                     f'config.data.qformer_max_len={self.max_len}')
    return self.tokenizer(text, truncation=True, max_length=self.max_len)['input_ids']

  def __call__(self, texts: Sequence[str], wheres: Sequence[str],
               too_long: Callable[[str], Exception] = ValueError) -> dict[str, np.ndarray]:
    """Rows for `texts`; `wheres` name each one's sample in errors."""
    return self.rows([self.ids(text, f'{where}: its Q-Former instruction', too_long)
                      for text, where in zip(texts, wheres)])

  def rows(self, ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """Token id lists -> the padded rows."""
    out = {'qformer_input_ids': np.full((len(ids), self.max_len), self.tokenizer.pad_token_id,
                                        np.int32),
           'qformer_attention_mask': np.zeros((len(ids), self.max_len), np.int32)}
    for row, q in enumerate(ids):
      out['qformer_input_ids'][row, :len(q)], out['qformer_attention_mask'][row, :len(q)] = q, 1
    return out


class SyntheticTask:
  """Fixed-shape numpy batches of the scenes task.

    task = SyntheticTask(tokenizer, kind='vqa', split='train')
    batch = task.batch(start, batch_size)   # samples start .. start + batch_size - 1

  Batch (B = batch_size, T = max_len, M = max_images, H = W = image_size):
    input_ids      int32   [B, T]  right-padded with pad_token_id; each image is
                                   `num_image_tokens` copies of the image token
    attention_mask int32   [B, T]  1 = real token
    loss_mask      float32 [B, T]  1 = target token: caption + eos, or every assistant answer +
                                   its end-of-turn token
    turn_ids       int32   [B, T]  1-based answer index at target tokens, else 0
    pixel_values   float32 [B, M, H, W, 3]  normalised; unused image slots are zeros
    num_images     int32   [B]
  With a `qformer_tokenizer` (InstructBLIP's instruction-aware Q-Former), also
    qformer_input_ids      int32 [B, qformer_max_len]  the sample's instruction tokenised with
                                   it (`instruction`), right-padded with its pad_token_id
    qformer_attention_mask int32 [B, qformer_max_len]  1 = real token
  `num_image_tokens` is the model's tokens per image (`MLLMConfig.image_tokens`: the
  Q-Former's queries, or the vision tower's tokens).
  """

  def __init__(self, tokenizer, kind: str = 'vqa', split: str = 'train', seed: int = 0,
               image_size: int = 32, num_image_tokens: int = 16, max_len: int = 128,
               max_images: int = 2, image_mean: Sequence[float] = images.CLIP_MEAN,
               image_std: Sequence[float] = images.CLIP_STD, two_image_fraction: float = 0.1,
               image_token: str = '<image>', qformer_tokenizer=None, qformer_max_len: int = 32):
    if max_images < 1:
      raise ValueError(f'max_images must be >= 1, got {max_images}')
    self.qformer_tokenizer, self.qformer_max_len = qformer_tokenizer, qformer_max_len
    self.instructions = (None if qformer_tokenizer is None else
                         QFormerInstructions(qformer_tokenizer, qformer_max_len))
    make_sample(0, kind=kind, split=split, image_size=None)   # validates kind and split
    self.tokenizer, self.kind, self.split, self.seed = tokenizer, kind, split, seed
    self.image_size, self.num_image_tokens, self.max_len = image_size, num_image_tokens, max_len
    self.max_images, self.image_token = max_images, image_token
    self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
    self.two_image_fraction = two_image_fraction if max_images >= 2 else 0.0
    # Questions and answers repeat a lot: memoise tokenisation (bounded; cleared when full).
    self._cache, self._prefix_cache = {}, {}

  def example(self, index: int, *, with_images: bool = True) -> Sample:
    return make_sample(index, kind=self.kind, split=self.split, seed=self.seed,
                       image_size=self.image_size if with_images else None,
                       two_image_fraction=self.two_image_fraction, image_tag=self.image_token)

  def examples(self, start: int, n: int, *, with_images: bool = True) -> list[Sample]:
    return [self.example(i, with_images=with_images) for i in range(start, start + n)]

  def _tokenize(self, sample: Sample):
    key = sample.caption or tuple(m['content'] for m in sample.messages)
    if key not in self._cache:
      if len(self._cache) >= 100_000:
        self._cache.clear()
        self._prefix_cache.clear()
      if sample.caption is not None:
        self._cache[key] = conversation.tokenize_caption(
            self.tokenizer, sample.caption, image_token=self.image_token,
            num_image_tokens=self.num_image_tokens, num_images=len(sample.scenes))
      else:
        self._cache[key] = conversation.tokenize_conversation(
            self.tokenizer, sample.messages, image_token=self.image_token,
            num_image_tokens=self.num_image_tokens, cache=self._prefix_cache)
    return self._cache[key]

  def batch(self, start: int, batch_size: int) -> dict[str, np.ndarray]:
    """Samples start .. start + batch_size - 1 of the split as fixed-shape arrays (see class doc)."""
    return self.batch_of(range(start, start + batch_size))

  def train_iterator(self, batch_size: int, accum: int = 1, process_index: int = 0,
                     process_count: int = 1) -> 'IndexIterator':
    """Step s's global batch is samples [s * batch_size, (s + 1) * batch_size); this process
    gets its rows as [accum, batch_size / (process_count * accum), ...] (see IndexIterator)."""
    return IndexIterator(lambda start, n: (range(start, start + n), start + n), self.batch_of,
                         batch_size, accum, process_index, process_count)

  def batch_of(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Samples `indices` of the split as fixed-shape arrays (see class doc)."""
    b, t, s = len(indices), self.max_len, self.image_size
    out = {'input_ids': np.full((b, t), self.tokenizer.pad_token_id, np.int32),
           'attention_mask': np.zeros((b, t), np.int32),
           'loss_mask': np.zeros((b, t), np.float32),
           'turn_ids': np.zeros((b, t), np.int32),
           'num_images': np.zeros((b,), np.int32)}
    pixels = np.zeros((b, self.max_images, s, s, 3), np.uint8)
    samples = [self.example(i) for i in indices]
    if self.instructions is not None:
      out.update(self.instructions(
          [instruction(x) for x in samples],
          [f'sample {x.index} of split {self.split!r} ({self.kind})' for x in samples]))
    for row, sample in enumerate(samples):
      ids, loss, turns = self._tokenize(sample)
      n = len(ids)
      if n > t:
        raise ValueError(f'sample {sample.index} of split {self.split!r} ({self.kind}) has '
                         f'{n} tokens > max_len={t}; raise max_len')
      out['input_ids'][row, :n], out['attention_mask'][row, :n] = ids, 1
      out['loss_mask'][row, :n], out['turn_ids'][row, :n] = loss, turns
      out['num_images'][row] = len(sample.images)
      pixels[row, :len(sample.images)] = sample.images
    used = np.arange(self.max_images) < out['num_images'][:, None]          # [B, M]
    out['pixel_values'] = images.normalize(pixels, self.image_mean, self.image_std) * used[
        :, :, None, None, None]
    return out


class IndexIterator:
  """Training batches of a task whose samples are numbered (the data-state contract of the loop).

  The global batch of each step is the next `batch_size` sample indices; this process makes
  only its rows [p * B/n, (p + 1) * B/n), as [accum, B / (n * accum), ...] host arrays. The
  state is the next sample index, so `set_state(get_state())` on a fresh iterator continues
  with exactly the next batch. `take(start, count) -> (indices, next_start)` picks a batch's
  sample indices (a task may skip some, e.g. unusable preference pairs) and
  `make(indices) -> dict of [len(indices), ...] arrays` builds this process's rows.
  """

  def __init__(self, take, make, batch_size: int, accum: int, process_index: int = 0,
               process_count: int = 1, drop=('num_images',)):
    if batch_size % (accum * process_count):
      raise ValueError(f'global batch {batch_size} is not divisible by grad_accum {accum} x '
                       f'{process_count} processes')
    self.take, self.make, self.drop = take, make, drop
    self.batch_size, self.accum = batch_size, accum
    self.process_index, self.process_count = process_index, process_count
    self.next_index = 0

  def get_state(self) -> dict:
    return {'next_index': self.next_index}

  def set_state(self, state: dict):
    self.next_index = int(state['next_index'])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    indices, nxt = self.take(self.next_index, self.batch_size)
    local = self.batch_size // self.process_count
    rows = indices[self.process_index * local:(self.process_index + 1) * local]
    b = self.make(rows)
    self.next_index = nxt
    return {k: v.reshape((self.accum, local // self.accum) + v.shape[1:]) for k, v in b.items()
            if k not in self.drop}
