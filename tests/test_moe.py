"""Mixture-of-Experts: parity with transformers' Mixtral / Qwen2-MoE / Qwen3-MoE (and LLaVA with
an MoE LLM) with random weights, import/export round trips, the dropless paths against a plain
per-expert loop, the capacity path against dropless and its drop accounting, the
load-balancing / z-loss formulas, router gradients, 1 vs 8 devices, and learning."""
import dataclasses
import math

import flax

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import mllm_jax
from mllm_jax import sharding as shd
from mllm_jax.models import LLMConfig, MLLMConfig, MLLM
from mllm_jax.models import moe as moe_lib
from mllm_jax.models.llm import Decoder, layer_plan

from test_hf import apply_fn, assert_close, randomize, torch_inputs

TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=128)
MOE_DECODERS = {
    'mixtral': lambda: transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                  **TEXT),
    # MoE on layers 1 and 3 (every 2nd), layer 3 forced dense: stacks of runs; shared expert,
    # no top-k renormalisation, q/k/v biases
    'qwen2_moe': lambda: transformers.Qwen2MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, decoder_sparse_step=2, mlp_only_layers=[3],
        norm_topk_prob=False, **TEXT),
    # every 2nd layer MoE: one stack of [dense, MoE] groups; q/k norms, head_dim 16
    'qwen3_moe': lambda: transformers.Qwen3MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=2,
        norm_topk_prob=True, head_dim=16, **TEXT),
    'qwen3_dense': lambda: transformers.Qwen3Config(head_dim=16, **TEXT),
}


def inputs_with_padding(vocab=96, b=2, t=24, seed=0):
  ids = np.random.RandomState(seed).randint(0, vocab, (b, t))
  mask = np.ones_like(ids)
  mask[1, :5] = 0   # left padding
  return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize('name', list(MOE_DECODERS))
def test_moe_decoder_matches_transformers_and_export_round_trips(name, tmp_path):
  cfg = MOE_DECODERS[name]()
  cls = getattr(transformers, transformers.AutoConfig.for_model(cfg.model_type).__class__.__name__
                .replace('Config', 'ForCausalLM'))
  torch.manual_seed(0)
  hf = randomize(cls(cfg))
  hf.save_pretrained(tmp_path / 'hf')
  model, params = mllm_jax.load_hf(str(tmp_path / 'hf'))
  inputs = inputs_with_padding()
  with torch.no_grad():
    out = hf(**torch_inputs(inputs), output_router_logits='moe' in name)
  ref = out.logits.numpy()
  assert_close(apply_fn(model)(params, inputs), ref, inputs['attention_mask'])
  if 'moe' in name or name == 'mixtral':
    # the capacity path with room for every assignment gives the same logits
    llm = model.cfg.llm
    ample = dataclasses.replace(llm.moe, impl='capacity',
                                capacity_factor=llm.moe.num_experts / llm.moe.experts_per_token)
    cap = MLLM(dataclasses.replace(model.cfg, llm=dataclasses.replace(llm, moe=ample)))
    assert_close(apply_fn(cap)(params, inputs), ref, inputs['attention_mask'])
    # transformers' load-balancing loss (padding excluded) equals ours
    with torch.no_grad():
      labelled = hf(**torch_inputs(inputs), labels=torch.tensor(inputs['input_ids']),
                    output_router_logits=True)
    _, inter = model.apply({'params': params}, **inputs, mutable=['intermediates'])
    ours = moe_lib.losses(moe_lib.collect(inter), llm.moe.experts_per_token)
    np.testing.assert_allclose(float(ours['aux_loss']), float(labelled.aux_loss), rtol=1e-5)

  mllm_jax.save_hf(model, params, str(tmp_path / 'out'))
  back = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', attn_implementation='eager').eval()
  assert type(back) is cls
  with torch.no_grad():
    assert_close(back(**torch_inputs(inputs)).logits.numpy(), ref, inputs['attention_mask'])


