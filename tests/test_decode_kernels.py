"""The CPU decode kernels (mllm_jax/kernels): packed matmul and decode attention against
float64 / layers.dot_product_attention (fp32) and XLA's bf16 ops (bf16), generate's decode
step with them against the XLA step on several LLM variants in both dtypes, when
`decode_kernel='auto'` picks them, and the fallback without a compiler."""
import dataclasses
import os
import shutil
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


def bf16_ulp(x):
  """The spacing of bf16 numbers at |x| (8 significant bits)."""
  x = np.abs(np.asarray(x, np.float32))
  return np.exp2(np.floor(np.log2(np.maximum(x, 2.0 ** -126))) - 7)


def assert_bf16_rounding_apart(ours, xla):
  """bf16 results of the same sums in another order: equal, or one rounding step apart where
  the fp32 sums straddle a rounding boundary (rare)."""
  assert ours.dtype == xla.dtype == jnp.bfloat16
  ours, xla = np.asarray(ours, np.float32), np.asarray(xla, np.float32)
  assert np.all(np.abs(ours - xla) <= bf16_ulp(xla)), np.abs(ours - xla).max()
  assert np.mean(ours != xla) < 0.01


@pytest.mark.parametrize('m,k,n', [(1, 64, 100), (8, 512, 1376), (9, 41, 70), (3, 127, 31)])
def test_packed_matmul_bf16_matches_xla(m, k, n):
  """bf16 x and weights, fp32 sums, bf16 result: XLA:CPU's bf16 dot up to summation order."""
  rng = np.random.default_rng(m * 1000 + n)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
  packed = jax.jit(cpu.pack)(w)
  assert packed.dtype == jnp.bfloat16
  # panel p, row pair i: (W[2i, c], W[2i + 1, c]) side by side for its 32 columns c
  want = np.zeros((-(-k // 2) * 2, packed.shape[0] * 32), np.float32)
  want[:k, :n] = np.asarray(w, np.float32)
  want = want.reshape(-1, 2, packed.shape[0], 32).transpose(2, 0, 3, 1).reshape(packed.shape)
  np.testing.assert_array_equal(np.asarray(packed, np.float32), want)
  y = jax.jit(cpu.packed_matmul, static_argnums=2)(x, packed, n)
  assert_bf16_rounding_apart(y, jax.jit(jnp.dot)(x, w))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('k', [512, 41])
def test_eight_row_tile_gives_the_bits_of_the_smaller_tiles(dtype, k):
  """The 8-row tiles (broadcasts folded into the multiply-add, decode_kernels.cc) sum each
  column in the order of the 1-7-row tiles: rows through 8-row passes equal the same rows in
  passes of 4 and 3, bit for bit, with bf16 x's rows padded (odd K) or not."""
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.standard_normal((19, k)), dtype)   # passes of 8, 8 and 3 rows
  w = jnp.asarray(rng.standard_normal((k, 100)), dtype)
  packed = jax.jit(cpu.pack)(w)
  mm = jax.jit(cpu.packed_matmul, static_argnums=2)
  whole = np.asarray(mm(x, packed, 100))
  parts = np.concatenate([np.asarray(mm(x[i:i + 4], packed, 100)) for i in range(0, 19, 4)])
  bits = np.uint16 if dtype == 'bfloat16' else np.uint32
  np.testing.assert_array_equal(whole.view(bits), parts.view(bits))
  if dtype == 'bfloat16':
    assert_bf16_rounding_apart(whole, jax.jit(jnp.dot)(x, w))
  else:
    np.testing.assert_allclose(whole, np.asarray(x, np.float64) @ np.asarray(w, np.float64),
                               atol=2e-6 * k)


def test_concurrent_packed_matmuls_are_all_right():
  """Independent calls in one program run concurrently on XLA's threads and share them
  (decode_kernels.cc): each result must still be its own product."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 64)).astype(np.float32)
  ws = [rng.standard_normal((64, 33 * (i + 1))).astype(np.float32) for i in range(6)]
  ys = jax.jit(lambda x, ws: [cpu.packed_matmul(x, cpu.pack(w), w.shape[1]) for w in ws])(x, ws)
  for y, w in zip(ys, ws):
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w, rtol=0, atol=2e-6 * 64)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_packing_kernels_side_by_side_equals_packing_their_concatenation(dtype):
  """`pack(a, b, c)` (fused projections, each kernel straight into its own panels) gives the
  panels of the concatenated kernel: odd K, the last kernel's width off the panel width."""
  rng = np.random.default_rng(3)
  ws = [jnp.asarray(rng.standard_normal((13, n)), dtype) for n in (64, 32, 40)]
  together = jax.jit(lambda *w: cpu.pack(*w))(*ws)
  np.testing.assert_array_equal(np.asarray(together, np.float32),
                                np.asarray(jax.jit(cpu.pack)(jnp.concatenate(ws, 1)), np.float32))
  with pytest.raises(ValueError, match='multiple of 32'):
    cpu.pack(ws[2], ws[0])                                     # 40 columns, then more
  with pytest.raises(ValueError, match='one K'):
    cpu.pack(ws[0], ws[1][:12])


def test_packed_matmul_shape_errors():
  x = jnp.ones((2, 16))
  with pytest.raises(ValueError, match='packed_matmul'):
    cpu.packed_matmul(x, cpu.pack(jnp.ones((16, 40))), 70)     # 2 panels hold at most 64 columns
  with pytest.raises(ValueError, match='packed_matmul'):
    cpu.packed_matmul(x, cpu.pack(jnp.ones((12, 40))), 40)     # K differs
  with pytest.raises(ValueError, match='float32 or bfloat16'):
    cpu.pack(jnp.ones((16, 40), jnp.float16))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('t,d,window', [(1, 16, 0), (3, 12, 0), (1, 16, 5), (1, 64, 0), (3, 32, 5)])
def test_decode_attention_matches_dot_product_attention(t, d, window, dtype):
  """GQA (4 query heads on 2 K/V heads), left-padded rows, 1 or 3 new tokens, a head dim that
  is / is not a multiple of 16 (fp32) or 32 (bf16), a sliding window, a row with no visible
  slot at all, 20 slots of 24 read (a full block of 16 scores with masked slots in it, and a
  partial one); in fp32, and in bf16 (fp32 scores and softmax, probabilities rounded to
  bf16)."""
  b, h, hkv, s = 3, 4, 2, 24
  rng = np.random.default_rng(t * 10 + d)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((b, hkv, s, d)), dtype) for _ in range(2))
  filled = np.zeros((b, s), bool)
  filled[0, :20], filled[1, 4:20], filled[2, 9:20] = True, True, True    # left padding
  index = 20 - t                                  # the new tokens sit at slots [index, 20)
  mask = np.array(L.make_cache_mask(jnp.asarray(filled), index, t, window))
  mask[2, :, 0, :] = False                        # a query that sees nothing
  mask = jnp.asarray(mask)
  ours = jax.jit(L.decode_attention, static_argnums=4)(q, k, v, mask, dtype)
  want = jax.jit(lambda *a: L.dot_product_attention(*a, kv_heads_first=True, dtype=dtype))(
      q, k, v, mask)
  if dtype == 'float32':
    np.testing.assert_allclose(np.asarray(ours), np.asarray(want), rtol=0, atol=1e-5)
  else:
    assert_bf16_rounding_apart(ours, want)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_cache_write_is_dynamic_update_slice(dtype):
  """New slots written at the index (clamped so they fit, as dynamic_update_slice does), in a
  loop that carries the cache (its buffer is updated in place)."""
  rng = np.random.default_rng(0)
  cache = jnp.asarray(rng.standard_normal((2, 3, 10, 16)), dtype)
  for t, index in ((1, 4), (3, 2), (3, 9)):
    new = jnp.asarray(rng.standard_normal((2, 3, t, 16)), jnp.float32)
    ours = jax.jit(cpu.cache_write)(cache, new, index)
    want = jax.lax.dynamic_update_slice(cache, new.astype(dtype), (0, 0, index, 0))
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(want, np.float32))

  def loop(cache):
    def body(i, c):
      return cpu.cache_write(c, jnp.full((2, 3, 1, 16), i + 1.0), i)
    return jax.lax.fori_loop(0, 10, body, cache)
  out = np.asarray(jax.jit(loop)(cache), np.float32)
  np.testing.assert_array_equal(out, np.broadcast_to(np.arange(1.0, 11.0)[:, None], out.shape))


