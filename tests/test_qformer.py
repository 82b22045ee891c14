"""Q-Former MLLMs (BLIP-2, InstructBLIP): logits parity with transformers' PyTorch models built
locally with random weights (inputs from transformers' own processors), export round trips, the
BLIP-2 EVA tower, OPT / T5 text models rejected, 1- vs 8-device equality of a train step, the
frozen-ViT/LLM pretrain step, Q-Former inputs from the built-in task, the shipped configs, and
the demo learning."""
import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import transformers
from PIL import Image
from data_files import build_bert_tokenizer
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

import mllm_jax
from mllm_jax import sharding as shd
from mllm_jax.config import load_config
from mllm_jax.data import synthetic, tokenizer as tok_lib
from mllm_jax.models import MLLM, MLLMConfig, VisionEncoder
from mllm_jax.train import loop, optim, steps

from test_hf import assert_close, torch_inputs
from test_train import mesh1, run_step as train_run_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')
IMAGE_ID = 4
WORDS = ['<pad>', '<s>', '</s>', '<unk>', '<image>', 'Question', ':', 'Answer', 'describe', 'the',
         'picture', 'what', 'colour', 'is', 'a', 'red', 'cat', '?', 'how', 'many']


def randomize(model, seed=0):
  """transformers initialises norms to 1, biases and query tokens to 0, BLIP-2's vision weights
  with std 1e-10 and the rest with std 0.02, so at width 32 the image barely reaches the
  logits: give every weight std fan_in^-0.5 and every norm and bias a random value."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim > 1 and name != 'query_tokens':
        p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
      elif ('norm' in name or 'LayerNorm' in name) and name.endswith('weight'):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith('bias') or name == 'query_tokens':
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
  model.set_attn_implementation('eager')
  return model.eval()


def word_tokenizer(words):
  tk = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='<unk>'))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tk.add_special_tokens(words[:5])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='<pad>',
                                              bos_token='<s>', eos_token='</s>', unk_token='<unk>')


# ----------------------------------------------------------------------------------------------
# transformers parity
# ----------------------------------------------------------------------------------------------
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=28, patch_size=14)
QFORMER = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=16)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
NUM_QUERIES = 3
KINDS = {   # model, config, Q-Former layers / cross-attention frequency, tied LLM head
    'blip2': (transformers.Blip2ForConditionalGeneration, transformers.Blip2Config,
              dict(num_hidden_layers=3, cross_attention_frequency=2), False),
    'instructblip': (transformers.InstructBlipForConditionalGeneration,
                     transformers.InstructBlipConfig, dict(cross_attention_frequency=1), True),
}


def build_hf(kind, text=None):
  cls, config_cls, qformer, tied = KINDS[kind]
  torch.manual_seed(0)
  text = text or transformers.LlamaConfig(tie_word_embeddings=tied, **TEXT)
  cfg = config_cls(vision_config=VISION, qformer_config={**QFORMER, **qformer}, text_config=text,
                   num_query_tokens=NUM_QUERIES, image_token_index=IMAGE_ID)
  return randomize(cls(cfg))


def hf_inputs(kind):
  """Inputs exactly as transformers' processors build them: NUM_QUERIES image tokens before
  BOS, then the prompt; InstructBLIP adds the prompt tokenised for its Q-Former."""
  tok = word_tokenizer(WORDS)
  tok.padding_side = 'right'
  image_proc = transformers.BlipImageProcessorPil(size={'height': 28, 'width': 28})
  if kind == 'blip2':
    proc = transformers.Blip2Processor(image_proc, tok, num_query_tokens=NUM_QUERIES)
  else:
    qtok = word_tokenizer(WORDS[:5] + ['[CLS]'] + WORDS[5:][::-1])   # a different vocabulary
    proc = transformers.InstructBlipProcessor(image_proc, tok, qtok, num_query_tokens=NUM_QUERIES)
  rng = np.random.RandomState(0)
  pics = [Image.fromarray(rng.randint(0, 255, s + (3,), dtype=np.uint8))
          for s in ((40, 30), (28, 28), (50, 50))]
  prompts = ['Question : what colour is the cat ? Answer : red',
             'describe the picture', 'Question : how many ? Answer :']
  return dict(proc(images=pics, text=prompts, return_tensors='np', padding=True))


@pytest.mark.parametrize('kind', list(KINDS))
def test_logits_match_transformers_and_export_round_trips(kind, tmp_path):
  hf = build_hf(kind)
  hf.save_pretrained(tmp_path / 'hf')
  model, params = mllm_jax.load_hf(str(tmp_path / 'hf'))
  c = model.cfg
  assert c.connector.kind == 'qformer' and c.image_tokens == NUM_QUERIES
  assert c.connector.qformer.instruction == (kind == 'instructblip')
  assert (c.vision.kind, c.vision.feature_select) == ('blip2', 'full')
  conn = params['connector']
  if kind == 'blip2':   # cross-attention on layers 0 and 2 only (frequency 2)
    assert ['cross_attn' in conn[f'layer_{i}'] for i in range(3)] == [True, False, True]
  inputs = hf_inputs(kind)
  assert (inputs['input_ids'][:, :NUM_QUERIES] == IMAGE_ID).all()   # prepended, before BOS
  assert inputs['pixel_values'].shape == (3, 3, 28, 28)
  if kind == 'instructblip':
    assert inputs['qformer_attention_mask'].min() == 0   # padded instructions
  with torch.no_grad():
    ref = hf(**torch_inputs(inputs)).logits.numpy()
  fwd = jax.jit(lambda p, kw: model.apply({'params': p}, **kw))
  mask = inputs['attention_mask']
  assert_close(fwd(params, inputs), ref, mask)
  # the image (and the instruction) reach the logits: other inputs, other logits
  changed = dict(inputs, pixel_values=inputs['pixel_values'][::-1].copy())
  if kind == 'instructblip':
    changed = dict(inputs, qformer_input_ids=inputs['qformer_input_ids'][::-1].copy(),
                   qformer_attention_mask=inputs['qformer_attention_mask'][::-1].copy())
  diff = np.abs(np.asarray(fwd(params, changed)) - ref)[:, NUM_QUERIES:].max()
  assert diff > 100 * 1e-4 * np.abs(ref).max(), diff
  # per-sample image slots [B, M, ...] (and a per-sample instruction) give the same logits
  per_sample = dict(inputs, pixel_values=inputs['pixel_values'][:, None])
  assert_close(fwd(params, per_sample), ref, mask)

  if kind == 'instructblip':   # greedy generation with the instruction equals transformers'
    one = {k: v[:1] for k, v in inputs.items()}   # the longest prompt: no padding
    assert one['attention_mask'].all()
    with torch.no_grad():
      ref_ids = hf.generate(**torch_inputs(one), max_new_tokens=4, do_sample=False)
    ref_new = ref_ids[0, one['input_ids'].shape[1]:].numpy()
    ours_new = np.asarray(mllm_jax.generate(
        model, params, one['input_ids'], one['attention_mask'], one['pixel_values'],
        max_new_tokens=4, qformer_input_ids=one['qformer_input_ids'],
        qformer_attention_mask=one['qformer_attention_mask']))[0]
    assert len(ref_new) >= 1 and (ours_new[:len(ref_new)] == ref_new).all(), (ours_new, ref_new)

  mllm_jax.save_hf(model, params, str(tmp_path / 'out'))
  back = type(hf).from_pretrained(tmp_path / 'out', attn_implementation='eager').eval()
  assert back.config.text_config.tie_word_embeddings == KINDS[kind][3]
  with torch.no_grad():
    assert_close(back(**torch_inputs(inputs)).logits.numpy(), ref, mask)
  # a state dict in memory maps to the same parameters
  sd_params = mllm_jax.hf.params_from_state_dict(model, hf.state_dict())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(sd_params), jax.device_get(params))


def test_blip2_vision_tower_matches_transformers():
  torch.manual_seed(1)
  hf = randomize(transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**VISION)))
  cfg = mllm_jax.hf.blip2.vision_from_hf(hf.config, 'test')
  tower = VisionEncoder(cfg)
  params = mllm_jax.hf.params_from_state_dict(tower, hf.state_dict())
  pixels = np.random.RandomState(0).randn(2, 3, 28, 28).astype(np.float32)
  with torch.no_grad():
    out = hf(pixel_values=torch.tensor(pixels))
  # features = post-LN of the last layer, class token included (HF last_hidden_state)
  assert_close(tower.apply({'params': params}, pixels), out.last_hidden_state.numpy())
  assert_close(tower.apply({'params': params}, pixels, method='pooled'), out.pooler_output.numpy())


@pytest.mark.parametrize('text', ['opt', 't5'])
def test_opt_and_t5_text_models_are_rejected(text, tmp_path):
  small = dict(vocab_size=64, d_model=32, num_layers=1, num_heads=2, d_ff=32, d_kv=16)
  text_config = (transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                        ffn_dim=32, num_attention_heads=2,
                                        word_embed_proj_dim=32)
                 if text == 'opt' else transformers.T5Config(**small))
  cfg = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER,
                                 text_config=text_config, num_query_tokens=NUM_QUERIES,
                                 image_token_index=IMAGE_ID)
  cfg.architectures = ['Blip2ForConditionalGeneration']
  cfg.save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=f"model_type='{text}.*out of scope"):
    mllm_jax.load_hf(str(tmp_path))


def test_bad_qformer_inputs_say_what_is_wrong():
  hf = build_hf('instructblip')
  model = mllm_jax.hf.build_model(mllm_jax.hf.families.FAMILIES[
      'InstructBlipForConditionalGeneration'].config(hf.config))
  params = mllm_jax.hf.params_from_state_dict(model, hf.state_dict())
  ids = np.full((2, 5), IMAGE_ID)
  px = np.zeros((2, 28, 28, 3), np.float32)
  with pytest.raises(ValueError, match='needs qformer_input_ids'):
    model.apply({'params': params}, ids, px)
  with pytest.raises(ValueError, match=r'qformer_input_ids of shape \[3, 4\]'):
    model.apply({'params': params}, ids, px, qformer_input_ids=np.ones((3, 4), np.int32))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
IMG = 3
CFG = MLLMConfig.from_dict(dict(
    llm=dict(vocab_size=96, hidden=32, depth=2, heads=4, kv_heads=2, mlp_dim=64),
    vision=dict(kind='blip2', image_size=16, patch_size=8, width=16, depth=2, heads=2,
                mlp_dim=32, feature_layer=-1, feature_select='full'),
    connector=dict(kind='qformer', qformer=dict(
        num_queries=4, hidden=16, depth=2, heads=2, mlp_dim=32, cross_attention_every=2,
        instruction=True, vocab_size=48, max_position=8)),
    image_token_id=IMG))
OPT = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, warmup_ratio=0.0,
                                     final_lr_ratio=1.0, grad_clip=1.0, b1=0.9, b2=0.999,
                                     eps=1e-8, weight_decay=0.0))


def make_batch(n=8, t=12, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(4, 96, (n, t)).astype(np.int32)
  ids[:, 0] = 1
  ids[:, 1:5] = IMG
  ids[1, 1:5] = rng.randint(4, 96, 4)   # a text-only sample
  attn = np.ones((n, t), np.int32)
  attn[2, 9:] = 0
  loss = np.zeros((n, t), np.float32)
  for b in range(n):
    loss[b, 5 + b % 4:] = 1
  qmask = (np.arange(6)[None] < rng.randint(1, 7, (n, 1))).astype(np.int32)
  return dict(input_ids=ids, attention_mask=attn, loss_mask=loss * attn,
              pixel_values=rng.randn(n, 1, 16, 16, 3).astype(np.float32),
              qformer_input_ids=(rng.randint(1, 48, (n, 6)) * qmask).astype(np.int32),
              qformer_attention_mask=qmask)


def setup(mesh, pattern='.*', params=None, tx=None, rules='fsdp_tp'):
  model = MLLM(CFG)
  factory = steps.StateFactory(model, mesh, shd.logical_rules(rules))
  params = (factory.init_params(jax.random.key(0)) if params is None
            else jax.device_put(params, factory.param_shardings))
  tx = tx or optim.make_optimizer(OPT, 10)
  mask = factory.mask(pattern, 'trainable')
  return factory, factory.create_state(params, tx, mask), tx, mask


def run_step(factory, state, tx, mask, batch):
  return train_run_step(factory, state, steps.make_train_step(factory.model, tx, mask), tx, mask,
                        batch)


@pytest.mark.slow
def test_same_step_on_1_and_8_devices():
  batch = make_batch()
  f1, s1, tx, mask = setup(mesh1(), tx=optax.sgd(1.0))
  params0 = jax.device_get(s1.params)
  f8, s8, _, _ = setup(shd.make_mesh({'fsdp': 4, 'tensor': 2}), params=params0, tx=optax.sgd(1.0))
  # the Q-Former's parameters are really split over the mesh
  key = f8.abstract_params['connector']['layer_0']['cross_attn']['key']['kernel']
  assert key.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor', None)
  (n1, m1), (n8, m8) = run_step(f1, s1, tx, mask, batch), run_step(f8, s8, tx, mask, batch)
  np.testing.assert_allclose(m1['loss'], m8['loss'], rtol=1e-6)
  np.testing.assert_allclose(m1['grad_norm'], m8['grad_norm'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(n1.params), jax.device_get(n8.params))


def test_pretrain_step_trains_only_the_qformer_and_projection():
  """BLIP-2's stage 2: ViT and LLM frozen, the Q-Former (queries included) and projection train."""
  factory, state, tx, mask = setup(mesh1(), pattern='connector/.*')
  assert all(v == k.startswith('connector/') for k, v in mask.items())
  assert {k.split('/')[0] for k in mask} == {'vision', 'connector', 'llm'}
  before = jax.device_get(state.params)
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert n_opt == 2 * sum(x.size for x in jax.tree.leaves(before['connector']))   # Adam mu, nu
  state, metrics = run_step(factory, state, tx, mask, make_batch())
  after = jax.device_get(state.params)
  for group in ('vision', 'llm'):
    jax.tree.map(np.testing.assert_array_equal, before[group], after[group])
  changed = jax.tree_util.tree_map_with_path(
      lambda p, a, b: (jax.tree_util.keystr(p), not np.array_equal(a, b)),
      before['connector'], after['connector'])
  changed = dict(jax.tree.leaves(changed, is_leaf=lambda x: isinstance(x, tuple)))
  # Everything that reaches the LLM trains; the last layer's instruction FFN feeds nothing
  # (only query outputs go to the LLM), so it gets no gradient and stays put.
  unused = {k for k in changed if "'layer_1']['text_ffn'" in k}
  assert unused and not any(changed[k] for k in unused)
  assert all(v for k, v in changed.items() if k not in unused), changed
  assert np.isfinite(float(metrics['loss']))


