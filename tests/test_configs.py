"""Shipped configs: they load, the full-scale LLaVA model has the paper's size, and its layout
on an 8-way FSDP mesh really splits the parameters (checked abstractly, nothing allocated)."""
import os

import jax
import numpy as np
import pytest

from mllm_jax import sharding as shd
from mllm_jax.config import load_config
from mllm_jax.models import MLLM
from mllm_jax.train import loop, steps

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def load(name):
  return load_config(os.path.join(CONFIGS, name + '.py'))


@pytest.mark.parametrize('name', ['demo', 'llava_v15_7b_pretrain', 'llava_v15_7b_sft'])
def test_configs_are_locked_and_complete(name):
  c = load(name)
  with pytest.raises(AttributeError):
    c.train.stepz = 1    # locked: misspelt keys fail
  for stage in loop.stage_names(c):
    assert c[stage].steps > 0 and c[stage].batch_size % c[stage].grad_accum == 0


def test_llava_7b_size_and_fsdp_layout():
  c = load('llava_v15_7b_sft')
  assert c.sft.trainable == '(connector|llm)/.*' and c.sft.optim.lr == 2e-5 and c.sft.batch_size == 128
  assert load('llava_v15_7b_pretrain').pretrain.trainable == 'connector/.*'
  mcfg = loop.model_config(c)
  assert mcfg.vision.num_tokens == 576   # 336 px / 14 px patches, CLS dropped
  mesh = shd.make_mesh(c.mesh.to_dict())   # fsdp=-1 -> all 8 test devices
  factory = steps.StateFactory(MLLM(mcfg), mesh, shd.logical_rules(c.sharding.rules))
  leaves = jax.tree.leaves(factory.abstract_params)
  n = sum(int(np.prod(x.shape)) for x in leaves)
  assert 7.0e9 < n < 7.1e9, n   # LLaVA-1.5-7B: 6.74B Vicuna + 0.30B CLIP-L + 0.02B projector
  per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) for x in leaves)
  assert per_device < 1.01 * n / 8   # everything but norms and biases is split 8 ways
  emb = factory.abstract_params['llm']['embed_tokens']['embedding']
  assert emb.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')
