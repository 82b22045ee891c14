"""Mixture-of-Experts feed-forward block (Mixtral / Qwen2-MoE / Qwen3-MoE).

    x [B, T, H] --router (fp32)--> softmax over E experts --> top-k (renormalised if
    `norm_topk_prob`) --> each token's k experts: SwiGLU with expert weights
    gate_proj, up_proj [E, H, I], down_proj [E, I, H] --> sum weighted by the router
    (+ Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared_expert(x))

Two ways to run the experts (`moe.impl`), with the same numbers where no token is dropped:
  dropless  every (token, expert) assignment is computed: the assignments are sorted by expert
            and fed to a grouped matmul (`jax.lax.ragged_dot`, or on CPU `blocks`: each
            expert's rows padded to a block multiple and one matmul per block; see `dropless`).
  capacity  each expert takes at most C = ceil(capacity_factor * tokens * k / E) assignments
            into a fixed [E, C, H] buffer (batched matmul, static shapes, shards on the `expert`
            mesh axis); first choices of all tokens are served before any second choice, each
            in token order; an assignment past C is dropped (the token keeps its residual).
Padding tokens (`token_mask` 0) are routed nowhere: they take no capacity and their output is
the shared expert's alone.

Router statistics are returned per layer (`RouterStats`) and pooled over layers by the decoder;
`losses` turns them into the Switch load-balancing loss as transformers computes it and the
ST-MoE router z-loss.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.models import layers as L
from mllm_jax.models.config import MoEConfig

BLOCK = 128   # rows per block of the `blocks` grouped matmul


class RouterStats(NamedTuple):
  """Sums over the real tokens of one or more MoE layers (pooled by adding)."""
  counts: jax.Array      # [E] top-k assignments per expert
  probs: jax.Array       # [E] router probabilities per expert
  rows: jax.Array        # () tokens routed (per layer, summed over layers)
  z: jax.Array           # () sum of logsumexp(router logits)^2
  dropped: jax.Array     # () assignments dropped by the capacity limit

  def __add__(self, other):
    return RouterStats(*(a + b for a, b in zip(self, other)))


def losses(stats: RouterStats, k: int) -> dict:
  """Pooled stats -> dict(aux_loss, z_loss, dropped_fraction).

  aux_loss = E * sum_e f_e * P_e with f_e = assignments / rows and P_e = mean probability over
  the rows of every MoE layer together (transformers' `load_balancing_loss_func` with an
  attention mask): k for uniform routing. z_loss = mean over rows of logsumexp(logits)^2.
  """
  rows = jnp.maximum(stats.rows, 1.0)
  e = stats.counts.shape[-1]
  f = jax.lax.stop_gradient(stats.counts) / rows
  return dict(aux_loss=e * jnp.sum(f * stats.probs / rows), z_loss=stats.z / rows,
              dropped_fraction=stats.dropped / (rows * k))


def route(logits, k: int, norm_topk_prob: bool):
  """fp32 logits [N, E] -> (probs [N, E], weights [N, k], experts [N, k] int32)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  if norm_topk_prob:
    weights = weights / weights.sum(-1, keepdims=True)
  return probs, weights, experts.astype(jnp.int32)


def _ranks(experts, num_experts: int):
  """experts [A] (ids, `num_experts` = routed nowhere) -> (rank of each assignment among those of
  its expert, in order [A]; assignments per expert [E]; the stable sort by expert [A])."""
  order = jnp.argsort(experts, stable=True)
  sizes = jnp.bincount(experts, length=num_experts + 1)
  starts = jnp.cumsum(sizes) - sizes
  position = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  return position - starts[experts], sizes[:num_experts], order


def _block_matmul_fwd_core(xb, w, block_expert, active):
  def one(_, inp):
    xj, ej, on = inp
    zeros = jnp.zeros(xj.shape[:1] + w.shape[2:], xj.dtype)
    return None, jax.lax.cond(on, lambda: jnp.dot(xj, w[ej]), lambda: zeros)
  return jax.lax.scan(one, None, (xb, block_expert, active))[1]


@jax.custom_vjp
def _block_matmul(xb, w, block_expert, active):
  """xb [nb, b, K] x w [E, K, M] -> [nb, b, M], block j times w[block_expert[j]] (zeros where
  not `active`). A scan over blocks; the backward accumulates each block's weight gradient
  into its expert's slice in place (autodiff of `w[e]` inside a scan would add a full-size
  [E, K, M] zero-padded gradient per block)."""
  return _block_matmul_fwd_core(xb, w, block_expert, active)


def _block_matmul_fwd(xb, w, block_expert, active):
  return _block_matmul_fwd_core(xb, w, block_expert, active), (xb, w, block_expert, active)


