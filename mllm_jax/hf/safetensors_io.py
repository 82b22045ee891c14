"""Safetensors checkpoint directories: validated lazy reading, streaming sharded writing.

A directory holds `model.safetensors`, or shards listed in `model.safetensors.index.json`
(`{"weight_map": {key: file}}`). Every file's header is parsed and checked against the file size
up front, so a truncated or corrupt file is an error naming it before anything is converted.
Tensors are then read one at a time through `safetensors.safe_open` (memory-mapped). Pickle-based
checkpoints (`pytorch_model.bin`, `*.pt`) are never opened: unpickling runs arbitrary code.

File layout (the safetensors format): u64 little-endian header length N, N bytes of JSON
`{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
data buffer the offsets index into.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Callable, Iterable, Sequence

import ml_dtypes  # registers bfloat16 with numpy, which safe_open(framework='numpy') needs
import numpy as np
from safetensors import safe_open

SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
          'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
          'BOOL': np.bool_}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2 ** 20   # the reference implementation's limit


class CheckpointError(ValueError):
  """A checkpoint file or directory that cannot be used as it is; the message names it."""


def read_header(path: str) -> dict:
  """-> {key: (dtype str, shape tuple)} after checking the header against the file size."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f'{path}: not a safetensors file ({size} bytes, truncated?)')
    n = struct.unpack('<Q', head)[0]
    if n > _MAX_HEADER or 8 + n > size:
      raise CheckpointError(f'{path}: corrupt or truncated safetensors file (header of {n} '
                            f'bytes announced, file has {size})')
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f'{path}: corrupt safetensors header ({e})') from None
  out, end = {}, 0
  for key, info in header.items():
    if key == '__metadata__':
      continue
    try:
      dtype, shape, (begin, stop) = info['dtype'], tuple(info['shape']), info['data_offsets']
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f'{path}: corrupt safetensors header entry for {key!r}') from None
    if dtype not in DTYPES:
      raise CheckpointError(f'{path}: tensor {key!r} has unsupported dtype {dtype}')
    if stop - begin != math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize:
      raise CheckpointError(f'{path}: tensor {key!r} ({dtype}{list(shape)}) has data offsets '
                            f'{[begin, stop]} of the wrong length (corrupt header)')
    out[key] = (dtype, shape)
    end = max(end, stop)
  if 8 + n + end > size:
    raise CheckpointError(f'{path}: truncated safetensors file: {size} bytes, but its header '
                          f'needs {8 + n + end}')
  return out


class Checkpoint:
  """The tensors of a checkpoint directory under canonical names, read lazily.

  `rename(stored_key) -> canonical key | None` maps the names found in the files onto one
  layout (None drops a key on purpose, e.g. a text tower when only the vision tower is wanted);
  two stored keys mapping to one name is an error listing both.
  """

  def __init__(self, directory: str, rename: Callable[[str], str | None] = lambda k: k):
    self.directory = directory
    self.files = _checkpoint_files(directory)
    self._where: dict[str, tuple[str, str]] = {}   # canonical -> (file, stored key)
    self._info: dict[str, tuple[str, tuple]] = {}
    self.dropped: list[str] = []
    listed = _index_map(directory)
    for path in self.files:
      for stored, info in read_header(path).items():
        if listed is not None and listed.get(stored) != os.path.basename(path):
          raise CheckpointError(f'{path} holds {stored!r}, but {os.path.join(directory, INDEX)} '
                                f'lists it in {listed.get(stored)!r}')
        key = rename(stored)
        if key is None:
          self.dropped.append(stored)
          continue
        if key in self._where:
          raise CheckpointError(f'{directory}: tensors {self._where[key][1]!r} and {stored!r} '
                                f'both mean {key!r} (a checkpoint mixing two key layouts?)')
        self._where[key] = (path, stored)
        self._info[key] = info
    if listed is not None:
      found = {s for _, s in self._where.values()} | set(self.dropped)
      absent = sorted(set(listed) - found)
      if absent:
        raise CheckpointError(f'{os.path.join(directory, INDEX)} lists {len(absent)} tensor(s) '
                              f'that no shard holds: {_some(absent)}')
    self._handles: dict[str, object] = {}

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, key: str) -> tuple:
    return self._info[key][1]

  def nbytes(self) -> int:
    return sum(math.prod(s) * np.dtype(DTYPES[d]).itemsize for d, s in self._info.values())

  def read(self, key: str) -> np.ndarray:
    """One tensor as a numpy array (its stored dtype)."""
    path, stored = self._where[key]
    try:
      if path not in self._handles:
        self._handles[path] = safe_open(path, framework='numpy')
      return self._handles[path].get_tensor(stored)
    except Exception as e:   # safetensors raises its own error types
      raise CheckpointError(f'{path}: cannot read tensor {stored!r}: {e}') from None

  def close(self):
    self._handles.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _index_map(directory):
  path = os.path.join(directory, INDEX)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      weight_map = json.load(f)['weight_map']
    assert isinstance(weight_map, dict)
  except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
    raise CheckpointError(f'{path}: not a valid safetensors index ({e!r}); expected '
                          '{"weight_map": {tensor name: file name}}') from None
  return weight_map


