"""LLaVA with a Mixtral-8x7B language model, full scale: CLIP ViT-L/14-336 -> 2-layer GELU MLP
-> Mixtral-8x7B (32 layers x 4096, 32 heads / 8 K/V heads, 8 experts of 14336, top-2, every
layer MoE, RoPE theta 1e6, vocabulary 32000 + LLaVA's image token, padded to 32064).

About 47.0B parameters (46.7B Mixtral + 0.30B CLIP + 21M projector); ~12.9B active per token.
Stage `sft` (the LLaVA-1.5 instruction-tuning recipe: connector + LLM trained, tower frozen,
lr 2e-5, batch 128, cosine with 3% warmup) with the load-balancing loss at Mixtral's
router_aux_loss_coef 0.02 (its released config) and a small router z-loss. Run stage 1 first
(`--config.train.stages=pretrain,sft`) to align a fresh connector.

Parallelism: experts split 8 ways on the `expert` mesh axis, everything else FSDP over the
remaining devices (`--config.mesh.expert=8 --config.mesh.fsdp=-1`); bf16 compute, fp32 params,
full remat. Start from Hugging Face weights with `--config.model.vision.hf_path=DIR`
(openai/clip-vit-large-patch14-336) and `--config.model.llm.hf_path=DIR`
(mistralai/Mixtral-8x7B-Instruct-v0.1: the hub's per-expert `block_sparse_moe.experts.{e}.w1/w2/w3`
files load directly).
"""
import os

from mllm_jax.config import finalize, load_config, stage_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), 'llava_v15_7b_pretrain.py'))
  c.unlock()
  c.model.llm.update(vocab_size=32064, hidden=4096, depth=32, heads=32, kv_heads=8,
                     mlp_dim=14336, norm_eps=1e-5, rope_theta=1e6, max_position=32768)
  c.model.llm.moe.update(num_experts=8, experts_per_token=2, every=1, mlp_dim=14336,
                         norm_topk_prob=True, impl='dropless', aux_loss_coef=0.02,
                         z_loss_coef=0.001)
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=8)
  c.train.stages = 'sft'
  c.sft = stage_config(task='vqa', trainable='(connector|llm)/.*', steps=5197,   # 665K / 128
                       batch_size=128, lr=2e-5, warmup_ratio=0.03, weight_decay=0.0)
  return finalize(c)