VARIANTS = {   # the tiny model has GQA (4 query heads on 2 K/V heads) in both
    'qwen2_tied': dict(llm=dict(qkv_bias=True, tie_embeddings=True)),
    'moe_qk_norm_window': dict(llm=dict(qk_norm=True, sliding_window=4, moe=dict(
        num_experts=4, experts_per_token=2, every=2))),
}


@pytest.mark.parametrize('dtypes', ['float32', 'bfloat16', 'bfloat16/bfloat16'])
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_decode_step_with_kernels_equals_xla(variant, dtypes):
  """The decode step's hidden states and logits with the kernels equal XLA's dots and
  attention, for the LLM variants whose layers the kernels touch (biases, tied lm_head, q/k
  norms, a sliding window, MoE layers' routers), in fp32, in bf16 compute on fp32 weights
  (packed in bf16) and in bf16 on bf16 weights. Whole `generate` runs with the kernels are
  checked token for token against transformers and against the scanned XLA loop in
  tests/test_generate.py."""
  compute, _, weights = dtypes.partition('/')
  model, params = tiny_mllm(**VARIANTS[variant])
  model = type(model)(dataclasses.replace(model.cfg, dtype=compute,
                                          param_dtype=weights or 'float32'))
  params = jax.tree.map(lambda x: x.astype(model.cfg.weight_dtype), params)
  assert gen._decode_kernel(model, params, 'unrolled', 'auto') == 'packed'
  c = model.cfg.llm
  rng = np.random.default_rng(1)
  # a cache as a prefill leaves it (random keys / values in 10 filled slots of 16, the last row
  # left-padded by 3), and one new token per row at slot 10
  cache = model.apply({'params': params}, 3, 16, method='init_cache')
  assert cache['k'].dtype == jnp.dtype(compute)
  cache['k'], cache['v'] = (jnp.asarray(rng.standard_normal(cache['k'].shape), compute)
                            for _ in range(2))
  filled = np.zeros((3, 16), bool)
  filled[:, :10], filled[2, :3] = True, False
  cache['filled'], cache['index'] = jnp.asarray(filled), jnp.int32(10)
  new = jnp.asarray(rng.integers(4, 96, (3, 1)), jnp.int32)
  pos = jnp.asarray([[10], [10], [7]], jnp.int32)

  def step(packed: bool):
    """One decode step: (hidden states, logits)."""
    dec = gen.UnrolledDecoder(model, params, 16)
    split = dec.split_cache(cache)
    variables = {'params': params}
    if packed:
      variables = dec.use_packed(dec.pack())
      # q / k / v and gate / up each packed side by side as one matmul (layers.fused_dense)
      for layer in dec.packed:
        assert set(layer['attn']) == {'qkv', 'o_proj', 'decode_attention'}
        assert set(layer['mlp']) in ({'gate_up', 'down_proj'}, {'router'})
      assert any('gate_up' in layer['mlp'] for layer in dec.packed)
      assert dec.packed[0]['attn']['qkv'].shape[0] == -(-(c.heads + 2 * c.num_kv_heads) *
                                                        c.dim_per_head // cpu.PANEL)
    hidden, _ = dec.step(new, pos, split)
    return hidden, model.apply(variables, hidden, method='logits')

  both = jax.jit(lambda: (step(False), step(True)))
  hlo = both.lower().as_text()
  for target in ('packed_matmul', 'decode_attention', 'cache_write'):
    assert f'mllm_jax_{target}' in hlo
  (h_xla, l_xla), (h_pk, l_pk) = both()
  assert h_pk.dtype == h_xla.dtype == jnp.dtype(compute)
  if compute == 'float32':
    np.testing.assert_allclose(np.asarray(h_pk), np.asarray(h_xla), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(l_pk), np.asarray(l_xla), rtol=0, atol=1e-5)
  else:   # a rounding step apart at most, at the largest magnitude (it propagates through layers)
    for ours, xla in ((h_pk, h_xla), (l_pk, l_xla)):
      ours, xla = np.asarray(ours, np.float32), np.asarray(xla, np.float32)
      np.testing.assert_allclose(ours, xla, rtol=0, atol=float(bf16_ulp(np.abs(xla).max())))
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
  assert gen._decode_kernel(bf16, params, 'unrolled', 'auto') == 'packed'
  fp16 = type(model)(dataclasses.replace(model.cfg, dtype='float16'))
  assert gen._decode_kernel(fp16, params, 'unrolled', 'auto') == 'xla'
  with pytest.raises(ValueError, match='compute dtype is float16'):
    gen._decode_kernel(fp16, params, 'unrolled', 'packed')
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


@pytest.mark.skipif(os.uname().machine != 'x86_64',
                    reason='builds for x86 targets; other CPUs never have the AVX-512 paths '
                           'this test switches off')
@pytest.mark.parametrize('march', ['x86-64-v3', 'skylake-avx512'])
def test_portable_build_without_avx512(march, tmp_path):
  """Built for AVX2 (`-march=x86-64-v3`: no AVX-512, no AVX512_BF16 dot instruction), the
  kernels take their portable paths (GCC vector types at half width, bf16 pairs widened to
  fp32) and give the same results (matmuls, attention, greedy token); built for AVX-512
  without BF16 (`skylake-avx512`, common on cloud servers), the fp32 8-row tile's assembly
  with the portable bf16 path does too."""
  if march == 'skylake-avx512' and 'avx512f' not in cpu._cpu_flags().split():
    pytest.skip('an AVX-512 build cannot run on this CPU (no avx512f); the x86-64-v3 case '
                'still covers the portable paths')
  code = f'''
import jax, jax.numpy as jnp, numpy as np
from mllm_jax.kernels import cpu
from mllm_jax.models import layers as L
from test_decode_kernels import assert_bf16_rounding_apart
from test_decode_kernels import test_greedy_token_kernel_matches_argmax as greedy
rng = np.random.default_rng(0)
for m, k, n in ((8, 512, 1376), (3, 41, 70)):
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
  y = jax.jit(cpu.packed_matmul, static_argnums=2)(x, jax.jit(cpu.pack)(w), n)
  assert_bf16_rounding_apart(y, jax.jit(jnp.dot)(x, w))
  x32, w32 = np.asarray(x, np.float32), np.asarray(w, np.float32)
  y32 = jax.jit(cpu.packed_matmul, static_argnums=2)(x32, cpu.pack(w32), n)
  np.testing.assert_allclose(np.asarray(y32), x32.astype(np.float64) @ w32, atol=2e-6 * k)
for dtype in ('float32', 'bfloat16'):
  q = jnp.asarray(rng.standard_normal((2, 1, 4, 64)), dtype)
  kv = [jnp.asarray(rng.standard_normal((2, 2, 40, 64)), dtype) for _ in range(2)]
  mask = jnp.asarray(np.arange(40)[None, None, None] < np.array([30, 17])[:, None, None, None])
  ours = jax.jit(L.decode_attention, static_argnums=4)(q, *kv, mask, dtype)
  want = L.dot_product_attention(q, *kv, mask, kv_heads_first=True, dtype=dtype)
  if dtype == 'bfloat16':
    assert_bf16_rounding_apart(ours, want)
  else:
    np.testing.assert_allclose(np.asarray(ours), np.asarray(want), atol=1e-5)
  greedy(dtype)
print('ok')
'''
  env = dict(os.environ, MLLM_JAX_KERNEL_FLAGS=f'-march={march}',
             MLLM_JAX_CACHE=str(tmp_path / 'cache'),
             PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path))
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-3000:]
  built = list((tmp_path / 'cache' / 'kernels').glob('decode_kernels-*.so'))
  assert len(built) == 1
  if shutil.which('objdump'):   # the AVX-512 BF16 dot instruction is not in this build
    asm = subprocess.run(['objdump', '-d', str(built[0])], capture_output=True).stdout
    assert b'vdpbf16ps' not in asm
    assert (b'{1to16}' in asm) == (march == 'skylake-avx512')   # the fp32 8-row tile's