def test_llm_hf_path_loads_an_moe_decoder_and_checks_its_moe_architecture(tmp_path):
  """config.model.llm.hf_path with a Qwen2-MoE checkpoint: the MLLM's decoder equals load_hf's;
  a differing MoE field (norm_topk_prob) is named; how the experts run (impl) may differ."""
  from mllm_jax.hf import pretrained
  from mllm_jax.train import steps
  torch.manual_seed(0)
  randomize(transformers.Qwen2MoeForCausalLM(MOE_DECODERS['qwen2_moe']())).save_pretrained(
      tmp_path / 'hf')
  path = str(tmp_path / 'hf')
  llm = dict(hf_path=path, moe=dict(impl='capacity', capacity_factor=4.0))
  for key, v in pretrained.config_overrides(path, 'llm').items():
    *parents, leaf = key.split('.')[2:]
    d = llm
    for p in parents:
      d = d.setdefault(p, {})
    d.setdefault(leaf, v)

  def init(llm_cfg):
    cfg = MLLMConfig.from_dict(dict(llm=llm_cfg, vision=None, image_token_id=95))
    factory = steps.StateFactory(MLLM(cfg), shd.make_mesh({'fsdp': -1}),
                                 shd.logical_rules('fsdp'))
    factory.init_params = lambda rng: jax.tree.map(   # a constant init compiles in no time
        lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), factory.abstract_params)
    return pretrained.init_params(factory, jax.random.key(0))

  ours = init(llm)['llm']
  ref = mllm_jax.load_hf(path)[1]['llm']
  jax.tree.map(np.testing.assert_array_equal, ours, ref)
  assert 'gate_proj' in str(jax.tree_util.tree_structure(ours))
  bad = dict(llm, moe=dict(llm['moe'], norm_topk_prob=True))
  with pytest.raises(ValueError, match=r'config.model.llm.moe.norm_topk_prob=True, '
                                       r'checkpoint: False'):
    init(bad)


def test_fused_in_memory_experts_load_like_the_files(tmp_path):
  """transformers >= 5 holds experts fused in memory ([E, 2I, H]); its files hold one tensor per
  expert. Both give the same params."""
  torch.manual_seed(0)
  hf = randomize(transformers.MixtralForCausalLM(MOE_DECODERS['mixtral']()))
  assert any(k.endswith('mlp.experts.gate_up_proj') for k in hf.state_dict())
  hf.save_pretrained(tmp_path / 'hf')
  model, params = mllm_jax.load_hf(str(tmp_path / 'hf'))
  from_memory = mllm_jax.hf.params_from_state_dict(model, hf.state_dict())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(from_memory))


def test_llava_with_mixtral_llm_matches_transformers(tmp_path):
  from test_hf import build_llava
  torch.manual_seed(3)
  text = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, num_local_experts=4,
                                    num_experts_per_tok=2)
  vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         image_size=28, patch_size=14)
  hf = randomize(transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
      text_config=text, vision_config=vision, image_token_index=4, vision_feature_layer=-2)))
  hf.save_pretrained(tmp_path / 'hf')
  model, params = mllm_jax.load_hf(str(tmp_path / 'hf'))
  assert model.cfg.llm.moe.num_experts == 4 and model.cfg.vision is not None
  rng = np.random.RandomState(0)
  n_img = model.cfg.vision.num_tokens
  ids = rng.randint(5, 64, (2, 12 + n_img))
  ids[:, 2:2 + n_img] = 4
  inputs = dict(input_ids=ids, attention_mask=np.ones_like(ids),
                pixel_values=rng.randn(2, 3, 28, 28).astype(np.float32))
  with torch.no_grad():
    ref = hf(**torch_inputs(inputs)).logits.numpy()
  assert_close(apply_fn(model)(params, inputs), ref)
  mllm_jax.save_hf(model, params, str(tmp_path / 'out'))
  back = transformers.LlavaForConditionalGeneration.from_pretrained(
      tmp_path / 'out', attn_implementation='eager').eval()
  with torch.no_grad():
    assert_close(back(**torch_inputs(inputs)).logits.numpy(), ref)


# ----------------------------------------------------------------------------------------------
# The block: dropless vs a per-expert loop, capacity vs dropless, losses, gradients
# ----------------------------------------------------------------------------------------------
E, K, H, I = 4, 2, 16, 8


