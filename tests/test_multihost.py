"""Several processes on one machine: 2 CPU processes (2 devices each, gloo collectives) train
with the same global batch as 1 process with 4 devices and log the same losses, each process
making only its own rows of every batch. SIGTERM to one process stops both at the same step
with a collective checkpoint (one data state per process), which resumes exactly."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mllm_jax import distributed
from mllm_jax.data import tokenizer as tok_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'configs', 'demo.py')
TINY = {'model.llm.depth': 1, 'model.llm.hidden': 32, 'model.llm.heads': 2,
        'model.llm.kv_heads': 1, 'model.llm.mlp_dim': 64, 'model.vision.depth': 1,
        'model.vision.width': 32, 'model.vision.heads': 2, 'model.vision.mlp_dim': 64,
        'model.vision.image_size': 16, 'model.vision.feature_layer': -1, 'data.max_len': 64,
        'data.max_images': 1, 'train.stages': 'sft', 'sft.steps': 4, 'sft.batch_size': 8,
        'train.log_every': 1, 'train.checkpoint_every': 0, 'train.eval_examples': 8,
        'train.eval_batch_size': 8, 'train.progress_bar': False, 'distributed.enabled': 'no'}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def env_with(devices, cache):
  e = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  e.update(PYTHONPATH=ROOT + os.pathsep + e.get('PYTHONPATH', ''),
           XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
           JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
           JAX_DEFAULT_MATMUL_PRECISION='highest', TOKENIZERS_PARALLELISM='false')
  return e


def launch(workdir, env, **overrides):
  args = [f'--config.{k}={v}' for k, v in {**TINY, **overrides}.items()]
  return subprocess.Popen([sys.executable, '-m', 'mllm_jax.train', '--config', DEMO,
                           '--workdir', str(workdir)] + args, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(procs, timeout=400):
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  return outs


def two_processes(workdir, env, **overrides):
  port = free_port()
  return finish([launch(workdir, env, **{
      **overrides, 'distributed.enabled': 'yes', 'distributed.coordinator_address':
      f'localhost:{port}', 'distributed.num_processes': 2, 'distributed.process_id': i})
      for i in range(2)])


def lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]


@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume_after_sigterm(tmp_path):
  tok = tmp_path / 'tok'
  tok_lib.get_or_build_demo_tokenizer(str(tok))
  one, two = tmp_path / 'one', tmp_path / 'two'
  for w in (one, two):
    w.mkdir()
    os.symlink(tok, w / 'tokenizer')
  cache = tmp_path / 'cache'
  single = launch(one, env_with(4, cache))
  # 2 processes x 2 devices; SIGTERM to process 1 only, during the (held) save of step 1:
  # both stop after step 2 and save it collectively, each with its data state
  port = free_port()
  procs = [launch(two, env_with(2, cache), **{
      'distributed.enabled': 'yes', 'distributed.coordinator_address': f'localhost:{port}',
      'distributed.num_processes': 2, 'distributed.process_id': i,
      'train.checkpoint_every': 1, 'train.debug_save_delay': 1.0}) for i in range(2)]
  t0 = time.time()
  while not (two / 'checkpoints').is_dir() or not any(
      n.startswith('1.') for n in os.listdir(two / 'checkpoints')):
    assert all(p.poll() is None for p in procs) and time.time() - t0 < 300
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    outs.append(out)
  for i, out in enumerate(outs):
    assert (f'Process {i}/2 of stage \'sft\' makes rows [{4 * i}, {4 * i + 4}) of each global '
            'batch of 8') in out, out
    assert 'SIGTERM received: saved the checkpoint of step 2' in out, out
  assert sorted(n for n in os.listdir(two / 'checkpoints')) == ['1', '2']
  data = sorted(os.listdir(two / 'checkpoints' / '2' / 'data'))
  assert data == ['commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
  for f in data[1:]:
    assert json.loads((two / 'checkpoints' / '2' / 'data' / f).read_text()) == {'next_index': 16}
  second = two_processes(two, env_with(2, cache))
  assert all('at step 2 ' in out for out in second)
  finish([single])
  a, b = lines(one), lines(two)
  train_a = [(m['step'], m['loss'], m['grad_norm']) for m in a if 'loss' in m]
  train_b = [(m['step'], m['loss'], m['grad_norm']) for m in b if 'loss' in m]
  assert [s for s, *_ in train_a] == [s for s, *_ in train_b] == [1, 2, 3, 4]
  np.testing.assert_allclose(np.array(train_b)[:, 1:], np.array(train_a)[:, 1:], rtol=1e-6)
  eval_a, eval_b = [m for m in a if 'eval/loss' in m], [m for m in b if 'eval/loss' in m]
  np.testing.assert_allclose(eval_b[0]['eval/loss'], eval_a[0]['eval/loss'], rtol=1e-6)


def test_local_rows_and_environment_detection():
  from mllm_jax import sharding as shd
  mesh = shd.make_mesh({'data': 2, 'fsdp': -1})
  assert distributed.local_rows(mesh, 16) == (0, 1)   # one process holds every row
  assert distributed.requested_by_environment({}) is None
  assert distributed.requested_by_environment(
      {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}) == 'JAX_COORDINATOR_ADDRESS'
  assert distributed.requested_by_environment(
      {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None
  assert distributed.requested_by_environment(
      {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}) == 'SLURM_NTASKS'
  assert distributed.requested_by_environment(
      {'TPU_WORKER_HOSTNAMES': 'a,b'}) == 'TPU_WORKER_HOSTNAMES'
