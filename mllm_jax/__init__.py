"""mllm_jax: train multimodal LLMs in JAX/Flax.

`mllm_jax.load_hf(path, dtype, mesh)` and `mllm_jax.save_hf(model, params, path)` move models
between Hugging Face checkpoint directories and Flax (see mllm_jax.hf). They are imported on
first use, so `import mllm_jax` stays light.
"""

__all__ = ['load_hf', 'save_hf']


def __getattr__(name):
  if name in __all__:
    from mllm_jax.hf import api
    return getattr(api, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
