"""The grain input pipeline for file-based data (LLaVA JSON / JSONL, or TFDS array_record).

  source (random access: `records.JsonRecords` or `tfds.data_source`)
    -> grain.MapDataset: global shuffle by seed, reshuffled every epoch, repeated
    -> this process's rows: [process_index::process_count]
    -> Preprocess (parse + validate the record, decode + resize the images, chat template ->
       ids / loss mask with image tokens expanded; for an instruction-aware Q-Former each
       image's instruction tokenised with its own tokenizer): in `workers` grain worker
       processes
    -> WindowBatcher: reads a window of samples, drops and counts bad ones, and makes
       fixed-shape batches: length buckets (one sample per row, padded to the smallest bucket
       that fits) or packing (first-fit, several samples per row with segment ids)
    -> TrainIterator: [accum, micro, ...] arrays; get_state / set_state for checkpoints.

Exact resume: a WindowBatcher's state is its parent's state at the start of the current window
plus how many batches of that window were already returned; restoring re-reads that window
and skips them. Everything upstream is grain's own index-based state. The whole state is a
small JSON-serialisable dict (grain's, plus the skip counts so far).

Bad input (`bad_input`): 'strict' raises `records.BadSample` naming the file and sample id;
'skip' drops the sample and counts it by reason (`records.REASONS`): the counts travel with
the batches out of the worker processes and are summed by `TrainIterator.skipped()`.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
from typing import Sequence

import grain
import numpy as np
from PIL import Image, ImageOps

from mllm_jax.data import conversation, images, packing, records, synthetic

SKIPPED = '_skipped'   # batch key of the skip counts (int64 [len(REASONS)]) of a window


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """What turns records into batches (all picklable: it travels to worker processes).

  kind: record kind ('conversation' | 'caption' | 'preference', see records.py).
  max_len: tokens per row (the largest bucket); buckets: shorter row lengths to pad to.
  max_images: image slots per row; image_size: the vision tower's input (square).
  num_image_tokens: tokens an <image> tag expands to (the connector's output length).
  image_norm: 'clip' (shortest-edge resize + centre crop) or 'siglip' (resize to square).
  pad_to_square: LLaVA-1.5's `image_aspect_ratio='pad'`.
  bad_input: 'strict' | 'skip'; truncate: cut over-long samples at max_len (never through an
  image's tokens) instead of treating them as bad input.
  packing: several samples per row; window: batches formed per window of samples.
  workers: grain worker processes for preprocessing (0 = in this process).
  seed: shuffle seed.
  qformer_max_len: > 0 for an instruction-aware Q-Former (InstructBLIP): each image's
  instruction (`records.image_instructions`) is tokenised with the Q-Former tokenizer and
  padded to this length (`qformer_input_ids` / `qformer_attention_mask` [B, max_images, L]);
  a longer instruction is bad input ('too_long'), or cut to it with `truncate`.
  image_grid_pinpoints: LLaVA-NeXT (AnyRes): each image becomes tiles (a base tile + the grid
  of the pinpoint best fitting it, LlavaNextImageProcessor's), `pixel_values` [B, M, tiles, H,
  W, 3] with `image_sizes` [B, M, 2], and its tag expands to the image's own token count
  (unpadded grid + a newline per grid row + the base tile's patches, of `patch_size`).
  """
  kind: str = 'conversation'
  max_len: int = 2048
  buckets: tuple[int, ...] = ()
  max_images: int = 1
  image_size: int = 336
  num_image_tokens: int = 576
  image_norm: str = 'clip'
  pad_to_square: bool = False
  bad_input: str = 'strict'
  truncate: bool = False
  packing: bool = False
  window: int = 8
  workers: int = 0
  worker_buffer: int = 2
  seed: int = 0
  image_token: str = '<image>'
  qformer_max_len: int = 0
  image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
  patch_size: int = 14

  def __post_init__(self):
    if self.kind not in records.KINDS:
      raise ValueError(f'unknown record kind {self.kind!r}; expected one of {records.KINDS}')
    if self.bad_input not in ('strict', 'skip'):
      raise ValueError(f"config.data.bad_input={self.bad_input!r}: expected 'strict' or 'skip'")
    if self.image_norm not in images.NORMALIZATION:
      raise ValueError(f'config.data.image_norm={self.image_norm!r}: expected one of '
                       f'{sorted(images.NORMALIZATION)}')
    if self.packing and self.kind == 'preference':
      raise ValueError('config.data.packing is for SFT / pretraining; preference pairs are '
                       'batched one pair per row')
    if any(b <= 0 or b > self.max_len for b in self.buckets):
      raise ValueError(f'config.data.buckets={self.buckets}: each must be in 1..max_len='
                       f'{self.max_len}')
    if self.qformer_max_len < 0:
      raise ValueError(f'config.data.qformer_max_len={self.qformer_max_len} must be >= 0 '
                       '(0: the model reads no Q-Former instruction)')
    if self.image_grid_pinpoints and (self.pad_to_square or self.qformer_max_len):
      raise ValueError('config.model.image_grid_pinpoints (LLaVA-NeXT AnyRes tiles) goes with '
                       'neither config.data.pad_to_square nor a Q-Former instruction')
    if self.window < 1 or self.max_images < 1:
      raise ValueError(f'config.data.window={self.window} and max_images={self.max_images} '
                       'must be >= 1')

  @property
  def lengths(self) -> tuple[int, ...]:
    """Row lengths a batch may have: the buckets and max_len (packed rows are max_len)."""
    if self.packing:
      return (self.max_len,)
    return tuple(sorted(set(self.buckets) | {self.max_len}))

  @property
  def image_shape(self) -> tuple[int, ...]:
    """One image slot: [H, W, 3], or [tiles, H, W, 3] under AnyRes (room for the base tile
    and the largest pinpoint's grid)."""
    if self.image_grid_pinpoints:
      return (self.max_tiles, self.image_size, self.image_size, 3)
    return (self.image_size, self.image_size, 3)

  @property
  def max_tiles(self) -> int:
    return 1 + max((h // self.image_size) * (w // self.image_size)
                   for h, w in self.image_grid_pinpoints)


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
class JsonSource:
  """grain random-access source over a subset (`indices`) of JSON / JSONL records.

  Elements: {'raw': record, 'source': 'file[i]', 'index': i, 'image_root': dir}.
  """

  def __init__(self, recs: records.JsonRecords, indices: Sequence[int], image_root: str):
    self.recs, self.indices, self.image_root = recs, np.asarray(indices, np.int64), image_root

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    j = int(self.indices[i])
    raw, source = self.recs[j]
    return {'raw': raw, 'source': source, 'index': j, 'image_root': self.image_root}


class TfdsSource:
  """grain random-access source over a `tfds.data_source` of our builders (images as bytes)."""

  def __init__(self, data_source):
    self.ds = data_source

  def __len__(self) -> int:
    return len(self.ds)

  def __getitem__(self, i: int) -> dict:
    ex = self.ds[i]
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
    return {'raw': json.loads(text(ex['record'])), 'source': text(ex['source']), 'index': i,
            'image_bytes': list(ex['images']),
            'image_paths': [text(p) for p in ex['image_paths']]}


# ----------------------------------------------------------------------------------------------
# One record -> one tokenised sample
# ----------------------------------------------------------------------------------------------
class Preprocess(grain.transforms.Map):
  """Raw element -> sample dict (packing.py) or {SKIPPED: reason} under bad_input='skip'.

  Both tokenizers travel to grain's worker processes with this object (pickled, as
  transformers' tokenizers are); `qformer_tokenizer` is needed iff cfg.qformer_max_len > 0."""

  def __init__(self, tokenizer, cfg: PipelineConfig, qformer_tokenizer=None):
    self.tokenizer, self.cfg = tokenizer, cfg
    self.processor = images.run_processor(cfg.image_norm, cfg.image_size, cfg.pad_to_square,
                                          cfg.image_grid_pinpoints)
    self.image_id = conversation.image_token_id(tokenizer, cfg.image_token)
    self.qformer = qformer_rows(cfg, qformer_tokenizer)   # (length, pad id) for the collation
    self.instructions = (None if self.qformer is None else synthetic.QFormerInstructions(
        qformer_tokenizer, cfg.qformer_max_len, cfg.truncate))
    self._prefix_cache: dict = {}

  def __getstate__(self):   # the cache stays in its process
    return {**self.__dict__, '_prefix_cache': {}}

  def map(self, element: dict) -> dict:
    try:
      return self.sample(element)
    except records.BadSample as e:
      if self.cfg.bad_input == 'strict':
        raise
      return {SKIPPED: e.reason}

  def sample(self, element: dict) -> dict:
    """Raises records.BadSample for bad input."""
    c = self.cfg
    rec = records.parse(element['raw'], c.kind, element['source'], element['index'])

    def bad(reason, detail):
      return records.BadSample(reason, rec['source'], rec['id'], detail)

    if len(rec['images']) > c.max_images:
      raise bad('too_many_images', f'{len(rec["images"])} images > config.data.max_images='
                f'{c.max_images}')
    pixels = sizes = None
    n_tokens = c.num_image_tokens
    if c.image_grid_pinpoints:   # AnyRes: each image's token count depends on its size
      pixels, sizes = self._images(element, rec, bad)
      n_tokens = [sum(images.anyres_num_features(tuple(hw), c.image_grid_pinpoints,
                                                 (c.image_size,) * 2, c.patch_size))
                  for hw in sizes]
    if c.kind == 'preference':
      out = {}
      for side in ('chosen', 'rejected'):
        msgs = rec['messages'] + [{'role': 'assistant', 'content': rec[side]}]
        ids, loss, turns = self._tokens(msgs, bad, n_tokens)
        # Only the final answer is the preference target, not earlier assistant turns.
        loss = np.where(turns == turns.max(), loss, 0).astype(np.float32)
        out[f'{side}_input_ids'], out[f'{side}_loss_mask'] = ids, loss
    elif c.kind == 'caption':
      ids, loss, turns = self._fit(conversation.tokenize_caption(
          self.tokenizer, rec['caption'], image_token=c.image_token,
          num_image_tokens=n_tokens, num_images=len(rec['images'])), bad)
      out = {'input_ids': ids, 'loss_mask': loss, 'turn_ids': turns}
    else:
      ids, loss, turns = self._tokens(rec['messages'], bad, n_tokens)
      out = {'input_ids': ids, 'loss_mask': loss, 'turn_ids': turns}
    if self.instructions is not None:
      out.update(self._instructions(rec, bad))
    if pixels is None:
      pixels, _ = self._images(element, rec, bad)
    out['pixel_values'] = pixels
    if sizes is not None:
      out['image_sizes'] = sizes
    return out

  def _instructions(self, rec, bad) -> dict[str, np.ndarray]:
    """Each image's Q-Former instruction: qformer_input_ids / qformer_attention_mask int32
    [n_images, qformer_max_len]. Captions without a prompt of their own (plain caption pairs)
    read InstructBLIP's captioning prompt `synthetic.CAPTION_INSTRUCTION`."""
    n = len(rec['images'])
    if 'messages' in rec:
      texts = records.image_instructions(rec['messages'], n)
    else:
      texts = [synthetic.CAPTION_INSTRUCTION] * n
    return self.instructions.rows([
        self.instructions.ids(text, f'the Q-Former instruction of image {i + 1}',
                              lambda msg: bad('too_long', msg)) for i, text in enumerate(texts)])

  def _tokens(self, messages, bad, num_image_tokens):
    try:
      out = conversation.tokenize_conversation(
          self.tokenizer, messages, image_token=self.cfg.image_token,
          num_image_tokens=num_image_tokens, cache=self._prefix_cache)
    except ValueError as e:   # e.g. the template rejects a role order, or a tag count
      raise bad('bad_record', f'chat template: {e}') from None
    if len(self._prefix_cache) > 50_000:
      self._prefix_cache.clear()
    return self._fit(out, bad)

  def _fit(self, out, bad):
    c, n = self.cfg, len(out[0])
    if n <= c.max_len:
      return out
    if not c.truncate:
      raise bad('too_long', f'{n} tokens > config.data.max_len={c.max_len}')
    try:
      out = conversation._fit(out, c.max_len, True, self.image_id)   # never cuts an image
    except ValueError as e:
      raise bad('too_long', str(e)) from None
    if not out[1].any():
      raise bad('too_long', f'{n} tokens > max_len={c.max_len} and no answer token is left '
                'after truncation')
    return out

  def _images(self, element, rec, bad) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n, H, W, 3] or AnyRes tiles [n, tiles, H, W, 3] (zero after each image's
    own), original (H, W) int32 [n, 2]), decoded and preprocessed."""
    out = np.zeros((len(rec['images']),) + self.cfg.image_shape, np.float32)
    sizes = np.zeros((len(rec['images']), 2), np.int32)
    for i, rel in enumerate(rec['images']):
      if 'image_bytes' in element:   # TFDS: the file's bytes as they were at build time
        data, where = element['image_bytes'][i], f'image {rel!r} (stored bytes)'
        if not len(data):
          raise bad('bad_image', f'image {rel!r} was missing or unreadable when the dataset '
                    'was built')
        try:
          with Image.open(io.BytesIO(data)) as im:
            im.load()
            pil = ImageOps.exif_transpose(im).convert('RGB')
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
          raise bad('bad_image', f'cannot decode {where}: {e}') from None
      else:
        path = os.path.join(element['image_root'], rel)
        if not os.path.isfile(path):
          raise bad('bad_image', f'image file {path!r} does not exist')
        try:
          pil = images.load_image(path)
        except ValueError as e:
          raise bad('bad_image', str(e)) from None
      try:
        x = self.processor.preprocess(pil)
      except ValueError as e:
        raise bad('bad_image', f'image {rel!r}: {e}') from None
      out[i, :len(x)] = x
      sizes[i] = pil.size[::-1]
    return out, sizes


# ----------------------------------------------------------------------------------------------
# Samples -> batches
# ----------------------------------------------------------------------------------------------
class WindowBatcher(grain.IterDataset):
  """Samples -> fixed-shape batches of `rows` rows, a window of `window` batches at a time.

  Buckets: the window's good samples are sorted by length and cut into batches (similar lengths
  share a batch, so little padding), each padded to the smallest row length that fits; the
  batch order within the window is shuffled by (seed, window index).
  Packing: first-fit into window * rows rows of max_len tokens / max_images images; the window
  closes at the first sample that fits no row (it starts the next window).
  Skipped samples are counted in the SKIPPED entry of the window's first batch. A finite parent
  ends with a last, partly empty batch (empty rows have all masks 0).
  """

  def __init__(self, parent: grain.IterDataset, cfg: PipelineConfig, rows: int, pad_id: int,
               max_consecutive_skips: int, qformer: tuple[int, int] | None = None):
    super().__init__(parent)
    self.cfg, self.rows, self.pad_id, self.qformer = cfg, rows, pad_id, qformer
    self.max_consecutive_skips = max_consecutive_skips

  def __iter__(self):
    return _WindowBatcherIterator(self._parent.__iter__(), self)

  def __str__(self):
    return f'WindowBatcher(rows={self.rows}, packing={self.cfg.packing})'


class _WindowBatcherIterator(grain.DatasetIterator):

  def __init__(self, parent, ds: WindowBatcher):
    super().__init__(parent)
    self.ds = ds
    self._start = self._parent.get_state()
    self._window, self._emitted, self._ready = 0, 0, None
    self._skips_in_a_row = 0

  def __next__(self):
    while not self._ready:
      if self._ready is not None:   # the current window is used up: the next one starts
        self._window += 1
        self._start, self._emitted = self._parent.get_state(), 0
      self._ready = self._read_window()
      if not self._ready:
        raise StopIteration
    self._emitted += 1
    return self._ready.pop(0)

  def get_state(self):
    return {'parent': self._start, 'window': self._window, 'emitted': self._emitted}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._start, self._window = state['parent'], state['window']
    self._ready = self._read_window()
    del self._ready[:state['emitted']]
    self._emitted = state['emitted']

  def _next_sample(self, counts):
    """(next good sample, the parent's state just before it), or (None, None) at the end;
    skipped samples on the way are counted."""
    while True:
      before = self._parent.get_state()
      try:
        el = next(self._parent)
      except StopIteration:
        return None, None
      if SKIPPED in el:
        counts[records.REASONS.index(el[SKIPPED])] += 1
        self._skips_in_a_row += 1
        if self._skips_in_a_row > self.ds.max_consecutive_skips:
          raise ValueError(
              f'{self._skips_in_a_row} samples in a row were bad input (skip counts by reason: '
              f'{dict(zip(records.REASONS, counts.tolist()))}): the dataset yields nothing')
        continue
      self._skips_in_a_row = 0
      return el, before

  def _read_window(self) -> list[dict]:
    c, rows, counts = self.ds.cfg, self.ds.rows, np.zeros(len(records.REASONS), np.int64)
    if c.packing:
      bins, used = [[] for _ in range(c.window * rows)], [[0, 0] for _ in range(c.window * rows)]
      while True:
        s, before = self._next_sample(counts)
        if s is None:
          break
        if not packing.first_fit(bins, used, s, c.max_len, c.max_images):
          self._parent.set_state(before)   # it opens the next window
          break
      bins = [b for b in bins if b]
      batches = [packing.collate_packed(bins[i:i + rows], rows, c.max_len, c.max_images,
                                        c.image_shape, self.ds.pad_id, self.ds.qformer)
                 for i in range(0, len(bins), rows)]
    else:
      samples = []
      while len(samples) < c.window * rows:
        s, _ = self._next_sample(counts)
        if s is None:
          break
        samples.append(s)
      samples.sort(key=packing.length)
      chunks = [samples[i:i + rows] for i in range(0, len(samples), rows)]
      batches = [packing.collate(ch, rows, packing.bucket_length(packing.length(ch[-1]),
                                                                 c.lengths),
                                 c.max_images, c.image_shape, self.ds.pad_id,
                                 c.kind == 'preference', self.ds.qformer) for ch in chunks]
      order = np.random.default_rng((c.seed, self._window)).permutation(len(batches))
      batches = [batches[i] for i in order]
    if not batches and counts.any():
      if self._window == 0:
        raise ValueError(f'every sample was bad input (skip counts by reason: '
                         f'{dict(zip(records.REASONS, counts.tolist()))}): the dataset yields '
                         'nothing')
      # Only skipped samples at the end of a finite parent: an empty batch carries their counts.
      if c.packing:
        batches = [packing.collate_packed([], rows, c.max_len, c.max_images, c.image_shape,
                                          self.ds.pad_id, self.ds.qformer)]
      else:
        batches = [packing.collate([], rows, c.lengths[0], c.max_images, c.image_shape,
                                   self.ds.pad_id, c.kind == 'preference', self.ds.qformer)]
    if batches:
      batches[0][SKIPPED] = counts
    return batches


# ----------------------------------------------------------------------------------------------
# The iterator the training loop holds
# ----------------------------------------------------------------------------------------------
class TrainIterator:
  """`next()` -> {key: [accum, micro, ...]} numpy arrays of this process's rows.

  get_state() -> JSON-serialisable dict (grain state + skip counts); set_state(state).
  next_with_state() -> (batch, state after it), for loops that prefetch in a thread.
  skipped() -> {reason: count} of samples dropped so far under bad_input='skip'.
  """

  def __init__(self, dataset: grain.IterDataset, accum: int, micro: int, sync_lengths: bool,
               pad_id: int = 0):
    self._ds, self.accum, self.micro, self.sync_lengths = dataset, accum, micro, sync_lengths
    self.pad_id = pad_id
    self._it = iter(dataset)
    self._skipped = collections.Counter()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    # Plain copies: worker outputs arrive in shared memory, freed once the originals go.
    b = {k: np.array(v) for k, v in next(self._it).items()}
    for reason, n in zip(records.REASONS, np.asarray(b.pop(SKIPPED, ())).tolist()):
      if n:
        self._skipped[reason] += n
    b.pop('num_images', None)
    if self.sync_lengths:
      b = _pad_to_common_length(b, self.pad_id)
    return {k: v.reshape((self.accum, self.micro) + v.shape[1:]) for k, v in b.items()}

  def next_with_state(self) -> tuple[dict[str, np.ndarray], dict]:
    """(next batch, the state to resume right after it). For a loop that prefetches batches
    in a thread: checkpoint the state that came with the last batch it trained on, not
    get_state(), which is already past the prefetched ones."""
    b = next(self)
    return b, self.get_state()

  def skipped(self) -> dict[str, int]:
    return dict(self._skipped)

  def get_state(self) -> dict:
    return {'grain': _jsonable(self._it.get_state()), 'skipped': dict(self._skipped)}

  def set_state(self, state: dict) -> None:
    self._it.set_state(_from_jsonable(state['grain']))
    self._skipped = collections.Counter(state.get('skipped', {}))

  def close(self):
    close = getattr(self._it, 'close', None)
    if close is not None:
      close()


def _pad_to_common_length(b, pad_id):
  """Multi-host: every process must feed the same shapes; pad to the longest bucket any
  process chose for this step (one tiny host all-gather)."""
  from jax.experimental import multihost_utils
  key = 'input_ids' if 'input_ids' in b else 'chosen_input_ids'
  t = b[key].shape[1]
  return pad_tokens(b, int(np.max(multihost_utils.process_allgather(np.int32(t)))), pad_id)


def pad_tokens(b, length: int, pad_id):
  """A batch whose token axis (axis 1 of input_ids / chosen_input_ids, and of every array as
  long) is padded to `length`: ids with `pad_id`, masks, labels, positions and segments with 0.
  Image slots, image sizes and Q-Former instructions keep their shapes even when their axis 1
  happens to be as long as the token axis."""
  key = 'input_ids' if 'input_ids' in b else 'chosen_input_ids'
  t = b[key].shape[1]
  if length == t:
    return b
  out = {}
  for k, v in b.items():   # token axes only: not image slots, not Q-Former instructions
    if (v.ndim >= 2 and v.shape[1] == t and k not in ('pixel_values', 'image_sizes') and
        not k.startswith('qformer_')):
      pad = np.full((v.shape[0], length - t) + v.shape[2:], pad_id if k.endswith('input_ids')
                    else 0, v.dtype)
      v = np.concatenate([v, pad], axis=1)
    out[k] = v
  return out


def _jsonable(x):
  """grain states are dicts of ints / strings; bytes (if any) go as latin-1 tagged strings."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, bytes):
    return {'__bytes__': x.decode('latin-1')}
  if isinstance(x, np.integer):
    return int(x)
  return x


def _from_jsonable(x):
  if isinstance(x, dict):
    if set(x) == {'__bytes__'}:
      return x['__bytes__'].encode('latin-1')
    return {k: _from_jsonable(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_jsonable(v) for v in x]
  return x


# ----------------------------------------------------------------------------------------------
# Task: what the training loop asks for
# ----------------------------------------------------------------------------------------------
class FileTask:
  """A training / evaluation task over a random-access source of raw records.

    task.train_iterator(batch_size, accum, process_index, process_count) -> TrainIterator
    task.batch(start, size) -> {key: [size, ...]}: good samples start .. start + size - 1 in
      source order (no shuffle), one per row, padded to max_len (eval)
    task.skipped() -> {reason: count} dropped by batch() plus those of the latest train
      iterator (whose counts include what it was restored with)
  """

  def __init__(self, tokenizer, source, cfg: PipelineConfig, name: str = 'data',
               qformer_tokenizer=None):
    if len(source) == 0:
      raise ValueError(f'{name}: the dataset is empty')
    self.tokenizer, self.source, self.cfg, self.name = tokenizer, source, cfg, name
    self.max_len = cfg.max_len
    self.preprocess = Preprocess(tokenizer, cfg, qformer_tokenizer)
    self._good: list[int] = []      # batch(): source indices of usable samples, as found
    self._samples: dict[int, dict] = {}
    self._next_index = 0
    self._skipped = collections.Counter()
    self._iterators: list[TrainIterator] = []

  # -- training stream
  def dataset(self, rows: int, process_index: int = 0, process_count: int = 1,
              repeat: bool = True) -> grain.IterDataset:
    """The grain pipeline of this process: batches of `rows` rows (see module doc)."""
    c = self.cfg
    ds = grain.MapDataset.source(self.source).shuffle(seed=c.seed)
    if repeat:
      ds = ds.repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.map(self.preprocess)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if c.workers else 2,
                                              prefetch_buffer_size=max(rows, 2)))
    it = WindowBatcher(it, c, rows, self.tokenizer.pad_token_id,
                       max_consecutive_skips=2 * len(self.source) + 8,
                       qformer=self.preprocess.qformer)
    if c.workers:
      from absl import flags
      if not flags.FLAGS.is_parsed():   # grain reads its absl flags; outside an absl app
        flags.FLAGS.mark_as_parsed()    # (pytest, notebooks) they keep their defaults
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.workers,
                                                       per_worker_buffer_size=c.worker_buffer))
    return it

  def train_iterator(self, batch_size: int, accum: int = 1, process_index: int | None = None,
                     process_count: int | None = None) -> TrainIterator:
    """Batches of this process's batch_size / process_count rows as [accum, micro, ...]."""
    import jax
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if batch_size % (pc * accum):
      raise ValueError(f'batch size {batch_size} is not divisible by process count {pc} x '
                       f'gradient accumulation {accum}')
    if len(self.source) < pc:
      raise ValueError(f'{self.name}: {len(self.source)} records cannot feed {pc} processes')
    local = batch_size // pc
    it = TrainIterator(self.dataset(local, pi, pc), accum, local // accum,
                       sync_lengths=pc > 1 and len(self.cfg.lengths) > 1,
                       pad_id=self.tokenizer.pad_token_id)
    self._iterators = [it]
    return it

  # -- evaluation
  def _good_sample(self, k: int) -> dict | None:
    """The k-th usable sample in source order (None past the end). Remembers where every
    usable sample is, but keeps only recent samples' arrays."""
    while len(self._good) <= k and self._next_index < len(self.source):
      s = self.preprocess.map(self.source[self._next_index])
      if SKIPPED in s:
        self._skipped[s[SKIPPED]] += 1
      else:
        self._good.append(self._next_index)
        self._cache_sample(self._next_index, s)
      self._next_index += 1
    if k >= len(self._good):
      return None
    i = self._good[k]
    if i not in self._samples:
      self._cache_sample(i, self.preprocess.sample(self.source[i]))
    return self._samples[i]

  def _cache_sample(self, i, s):
    if len(self._samples) >= 4096:
      self._samples.clear()
    self._samples[i] = s

  def batch(self, start: int, size: int) -> dict[str, np.ndarray]:
    samples = [s for s in (self._good_sample(k) for k in range(start, start + size))
               if s is not None]
    if not self._good and self._next_index >= len(self.source):
      raise ValueError(f'{self.name}: none of its {len(self.source)} records is usable '
                       f'(skipped by reason: {dict(self._skipped)}): the dataset yields nothing')
    c = self.cfg
    return packing.collate(samples, size, c.max_len, c.max_images, c.image_shape,
                           self.tokenizer.pad_token_id, c.kind == 'preference',
                           self.preprocess.qformer)

  def skipped(self) -> dict[str, int]:
    total = collections.Counter(self._skipped)
    if self._iterators:
      total.update(self._iterators[-1].skipped())
    return dict(total)


