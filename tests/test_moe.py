"""Mixture-of-Experts: parity with transformers' Mixtral / Qwen2-MoE / Qwen3-MoE (and LLaVA with
an MoE LLM) with random weights, import/export round trips, the dropless paths against a plain
per-expert loop, the capacity path against dropless and its drop accounting, the
load-balancing / z-loss formulas, router gradients, 1 vs 8 devices, and learning."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import mllm_jax
from mllm_jax import sharding as shd
from mllm_jax.models import LLMConfig, MLLMConfig, MLLM
from mllm_jax.models import moe as moe_lib
from mllm_jax.models.llm import Decoder, layer_plan

from test_hf import apply_fn, assert_close, randomize, torch_inputs

TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=128)
MOE_DECODERS = {
    'mixtral': lambda: transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                  **TEXT),
    # MoE on layers 1 and 3 (every 2nd), layer 3 forced dense: stacks of runs; shared expert,
    # no top-k renormalisation, q/k/v biases
    'qwen2_moe': lambda: transformers.Qwen2MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, decoder_sparse_step=2, mlp_only_layers=[3],
        norm_topk_prob=False, **TEXT),
    # every 2nd layer MoE: one stack of [dense, MoE] groups; q/k norms, head_dim 16
    'qwen3_moe': lambda: transformers.Qwen3MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=2,
        norm_topk_prob=True, head_dim=16, **TEXT),
    'qwen3_dense': lambda: transformers.Qwen3Config(head_dim=16, **TEXT),
}


def inputs_with_padding(vocab=96, b=2, t=24, seed=0):
  ids = np.random.RandomState(seed).randint(0, vocab, (b, t))
  mask = np.ones_like(ids)
  mask[1, :5] = 0   # left padding
  return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize('name', list(MOE_DECODERS))
def test_moe_decoder_matches_transformers_and_export_round_trips(name, tmp_path):
  cfg = MOE_DECODERS[name]()
  cls = getattr(transformers, transformers.AutoConfig.for_model(cfg.model_type).__class__.__name__
                .replace('Config', 'ForCausalLM'))
  torch.manual_seed(0)
  hf = randomize(cls(cfg))
  hf.save_pretrained(tmp_path / 'hf')
  model, params = mllm_jax.load_hf(str(tmp_path / 'hf'))
  inputs = inputs_with_padding()
  with torch.no_grad():
    out = hf(**torch_inputs(inputs), output_router_logits='moe' in name)
  ref = out.logits.numpy()
  assert_close(apply_fn(model)(params, inputs), ref, inputs['attention_mask'])
  if 'moe' in name or name == 'mixtral':
    # the capacity path with room for every assignment gives the same logits
    llm = model.cfg.llm
    ample = dataclasses.replace(llm.moe, impl='capacity',
                                capacity_factor=llm.moe.num_experts / llm.moe.experts_per_token)
    cap = MLLM(dataclasses.replace(model.cfg, llm=dataclasses.replace(llm, moe=ample)))
    assert_close(apply_fn(cap)(params, inputs), ref, inputs['attention_mask'])
    # transformers' load-balancing loss (padding excluded) equals ours
    with torch.no_grad():
      labelled = hf(**torch_inputs(inputs), labels=torch.tensor(inputs['input_ids']),
                    output_router_logits=True)
    _, inter = model.apply({'params': params}, **inputs, mutable=['intermediates'])
    ours = moe_lib.losses(moe_lib.collect(inter), llm.moe.experts_per_token)
    np.testing.assert_allclose(float(ours['aux_loss']), float(labelled.aux_loss), rtol=1e-5)

  mllm_jax.save_hf(model, params, str(tmp_path / 'out'))
  back = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', attn_implementation='eager').eval()
  assert type(back) is cls
  with torch.no_grad():
    assert_close(back(**torch_inputs(inputs)).logits.numpy(), ref, inputs['attention_mask'])