def test_init_makes_no_packed_weights():
  """`init` makes every collection mutable; it must not run generate's packing pass."""
  model, _ = tiny_mllm()
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  assert set(variables) == {'params'}


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_greedy_token_kernel_matches_argmax(dtype):
  """First index of the largest logit, as argmax, in one pass over 16 lanes: ties within a
  lane and across lanes, -inf rows, NaN rows (argmax: the first NaN's index; also two NaNs in
  one lane, a NaN in the first block, where a lane's running max itself is NaN, and a NaN only
  in the tail), rows shorter than one 16-lane block and with a tail past the last block; bf16
  logits read as they are; and generate.greedy_token's choice on the rows without a NaN."""
  rng = np.random.default_rng(0)
  for v in (5, 16, 37, 32000):
    logits = rng.standard_normal((11, v)).astype(np.float32)
    logits[1, [v // 3, v // 2, v - 1]] = 9.0               # a tie: the first one wins
    logits[2, :] = -np.inf
    logits[3, [v // 2, v - 1]] = np.nan
    logits[4, -1] = 50.0                                   # the max in the tail
    logits[5, :] = 2.0                                     # all equal
    logits[6, [0, v - 1]] = [np.nan, 60.0]                 # a NaN first
    logits[7, v - 1] = np.nan                              # a NaN last (the tail for v = 37)
    logits[8, [min(17, v - 1), 2]] = 9.0                   # a tie across lanes: the first in lane 2
    logits[9, [v - 1, 0]] = [np.inf, np.inf]               # +inf twice
    logits[10, [min(19, v - 1), 3]] = np.nan               # two NaNs in one lane, later first
    x = jnp.asarray(logits, dtype)
    ours = np.asarray(jax.jit(cpu.greedy_token)(x))
    want = np.argmax(np.asarray(x, np.float32), -1)
    np.testing.assert_array_equal(ours, want)
    np.testing.assert_array_equal(ours[[1, 3, 4, 5, 6, 7, 8, 9, 10]],
                                  [v // 3, v // 2, v - 1, 0, 0, v - 1, 2, 0, 3])
    nan_rows = [3, 6, 7, 10]
    xla = np.asarray(jax.jit(gen.greedy_token)(x.astype(jnp.float32)))
    np.testing.assert_array_equal(np.delete(ours, nan_rows), np.delete(xla, nan_rows))
