"""Jitted, sharded train and eval steps: `step(state, batch) -> (state, metrics)`.

The state is created already sharded (jitted init with out_shardings derived from the logical
axis names), and the train step donates it. A batch for the train step has a leading gradient
accumulation axis: every leaf is [accum, micro_batch, ...]; the loss is normalised by the
number of loss tokens in the whole (global) batch, so accumulation and sharding don't change it.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax import sharding as shd
from mllm_jax.models import moe
from mllm_jax.train import losses
from mllm_jax.train.optim import merge_params, split_params, trainable_mask

MODEL_INPUTS = ('input_ids', 'pixel_values', 'attention_mask', 'positions', 'segment_ids',
                'qformer_input_ids', 'qformer_attention_mask', 'image_sizes')


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar, optimizer steps taken in this stage
  params: Any          # full parameter tree (trainable and frozen)
  opt_state: Any       # optimiser state of the trainable subtree only


def model_inputs(batch):
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def init_inputs(cfg):
  """Smallest inputs that create every parameter."""
  return dict(input_ids=jnp.zeros((1, 8), jnp.int32))


def _unbox(tree):
  return nn.meta.unbox(tree)


class StateFactory:
  """Abstract shapes, logical shardings and sharded creation of params and optimizer state."""

  def __init__(self, model: nn.Module, mesh, rules):
    self.model, self.mesh, self.rules = model, mesh, rules
    self.compiled: dict = {}   # jitted eval steps of this model (`compiled_eval_step`)
    self.boxed = jax.eval_shape(
        lambda: model.init(jax.random.key(0), **init_inputs(model.cfg))['params'])
    self.param_shardings = shd.shardings_from_boxed(self.boxed, mesh, rules)
    self.abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), _unbox(self.boxed),
        self.param_shardings)

  def compiled_eval_step(self, kind: str, make_step: Callable, batch) -> Callable:
    """The jitted eval step `make_step(model)` for batches laid out like `batch`, compiled
    once per factory, kind and batch layout (every evaluation of a run reuses it)."""
    key = (kind, tuple(sorted((k, v.ndim) for k, v in batch.items())))
    if key not in self.compiled:
      self.compiled[key] = jit_eval_step(make_step(self.model), self.param_shardings, self.mesh,
                                         {k: v.ndim for k, v in batch.items()})
    return self.compiled[key]

  def init_params(self, rng):
    """Parameters created directly in their sharded layout (no host ever holds them whole)."""
    # No logical-rules context here: out_shardings place every parameter, and flax's own
    # init-time constraints would ignore our divisibility fallback.
    init = lambda r: _unbox(self.model.init(r, **init_inputs(self.model.cfg))['params'])
    return jax.jit(init, out_shardings=self.param_shardings)(rng)

  def mask(self, pattern: str, key: str):
    return trainable_mask(_unbox(self.boxed), pattern, key)

  def opt_state_shardings(self, tx, mask):
    boxed_train, _ = split_params(self.boxed, mask)
    return shd.shardings_from_boxed(jax.eval_shape(tx.init, boxed_train), self.mesh, self.rules)

  def state_shardings(self, tx, mask):
    return TrainState(step=NamedSharding(self.mesh, P()), params=self.param_shardings,
                      opt_state=self.opt_state_shardings(tx, mask))

  @staticmethod
  def _fresh_state(params, tx, mask) -> TrainState:
    trainable, _ = split_params(params, mask)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable))

  def create_state(self, params, tx, mask) -> TrainState:
    """Fresh optimizer state (sharded like its parameters) for `params`."""
    return jax.jit(lambda p: self._fresh_state(p, tx, mask),
                   out_shardings=self.state_shardings(tx, mask))(params)

  def abstract_state(self, tx, mask) -> TrainState:
    """ShapeDtypeStructs with target shardings: the restore target for a checkpoint."""
    shardings = self.state_shardings(tx, mask)
    shapes = jax.eval_shape(lambda p: self._fresh_state(p, tx, mask), self.abstract_params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings)


def sequence_loss(model: nn.Module, params, batch, logits_chunk: int = 0, logits_width: int = 0):
  """Summed next-token loss of `batch` (dict(loss_sum, tokens, correct)); MoE models add the
  router terms of `moe.loss_terms` (moe_loss, moe/aux_loss, moe/z_loss, moe/dropped_fraction).

  `logits_width` > 0 projects to the vocabulary only at each row's first `logits_width` loss
  positions (`losses.compact_next_token_loss`; the caller makes sure no row has more);
  else `logits_chunk` > 0 only in slices of the loss positions
  (`losses.chunked_next_token_loss`); both 0 materialise the full [B, T, V] logits.
  """
  variables = {'params': params}
  if not (logits_width or logits_chunk):
    logits, stats = moe.apply_with_router_stats(model, variables, **model_inputs(batch))
    out = losses.next_token_loss(logits, batch['input_ids'], batch['loss_mask'])
    return {**out, **moe.loss_terms(model, stats)}
  hidden, stats = moe.apply_with_router_stats(model, variables, **model_inputs(batch),
                                              method='hidden_states')
  head = lambda h: model.apply(variables, h, method='logits')
  if logits_width:
    out = losses.compact_next_token_loss(hidden, head, batch['input_ids'], batch['loss_mask'],
                                         logits_width)
  else:
    out = losses.chunked_next_token_loss(hidden, head, batch['input_ids'], batch['loss_mask'],
                                         logits_chunk)
  return {**out, **moe.loss_terms(model, stats)}


def accumulate_grads(loss_fn, trainable, batch):
  """Gradient accumulation over the leading micro-batch axis of `batch` (leaves [accum, b, ...]).

  loss_fn(trainable, micro_batch) -> (loss, aux dict of sums). Returns (the summed gradients of
  the loss w.r.t. `trainable`, aux and 'loss' summed over micro-batches); one micro-batch runs
  without a scan."""
  def micro(grads, mb):
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable, mb)
    return jax.tree.map(jnp.add, grads, g), {**aux, 'loss': loss}

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  if jax.tree.leaves(batch)[0].shape[0] == 1:
    return micro(zeros, jax.tree.map(lambda x: x[0], batch))
  grads, out = jax.lax.scan(micro, zeros, batch)
  return grads, jax.tree.map(jnp.sum, out)


def guarded_update(state: TrainState, trainable, frozen, grads, loss, tx):
  """Apply the optimizer only when the loss and every gradient are finite; otherwise keep the
  parameters and optimizer state (its step count too) and report the step as skipped.
  -> (new state, metrics: grad_norm, nonfinite (1.0 = skipped))."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(trainable, opt_state):
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  # A cond, not a select between the old and the new values: only one branch runs, so a normal
  # step reads and writes the parameters and optimizer state once (BENCHMARKS.md: the select
  # pass cost 114 vs 74 ms for the bench model's 70M parameters).
  new_trainable, opt_state = jax.lax.cond(finite, update, lambda t, o: (t, o), trainable,
                                          state.opt_state)
  new = TrainState(step=state.step + 1, params=merge_params(new_trainable, frozen),
                   opt_state=opt_state)
  return new, dict(grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))