# ----------------------------------------------------------------------------------------------
# Data, configs, demo
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def demo_tokenizer(tmp_path_factory):
  return tok_lib.get_or_build_demo_tokenizer(str(tmp_path_factory.mktemp('tok') / 'tokenizer'))


def test_task_gives_instructions_and_query_sized_images(demo_tokenizer):
  c = load_config(os.path.join(CONFIGS, 'demo_qformer.py'))
  mcfg = loop.model_config(c, demo_tokenizer)
  assert mcfg.image_tokens == 16 and mcfg.connector.qformer.vocab_size >= len(demo_tokenizer)
  task = loop.make_task(c, demo_tokenizer, mcfg, 'vqa', 'train')
  b = task.batch(0, 6)
  image_id = demo_tokenizer.convert_tokens_to_ids('<image>')
  assert ((b['input_ids'] == image_id).sum(1) == 16 * b['num_images']).all()
  for row, sample in enumerate(task.examples(0, 6, with_images=False)):
    n = b['qformer_attention_mask'][row].sum()
    text = demo_tokenizer.decode(b['qformer_input_ids'][row, :n])
    questions = [m['content'].split('\n')[-1] for m in sample.messages[::2]]
    assert text == ' '.join(questions) and '<image>' not in text
    assert (b['qformer_input_ids'][row, n:] == demo_tokenizer.pad_token_id).all()
  cap = loop.make_task(c, demo_tokenizer, mcfg, 'caption', 'train').batch(0, 2)
  assert demo_tokenizer.decode(cap['qformer_input_ids'][0, :cap['qformer_attention_mask'][0].sum()]
                               ) == synthetic.CAPTION_INSTRUCTION
  # the training job's preference pairs (task 'dpo') carry the instruction too (test_dpo.py)
  pairs = loop.make_task(c, demo_tokenizer, mcfg, 'dpo', 'train').batch(0, 2)
  assert pairs['qformer_input_ids'].shape == (2, c.data.qformer_max_len)
  assert pairs['qformer_attention_mask'][:, 0].all()
  short = synthetic.SyntheticTask(demo_tokenizer, num_image_tokens=16,
                                  qformer_tokenizer=demo_tokenizer, qformer_max_len=2)
  with pytest.raises(ValueError, match='sample 0 .*qformer_max_len=2'):
    short.batch(0, 1)


