"""Faults of a long run: kill -9 (also mid-save) and SIGTERM resume exactly, non-finite steps
are skipped or stop the run, a failed checkpoint write is a clear error that leaves the
previous checkpoint intact. Every run is the real CLI in a subprocess on the tiny demo config;
they share a persistent compilation cache, so only the first one compiles."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mllm_jax.checkpoint import Checkpointer, CheckpointError, RunPosition
from mllm_jax.data import synthetic, tokenizer as tok_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'configs', 'demo.py')
STEPS, BATCH = 6, 8
TINY = {'model.llm.depth': 1, 'model.llm.hidden': 32, 'model.llm.heads': 2,
        'model.llm.kv_heads': 1, 'model.llm.mlp_dim': 64, 'model.vision.depth': 1,
        'model.vision.width': 32, 'model.vision.heads': 2, 'model.vision.mlp_dim': 64,
        'model.vision.image_size': 16, 'model.vision.feature_layer': -1, 'data.max_len': 64,
        'data.max_images': 1, 'train.stages': 'sft', 'sft.steps': STEPS, 'sft.batch_size': BATCH,
        'train.log_every': 1, 'train.checkpoint_every': 2, 'train.keep_checkpoints': 5,
        'train.eval_examples': 8, 'train.eval_batch_size': 8, 'train.progress_bar': False}


def command(workdir, **overrides):
  args = {**TINY, **overrides}
  return [sys.executable, '-m', 'mllm_jax.train', '--config', DEMO, '--workdir', str(workdir)] + [
      f'--config.{k}={v}' for k, v in args.items()]


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """The subprocesses' environment: this checkout first, 1 CPU device, a shared compile cache
  and the tokenizer built once."""
  cache = tmp_path_factory.mktemp('jax_cache')
  e = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  e.update(PYTHONPATH=ROOT + os.pathsep + e.get('PYTHONPATH', ''),
           JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', JAX_DEFAULT_MATMUL_PRECISION='highest',
           TOKENIZERS_PARALLELISM='false')
  return e


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tok') / 'tokenizer')
  tok_lib.get_or_build_demo_tokenizer(path)
  return path


def new_workdir(tmp_path, tokenizer_dir, name):
  """A workdir with the demo tokenizer already in place (as a first run would have built it)."""
  w = tmp_path / name
  w.mkdir()
  os.symlink(tokenizer_dir, w / 'tokenizer')
  return w


def run(workdir, env, timeout=300, **overrides):
  r = subprocess.run(command(workdir, **overrides), env=env, capture_output=True, text=True,
                     timeout=timeout)
  return r


def start(workdir, env, **overrides):
  return subprocess.Popen(command(workdir, **overrides), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def metrics(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip().endswith('}')]


def train_lines(workdir):
  return [(m['step'], m['loss'], m['grad_norm']) for m in metrics(workdir) if 'loss' in m]


def wait_for(cond, proc, timeout=240, what=''):
  t0 = time.time()
  while not cond():
    if proc.poll() is not None:
      out, err = proc.communicate()
      raise AssertionError(f'run ended (code {proc.returncode}) before {what}: {err[-3000:]}')
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f'timeout waiting for {what}')
    time.sleep(0.01)


def checkpoints(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(os.listdir(d)) if os.path.isdir(d) else []


def data_state(workdir, step):
  with open(os.path.join(workdir, 'checkpoints', str(step), 'data', 'process_0-of-1.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, env, tokenizer_dir):
  """The uninterrupted run every interrupted one must reproduce step for step."""
  w = new_workdir(tmp_path_factory.mktemp('ref'), tokenizer_dir, 'ref')
  r = run(w, env)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = train_lines(w)
  assert [s for s, *_ in lines] == list(range(1, STEPS + 1))
  return lines


def assert_same_run(workdir, reference):
  lines = train_lines(workdir)
  assert [s for s, *_ in lines] == [s for s, *_ in reference]
  np.testing.assert_array_equal(np.array(lines)[:, 1:], np.array(reference)[:, 1:])


def test_kill_9_mid_save_resumes_exactly(tmp_path, env, tokenizer_dir, reference):
  w = new_workdir(tmp_path, tokenizer_dir, 'w')
  # kill -9 while the checkpoint of step 4 is half-written (held open by the test hook), after
  # steps 3 and 4 were logged
  p = start(w, env, **{'train.debug_save_delay': 2.0})
  half = lambda: any(n.startswith('4.') for n in checkpoints(w))   # orbax's temporary dir
  wait_for(half, p, what='the save of step 4')
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert '2' in checkpoints(w) and '4' not in checkpoints(w) and half(), checkpoints(w)
  assert max(s for s, *_ in train_lines(w)) == 4
  # rerun the same command: resumes from step 2 (never the half-written 4), relogs 3 and 4,
  # and every step matches the uninterrupted run exactly
  r = run(w, env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Resumed from' in r.stdout and 'at step 2 ' in r.stdout, r.stdout
  assert_same_run(w, reference)
  assert data_state(w, 4) == {'next_index': 4 * BATCH}


def test_sigterm_saves_with_data_state_and_resumes_exactly(tmp_path, env, tokenizer_dir,
                                                           reference):
  w = new_workdir(tmp_path, tokenizer_dir, 'w')
  p = start(w, env, **{'train.checkpoint_every': 0})   # only the SIGTERM save writes
  wait_for(lambda: len(train_lines(w)) >= 3, p, what='step 3')
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
  saved = int(checkpoints(w)[-1])
  assert checkpoints(w) == [str(saved)] and 3 <= saved < STEPS
  assert f'SIGTERM received: saved the checkpoint of step {saved} in {ckdir_of(w)}' in out
  assert max(s for s, *_ in train_lines(w)) == saved    # nothing ran past the checkpoint
  assert data_state(w, saved) == {'next_index': saved * BATCH}
  r = run(w, env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'at step {saved} ' in r.stdout
  assert_same_run(w, reference)


def ckdir_of(w):
  return os.path.abspath(os.path.join(w, 'checkpoints'))


def restore(workdir, step):
  """The raw train-state arrays of checkpoint `step`, as numpy."""
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(ckdir_of(workdir), item_names=('state',)) as m:
    out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  return jax.tree.map(np.asarray, out)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, env, tokenizer_dir, reference):
  w = new_workdir(tmp_path, tokenizer_dir, 'w')
  r = run(w, env, **{'train.debug_nan_steps': '3,4', 'train.max_consecutive_nonfinite': 3})
  assert r.returncode == 0, r.stderr[-3000:]
  lines = {m['step']: m for m in metrics(w) if 'loss' in m}
  assert [lines[s]['nonfinite'] for s in range(1, 7)] == [0, 0, 1, 1, 0, 0]
  assert [lines[s]['skipped_steps'] for s in range(1, 7)] == [0, 0, 1, 1, 0, 0]
  assert np.isnan(lines[3]['loss']) and np.isfinite(lines[5]['loss'])
  for s in (1, 2):   # before the bad steps: the reference run
    assert (lines[s]['loss'], lines[s]['grad_norm']) == reference[s - 1][1:]
  # steps 3 and 4 changed nothing: parameters and optimizer state (with its step count) of
  # checkpoint 4 are those of checkpoint 2; only the stage's step counter moved on
  a, b = restore(w, 2), restore(w, 4)
  jax.tree.map(np.testing.assert_array_equal, a['params'], b['params'])
  jax.tree.map(np.testing.assert_array_equal, a['opt_state'], b['opt_state'])
  assert (int(a['step']), int(b['step'])) == (2, 4)
  assert '2 steps skipped for non-finite loss or gradients' in r.stdout
  # the stage's total survives a resume: drop the final checkpoint, rerun from step 4
  shutil.rmtree(w / 'checkpoints' / '6')
  r = run(w, env, **{'train.debug_nan_steps': '3,4', 'train.max_consecutive_nonfinite': 3})
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Resumed from' in r.stdout and 'at step 4' in r.stdout, r.stdout
  assert '2 steps skipped for non-finite loss or gradients' in r.stdout
  ckpt = Checkpointer(str(w / 'checkpoints'))
  assert ckpt.latest().counters == dict(nonfinite_skipped=2, over_logits_width=0)
  ckpt.close()


def test_consecutive_nonfinite_steps_stop_with_a_clear_error(tmp_path, env, tokenizer_dir):
  w = new_workdir(tmp_path, tokenizer_dir, 'w')
  r = run(w, env, **{'train.debug_nan_steps': '3,4,5', 'train.max_consecutive_nonfinite': 2})
  assert r.returncode == 1
  assert ('NonFiniteError: stage \'sft\': non-finite loss or gradients at step 4 (2 in a row, '
          'config.train.max_consecutive_nonfinite=2)') in r.stderr, r.stderr[-2000:]
  assert checkpoints(w) == ['2']   # the save at step 4 was not attempted


def test_nonfinite_policies_count_and_stop():
  """The loop's side of the policy on a stream of per-step flags (no model needed)."""
  from ml_collections import ConfigDict
  from mllm_jax.train.loop import NonFiniteError, NonFiniteMonitor
  step = lambda bad: {'nonfinite': float(bad), 'loss': np.nan if bad else 1.0, 'grad_norm': 1.0}
  cfg = lambda policy, k: ConfigDict({'train': {'nonfinite': policy, 'max_consecutive_nonfinite': k}})
  m = NonFiniteMonitor(cfg('skip', 0), 'sft', 'ckpts')   # never stops
  for i, bad in enumerate([1, 1, 1, 0, 1]):
    m.check(i + 1, step(bad))
  assert (m.total, m.consecutive, m.since_log) == (4, 1, 4)
  m = NonFiniteMonitor(cfg('skip', 3), 'sft', 'ckpts')
  for i, bad in enumerate([1, 1, 0, 1, 1]):   # never 3 in a row
    m.check(i + 1, step(bad))
  with pytest.raises(NonFiniteError, match=r'at step 6 \(3 in a row'):
    m.check(6, step(1))
  m = NonFiniteMonitor(cfg('stop', 3), 'sft', 'ckpts')
  m.check(1, step(0))
  with pytest.raises(NonFiniteError, match=r'at step 2 \(config.train.nonfinite=stop\)'):
    m.check(2, step(1))
  with pytest.raises(ValueError, match='config.train.nonfinite='):
    NonFiniteMonitor(cfg('ignore', 3), 'sft', 'ckpts')


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, env,
                                                                      tokenizer_dir):
  w = new_workdir(tmp_path, tokenizer_dir, 'w')
  r = run(w, env, **{'train.max_steps_per_run': 2})
  assert r.returncode == 0 and checkpoints(w) == ['2'], r.stderr[-3000:]

  # writes past 16 KB fail with EFBIG ('File too large'), as writes to a full disk fail
  limited = ["trap '' XFSZ; ulimit -f 16; exec " + ' '.join(shlex.quote(a) for a in command(w))]
  r = subprocess.run(['bash', '-c'] + limited, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  err = [l for l in r.stderr.splitlines() if l.startswith('CheckpointError')]
  assert len(err) == 1 and err[0].startswith(
      f'CheckpointError: could not write the checkpoint of step 4 to {ckdir_of(w)}: '), err
  assert 'File too large' in err[0] and 'the previous checkpoints are intact' in err[0]
  assert [c for c in checkpoints(w) if c.isdigit()] == ['2']
  ck = Checkpointer(ckdir_of(w))   # the previous checkpoint is the latest and restores whole
  assert ck.latest().global_step == 2 and ck.restore_data_state(2) == {'next_index': 2 * BATCH}
  ck.close()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restore(w, 2)['params']))


