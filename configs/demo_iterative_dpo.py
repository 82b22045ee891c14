"""Iterative DPO on the built-in scenes task, starting from the demo's SFT model.

    python -m mllm_jax.train.iterative_dpo --config configs/demo_iterative_dpo.py --workdir DIR

Without `--config.model.init_from`, the demo's pretrain and sft stages (configs/demo.py) are
trained first in DIR/sft (a finished `configs/demo.py` workdir can be given as init_from
instead). Then `iterative.rounds` rounds: sample 4 answers per question from the current
policy (temperature 1), score them by exact match against the task's answer, pair the best
with the worst, and train DPO on the pairs with the round's starting policy as reference.
Each round prints the held-out preference accuracy and VQA accuracy; see
mllm_jax/train/iterative_dpo.py for the files it writes.
"""
from mllm_jax.config import finalize, load_config, stage_config

import ml_collections
import os

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo.py')


def get_config():
  c = load_config(_DEMO)
  c.unlock()
  c.iterative = ml_collections.ConfigDict(dict(
      rounds=3,
      prompts_per_round=512,    # first questions of fresh train samples each round
      prompt_start=100_000,     # beyond every sample the SFT stage saw
      samples_per_prompt=4,
      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8,
      generate_batch=512,       # rows per generate call
      scorer='exact_match',     # 'exact_match' | 'reward_model' | 'package.module:function'
      reward_model='',          # scorer='reward_model': a mllm_jax.train.reward model dir
      epochs=3.0,               # passes over a round's pairs when config.dpo.steps == 0
      eval_prompts=512,         # held-out questions answered greedily after each round
  ))
  # Per round, as Insight-V's iterative DPO: sigmoid loss, beta 0.1, alpha 1 x DPO + gamma 1 x
  # SFT(chosen); the reference is the round's starting policy.
  # lr: 1e-4 (configs/demo_dpo.py's) cost VQA accuracy over 3 rounds here, 2e-5 moved nothing
  c.dpo = stage_config(task='dpo', trainable='(connector|llm)/.*', steps=0, batch_size=32,
                       lr=5e-5, warmup_ratio=0.1, weight_decay=0.0)
  c.dpo.preference.update(beta=0.1, loss_type='sigmoid', alpha=1.0, gamma=1.0)
  return finalize(c)
