"""Write the built-in scenes task as real files in LLaVA's formats, to try the file pipeline.

  python -m mllm_jax.data.export --out DIR [--train 4000] [--eval 256] [--image_size 64]

DIR/images/{train,eval}_<i>_<k>.{png,jpg}   (PNG and JPEG alternate)
DIR/caption_{train,eval}.json              LLaVA pretrain JSON (blip_laion_cc_sbu_558k layout)
DIR/vqa_{train,eval}.json                  LLaVA instruction JSON (llava_v1_5_mix665k layout)

configs/llava_json_demo.py trains on them (see docs/data.md).
"""
from __future__ import annotations

import argparse
import json
import os

from PIL import Image

from mllm_jax.data import synthetic

ROLE = {'user': 'human', 'assistant': 'gpt', 'system': 'system'}
PRETRAIN_PROMPT = 'Render a clear and concise summary of the photo.'


def export(out: str, n_train: int, n_eval: int, image_size: int = 64, seed: int = 0) -> dict:
  """Writes the files above; returns {name: path}."""
  os.makedirs(os.path.join(out, 'images'), exist_ok=True)
  paths = {}
  for split, n in (('train', n_train), ('eval', n_eval)):
    for kind in ('caption', 'vqa'):
      recs = []
      for i in range(n):
        s = synthetic.make_sample(i, kind=kind, split=split, seed=seed, image_size=image_size)
        names = []
        for k, pixels in enumerate(s.images):
          name = f'{split}_{kind}_{i}_{k}.' + ('png' if (i + k) % 2 else 'jpg')
          path = os.path.join(out, 'images', name)
          if not os.path.exists(path):
            Image.fromarray(pixels).save(path, **({} if name.endswith('png') else
                                                  {'quality': 95}))
          names.append(name)
        if kind == 'caption':
          turns = [{'from': 'human', 'value': f'{PRETRAIN_PROMPT}\n<image>'},
                   {'from': 'gpt', 'value': s.caption}]
        else:
          turns = [{'from': ROLE[m['role']], 'value': m['content']} for m in s.messages]
        recs.append({'id': f'{split}_{kind}_{i}',
                     'image': names[0] if len(names) == 1 else names, 'conversations': turns})
      paths[f'{kind}_{split}'] = os.path.join(out, f'{kind}_{split}.json')
      with open(paths[f'{kind}_{split}'], 'w') as f:
        json.dump(recs, f)
  return paths


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out', required=True)
  p.add_argument('--train', type=int, default=4000)
  p.add_argument('--eval', type=int, default=256)
  p.add_argument('--image_size', type=int, default=64)
  p.add_argument('--seed', type=int, default=0)
  a = p.parse_args(argv)
  paths = export(a.out, a.train, a.eval, a.image_size, a.seed)
  for k, v in paths.items():
    print(f'{k}: {v}')


if __name__ == '__main__':
  main()
