"""mllm_jax: train multimodal LLMs in JAX/Flax.

`mllm_jax.load_hf(path, dtype, mesh)` and `mllm_jax.save_hf(model, params, path)` move models
between Hugging Face checkpoint directories and Flax (see mllm_jax.hf);
`mllm_jax.generate(model, params, input_ids, ...)` decodes with a KV cache (mllm_jax.generate).
They are imported on first use, so `import mllm_jax` stays light.
"""

__all__ = ['load_hf', 'save_hf', 'generate']


def __getattr__(name):
  if name in ('load_hf', 'save_hf'):
    from mllm_jax.hf import api
    return getattr(api, name)
  if name == 'generate':   # a callable module: mllm_jax.generate(...) runs generate.generate
    import importlib
    return importlib.import_module('mllm_jax.generate')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
