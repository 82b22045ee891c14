"""Device mesh from config, logical-axis rule presets, and shardings for params and batches.

Parameters and activations carry logical axis names (see `mllm_jax.models.layers`); a rule list
maps each logical name to mesh axes. Changing the parallelism layout is a config change:
`config.mesh` sizes the axes (`data`, `fsdp`, `tensor`, `expert`; one -1 takes the rest) and
`config.sharding.rules` names a preset below or gives an explicit list of (logical, mesh axes).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')
# The batch is split over every axis that does not split the model's hidden dimensions.
BATCH_AXES = ('data', 'fsdp', 'expert')

_ACTS_DP = [('act_batch', BATCH_AXES)]
_TP = [('heads', 'tensor'), ('kv_heads', 'tensor'), ('mlp', 'tensor'), ('vocab', 'tensor'),
       ('act_heads', 'tensor'), ('act_kv_heads', 'tensor'), ('act_mlp', 'tensor'),
       ('act_vocab', 'tensor')]
# Expert parallelism: MoE expert weights [E, ...] split over `expert`, and so is the capacity
# path's [E, C, H] dispatch buffer (`act_expert`); the tokens stay split on the batch axes.
# Every other weight's `embed` dim is split over fsdp x expert (FSDP over both axes); in an
# expert weight `expert` is taken, so flax falls back to the next rule, `embed` -> fsdp.
_EP = [('expert', 'expert'), ('act_expert', 'expert')]
_FSDP = [('embed', ('fsdp', 'expert')), ('embed', 'fsdp'), ('mlp_out', ('fsdp', 'expert')),
         ('mlp_out', 'fsdp')]
RULE_PRESETS: dict[str, list[tuple[str, Any]]] = {
    # Replicated parameters, batch split over all devices.
    'dp': _ACTS_DP,
    # ZeRO-3 style: every large parameter split on its `embed` dim over `fsdp` (and `expert`).
    'fsdp': _ACTS_DP + _EP + _FSDP,
    # FSDP plus Megatron-style tensor parallelism over heads / mlp / vocab (and each expert's
    # intermediate dim).
    'fsdp_tp': _ACTS_DP + _TP + [('expert_mlp', 'tensor')] + _EP + _FSDP,
}

log = logging.getLogger(__name__)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Build a mesh with Auto axis types (logical-constraint style) from {axis: size}.

  Axes not named get size 1. One size may be -1: it takes the devices left over. A product that does not match the device
  count is an error that says which `config.mesh.*` to change.
  """
  devices = list(devices if devices is not None else jax.devices())
  unknown = [a for a in axes if a not in MESH_AXES]
  if unknown:
    raise ValueError(f'config.mesh: unknown axis {unknown}; expected axes from {MESH_AXES}')
  names = MESH_AXES   # absent axes get size 1, so every rule's mesh axis exists
  sizes = [int(axes.get(a, 1)) for a in names]
  fill = [a for a, s in zip(names, sizes) if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh={dict(axes)}: sizes must be positive, with at most one -1')
  fixed = math.prod(s for s in sizes if s != -1)
  n = len(devices)
  if fill:
    if n % fixed:
      raise ValueError(
          f'config.mesh={dict(axes)}: the fixed axes multiply to {fixed}, which does not '
          f'divide the {n} available devices; change config.mesh so it does')
    sizes = [n // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise ValueError(
        f'config.mesh={dict(axes)} needs {math.prod(sizes)} devices but {n} are available; '
        f'set one axis to -1 (e.g. --config.mesh.fsdp=-1) or change the sizes to multiply to {n}')
  return jax.make_mesh(tuple(sizes), names, devices=devices,
                       axis_types=(AxisType.Auto,) * len(names))


def logical_rules(rules) -> list[tuple[str, Any]]:
  """`config.sharding.rules`: a preset name or a list of (logical name, mesh axis/axes/None)."""
  if isinstance(rules, str):
    if rules not in RULE_PRESETS:
      raise ValueError(f'config.sharding.rules={rules!r}: expected one of '
                       f'{sorted(RULE_PRESETS)} or a list of (logical, mesh axes) pairs')
    return list(RULE_PRESETS[rules])
  out = []
  for r in rules:
    name, axes = r
    out.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return out


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def spec_for(shape, names, mesh: Mesh, rules) -> P:
  """Logical names -> PartitionSpec, dropping mesh axes that are absent or do not divide the dim.

  A dimension that is not divisible by its mesh axes stays replicated (logged), so e.g. an odd
  vocabulary size never blocks a run; everything else is sharded as the rules say.
  """
  if names is None:
    return P()
  mesh_axes = nn.logical_to_mesh_axes(names, rules)
  out = []
  for dim, (size, axes) in enumerate(zip(shape, mesh_axes)):
    if axes is not None:
      tup = (axes,) if isinstance(axes, str) else tuple(axes)
      tup = tuple(a for a in tup if a in mesh.shape and mesh.shape[a] > 1)
      axes = (tup[0] if len(tup) == 1 else tup) if tup else None
    if axes is not None and size % _axis_size(mesh, axes):
      log.info('dim %d (%s, size %d) not divisible by mesh axes %s: replicated', dim,
               names[dim], size, axes)
      axes = None
    out.append(axes)
  return P(*out)


def shardings_from_boxed(abstract_boxed, mesh: Mesh, rules):
  """Abstract tree whose leaves are `nn.LogicallyPartitioned` (or plain) -> NamedSharding tree."""
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, spec_for(leaf.value.shape, leaf.names, mesh, rules))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_boxed,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def data_parallel_size(mesh: Mesh) -> int:
  return _axis_size(mesh, BATCH_AXES)


def batch_spec(mesh: Mesh, ndim: int, leading_accum: bool = False) -> P:
  """[B, ...] split on the batch axes; with `leading_accum`, [accum, B, ...]."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1) or None
  lead = (None,) if leading_accum else ()
  return P(*lead, axes, *([None] * (ndim - 1 - len(lead))))


def check_batch_divisible(batch_size: int, mesh: Mesh, key: str = 'config.train.batch_size'):
  dp = data_parallel_size(mesh)
  if batch_size % dp:
    sizes = {a: mesh.shape[a] for a in BATCH_AXES if a in mesh.shape}
    raise ValueError(
        f'{key}={batch_size} is not divisible by the data-parallel size {dp} '
        f'(mesh axes {sizes} split the batch); use a multiple of {dp} or change config.mesh')


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, leading_accum: bool = False):
  """Place a host batch (global arrays, single process) on the mesh, split over the batch axes."""
  return {k: jax.device_put(v, NamedSharding(mesh, batch_spec(mesh, v.ndim, leading_accum)))
          for k, v in batch.items()}