def expert_setup(n=40, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(n, H).astype(np.float32)
  logits = rng.randn(n, E).astype(np.float32)
  gate, up = (rng.randn(E, H, I).astype(np.float32) * 0.3 for _ in range(2))
  down = rng.randn(E, I, H).astype(np.float32) * 0.3
  real = np.ones(n, bool)
  real[-6:] = False   # padding tokens: routed nowhere
  _, weights, experts = moe_lib.route(jnp.asarray(logits), K, True)
  experts = np.where(real[:, None], np.asarray(experts), E)
  return x, experts, np.asarray(weights), gate, up, down


def silu(v):
  return v / (1 + np.exp(-v))


def reference(x, experts, weights, gate, up, down, keep=None):
  """The plain loop: for each expert, its tokens through its SwiGLU, weighted, accumulated."""
  out = np.zeros(x.shape, np.float64)
  keep = np.ones(experts.shape, bool) if keep is None else keep
  for e in range(E):
    for n, j in zip(*np.nonzero((experts == e) & keep)):
      h = silu(x[n] @ gate[e]) * (x[n] @ up[e])
      out[n] += weights[n, j] * (h @ down[e])
  return out


# block 4: experts span several blocks, so grouped_matmul's CHUNK-block runs and single
# blocks both occur; block 128: one partly used block per expert
@pytest.mark.parametrize('impl,block', [('ragged_dot', 0), ('blocks', 4), ('blocks', 8),
                                        ('blocks', 128)])
def test_dropless_equals_per_expert_loop(impl, block):
  args = expert_setup()
  kw = dict(block=block) if block else {}
  ours = moe_lib.dropless(*map(jnp.asarray, args), 'silu', impl, **kw)
  np.testing.assert_allclose(np.asarray(ours), reference(*args), rtol=1e-5, atol=1e-5)
  if impl == 'blocks':   # its hand-written backward against autodiff of the ragged_dot path
    x, experts, weights, gate, up, down = map(jnp.asarray, args)

    def loss(impl, x, weights, gate, up, down):
      y = moe_lib.dropless(x, experts, weights, gate, up, down, 'silu', impl, **kw)
      return jnp.sum(jnp.sin(y))
    grads = [jax.grad(loss, argnums=(1, 2, 3, 4, 5))(i, x, weights, gate, up, down)
             for i in ('blocks', 'ragged_dot')]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *grads)


def capacity_reference(experts, c):
  """Choice-major, then token order: which assignments fit in capacity c."""
  keep, used = np.zeros(experts.shape, bool), np.zeros(E + 1, int)
  for j in range(K):
    for n in range(experts.shape[0]):
      e = experts[n, j]
      if e < E and used[e] < c:
        keep[n, j], used[e] = True, used[e] + 1
  return keep


def test_capacity_equals_dropless_when_ample_and_drops_exactly_what_it_reports():
  x, experts, weights, gate, up, down = args = expert_setup()
  jargs = list(map(jnp.asarray, args))
  ample, dropped = moe_lib.capacity_experts(*jargs, 'silu', capacity_factor=E / K)
  assert int(dropped) == 0
  np.testing.assert_allclose(np.asarray(ample), np.asarray(moe_lib.dropless(*jargs, 'silu')),
                             rtol=1e-5, atol=1e-6)
  n = x.shape[0]
  for factor in (0.5, 0.8):
    c = math.ceil(factor * n * K / E)
    keep = capacity_reference(experts, c)
    ours, dropped = moe_lib.capacity_experts(*jargs, 'silu', capacity_factor=factor)
    real = (experts < E).sum()
    assert 0 < int(dropped) == real - keep.sum()
    np.testing.assert_allclose(np.asarray(ours), reference(*args, keep=keep), rtol=1e-5,
                               atol=1e-5)


def block_model(impl='dropless', capacity_factor=1.25, zero_router=False):
  cfg = moe_lib.MoEConfig(num_experts=E, experts_per_token=K, mlp_dim=I, impl=impl,
                          capacity_factor=capacity_factor)
  block = moe_lib.MoEBlock(cfg, H)
  x = jnp.asarray(np.random.RandomState(1).randn(2, 12, H).astype(np.float32))
  params = flax.linen.meta.unbox(block.init(jax.random.key(0), x)['params'])
  if zero_router:
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if 'router' in jax.tree_util.keystr(p) else v, params)
  return block, params, x


