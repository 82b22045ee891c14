"""CPU decode kernels: built from source on first use, registered with XLA as FFI custom calls.

`packed_matmul(x, packed, n)` is `x @ kernel` for the few rows of a decode step, with the
kernel packed once per `generate` call by `pack`; `decode_attention(q, k, v, mask, scale)` is
the step's attention over the KV cache (decode_kernels.cc says why and how). The shared library is compiled with the machine's C++ compiler (`$CXX`, else `c++` / `g++`) for
this CPU (`-march=native`) against the FFI headers jaxlib ships, and cached under
`$MLLM_JAX_CACHE` (default `~/.cache/mllm_jax`) by a hash of the source, compiler, flags and
jaxlib version. Without a compiler, `available()` is False and callers keep XLA's dot;
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
_SOURCE = Path(__file__).with_name('decode_kernels.cc')
_TARGETS = {'mllm_jax_pack': 'Pack', 'mllm_jax_packed_matmul': 'PackedMatmul',
            'mllm_jax_decode_attention': 'DecodeAttention'}
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
  if cxx is None:
    raise KernelBuildError('no C++ compiler found ($CXX, c++, g++ or clang++): the CPU decode '
                           'kernel cannot be built; generate falls back to XLA dot')
  import jaxlib
  version = subprocess.run([cxx, '--version'], capture_output=True, text=True).stdout
  key = hashlib.sha256('\n'.join([
      _SOURCE.read_text(), cxx, version, ' '.join(_FLAGS), jaxlib.__version__,
      platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
  out = cache_dir() / f'decode_kernels-{key}.so'
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Build to a temporary name and rename: concurrent first uses (test workers, hosts sharing a
  # home directory) never load a half-written library.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
  os.close(fd)
  cmd = [cxx, *_FLAGS, f'-I{jax.ffi.include_dir()}', str(_SOURCE), '-o', tmp]
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


def pack(kernel) -> jax.Array:
  """kernel [K, N] -> panels [ceil(N / 32), K, 32] (N zero-padded to a multiple of 32)."""
  _register()
  k, n = kernel.shape
  # a custom call rather than pad + transpose: packing the bench model's LLM weights took
  # 75 ms per generate call that way (~15 batch-1 decode steps' worth of the kernels' gain),
  # 38 ms this way (BENCHMARKS.md)
  return jax.ffi.ffi_call('mllm_jax_pack', jax.ShapeDtypeStruct((-(-n // PANEL), k, PANEL),
                                                                jnp.float32))(
      kernel.astype(jnp.float32))


def packed_matmul(x, packed, n: int):
  """x [M, K] fp32 . packed kernel [P, K, 32] -> [M, n] fp32 (n: the kernel's true columns)."""
  _register()
  m, k = x.shape
  if packed.shape[1] != k or packed.shape[2] != PANEL or not (
      (packed.shape[0] - 1) * PANEL < n <= packed.shape[0] * PANEL):
    raise ValueError(f'packed_matmul: x {x.shape} and packed {packed.shape} for {n} columns')
  return jax.ffi.ffi_call('mllm_jax_packed_matmul', jax.ShapeDtypeStruct((m, n), jnp.float32))(
      x.astype(jnp.float32), packed)


def decode_attention(q, k, v, mask, scale: float):
  """Softmax attention of the decode step over the KV cache, fp32.

  q [B, Hkv, R, D] (R = query heads per K/V head x T new tokens, ordered (head, token)),
  k, v [B, Hkv, S, D], mask bool [B, T, S] -> [B, Hkv, R, D]; the masking and softmax of
  `layers.dot_product_attention` (a query that sees no slot averages all S values).
  """
  _register()
  return jax.ffi.ffi_call('mllm_jax_decode_attention', jax.ShapeDtypeStruct(q.shape, jnp.float32))(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask.astype(bool),
      scale=np.float32(scale))

