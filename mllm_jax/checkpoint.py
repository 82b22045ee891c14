"""Orbax checkpoints of the train state, the data iterators' state and where the run is.

A checkpoint is saved under the run's global step (steps summed over stages) with three items:
`state` (params, optimizer state, stage-local step; restored straight into the target
shardings), `meta` (stage name and index, stage-local step, whether the stage finished, the
config as JSON) and `data` (one JSON file per process: that process's training-iterator state
after the last batch it consumed, so a resumed run continues with exactly the next batch).

Orbax writes a checkpoint into a temporary directory and renames it when every item of every
process is written, so a save interrupted by kill -9, a full disk or a dead host is never
picked up as the latest checkpoint; the previous checkpoints are untouched until the new one is
complete. A save that fails raises `CheckpointError` naming the directory and the OS error, and
a state with non-finite parameters or optimizer state is refused before anything is written.

With `async_save` (config.train.async_checkpoint), `save` returns once the state is copied to
host memory and orbax writes it in background threads while training goes on; the train step
may then donate the device buffers. A failed background write raises its `CheckpointError` at
the next `save`, `wait` or `close` (the loop closes the checkpointer before it exits, also on
SIGTERM), so no failure goes unreported and no run ends before its last save is on disk.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
  """A checkpoint could not be written (disk full, unwritable directory, non-finite state)."""


@dataclasses.dataclass
class RunPosition:
  stage: str
  stage_index: int
  stage_step: int       # optimizer steps taken in this stage
  stage_done: bool
  global_step: int
  # the stage's running totals that metrics report (e.g. steps skipped as non-finite), so that
  # a resumed run continues them instead of restarting at 0
  counters: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# The `data` item: one JSON file per process, inside orbax's atomic save
# ----------------------------------------------------------------------------------------------
class DataStateHandler(ocp.AsyncCheckpointHandler):
  """Writes this process's data-iterator state (a JSON-serialisable dict) as
  `process_<i>-of-<n>.json`; restore returns this process's dict. When the process count
  changed, a state shared by every saved process (the built-in tasks) still restores; states
  that differ per process (sharded readers) need the same number of processes. The write is a
  commit future like orbax's own items', so an async save does it in the background."""

  async def _write(self, directory: epath.Path, state: dict, debug_delay: float):
    name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    (directory / name).write_text(json.dumps(state, sort_keys=True))
    if debug_delay:   # test hook: hold the checkpoint half-written (for kill -9 tests)
      time.sleep(debug_delay)

  async def async_save(self, directory: epath.Path, args: 'DataStateSave'):
    # the state is copied now: the iterator moves on while the write waits
    state = json.loads(json.dumps(args.state))
    return [ocp.future.CommitFutureAwaitingContractedSignals(
        self._write(directory, state, args.debug_delay), name='data_state_save')]

  def save(self, directory: epath.Path, args: 'DataStateSave'):
    for f in asyncio.run(self.async_save(directory, args)):
      f.result()

  def restore(self, directory: epath.Path, args: 'DataStateRestore' = None):
    mine = directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    if mine.exists():
      return json.loads(mine.read_text())
    saved = sorted(directory.glob('process_*-of-*.json'))
    states = [json.loads(p.read_text()) for p in saved]
    if states and all(s == states[0] for s in states):
      return states[0]
    raise CheckpointError(
        f'{directory}: data-iterator states were saved by {len(saved)} processes with '
        f'different states, and cannot be split over {jax.process_count()} processes; resume '
        'with the same number of processes')

  def metadata(self, directory):
    return None

  def structure(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: dict
  debug_delay: float = 0.0


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def all_finite(tree) -> bool:
  """Whether every float leaf of `tree` (sharded arrays welcome) is finite."""
  return bool(jax.device_get(_all_finite(tree)))


class Checkpointer:
  """Saves and restores a run's checkpoints (module doc). `async_save`: writes go on in the
  background after `save` returns (at most one in flight: the next `save` waits for it)."""

  def __init__(self, directory: str, max_to_keep: int = 2, debug_save_delay: float = 0.0,
               async_save: bool = False):
    self.directory = os.path.abspath(directory)
    self.debug_save_delay = debug_save_delay
    self.async_save = async_save
    self.pending: int | None = None   # global step of a background write not yet waited for
    try:
      os.makedirs(self.directory, exist_ok=True)
      self.manager = ocp.CheckpointManager(
          self.directory, item_names=('state', 'meta', 'data'),
          options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save))
    except OSError as e:
      raise CheckpointError(f'cannot use checkpoint directory {self.directory}: {e}') from e

  def latest(self) -> RunPosition | None:
    """Position of the newest complete checkpoint (half-written ones are invisible)."""
    step = self.manager.latest_step()
    if step is None:
      return None
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    return RunPosition(meta['stage'], meta['stage_index'], meta['stage_step'], meta['stage_done'],
                       step, meta.get('counters', {}))

  def save(self, pos: RunPosition, state: Any, config_json: str | None = None,
           data_state: dict | None = None):
    """Save (collective over processes); with `async_save` return once the state is on the
    host. Raises CheckpointError, leaving every earlier checkpoint intact, when `state` is not
    finite or the write (or a previous background write) fails."""
    self.wait()
    if not all_finite(state):
      raise CheckpointError(
          f'refusing to save step {pos.global_step} to {self.directory}: the parameters or '
          'optimizer state hold NaN/inf (the previous checkpoints are intact)')
    meta = dataclasses.asdict(pos)
    meta.pop('global_step')
    if config_json is not None:
      meta['config'] = json.loads(config_json)
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_state is not None:
      items['data'] = DataStateSave(data_state, self.debug_save_delay)
    try:
      self.manager.save(pos.global_step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:
      raise self._error(pos.global_step, e) from e
    self.pending = pos.global_step
    if not self.async_save:
      self.wait()

  def wait(self):
    """Block until a background write is on disk; its failure -> CheckpointError."""
    if self.pending is None:
      return
    step, self.pending = self.pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._error(step, e) from e

  def _error(self, step: int, e: BaseException) -> CheckpointError:
    # orbax re-raises OSErrors of its writer threads in several wrappers
    return CheckpointError(
        f'could not write the checkpoint of step {step} to {self.directory}: '
        f'{_os_error(e) or e} (the previous checkpoints are intact; free space or fix the '
        'directory, then rerun the same command to resume)')

  def restore_state(self, global_step: int, abstract_state: Any):
    """Restore into `abstract_state` (ShapeDtypeStructs carrying their target shardings)."""
    out = self.manager.restore(global_step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return out['state']

  def restore_data_state(self, global_step: int) -> dict | None:
    """This process's data-iterator state saved at `global_step`, or None for a checkpoint
    written before data states were saved."""
    path = epath.Path(self.directory) / str(global_step) / 'data'
    if not path.exists():
      return None
    return self.manager.restore(global_step, args=ocp.args.Composite(
        data=DataStateRestore()))['data']

  def close(self):
    """Waits for a background write (raising its failure), then releases orbax's threads."""
    try:
      self.wait()
    finally:
      self.manager.close()


def _os_error(e: BaseException | None) -> OSError | None:
  """The OSError behind `e` (orbax wraps writer-thread errors), if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None
