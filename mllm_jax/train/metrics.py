"""Metrics to WORKDIR/metrics.jsonl (one JSON object per line) and TensorBoard event files.

Only the primary process writes (`enabled=False` elsewhere). On resume, lines logged after the
checkpoint the run resumes from are dropped (they will be logged again), and so is a last line
cut short by a killed process; the new TensorBoard event file starts with a purge marker
(SessionLog START at the first step to be logged again), so TensorBoard hides the earlier
files' points from that step on instead of drawing both.
"""
from __future__ import annotations

import json
import os


class MetricsWriter:
  """`write(step, {...})`: training lines carry `step` and `loss`; evaluation keys are `eval/*`."""

  def __init__(self, workdir: str, resume_step: int | None = None, enabled: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled
    if not enabled:
      return
    resumed = os.path.exists(self.path)
    if resumed:
      self._truncate_after(resume_step or 0)
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(logdir=workdir,
                            purge_step=(resume_step or 0) + 1 if resumed else None)
    self.file = open(self.path, 'a')

  def _truncate_after(self, step: int):
    """Keep the lines up to `step` (the resumed checkpoint); drop later ones and torn lines."""
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:   # a write cut short by kill -9
          continue
        if row.get('step', 0) <= step:
          keep.append(json.dumps(row) + '\n')
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(keep)
    os.replace(tmp, self.path)   # a kill here leaves the old file or the new one, never half

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: v if isinstance(v, str) else float(v) for k, v in metrics.items()})
    self.file.write(json.dumps(row) + '\n')
    self.file.flush()
    for k, v in row.items():
      if k != 'step' and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self):
    if self.enabled:
      self.file.close()
      self.tb.close()
