"""Metrics to WORKDIR/metrics.jsonl (one JSON object per line) and TensorBoard event files."""
from __future__ import annotations

import json
import os

from tensorboardX import SummaryWriter


class MetricsWriter:
  """`write(step, {...})`: training lines carry `step` and `loss`; evaluation keys are `eval/*`."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if resume_step is not None and os.path.exists(self.path):
      self._truncate_after(resume_step)
    self.tb = SummaryWriter(logdir=workdir)
    self.file = open(self.path, 'a')

  def _truncate_after(self, step: int):
    """Drop lines logged after the checkpoint we resume from: they will be logged again."""
    with open(self.path) as f:
      keep = [l for l in f if l.strip() and json.loads(l).get('step', 0) <= step]
    with open(self.path, 'w') as f:
      f.writelines(keep)

  def write(self, step: int, metrics: dict):
    row = {'step': int(step)}
    row.update({k: v if isinstance(v, str) else float(v) for k, v in metrics.items()})
    self.file.write(json.dumps(row) + '\n')
    self.file.flush()
    for k, v in row.items():
      if k != 'step' and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self):
    self.file.close()
    self.tb.close()