# ----------------------------------------------------------------------------------------------
# Construction from config
# ----------------------------------------------------------------------------------------------
def qformer_rows(cfg: PipelineConfig, qformer_tokenizer) -> tuple[int, int] | None:
  """(qformer_max_len, the Q-Former tokenizer's pad id) when samples carry instructions."""
  if not cfg.qformer_max_len:
    return None
  if qformer_tokenizer is None:
    raise ValueError('config.data.qformer_max_len > 0 (an instruction-aware Q-Former) needs the '
                     'Q-Former tokenizer (config.data.qformer_tokenizer)')
  if qformer_tokenizer.pad_token_id is None:
    raise ValueError('the Q-Former tokenizer has no pad token (config.data.qformer_tokenizer)')
  return cfg.qformer_max_len, int(qformer_tokenizer.pad_token_id)


def json_task(tokenizer, cfg: PipelineConfig, split: str, train_files: Sequence[str],
              eval_files: Sequence[str] = (), eval_fraction: float = 0.0,
              image_root: str = '', qformer_tokenizer=None) -> FileTask:
  """The `split` ('train' | 'eval') task of LLaVA-style JSON / JSONL files. Without eval
  files, `eval_fraction` of the train records (by id) is held out. `qformer_tokenizer`: an
  instruction-aware Q-Former's (with cfg.qformer_max_len > 0)."""
  if split == 'eval' and eval_files:
    recs = records.JsonRecords(eval_files)
    idx = np.arange(len(recs))
  else:
    recs = records.JsonRecords(train_files)
    if split == 'eval' and eval_fraction <= 0:
      raise ValueError('evaluation needs config.data.eval_files or config.data.eval_fraction > 0')
    idx = (records.split_indices(recs, eval_fraction, split) if eval_fraction > 0
           else np.arange(len(recs)))
  name = f'{",".join(recs.paths)} ({split})'
  return FileTask(tokenizer, JsonSource(recs, idx, image_root), cfg, name, qformer_tokenizer)