def test_instructblip_vicuna7b_config_size():
  """Full scale, abstractly (nothing allocated): EVA ViT-g/14 (39 x 1408) + InstructBLIP
  Q-Former (12 x 768, 32 queries) + Vicuna-7B = ~7.9B parameters."""
  c = load_config(os.path.join(CONFIGS, 'instructblip_vicuna7b.py'))
  with pytest.raises(AttributeError):
    c.train.stepz = 1
  mcfg = loop.model_config(c)
  assert mcfg.image_tokens == 32 and mcfg.vision.num_tokens == 257
  factory = steps.StateFactory(MLLM(mcfg), shd.make_mesh(c.mesh.to_dict()),
                               shd.logical_rules(c.sharding.rules))
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  p = factory.abstract_params
  assert 0.98e9 < count(p['vision']) < 0.99e9, count(p['vision'])       # EVA ViT-g minus 1 layer
  assert 0.18e9 < count(p['connector']) < 0.20e9, count(p['connector'])  # Q-Former + projection
  assert 7.85e9 < count(p) < 7.95e9, count(p)
  for stage in loop.stage_names(c):
    assert c[stage].trainable == 'connector/.*'


@pytest.mark.slow
def test_demo_qformer_learns_through_the_cli(tmp_path):
  """configs/demo_qformer.py at reduced size: held-out VQA accuracy well above chance (~0.35)."""
  args = ['--config.pretrain.steps=100', '--config.sft.steps=200',
          '--config.train.eval_examples=256', '--config.train.progress_bar=False',
          '--config.train.checkpoint_every=1000']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  r = subprocess.run([sys.executable, '-m', 'mllm_jax.train', '--config',
                      os.path.join(CONFIGS, 'demo_qformer.py'), '--workdir', str(tmp_path)] + args,
                     capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / 'metrics.jsonl') as f:
    metrics = [json.loads(line) for line in f]
  evals = [m for m in metrics if 'eval/accuracy' in m]
  assert evals[-1]['step'] == 300 and evals[-1]['eval/accuracy'] > 0.5, evals


