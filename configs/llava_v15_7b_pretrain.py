"""LLaVA-1.5-7B stage 1 (feature alignment): CLIP ViT-L/14-336 + Vicuna-7B, connector only.

Recipe (haotian-liu/LLaVA, scripts/v1_5/pretrain.sh): LCS-558K captions, 1 epoch, global batch
256, lr 1e-3, cosine with 3% warmup, no weight decay, max length 2048, `plain` template.
Set `--config.model.vision.hf_path=DIR` (CLIP ViT-L/14-336) and `--config.model.llm.hf_path=DIR`
(Vicuna-7B) to start from Hugging Face weights; the LLaVA-JSON data source comes with the data
pipeline.
"""
from mllm_jax.config import base_config, finalize, stage_config


def get_config():
  c = base_config()
  c.model.llm.update(vocab_size=32064, hidden=4096, depth=32, heads=32, kv_heads=32,
                     mlp_dim=11008, norm_eps=1e-5, rope_theta=10000.0, max_position=4096)
  c.model.vision.update(kind='clip', image_size=336, patch_size=14, width=1024, depth=24,
                        heads=16, mlp_dim=4096, norm_eps=1e-5, feature_layer=-2,
                        feature_select='patch')
  c.model.connector.update(kind='mlp', depth=2, act='gelu')
  c.model.update(image_token_id=32000, dtype='bfloat16', param_dtype='float32',
                 remat_policy='full', vision_remat_policy='full')
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.sharding.rules = 'fsdp'
  c.data.update(source='llava_json', tokenizer='path/to/llava-v1.5-7b-hf', max_len=2048)
  c.train.update(stages='pretrain', checkpoint_every=500, log_every=10)
  c.pretrain = stage_config(task='caption', trainable='connector/.*', steps=2180,   # 558K / 256
                            batch_size=256, lr=1e-3, warmup_ratio=0.03, weight_decay=0.0)
  return finalize(c)