def tfds_task(tokenizer, cfg: PipelineConfig, split: str, name: str, data_dir: str,
              qformer_tokenizer=None) -> FileTask:
  """The `split` task of TFDS dataset `name` (built by tfds_builders) in `data_dir`."""
  from mllm_jax.data import tfds_builders
  src = tfds_builders.load_data_source(data_dir, name, split)
  return FileTask(tokenizer, TfdsSource(src), cfg, f'{name} ({split})', qformer_tokenizer)


def task_from_config(config, tokenizer, mcfg, task: str, split: str) -> FileTask:
  """`config.data` (source 'llava_json' | 'tfds') -> the FileTask of a stage's `task`
  ('caption' | 'vqa' | 'dpo') and `split` ('train' | 'eval'); sizes from the model config.
  An instruction-aware Q-Former (InstructBLIP) gets each image's instruction, tokenised with
  `config.data.qformer_tokenizer` ('' = the LLM tokenizer) to `config.data.qformer_max_len`."""
  d = config.data
  if mcfg.vision is None:
    raise ValueError('file-based data needs a vision tower (config.model.vision.kind)')
  qformer_tokenizer, qformer_max_len = None, 0
  if mcfg.connector.kind == 'qformer' and mcfg.connector.qformer.instruction:
    from mllm_jax.train import loop   # the one place the Q-Former tokenizer is loaded
    qformer_tokenizer = loop.load_qformer_tokenizer(config, tokenizer)
    qformer_max_len = d.qformer_max_len
    limit = mcfg.connector.qformer.max_position
    if not 0 < qformer_max_len <= limit:
      raise ValueError(f'config.data.qformer_max_len={qformer_max_len} must be in 1..'
                       f'config.model.connector.qformer.max_position={limit}')
  try:
    buckets = tuple(int(b) for b in str(d.buckets).split(',') if b.strip())
  except ValueError:
    raise ValueError(f'config.data.buckets={d.buckets!r}: expected comma-separated lengths, '
                     "e.g. '256,512,1024'") from None
  kind = records.kind_for_task(task)
  cfg = PipelineConfig(
      kind=kind, max_len=d.max_len, buckets=buckets, max_images=d.max_images,
      image_size=mcfg.vision.image_size, num_image_tokens=mcfg.image_tokens,
      image_norm=d.image_norm, pad_to_square=d.pad_to_square, bad_input=d.bad_input,
      # packing is for SFT / pretraining stages; a run's DPO stage batches one pair per row
      truncate=d.truncate, packing=d.packing and split == 'train' and kind != 'preference',
      window=d.window, workers=d.workers, seed=config.seed if d.shuffle_seed < 0 else d.shuffle_seed,
      qformer_max_len=qformer_max_len, image_grid_pinpoints=mcfg.image_grid_pinpoints,
      patch_size=mcfg.vision.patch_size)
  files = lambda s: [f.strip() for f in str(s).split(',') if f.strip()]
  if d.source == 'llava_json':
    prefix = {'caption': 'caption_', 'preference': 'preference_'}.get(kind, '')
    train, evals = files(d.train_files), files(d.eval_files)
    if prefix and files(d[prefix + 'files']):
      train, evals = files(d[prefix + 'files']), files(d[prefix + 'eval_files'])
    if not train:
      raise ValueError(f"config.data.source='llava_json' needs config.data.train_files (or "
                       f"config.data.{prefix or 'train_'}files for task {task!r})")
    return json_task(tokenizer, cfg, split, train, evals, d.eval_fraction, d.image_root,
                     qformer_tokenizer)
  if not d.tfds_name or not d.tfds_dir:
    raise ValueError("config.data.source='tfds' needs config.data.tfds_name and tfds_dir")
  from mllm_jax.data import tfds_builders
  names = {tfds_builders.kind_of(n): n for n in files(d.tfds_name)}
  if kind not in names:
    raise ValueError(f'config.data.tfds_name={d.tfds_name!r} has no dataset of {kind} records, '
                     f'which task {task!r} reads (builder {tfds_builders.BUILDERS[kind].name})')
  return tfds_task(tokenizer, cfg, split, names[kind], d.tfds_dir, qformer_tokenizer)