def optimizer_step(state: TrainState):
  """The updates the optimizer has applied (its `count`), which is where its learning-rate
  schedule is: behind `state.step` by the steps skipped as non-finite. `state.step` when the
  optimizer keeps no count."""
  counts = optax.tree_utils.tree_get_all_with_path(state.opt_state, 'count')
  return counts[0][1] if counts else state.step


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mask: dict,
                    schedule: Callable | None = None, logits_chunk: int = 0,
                    logits_width: int = 0):
  """Returns train_step(state, batch) -> (state, metrics); batch leaves are [accum, b, ...].

  A step whose loss or gradients are not finite leaves params and optimizer state unchanged
  and reports `nonfinite` = 1 (`guarded_update`).
  """

  def train_step(state: TrainState, batch):
    trainable, frozen = split_params(state.params, mask)
    n_tokens = jnp.maximum(batch['loss_mask'][:, :, 1:].sum(), 1.0)
    accum = batch['input_ids'].shape[0]

    def loss_fn(tp, mb):
      out = sequence_loss(model, merge_params(tp, frozen), mb, logits_chunk, logits_width)
      # MoE router losses: per micro-batch, averaged over the accumulation steps
      return out['loss_sum'] / n_tokens + out.get('moe_loss', 0.0) / accum, out

    grads, out = accumulate_grads(loss_fn, trainable, batch)
    loss = out['loss_sum'] / n_tokens
    new, metrics = guarded_update(state, trainable, frozen, grads, loss, tx)
    metrics.update(loss=loss, token_accuracy=out['correct'] / n_tokens, loss_tokens=out['tokens'])
    metrics.update({k: v / accum for k, v in out.items() if k.startswith('moe/')})
    if schedule is not None:   # the rate this step's update used
      metrics['lr'] = schedule(optimizer_step(state))
    return new, metrics

  return train_step


def make_eval_step(model: nn.Module):
  """eval_step(params, batch) -> summed counts (loss_sum, tokens, correct, answers, answers_right)."""

  def eval_step(params, batch):
    logits = model.apply({'params': params}, **model_inputs(batch))
    out = losses.next_token_loss(logits, batch['input_ids'], batch['loss_mask'])
    if 'turn_ids' in batch:
      out.update(losses.answer_accuracy(logits, batch['input_ids'], batch['turn_ids']))
    return out

  return eval_step


def jit_train_step(step_fn, state_shardings, mesh, batch_keys_ndim: dict):
  batch_sh = {k: NamedSharding(mesh, shd.batch_spec(mesh, nd, leading_accum=True))
              for k, nd in batch_keys_ndim.items()}
  replicated = NamedSharding(mesh, P())
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def jit_eval_step(eval_fn, param_shardings, mesh, batch_keys_ndim: dict):
  batch_sh = {k: NamedSharding(mesh, shd.batch_spec(mesh, nd)) for k, nd in batch_keys_ndim.items()}
  return jax.jit(eval_fn, in_shardings=(param_shardings, batch_sh),
                 out_shardings=NamedSharding(mesh, P()))
