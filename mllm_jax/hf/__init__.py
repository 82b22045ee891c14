"""Hugging Face interop: config translation, per-family key maps, safetensors I/O.

  load_hf(path, dtype, mesh) -> (model, params)     save_hf(model, params, path)
  params_from_state_dict(model, torch_model.state_dict()) -> params
  FAMILIES: the supported `architectures` entries
  pretrained.init_params: the train loop's start from `init_from` / `hf_path` checkpoints
"""
from mllm_jax.hf.api import (build_model, load_hf, load_params, model_config, param_targets,
                             params_from_state_dict, read_config, save_hf)
from mllm_jax.hf.families import FAMILIES
from mllm_jax.hf.safetensors_io import Checkpoint, CheckpointError
