"""BLIP-2 stage 1 training: the jitted ITC + ITM + ITG step (frozen tower, clamped temp, fits
a batch), a stage-1 checkpoint starting stage 2's Q-Former connector, and a short run of
configs/demo_blip2_stage1.py that learns held-out retrieval (slow)."""
import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from mllm_jax.config import load_config
from mllm_jax.train import blip2_stage1 as s1
from test_blip2_stage1 import tiny, tiny_inputs  # noqa: F401 (a fixture)


def test_train_step_freezes_the_tower_clamps_temp_and_learns(tiny):
  import optax
  from mllm_jax.train import optim, steps
  model, params = tiny
  params = dict(params, temp=np.float32(0.6))           # above LAVIS' range: used as 0.5
  px, ids, mask = tiny_inputs()
  batch = dict(pixel_values=px, input_ids=ids, attention_mask=mask)
  mask_t = optim.trainable_mask(params, '(?!vision/).*')
  tx = optax.adam(1e-2)
  state = steps.TrainState(step=np.int32(0), params=params,
                           opt_state=tx.init(optim.split_params(params, mask_t)[0]))
  step = jax.jit(s1.make_train_step(model, tx, mask_t))
  new, metrics = step(state, batch, jax.random.key(0))
  np.testing.assert_allclose(   # weights 1, 1, 1
      metrics['loss'], metrics['itc_loss'] + metrics['itm_loss'] + metrics['itg_loss'],
      rtol=1e-6)
  assert metrics['temp'] == np.float32(0.5) and float(metrics['nonfinite']) == 0
  before = traverse_util.flatten_dict(params, sep='/')
  after = traverse_util.flatten_dict(jax.device_get(new.params), sep='/')
  for k, v in before.items():
    if k.startswith('vision/'):
      np.testing.assert_array_equal(after[k], v)       # frozen
    else:
      assert not np.array_equal(after[k], v), k        # ITC, ITM and ITG reach every part
  assert after['temp'] <= 0.5                            # clamped after the update
  opt_paths = [jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(new.opt_state)[0]]
  assert any("['vision_proj']" in p for p in opt_paths)   # Adam moments of what trains ...
  assert not any("['vision']" in p for p in opt_paths)    # ... and none for the tower
  # 40 steps on this batch (new negatives each step) fit all three objectives
  first = jax.device_get(metrics)
  for i in range(1, 41):
    new, metrics = step(new, batch, jax.random.key(i))
  last = jax.device_get(metrics)
  assert last['itc_loss'] < 0.5 * first['itc_loss'], (first, last)
  assert last['itm_loss'] < 0.5 * first['itm_loss'] and last['itm_accuracy'] == 1, (first, last)
  assert last['itg_loss'] < 0.5 * first['itg_loss'], (first, last)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a short run of the demo: 2 tower layers, 60 steps of 32 captions, 128 held-out pairs
SHORT = {'model.vision.depth': 2, 'train.steps': 60, 'train.eval_every': 0,
         'train.log_every': 10, 'train.eval_examples': 128}


def stage2_model(stage1_cfg, instruction=False, **qformer):
  """An MLLM whose Q-Former connector has the stage-1 Q-Former's architecture, and random
  params of its shapes (a compiled init of the whole MLLM costs ~15 s here)."""
  from mllm_jax.models import MLLM, LLMConfig, MLLMConfig
  from mllm_jax.models.config import ConnectorConfig
  q = dataclasses.replace(stage1_cfg.qformer, instruction=instruction, **qformer)
  mllm = MLLM(MLLMConfig(
      llm=LLMConfig(vocab_size=64, hidden=32, depth=1, heads=2, kv_heads=1, mlp_dim=64),
      vision=stage1_cfg.vision, connector=ConnectorConfig(kind='qformer', qformer=q),
      image_token_id=3))
  s = stage1_cfg.vision.image_size
  extra = {'qformer_input_ids': np.ones((1, 4), np.int32)} if instruction else {}
  shapes = jax.eval_shape(lambda: nn.meta.unbox(mllm.init(
      jax.random.key(1), np.full((1, 4), 3, np.int32), np.zeros((1, s, s, 3), np.float32),
      **extra)['params']))
  rng = np.random.RandomState(1)
  return mllm, jax.tree.map(lambda x: (0.3 * rng.randn(*x.shape)).astype(x.dtype), shapes)


