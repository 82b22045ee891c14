"""Tokens/s of one MoE feed-forward layer on CPU: dropless, capacity and the dense SwiGLU MLP with
the same active parameters, forward + backward, measured round-robin in one run.

    python benchmarks/moe.py            # 8 experts top-2, 512 wide, experts 1024, 4 x 512 tokens
    python benchmarks/moe.py --quick

Variants (all: x [B, T, 512] -> [B, T, 512], loss = mean(y^2), grads of x and every weight):
  dense          GatedMLP 512 -> 2048 -> 512 (the active parameters of top-2 of 1024-wide experts)
  dropless       MoEBlock, dropless, `blocks` grouped matmul (the CPU default)
  dropless_rd    MoEBlock, dropless, `jax.lax.ragged_dot`
  capacity       MoEBlock, capacity path, capacity_factor 1.25
Steps run round-robin over the variants so machine load hits them alike; the ratio of medians
is the result. The router is random (about balanced); `moe/dropped_fraction` of the capacity
variant is printed.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import StepStats, Timed, cpu_count, cpu_model_name  # noqa: E402
from mllm_jax.models import moe  # noqa: E402
from mllm_jax.models.config import MoEConfig  # noqa: E402
from mllm_jax.models.llm import GatedMLP  # noqa: E402

H, E, K, I = 512, 8, 2, 1024
B, T = 4, 512


def variants():
  base = dict(num_experts=E, experts_per_token=K, mlp_dim=I)
  return {
      'dense': GatedMLP(H, K * I),
      'dropless': moe.MoEBlock(MoEConfig(**base, impl='dropless', dropless_impl='blocks'), H),
      'dropless_rd': moe.MoEBlock(MoEConfig(**base, impl='dropless',
                                            dropless_impl='ragged_dot'), H),
      'capacity': moe.MoEBlock(MoEConfig(**base, impl='capacity', capacity_factor=1.25), H),
  }


def make_step(module):
  def loss(params, x):
    y = module.apply({'params': params}, x)
    y = y[0] if isinstance(y, tuple) else y
    return jnp.mean(y.astype(jnp.float32) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--steps', type=int, default=0)
  ap.add_argument('--no-hugepages', action='store_true',
                 help='keep the environment (default: re-exec with glibc.malloc.hugetlb=1, as the '
                      'training CLI does; mllm_jax/hostmem.py)')
  args = ap.parse_args()
  if not args.no_hugepages:
    from mllm_jax import hostmem
    hostmem.reexec_with_huge_pages()
  steps = args.steps or (4 if args.quick else 12)
  x = jax.random.normal(jax.random.key(1), (B, T, H), jnp.float32)
  runs = {}
  for name, module in variants().items():
    params = nn.meta.unbox(module.init(jax.random.key(0), x)['params'])
    fn = make_step(module)
    jax.block_until_ready(fn(params, x))   # compile + warm up
    runs[name] = (fn, params, StepStats())
  cap = variants()['capacity']
  _, stats = cap.apply({'params': runs['capacity'][1]}, x)
  dropped = float(moe.losses(stats, K)['dropped_fraction'])
  for _ in range(steps):
    for name, (fn, params, st) in runs.items():
      with Timed() as t:
        jax.block_until_ready(fn(params, x))
      st.add(t)
  print(f'machine: {cpu_model_name()}, {cpu_count()} cores; jax {jax.__version__} '
        f'({jax.default_backend()})')
  print(f'layer: hidden {H}, {E} experts top-{K}, expert width {I}; dense MLP width {K * I}; '
        f'{B} x {T} tokens, fwd+bwd; capacity variant drops {dropped:.1%} of assignments')
  dense = runs['dense'][2].step_time()
  for name, (_, _, st) in runs.items():
    tps = B * T / st.step_time()
    print(f'{name:12s} {tps:9.0f} tokens/s  time / dense {st.step_time() / dense:5.2f}   '
          f'{st.describe()}')
  best = {name: min(st.seconds) for name, (_, _, st) in runs.items()}
  print('fastest step / dense fastest: ' + ', '.join(
      f'{name} {t / best["dense"]:.2f}' for name, t in best.items()))
  ratio = runs['dropless'][2].step_time() / dense
  print(f'dropless_over_dense={ratio:.3f} capacity_over_dense='
        f'{runs["capacity"][2].step_time() / dense:.3f} target<=1.5 '
        f'{"met" if ratio <= 1.5 else "NOT met"}')


if __name__ == '__main__':
  main()
