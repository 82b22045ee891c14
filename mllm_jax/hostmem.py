"""Host-memory setting for CPU runs: transparent huge pages for the allocator.

XLA:CPU (and PyTorch) take their large per-step buffers from fresh mmaps; faulting them in as
4 KiB pages costs ~25% of a train step of the benchmark model on a 2-core VM (BENCHMARKS.md:
3.0 vs 4.0 s per step, and the MoE layer 142 vs 166 ms for the dense MLP). glibc >= 2.35's
tunable `glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages (madvise), which
removes almost all of those faults. glibc reads tunables only at start-up, so the command-line
entry points re-execute themselves once with it set. Older glibc ignores the tunable; accelerator
runs are unaffected (device memory is not malloc'd). Set MLLM_JAX_HUGEPAGES=0 to opt out.
"""
from __future__ import annotations

import os
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
OPT_OUT = 'MLLM_JAX_HUGEPAGES'


def _thp_available() -> bool:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def reexec_with_huge_pages() -> None:
  """Re-run this command (same interpreter, argv and pid) with the tunable, unless it is set,
  opted out, or not Linux / no transparent huge pages. Call before heavy imports."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if (os.environ.get(OPT_OUT, '1') == '0' or 'glibc.malloc.hugetlb' in tunables
      or not sys.platform.startswith('linux') or not _thp_available()):
    return
  env = dict(os.environ, GLIBC_TUNABLES=':'.join(t for t in (tunables, TUNABLE) if t))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
