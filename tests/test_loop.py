"""The training job end to end: CLI overrides and errors, metrics files, resume equality after
interruption, and the demo learning the synthetic task (reduced size)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mllm_jax.config import load_config
from mllm_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'configs', 'demo.py')


def load_demo(**overrides):
  return load_config(DEMO, overrides)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]


TINY = {'model.llm.depth': 2, 'model.vision.depth': 2, 'train.log_every': 1,
        'train.checkpoint_every': 2, 'train.eval_examples': 16, 'train.eval_batch_size': 16,
        'train.progress_bar': False, 'pretrain.steps': 5, 'pretrain.batch_size': 8,
        'sft.steps': 5, 'sft.batch_size': 16, 'sft.grad_accum': 2}   # runs on the 8 test devices


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
  full = str(tmp_path / 'full')
  loop.run(load_demo(**TINY), full)
  parts = str(tmp_path / 'parts')
  # stop mid-pretrain (step 3), then at the stage boundary (5), then mid-SFT (8), then finish
  for budget in (3, 2, 3, 0):
    out = loop.run(load_demo(**TINY, **{'train.max_steps_per_run': budget}), parts)
    assert (out is None) == (budget != 0)
  a, b = read_metrics(full), read_metrics(parts)
  train_a = [(m['step'], m['loss'], m['grad_norm']) for m in a if 'loss' in m]
  train_b = [(m['step'], m['loss'], m['grad_norm']) for m in b if 'loss' in m]
  assert [s for s, *_ in train_a] == list(range(1, 11))
  assert [s for s, *_ in train_b] == [s for s, *_ in train_a]
  np.testing.assert_allclose(np.array(train_b)[:, 1:], np.array(train_a)[:, 1:], rtol=1e-6)
  eval_a = [m for m in a if 'eval/loss' in m]
  eval_b = [m for m in b if 'eval/loss' in m]
  assert len(eval_a) == len(eval_b) == 2
  for x, y in zip(eval_a, eval_b):
    assert x['step'] == y['step']
    np.testing.assert_allclose(x['eval/loss'], y['eval/loss'], rtol=1e-6)
  # a finished run resumes to nothing to do, and a rerun keeps the same results
  again = loop.run(load_demo(**TINY), parts)
  np.testing.assert_allclose(again['eval/loss'], eval_a[-1]['eval/loss'], rtol=1e-6)


def test_cli_rejects_misspelt_config_key(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'mllm_jax.train', '--config', DEMO,
                      '--workdir', str(tmp_path), '--config.sft.stepz=3'],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  assert 'stepz' in r.stderr and 'steps' in r.stderr
  assert not os.path.exists(tmp_path / 'metrics.jsonl')


def test_stage_and_mesh_config_errors(tmp_path):
  with pytest.raises(ValueError, match='config.train.stages names'):
    loop.run(load_demo(**{'train.stages': 'pretrain,sfft'}), str(tmp_path))
  with pytest.raises(ValueError, match=r'config.sft.batch_size=30 is not divisible by'):
    loop.run(load_demo(**{**TINY, 'train.stages': 'sft', 'sft.batch_size': 30, 'sft.grad_accum': 4}),
             str(tmp_path))
  with pytest.raises(ValueError, match='data-parallel size 8'):
    loop.run(load_demo(**{**TINY, 'mesh.fsdp': 8, 'train.stages': 'sft', 'sft.batch_size': 4,
                          'sft.grad_accum': 1}), str(tmp_path))


@pytest.mark.slow
def test_demo_learns_through_the_cli(tmp_path):
  """The README command at reduced size: pretrain then SFT, held-out accuracy far above chance."""
  args = ['--config.pretrain.steps=150', '--config.sft.steps=300', '--config.train.eval_examples=256',
          '--config.train.progress_bar=False', '--config.train.checkpoint_every=1000']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}   # one device, as the README
  r = subprocess.run([sys.executable, '-m', 'mllm_jax.train', '--config', DEMO,
                      '--workdir', str(tmp_path)] + args, capture_output=True, text=True,
                     timeout=900, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = read_metrics(tmp_path)
  train = [m for m in metrics if 'loss' in m]
  assert train[-1]['step'] == 450 and all(np.isfinite(m['loss']) for m in train)
  evals = [m for m in metrics if 'eval/accuracy' in m]
  assert [m['step'] for m in evals] == [150, 450]
  # chance (a model blind to the image) is ~0.35 on this task
  assert evals[-1]['eval/accuracy'] > 0.6, evals
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))
  assert os.path.isdir(tmp_path / 'checkpoints' / '450')
  assert 'held-out' in r.stdout
  check_generation_on_the_trained_demo(tmp_path, env)


def check_generation_on_the_trained_demo(workdir, env):
  """The trained demo answers held-out first-turn questions by greedy decoding (API, batched
  with left padding), and the --checkpoint CLI prints the API's answer."""
  from PIL import Image
  from mllm_jax import generate as gen
  from mllm_jax.data import synthetic, tokenizer as tok_lib
  model, params, tok, proc = gen.load_for_generation(checkpoint=str(workdir))
  side = model.cfg.vision.image_size
  samples = [s for s in (synthetic.make_sample(i, split='eval', image_size=side) for i in range(40))
             if len(s.images) == 1][:24]
  prompts = [gen.prompt_ids(model, tok, s.messages[0]['content'].split('\n', 1)[1], 1)[0]
             for s in samples]
  width = max(len(p) for p in prompts)
  ids = np.full((len(prompts), width), tok.pad_token_id, np.int32)
  mask = np.zeros_like(ids)
  for row, p in enumerate(prompts):
    ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
  pixels = proc([s.images[0] for s in samples])['pixel_values']
  out = np.asarray(gen.generate(model, params, ids, mask, pixels, max_new_tokens=8,
                                stop_tokens=tok_lib.stop_token_ids(tok),
                                pad_token_id=tok.pad_token_id))
  answers = [tok.decode(o, skip_special_tokens=True).strip() for o in out]
  right = [a == s.messages[1]['content'] for a, s in zip(answers, samples)]
  assert np.mean(right) > 0.5, list(zip(answers, [s.messages[1]['content'] for s in samples]))
  Image.fromarray(samples[0].images[0]).save(workdir / 'q.png')
  r = subprocess.run([sys.executable, '-m', 'mllm_jax.generate', '--checkpoint', str(workdir),
                      '--image', str(workdir / 'q.png'), '--prompt',
                      samples[0].messages[0]['content'].split('\n', 1)[1]],
                     capture_output=True, text=True, timeout=300, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip().splitlines()[-1] == answers[0]
