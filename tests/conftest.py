"""Every test process sees 8 CPU devices, so 1-device and 8-device runs compare in one process.

XLA_FLAGS must be set before jax is imported anywhere.
"""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
