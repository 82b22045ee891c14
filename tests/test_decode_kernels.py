"""The CPU decode kernels (mllm_jax/kernels): packed matmul and decode attention against
float64 / layers.dot_product_attention, generate's decode step with them against the XLA
step on several LLM variants, when `decode_kernel='auto'` picks them, and the fallback
without a compiler."""
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax import generate as gen
from mllm_jax import sharding as shd
from mllm_jax.kernels import cpu
from mllm_jax.models import layers as L
from mllm_jax.train import steps
from test_models import tiny_mllm


@pytest.mark.parametrize('m,k,n', [(1, 64, 100), (3, 33, 31), (8, 96, 512), (9, 40, 70),
                                   (17, 24, 200)])
def test_packed_matmul_matches_float64(m, k, n):
  """Row counts below, at and past the 8-row tile, columns that fill no / part of a panel."""
  rng = np.random.default_rng(m * 1000 + n)
  x = rng.standard_normal((m, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  packed = np.asarray(jax.jit(cpu.pack)(w))
  assert packed.shape == (-(-n // 32), k, 32)
  want = np.zeros((k, packed.shape[0] * 32), np.float32)
  want[:, :n] = w                                       # panel p holds columns [32p, 32p + 32)
  np.testing.assert_array_equal(packed, want.reshape(k, -1, 32).transpose(1, 0, 2))
  y = np.asarray(jax.jit(cpu.packed_matmul, static_argnums=2)(x, packed, n))
  assert y.shape == (m, n)
  np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=0, atol=2e-6 * k)


def test_concurrent_packed_matmuls_are_all_right():
  """Independent calls in one program run concurrently on XLA's threads and share them
  (decode_kernels.cc): each result must still be its own product."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 64)).astype(np.float32)
  ws = [rng.standard_normal((64, 33 * (i + 1))).astype(np.float32) for i in range(6)]
  ys = jax.jit(lambda x, ws: [cpu.packed_matmul(x, cpu.pack(w), w.shape[1]) for w in ws])(x, ws)
  for y, w in zip(ys, ws):
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w, rtol=0, atol=2e-6 * 64)


def test_packed_matmul_shape_errors():
  x = jnp.ones((2, 16))
  with pytest.raises(ValueError, match='packed_matmul'):
    cpu.packed_matmul(x, cpu.pack(jnp.ones((16, 40))), 70)     # 2 panels hold at most 64 columns
  with pytest.raises(ValueError, match='packed_matmul'):
    cpu.packed_matmul(x, cpu.pack(jnp.ones((12, 40))), 40)     # K differs


@pytest.mark.parametrize('t,d,window', [(1, 16, 0), (3, 12, 0), (1, 16, 5)])
def test_decode_attention_matches_dot_product_attention(t, d, window):
  """GQA (4 query heads on 2 K/V heads), left-padded rows, 1 or 3 new tokens, a head dim that
  is / is not a multiple of 16, a sliding window, and a row with no visible slot at all."""
  b, h, hkv, s = 3, 4, 2, 24
  rng = np.random.default_rng(t * 10 + d)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, hkv, s, d)), jnp.float32) for _ in range(2))
  filled = np.zeros((b, s), bool)
  filled[0, :12], filled[1, 4:12], filled[2, 9:12] = True, True, True    # left padding
  index = 12 - t                                  # the new tokens sit at slots [index, 12)
  mask = np.array(L.make_cache_mask(jnp.asarray(filled), index, t, window))
  mask[2, :, 0, :] = False                        # a query that sees nothing
  mask = jnp.asarray(mask)
  ours = jax.jit(L.decode_attention)(q, k, v, mask)
  want = jax.jit(lambda *a: L.dot_product_attention(*a, kv_heads_first=True))(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(want), rtol=0, atol=1e-5)


VARIANTS = {   # the tiny model has GQA (4 query heads on 2 K/V heads) in both
    'qwen2_tied': dict(llm=dict(qkv_bias=True, tie_embeddings=True)),
    'moe_qk_norm_window': dict(llm=dict(qk_norm=True, sliding_window=4, moe=dict(
        num_experts=4, experts_per_token=2, every=2))),
}


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_decode_step_with_kernels_equals_xla(variant):
  """The decode step's hidden states and logits with the kernels equal XLA's dots and
  attention, for the LLM variants whose layers the kernels touch (biases, tied lm_head, q/k
  norms, a sliding window, MoE layers' routers). Whole `generate` runs with the kernels are
  checked token for token against transformers and against the scanned XLA loop in
  tests/test_generate.py."""
  model, params = tiny_mllm(**VARIANTS[variant])
  assert gen._decode_kernel(model, params, 'unrolled', 'auto') == 'packed'
  c = model.cfg.llm
  rng = np.random.default_rng(1)
  # a cache as a prefill leaves it (random keys / values in 10 filled slots of 16, the last row
  # left-padded by 3), and one new token per row at slot 10
  cache = model.apply({'params': params}, 3, 16, method='init_cache')
  cache['k'], cache['v'] = (jnp.asarray(rng.standard_normal(cache['k'].shape), jnp.float32)
                            for _ in range(2))
  filled = np.zeros((3, 16), bool)
  filled[:, :10], filled[2, :3] = True, False
  cache['filled'], cache['index'] = jnp.asarray(filled), jnp.int32(10)
  new = jnp.asarray(rng.integers(4, 96, (3, 1)), jnp.int32)
  pos = jnp.asarray([[10], [10], [7]], jnp.int32)

  def step(packed: bool):
    """One decode step: (hidden states, logits)."""
    dec = gen.UnrolledDecoder(model, params)
    split = dec.split_cache(cache)
    variables = {'params': params}
    if packed:
      dec.pack(split)
      variables = dec.head_variables(jnp.zeros((3, 1, c.hidden)))
    hidden, _ = dec.step(new, pos, split)
    return hidden, model.apply(variables, hidden, method='logits')

  (h_xla, l_xla), (h_pk, l_pk) = jax.jit(lambda: (step(False), step(True)))()
  np.testing.assert_allclose(np.asarray(h_pk), np.asarray(h_xla), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(l_pk), np.asarray(l_xla), rtol=0, atol=1e-5)
  assert float(jnp.abs(l_xla).max()) > 0.1                     # not a trivially small output


def test_decode_kernel_choice():
  model, params = tiny_mllm()
  assert gen._decode_kernel(model, params, 'unrolled', 'auto') == 'packed'
  assert gen._decode_kernel(model, params, 'unrolled', 'xla') == 'xla'
  assert gen._decode_kernel(model, params, 'scan', 'auto') == 'xla'
  with pytest.raises(ValueError, match="layer_loop is 'scan'"):
    gen._decode_kernel(model, params, 'scan', 'packed')
  with pytest.raises(ValueError, match='decode_kernel'):
    gen._decode_kernel(model, params, 'unrolled', 'fast')
  bf16 = type(model)(dataclasses.replace(model.cfg, dtype='bfloat16'))   # reads the config only
  assert gen._decode_kernel(bf16, params, 'unrolled', 'auto') == 'xla'
  # sharded over 8 devices: XLA's partitioned dots (the kernels see whole arrays only)
  mesh = shd.make_mesh({'fsdp': 2, 'tensor': 2, 'data': 2})
  factory = steps.StateFactory(model, mesh, shd.logical_rules('fsdp_tp'))
  sharded = jax.device_put(params, factory.param_shardings)
  assert gen._decode_kernel(model, sharded, 'unrolled', 'auto') == 'xla'
  with pytest.raises(ValueError, match='params live on 8 devices'):
    gen._decode_kernel(model, sharded, 'unrolled', 'packed')


def test_without_a_compiler_generate_falls_back_to_xla(tmp_path):
  """No C++ compiler on PATH and an empty kernel cache: `available()` is False with a warning
  that says why, 'auto' resolves to XLA, and asking for 'packed' raises the build error."""
  code = '''
import warnings
from mllm_jax import generate as gen
from mllm_jax.kernels import cpu
from test_models import tiny_mllm
model, params = tiny_mllm()
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  print('choice', gen._decode_kernel(model, params, 'unrolled', 'auto'))
print('warning', ' | '.join(str(w.message) for w in caught))
try:
  gen._decode_kernel(model, params, 'unrolled', 'packed')
except cpu.KernelBuildError as e:
  print('error', e)
'''
  env = dict(os.environ, PATH=str(tmp_path), MLLM_JAX_CACHE=str(tmp_path / 'cache'),
             PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path))
  env.pop('CXX', None)
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = {line.split(' ', 1)[0]: line for line in out.stdout.splitlines()}
  assert lines['choice'] == 'choice xla'
  assert 'no C++ compiler found' in lines['warning']
  assert lines['error'].startswith('error no C++ compiler found')


def test_init_makes_no_packed_weights():
  """`init` makes every collection mutable; it must not run generate's packing pass."""
  model, _ = tiny_mllm()
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  assert set(variables) == {'params'}