def test_aux_loss_is_k_for_uniform_routing_and_the_formulas_hold():
  block, params, x = block_model(zero_router=True)
  _, stats = block.apply({'params': params}, x)
  out = moe_lib.losses(stats, K)
  assert float(out['aux_loss']) == K                  # E * sum_e (k/E) * (1/E)
  np.testing.assert_allclose(float(out['z_loss']), math.log(E) ** 2, rtol=1e-6)
  block, params, x = block_model()
  mask = np.ones((2, 12), np.int32)
  mask[0, :4] = 0
  _, stats = block.apply({'params': params}, x, jnp.asarray(mask))
  logits = np.asarray(x.reshape(-1, H) @ params['router']['kernel'], np.float64)
  logits = logits[mask.reshape(-1) > 0]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  counts = np.zeros(E)
  for row in np.argsort(-probs, -1)[:, :K]:
    counts[row] += 1
  expect = E * np.sum(counts / len(probs) * probs.mean(0))
  lse = np.log(np.exp(logits).sum(-1))
  out = moe_lib.losses(stats, K)
  np.testing.assert_allclose(float(out['aux_loss']), expect, rtol=1e-5)
  np.testing.assert_allclose(float(out['z_loss']), np.mean(lse ** 2), rtol=1e-5)
  assert float(stats.rows) == mask.sum()


def test_router_gets_gradients_from_the_output_and_the_aux_loss():
  block, params, x = block_model()

  def loss(p, which):
    y, stats = block.apply({'params': p}, x)
    return jnp.sum(y ** 2) if which == 'out' else moe_lib.losses(stats, K)[which]
  for which in ('out', 'aux_loss', 'z_loss'):
    g = jax.grad(loss)(params, which)['router']['kernel']
    assert float(jnp.abs(g).max()) > 1e-6, which


# ----------------------------------------------------------------------------------------------
# Train step: router losses in the loss and metrics; 1 vs 8 devices with expert parallelism
# ----------------------------------------------------------------------------------------------
def moe_mllm(impl='dropless', **moe_kw):
  moe = dict(num_experts=4, experts_per_token=2, mlp_dim=16, impl=impl, capacity_factor=1.0,
             aux_loss_coef=0.01, z_loss_coef=0.001)
  return MLLM(MLLMConfig.from_dict(dict(
      llm=dict(vocab_size=96, hidden=32, depth=2, heads=4, kv_heads=2, mlp_dim=48,
               moe={**moe, **moe_kw}),
      vision=None)))


def train_setup(model, mesh, params=None):
  import optax
  from mllm_jax.train import steps
  factory = steps.StateFactory(model, mesh, shd.logical_rules('fsdp'))
  params = (factory.init_params(jax.random.key(0)) if params is None
            else jax.device_put(params, factory.param_shardings))
  tx = optax.sgd(1.0)
  mask = factory.mask('.*', 'trainable')
  return (factory, factory.create_state(params, tx, mask),
          steps.make_train_step(model, tx, mask), tx, mask)


@pytest.mark.parametrize('impl', ['dropless', 'capacity'])
def test_moe_train_step_same_on_1_and_8_devices_with_expert_parallelism(impl):
  from test_train import assert_grads_close, grads_of_step, make_batch, mesh1
  batch = {k: v for k, v in make_batch().items() if k != 'pixel_values'}
  model = moe_mllm(impl)
  one = train_setup(model, mesh1())
  params0 = jax.device_get(one[1].params)
  eight = train_setup(model, shd.make_mesh({'expert': 4, 'fsdp': 2}), params0)
  spec = eight[1].params['llm']['layers']['mlp']['gate_proj'].sharding.spec
  assert spec == jax.sharding.PartitionSpec(None, 'expert', 'fsdp', None)   # [layers, E, H, I]
  (m1, g1), (m8, g8) = grads_of_step(*one, batch), grads_of_step(*eight, batch)
  for key in ('loss', 'moe/aux_loss', 'moe/z_loss', 'moe/dropped_fraction', 'grad_norm'):
    np.testing.assert_allclose(m1[key], m8[key], rtol=2e-5, err_msg=key)
  assert (m1['moe/dropped_fraction'] > 0) == (impl == 'capacity')
  assert 1.0 <= m1['moe/aux_loss'] < 4.0 and m1['moe/z_loss'] > 0
  assert_grads_close(g1, g8)
  # the router is trained, by the CE and by the router losses
  assert np.abs(g1['llm']['layers']['mlp']['router']['kernel']).max() > 0


