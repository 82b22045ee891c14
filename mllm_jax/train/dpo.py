"""Direct preference optimisation: `dpo_loss` and the jitted DPO train step.

A preference batch holds chosen and rejected completions of the same prompts (keys
`chosen_{input_ids,attention_mask,loss_mask}`, `rejected_...`, `pixel_values`, for an
instruction-aware Q-Former (InstructBLIP) `qformer_input_ids` / `qformer_attention_mask`, and
optionally precomputed `ref_chosen_logps` / `ref_rejected_logps`); `loss_mask` marks the
completion tokens.
Chosen and rejected go through ONE forward, concatenated on the batch axis (images and the
Q-Former instruction repeated: both sides of a pair share them),
and log pi(y|x) is summed over completion tokens, as TRL does. With
h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]:

    sigmoid       -log s(b h)                         conservative  -(1-e) log s(b h) - e log s(-b h)
    hinge         max(0, 1 - b h)                     robust        [-(1-e) log s(b h) + e log s(-b h)] / (1-2e)
    ipo           (h' - 1/(2b))^2, h' from log-ratios divided by the completion lengths (TRL)

The total is `alpha * mean(dpo) + gamma * CE(chosen)` (Insight-V / LLaVA-NeXT's `dpo_alpha`,
`gamma`), normalised over the global batch so accumulation and sharding don't change it.
The reference is either frozen parameters evaluated in the step without gradients
(`reference='model'`), or log-probs precomputed in one pass and stored in the batch
(`reference='precomputed'`, `precompute_reference_logps`).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax import sharding as shd
from mllm_jax.models import moe
from mllm_jax.train.optim import merge_params, split_params
from mllm_jax.train.steps import TrainState, accumulate_grads, guarded_update, optimizer_step

LOSS_TYPES = ('sigmoid', 'hinge', 'ipo', 'robust', 'conservative')
SIDES = ('chosen', 'rejected')


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float = 0.1, loss_type: str = 'sigmoid', label_smoothing: float = 0.0,
             chosen_lengths=None, rejected_lengths=None):
  """Per-pair losses [B] and the implicit rewards beta * (log pi - log ref) of both sides."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f'dpo loss_type={loss_type!r}: expected one of {LOSS_TYPES}')
  chosen_ratio = chosen_logps - ref_chosen_logps
  rejected_ratio = rejected_logps - ref_rejected_logps
  if loss_type == 'ipo' and chosen_lengths is not None:
    chosen_ratio = chosen_ratio / jnp.maximum(chosen_lengths, 1)
    rejected_ratio = rejected_ratio / jnp.maximum(rejected_lengths, 1)
  h = chosen_ratio - rejected_ratio
  e = label_smoothing
  if loss_type == 'sigmoid':
    losses = -jax.nn.log_sigmoid(beta * h)
  elif loss_type == 'conservative':
    losses = -(1 - e) * jax.nn.log_sigmoid(beta * h) - e * jax.nn.log_sigmoid(-beta * h)
  elif loss_type == 'robust':
    losses = (-(1 - e) * jax.nn.log_sigmoid(beta * h) + e * jax.nn.log_sigmoid(-beta * h)) / (
        1 - 2 * e)
  elif loss_type == 'hinge':
    losses = jax.nn.relu(1 - beta * h)
  else:   # ipo
    losses = (h - 1 / (2 * beta)) ** 2
  return (losses, beta * (chosen_logps - ref_chosen_logps),
          beta * (rejected_logps - ref_rejected_logps))


SHARED = ('pixel_values', 'qformer_input_ids', 'qformer_attention_mask', 'image_sizes')   # per pair


def concat_sides(batch):
  """[prompt+chosen] x B then [prompt+rejected] x B, images (and the Q-Former instruction)
  repeated: model inputs [2B, ...]."""
  cat = lambda k: jnp.concatenate([batch[f'chosen_{k}'], batch[f'rejected_{k}']], 0)
  out = dict(input_ids=cat('input_ids'), attention_mask=cat('attention_mask'),
             loss_mask=cat('loss_mask'))
  for k in SHARED:
    if k in batch:
      out[k] = jnp.concatenate([batch[k]] * 2, 0)
  return out


def completion_logps(model, params, inputs, router_terms: bool = False):
  """Summed log-probs of the loss-masked tokens and their count, each [N] (fp32); with
  `router_terms`, also the MoE router loss terms (`moe.loss_terms`, {} when dense)."""
  kw = {k: inputs[k] for k in ('input_ids', 'attention_mask') + SHARED if k in inputs}
  logits, stats = moe.apply_with_router_stats(model, {'params': params}, **kw)
  logits = logits[:, :-1].astype(jnp.float32)
  targets, mask = inputs['input_ids'][:, 1:], inputs['loss_mask'][:, 1:].astype(jnp.float32)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
  if router_terms:
    return (logp * mask).sum(-1), mask.sum(-1), moe.loss_terms(model, stats)
  return (logp * mask).sum(-1), mask.sum(-1)


