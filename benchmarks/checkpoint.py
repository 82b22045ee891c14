"""How long checkpoint saves hold up training: sync vs async (`config.train.async_checkpoint`).

    python benchmarks/checkpoint.py            # 12 train steps per setting, a save every 3rd
    python benchmarks/checkpoint.py --quick    # 6 steps, a save every 3rd

The bench model of benchmarks/train_step.py (~70M parameters; its train state with AdamW's two
moments is ~0.9 GB) trains with `mllm_jax.checkpoint.Checkpointer` saving every --every steps,
in turn with synchronous saves, asynchronous saves and no saves, each setting in a fresh
directory on the same disk. Printed per setting: the seconds each `save` call blocked the loop,
the wall time of the steps (saves included, plus the final wait for the last write), and the
overhead over the run without saves. Steps are back to back, as in the training loop.

Last line (machine-readable):
    sync_blocked_s=<x> async_blocked_s=<x> sync_overhead_s=<x> async_overhead_s=<x>
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--steps', type=int, default=12)
  p.add_argument('--every', type=int, default=3, help='save after every this many steps')
  p.add_argument('--quick', action='store_true')
  p.add_argument('--dir', default=None, help='where checkpoints go (default: a temp dir)')
  p.add_argument('--no-hugepages', action='store_true')
  args = p.parse_args(argv)
  if args.quick:
    args.steps = 6
  if not args.no_hugepages:
    from mllm_jax import hostmem
    hostmem.reexec_with_huge_pages()
  import jax
  from benchmarks import common
  from benchmarks.train_step import JaxRunner
  from mllm_jax.checkpoint import Checkpointer, RunPosition

  runner = JaxRunner(common.make_batch(), attention_blocks=4, logits_width=320)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(runner.state))
  print(f'machine: {common.cpu_model_name()}, {common.cpu_count()} usable cores; jax '
        f'{jax.__version__}; train state {state_bytes / 1e9:.2f} GB '
        f'({runner.n_params / 1e6:.1f}M parameters + AdamW moments)')
  for _ in range(2):
    runner.step()   # warm: the timed settings start from steady steps
  root = args.dir or tempfile.mkdtemp(prefix='mllm_jax_ckpt_bench_')
  results = {}
  for setting in ('none', 'sync', 'async', 'none'):   # no saves first and last: drift check
    d = os.path.join(root, setting)
    shutil.rmtree(d, ignore_errors=True)
    ck = None if setting == 'none' else Checkpointer(d, max_to_keep=2,
                                                     async_save=setting == 'async')
    blocked = []
    t0 = time.perf_counter()
    for s in range(1, args.steps + 1):
      runner.step()
      if ck is not None and s % args.every == 0:
        t = time.perf_counter()
        ck.save(RunPosition('bench', 0, s, False, s), runner.state)
        blocked.append(time.perf_counter() - t)
    if ck is not None:
      ck.close()   # waits for the last background write
    wall = time.perf_counter() - t0
    results.setdefault(setting, []).append((wall, blocked))
    shutil.rmtree(d, ignore_errors=True)
    per_save = f', save blocked {statistics.median(blocked):.2f} s (median of ' \
               f'{len(blocked)}: {", ".join(f"{b:.2f}" for b in blocked)})' if blocked else ''
    print(f'{setting:>5}: {args.steps} steps in {wall:.1f} s{per_save}')
  if not args.dir:
    shutil.rmtree(root, ignore_errors=True)
  base = statistics.mean(w for w, _ in results['none'])
  out = {}
  for setting in ('sync', 'async'):
    wall, blocked = results[setting][0]
    out[f'{setting}_blocked_s'] = statistics.median(blocked)
    out[f'{setting}_overhead_s'] = wall - base
    print(f'{setting}: overhead over no saves {wall - base:+.1f} s for {len(blocked)} saves '
          f'({(wall - base) / len(blocked):+.2f} s per save)')
  print(' '.join(f'{k}={v:.3f}' for k, v in out.items()))


if __name__ == '__main__':
  main()