# ----------------------------------------------------------------------------------------------
# A training run's export (processor) and the generate CLI
# ----------------------------------------------------------------------------------------------
RUN = {'model.llm.depth': 1, 'model.llm.hidden': 32, 'model.llm.mlp_dim': 64,
       'model.llm.heads': 2, 'model.llm.kv_heads': 1, 'model.vision.depth': 1,
       'model.vision.width': 32, 'model.vision.heads': 2, 'model.vision.mlp_dim': 64,
       'model.vision.image_size': 16, 'model.connector.qformer.num_queries': 4,
       'model.connector.qformer.hidden': 32, 'model.connector.qformer.depth': 1,
       'model.connector.qformer.heads': 2, 'model.connector.qformer.mlp_dim': 64,
       'train.stages': 'sft', 'sft.steps': 1, 'sft.batch_size': 8, 'train.eval_examples': 8,
       'train.eval_batch_size': 8, 'train.progress_bar': False, 'data.max_len': 64}
PROMPTS = ['what colour is the circle ?', 'how many shapes are there ?', 'describe it']


def bert_tokenizer(path):
  """A real BERT WordPiece tokenizer (InstructBLIP's Q-Former tokenizer class) over the scenes
  task's and the test prompts' words, saved in `path` and loaded."""
  return transformers.AutoTokenizer.from_pretrained(
      build_bert_tokenizer(path, tok_lib.demo_corpus(200) + PROMPTS))


