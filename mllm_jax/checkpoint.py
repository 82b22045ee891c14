"""Orbax checkpoints of the train state plus a JSON record of where the run is.

A checkpoint is saved under the run's global step (steps summed over stages) with two items:
`state` (params, optimizer state, stage-local step; restored straight into the target
shardings) and `meta` (stage name and index, stage-local step, whether the stage finished, the
config as JSON). Orbax writes to a temporary directory and renames it when complete, so an
interrupted save is never picked up as the latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import orbax.checkpoint as ocp


@dataclasses.dataclass
class RunPosition:
  stage: str
  stage_index: int
  stage_step: int       # optimizer steps taken in this stage
  stage_done: bool
  global_step: int


class Checkpointer:
  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'meta'),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest(self) -> RunPosition | None:
    step = self.manager.latest_step()
    if step is None:
      return None
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    return RunPosition(meta['stage'], meta['stage_index'], meta['stage_step'], meta['stage_done'],
                       step)

  def save(self, pos: RunPosition, state: Any, config_json: str | None = None):
    meta = dataclasses.asdict(pos)
    meta.pop('global_step')
    if config_json is not None:
      meta['config'] = json.loads(config_json)
    self.manager.save(pos.global_step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore_state(self, global_step: int, abstract_state: Any):
    """Restore into `abstract_state` (ShapeDtypeStructs carrying their target shardings)."""
    out = self.manager.restore(global_step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return out['state']

  def close(self):
    self.manager.close()