@pytest.mark.slow
def test_router_losses_enter_the_training_loss():
  """Changing only the coefficients changes the gradient exactly by coef * grad(aux)."""
  from test_train import grads_of_step, make_batch, mesh1
  batch = {k: v for k, v in make_batch().items() if k != 'pixel_values'}
  base = train_setup(moe_mllm(aux_loss_coef=0.0, z_loss_coef=0.0), mesh1())
  params0 = jax.device_get(base[1].params)
  with_aux = train_setup(moe_mllm(aux_loss_coef=1.0, z_loss_coef=0.0), mesh1(), params0)
  (m0, g0), (m1, g1) = grads_of_step(*base, batch), grads_of_step(*with_aux, batch)
  np.testing.assert_allclose(m0['loss'], m1['loss'], rtol=1e-6)   # `loss` stays the CE
  np.testing.assert_allclose(m0['moe/aux_loss'], m1['moe/aux_loss'], rtol=1e-6)
  router = lambda g: g['llm']['layers']['mlp']['router']['kernel']
  model = moe_mllm()

  def aux_only(p):
    _, stats = moe_lib.apply_with_router_stats(model, {'params': p}, jnp.asarray(
        batch['input_ids']), attention_mask=jnp.asarray(batch['attention_mask']))
    return moe_lib.losses(stats, 2)['aux_loss']
  expect = jax.grad(aux_only)(params0)
  np.testing.assert_allclose(router(g1) - router(g0), router(expect), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['demo_moe', 'llava_mixtral_8x7b'])
def test_moe_configs_are_locked_and_build_moe_models(name):
  from test_configs import load
  c = load(name)
  with pytest.raises(AttributeError):
    c.model.llm.moe.num_expertz = 1   # locked: misspelt keys fail
  llm = LLMConfig(**c.model.llm.to_dict())
  assert all(llm.moe_layers) and llm.moe.experts_per_token == 2


def test_mixtral_8x7b_llava_size_and_expert_parallel_layout():
  """Full scale, abstractly (jax.eval_shape; nothing allocated): Mixtral-8x7B's 46.7B params plus
  CLIP-L and the projector, experts split over `expert` and the rest over `fsdp`."""
  from test_configs import load
  from mllm_jax.train import loop, steps
  c = load('llava_mixtral_8x7b')
  assert c.sft.trainable == '(connector|llm)/.*' and c.model.llm.moe.num_experts == 8
  mcfg = loop.model_config(c)
  mesh = shd.make_mesh({'expert': 4, 'fsdp': 2})   # the config's expert=8 needs 8 free devices
  factory = steps.StateFactory(MLLM(mcfg), mesh, shd.logical_rules(c.sharding.rules))
  flat = flax.traverse_util.flatten_dict(factory.abstract_params, sep='/')
  n = sum(math.prod(x.shape) for x in flat.values())
  assert 46.9e9 < n < 47.1e9, n
  llm = sum(math.prod(x.shape) for k, x in flat.items() if k.startswith('llm/'))
  assert abs(llm - 46.70e9) < 0.02e9, llm   # Mixtral-8x7B (vocabulary 32064 here)
  gate = flat['llm/layers/mlp/gate_proj']
  assert gate.shape == (32, 8, 4096, 14336)
  assert gate.sharding.spec == jax.sharding.PartitionSpec(None, 'expert', 'fsdp', None)
  per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in flat.values())
  assert per_device < 1.01 * n / 8


def permutation_task(n, seed, t=12, vocab=32, classes=4):
  """Sequences [class, x1, perm_c(x1), perm_c(perm_c(x1)), ...]: the next token depends on the
  class token at position 0 and the current token (chance: 1 / 28)."""
  perms = np.stack([np.random.RandomState(100 + c).permutation(np.arange(4, vocab))
                    for c in range(classes)])
  rng = np.random.RandomState(seed)
  ids = np.zeros((n, t), np.int32)
  ids[:, 0] = rng.randint(0, classes, n)
  ids[:, 1] = rng.randint(4, vocab, n)
  for k in range(2, t):
    ids[:, k] = perms[ids[:, 0], ids[:, k - 1] - 4]
  loss = np.zeros((n, t), np.float32)
  loss[:, 2:] = 1
  return dict(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=loss)