def _checkpoint_files(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    raise CheckpointError(f'{directory}: no such directory')
  weight_map = _index_map(directory)
  if weight_map is not None:
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
    if missing:
      raise CheckpointError(f'{os.path.join(directory, INDEX)} names shard file(s) that do not '
                            f'exist: {missing}')
    return [os.path.join(directory, f) for f in files]
  if os.path.exists(os.path.join(directory, SINGLE)):
    return [os.path.join(directory, SINGLE)]
  pickled = sorted(f for f in os.listdir(directory) if f.endswith(('.bin', '.pt', '.pth', '.ckpt')))
  hint = ''
  if pickled:
    hint = (f' It has {pickled}: pickle-based weights are never loaded (unpickling runs code); '
            'convert them once in a trusted environment with transformers: '
            '`Model.from_pretrained(dir).save_pretrained(out)` writes safetensors.')
  raise CheckpointError(f'{directory}: no {SINGLE} or {INDEX}.{hint}')


def _some(keys: Sequence[str], n: int = 12) -> str:
  keys = list(keys)
  return ', '.join(keys[:n]) + (f', ... ({len(keys) - n} more)' if len(keys) > n else '')


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def dtype_name(dtype) -> str:
  try:
    return _NAMES[np.dtype(dtype)]
  except KeyError:
    raise ValueError(f'dtype {dtype} cannot be stored in safetensors') from None


def write_checkpoint(directory: str, plan: Iterable[tuple[str, tuple, object]],
                     fetch: Callable[[str], np.ndarray], max_shard_bytes: int = 5 * 2 ** 30,
                     metadata: dict | None = None) -> list[str]:
  """Write tensors `plan = [(key, shape, dtype), ...]` (in order) as safetensors shards.

  `fetch(key)` returns one tensor at a time, so the writer holds one tensor in host memory,
  never a whole shard. Shards are filled in order up to `max_shard_bytes`; more than one shard
  gets `model.safetensors.index.json`, as transformers writes it. Returns the files written.
  """
  plan = [(k, tuple(s), np.dtype(d)) for k, s, d in plan]
  shards: list[list] = [[]]
  size = 0
  for item in plan:
    nbytes = math.prod(item[1]) * item[2].itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
  names = ([SINGLE] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  os.makedirs(directory, exist_ok=True)
  for f in os.listdir(directory):   # shards of an earlier export would mix with these
    if f not in names and re.fullmatch(r'model(-\d+-of-\d+)?\.safetensors', f):
      os.remove(os.path.join(directory, f))
  for name, shard in zip(names, shards):
    _write_file(os.path.join(directory, name), shard, fetch, metadata or {'format': 'pt'})
  if len(shards) > 1:
    index = {'metadata': {'total_size': sum(math.prod(s) * d.itemsize for _, s, d in plan)},
             'weight_map': {k: n for n, shard in zip(names, shards) for k, _, _ in shard}}
    with open(os.path.join(directory, INDEX), 'w') as f:
      json.dump(index, f, indent=2, sort_keys=True)
  elif os.path.exists(os.path.join(directory, INDEX)):   # a stale index would shadow the file
    os.remove(os.path.join(directory, INDEX))
  return names


def _write_file(path, items, fetch, metadata):
  header, offset = {'__metadata__': {k: str(v) for k, v in metadata.items()}}, 0
  for key, shape, dtype in items:
    n = math.prod(shape) * dtype.itemsize
    header[key] = {'dtype': dtype_name(dtype), 'shape': list(shape),
                   'data_offsets': [offset, offset + n]}
    offset += n
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)   # the data buffer starts 8-byte aligned
  tmp = path + '.partial'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)) + blob)
    for key, shape, dtype in items:
      x = np.ascontiguousarray(fetch(key))
      if x.shape != shape or x.dtype != dtype:
        raise ValueError(f'{key}: fetched {x.dtype}{list(x.shape)}, planned {dtype}{list(shape)}')
      f.write(x.tobytes())   # little-endian on every platform JAX runs on
  os.replace(tmp, path)   # a reader never sees a half-written file under the final name