def test_checkpointer_refuses_nonfinite_state_and_bad_directories(tmp_path):
  import jax.numpy as jnp
  ck = Checkpointer(str(tmp_path / 'ck'))
  good = {'w': jnp.ones((4,)), 'n': jnp.zeros((), jnp.int32)}
  ck.save(RunPosition('sft', 0, 2, False, 2), good, data_state={'next_index': 16})
  with pytest.raises(CheckpointError, match='refusing to save step 4 .* NaN/inf'):
    ck.save(RunPosition('sft', 0, 4, False, 4), {'w': jnp.array([1., np.inf, 0, 0]),
                                                 'n': jnp.zeros((), jnp.int32)})
  assert ck.latest().global_step == 2 and ck.restore_data_state(2) == {'next_index': 16}
  ck.close()
  (tmp_path / 'file').write_text('not a directory')
  with pytest.raises(CheckpointError, match=f'cannot use checkpoint directory {tmp_path}/file'):
    Checkpointer(str(tmp_path / 'file'))


def test_async_save_returns_before_the_write_and_keeps_the_values(tmp_path):
  """An async save returns once the state is on the host (the write, held 2 s by the test
  hook, goes on in the background: the step directory is still temporary), the arrays can be
  deleted as the donating train step does, and `wait` leaves the saved values; a sync save
  returns only when the checkpoint is complete."""
  import jax.numpy as jnp
  rng = np.random.RandomState(0)
  want = {'w': rng.randn(256, 1024).astype(np.float32), 'n': np.int32(3)}
  for async_save, step in ((True, 1), (False, 2)):
    ck = Checkpointer(ckdir_of(tmp_path), debug_save_delay=2.0, async_save=async_save)
    state = {k: jnp.asarray(v) for k, v in want.items()}
    t0 = time.time()
    ck.save(RunPosition('sft', 0, step, False, step), state, data_state={'next_index': step})
    blocked = time.time() - t0
    done = sorted(os.listdir(ckdir_of(tmp_path)))
    if async_save:
      assert blocked < 1.5 and done == ['1.orbax-checkpoint-tmp'], (blocked, done)
      for x in jax.tree.leaves(state):
        x.delete()
      ck.wait()
    else:
      assert blocked >= 2.0 and str(step) in done, (blocked, done)
    assert ck.latest().global_step == step and ck.restore_data_state(step) == {'next_index': step}
    ck.close()
    np.testing.assert_array_equal(restore(tmp_path, step)['w'], want['w'])