# 21 s: a learning run; the MoE train step's 1 vs 8 device equality stays in the default run
@pytest.mark.slow
def test_moe_model_learns_through_the_train_step():
  """A 2-layer MoE decoder (every 2nd layer MoE, capacity path) trained with the real train
  step (AdamW, router losses on) learns a class-dependent permutation task: held-out next-token
  accuracy far above chance, balanced routing, few drops. (The demo on the built-in task:
  docs/moe.md.)"""
  from mllm_jax.train import losses, optim, steps
  from test_train import OPT
  model = MLLM(MLLMConfig.from_dict(dict(
      llm=dict(vocab_size=32, hidden=64, depth=2, heads=4, kv_heads=2, mlp_dim=128,
               moe=dict(num_experts=4, experts_per_token=2, mlp_dim=64, every=2,
                        impl='capacity', capacity_factor=1.5, aux_loss_coef=0.01,
                        z_loss_coef=0.001)),
      vision=None)))
  factory = steps.StateFactory(model, shd.make_mesh({'fsdp': 1}, jax.devices()[:1]),
                               shd.logical_rules('fsdp'))
  opt = OPT.copy_and_resolve_references()
  opt.lr = 3e-3
  tx = optim.make_optimizer(opt, 200)
  mask = factory.mask('.*', 'trainable')
  state = factory.create_state(factory.init_params(jax.random.key(0)), tx, mask)
  jstep = steps.jit_train_step(steps.make_train_step(model, tx, mask),
                               factory.state_shardings(tx, mask), factory.mesh,
                               {'input_ids': 2, 'attention_mask': 2, 'loss_mask': 2})
  for i in range(200):
    batch = {k: v[None] for k, v in permutation_task(32, seed=i).items()}   # [accum=1, b, T]
    state, metrics = jstep(state, batch)
  held = permutation_task(256, seed=10 ** 6)
  logits = model.apply({'params': state.params}, jnp.asarray(held['input_ids']))
  out = losses.next_token_loss(logits, jnp.asarray(held['input_ids']),
                               jnp.asarray(held['loss_mask']))
  accuracy = float(out['correct'] / out['tokens'])
  print('held-out accuracy', accuracy, jax.device_get(metrics))
  assert accuracy > 0.9, (accuracy, jax.device_get(metrics))
  assert float(metrics['moe/aux_loss']) < 2.2 and float(metrics['moe/dropped_fraction']) < 0.1


@pytest.mark.parametrize('every,dense_layers', [(2, ()), (1, (0,))])
def test_kv_cache_decode_equals_full_forward_with_moe_stacks(every, dense_layers):
  """Prefill + token-by-token decode through stacks of groups / runs gives the full forward's
  logits (the cache is split and re-joined per stack)."""
  cfg = LLMConfig(vocab_size=64, hidden=32, depth=4, heads=4, kv_heads=2, mlp_dim=48,
                  moe=dict(num_experts=4, experts_per_token=2, every=every, mlp_dim=16,
                           dense_layers=dense_layers, shared_mlp_dim=8))
  model = Decoder(cfg)
  assert len(layer_plan(cfg)) == (1 if every == 2 else 2)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 10)))
  params = model.init(jax.random.key(0), ids)['params']
  full = model.apply({'params': params}, ids)
  cache = model.apply({'params': params}, 2, 10, method='init_cache')
  embed = lambda x: model.apply({'params': params}, x, method='embed')
  step = jax.jit(lambda c, x, pos: model.apply({'params': params}, embed(x), positions=pos,
                                               cache=c, method='hidden_states'))
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  h, cache = step(cache, ids[:, :6], positions[:, :6])
  outs = [h]
  for t in range(6, 10):
    h, cache = step(cache, ids[:, t:t + 1], positions[:, t:t + 1])
    outs.append(h)
  logits = model.apply({'params': params}, jnp.concatenate(outs, 1), method='logits')
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full), atol=2e-5)


@pytest.mark.parametrize('name', ['qwen2_moe', 'qwen3_moe'])
def test_greedy_generation_equals_transformers_with_moe_stacks(name, tmp_path):
  """KV-cache generation through stacks of runs (qwen2_moe) and of groups (qwen3_moe): greedy
  tokens equal transformers' generate, with the scanned and the unrolled (CPU) layer loop."""
  cfg = MOE_DECODERS[name]()
  cls = getattr(transformers, type(cfg).__name__.replace('Config', 'ForCausalLM'))
  torch.manual_seed(1)
  hf = randomize(cls(cfg))
  hf.generation_config.pad_token_id = 0
  hf.save_pretrained(tmp_path / 'hf')
  model, params = mllm_jax.load_hf(str(tmp_path / 'hf'))
  inputs = inputs_with_padding(t=12, seed=3)
  with torch.no_grad():
    ref = hf.generate(**torch_inputs(inputs), max_new_tokens=6, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[:, 12:].numpy()
  for loop in ('scan', 'unrolled'):
    out = mllm_jax.generate(model, params, inputs['input_ids'], inputs['attention_mask'],
                            max_new_tokens=6, layer_loop=loop)
    np.testing.assert_array_equal(np.asarray(out), ref, err_msg=loop)
