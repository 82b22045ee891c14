"""Several processes (TPU pod hosts, multi-node GPU, or CPU processes on one machine).

`initialize(config.distributed)` calls `jax.distributed.initialize` before anything touches
the devices when the config asks for it (`enabled='yes'`) or, with `enabled='auto'`, when the
environment says the job has several processes: JAX_COORDINATOR_ADDRESS, a SLURM job step or
Open MPI run of more than one task, a multi-worker TPU slice on GKE (TPU_WORKER_HOSTNAMES).
On a GCE TPU pod (`gcloud ... --worker=all`) set `enabled='yes'`: jax finds the coordinator
itself. CPU processes talk through gloo collectives (`config.distributed.cpu_collectives`).

Each process then builds only its own rows of every global batch (`local_rows`) and the
global jax.Array is assembled with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from mllm_jax import sharding as shd

ENABLED = ('auto', 'yes', 'no')


def requested_by_environment(env: Mapping[str, str] = os.environ) -> str | None:
  """The environment variable that says this job has several processes, or None."""
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if env.get('SLURM_JOB_ID') and int(env.get('SLURM_NTASKS', '1') or 1) > 1:
    return 'SLURM_NTASKS'
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return 'OMPI_COMM_WORLD_SIZE'
  if ',' in env.get('TPU_WORKER_HOSTNAMES', ''):
    return 'TPU_WORKER_HOSTNAMES'
  return None


def initialize(cfg) -> bool:
  """`jax.distributed.initialize` as `config.distributed` asks (see module doc); returns whether
  this is a multi-process run. Must run before the first use of `jax.devices()`."""
  if cfg.enabled not in ENABLED:
    raise ValueError(f'config.distributed.enabled={cfg.enabled!r}: expected one of {ENABLED}')
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if cfg.enabled == 'no' or (cfg.enabled == 'auto' and not cfg.coordinator_address and
                             not requested_by_environment()):
    return False
  if cfg.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', cfg.cpu_collectives)
  kw = {}
  if cfg.coordinator_address:
    kw['coordinator_address'] = cfg.coordinator_address
  if cfg.num_processes > 0:
    kw['num_processes'] = cfg.num_processes
  if cfg.process_id >= 0:
    kw['process_id'] = cfg.process_id
  if cfg.local_device_ids:
    kw['local_device_ids'] = [int(i) for i in cfg.local_device_ids.split(',')]
  if cfg.initialization_timeout > 0:
    kw['initialization_timeout'] = cfg.initialization_timeout
  try:
    jax.distributed.initialize(**kw)
  except Exception as e:
    raise RuntimeError(
        f'jax.distributed.initialize({kw}) failed (config.distributed.enabled={cfg.enabled!r}, '
        f'environment: {requested_by_environment()}): {e}') from e
  return jax.process_count() > 1


def is_primary() -> bool:
  """Process 0 writes metrics.jsonl, TensorBoard and the progress bar."""
  return jax.process_index() == 0


def local_rows(mesh, batch_size: int, ndim: int = 2, leading_accum: bool = True
               ) -> tuple[int, int]:
  """(block index, number of blocks) of this process's rows of a [accum, batch_size, ...] (or
  [batch_size, ...]) array split on the mesh's batch axes: the process's devices hold rows
  [index * batch_size / blocks, (index + 1) * batch_size / blocks) of every micro-batch.
  Processes whose devices hold the same rows (model axes across hosts) get the same block."""
  shape = ((1,) if leading_accum else ()) + (batch_size,) + (1,) * (ndim - 1 - leading_accum)
  sharding = NamedSharding(mesh, shd.batch_spec(mesh, len(shape), leading_accum))
  axis = 1 if leading_accum else 0
  spans = {idx[axis].indices(batch_size)[:2]
           for idx in sharding.addressable_devices_indices_map(shape).values()}
  starts = sorted(spans)
  lo, hi = starts[0][0], max(e for _, e in starts)
  covered = sum(e - s for s, e in starts)
  if covered != hi - lo or batch_size % (hi - lo) or lo % (hi - lo):
    raise ValueError(
        f'the devices of process {jax.process_index()} hold rows {starts} of the batch: not one '
        'aligned block; order the mesh so that each process holds a contiguous part of the '
        'batch axes (config.mesh)')
  return lo // (hi - lo), batch_size // (hi - lo)


def global_batch(local: Mapping[str, np.ndarray], mesh, rows: int, leading_accum: bool = True
                 ) -> dict:
  """This process's rows (`local_rows`) of a batch of `rows` rows (per micro-batch) -> global
  jax.Arrays split on the batch axes."""
  axis = 1 if leading_accum else 0
  out = {}
  for k, v in local.items():
    sharding = NamedSharding(mesh, shd.batch_spec(mesh, v.ndim, leading_accum))
    shape = v.shape[:axis] + (rows,) + v.shape[axis + 1:]
    out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
  return out


def replicated_batch(batch: Mapping[str, np.ndarray], mesh) -> dict:
  """A batch every process holds whole (evaluation) -> global arrays split on the batch axes."""
  out = {}
  for k, v in batch.items():
    sharding = NamedSharding(mesh, shd.batch_spec(mesh, v.ndim))
    out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
  return out


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on at least one (a collective: all processes
  must call it at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def sync(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