def test_train_iterator_state_and_process_rows(tmp_path, tokenizer_dir):
  """The data-state contract: set_state(get_state()) continues with the next batch, and
  process p of n makes rows [p*B/n, (p+1)*B/n) of the same global batch."""
  from mllm_jax.data import preference
  tok = tok_lib.load_tokenizer(tokenizer_dir)
  for task in (synthetic.SyntheticTask(tok, image_size=16, num_image_tokens=4, max_len=64,
                                       max_images=1),
               preference.PreferenceTask(tok, image_size=16, num_image_tokens=4, max_len=64)):
    it = task.train_iterator(8, 2)
    first = next(it)
    state = it.get_state()
    second = next(it)
    resumed = task.train_iterator(8, 2)
    resumed.set_state(json.loads(json.dumps(state)))
    again = next(resumed)
    for k in second:
      assert first[k].shape[:2] == (2, 4)
      np.testing.assert_array_equal(again[k], second[k])
    for p in range(2):
      part = task.train_iterator(8, 2, p, 2)
      part.set_state(state)
      rows = next(part)
      for k in second:   # [accum, local micro]: rows p*4 .. p*4+3 of the flat global batch
        flat = second[k].reshape((8,) + second[k].shape[2:])
        np.testing.assert_array_equal(rows[k].reshape(flat[:4].shape), flat[p * 4:(p + 1) * 4])
      assert part.get_state() == resumed.get_state()


def test_sigint_becomes_a_stop_request_and_a_second_one_kills():
  from mllm_jax.train.loop import StopSignals
  before = signal.getsignal(signal.SIGINT)
  with StopSignals() as stop:
    assert not stop.requested()
    os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C: no KeyboardInterrupt mid-step
    time.sleep(0.05)
    assert stop.requested() and stop.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL   # a second Ctrl-C kills
  assert signal.getsignal(signal.SIGINT) is before
