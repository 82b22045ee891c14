"""DPO: loss check values, one concatenated forward, in-step vs precomputed reference,
1 vs 8 devices, the built-in preference pairs, and learning through the training job."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mllm_jax import sharding as shd
from mllm_jax.config import load_config
from mllm_jax.data import preference, tokenizer as tok_lib
from mllm_jax.models import MLLM, MLLMConfig
from mllm_jax.train import dpo, loop, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('loss_type, smoothing, value', [
    ('sigmoid', 0.0, 0.5981389), ('hinge', 0.0, 0.8), ('conservative', 0.1, 0.6181389),
    ('robust', 0.1, 0.5731389), ('ipo', 0.0, 9.0)])
def test_dpo_loss_check_values(loss_type, smoothing, value):
  """beta 0.1; policy logps -10 / -12; reference -11 / -11 (h = 2)."""
  losses, rc, rr = dpo.dpo_loss(jnp.array([-10.0]), jnp.array([-12.0]), jnp.array([-11.0]),
                                jnp.array([-11.0]), beta=0.1, loss_type=loss_type,
                                label_smoothing=smoothing)
  np.testing.assert_allclose(losses, [value], rtol=1e-6)
  np.testing.assert_allclose([rc[0], rr[0]], [0.1, -0.1], rtol=1e-6)


def test_ipo_normalises_log_ratios_by_length():
  losses, _, _ = dpo.dpo_loss(jnp.array([-10.0]), jnp.array([-12.0]), jnp.array([-11.0]),
                              jnp.array([-11.0]), beta=0.1, loss_type='ipo',
                              chosen_lengths=jnp.array([2.0]), rejected_lengths=jnp.array([4.0]))
  np.testing.assert_allclose(losses, [(0.5 + 0.25 - 5) ** 2], rtol=1e-6)


def tiny_preference_config(tmp_path_factory, vision_depth=2):
  """(config of a tiny LLaVA-like model on the demo tokenizer, the tokenizer)."""
  tok = tok_lib.get_or_build_demo_tokenizer(str(tmp_path_factory.mktemp('tok')))
  cfg = MLLMConfig.from_dict(dict(
      llm=dict(vocab_size=-(-len(tok) // 8) * 8, hidden=32, depth=2, heads=4, kv_heads=2,
               mlp_dim=64),
      vision=dict(kind='clip', image_size=16, patch_size=8, width=16, depth=vision_depth,
                  heads=2, mlp_dim=32, feature_layer=-1),
      image_token_id=tok.convert_tokens_to_ids('<image>')))
  return cfg, tok


def preference_task(tok, split):
  return preference.PreferenceTask(tok, split=split, image_size=16, num_image_tokens=4,
                                   max_len=48)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  cfg, tok = tiny_preference_config(tmp_path_factory)
  return MLLM(cfg), preference_task(tok, 'train')


def _state(model, mesh, tx, params=None):
  factory = steps.StateFactory(model, mesh, shd.logical_rules('fsdp_tp'))
  params = factory.init_params(jax.random.key(0)) if params is None else jax.device_put(
      params, factory.param_shardings)
  mask = factory.mask('.*', 'trainable')
  return factory, factory.create_state(params, tx, mask), mask


def _run(model, task, mesh, reference='model', batch=None, accum=1, params=None, ref=None):
  """One DPO step (sgd 1.0, beta 0.1, gamma 0.5, sigmoid) from `params` (default: init key 0)
  against `ref` (default: init key 1) -> (metrics, new params)."""
  tx = optax.sgd(1.0)
  factory, state, mask = _state(model, mesh, tx, params=params)
  ref = factory.init_params(jax.random.key(1)) if ref is None else jax.device_put(
      ref, factory.param_shardings)                   # a reference unlike the policy
  host = batch or task.batch(0, 8)
  if reference == 'precomputed':
    host = dict(jax.device_get(jax.jit(lambda p, b: dpo.precompute_reference_logps(
        model, p, b))(ref, host)))
  host = {k: np.asarray(v).reshape((accum, -1) + np.shape(v)[1:]) for k, v in host.items()}
  fn = dpo.make_dpo_train_step(model, tx, mask, beta=0.1, gamma=0.5, reference=reference)
  jstep = dpo.jit_dpo_step(fn, factory.state_shardings(tx, mask),
                           factory.param_shardings if reference == 'model' else None, mesh,
                           {k: v.ndim - 1 for k, v in host.items()})
  import flax.linen as nn
  with jax.set_mesh(mesh), nn.logical_axis_rules(factory.rules):
    new, metrics = jstep(state, shd.shard_batch(host, mesh, leading_accum=True),
                         ref if reference == 'model' else None)
  return jax.device_get(metrics), jax.device_get(new.params)


def mesh1():
  return shd.make_mesh({'fsdp': 1}, devices=jax.devices()[:1])


def test_concatenated_forward_equals_separate_forwards(setup):
  model, task = setup
  factory, _, _ = _state(model, mesh1(), optax.sgd(1.0))
  params = factory.init_params(jax.random.key(0))
  b = {k: jnp.asarray(v) for k, v in task.batch(0, 4).items()}
  both, counts = dpo.completion_logps(model, params, dpo.concat_sides(b))
  for i, side in enumerate(('chosen', 'rejected')):
    alone, n = dpo.completion_logps(model, params, dict(
        input_ids=b[f'{side}_input_ids'], attention_mask=b[f'{side}_attention_mask'],
        loss_mask=b[f'{side}_loss_mask'], pixel_values=b['pixel_values']))
    np.testing.assert_allclose(both[4 * i:4 * (i + 1)], alone, rtol=1e-5)
    np.testing.assert_array_equal(counts[4 * i:4 * (i + 1)], b[f'{side}_loss_mask'][:, 1:].sum(1))


@pytest.mark.slow
def test_precomputed_reference_equals_in_step_reference_and_accumulation(setup):
  model, task = setup
  m_model, p_model = _run(model, task, mesh1(), 'model')
  m_pre, p_pre = _run(model, task, mesh1(), 'precomputed')
  m_acc, p_acc = _run(model, task, mesh1(), 'model', accum=2)
  for m in (m_pre, m_acc):
    for k in ('loss', 'rewards/chosen', 'rewards/margins', 'logps/rejected'):
      np.testing.assert_allclose(m[k], m_model[k], rtol=1e-5, atol=1e-6)
  for p in (p_pre, p_acc):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p, p_model)
  assert m_model['rewards/chosen'] != 0 and 0 <= m_model['rewards/accuracies'] <= 1


def test_same_dpo_step_on_1_and_8_devices(setup):
  model, task = setup
  m1, p1 = _run(model, task, mesh1())
  m8, p8 = _run(model, task, shd.make_mesh({'fsdp': 4, 'tensor': 2}))
  for k in ('loss', 'rewards/margins', 'grad_norm'):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p8, p1)


def test_preference_pairs_are_right_vs_wrong_answers(setup):
  _, task = setup
  tok = task.tokenizer
  b = task.batch(0, 16)
  for row in range(16):
    sample, chosen, rejected = task.pair(row)
    assert chosen == sample.messages[1]['content'] and rejected != chosen
    assert rejected in task.answers[sample.messages[0]['content'].rsplit('\n', 1)[-1]]
    for side, answer in (('chosen', chosen), ('rejected', rejected)):
      ids = b[f'{side}_input_ids'][row][b[f'{side}_loss_mask'][row] > 0]
      assert tok.decode(ids, skip_special_tokens=True).strip() == answer
  np.testing.assert_array_equal(b['chosen_input_ids'][:, :10], b['rejected_input_ids'][:, :10])
  assert b['pixel_values'].shape == (16, 1, 16, 16, 3)


def test_dpo_steps_fit_a_batch_of_pairs(setup):
  """Repeated DPO steps on one batch drive the implicit reward margins up until every pair is
  ranked right (the objective is learnable end to end through the step)."""
  model, task = setup
  mesh = mesh1()
  tx = optax.adam(3e-3)
  factory, state, mask = _state(model, mesh, tx)
  ref = factory.init_params(jax.random.key(0))
  host = {k: v[None] for k, v in task.batch(0, 16).items()}
  fn = dpo.make_dpo_train_step(model, tx, mask, beta=0.5)
  jstep = dpo.jit_dpo_step(fn, factory.state_shardings(tx, mask), factory.param_shardings, mesh,
                           {k: v.ndim - 1 for k, v in host.items()})
  import flax.linen as nn
  with jax.set_mesh(mesh), nn.logical_axis_rules(factory.rules):
    batch = shd.shard_batch(host, mesh, leading_accum=True)
    history = []
    for _ in range(25):
      state, m = jstep(state, batch, ref)
      history.append(jax.device_get(m))
  assert history[0]['rewards/margins'] == pytest.approx(0.0, abs=1e-6)   # policy == reference
  assert history[-1]['rewards/accuracies'] == 1.0
  assert history[-1]['rewards/margins'] > 1.0 and history[-1]['loss'] < 0.3 * history[0]['loss']


@pytest.mark.slow
def test_dpo_stage_runs_saves_its_reference_and_resumes(tmp_path):
  """Task 'dpo' through the training job: metrics, held-out preference accuracy before and
  after, the reference saved in the workdir; rerunning the finished run resumes, not retrains."""
  import json
  over = {'train.stages': 'dpo', 'model.llm.depth': 2, 'model.vision.depth': 2,
          'train.eval_examples': 32, 'train.eval_batch_size': 32, 'train.progress_bar': False,
          'train.log_every': 2, 'dpo.steps': 4, 'dpo.batch_size': 16, 'mesh.fsdp': 1,
          'mesh.data': -1}
  loop.run(load_config(os.path.join(ROOT, 'configs', 'demo_dpo.py'), over), str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    lines = [json.loads(l) for l in f]
  train = [m for m in lines if 'loss' in m]
  assert [m['step'] for m in train] == [2, 4]
  for key in ('rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies',
              'logps/chosen', 'logps/rejected'):
    assert np.isfinite(train[-1][key])
  evals = [m for m in lines if 'eval/preference_accuracy' in m]
  assert [m['step'] for m in evals] == [0, 4] and 'eval/accuracy' in evals[-1]
  assert (tmp_path / 'reference_dpo' / 'params').is_dir()
  res = loop.run(load_config(os.path.join(ROOT, 'configs', 'demo_dpo.py'), over), str(tmp_path))
  assert res['eval/preference_accuracy'] == evals[-1]['eval/preference_accuracy']


def tiny_instructblip_config(tok):
  """A tiny InstructBLIP-style model (BLIP-2 tower, instruction-aware Q-Former reading the demo
  tokenizer's ids, 4 queries per image) on the demo tokenizer."""
  vocab = -(-len(tok) // 8) * 8
  return MLLMConfig.from_dict(dict(
      llm=dict(vocab_size=vocab, hidden=32, depth=2, heads=4, kv_heads=2, mlp_dim=64),
      vision=dict(kind='blip2', image_size=16, patch_size=8, width=16, depth=1, heads=2,
                  mlp_dim=32, feature_layer=-1, feature_select='full'),
      connector=dict(kind='qformer', qformer=dict(
          num_queries=4, hidden=16, depth=1, heads=2, mlp_dim=32, cross_attention_every=1,
          instruction=True, vocab_size=vocab, max_position=16)),
      image_token_id=tok.convert_tokens_to_ids('<image>')))


def instructblip_preference_task(tok, split='train'):
  return preference.PreferenceTask(tok, split=split, image_size=16, num_image_tokens=4,
                                   max_len=48, qformer_tokenizer=tok, qformer_max_len=16)


# 21 s; the InstructBLIP reward step (test_reward) checks the instruction path by default
@pytest.mark.slow
def test_instructblip_dpo_step_reads_the_instruction(setup):
  """Preference pairs carry the Q-Former instruction (the question, as SFT builds it) shared by
  chosen and rejected, and the DPO step's loss is the formula on per-sequence log-probs of the
  model called with it."""
  tok = setup[1].tokenizer
  model = MLLM(tiny_instructblip_config(tok))
  task = instructblip_preference_task(tok)
  b = task.batch(0, 4)
  for row, index in enumerate(task.usable(0, 4)[0]):
    sample, _, _ = task.pair(index, with_image=False)
    n = b['qformer_attention_mask'][row].sum()
    assert tok.decode(b['qformer_input_ids'][row, :n]) == sample.messages[0]['content'].split(
        '\n')[-1]
    assert (b['qformer_input_ids'][row, n:] == tok.pad_token_id).all()
  factory = steps.StateFactory(model, mesh1(), shd.logical_rules('fsdp_tp'))
  policy = jax.device_get(factory.init_params(jax.random.key(0)))
  ref = jax.tree.map(lambda x: 0.9 * x, policy)       # a reference unlike the policy
  metrics, _ = _run(model, task, mesh1(), batch=b, params=policy, ref=ref)
  fwd = jax.jit(lambda p, kw: model.apply({'params': p}, **kw))

  def logps(params, side, instruction):
    logits = np.asarray(fwd(params, dict(
        input_ids=b[f'{side}_input_ids'], attention_mask=b[f'{side}_attention_mask'],
        pixel_values=b['pixel_values'], **instruction)), np.float64)[:, :-1]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    logp = np.take_along_axis(logp, b[f'{side}_input_ids'][:, 1:, None], -1)[..., 0]
    return (logp * b[f'{side}_loss_mask'][:, 1:]).sum(-1)

  def loss(instruction):
    (pc, pr), (rc, rr) = ([logps(p, s, instruction) for s in dpo.SIDES] for p in (policy, ref))
    h = (pc - rc) - (pr - rr)
    sft = -pc.sum() / b['chosen_loss_mask'][:, 1:].sum()
    return np.mean(np.log1p(np.exp(-0.1 * h))) + 0.5 * sft   # -log s(beta h), gamma CE

  given = {k: b[k] for k in ('qformer_input_ids', 'qformer_attention_mask')}
  np.testing.assert_allclose(metrics['loss'], loss(given), rtol=1e-5)
  # the instruction reaches the log-probs: other pairs' instructions, other values
  rolled = {k: np.roll(v, 1, 0) for k, v in given.items()}
  change = np.abs(logps(policy, 'chosen', rolled) - logps(policy, 'chosen', given)).max()
  assert change > 1e-3, change
