"""Flax Linen models: ViT, connectors, decoder LLM and their composition."""
from mllm_jax.models.config import (ConnectorConfig, LLMConfig, MLLMConfig, MoEConfig,
                                    RopeScaling, VisionConfig)
from mllm_jax.models.llm import Decoder
from mllm_jax.models.mllm import MLLM, merge_image_features
from mllm_jax.models.vit import VisionEncoder
