"""InstructBLIP-Vicuna-7B: EVA ViT-g/14 (224 px, 39 layers, 1408 wide) -> instruction-aware
Q-Former (32 queries, BERT-base: 12 layers, 768 wide, cross-attention every 2nd layer) ->
Linear(768, 4096) -> Vicuna-7B. ~7.9B parameters, of which the Q-Former + projection (~0.19B)
train; the ViT and the LLM stay frozen in both stages.

  pretrain  BLIP-2 stage 2 (vision-to-language generative pretraining, Li et al. 2023):
            captions, lr 1e-4 with 2000 warmup steps, cosine to 5e-5, AdamW (0.9, 0.98),
            weight decay 0.05, batch 1920 (BLIP-2's stage-1 representation learning with
            ITC / ITM / ITG losses is not part of this library; start the Q-Former from a
            BLIP-2 checkpoint instead).
  sft       InstructBLIP instruction tuning (Dai et al. 2023): lr 1e-5 with 1000 warmup steps,
            cosine to 0, AdamW (0.9, 0.999), weight decay 0.05, batch 128 for 7B, up to 60K
            steps; the Q-Former reads the instruction (`qformer_input_ids`).

Weights: `--config.model.init_from=DIR` with a Hugging Face InstructBLIP directory (e.g.
Salesforce/instructblip-vicuna-7b; its config.json must agree with this file, which the load
checks) and `--config.data.tokenizer=DIR --config.data.qformer_tokenizer=DIR/qformer_tokenizer`.
Data: `--config.data.source=llava_json --config.data.train_files=...` (or tfds, docs/data.md);
the pipeline gives the Q-Former each image's instruction.
"""
from mllm_jax.config import base_config, finalize, stage_config


def get_config():
  c = base_config()
  # Vicuna-7B v1.1 with the "<image>" token appended (id 32001) as the HF checkpoint has it
  c.model.llm.update(vocab_size=32002, hidden=4096, depth=32, heads=32, kv_heads=32,
                     mlp_dim=11008, norm_eps=1e-6, rope_theta=10000.0, max_position=2048)
  c.model.vision.update(kind='blip2', image_size=224, patch_size=14, width=1408, depth=39,
                        heads=16, mlp_dim=6144, norm_eps=1e-6, act='gelu', qkv_bias=True,
                        feature_layer=-1, feature_select='full')
  c.model.connector.update(kind='qformer')
  c.model.connector.qformer.update(num_queries=32, hidden=768, depth=12, heads=12, mlp_dim=3072,
                                   norm_eps=1e-12, act='gelu', cross_attention_every=2,
                                   instruction=True, vocab_size=30523, max_position=512)
  c.model.update(image_token_id=32001, dtype='bfloat16', param_dtype='float32',
                 remat_policy='full', vision_remat_policy='full')
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.sharding.rules = 'fsdp'
  c.data.update(source='llava_json', tokenizer='path/to/instructblip-vicuna-7b',
                qformer_tokenizer='path/to/instructblip-vicuna-7b/qformer_tokenizer',
                max_len=512, qformer_max_len=128, image_norm='clip')
  c.train.update(stages='pretrain,sft', checkpoint_every=1000, log_every=10)
  c.pretrain = stage_config(task='caption', trainable='connector/.*', steps=80_000,
                            batch_size=1920, lr=1e-4, warmup_steps=2000, final_lr_ratio=0.5,
                            b2=0.98, weight_decay=0.05)
  c.sft = stage_config(task='vqa', trainable='connector/.*', steps=60_000, batch_size=128,
                       lr=1e-5, warmup_steps=1000, weight_decay=0.05)
  return finalize(c)