@pytest.fixture(scope='module')
def instructblip_run(tmp_path_factory):
  """A tiny InstructBLIP run (configs/demo_qformer.py, one SFT step) whose Q-Former reads a
  BERT tokenizer of its own, and its `convert --to-hf` export: (workdir, hf dir, Q-Former
  tokenizer)."""
  from mllm_jax import convert
  root = tmp_path_factory.mktemp('instructblip_run')
  qtok = bert_tokenizer(str(root / 'qformer_tokenizer'))
  over = dict(RUN, **{'data.qformer_tokenizer': str(root / 'qformer_tokenizer')})
  loop.run(load_config(os.path.join(CONFIGS, 'demo_qformer.py'), over), str(root / 'run'))
  convert.main(['--to-hf', str(root / 'run'), '--out', str(root / 'hf')])
  return root / 'run', root / 'hf', qtok


def processor_logits_match(proc, hf, model, params, pics):
  """The processor's inputs run through the transformers model and give our model's logits."""
  inputs = dict(proc(images=pics, text=PROMPTS, return_tensors='np', padding=True))
  assert (inputs['input_ids'][:, :model.cfg.image_tokens] == model.cfg.image_token_id).all()
  with torch.no_grad():
    ref = hf(**torch_inputs(inputs)).logits.numpy()
  assert_close(jax.jit(lambda p, kw: model.apply({'params': p}, **kw))(params, inputs), ref,
               inputs['attention_mask'])
  return inputs


