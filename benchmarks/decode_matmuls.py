"""The weight reads of one decode step, alone: jitted JAX vs torch vs the machine's read rate.

    python benchmarks/decode_matmuls.py            # M = 8 and 1 rows, 30 timed calls each
    python benchmarks/decode_matmuls.py --rows 8

One call = the bench model's (benchmarks/common.py) 8 decoder layers' q / k / v / o, gate / up /
down projections and the lm_head, as fp32 matmuls of M rows (a decode step of batch M without
attention, norms or the KV cache), each layer's weights distinct so every byte comes from
memory (167 MB per call). Same weights and inputs in JAX (one jitted function, with XLA's dots
and with the CPU decode kernel on weights packed beforehand: mllm_jax/kernels, what `generate`
uses on CPU) and torch (eager, same thread count), all calls of one framework then the other's
(or alternating with --alternate); printed: median ms per call and the weight
bytes per second, next to a jitted 256 MiB reduction's read rate measured in the same run.
This is the part of `benchmarks/generate.py`'s decode step that no implementation can skip.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--rows', type=int, nargs='*', default=[8, 1])
  p.add_argument('--repeats', type=int, default=30)
  p.add_argument('--alternate', action='store_true',
                 help='alternate the frameworks call by call (default: all calls of one, then '
                      'the other, each after 3 untimed calls)')
  args = p.parse_args(argv)
  import jax
  import numpy as np
  import torch
  from benchmarks import common
  torch.set_num_threads(common.cpu_count())
  c = common.LLM
  h, f, v = c['hidden'], c['mlp_dim'], c['vocab_size']
  rng = np.random.default_rng(0)
  shapes = [(h, h)] * 4 + [(h, f), (h, f), (f, h)]
  layers = [[(rng.standard_normal(s) * 0.02).astype(np.float32) for s in shapes]
            for _ in range(c['depth'])]
  lm_head = (rng.standard_normal((h, v)) * 0.02).astype(np.float32)
  nbytes = sum(w.nbytes for ws in layers for w in ws) + lm_head.nbytes

  def chain(x, layers, lm_head, silu, mm):
    for q, k, vv, o, gate, up, down in layers:
      x = x + mm(mm(x, q) + mm(x, k) + mm(x, vv), o)   # keeps each product live
      x = x + mm(silu(mm(x, gate)) * mm(x, up), down)
    return mm(x, lm_head)

  jfn = jax.jit(lambda x, ls, lm: chain(x, ls, lm, jax.nn.silu, lambda a, b: a @ b))
  jl, jlm = jax.device_put(layers), jax.device_put(lm_head)
  from mllm_jax.kernels import cpu
  pl, plm = jax.jit(lambda ls, lm: ([[cpu.pack(w) for w in ws] for ws in ls], cpu.pack(lm)))(
      jl, jlm)
  cols = [s[1] for s in shapes]

  def kchain(x, ls, lm):   # each packed kernel with its true column count
    return chain(x, [list(zip(ws, cols)) for ws in ls], (lm, v), jax.nn.silu,
                 lambda a, b: cpu.packed_matmul(a, b[0], b[1]))
  kfn = jax.jit(kchain)
  tl, tlm = [[torch.from_numpy(w) for w in ws] for ws in layers], torch.from_numpy(lm_head)

  def tfn(x):
    with torch.no_grad():
      return chain(x, tl, tlm, torch.nn.functional.silu, torch.matmul)

  big = jax.device_put(np.ones((64 << 20,), np.float32))
  read = jax.jit(lambda a: a.sum())
  read(big).block_until_ready()
  t = []
  for _ in range(5):
    t0 = time.perf_counter()
    read(big).block_until_ready()
    t.append(time.perf_counter() - t0)
  bandwidth = big.nbytes / statistics.median(t)
  print(f'machine: {common.cpu_model_name()}, {common.cpu_count()} usable cores; jax '
        f'{jax.__version__}, torch {torch.__version__}; weights per call {nbytes / 1e6:.0f} MB; '
        f'read bandwidth {bandwidth / 1e9:.1f} GB/s', flush=True)
  for m in args.rows:
    x = rng.standard_normal((m, h)).astype(np.float32)
    jx, tx = jax.device_put(x), torch.from_numpy(x)
    runs = {'jax': lambda: jfn(jx, jl, jlm).block_until_ready(),
            'jax packed': lambda: kfn(jx, pl, plm).block_until_ready(),
            'torch': lambda: tfn(tx)}
    for name in ('jax packed', 'torch'):
      np.testing.assert_allclose(np.asarray(runs[name]()), np.asarray(runs['jax']()), rtol=2e-3,
                                 atol=2e-3)
    times = {name: [] for name in runs}
    order = ([list(runs)] * args.repeats if args.alternate else
             [[name] for name in runs for _ in range(args.repeats + 3)])
    for names in order:
      for name in names:
        t0 = time.perf_counter()
        runs[name]()
        times[name].append(time.perf_counter() - t0)
    if not args.alternate:   # the first calls after the other framework ran: untimed
      times = {name: ts[3:] for name, ts in times.items()}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f'M={m}: ' + '; '.join(
        f'{name} {s * 1e3:.2f} ms ({nbytes / s / 1e9:.1f} GB/s, fastest {min(times[name]) * 1e3:.2f})'
        for name, s in med.items()) + f'; torch / jax {med["torch"] / med["jax"]:.2f}, '
        f'torch / jax packed {med["torch"] / med["jax packed"]:.2f}', flush=True)


if __name__ == '__main__':
  main()
