"""Training: losses, optimiser, jitted steps, and the stage loop (`python -m mllm_jax.train`)."""