@pytest.mark.slow
def test_demo_learns_retrieval_through_the_cli(tmp_path):
  """`python -m mllm_jax.train.blip2_stage1` with configs/demo_blip2_stage1.py, shortened:
  held-out image -> text recall@1 of ITC rises far above chance and the ITC loss falls; the
  run's stage-1 checkpoint starts stage 2."""
  args = [f'--config.{k}={v}' for k, v in SHORT.items()]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  r = subprocess.run([sys.executable, '-m', 'mllm_jax.train.blip2_stage1', '--config',
                      os.path.join(ROOT, 'configs', 'demo_blip2_stage1.py'), '--workdir',
                      str(tmp_path)] + args, capture_output=True, text=True, timeout=900, env=env,
                     cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Saved the stage-1 model' in r.stdout, r.stdout
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  evals = [row for row in rows if 'eval/i2t_r1' in row]
  train = [row for row in rows if 'itc_loss' in row]
  assert [row['step'] for row in evals] == [0, 60]
  res = evals[-1]
  chance = res['eval/chance_r1']
  assert chance < 0.02 and evals[0]['eval/i2t_r1'] < 0.05
  assert res['eval/i2t_r1'] > 0.08 and res['eval/i2t_r1'] > 5 * chance, evals
  assert train[-1]['itc_loss'] < train[0]['itc_loss'] - 0.3, train
  assert all(np.isfinite(row['loss']) for row in train)
  model1, p1, tok_dir = s1.load_stage1(str(tmp_path))
  assert tok_dir == str(tmp_path / 'tokenizer') and model1.cfg.qformer.num_queries == 16
  assert s1.load_qformer_tokenizer(tok_dir).bos_token == '[DEC]'
  mllm, p0 = stage2_model(model1.cfg, instruction=True)
  s1.mllm_params_from_stage1(str(tmp_path), mllm, p0)


@pytest.mark.slow   # ~45 s: three runs; the default run tests checkpoint_or_stop via the reward job
def test_cut_run_resumes_to_the_uninterrupted_run(tmp_path):
  """`run` cut after 2 of 4 steps (`train.max_steps_per_run`: the save-and-stop path SIGTERM
  takes too) resumes from its checkpoint on rerun: the same losses, held-out metrics and
  stage-1 parameters as a run without the cut; a rerun after the end reports the saved model."""
  over = {'model.vision.depth': 1, 'model.vision.width': 32, 'model.vision.mlp_dim': 64,
          'model.qformer.hidden': 32, 'model.qformer.mlp_dim': 64, 'model.qformer.depth': 1,
          'model.qformer.num_queries': 4, 'model.embed_dim': 16, 'train.steps': 4,
          'train.batch_size': 8, 'train.log_every': 1, 'train.eval_every': 0,
          'train.eval_examples': 16, 'train.checkpoint_every': 0}
  config = load_config(os.path.join(ROOT, 'configs', 'demo_blip2_stage1.py'), over)
  full = s1.run(config, str(tmp_path / 'full'))
  config.train.max_steps_per_run = 2
  assert s1.run(config, str(tmp_path / 'cut')) is None
  assert sorted(os.listdir(tmp_path / 'cut' / 'stage1_checkpoints')) == ['2']
  assert not (tmp_path / 'cut' / 'stage1').exists()
  config.train.max_steps_per_run = 0
  assert s1.run(config, str(tmp_path / 'cut')) == full
  logs = {w: [json.loads(l) for l in open(tmp_path / w / 'metrics.jsonl')] for w in ('full', 'cut')}
  losses = {w: [(r['step'], r['loss']) for r in rows if 'loss' in r] for w, rows in logs.items()}
  assert [s for s, _ in losses['full']] == [1, 2, 3, 4] and losses['cut'] == losses['full']
  jax.tree.map(np.testing.assert_array_equal, s1.load_stage1(str(tmp_path / 'cut'))[1],
               s1.load_stage1(str(tmp_path / 'full'))[1])
  assert s1.run(config, str(tmp_path / 'cut')) == full   # already trained: reported


def test_stage1_checkpoint_starts_stage_2(tiny, tmp_path):
  """A saved stage-1 model's tower and Q-Former (+ text parts for InstructBLIP) become an
  MLLM's tower and Q-Former connector; the connector then computes the stage-1 Q-Former's
  query outputs, projected."""
  model1, p1 = tiny
  s1.save_stage1(str(tmp_path / 'stage1'), model1, p1)
  loaded, p1, tok_dir = s1.load_stage1(str(tmp_path))
  assert loaded.cfg == model1.cfg and tok_dir == ''
  jax.tree.map(np.testing.assert_array_equal, p1, tiny[1])
  flat1 = traverse_util.flatten_dict(p1, sep='/')
  for instruction in (False, True):   # BLIP-2 and InstructBLIP connectors
    mllm, p0 = stage2_model(model1.cfg, instruction)
    p2 = s1.mllm_params_from_stage1(str(tmp_path / 'stage1'), mllm, p0)
    flat0, flat2 = (traverse_util.flatten_dict(p, sep='/') for p in (p0, p2))
    assert flat2.keys() == flat0.keys()
    for k, v in flat2.items():
      if k.startswith(('connector/language_projection/', 'llm/')):
        np.testing.assert_array_equal(v, flat0[k])
      elif k.startswith('connector/'):
        np.testing.assert_array_equal(v, flat1['qformer/' + k[len('connector/'):]])
      else:
        np.testing.assert_array_equal(v, flat1[k])   # the tower
    assert any('/text_ffn/' in k for k in flat2) == instruction
  mllm, p0 = stage2_model(model1.cfg)
  p2 = s1.mllm_params_from_stage1((model1, p1), mllm, p0)
  px = tiny_inputs()[0]
  got = mllm.apply({'params': p2}, px, method='encode_images')
  feats = model1.apply({'params': p1}, px, method='features')
  h = model1.apply({'params': p1}, feats, method=lambda m, f: m.qformer(f, mode='bidirectional'))
  proj = p2['connector']['language_projection']
  np.testing.assert_allclose(got, h @ proj['kernel'] + proj['bias'], rtol=1e-5, atol=1e-5)
  assert np.abs(h).max() > 0.1
  with pytest.raises(ValueError, match=r'config.model.connector.qformer.num_queries=8'):
    s1.mllm_params_from_stage1((model1, p1), stage2_model(model1.cfg, num_queries=8)[0], p2)
  patches = dataclasses.replace(model1.cfg, vision=dataclasses.replace(
      model1.cfg.vision, feature_select='patch'))
  with pytest.raises(ValueError, match=r"config.model.vision.feature_select: 'patch'"):
    s1.mllm_params_from_stage1((model1, p1), stage2_model(patches)[0], p2)


def test_bad_config_says_which_key(tmp_path):
  config = load_config(os.path.join(ROOT, 'configs', 'demo_blip2_stage1.py'))
  tok = s1.build_qformer_tokenizer(str(tmp_path / 'tok'))
  assert tok.bos_token == '[DEC]' and tok('a red circle.')['input_ids'][0] == tok.cls_token_id
  cfg = s1.model_config(config, tok)
  assert cfg.decoder_bos_id == tok.bos_token_id and cfg.qformer.vocab_size >= len(tok)
  config.model.qformer.vocab_size = 8
  with pytest.raises(ValueError, match='config.model.qformer.vocab_size=8'):
    s1.model_config(config, tok)
  config.model.qformer.vocab_size = 0
  config.data.max_len = 64
  with pytest.raises(ValueError, match='config.data.max_len=64 > config.model.qformer'):
    s1.model_config(config, tok)
  config.data.max_len = 32
  with config.unlocked():
    config.model.qformer.n_heads = 1
  with pytest.raises(ValueError, match=r"config.model.qformer: unknown key\(s\) \['n_heads'\]"):
    s1.model_config(config, tok)


def test_training_job_starts_the_connector_from_stage_1(tiny, tmp_path):
  """`config.model.connector.init_from=STAGE1` in the training job's start
  (`hf.pretrained.init_params`): the tower and Q-Former are stage 1's, sharded as the rest."""
  from mllm_jax import sharding as shd
  from mllm_jax.hf import pretrained
  from mllm_jax.models import MLLM
  from mllm_jax.train import steps
  model1, p1 = tiny
  s1.save_stage1(str(tmp_path / 'stage1'), model1, p1)
  mllm = stage2_model(model1.cfg, instruction=True)[0]
  cfg = dataclasses.replace(mllm.cfg, connector=dataclasses.replace(
      mllm.cfg.connector, init_from=str(tmp_path)))
  mesh = shd.make_mesh({'fsdp': 2}, devices=jax.devices()[:2])
  factory = steps.StateFactory(MLLM(cfg), mesh, shd.logical_rules('fsdp'))
  params = pretrained.init_params(factory, jax.random.key(0))
  flat1 = traverse_util.flatten_dict(p1, sep='/')
  flat = traverse_util.flatten_dict(params, sep='/')
  for k, v in flat.items():
    assert v.sharding == traverse_util.flatten_dict(factory.param_shardings, sep='/')[k], k
    if k.startswith('connector/') and 'language_projection' not in k:
      np.testing.assert_array_equal(v, flat1['qformer/' + k[len('connector/'):]])
    elif k.startswith('vision/'):
      np.testing.assert_array_equal(v, flat1[k])
  bad = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, hf_path='HF_DIR'))
  with pytest.raises(ValueError, match='leave config.model.vision.hf_path empty'):
    pretrained.init_params(steps.StateFactory(MLLM(bad), mesh, shd.logical_rules('fsdp')),
                           jax.random.key(0))
