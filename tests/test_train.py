"""Train steps: loss formula, freezing, gradient accumulation, 1- vs 8-device equality, mesh
and batch errors, and checkpoint round trips."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mllm_jax import sharding as shd
from mllm_jax.checkpoint import Checkpointer, RunPosition
from mllm_jax.models import MLLM, MLLMConfig
from mllm_jax.train import losses, optim, steps

IMG = 3
CFG = MLLMConfig.from_dict(dict(
    llm=dict(vocab_size=96, hidden=32, depth=2, heads=4, kv_heads=2, mlp_dim=64),
    vision=dict(kind='clip', image_size=16, patch_size=8, width=16, depth=2, heads=2,
                mlp_dim=32, feature_layer=-1),
    image_token_id=IMG))
OPT = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, warmup_ratio=0.0, final_lr_ratio=1.0,
                                     grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01))


def make_batch(n=8, t=12, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(4, 96, (n, t)).astype(np.int32)
  ids[:, 0] = 1
  ids[:, 1:5] = IMG
  ids[1, 1:5] = rng.randint(4, 96, 4)   # a text-only sample
  attn = np.ones((n, t), np.int32)
  attn[2, 9:] = 0                        # a padded sample
  loss = np.zeros((n, t), np.float32)
  for b in range(n):                     # uneven numbers of loss tokens per sample
    loss[b, 5 + b % 4:] = 1
  loss *= attn
  return dict(input_ids=ids, attention_mask=attn, loss_mask=loss,
              pixel_values=rng.randn(n, 1, 16, 16, 3).astype(np.float32))


def setup(mesh, pattern='.*', rules='fsdp_tp', params=None, tx=None, logits_chunk=0,
          logits_width=0):
  model = MLLM(CFG)
  factory = steps.StateFactory(model, mesh, shd.logical_rules(rules))
  if params is None:
    params = factory.init_params(jax.random.key(0))
  else:
    params = jax.device_put(params, factory.param_shardings)
  tx = tx or optim.make_optimizer(OPT, 10)
  mask = factory.mask(pattern, 'trainable')
  state = factory.create_state(params, tx, mask)
  fn = steps.make_train_step(model, tx, mask, logits_chunk=logits_chunk,
                             logits_width=logits_width)
  return factory, state, fn, tx, mask


def run_step(factory, state, fn, tx, mask, batch, accum=1):
  host = {k: v.reshape((accum, v.shape[0] // accum) + v.shape[1:]) for k, v in batch.items()}
  jstep = steps.jit_train_step(fn, factory.state_shardings(tx, mask), factory.mesh,
                               {k: v.ndim - 1 for k, v in host.items()})
  with jax.set_mesh(factory.mesh), __import__('flax').linen.logical_axis_rules(factory.rules):
    return jstep(state, shd.shard_batch(host, factory.mesh, leading_accum=True))


def mesh1():
  return shd.make_mesh({'fsdp': 1}, devices=jax.devices()[:1])


def test_next_token_loss_formula():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
  ids = jnp.array([[0, 1, 2]])
  out = losses.next_token_loss(logits, ids, jnp.array([[0, 1, 0]]))   # only token 1 trained
  np.testing.assert_allclose(out['loss_sum'], -np.log(0.25), rtol=1e-6)
  assert float(out['tokens']) == 1 and float(out['correct']) == 0
  out = losses.next_token_loss(logits, ids, jnp.array([[1, 1, 1]]))   # position 0 is never a target
  np.testing.assert_allclose(out['loss_sum'], -np.log(0.25) - np.log(0.1), rtol=1e-6)
  assert float(out['tokens']) == 2


def test_answer_accuracy_needs_every_token_right():
  # predictions (argmax of logits at t) vs targets ids[t+1]
  ids = jnp.array([[0, 1, 2, 3, 1]])
  pred = jnp.array([[1, 2, 0, 1, 0]])          # right, right, wrong, right
  logits = jax.nn.one_hot(pred, 4) * 10
  turns = jnp.array([[0, 1, 1, 2, 3]])          # answer 1: tokens 1,2 (right); 2: token 3 (wrong); 3: token 4 (right)
  out = losses.answer_accuracy(logits, ids, turns)
  assert float(out['answers']) == 3 and float(out['answers_right']) == 2


def test_frozen_params_unchanged_and_have_no_optimizer_state():
  factory, state, fn, tx, mask = setup(mesh1(), pattern='connector/.*')
  before = jax.device_get(state.params)
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)   # skip step counts
  n_conn = sum(x.size for x in jax.tree.leaves(before['connector']))
  assert n_opt == 2 * n_conn   # Adam mu + nu for the connector only
  state, metrics = run_step(factory, state, fn, tx, mask, make_batch())
  after = jax.device_get(state.params)
  for group in ('vision', 'llm'):
    jax.tree.map(np.testing.assert_array_equal, before[group], after[group])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before['connector'],
                                         after['connector']))
  assert all(changed)
  assert np.isfinite(float(metrics['loss']))


def test_logged_lr_is_the_optimizers_after_a_skipped_step():
  """A non-finite step applies no update, so the optimizer's schedule stays where it was: the
  next step's update (and its logged lr) uses the same rate, not the loop step's."""
  cfg = OPT.copy_and_resolve_references()
  cfg.warmup_steps = 4                       # lr 0, 2.5e-3, 5e-3, ... over the first steps
  schedule = optim.learning_rate_schedule(cfg, 10)
  tx = optim.make_optimizer(cfg, 10)
  factory, state, _, _, mask = setup(mesh1(), tx=tx)
  fn = steps.make_train_step(factory.model, tx, mask, schedule)
  good = make_batch()
  bad = dict(good, loss_mask=good['loss_mask'] * np.float32(np.nan))
  lrs, skipped = [], []
  for batch in (good, bad, good, good):
    state, m = run_step(factory, state, fn, tx, mask, batch)
    lrs.append(float(m['lr']))
    skipped.append(float(m['nonfinite']))
  assert skipped == [0, 1, 0, 0]
  np.testing.assert_allclose(lrs, [schedule(0), schedule(1), schedule(1), schedule(2)])
  assert int(state.step) == 4 and int(steps.optimizer_step(state)) == 3


def test_trainable_regex_errors_name_the_key():
  factory, *_ = setup(mesh1())
  with pytest.raises(ValueError, match='config.sft.trainable'):
    factory.mask('conector/.*', 'config.sft.trainable')
  with pytest.raises(ValueError, match='not a valid regex'):
    factory.mask('(', 'config.sft.trainable')


def grads_of_step(factory, state, fn, tx, mask, batch, accum=1):
  """With SGD(lr=1) the parameter change of one step is minus the gradient."""
  before = jax.device_get(state.params)
  state, metrics = run_step(factory, state, fn, tx, mask, batch, accum=accum)
  grads = jax.tree.map(lambda a, b: a - b, before, jax.device_get(state.params))
  return jax.device_get(metrics), grads


def assert_grads_close(g1, g2):
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale), g1, g2)


@pytest.fixture(scope='module')
def reference():
  """(metrics, gradients) of one SGD(lr 1) step from the key-0 init on make_batch(), one
  device, full logits, no remat: the step every variant below must reproduce."""
  return grads_of_step(*setup(mesh1(), tx=optax.sgd(1.0)), make_batch())


def test_grad_accumulation_equals_one_big_batch(reference):
  batch = make_batch()
  (m1, g1), (m4, g4) = reference, grads_of_step(*setup(mesh1(), tx=optax.sgd(1.0)), batch,
                                                accum=4)
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-6)
  assert m1['loss_tokens'] == m4['loss_tokens'] == batch['loss_mask'][:, 1:].sum()
  np.testing.assert_allclose(m1['grad_norm'], m4['grad_norm'], rtol=1e-5)
  assert_grads_close(g1, g4)


def test_logits_chunk_and_width_steps_equal_full_logits_step(reference):
  """config.train.logits_chunk, and logits_width at the batch's most loss tokens in a row,
  change where the vocabulary projection runs, not the step (loss, metrics, every parameter's
  update: with SGD lr 1 it is the gradient)."""
  batch = make_batch()
  width = losses.row_loss_tokens(batch['loss_mask'])
  assert width == 7 and width < batch['loss_mask'].shape[1] - 1   # rows of 2, 4, 5, 6, 7
  (m0, g0), rest = reference, [grads_of_step(*setup(mesh1(), tx=optax.sgd(1.0), logits_chunk=c,
                                                     logits_width=w), batch)
                                for c, w in ((4, 0), (0, width))]
  assert m0['loss_tokens'] == batch['loss_mask'][:, 1:].sum()
  for m1, g1 in rest:
    for key in ('loss', 'token_accuracy', 'loss_tokens', 'grad_norm'):
      np.testing.assert_allclose(m1[key], m0[key], rtol=1e-6, err_msg=key)
    assert_grads_close(g0, g1)


def test_optimizer_state_is_sharded_like_its_parameter():
  mesh8 = shd.make_mesh({'fsdp': 4, 'tensor': 2})
  _, state8, *_ = setup(mesh8)
  spec = state8.params['llm']['layers']['mlp']['gate_proj']['kernel'].sharding.spec
  assert spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')   # split over both axes
  mu = state8.opt_state[1][0].mu['llm']['layers']['mlp']['gate_proj']['kernel']
  assert mu.sharding.spec == spec


def test_same_loss_and_grads_on_1_and_8_devices(reference):
  batch = make_batch()
  params0 = jax.device_get(setup(mesh1(), tx=optax.sgd(1.0))[1].params)   # the key-0 init
  setup8 = setup(shd.make_mesh({'fsdp': 4, 'tensor': 2}), params=params0, tx=optax.sgd(1.0))
  m1, g1 = reference
  m8, g8 = grads_of_step(*setup8, batch)
  np.testing.assert_allclose(m1['loss'], m8['loss'], rtol=1e-6)
  np.testing.assert_allclose(m1['grad_norm'], m8['grad_norm'], rtol=1e-5)
  assert_grads_close(g1, g8)


def test_mesh_and_batch_errors_say_what_to_change():
  with pytest.raises(ValueError, match='needs 6 devices but 8'):
    shd.make_mesh({'fsdp': 3, 'tensor': 2})
  with pytest.raises(ValueError, match='does not divide the 8'):
    shd.make_mesh({'fsdp': -1, 'tensor': 3})
  with pytest.raises(ValueError, match='unknown axis'):
    shd.make_mesh({'model': 8})
  mesh = shd.make_mesh({'data': 2, 'fsdp': -1})
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1, 'expert': 1}
  with pytest.raises(ValueError, match=r'config.sft.batch_size=12 is not divisible by the '
                                       r'data-parallel size 8'):
    shd.check_batch_divisible(12, mesh, 'config.sft.batch_size')


def test_undivisible_dims_stay_replicated():
  mesh = shd.make_mesh({'fsdp': 4, 'tensor': 2})
  rules = shd.logical_rules('fsdp_tp')
  assert shd.spec_for((31, 64), ('vocab', 'embed'), mesh, rules) == jax.sharding.PartitionSpec(None, 'fsdp')
  assert shd.spec_for((32, 64), ('vocab', 'embed'), mesh, rules) == jax.sharding.PartitionSpec('tensor', 'fsdp')


def test_checkpoint_round_trip_keeps_values_and_shardings(tmp_path):
  mesh8 = shd.make_mesh({'fsdp': 4, 'tensor': 2})
  factory, state, fn, tx, mask = setup(mesh8)
  state, _ = run_step(factory, state, fn, tx, mask, make_batch())
  ck = Checkpointer(str(tmp_path / 'ckpt'))
  pos = RunPosition('sft', 1, 1, False, 7)
  ck.save(pos, state, '{"a": 1}')
  assert ck.latest() == pos
  restored = ck.restore_state(7, factory.abstract_state(tx, mask))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
  # a leftover temporary directory of an interrupted save is never taken as a checkpoint
  (tmp_path / 'ckpt' / '9.orbax-checkpoint-tmp-123').mkdir()
  ck.close()
  assert Checkpointer(str(tmp_path / 'ckpt')).latest().global_step == 7


def test_every_parameter_has_logical_axis_names():
  import flax.linen as nn
  factory = steps.StateFactory(MLLM(CFG), mesh1(), shd.logical_rules('fsdp_tp'))
  leaves = jax.tree_util.tree_leaves_with_path(
      factory.boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) > 30
  for path, leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)


@pytest.mark.parametrize('policy', ['full', 'dots_no_batch'])
def test_remat_policies_do_not_change_gradients(policy, reference):
  import dataclasses
  batch = make_batch()
  ref = reference
  model = MLLM(dataclasses.replace(CFG, remat_policy=policy, vision_remat_policy=policy))
  factory = steps.StateFactory(model, mesh1(), shd.logical_rules('fsdp_tp'))
  params = factory.init_params(jax.random.key(0))
  tx = optax.sgd(1.0)
  mask = factory.mask('.*', 'trainable')
  out = grads_of_step(factory, factory.create_state(params, tx, mask),
                      steps.make_train_step(model, tx, mask), tx, mask, batch)
  np.testing.assert_allclose(ref[0]['loss'], out[0]['loss'], rtol=1e-6)
  assert_grads_close(ref[1], out[1])


class ArrayTask:
  """Held-out examples from fixed in-memory arrays (`batch(start, n)` slices them)."""

  def __init__(self, arrays):
    self.arrays = arrays

  def batch(self, start, n):
    return {k: v[start:start + n] for k, v in self.arrays.items()}


def test_evaluate_compiles_its_step_once_per_factory_and_model():
  """The compiled eval step belongs to its factory (not to a module-level cache keyed by
  id(factory), which CPython reuses once a factory is freed): every evaluation of a factory
  reuses one compiled step, and a second model in the same process gets its own."""
  import dataclasses
  from mllm_jax.train import loop
  rules, mesh = shd.logical_rules('fsdp_tp'), mesh1()
  config = ml_collections.ConfigDict(dict(train=dict(eval_examples=8, eval_batch_size=4)))
  batch = make_batch()
  task = ArrayTask(batch)

  def eval_loss(cfg):
    model = MLLM(cfg)
    factory = steps.StateFactory(model, mesh, rules)
    params = factory.init_params(jax.random.key(0))
    got = loop.evaluate(config, factory, params, task, mesh, rules)['eval/loss']
    assert len(factory.compiled) == 1     # 2 batches: compiled once
    logits = model.apply({'params': params}, batch['input_ids'], batch['pixel_values'],
                         batch['attention_mask'])
    want = losses.next_token_loss(logits, batch['input_ids'], batch['loss_mask'])
    np.testing.assert_allclose(got, float(want['loss_sum'] / want['tokens']), rtol=1e-5)
    return got

  first = eval_loss(CFG)
  # same parameter shapes, different function: a stale compiled step would run silently
  second = eval_loss(dataclasses.replace(CFG, llm=dataclasses.replace(CFG.llm, rope_theta=50.0)))
  assert abs(first - second) > 1e-4        # the two models really differ on this batch
