"""metrics.jsonl and TensorBoard events across a resume."""
import glob
import json
import os
import struct
import time

from tensorboardX.proto import event_pb2

from mllm_jax.train.metrics import MetricsWriter


def events(workdir):
  """Every event of the run's TensorBoard files, files in the order they were written."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      while len(header := f.read(12)) == 12:     # TFRecord: length, crc, data, crc
        data = f.read(struct.unpack('<Q', header[:8])[0])
        f.read(4)
        out.append(event_pb2.Event.FromString(data))
  return out


def is_purge(event):
  return event.HasField('session_log') and event.session_log.status == event.session_log.START


def tensorboard_scalars(workdir, tag):
  """{step: value} of `tag` as TensorBoard shows it: a SessionLog START at step s (a purge
  marker) hides the points at steps >= s logged before it."""
  points = {}
  for event in events(workdir):
    if is_purge(event):
      points = {s: v for s, v in points.items() if s < event.step}
    for value in event.summary.value:
      if value.tag == tag:
        points[event.step] = value.simple_value
  return points


def test_resume_drops_later_lines_and_purges_tensorboard(tmp_path):
  w = MetricsWriter(str(tmp_path))
  for step in range(1, 7):
    w.write(step, {'loss': float(step)})
  w.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 7, "lo')                  # a line cut short by kill -9
  time.sleep(1.1)   # tensorboardX names event files by the second
  w = MetricsWriter(str(tmp_path), resume_step=4)   # resumed from the checkpoint at step 4
  w.write(5, {'loss': 50.0})                       # ... and, so far, logged step 5 again
  w.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert [(r['step'], r['loss']) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 50)]
  # without the purge marker TensorBoard would still draw the first run's point at step 6
  assert tensorboard_scalars(str(tmp_path), 'loss') == {1: 1, 2: 2, 3: 3, 4: 4, 5: 50}


def test_first_run_writes_no_purge_marker(tmp_path):
  w = MetricsWriter(str(tmp_path), resume_step=None)
  w.write(1, {'loss': 2.0})
  w.close()
  assert tensorboard_scalars(str(tmp_path), 'loss') == {1: 2.0}
  assert not any(is_purge(e) for e in events(str(tmp_path)))
