"""Tiny multimodal LLM with a Mixture-of-Experts decoder on the built-in scenes task (CPU).

    python -m mllm_jax.train --config configs/demo_moe.py --workdir /tmp/demo_moe

`configs/demo.py` with every decoder layer's MLP replaced by 4 experts, top-2 (Mixtral-style
routing, dropless), each expert half the dense MLP's width, so a token uses the same number of
MLP parameters as in the dense demo. The load-balancing and router z-losses are added to the
training loss and logged as moe/aux_loss and moe/z_loss (docs/moe.md).
"""
import os

from mllm_jax.config import finalize, load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), 'demo.py'))
  c.unlock()
  c.model.llm.moe.update(num_experts=4, experts_per_token=2, every=1, mlp_dim=192,
                         impl='dropless', aux_loss_coef=0.01, z_loss_coef=0.001)
  return finalize(c)
