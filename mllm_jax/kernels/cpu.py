"""CPU decode kernels: built from source on first use, registered with XLA as FFI custom calls.

`packed_matmul(x, packed, n)` is `x @ kernel` for the few rows of a decode step (and the
prefill's many), with the kernel packed by `pack` (once per params: generate keeps it);
`decode_attention(q, k, v, mask, scale)` is the step's attention over the KV cache,
`cache_write` its in-place cache update and `greedy_token` its argmax (decode_kernels.cc says
why and how). They run in fp32 or in bf16 (bf16 data, fp32 sums, as XLA:CPU computes bf16
dots).

The shared library is compiled with the machine's C++ compiler (`$CXX`, else `c++` / `g++`) for
this CPU (`-march=native`) against the FFI headers jaxlib ships, and cached under
`$MLLM_JAX_CACHE` (default `~/.cache/mllm_jax`) by a hash of the source, compiler, flags and
jaxlib version; `$MLLM_JAX_KERNEL_FLAGS` adds compiler flags (e.g. `-mno-avx512bf16`: the
portable bf16 path). Without a compiler, `available()` is False and callers keep XLA's dot;
`build()` raises with the compiler's message.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

PANEL = 32   # columns per packed panel (kPanel in decode_kernels.cc)
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))   # the kernels' element types
_SOURCE = Path(__file__).with_name('decode_kernels.cc')
_TARGETS = {'mllm_jax_pack': 'Pack', 'mllm_jax_packed_matmul': 'PackedMatmul',
            'mllm_jax_decode_attention': 'DecodeAttention', 'mllm_jax_cache_write': 'CacheWrite',
            'mllm_jax_greedy_token': 'GreedyToken'}
_FLAGS = ('-O3', '-march=native', '-ffp-contract=fast', '-std=c++17', '-shared', '-fPIC',
          '-w')


class KernelBuildError(RuntimeError):
  pass


def _compiler() -> str | None:
  for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
    if name and shutil.which(name):
      return name
  return None


def cache_dir() -> Path:
  return Path(os.environ.get('MLLM_JAX_CACHE', Path.home() / '.cache' / 'mllm_jax')) / 'kernels'


@functools.lru_cache(maxsize=None)
def build() -> Path:
  """Compile decode_kernels.cc (once per source / compiler / jaxlib / machine) -> the .so path."""
  cxx = _compiler()
  flags = _FLAGS + tuple(os.environ.get('MLLM_JAX_KERNEL_FLAGS', '').split())
  if cxx is None:
    raise KernelBuildError('no C++ compiler found ($CXX, c++, g++ or clang++): the CPU decode '
                           'kernel cannot be built; generate falls back to XLA dot')
  import jaxlib
  version = subprocess.run([cxx, '--version'], capture_output=True, text=True).stdout
  key = hashlib.sha256('\n'.join([
      _SOURCE.read_text(), cxx, version, ' '.join(flags), jaxlib.__version__,
      platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
  out = cache_dir() / f'decode_kernels-{key}.so'
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Build to a temporary name and rename: concurrent first uses (test workers, hosts sharing a
  # home directory) never load a half-written library.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
  os.close(fd)
  cmd = [cxx, *flags, f'-I{jax.ffi.include_dir()}', str(_SOURCE), '-o', tmp]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    os.unlink(tmp)
    raise KernelBuildError(f'building the CPU decode kernel failed ({" ".join(cmd)}):\n'
                           f'{proc.stderr[-4000:]}')
  os.replace(tmp, out)
  return out


def _cpu_flags() -> str:
  """The CPU's feature flags (the library is built with -march=native)."""
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith(('flags', 'Features')):
        return line
  except OSError:
    pass
  return platform.processor()


@functools.lru_cache(maxsize=None)
def _register() -> None:
  lib = ctypes.cdll.LoadLibrary(str(build()))
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """True when the kernel is (or can be) built and registered on this machine."""
  try:
    _register()
    return True
  except (KernelBuildError, OSError) as e:
    import warnings
    warnings.warn(f'mllm_jax CPU decode kernel unavailable, using XLA dot: {e}')
    return False


def _dtype(x, what: str):
  if jnp.dtype(x.dtype) not in DTYPES:
    raise ValueError(f'{what}: dtype {x.dtype}, the CPU decode kernels take float32 or bfloat16')
  return jnp.dtype(x.dtype)