def _block_matmul_bwd(res, dy):
  xb, w, block_expert, active = res

  def one(dw, inp):
    xj, dyj, ej, on = inp
    dx, dwj = jax.lax.cond(
        on, lambda: (jnp.dot(dyj, w[ej].T), jnp.dot(xj.T, dyj).astype(dw.dtype)),
        lambda: (jnp.zeros_like(xj), jnp.zeros(w.shape[1:], dw.dtype)))
    # the carry is updated outside the cond, so XLA updates it in place
    return dw.at[ej].add(dwj), dx
  dw, dx = jax.lax.scan(one, jnp.zeros_like(w), (xb, dy, block_expert, active))
  return dx, dw, None, None


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def dropless(x, experts, weights, gate, up, down, act: str, impl: str = 'auto',
             block: int = BLOCK):
  """Every assignment computed. x [N, H]; experts/weights [N, k] (expert id E = none);
  gate, up [E, H, I]; down [E, I, H]. Returns [N, H] in x.dtype.

  impl 'ragged_dot': the assignments sorted by expert, `jax.lax.ragged_dot` with group sizes.
  impl 'blocks': each expert's assignments start at a block boundary of a [nb * block, H]
  buffer (nb = static bound N*k/block + E); a scan multiplies each block by its expert's
  weights and skips the unused tail blocks. XLA:CPU lowers ragged_dot to ~E dense matmuls over
  all rows; this costs the real rows plus at most E blocks of padding (BENCHMARKS.md).
  'auto' = ragged_dot on accelerators, blocks on CPU.
  """
  n, k = experts.shape
  e, h, i = gate.shape
  fn = L.ACTIVATIONS[act]
  if impl == 'auto':
    impl = 'blocks' if jax.default_backend() == 'cpu' else 'ragged_dot'
  flat = experts.reshape(-1)                                       # [A] token-major
  tok = jnp.arange(n * k, dtype=jnp.int32) // k
  rank, sizes, order = _ranks(flat, e)
  x_ext = jnp.concatenate([x, jnp.zeros((1, h), x.dtype)])        # row N: zeros
  if impl == 'ragged_dot':
    xs = x_ext[jnp.where(flat[order] < e, tok[order], n)]          # [A, H] sorted by expert
    hid = fn(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
    ys = jax.lax.ragged_dot(hid, down, sizes)
    position = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    y = ys[position]                                               # [A, H] token-major
  elif impl == 'blocks':
    nb = -(-n * k // block) + e
    blocks_per = -(-sizes // block)                                # [E]
    first_block = jnp.cumsum(blocks_per) - blocks_per
    used = blocks_per.sum()
    real = flat < e
    dest = jnp.where(real, first_block[jnp.minimum(flat, e - 1)] * block + rank, nb * block)
    src = jnp.full((nb * block + 1,), n, jnp.int32).at[dest].set(tok)[:-1]
    xb = x_ext[src].reshape(nb, block, h)
    block_expert = jnp.clip(
        jnp.searchsorted(jnp.cumsum(blocks_per), jnp.arange(nb), side='right'), 0, e - 1)

    active = jnp.arange(nb) < used
    bm = lambda a, w: _block_matmul(a, w, block_expert, active)
    yb = bm(fn(bm(xb, gate)) * bm(xb, up), down)                   # [nb, block, H]
    y = jnp.concatenate([yb.reshape(nb * block, h), jnp.zeros((1, h), yb.dtype)])[dest]
  else:
    raise ValueError(f"config.model.llm.moe.dropless_impl={impl!r}: expected 'auto', "
                     "'ragged_dot' or 'blocks'")
  real = (experts < e).reshape(n * k, 1)   # rows past the routed ones: never read as numbers
  y = jnp.where(real, y.astype(jnp.float32) * weights.reshape(n * k, 1), 0.0)
  y = y.reshape(n, k, h).sum(1)
  return y.astype(x.dtype)


def capacity(experts, num_experts: int, capacity_factor: float):
  """Capacity assignment. experts [N, k] (id E = none) -> (slot [N, k] in [0, E*C) or E*C for
  dropped / unrouted, C). First choices of all tokens come before second choices, each in token
  order (Switch / GShard priority)."""
  n, k = experts.shape
  c = max(1, math.ceil(capacity_factor * n * k / num_experts))
  flat = experts.T.reshape(-1)                                     # [k*N] choice-major
  rank, _, _ = _ranks(flat, num_experts)
  keep = (flat < num_experts) & (rank < c)
  slot = jnp.where(keep, flat * c + rank, num_experts * c)
  return slot.reshape(k, n).T, c


def capacity_experts(x, experts, weights, gate, up, down, act: str, capacity_factor: float):
  """Token-dropping path. Shapes as `dropless`; returns ([N, H], dropped assignments)."""
  n, k = experts.shape
  e, h, i = gate.shape
  slot, c = capacity(experts, e, capacity_factor)
  tok = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, k))
  src = jnp.full((e * c + 1,), n, jnp.int32).at[slot.reshape(-1)].set(tok.reshape(-1))[:-1]
  x_ext = jnp.concatenate([x, jnp.zeros((1, h), x.dtype)])
  buf = L.constrain(x_ext[src].reshape(e, c, h), ('act_expert', None, 'act_embed'))
  hid = (L.ACTIVATIONS[act](jnp.einsum('ech,ehi->eci', buf, gate)) *
         jnp.einsum('ech,ehi->eci', buf, up))
  y = jnp.einsum('eci,eih->ech', hid, down)
  y = L.constrain(y, ('act_expert', None, 'act_embed')).reshape(e * c, h)
  y = jnp.concatenate([y, jnp.zeros((1, h), y.dtype)])[slot]     # [N, k, H]
  w = jnp.where(slot < e * c, weights, 0.0)[..., None]
  dropped = jnp.sum((experts < e) & (slot == e * c))
  return (y.astype(jnp.float32) * w).sum(1).astype(x.dtype), dropped


class MoEBlock(nn.Module):
  """Sparse MoE feed-forward. x [B, T, H], token_mask [B, T] | None -> ([B, T, H], RouterStats).

  Params: router/kernel [H, E] (fp32 compute), gate_proj / up_proj [E, H, I], down_proj [E, I, H];
  with `shared_mlp_dim`: shared_expert (SwiGLU) and shared_expert_gate/kernel [H, 1].
  """
  cfg: MoEConfig
  hidden: int
  act: str = 'silu'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, token_mask=None):
    m, hd = self.cfg, self.hidden
    e, k, i = m.num_experts, m.experts_per_token, m.mlp_dim
    b, t, _ = x.shape
    xf = x.reshape(b * t, hd)
    logits = L.DenseGeneral(e, ('embed', None), dtype=jnp.float32, param_dtype=self.param_dtype,
                            name='router')(xf)                    # [N, E] fp32
    probs, weights, experts = route(logits, k, m.norm_topk_prob)
    real = (jnp.ones((b * t,), bool) if token_mask is None
            else token_mask.reshape(-1).astype(bool))
    experts = jnp.where(real[:, None], experts, e)                # padding: routed nowhere
    def expert_param(name, shape, names, fan_in):
      w = self.param(name, nn.with_logical_partitioning(nn.initializers.normal(fan_in ** -0.5),
                                                        names), shape, self.param_dtype)
      return jnp.asarray(w, self.dtype)
    w_in = ('expert', 'embed', 'expert_mlp')
    gate = expert_param('gate_proj', (e, hd, i), w_in, hd)
    up = expert_param('up_proj', (e, hd, i), w_in, hd)
    down = expert_param('down_proj', (e, i, hd), ('expert', 'expert_mlp', 'embed'), i)
    xc = xf.astype(self.dtype)
    if m.impl == 'dropless':
      y, dropped = dropless(xc, experts, weights, gate, up, down, self.act, m.dropless_impl), 0
    elif m.impl == 'capacity':
      y, dropped = capacity_experts(xc, experts, weights, gate, up, down, self.act,
                                    m.capacity_factor)
    else:
      raise ValueError(f"config.model.llm.moe.impl={m.impl!r}: expected 'dropless' or "
                       "'capacity'")
    y = y.reshape(b, t, hd)
    if m.shared_mlp_dim:
      from mllm_jax.models.llm import GatedMLP   # the dense MLP; llm imports this module
      shared = GatedMLP(hd, m.shared_mlp_dim, self.act, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='shared_expert')(x)
      gate = L.Dense(1, ('embed', None), dtype=self.dtype, param_dtype=self.param_dtype,
                     name='shared_expert_gate')(x)
      y = y + jax.nn.sigmoid(gate) * shared
    rf = real.astype(jnp.float32)
    stats = RouterStats(
        counts=jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32), axis=(0, 1)),
        probs=jnp.sum(probs * rf[:, None], 0), rows=rf.sum(),
        z=jnp.sum(jax.nn.logsumexp(logits, -1) ** 2 * rf),
        dropped=jnp.asarray(dropped, jnp.float32))
    return y, stats