def _split(x):
  return x[:x.shape[0] // 2], x[x.shape[0] // 2:]


def make_dpo_train_step(model: nn.Module, tx: optax.GradientTransformation, mask: dict, *,
                        beta: float = 0.1, loss_type: str = 'sigmoid',
                        label_smoothing: float = 0.0, alpha: float = 1.0, gamma: float = 0.0,
                        reference: str = 'model', schedule: Callable | None = None):
  """step(state, batch, ref_params) -> (state, metrics); batch leaves are [accum, b, ...].

  Non-finite loss or gradients skip the update (`steps.guarded_update`, metric `nonfinite`).

  `reference='model'`: ref_params are evaluated in the step (no gradients);
  `'precomputed'`: the batch carries ref_chosen_logps / ref_rejected_logps, ref_params is None.
  """
  if reference not in ('model', 'precomputed'):
    raise ValueError(f"dpo reference={reference!r}: expected 'model' or 'precomputed'")

  def step(state: TrainState, batch, ref_params=None):
    trainable, frozen = split_params(state.params, mask)
    n_pairs = batch['chosen_input_ids'].shape[0] * batch['chosen_input_ids'].shape[1]
    n_sft = jnp.maximum(batch['chosen_loss_mask'][:, :, 1:].sum(), 1.0)
    accum = batch['chosen_input_ids'].shape[0]

    def loss_fn(tp, mb):
      inputs = concat_sides(mb)
      if reference == 'model':
        ref_logps, _ = completion_logps(model, jax.lax.stop_gradient(ref_params), inputs)
        ref_c, ref_r = _split(ref_logps)
      else:
        ref_c, ref_r = mb['ref_chosen_logps'], mb['ref_rejected_logps']

      logps, counts, router = completion_logps(model, merge_params(tp, frozen), inputs,
                                               router_terms=True)
      (pc, pr), (nc, nr) = _split(logps), _split(counts)
      losses, rc, rr = dpo_loss(pc, pr, ref_c, ref_r, beta=beta, loss_type=loss_type,
                                label_smoothing=label_smoothing, chosen_lengths=nc,
                                rejected_lengths=nr)
      total = alpha * losses.sum() / n_pairs + gamma * (-pc.sum()) / n_sft
      total = total + router.pop('moe_loss', 0.0) / accum   # MoE load balancing / z-loss
      return total, dict(dpo_loss=losses.sum(), sft_loss=-pc.sum(), chosen_rewards=rc.sum(),
                         rejected_rewards=rr.sum(), accuracies=(rc > rr).sum(),
                         margins=(rc - rr).sum(), chosen_logps=pc.sum(),
                         rejected_logps=pr.sum(), **router)

    grads, out = accumulate_grads(loss_fn, trainable, batch)
    new, metrics = guarded_update(state, trainable, frozen, grads, out['loss'], tx)
    metrics.update({'loss': out['loss'], 'dpo_loss': out['dpo_loss'] / n_pairs,
                    'sft_loss': out['sft_loss'] / n_sft,
                    'rewards/chosen': out['chosen_rewards'] / n_pairs,
                    'rewards/rejected': out['rejected_rewards'] / n_pairs,
                    'rewards/margins': out['margins'] / n_pairs,
                    'rewards/accuracies': out['accuracies'] / n_pairs,
                    'logps/chosen': out['chosen_logps'] / n_pairs,
                    'logps/rejected': out['rejected_logps'] / n_pairs})
    metrics.update({k: v / accum for k, v in out.items() if k.startswith('moe/')})
    if schedule is not None:
      metrics['lr'] = schedule(optimizer_step(state))
    return new, metrics

  return step


def jit_dpo_step(step_fn, state_shardings, param_shardings, mesh, batch_ndim: dict):
  """jit with shardings; `param_shardings` places the reference (None when precomputed)."""
  batch_sh = {k: NamedSharding(mesh, shd.batch_spec(mesh, nd, leading_accum=True))
              for k, nd in batch_ndim.items()}
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sh, param_shardings),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


def precompute_reference_logps(model, ref_params, batch):
  """One pass of the reference over a preference batch [b, ...] -> the batch with
  ref_chosen_logps / ref_rejected_logps [b] (jit it; used with reference='precomputed')."""
  logps, _ = completion_logps(model, ref_params, concat_sides(batch))
  c, r = _split(logps)
  return dict(batch, ref_chosen_logps=c, ref_rejected_logps=r)


def preference_eval_step(model):
  """(params, batch [b, ...]) -> sums: pairs, ranked (log pi(chosen) > log pi(rejected))."""

  def fn(params, batch):
    logps, _ = completion_logps(model, params, concat_sides(batch))
    c, r = _split(logps)
    return dict(pairs=jnp.float32(c.shape[0]), ranked=(c > r).sum().astype(jnp.float32))

  return fn