def packed_shape(k: int, n: int, dtype) -> tuple[int, int, int]:
  """The packed layout of a [k, n] kernel: fp32 [ceil(n / 32), k, 32]; bf16
  [ceil(n / 32), ceil(k / 2), 64], rows 2i and 2i + 1 of a column side by side (the operand
  pairs of AVX-512 BF16's dot instruction)."""
  panels = -(-n // PANEL)
  if jnp.dtype(dtype) == jnp.float32:
    return panels, k, PANEL
  return panels, -(-k // 2), 2 * PANEL


def pack(*kernels) -> jax.Array:
  """kernels [K, N_i] -> the panels (`packed_shape`) of their columns side by side, in their
  dtype (the columns zero-padded to a multiple of 32, bf16 K to a multiple of 2). Every N_i
  but the last must be a multiple of 32 (each fills whole panels; fused projections are packed
  without a concatenated copy)."""
  _register()
  if not kernels:
    raise ValueError('pack: no kernels')
  k = kernels[0].shape[0]
  widths = [w.shape[1] if w.ndim == 2 else None for w in kernels]
  if any(w.ndim != 2 or w.shape[0] != k for w in kernels) or any(n % PANEL for n in widths[:-1]):
    raise ValueError(f'pack: kernels {[w.shape for w in kernels]}: expected [K, N_i] with one K, '
                     f'every N_i but the last a multiple of {PANEL}')
  dtype = _dtype(kernels[0], 'pack')
  if any(jnp.dtype(w.dtype) != dtype for w in kernels):
    raise ValueError(f'pack: kernels of dtypes {[str(w.dtype) for w in kernels]}: one dtype')
  # a custom call rather than pad + transpose: packing the bench model's LLM weights took
  # 75 ms per generate call that way (~15 batch-1 decode steps' worth of the kernels' gain),
  # 38 ms this way (BENCHMARKS.md)
  return jax.ffi.ffi_call('mllm_jax_pack', jax.ShapeDtypeStruct(
      packed_shape(k, sum(widths), dtype), dtype))(*kernels)


def packed_matmul(x, packed, n: int):
  """x [M, K] . packed kernel -> [M, n] (n: the kernel's true columns), in the packed
  kernel's dtype (x is cast to it)."""
  _register()
  m, k = x.shape
  dtype = _dtype(packed, 'packed_matmul')
  if packed.shape != packed_shape(k, n, dtype):
    raise ValueError(f'packed_matmul: x {x.shape} and packed {packed.shape} for {n} columns')
  return jax.ffi.ffi_call('mllm_jax_packed_matmul', jax.ShapeDtypeStruct((m, n), dtype))(
      x.astype(dtype), packed)


def decode_attention(q, k, v, mask, scale: float):
  """Softmax attention of the decode step over the KV cache, in the cache's dtype.

  q [B, Hkv, R, D] (R = query heads per K/V head x T new tokens, ordered (head, token)),
  k, v [B, Hkv, S, D], mask bool [B, T, S] -> [B, Hkv, R, D]; the masking, softmax and
  roundings of `layers.dot_product_attention` (fp32 scores and softmax, probabilities rounded
  to the cache's dtype; a query that sees no slot averages all S values).
  """
  _register()
  dtype = _dtype(k, 'decode_attention')
  return jax.ffi.ffi_call('mllm_jax_decode_attention', jax.ShapeDtypeStruct(q.shape, dtype))(
      q.astype(dtype), k, v.astype(dtype), mask.astype(bool), scale=np.float32(scale))


def cache_write(cache, new, index):
  """`dynamic_update_slice(cache, new, (0, 0, index, 0))` in place: cache [B, H, L, D], new
  [B, H, T, D] (cast to the cache's dtype), index int32 [] (clamped so the T slots fit). The
  result aliases the cache, so XLA reuses its buffer when nothing else reads the old cache
  (a decode loop's carried cache); XLA:CPU's own bf16 update rewrites the whole cache."""
  _register()
  if cache.ndim != 4 or new.ndim != 4 or new.shape[:2] != cache.shape[:2] or (
      new.shape[3] != cache.shape[3] or new.shape[2] > cache.shape[2]):
    raise ValueError(f'cache_write: cache {cache.shape}, new {new.shape}')
  return jax.ffi.ffi_call('mllm_jax_cache_write', jax.ShapeDtypeStruct(cache.shape, cache.dtype),
                          input_output_aliases={0: 0})(
      cache, new.astype(cache.dtype), jnp.asarray(index, jnp.int32))


def greedy_token(logits):
  """[B, V] logits -> [B] int32: `generate.greedy_token` (the first index of the largest
  logit) as one kernel; a row with a NaN gives its first NaN's index, as `argmax` does. fp32
  and bf16 logits are read as they are (bf16 -> fp32 is exact, so the choice is the same),
  others are cast to fp32."""
  _register()
  if jnp.dtype(logits.dtype) not in DTYPES:
    logits = logits.astype(jnp.float32)
  return jax.ffi.ffi_call('mllm_jax_greedy_token',
                          jax.ShapeDtypeStruct(logits.shape[:1], jnp.int32))(logits)
