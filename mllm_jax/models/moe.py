"""Mixture-of-Experts feed-forward block (Mixtral / Qwen2-MoE / Qwen3-MoE).

    x [B, T, H] --router (fp32)--> softmax over E experts --> top-k (renormalised if
    `norm_topk_prob`) --> each token's k experts: SwiGLU with expert weights
    gate_proj, up_proj [E, H, I], down_proj [E, I, H] --> sum weighted by the router
    (+ Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared_expert(x))

Two ways to run the experts (`moe.impl`), with the same numbers where no token is dropped:
  dropless  every (token, expert) assignment is computed: the assignments are sorted by expert
            and fed to a grouped matmul (`jax.lax.ragged_dot`, or on CPU `blocks`: each
            expert's rows padded to a block multiple, multiplied by runs of blocks; see `dropless`).
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

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.models import layers as L
from mllm_jax.models.config import MoEConfig

BLOCK = 64    # rows per block of the `blocks` grouped matmul (an expert pads to a multiple)
CHUNK = 4     # blocks per matmul where an expert has that many left (BENCHMARKS.md)


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


def _expert_runs(start, count, chunk: int, body, carry):
  """carry = body(j, n, carry) over blocks start .. start+count-1 (one expert's): runs of
  n = `chunk` blocks while they last, then single blocks (n = 1). So most rows go through large
  matmuls while an expert's padding stays below one small block. Loops, not a scan: the runs
  update carried buffers in place and blocks past the used ones cost nothing. (Splitting the
  rest into runs of chunk/2, chunk/4, .. was slower: every extra loop costs a copy of the
  carried buffers.)"""
  runs = count // chunk
  carry = jax.lax.fori_loop(0, runs, lambda q, cr: body(start + q * chunk, chunk, cr), carry)
  return jax.lax.fori_loop(start + runs * chunk, start + count,
                           lambda j, cr: body(j, 1, cr), carry)


def _rows(a, block_index, n_blocks: int, block: int):
  return jax.lax.dynamic_slice_in_dim(a, block_index * block, n_blocks * block, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def grouped_matmul(x, w, first, count, block: int, chunk: int):
  """x [R, K] (R = nb * block rows, expert e's rows in blocks first[e] .. first[e]+count[e]-1)
  times w [E, K, M] -> [R, M]; rows of unused blocks are zeros.

  The backward writes dx block by block and accumulates each expert's weight gradient in a
  [K, M] carry over its blocks (autodiff of `w[e]` inside a loop would add a full [E, K, M]
  zero-padded gradient per block)."""
  return _grouped_matmul_fwd(x, w, first, count, block, chunk)[0]


def _grouped_matmul_fwd(x, w, first, count, block, chunk):
  def expert(e, out):
    we = w[e]   # read once per expert
    return _expert_runs(first[e], count[e], chunk, lambda j, n, out: (
        jax.lax.dynamic_update_slice_in_dim(out, _rows(x, j, n, block) @ we, j * block, 0)), out)
  out = jax.lax.fori_loop(0, w.shape[0], expert, jnp.zeros((x.shape[0], w.shape[2]), x.dtype))
  return out, (x, w, first, count)


def _grouped_matmul_bwd(block, chunk, res, dy):
  x, w, first, count = res
  contract_out = (((1,), (1,)), ((), ()))   # dy [r, M] . w_e [K, M] over M, no transposed copy

  def expert(e, carry):
    dx, dw = carry
    we = w[e]

    def body(j, n, cr):
      dx, dwe = cr
      dyj = _rows(dy, j, n, block)
      dxj = jax.lax.dot_general(dyj, we, contract_out).astype(dx.dtype)
      dx = jax.lax.dynamic_update_slice_in_dim(dx, dxj, j * block, 0)
      return dx, dwe + jax.lax.dot_general(_rows(x, j, n, block), dyj,
                                           (((0,), (0,)), ((), ()))).astype(dwe.dtype)
    cr = (dx, jnp.zeros(w.shape[1:], w.dtype))   # expert e's weight gradient [K, M]
    dx, dwe = _expert_runs(first[e], count[e], chunk, body, cr)
    return dx, jax.lax.dynamic_update_index_in_dim(dw, dwe, e, 0)

  dx, dw = jax.lax.fori_loop(0, w.shape[0], expert, (jnp.zeros_like(x), jnp.zeros_like(w)))
  return dx, dw, None, None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


@jax.custom_vjp
def take_rows(a, index, inverse):
  """a [N, H] rows at index [R] (index N or more: a zero row) -> [R, H].

  `inverse` [N, k] lists, for each row n of `a`, the positions r with index[r] == n (an entry
  >= R where there are fewer): the backward is then the gather-and-sum grad[inverse].sum(1)
  instead of autodiff's scatter-add, which XLA:CPU runs serially."""
  return jnp.take(a, index, axis=0, mode='fill', fill_value=0)


def _take_rows_fwd(a, index, inverse):
  return take_rows(a, index, inverse), inverse


def _take_rows_bwd(inverse, g):
  return jnp.take(g, inverse, axis=0, mode='fill', fill_value=0).sum(1), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def dropless(x, experts, weights, gate, up, down, act: str, impl: str = 'auto',
             block: int = BLOCK):
  """Every assignment computed. x [N, H]; experts/weights [N, k] (expert id E = none);
  gate, up [E, H, I]; down [E, I, H]. Returns [N, H] in x.dtype.

  impl 'ragged_dot': the assignments sorted by expert, `jax.lax.ragged_dot` with group sizes.
  impl 'blocks': each expert's assignments start at a block boundary of a [nb * block, H]
  buffer (nb = static bound N*k/block + E); `grouped_matmul` loops over experts and multiplies
  their blocks (CHUNK at a time) by the expert's weights, skipping the unused tail blocks; the
  row permutations in and out are gathers both ways (`take_rows`). XLA:CPU lowers ragged_dot
  to ~E dense matmuls over all rows; this costs the real rows plus at most E blocks of padding
  (BENCHMARKS.md).
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
  if impl == 'ragged_dot':
    x_ext = jnp.concatenate([x, jnp.zeros((1, h), x.dtype)])      # row N: zeros
    xs = x_ext[jnp.where(flat[order] < e, tok[order], n)]          # [A, H] sorted by expert
    hid = fn(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
    ys = jax.lax.ragged_dot(hid, down, sizes)
    position = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    y = ys[position]                                               # [A, H] token-major
  elif impl == 'blocks':
    nb = -(-n * k // block) + e                                    # static bound on blocks
    blocks_per = -(-sizes // block)                                # [E]
    first_block = jnp.cumsum(blocks_per) - blocks_per
    rows = nb * block
    dest = jnp.where(flat < e, first_block[jnp.minimum(flat, e - 1)] * block + rank, rows)
    src = jnp.full((rows + 1,), n, jnp.int32).at[dest].set(tok)[:-1]   # [R] token of each row
    owner = jnp.full((rows + 1,), n * k, jnp.int32).at[dest].set(
        jnp.arange(n * k, dtype=jnp.int32))[:-1]                    # [R] assignment of each row
    xb = take_rows(x, src, dest.reshape(n, k))                     # [R, H]
    gmm = lambda a, w: grouped_matmul(a, w, first_block, blocks_per, block, CHUNK)
    yb = gmm(fn(gmm(xb, gate)) * gmm(xb, up), down)                # [R, H]
    y = take_rows(yb, dest, owner[:, None])                        # [A, H] token-major
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
