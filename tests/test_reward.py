"""Reward model: Bradley-Terry check values, the last non-pad token under left and right
padding, learning on the built-in preference pairs, 1 vs 8 devices, Hugging Face export
parity, and checkpoint-layout errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from mllm_jax import sharding as shd
from mllm_jax.data import preference
from mllm_jax.hf import CheckpointError, pretrained
from mllm_jax.models import MLLM, MLLMConfig
from mllm_jax.train import reward, steps

from test_dpo import preference_task, tiny_preference_config
from test_train import mesh1


def test_bt_loss_check_values():
  """-log s(1) = log(1 + e^-1) = 0.3132617 (TRL's check value, components.md 5.2); a margin
  of 0.5 leaves -log s(0.5) = 0.4740770; centring adds 0.01 * mean((1 + 0)^2)."""
  c, r = jnp.array([1.0, 3.0]), jnp.array([0.0, 2.0])
  np.testing.assert_allclose(reward.bt_losses(c, r), [0.3132617, 0.3132617], rtol=1e-6)
  np.testing.assert_allclose(reward.bt_loss(c, r), 0.3132617, rtol=1e-6)
  np.testing.assert_allclose(reward.bt_loss(c, r, margin=jnp.array([0.5, 0.5])), 0.4740770,
                             rtol=1e-6)
  np.testing.assert_allclose(reward.bt_loss(c[:1], r[:1], center_rewards_coefficient=0.01),
                             0.3132617 + 0.01, rtol=1e-6)
  np.testing.assert_allclose(reward.bt_loss(r, c), np.log1p(np.e), rtol=1e-6)   # -log s(-1)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  cfg, tok = tiny_preference_config(tmp_path_factory, vision_depth=1)
  return reward.RewardModel(cfg), preference_task(tok, 'train'), preference_task(tok, 'eval')


def _factory(model, mesh):
  return steps.StateFactory(model, mesh, shd.logical_rules('fsdp_tp'))


def test_params_are_the_policy_layout_plus_a_score_head(setup):
  model, _, _ = setup
  f = _factory(model, mesh1())
  policy = steps.StateFactory(MLLM(model.cfg), mesh1(), shd.logical_rules('fsdp'))
  assert set(f.abstract_params) == set(policy.abstract_params) | {'score'}
  assert f.abstract_params['score']['kernel'].shape == (32, 1)
  assert 'lm_head' in f.abstract_params['llm']


def test_reward_is_read_at_the_last_non_pad_token_with_left_or_right_padding(setup):
  model, task, _ = setup
  params = _factory(model, mesh1()).init_params(jax.random.key(0))
  b = task.batch(0, 3)
  ids, mask, px = b['chosen_input_ids'], b['chosen_attention_mask'], b['pixel_values']
  for row, cut in ((1, 3), (2, 6)):                      # rows of different lengths
    n = mask[row].sum()
    mask[row, n - cut:], ids[row, n - cut:] = 0, task.tokenizer.pad_token_id
  fn = jax.jit(lambda p, **kw: model.apply({'params': p}, **kw))
  right = fn(params, input_ids=ids, attention_mask=mask, pixel_values=px)
  lens = mask.sum(1)
  for row in (1, 2):     # a row alone, unpadded (rows 1 and 2 are padded in the batch)
    n = lens[row]
    alone = fn(params, input_ids=ids[row:row + 1, :n], attention_mask=mask[row:row + 1, :n],
               pixel_values=px[row:row + 1])
    np.testing.assert_allclose(right[row], alone[0], rtol=1e-5, atol=1e-6)
  # left padding (positions counted over real tokens) and other pad ids: the same rewards
  left_ids, left_mask = np.zeros_like(ids) + 7, np.zeros_like(mask)
  for row, n in enumerate(lens):
    left_ids[row, -n:], left_mask[row, -n:] = ids[row, :n], 1
  pos = np.maximum(np.cumsum(left_mask, 1) - 1, 0)
  left = fn(params, input_ids=left_ids, attention_mask=left_mask, pixel_values=px, positions=pos)
  np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-6)


def _step(model, mesh, host, steps_=1, lr=1.0, tx=None, factory=None, params=None):
  tx = tx or optax.sgd(lr)
  f = factory or _factory(model, mesh)
  params = f.init_params(jax.random.key(0)) if params is None else jax.device_put(
      params, f.param_shardings)
  state = f.create_state(params, tx, f.mask('.*', 'trainable'))
  fn = reward.make_reward_train_step(model, tx, f.mask('.*', 'trainable'),
                                     center_rewards_coefficient=0.01)
  jstep = steps.jit_train_step(fn, f.state_shardings(tx, f.mask('.*', 'trainable')), mesh,
                               {k: v.ndim - 1 for k, v in host.items()})
  with jax.set_mesh(mesh), nn.logical_axis_rules(f.rules):
    for _ in range(steps_):
      state, m = jstep(state, shd.shard_batch(host, mesh, leading_accum=True))
  return jax.device_get(m), jax.device_get(state.params)


@pytest.mark.slow
def test_same_reward_step_on_1_and_8_devices_and_with_accumulation(setup):
  model, task, _ = setup
  b = task.batch(0, 8)
  b['margin'] = np.linspace(0, 1, 8).astype(np.float32)
  one = {k: v[None] for k, v in b.items()}
  two = {k: v.reshape((2, 4) + v.shape[1:]) for k, v in b.items()}
  m1, p1 = _step(model, mesh1(), one)
  m8, p8 = _step(model, shd.make_mesh({'fsdp': 4, 'tensor': 2}), one)
  ma, pa = _step(model, mesh1(), two)
  for m, p in ((m8, p8), (ma, pa)):
    for k in ('loss', 'rewards/chosen', 'rewards/rejected', 'accuracy', 'grad_norm'):
      np.testing.assert_allclose(m[k], m1[k], rtol=1e-4, atol=1e-6)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5), p, p1)
  # the loss is the formula on the step's own rewards
  f = _factory(model, mesh1())
  rc, rr = jax.jit(lambda p: reward.pair_rewards(model, p, b))(f.init_params(jax.random.key(0)))
  want = reward.bt_loss(rc, rr, b['margin'], center_rewards_coefficient=0.01)
  np.testing.assert_allclose(m1['loss'], want, rtol=1e-5)
  np.testing.assert_allclose(m1['rewards/chosen'], rc.mean(), rtol=1e-5)


def test_non_finite_reward_step_leaves_the_state_unchanged(setup):
  """A NaN margin makes the loss NaN: the step keeps params (steps.guarded_update) and says so."""
  model, task, _ = setup
  b = task.batch(0, 4)
  b['margin'] = np.array([0, np.nan, 0, 0], np.float32)
  m, p = _step(model, mesh1(), {k: v[None] for k, v in b.items()})
  assert m['nonfinite'] == 1.0 and not np.isfinite(m['loss'])
  init = jax.device_get(_factory(model, mesh1()).init_params(jax.random.key(0)))
  jax.tree.map(np.testing.assert_array_equal, p, init)


class ShoutedRejected(preference.PreferenceTask):
  """A separable toy preference on the built-in pairs: the rejected answer is written in
  capitals (other tokens), so the preference is learnable from text alone in a few steps."""

  def pair(self, index, **kw):
    s, chosen, rejected = super().pair(index, **kw)
    return s, chosen, rejected.upper()


def test_training_raises_held_out_pairwise_accuracy(setup):
  model, task, _ = setup
  tok = task.tokenizer
  kw = dict(image_size=16, num_image_tokens=4, max_len=48)
  train, held_out = ShoutedRejected(tok, split='train', **kw), ShoutedRejected(tok, split='eval',
                                                                               **kw)
  mesh = mesh1()
  f = _factory(model, mesh)
  tx = optax.adam(3e-3)
  mask = f.mask(reward.DEFAULT_TRAINABLE, 'trainable')
  state = f.create_state(f.init_params(jax.random.key(0)), tx, mask)
  before = reward.evaluate_rewards(f, state.params, held_out, 128, 64)
  fn = reward.make_reward_train_step(model, tx, mask)
  jstep = None
  with jax.set_mesh(mesh), nn.logical_axis_rules(f.rules):
    for s in range(20):
      host = {k: v[None] for k, v in train.batch(s * 16, 16).items()}
      if jstep is None:
        jstep = steps.jit_train_step(fn, f.state_shardings(tx, mask), mesh,
                                     {k: v.ndim - 1 for k, v in host.items()})
      state, m = jstep(state, shd.shard_batch(host, mesh, leading_accum=True))
  after = reward.evaluate_rewards(f, state.params, held_out, 128, 64)
  print('held-out pairwise accuracy', before['eval/accuracy'], '->', after['eval/accuracy'])
  assert before['eval/accuracy'] < 0.8 and after['eval/accuracy'] >= 0.95
  assert after['eval/rewards/chosen'] > after['eval/rewards/rejected']
  assert after['eval/bt_loss'] < 0.5 * before['eval/bt_loss']


@pytest.mark.parametrize('kind', ['llama', 'qwen2'])
def test_sequence_classification_export_matches_transformers(kind, tmp_path):
  cfg = MLLMConfig.from_dict(dict(
      llm=dict(vocab_size=96, hidden=32, depth=2, heads=4, kv_heads=2, mlp_dim=48,
               qkv_bias=kind == 'qwen2', tie_embeddings=kind == 'qwen2'), vision=None))
  model = reward.RewardModel(cfg)
  params = _factory(model, mesh1()).init_params(jax.random.key(3))
  ids = np.random.RandomState(0).randint(1, 96, (3, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 9:], mask[2, 5:] = 0, 0
  ids[mask == 0] = 0                                    # pad id 0, right padding
  ours = jax.jit(lambda p: model.apply({'params': p}, ids, attention_mask=mask))(params)
  reward.save_reward_hf(model, params, str(tmp_path / 'hf'), pad_token_id=0)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / 'hf', attn_implementation='eager').eval()
  assert type(hf).__name__ == reward.SEQ_CLS[kind]
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0]
  np.testing.assert_allclose(theirs.numpy(), ours, rtol=1e-4, atol=1e-5)
  back_model, back = reward.load_reward_hf(str(tmp_path / 'hf'))
  again = jax.jit(lambda p: back_model.apply({'params': p}, ids, attention_mask=mask))(back)
  np.testing.assert_allclose(again, ours, rtol=1e-5, atol=1e-6)


def test_llava_reward_export_keeps_the_head_beside_the_checkpoint(setup, tmp_path):
  model, task, _ = setup
  params = _factory(model, mesh1()).init_params(jax.random.key(4))
  b = task.batch(0, 2)
  fn = lambda m, p: jax.jit(lambda q: m.apply({'params': q}, b['chosen_input_ids'],
                                              b['pixel_values'], b['chosen_attention_mask']))(p)
  reward.save_reward_hf(model, params, str(tmp_path / 'llava'))
  assert (tmp_path / 'llava' / reward.SCORE_FILE).exists()
  transformers.AutoConfig.from_pretrained(tmp_path / 'llava')   # still a valid LLaVA config
  back_model, back = reward.load_reward_hf(str(tmp_path / 'llava'))
  np.testing.assert_allclose(fn(back_model, back), fn(model, params), rtol=1e-5, atol=1e-6)


def test_checkpoint_with_another_layout_is_a_clear_error(setup, tmp_path):
  """A reward model saved as a params checkpoint restores as a reward model; restoring it as a
  policy (or a policy of another size) names the path and the first mismatching key."""
  model, _, _ = setup
  f = _factory(model, mesh1())
  params = f.init_params(jax.random.key(0))
  pretrained.save_params(str(tmp_path / 'rm'), model, params)
  _, back = reward.load_reward(str(tmp_path / 'rm'))
  np.testing.assert_array_equal(back['score']['kernel'], params['score']['kernel'])
  policy = steps.StateFactory(MLLM(model.cfg), mesh1(), shd.logical_rules('fsdp'))
  with pytest.raises(CheckpointError, match=r'rm: .* 1 key\(s\); first: score/kernel: in the '
                                            'checkpoint, not in the model'):
    pretrained.restore_params(str(tmp_path / 'rm'), policy.abstract_params)
  import dataclasses
  wider = MLLM(dataclasses.replace(model.cfg, llm=dataclasses.replace(model.cfg.llm, mlp_dim=96)))
  other = steps.StateFactory(wider, mesh1(), shd.logical_rules('fsdp'))
  with pytest.raises(CheckpointError, match=r'first: llm/layers/mlp/down_proj/kernel: checkpoint '
                                            r'shape \[2, 64, 32\], model shape \[2, 96, 32\]'):
    pretrained.restore_params(str(tmp_path / 'rm'), other.abstract_params)
  # a reward model starts from a policy checkpoint: everything but the fresh head restored
  pretrained.save_params(str(tmp_path / 'policy'), policy.model,
                         {k: v for k, v in params.items() if k != 'score'})
  rm = reward.from_policy(f, str(tmp_path / 'policy'), jax.random.key(1))
  np.testing.assert_array_equal(rm['llm']['norm']['scale'], params['llm']['norm']['scale'])
  assert rm['score']['kernel'].shape == (32, 1)


# 26 s; the other entry-point test (preference files, epochs, resume) stays in the default run
@pytest.mark.slow
def test_reward_entry_point_trains_from_a_policy_saves_and_reruns(setup, tmp_path):
  """`python -m mllm_jax.train.reward`'s function: from a saved policy, a few steps, metrics,
  the model in WORKDIR/reward/model; a rerun reports the saved model instead of retraining."""
  import json
  import os
  from mllm_jax.config import load_config
  model, task, _ = setup
  policy = steps.StateFactory(MLLM(model.cfg), mesh1(), shd.logical_rules('fsdp'))
  pretrained.save_params(str(tmp_path / 'policy'), policy.model,
                         policy.init_params(jax.random.key(0)))
  task.tokenizer.save_pretrained(str(tmp_path / 'tok'))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  over = {'model.init_from': str(tmp_path / 'policy'), 'data.tokenizer': str(tmp_path / 'tok'),
          'data.max_len': 48, 'reward.steps': 3, 'reward.batch_size': 8, 'train.log_every': 1,
          'train.eval_examples': 16, 'train.eval_batch_size': 16}
  config = load_config(os.path.join(root, 'configs', 'demo_reward.py'), over)
  res = reward.train_reward(config, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'reward' / 'metrics.jsonl') as f:
    lines = [json.loads(l) for l in f]
  assert [l['step'] for l in lines if 'loss' in l] == [1, 2, 3]
  assert [l['step'] for l in lines if 'eval/accuracy' in l] == [0, 3]
  for k in ('rewards/chosen', 'rewards/rejected', 'accuracy', 'lr'):
    assert np.isfinite(lines[-2][k])
  assert 0 <= res['eval/accuracy'] <= 1
  again = reward.train_reward(config, str(tmp_path / 'run'))
  assert again == res
  # a run cut after 2 steps (the per-run budget: the save-and-stop path SIGTERM takes too)
  # resumes on rerun and logs the uninterrupted run's numbers
  config.train.max_steps_per_run = 2
  assert reward.train_reward(config, str(tmp_path / 'cut')) is None
  assert sorted(os.listdir(tmp_path / 'cut' / 'reward' / 'checkpoints')) == ['2']
  config.train.max_steps_per_run = 0
  assert reward.train_reward(config, str(tmp_path / 'cut')) == res
  with open(tmp_path / 'cut' / 'reward' / 'metrics.jsonl') as f:
    cut = [json.loads(l) for l in f]
  assert [(l['step'], l['loss']) for l in cut if 'loss' in l] == [
      (l['step'], l['loss']) for l in lines if 'loss' in l]


def test_reward_entry_point_reads_preference_files_over_epochs_and_resumes(setup, tmp_path):
  """The reward job on TRL preference records (LLaVA JSON source): 5 steps of 8 pairs run
  through more than one shuffled epoch of the 24 training records (finite losses), and a
  run cut after 2 steps resumes from its checkpoint's data state to the same losses."""
  import json
  import os
  from data_files import write_image, write_json
  from mllm_jax.config import load_config
  model, task, _ = setup
  policy = steps.StateFactory(MLLM(model.cfg), mesh1(), shd.logical_rules('fsdp'))
  pretrained.save_params(str(tmp_path / 'policy'), policy.model,
                         policy.init_params(jax.random.key(0)))
  task.tokenizer.save_pretrained(str(tmp_path / 'tok'))
  colours = ('red', 'green', 'blue')
  for i, c in enumerate(colours):
    write_image(str(tmp_path / 'img' / f'{c}.png'), i)
  recs = [{'id': f'p{i}', 'prompt': 'what colour is it?', 'chosen': colours[i % 3],
           'rejected': colours[(i + 1) % 3], 'images': [f'{colours[i % 3]}.png']}
          for i in range(30)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  over = {'model.init_from': str(tmp_path / 'policy'), 'data.tokenizer': str(tmp_path / 'tok'),
          'data.source': 'llava_json', 'data.image_root': str(tmp_path / 'img'),
          'data.preference_files': write_json(str(tmp_path / 'p.jsonl'), recs, jsonl=True),
          'data.train_files': str(tmp_path / 'p.jsonl'), 'data.eval_fraction': 0.2,
          'data.max_len': 48, 'data.max_images': 1, 'reward.steps': 5, 'reward.batch_size': 8,
          'train.log_every': 1, 'train.checkpoint_every': 0, 'train.eval_examples': 6,
          'train.eval_batch_size': 8}
  config = load_config(os.path.join(root, 'configs', 'demo_reward.py'), over)
  res = reward.train_reward(config, str(tmp_path / 'run'))
  assert 0 <= res['eval/accuracy'] <= 1
  log = lambda w: [json.loads(l) for l in open(tmp_path / w / 'reward' / 'metrics.jsonl')]
  full = [(l['step'], l['loss']) for l in log('run') if 'loss' in l]
  assert [s for s, _ in full] == [1, 2, 3, 4, 5] and np.isfinite([x for _, x in full]).all()
  config.train.max_steps_per_run = 2
  assert reward.train_reward(config, str(tmp_path / 'cut')) is None
  saved = tmp_path / 'cut' / 'reward' / 'checkpoints' / '2' / 'data'
  state = json.loads(next(saved.glob('process_*.json')).read_text())
  assert 'grain' in state                 # the file stream's own state, not a sample index
  config.train.max_steps_per_run = 0
  assert reward.train_reward(config, str(tmp_path / 'cut')) == res
  assert [(l['step'], l['loss']) for l in log('cut') if 'loss' in l] == full


def test_instructblip_reward_step_reads_the_instruction(setup):
  """A reward model with an instruction-aware Q-Former: the step's loss is the Bradley-Terry
  formula on rewards of the model called with each pair's instruction (both sides share it)."""
  from test_dpo import instructblip_preference_task, tiny_instructblip_config
  tok = setup[1].tokenizer
  model = reward.RewardModel(tiny_instructblip_config(tok))
  b = instructblip_preference_task(tok).batch(0, 4)
  f = _factory(model, mesh1())
  params = jax.device_get(f.init_params(jax.random.key(0)))
  m, _ = _step(model, mesh1(), {k: v[None] for k, v in b.items()}, factory=f, params=params)
  fn = jax.jit(lambda p, kw: model.apply({'params': p}, **kw))
  q = {k: b[k] for k in ('qformer_input_ids', 'qformer_attention_mask')}
  rc, rr = (np.asarray(fn(params, dict(
      input_ids=b[f'{side}_input_ids'], attention_mask=b[f'{side}_attention_mask'],
      pixel_values=b['pixel_values'], **q))) for side in ('chosen', 'rejected'))
  np.testing.assert_allclose(m['loss'], reward.bt_loss(rc, rr, center_rewards_coefficient=0.01),
                             rtol=1e-5)
  np.testing.assert_allclose(m['rewards/chosen'], rc.mean(), rtol=1e-5)


@pytest.mark.slow   # an InstructBLIP end-to-end run (27 s): CI time; the step is tested above
def test_instructblip_reward_entry_point_keeps_the_policys_instructions_and_pixels(setup,
                                                                                   tmp_path):
  """The reward trainer on an InstructBLIP policy (with a BERT Q-Former tokenizer of its own and
  SigLIP-normalised pixels) under the LLaVA-shaped demo config: the policy's connector, Q-Former
  tokenizer and image norm win; the saved reward model carries the tokenizer and the norm, and
  the iterative scorer, given neither, scores as the model called with them does."""
  import os
  from data_files import build_bert_tokenizer
  from mllm_jax.config import load_config
  from mllm_jax.data import conversation, images
  from mllm_jax.data import tokenizer as tok_lib
  from mllm_jax.train import iterative_dpo as it
  from test_dpo import tiny_instructblip_config
  tok = setup[1].tokenizer
  qdir = build_bert_tokenizer(str(tmp_path / 'qtok'), tok_lib.demo_corpus(200))
  qtok = transformers.AutoTokenizer.from_pretrained(qdir)
  cfg = tiny_instructblip_config(tok)
  policy = steps.StateFactory(MLLM(cfg), mesh1(), shd.logical_rules('fsdp'))
  pretrained.save_params(str(tmp_path / 'policy'), policy.model,
                         policy.init_params(jax.random.key(0)), 'siglip')
  tok.save_pretrained(str(tmp_path / 'tok'))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  over = {'model.init_from': str(tmp_path / 'policy'), 'data.tokenizer': str(tmp_path / 'tok'),
          'data.qformer_tokenizer': qdir, 'data.qformer_max_len': 16, 'data.max_len': 48,
          'reward.steps': 2, 'reward.batch_size': 8, 'train.log_every': 1,
          'train.eval_examples': 8, 'train.eval_batch_size': 8}
  config = load_config(os.path.join(root, 'configs', 'demo_reward.py'), over)
  assert config.model.connector.kind == 'mlp' and config.data.image_norm == 'clip'
  res = reward.train_reward(config, str(tmp_path / 'run'))
  assert 0 <= res['eval/accuracy'] <= 1 and np.isfinite(res['eval/rewards/chosen'])
  final = str(tmp_path / 'run' / 'reward' / 'model')
  assert pretrained.saved_image_norm(final) == 'siglip'
  assert transformers.AutoTokenizer.from_pretrained(
      os.path.join(final, reward.QFORMER_TOKENIZER)).get_vocab() == qtok.get_vocab()

  f, params = reward.load_reward(final, mesh1(), 'dp')
  score = it.reward_model_scorer(final, tok, f.mesh, f.rules, 48, 'clip', 4,
                                 qformer_max_len=16)
  s = [it.prompt_sample(i, 'train', 0, 16) for i in range(2)]
  got = score([(x.messages[0]['content'], r, x) for x, r in zip(s, ['red', 'two'])])
  for x, r, g in zip(s, ['red', 'two'], got):   # one conversation at a time, unpadded
    ids = conversation.tokenize_conversation(
        tok, [{'role': 'user', 'content': x.messages[0]['content']},
              {'role': 'assistant', 'content': r}], num_image_tokens=4)[0]
    q = qtok(x.messages[0]['content'].replace('<image>', '').strip())['input_ids']
    px = images.normalize(np.stack(x.images[:1])[None], images.SIGLIP_MEAN, images.SIGLIP_STD)
    want = f.model.apply({'params': params}, ids[None], px,
                         qformer_input_ids=np.asarray([q], np.int32),
                         qformer_attention_mask=np.ones((1, len(q)), np.int32))
    np.testing.assert_allclose(g, want[0], rtol=1e-5, atol=1e-6)