def test_convert_writes_the_instructblip_processor_of_the_run(instructblip_run):
  from mllm_jax import generate as gen
  workdir, out, qtok = instructblip_run
  proc = transformers.AutoProcessor.from_pretrained(out)
  assert type(proc) is transformers.InstructBlipProcessor and proc.num_query_tokens == 4
  model, params, tok, run_images = gen.load_for_generation(checkpoint=str(workdir))
  assert proc.tokenizer.convert_tokens_to_ids('<image>') == model.cfg.image_token_id
  assert len(proc.tokenizer) == len(tok) and proc.qformer_tokenizer.get_vocab() == qtok.get_vocab()
  hf = transformers.InstructBlipForConditionalGeneration.from_pretrained(
      out, attn_implementation='eager').eval()
  pics = [Image.fromarray(np.random.RandomState(i).randint(0, 255, s + (3,), dtype=np.uint8))
          for i, s in enumerate(((40, 30), (16, 16), (20, 50)))]
  inputs = processor_logits_match(proc, hf, model, params, pics)
  # the run's own image preprocessing (shortest edge, centre crop, its normalisation) ...
  np.testing.assert_allclose(inputs['pixel_values'].transpose(0, 2, 3, 1),
                             run_images(pics)['pixel_values'], atol=1e-6)
  # ... and the instruction tokenised with the run's Q-Former tokenizer, as its SFT data was
  assert inputs['qformer_attention_mask'].min() == 0
  for row, text in enumerate(PROMPTS):
    ids = qtok(text)['input_ids']
    assert ids[0] == qtok.cls_token_id and 1 not in ids   # [CLS] ..., no [UNK]
    np.testing.assert_array_equal(inputs['qformer_input_ids'][row, :len(ids)], ids)


