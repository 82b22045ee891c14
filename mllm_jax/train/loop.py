"""The training loop: stages in order (e.g. pretrain then SFT), each data -> jitted steps ->
metrics -> checkpoints -> held-out evaluation. Rerunning on a workdir resumes from its latest
checkpoint, mid-stage or at a stage boundary, and sees exactly the batches it would have seen.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from typing import Iterator

import flax.linen as nn
import jax
import numpy as np
import tqdm

from mllm_jax import distributed
from mllm_jax import sharding as shd
from mllm_jax.checkpoint import Checkpointer, RunPosition
from mllm_jax.data import images as image_utils
from mllm_jax.data import preference, synthetic, tokenizer as tok_lib
from mllm_jax.models import MLLM, MLLMConfig
from mllm_jax.train import losses, optim, steps
from mllm_jax.train.metrics import MetricsWriter


# ----------------------------------------------------------------------------------------------
# Config -> model, tokenizer, data
# ----------------------------------------------------------------------------------------------
def load_tokenizer(config, workdir):
  path = config.data.tokenizer
  if not path:
    return tok_lib.get_or_build_demo_tokenizer(os.path.join(workdir, 'tokenizer'))
  return tok_lib.load_tokenizer(path)


def load_qformer_tokenizer(config, tokenizer):
  """The tokenizer of an instruction-aware Q-Former's input (None for other connectors):
  `config.data.qformer_tokenizer` (e.g. a BERT tokenizer dir), '' = the LLM tokenizer."""
  c = config.model.connector
  if c.kind != 'qformer' or not c.qformer.instruction:
    return None
  path = config.data.qformer_tokenizer
  if not path:
    return tokenizer
  import transformers
  return transformers.AutoTokenizer.from_pretrained(path)


def model_config(config, tokenizer=None) -> MLLMConfig:
  """`config.model` as an MLLMConfig, filling tokenizer-derived values (vocab size, image id)."""
  d = config.model.to_dict()
  if d['vision']['kind'] == 'none':
    d['vision'] = None
  q = d['connector'].get('qformer', {})
  if d['connector']['kind'] == 'qformer' and q.get('instruction') and q.get('vocab_size') == 0:
    qtok = load_qformer_tokenizer(config, tokenizer) if tokenizer is not None else None
    if qtok is None:
      raise ValueError('config.model.connector.qformer.vocab_size=0 needs a tokenizer to size '
                       'the Q-Former vocabulary')
    q['vocab_size'] = -(-len(qtok) // 8) * 8
  if d['llm']['vocab_size'] == 0:
    if tokenizer is None:
      raise ValueError('config.model.llm.vocab_size=0 needs a tokenizer to size the vocabulary')
    d['llm']['vocab_size'] = -(-len(tokenizer) // 8) * 8
  if d['image_token_id'] == -1 and d['vision'] is not None:
    if tokenizer is None:
      raise ValueError('config.model.image_token_id=-1 needs a tokenizer with an <image> token')
    d['image_token_id'] = tokenizer.convert_tokens_to_ids('<image>')
  d['image_grid_pinpoints'] = parse_pinpoints(d.get('image_grid_pinpoints', ''))
  return MLLMConfig.from_dict(d)


def parse_pinpoints(value) -> tuple[tuple[int, int], ...]:
  """config.model.image_grid_pinpoints 'HxW,HxW' (or pairs) -> ((H, W), ...)."""
  if not isinstance(value, str):
    return tuple((int(h), int(w)) for h, w in value)
  try:
    out = tuple(tuple(int(v) for v in p.lower().split('x')) for p in value.split(',')
                if p.strip())
    if any(len(p) != 2 for p in out):
      raise ValueError
    return out
  except ValueError:
    raise ValueError(f'config.model.image_grid_pinpoints={value!r}: expected HxW pairs, e.g. '
                     "'336x672,672x336,672x672'") from None


def make_task(config, tokenizer, mcfg: MLLMConfig, task: str, split: str):
  if config.data.source in ('llava_json', 'tfds'):   # files: mllm_jax.data.pipeline
    from mllm_jax.data import pipeline
    return pipeline.task_from_config(config, tokenizer, mcfg, task, split)
  if config.data.source != 'synthetic':
    raise ValueError(f'config.data.source={config.data.source!r}: expected one of '
                     "'synthetic', 'llava_json', 'tfds'")
  v = mcfg.vision
  if config.data.image_norm not in image_utils.NORMALIZATION:
    raise ValueError(f'config.data.image_norm={config.data.image_norm!r}: expected one of '
                     f'{sorted(image_utils.NORMALIZATION)}')
  mean, std = image_utils.NORMALIZATION[config.data.image_norm]
  if task == 'dpo':
    return preference.PreferenceTask(
        tokenizer, split=split, seed=config.seed, image_size=v.image_size,
        num_image_tokens=mcfg.image_tokens, max_len=config.data.max_len, image_mean=mean,
        image_std=std, qformer_tokenizer=load_qformer_tokenizer(config, tokenizer),
        qformer_max_len=config.data.qformer_max_len)
  return synthetic.SyntheticTask(
      tokenizer, kind=task, split=split, seed=config.seed, image_size=v.image_size,
      num_image_tokens=mcfg.image_tokens, max_len=config.data.max_len,
      max_images=config.data.max_images, image_mean=mean, image_std=std,
      qformer_tokenizer=load_qformer_tokenizer(config, tokenizer),
      qformer_max_len=config.data.qformer_max_len)


def prefetch(it: Iterator, size: int) -> Iterator:
  """(batch, iterator state after it) pairs, produced in a background thread so the next batch
  is ready when a step ends. The state travels with its batch: a checkpoint records the state
  after the last batch the loop consumed, not after the ones waiting in the queue."""
  def with_state():
    for item in it:
      yield item, json.loads(json.dumps(it.get_state()))   # a snapshot, JSON-checked
  if size <= 0:
    yield from with_state()
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def worker():
    try:
      for item in with_state():
        if stop.is_set():
          return
        q.put(item)
    except BaseException as e:   # surfaced in the consumer
      q.put(e)
  threading.Thread(target=worker, daemon=True).start()
  try:
    while True:
      item = q.get()
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


def train_batches(task, start_step: int, batch_size: int, accum: int):
  """Single-process batches by sample index (`task.batch`), as [accum, micro, ...] arrays: batch
  of step s = samples [s * batch_size, (s + 1) * batch_size). Used by the reward-model and
  iterative-DPO entry points, whose resume position is their step."""
  step = start_step
  while True:
    b = task.batch(step * batch_size, batch_size)
    yield {k: v.reshape((accum, batch_size // accum) + v.shape[1:]) for k, v in b.items()
           if k != 'num_images'}
    step += 1


def train_iterator(task, sc, stage: str, mesh, start: int, data_state: dict | None):
  """The stage's training iterator for this process's rows, positioned after step `start`."""
  micro = sc.batch_size // sc.grad_accum
  block, blocks = distributed.local_rows(mesh, micro)
  it = task.train_iterator(sc.batch_size, sc.grad_accum, block, blocks)
  if jax.process_count() > 1:
    rows = sc.batch_size // blocks
    print(f'Process {jax.process_index()}/{jax.process_count()} of stage {stage!r} makes rows '
          f'[{block * rows}, {(block + 1) * rows}) of each global batch of {sc.batch_size}')
  if data_state is not None:
    it.set_state(data_state)
  elif start:   # a checkpoint from before data states were saved: numbered samples only
    if not isinstance(it, synthetic.IndexIterator):
      raise ValueError(f'the checkpoint of stage {stage!r} at step {start} has no data-iterator '
                       'state, so the data cannot be resumed exactly; use a fresh --workdir')
    it.set_state({'next_index': start * sc.batch_size})
  return it


# ----------------------------------------------------------------------------------------------
# Faults: stop signals, non-finite steps
# ----------------------------------------------------------------------------------------------
class Interrupted(Exception):
  """SIGTERM / SIGINT arrived; a checkpoint (with the data state) was saved at `step`."""

  def __init__(self, signum: int, step: int, directory: str):
    self.signum, self.step = signum, step
    self.exit_code = 128 + signum   # the shell's convention for "ended by this signal"
    super().__init__(f'{signal.Signals(signum).name} received: saved the checkpoint of step '
                     f'{step} in {directory}; rerun the same command to resume')


def checkpoint_or_stop(ckpt, stop: 'StopSignals', save, done: int, total: int, start: int,
                       budget: int | None, every: int) -> bool:
  """After step `done` of `total` in an entry point's own loop (reward model, BLIP-2 stage 1;
  `run_stage` does the same inline): `save()` every `every` steps, on SIGTERM / SIGINT (then
  raise `Interrupted`) and when the run's `budget` of steps since `start` is spent (then
  return True: the caller stops and a rerun resumes). Every process must call it every step
  (the stop request is agreed collectively)."""
  if done >= total:
    return False
  interrupt = stop.requested()
  out_of_budget = budget is not None and done - start >= budget
  if interrupt or out_of_budget or (every and done % every == 0):
    save()
  if interrupt:
    raise Interrupted(stop.signum or signal.SIGTERM, done, ckpt.directory)
  if out_of_budget:
    print(f'Stopped after config.train.max_steps_per_run={budget} steps; rerun the same '
          f'command to continue from {ckpt.directory}')
  return out_of_budget


class NonFiniteError(FloatingPointError):
  """Training stopped on non-finite losses or gradients (config.train.nonfinite)."""


class StopSignals:
  """Turns SIGTERM / SIGINT into a request that the loop honours at the end of the current step
  (save, then `Interrupted`). A second signal gets the default action (kill), and a save it
  cuts short is never restored."""
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum, self._old = None, {}

  def _handle(self, signum, frame):
    self.signum = signum
    print(f'{signal.Signals(signum).name} received: saving a checkpoint after this step',
          flush=True)
    for s in self.SIGNALS:
      signal.signal(s, signal.SIG_DFL)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)

  def requested(self) -> bool:
    """Whether any process received a signal (a collective in multi-process runs)."""
    return distributed.any_process(self.signum is not None)


class NonFiniteMonitor:
  """Counts steps skipped for a non-finite loss or gradient (the step left the state as it was)
  and raises `NonFiniteError` as config.train.nonfinite / max_consecutive_nonfinite say."""

  def __init__(self, config, stage: str, ckpt_dir: str):
    self.policy, self.limit = config.train.nonfinite, config.train.max_consecutive_nonfinite
    if self.policy not in ('skip', 'stop'):
      raise ValueError(f"config.train.nonfinite={self.policy!r}: expected 'skip' or 'stop'")
    self.stage, self.ckpt_dir = stage, ckpt_dir
    self.consecutive, self.since_log, self.total = 0, 0, 0

  def check(self, step: int, metrics: dict):
    """`step`: global step of `metrics` (device arrays of the step)."""
    if not float(metrics['nonfinite']):
      self.consecutive = 0
      return
    self.consecutive += 1
    self.since_log += 1
    self.total += 1
    loss = float(metrics['loss'])
    print(f'stage {self.stage!r} step {step}: non-finite loss ({loss}) or gradients '
          f'(norm {float(metrics["grad_norm"])}); update skipped', flush=True)
    if self.policy == 'stop' or (self.limit and self.consecutive >= self.limit):
      why = ('config.train.nonfinite=stop' if self.policy == 'stop' else
             f'{self.consecutive} in a row, config.train.max_consecutive_nonfinite={self.limit}')
      raise NonFiniteError(
          f'stage {self.stage!r}: non-finite loss or gradients at step {step} ({why}). The '
          f'parameters were not updated by the bad steps and no checkpoint holds NaN/inf; the '
          f'last checkpoint in {self.ckpt_dir} resumes. Lower the learning rate, check the data '
          'of these steps, or raise the limit')


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def evaluate_preferences(config, factory, params, task, mesh, rules) -> dict:
  """Held-out pairs ranked right by the policy (log pi(chosen) > log pi(rejected)), plus the
  VQA metrics of the same model (DPO must not cost answer accuracy)."""
  from mllm_jax.train import dpo
  n, bs = config.train.eval_examples, config.train.eval_batch_size
  shd.check_batch_divisible(bs, mesh, 'config.train.eval_batch_size')
  totals = {'pairs': 0.0, 'ranked': 0.0}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for start in range(0, n, bs):
      b = task.batch(start, bs)
      eval_fn = factory.compiled_eval_step('preference', dpo.preference_eval_step, b)
      out = jax.device_get(eval_fn(params, distributed.replicated_batch(b, mesh)))
      for k in totals:
        totals[k] += float(out[k])
  accuracy = {'eval/preference_accuracy': totals['ranked'] / max(totals['pairs'], 1)}
  if not isinstance(task, preference.PreferenceTask):   # preference records from files
    return accuracy
  vqa = synthetic.SyntheticTask(task.tokenizer, kind='vqa', split=task.split, seed=task.seed,
                                image_size=task.image_size, num_image_tokens=task.num_image_tokens,
                                max_len=task.max_len, max_images=config.data.max_images,
                                image_mean=task.image_mean, image_std=task.image_std,
                                qformer_tokenizer=load_qformer_tokenizer(config, task.tokenizer),
                                qformer_max_len=config.data.qformer_max_len)
  return {**evaluate(config, factory, params, vqa, mesh, rules), **accuracy}


def skip_counts(task) -> dict:
  """{reason: samples dropped so far}: bad records under data.bad_input='skip' (file data),
  pairs whose chosen equals their rejected (built-in preference pairs)."""
  skipped = getattr(task, 'skipped', None)
  if callable(skipped):
    return skipped()
  return {'identical_pairs': skipped} if isinstance(skipped, int) else {}


def _is_preference(task) -> bool:
  return (isinstance(task, preference.PreferenceTask) or
          getattr(getattr(task, 'cfg', None), 'kind', None) == 'preference')


def evaluate(config, factory, params, task, mesh, rules) -> dict:
  if _is_preference(task):
    return evaluate_preferences(config, factory, params, task, mesh, rules)
  n, bs = config.train.eval_examples, config.train.eval_batch_size
  shd.check_batch_divisible(bs, mesh, 'config.train.eval_batch_size')
  totals: dict = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for start in range(0, n, bs):
      b = {k: v for k, v in task.batch(start, bs).items() if k != 'num_images'}
      eval_fn = factory.compiled_eval_step('sequence', steps.make_eval_step, b)
      out = jax.device_get(eval_fn(params, distributed.replicated_batch(b, mesh)))
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(v)
  res = {'eval/loss': totals['loss_sum'] / max(totals['tokens'], 1),
         'eval/token_accuracy': totals['correct'] / max(totals['tokens'], 1)}
  if 'answers' in totals:
    res['eval/accuracy'] = totals['answers_right'] / max(totals['answers'], 1)
    res['eval/answers'] = totals['answers']
  return res


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------
def stage_names(config) -> list[str]:
  names = [s.strip() for s in config.train.stages.split(',') if s.strip()]
  if not names:
    raise ValueError('config.train.stages is empty; e.g. --config.train.stages=pretrain,sft')
  for n in names:
    if n not in config or 'trainable' not in config[n]:
      raise ValueError(f'config.train.stages names {n!r}, but config.{n} is not a stage config '
                       '(see mllm_jax.config.stage_config)')
  return names


def logits_width(config) -> int:
  """`config.train.logits_width`, checked: 0 (off) or the loss positions per row that the SFT /
  pretrain step projects to the vocabulary (`losses.compact_next_token_loss`)."""
  w = config.train.logits_width
  if isinstance(w, bool) or not isinstance(w, int) or w < 0:
    raise ValueError(f'config.train.logits_width={w!r}: expected an integer >= 0 (0 = off; '
                     'else the most loss tokens a row of the data has)')
  return w


def stage_setup(config, factory, name):
  sc = config[name]
  if sc.batch_size % sc.grad_accum:
    raise ValueError(f'config.{name}.batch_size={sc.batch_size} is not divisible by '
                     f'config.{name}.grad_accum={sc.grad_accum}')
  shd.check_batch_divisible(sc.batch_size // sc.grad_accum, factory.mesh,
                            f'config.{name}.batch_size / config.{name}.grad_accum')
  tx = optim.make_optimizer(sc.optim, sc.steps)
  mask = factory.mask(sc.trainable, f'config.{name}.trainable')
  return sc, tx, mask


def run(config, workdir: str) -> dict:
  """Run every stage of `config.train.stages`; returns the final held-out metrics (None when
  `config.train.max_steps_per_run` stopped the run early). SIGTERM / SIGINT save a checkpoint
  and raise `Interrupted`; non-finite steps follow `config.train.nonfinite`."""
  distributed.initialize(config.distributed)   # before anything touches the devices
  os.makedirs(workdir, exist_ok=True)
  mesh = shd.make_mesh(config.mesh.to_dict())
  rules = shd.logical_rules(config.sharding.rules)
  logits_width(config)   # a bad value fails before any model is built
  if not distributed.is_primary():
    distributed.sync('tokenizer')   # process 0 builds the demo tokenizer, the others read it
  tokenizer = load_tokenizer(config, workdir)
  if distributed.is_primary():
    distributed.sync('tokenizer')
  mcfg = model_config(config, tokenizer)
  model = MLLM(mcfg)
  factory = steps.StateFactory(model, mesh, rules)
  names = stage_names(config)
  offsets = np.cumsum([0] + [config[n].steps for n in names]).tolist()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(factory.abstract_params))
  procs = f'; {jax.process_count()} processes' if jax.process_count() > 1 else ''
  print(f'Model: {n_params / 1e6:.2f}M parameters; mesh {dict(mesh.shape)}{procs}; '
        f'stages {names}')

  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), config.train.keep_checkpoints,
                      debug_save_delay=config.train.debug_save_delay,
                      async_save=config.train.get('async_checkpoint', True))
  pos = ckpt.latest()
  writer = MetricsWriter(workdir, resume_step=pos.global_step if pos else None,
                         enabled=distributed.is_primary())
  state, params, first, data_state, counters = None, None, 0, None, None
  if pos is None:   # random init, then any pretrained weights config.model names
    from mllm_jax.hf import pretrained
    for w in pretrained.image_norm_warnings(config):
      print(f'WARNING: {w}')
    params = pretrained.init_params(factory, jax.random.key(config.seed))
  else:
    if pos.stage_index >= len(names) or names[pos.stage_index] != pos.stage:
      raise ValueError(f'{ckpt.directory} holds a checkpoint of stage {pos.stage!r} (index '
                       f'{pos.stage_index}), but config.train.stages={config.train.stages!r}; '
                       'use the same stages, or a fresh --workdir')
    _, tx, mask = stage_setup(config, factory, pos.stage)
    state = ckpt.restore_state(pos.global_step, factory.abstract_state(tx, mask))
    print(f'Resumed from {ckpt.directory} at step {pos.global_step} '
          f'(stage {pos.stage}, step {pos.stage_step}{", done" if pos.stage_done else ""})')
    first = pos.stage_index
    if pos.stage_done:
      params, state, first = state.params, None, pos.stage_index + 1
    else:
      data_state, counters = ckpt.restore_data_state(pos.global_step), pos.counters

  results: dict = {}
  budget = [config.train.max_steps_per_run or None]   # steps this process may still take
  try:
    with StopSignals() as stop:
      for i in range(first, len(names)):
        state, results = run_stage(config, factory, tokenizer, mcfg, names, i, offsets[i],
                                   state, params, ckpt, writer, mesh, rules, budget, stop,
                                   data_state, counters)
        data_state = counters = None
        if results is None or (budget[0] == 0 and i + 1 < len(names)):
          print(f'Stopped after config.train.max_steps_per_run={config.train.max_steps_per_run}'
                f' steps; rerun the same command to continue from {ckpt.directory}')
          return None
        if i + 1 < len(names) and stop.requested():   # the finished stage is saved already
          raise Interrupted(stop.signum or signal.SIGTERM, offsets[i + 1], ckpt.directory)
        params, state = state.params, None
    if first == len(names):   # every stage already finished: report the final model again
      sc = config[names[-1]]
      results = evaluate(config, factory, params,
                         make_task(config, tokenizer, mcfg, sc.task, 'eval'), mesh, rules)
      print(f'All stages are finished in {workdir}; held-out: ' +
            ', '.join(f'{k} {v:.4f}' for k, v in results.items()))
  finally:
    writer.close()
    ckpt.close()
  return results


def dpo_reference(workdir, name, factory, params, start):
  """The frozen reference of DPO stage `name`: the policy at the stage's first step, saved in
  WORKDIR/reference_<name> so that a resumed run uses the same one."""
  from mllm_jax.hf import pretrained
  path = os.path.join(workdir, f'reference_{name}')
  # orbax renames `params` into place when complete: without it the save was cut short
  if (os.path.exists(os.path.join(path, pretrained.MODEL_JSON)) and
      os.path.isdir(os.path.join(path, 'params'))):
    return pretrained.restore_params(path, factory.abstract_params)
  if start:
    raise FileNotFoundError(f'{path}: the reference of DPO stage {name!r} is missing, so step '
                            f'{start} cannot resume with the same reference')
  pretrained.save_params(path, factory.model, params)
  return pretrained.restore_params(path, factory.abstract_params)   # a copy the step won't donate


def run_stage(config, factory, tokenizer, mcfg, names, index, offset, state, params, ckpt,
              writer, mesh, rules, budget, stop: StopSignals | None = None,
              data_state: dict | None = None, counters: dict | None = None):
  """Train stage `names[index]` to its end -> (state, held-out metrics), or stop early when
  `budget[0]` steps have been taken (checkpoint saved) -> (state, None). A stop signal saves
  a checkpoint and raises `Interrupted`."""
  name = names[index]
  sc, tx, mask = stage_setup(config, factory, name)
  if state is None:
    state = factory.create_state(params, tx, mask)
  train_task = make_task(config, tokenizer, mcfg, sc.task, 'train')
  eval_task = make_task(config, tokenizer, mcfg, sc.task, 'eval')
  schedule = optim.learning_rate_schedule(sc.optim, sc.steps)
  start = int(jax.device_get(state.step))
  nan_steps = set(_int_list(config.train.debug_nan_steps, 'config.train.debug_nan_steps'))
  ref = None
  width = 0   # config.train.logits_width of this stage's step (0: every position)
  if sc.task == 'dpo':
    from mllm_jax.train import dpo
    step_fn = dpo.make_dpo_train_step(factory.model, tx, mask, schedule=schedule,
                                      **sc.preference.to_dict())
    ref = dpo_reference(os.path.dirname(ckpt.directory), name, factory, state.params, start)
  else:
    width = logits_width(config)
    step_fn = steps.make_train_step(factory.model, tx, mask, schedule,
                                    logits_chunk=config.train.logits_chunk, logits_width=width)
  # A batch with a row of more than `width` loss tokens would be cut short by the compact step:
  # it runs through this step (every loss position) instead, compiled when first needed.
  wide_fn = wide_jstep = None
  if width:
    wide_fn = steps.make_train_step(factory.model, tx, mask, schedule,
                                    logits_chunk=config.train.logits_chunk)
  counters = counters or {}   # the stage's totals at the checkpoint this run resumed from
  over_width = counters.get('over_logits_width', 0)   # batches that took the wide step
  micro = sc.batch_size // sc.grad_accum
  batches = prefetch(train_iterator(train_task, sc, name, mesh, start, data_state),
                     config.data.prefetch)
  config_json = config.to_json_best_effort()
  monitor = NonFiniteMonitor(config, name, ckpt.directory)
  monitor.total = counters.get('nonfinite_skipped', 0)
  consumed = data_state   # iterator state after the last batch a step consumed

  def save(stage_step, done):
    ckpt.save(RunPosition(name, index, stage_step, done, offset + stage_step,
                          dict(over_logits_width=over_width, nonfinite_skipped=monitor.total)),
              state, config_json, data_state=consumed)

  def run_eval(stage_step):
    res = evaluate(config, factory, state.params, eval_task, mesh, rules)
    writer.write(offset + stage_step, res)
    return res

  n_trainable = sum(int(np.prod(x.shape)) for x in
                    jax.tree.leaves(optim.split_params(factory.abstract_params, mask)[0]))
  print(f'Stage {name!r}: {sc.steps} steps of {sc.batch_size} {sc.task} samples, '
        f'{n_trainable / 1e6:.2f}M trainable parameters ({sc.trainable})')
  if ref is not None and start == 0:   # the preference accuracy DPO starts from
    res = run_eval(0)
    vqa = f", VQA accuracy {res['eval/accuracy']:.4f}" if 'eval/accuracy' in res else ''
    print(f"Stage {name!r} before training: preference accuracy "
          f"{res['eval/preference_accuracy']:.4f}{vqa}")
  jstep = None
  bar = tqdm.tqdm(total=sc.steps, initial=start, desc=name, dynamic_ncols=True,
                  disable=not (config.train.progress_bar and distributed.is_primary()))
  t0, tokens = time.time(), 0
  pending = None   # (global step, metrics) not yet checked for non-finite values
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for s in range(start, sc.steps):
      host, consumed = next(batches)
      if offset + s + 1 in nan_steps:   # test hook: a NaN that flows through the whole step
        host = {k: v * np.float32(np.nan) if k.endswith('loss_mask') else v
                for k, v in host.items()}
      ndim = {k: v.ndim - 1 for k, v in host.items()}
      if jstep is None and ref is not None:
        jstep = dpo.jit_dpo_step(step_fn, factory.state_shardings(tx, mask),
                                 factory.param_shardings, mesh, ndim)
      elif jstep is None:
        jstep = steps.jit_train_step(step_fn, factory.state_shardings(tx, mask), mesh, ndim)
      batch = distributed.global_batch(host, mesh, micro)
      row_tokens = losses.row_loss_tokens(host['loss_mask']) if width else 0
      # every process takes the same step (this process sees only its own rows)
      if width and distributed.any_process(row_tokens > width):
        over_width += 1
        if over_width == 1:
          seen = (f'a row with {row_tokens} loss tokens' if row_tokens > width else
                  'a row of another process with more')
          print(f'Stage {name!r} step {s + 1}: {seen} > config.train.logits_width={width}; '
                'such batches run the full-width step (metric train/over_logits_width)')
        if wide_jstep is None:
          wide_jstep = steps.jit_train_step(wide_fn, factory.state_shardings(tx, mask), mesh,
                                            ndim)
        state, metrics = wide_jstep(state, batch)   # donates and returns the one state
      elif ref is None:
        state, metrics = jstep(state, batch)
      else:
        state, metrics = jstep(state, batch, ref)
      tokens += sum(int(v.sum()) for k, v in host.items() if k.endswith('attention_mask'))
      done = s + 1
      # Checking a step's non-finite flag waits for it: check the previous step while this one
      # runs, and this one before anything is logged or saved.
      if pending is not None:
        monitor.check(*pending)
      pending = (offset + done, metrics)
      if done % config.train.log_every == 0 or done == sc.steps:
        monitor.check(*pending)
        pending = None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = time.time() - t0
        m['tokens_per_s'] = tokens / dt if dt > 0 else 0.0
        m['skipped_steps'], monitor.since_log = monitor.since_log, 0
        m.update({f'data/skipped_{k}': v for k, v in skip_counts(train_task).items()})
        if width:
          m['train/over_logits_width'] = over_width
        m['stage'] = name
        writer.write(offset + done, m)
        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
        t0, tokens = time.time(), 0
      bar.update(1)
      if sc.eval_every and done % sc.eval_every == 0 and done < sc.steps:
        run_eval(done)
      if budget[0] is not None:
        budget[0] -= 1
      interrupt = stop is not None and done < sc.steps and stop.requested()
      if done < sc.steps and (budget[0] == 0 or interrupt or (
          config.train.checkpoint_every and done % config.train.checkpoint_every == 0)):
        if pending is not None:
          monitor.check(*pending)
          pending = None
        save(done, False)
      if interrupt:
        bar.close()
        raise Interrupted(stop.signum or signal.SIGTERM, offset + done, ckpt.directory)
      if budget[0] == 0 and done < sc.steps:
        bar.close()
        return state, None
  bar.close()
  if monitor.total:
    print(f'Stage {name!r}: {monitor.total} steps skipped for non-finite loss or gradients')
  if over_width:
    print(f'Stage {name!r}: {over_width} batches had a row of more than '
          f'config.train.logits_width={width} loss tokens (run at full width)')
  results = run_eval(sc.steps)
  save(sc.steps, True)
  msg = ', '.join(f'{k} {v:.4f}' for k, v in results.items() if k != 'eval/answers')
  chance = ''
  if sc.task == 'vqa':
    chance = f" (a model blind to the image: ~{synthetic.chance_accuracy(seed=config.seed)['all']:.2f})"
  print(f'Stage {name!r} held-out: {msg}{chance}')
  skipped = skip_counts(train_task)
  if any(skipped.values()):
    print(f'Stage {name!r} skipped bad training samples (config.data.bad_input=skip): ' +
          ', '.join(f'{k} {v}' for k, v in sorted(skipped.items()) if v))
  return state, results


def _int_list(text: str, key: str) -> list[int]:
  try:
    return [int(x) for x in str(text).replace(' ', '').split(',') if x]
  except ValueError:
    raise ValueError(f'{key}={text!r}: expected comma-separated integers') from None