def collect(intermediates) -> RouterStats | None:
  """Pooled RouterStats of every MoE layer from a `mutable=['intermediates']` apply (None for a
  dense model)."""
  found = []

  def visit(tree):
    if isinstance(tree, dict):
      for key, value in tree.items():
        if key == 'moe':
          found.extend(value)
        else:
          visit(value)
  visit(intermediates.get('intermediates', intermediates))
  if not found:
    return None
  total = found[0]
  for s in found[1:]:
    total = total + s
  return total


def apply_with_router_stats(model: nn.Module, variables, *args, **kwargs):
  """`model.apply(...)` that also returns the pooled RouterStats (None for a dense model)."""
  cfg = getattr(model.cfg, 'llm', model.cfg)
  if not cfg.moe.num_experts:
    return model.apply(variables, *args, **kwargs), None
  out, inter = model.apply(variables, *args, mutable=['intermediates'], **kwargs)
  return out, collect(inter)


def loss_terms(model: nn.Module, stats: RouterStats | None) -> dict:
  """-> {'moe_loss': aux_loss_coef * aux + z_loss_coef * z (add to the training loss),
  'moe/aux_loss', 'moe/z_loss', 'moe/dropped_fraction'}; {} for a dense model."""
  if stats is None:
    return {}
  m = getattr(model.cfg, 'llm', model.cfg).moe
  terms = losses(stats, m.experts_per_token)
  return {'moe_loss': m.aux_loss_coef * terms['aux_loss'] + m.z_loss_coef * terms['z_loss'],
          **{f'moe/{k}': v for k, v in terms.items()}}
