"""TFDS builders: the user's JSON / JSONL files + image directory -> array_record shards.

One builder per record kind (see `records.py`): `LlavaConversations`, `CaptionPairs`,
`PreferencePairs`. A builder config names the dataset and its files; every example stores

  id, source ('file[index]' / 'file:line', for error messages),
  record (the raw JSON record, parsed and validated when read, so the bad-input policy of the
          training run decides about it),
  images (the encoded image files' bytes, as on disk: JPEG stays JPEG; b'' for a file that
          was missing at build time), image_paths (the paths the record names).

Build (once, on one host; any number of readers afterwards):

  python -m mllm_jax.data.tfds_builders --kind conversation --name mix665k \
      --train llava_v1_5_mix665k.json --image_root DATA/images --eval_fraction 0.001 \
      --data_dir DATA/tfds

Read back with `tfds.data_source('llava_conversations/mix665k', data_dir=...)` or
`load_data_source(data_dir, 'llava_conversations/mix665k', 'train')`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from mllm_jax.data import records

VERSION = tfds.core.Version('1.0.0')


@dataclasses.dataclass(eq=False)
class FilesConfig(tfds.core.BuilderConfig):
  """name: the dataset's config name (e.g. 'mix665k'); train / eval: JSON or JSONL files;
  image_root: where the records' image paths start; eval_fraction: held out by id when no
  eval files are given."""
  train: Sequence[str] = ()
  eval: Sequence[str] = ()
  image_root: str = ''
  eval_fraction: float = 0.0


class _FilesBuilder(tfds.core.GeneratorBasedBuilder):
  """Common builder: one example per record of the config's files."""
  VERSION = VERSION
  RELEASE_NOTES = {'1.0.0': 'raw record JSON + encoded image bytes'}
  KIND = ''
  # Nothing is downloaded; and without this TFDS looks for a checksums file next to the code
  # through `importlib_resources`, which isn't a dependency.
  url_infos = {}

  def __init__(self, *, config: FilesConfig, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(config=config, **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=f'{self.KIND} records ({records.__name__})',
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'source': tfds.features.Text(),
            'record': tfds.features.Text(),
            'images': tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            'image_paths': tfds.features.Sequence(tfds.features.Text()),
        }))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    if not c.train:
      raise ValueError(f'builder config {c.name!r} has no train files')
    if c.eval:
      return {'train': self._generate(c.train, None), 'eval': self._generate(c.eval, None)}
    if c.eval_fraction > 0:
      return {'train': self._generate(c.train, 'train'), 'eval': self._generate(c.train, 'eval')}
    return {'train': self._generate(c.train, None)}

  def _generate(self, files, split):
    recs = records.JsonRecords(files)   # checks that the files exist before the beam starts
    return self._generate_examples(files=tuple(files), split=split, n=len(recs))

  def _generate_examples(self, files, split, n):
    c = self.builder_config
    recs = records.JsonRecords(files)
    for i in range(n):
      raw, source = recs[i]
      sid = records.record_id(raw, i)
      if split is not None and records.in_eval_split(sid, c.eval_fraction) != (split == 'eval'):
        continue
      paths = []
      if isinstance(raw, dict):
        value = raw.get('image', raw.get('images'))
        paths = [value] if isinstance(value, str) else (
            list(value) if isinstance(value, list) and all(isinstance(v, str) for v in value)
            else [])
      yield f'{i}', {'id': sid, 'source': source, 'record': json.dumps(raw, ensure_ascii=False),
                     'images': [_read_bytes(os.path.join(c.image_root, p)) for p in paths],
                     'image_paths': paths}


def _read_bytes(path: str) -> bytes:
  """The file's bytes; b'' if it can't be read (the reader's bad-input policy then decides)."""
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError:
    return b''


class LlavaConversations(_FilesBuilder):
  """LLaVA instruction data: {"id", "image", "conversations": [{"from", "value"}]}."""
  KIND = 'conversation'


class CaptionPairs(_FilesBuilder):
  """Image + caption pairs, or LLaVA's pretrain JSON."""
  KIND = 'caption'


class PreferencePairs(_FilesBuilder):
  """TRL / Insight-V preference records: prompt, chosen, rejected, images."""
  KIND = 'preference'


BUILDERS = {b.KIND: b for b in (LlavaConversations, CaptionPairs, PreferencePairs)}


def build(kind: str, name: str, train: Sequence[str], data_dir: str, *, eval: Sequence[str] = (),
          image_root: str = '', eval_fraction: float = 0.0) -> str:
  """Builds dataset `<builder>/<name>` of record `kind` into `data_dir`; returns its full name
  (what `tfds.data_source` and `config.data.tfds_name` take)."""
  if kind not in BUILDERS:
    raise ValueError(f'unknown record kind {kind!r}; expected one of {sorted(BUILDERS)}')
  cls = BUILDERS[kind]
  config = FilesConfig(name=name, version=VERSION, train=tuple(train), eval=tuple(eval),
                       image_root=image_root, eval_fraction=eval_fraction,
                       description=f'{kind} records from {list(train)}')
  builder = cls(config=config, data_dir=data_dir)
  builder.download_and_prepare()
  return f'{builder.name}/{name}'


def load_data_source(data_dir: str, name: str, split: str):
  """Random-access source of split `split` of dataset `name` ('llava_conversations/mix665k'),
  read from its array_record files (no builder code needed, so any host can read it)."""
  path = os.path.join(data_dir, name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no TFDS dataset {name!r} under {data_dir!r}; build it with '
                            'python -m mllm_jax.data.tfds_builders')
  versions = sorted(v for v in os.listdir(path) if v[:1].isdigit())
  if not versions:
    raise FileNotFoundError(f'{path} holds no prepared version of {name!r}')
  builder = tfds.builder_from_directory(os.path.join(path, versions[-1]))
  if split not in builder.info.splits:
    raise ValueError(f'TFDS dataset {name!r} has no split {split!r}; it has '
                     f'{sorted(builder.info.splits)}')
  return builder.as_data_source(split=split)


def kind_of(name: str) -> str:
  """The record kind of a dataset name 'llava_conversations/...' (from the builder name)."""
  builder = name.split('/')[0]
  for kind, cls in BUILDERS.items():
    if cls.name == builder:
      return kind
  raise ValueError(f'{name!r} is not a dataset of our builders '
                   f'({sorted(c.name for c in BUILDERS.values())})')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--kind', required=True, choices=sorted(BUILDERS))
  p.add_argument('--name', required=True, help="the dataset's config name, e.g. mix665k")
  p.add_argument('--train', nargs='+', required=True, help='JSON / JSONL files')
  p.add_argument('--eval', nargs='*', default=(), help='held-out JSON / JSONL files')
  p.add_argument('--eval_fraction', type=float, default=0.0,
                 help='without --eval: hold out this fraction of the records by id')
  p.add_argument('--image_root', default='', help='directory the image paths are relative to')
  p.add_argument('--data_dir', required=True, help='TFDS data directory to write to')
  a = p.parse_args(argv)
  name = build(a.kind, a.name, a.train, a.data_dir, eval=a.eval, image_root=a.image_root,
               eval_fraction=a.eval_fraction)
  print(f'Built {name} in {a.data_dir}; train with --config.data.source=tfds '
        f'--config.data.tfds_name={name} --config.data.tfds_dir={a.data_dir}')


if __name__ == '__main__':
  main()