def test_blip2_processor_for_a_square_resize_run(instructblip_run, tmp_path):
  """A BLIP-2 (no instruction) model with image_norm='siglip' (resize to a square) gets a
  Blip2Processor whose inputs run through Blip2ForConditionalGeneration."""
  from mllm_jax import convert, generate as gen
  from mllm_jax.data import images as image_lib
  workdir, _, _ = instructblip_run
  config = mllm_jax.hf.pretrained.run_config(str(workdir))
  config.model.connector.qformer.instruction = False
  config.data.image_norm = 'siglip'
  cfg, tok_dir = mllm_jax.hf.pretrained.saved_model_config(str(workdir))
  cfg = dataclasses.replace(cfg, connector=dataclasses.replace(
      cfg.connector, qformer=dataclasses.replace(cfg.connector.qformer, instruction=False)))
  model = MLLM(cfg)
  # the run's parameters without those of the instruction input make a BLIP-2 Q-Former
  drop = lambda t: {k: drop(v) for k, v in t.items() if k not in (
      'word_embeddings', 'position_embeddings', 'text_ffn')} if isinstance(t, dict) else t
  params = gen.load_for_generation(checkpoint=str(workdir))[1]
  params = dict(params, connector=drop(params['connector']))
  mllm_jax.save_hf(model, params, str(tmp_path))
  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  mean, std = image_lib.NORMALIZATION['siglip']
  convert.blip_processor(config, cfg, tok, mean, std).save_pretrained(tmp_path)
  proc = transformers.AutoProcessor.from_pretrained(tmp_path)
  assert type(proc) is transformers.Blip2Processor and proc.num_query_tokens == 4
  ip = proc.image_processor
  assert ip.size == {'height': 16, 'width': 16} and not ip.do_center_crop
  pics = [Image.fromarray(np.random.RandomState(i).randint(0, 255, s + (3,), dtype=np.uint8))
          for i, s in enumerate(((40, 30), (16, 16), (20, 50)))]
  hf = transformers.Blip2ForConditionalGeneration.from_pretrained(
      tmp_path, attn_implementation='eager').eval()
  inputs = processor_logits_match(proc, hf, model, params, pics)
  np.testing.assert_allclose(   # our 'blip' image processor reads its config and matches it
      inputs['pixel_values'].transpose(0, 2, 3, 1),
      image_lib.ImageProcessor.from_hf(ip.to_dict())(pics)['pixel_values'], atol=1e-6)


def test_generate_cli_gives_instructblip_its_instruction(instructblip_run, tmp_path):
  """`python -m mllm_jax.generate` on the run and on its export: the Q-Former reads the prompt
  (or `--instruction`) tokenised with the model's own Q-Former tokenizer; the run's answer is
  the API's with those inputs, the export's is transformers' (processor + generate)."""
  from mllm_jax import generate as gen
  workdir, out, qtok = instructblip_run
  pic = Image.fromarray(np.random.RandomState(5).randint(0, 255, (30, 40, 3), dtype=np.uint8))
  pic.save(tmp_path / 'img.png')
  model, params, tok, run_images = gen.load_for_generation(checkpoint=str(workdir))
  stops, n = tok_lib.stop_token_ids(tok), 6

  def cli(*args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      gen.main(list(args) + ['--image', str(tmp_path / 'img.png'), '--prompt', PROMPTS[0],
                             '--max-new-tokens', str(n)])
    return buf.getvalue().strip()

  def api(instruction):
    q = np.asarray([qtok(instruction)['input_ids']], np.int32)
    new = gen.generate(model, params, gen.prompt_ids(model, tok, PROMPTS[0], 1), None,
                       run_images([pic])['pixel_values'], max_new_tokens=n, stop_tokens=stops,
                       pad_token_id=tok.pad_token_id, qformer_input_ids=q,
                       qformer_attention_mask=np.ones_like(q))
    return tok.decode(np.asarray(new)[0], skip_special_tokens=True).strip()

  answers = {t: api(t) for t in PROMPTS}
  other = [t for t in PROMPTS if answers[t] != answers[PROMPTS[0]]]
  assert other, answers   # the instruction changes the answer, so the checks below can fail
  assert cli('--checkpoint', str(workdir)) == answers[PROMPTS[0]]
  assert cli('--checkpoint', str(workdir), '--instruction', other[0]) == answers[other[0]]

  hf = transformers.InstructBlipForConditionalGeneration.from_pretrained(
      out, attn_implementation='eager').eval()
  proc = transformers.AutoProcessor.from_pretrained(out)
  text = tok.apply_chat_template([{'role': 'user', 'content': PROMPTS[0]}], tokenize=False,
                                 add_generation_prompt=True)
  for instruction in (PROMPTS[0], other[0]):
    inputs = dict(proc(images=[pic], text=[text], return_tensors='np'))
    q = proc.qformer_tokenizer([instruction], return_tensors='np')
    inputs.update(qformer_input_ids=q['input_ids'], qformer_attention_mask=q['attention_mask'])
    with torch.no_grad():
      ref = hf.generate(**torch_inputs(inputs), max_new_tokens=n, do_sample=False,
                        eos_token_id=stops, pad_token_id=tok.pad_token_id)
    ref = tok.decode(ref[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True).strip()
    args = ['--instruction', instruction] if instruction != PROMPTS[0] else []
    assert cli('--hf', str(out), *args) == ref
