"""Every test process sees 8 CPU devices, so 1-device and 8-device runs compare in one process.

XLA_FLAGS must be set before jax is imported anywhere.
"""
import atexit
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# One persistent XLA compilation cache per test session, in a fresh directory (made by the
# pytest-xdist controller and inherited by its workers, and by the CLI and multi-process runs
# the tests start): the many tests that build the same tiny models compile each program once
# (4 test files: 217 -> 182 s). Tests that set their own keep theirs.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='mllm_jax_xla_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
