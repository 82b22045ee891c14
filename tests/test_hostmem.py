"""The CLI's re-exec with glibc.malloc.hugetlb=1 (mllm_jax/hostmem.py)."""
import os
import subprocess
import sys

import pytest

from mllm_jax import hostmem

SCRIPT = ('import os, sys; from mllm_jax import hostmem; print("start", flush=True); '
          'hostmem.reexec_with_huge_pages(); print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), '
          'sys.argv[1:])')


def run(**env):
  e = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hostmem.OPT_OUT)}
  e.update(env)
  out = subprocess.run([sys.executable, '-c', SCRIPT, 'a', '--b=1'], env=e, capture_output=True,
                       text=True, check=True).stdout.split('\n')
  return out


@pytest.mark.skipif(not (sys.platform.startswith('linux') and hostmem._thp_available()),
                    reason='needs Linux with transparent huge pages')
def test_reexec_sets_the_tunable_once_keeps_argv_and_can_be_turned_off():
  out = run(GLIBC_TUNABLES='glibc.malloc.arena_max=2')
  assert out[0] == out[1] == 'start'                       # ran twice: re-executed once
  pid, tunables, argv = out[2].split(' ', 2)
  assert tunables == 'glibc.malloc.arena_max=2:' + hostmem.TUNABLE   # the user's kept
  assert argv == "['a', '--b=1']"
  off = run(**{hostmem.OPT_OUT: '0'})
  assert off[0] == 'start' and off[1] != 'start' and hostmem.TUNABLE not in off[1]
