"""Input-pipeline throughput on real image files vs the demo's training step.

    python benchmarks/data.py              # 2000 records, 40 batches per setting (~3 min)
    python benchmarks/data.py --quick      # 600 records, 12 batches per setting

Writes real files into a temporary directory: photo-like JPEGs (640 x 480, smooth colour
fields with shapes; quality 90) and PNGs (320 x 320), and a LLaVA JSON of 1-2 turn
conversations (85% with one image, 5% with two (one turn), 10% text-only). Then times the
grain pipeline of `mllm_jax.data.pipeline` (parse + validate, JPEG/PNG decode, CLIP resize / centre crop /
normalise, chat template + assistant masks, length-bucketed batching) at the demo's sizes
(configs/demo.py: 32 px images, 16 image tokens, batch 32; max_len 96 with buckets
48/64/80, as these conversations run to ~90 tokens), in-process and with grain worker
processes, and the demo model's jitted SFT train step on full-length (96) batches of the same
data, in one run.
Also reports LLaVA-1.5 image sizes (336 px, 576 tokens) for reference.

The last line is machine-readable:
    pipeline_samples_per_s=<best> train_samples_per_s=<x> headroom=<pipeline / train>
    cpu_ratio=<train CPU-s per sample / in-process pipeline CPU-s per sample>
(cpu_ratio is the load-independent figure: on a shared machine the wall-clock rates swing with
other processes' load, the CPU cost per sample much less.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

QUESTIONS = ['what colour is the largest shape?', 'how many objects are there?',
             'describe the image briefly.', 'is there a circle at the top left?',
             'where is the red square?']
ANSWERS = ['red', 'three', 'a blue circle and a green square.', 'yes', 'bottom right', 'no']


def photo(rng, w, h) -> Image.Image:
  """A smooth colour field with a few shapes: compresses like a photo, not like noise."""
  small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
  d = ImageDraw.Draw(im)
  for _ in range(rng.integers(2, 6)):
    x, y = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
    s = int(rng.integers(20, 120))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (d.ellipse if rng.random() < 0.5 else d.rectangle)([x, y, x + s, y + s], fill=fill)
  return im


def write_dataset(root: str, n_records: int, n_images: int, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  names = []
  for i in range(n_images):
    if i % 4 == 3:
      name = f'{i}.png'
      photo(rng, 320, 320).save(os.path.join(root, 'images', name))
    else:
      name = f'{i}.jpg'
      photo(rng, 640, 480).save(os.path.join(root, 'images', name), quality=90)
    names.append(name)
  recs = []
  for i in range(n_records):
    u = rng.random()
    imgs = [] if u < 0.1 else list(rng.choice(names, 2 if u > 0.95 else 1, replace=False))
    turns = []
    for t in range(1 if len(imgs) > 1 else int(rng.integers(1, 3))):
      q = QUESTIONS[rng.integers(len(QUESTIONS))]
      if t == 0 and imgs:
        q = '<image>\n' * len(imgs) + q
      turns += [{'from': 'human', 'value': q},
                {'from': 'gpt', 'value': ANSWERS[rng.integers(len(ANSWERS))]}]
    rec = {'id': f'b{i}', 'conversations': turns}
    if imgs:
      rec['image'] = imgs if len(imgs) > 1 else imgs[0]
    recs.append(rec)
  path = os.path.join(root, 'train.json')
  with open(path, 'w') as f:
    json.dump(recs, f)
  return path


def time_pipeline(tok, path, root, *, workers, batches, batch_size, image_size, tokens, max_len,
                  buckets=()):
  from mllm_jax.data import pipeline
  cfg = pipeline.PipelineConfig(kind='conversation', max_len=max_len, buckets=buckets,
                                max_images=2, image_size=image_size, num_image_tokens=tokens,
                                workers=workers, window=4, worker_buffer=4)
  task = pipeline.json_task(tok, cfg, 'train', [path], image_root=os.path.join(root, 'images'))
  it = task.train_iterator(batch_size, 1, 0, 1)
  try:
    # Untimed: start-up (workers spawn) and the whole first window, which the first next()
    # computes at once; then whole windows only, so every timed batch is computed in the timing.
    first = next(it)
    for _ in range(cfg.window - 1 + workers * cfg.worker_buffer):
      next(it)
    batches = -(-batches // cfg.window) * cfg.window
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
      b = next(it)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  finally:
    it.close()
  # CPU seconds per sample of this process (all its threads): with workers=0 that is the whole
  # pipeline's cost, which load from other processes barely changes.
  return batches * batch_size / dt, first, cpu / (batches * batch_size)


def time_train_step(tok, batch, steps):
  """The demo's SFT step (configs/demo.py model) on one pipeline batch; samples/s."""
  import jax
  from mllm_jax import sharding as shd
  from mllm_jax.config import load_config
  from mllm_jax.models import MLLM
  from mllm_jax.train import loop, optim
  from mllm_jax.train import steps as steps_lib
  import flax.linen as nn
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = load_config(os.path.join(here, 'configs', 'demo.py'))
  mesh = shd.make_mesh(config.mesh.to_dict())
  rules = shd.logical_rules(config.sharding.rules)
  model = MLLM(loop.model_config(config, tok))
  factory = steps_lib.StateFactory(model, mesh, rules)
  sc = config.sft
  tx = optim.make_optimizer(sc.optim, sc.steps)
  mask = factory.mask(sc.trainable, 'sft.trainable')
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = factory.create_state(factory.init_params(jax.random.key(0)), tx, mask)
    fn = steps_lib.jit_train_step(
        steps_lib.make_train_step(model, tx, mask, logits_chunk=config.train.logits_chunk),
        factory.state_shardings(tx, mask), mesh, {k: v.ndim - 1 for k, v in batch.items()})
    b = shd.shard_batch(batch, mesh) if hasattr(shd, 'shard_batch') else batch
    for _ in range(2):
      state, m = fn(state, b)
    jax.block_until_ready(m)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
      state, m = fn(state, b)
    jax.block_until_ready(m)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  n = steps * batch['input_ids'].shape[1]
  return n / dt, cpu / n


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--quick', action='store_true')
  p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  a = p.parse_args(argv)
  n_rec, n_img, batches = (600, 150, 12) if a.quick else (2000, 400, 40)
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from mllm_jax.data import tokenizer as tok_lib
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; '
        f'{n_rec} records, {n_img} image files')
  with tempfile.TemporaryDirectory() as root:
    t0 = time.perf_counter()
    path = write_dataset(root, n_rec, n_img)
    tok = tok_lib.load_tokenizer(tok_lib.build_demo_tokenizer(os.path.join(root, 'tok')))
    print(f'wrote the dataset in {time.perf_counter() - t0:.1f} s')
    results = {}
    cpu_ms = {}
    for w in a.workers:
      sps, first, cpu = time_pipeline(tok, path, root, workers=w, batches=batches,
                                      batch_size=32, image_size=32, tokens=16, max_len=96,
                                      buckets=(48, 64, 80))
      results[w] = sps
      extra = f', {cpu * 1e3:.2f} CPU ms/sample' if w == 0 else ''
      cpu_ms['demo'] = cpu_ms.get('demo', cpu * 1e3)
      print(f'demo sizes (32 px, 16 image tokens, batch 32), workers={w}: {sps:8.1f} '
            f'samples/s{extra}')
    for w in (0, max(a.workers)):
      sps, _, cpu = time_pipeline(tok, path, root, workers=w, batches=max(8, batches // 2),
                                  batch_size=16, image_size=336, tokens=576, max_len=1280)
      extra = f', {cpu * 1e3:.2f} CPU ms/sample' if w == 0 else ''
      print(f'LLaVA-1.5 sizes (336 px, 576 image tokens, batch 16), workers={w}: '
            f'{sps:8.1f} samples/s{extra}')
    # the train step on a batch of the demo's full length, as the loop feeds it
    from mllm_jax.data import pipeline
    cfg = pipeline.PipelineConfig(kind='conversation', max_len=96, max_images=2, image_size=32,
                                  num_image_tokens=16)
    task = pipeline.json_task(tok, cfg, 'train', [path], image_root=os.path.join(root, 'images'))
    it = task.train_iterator(32, 1, 0, 1)
    train_batch = next(it)
    train, train_cpu = time_train_step(tok, train_batch, steps=4 if a.quick else 10)
    print(f'demo SFT train step (configs/demo.py model, batch 32 x 96): {train:8.1f} samples/s, '
          f'{train_cpu * 1e3:.2f} CPU ms/sample')
    best = max(results.values())
    print(f'pipeline_samples_per_s={best:.1f} train_samples_per_s={train:.1f} '
          f'headroom={best / train:.2f} cpu_ratio={train_cpu * 1e3 / cpu_ms["demo"]:.2f}')


if __name__ == '__main__':
  main()
