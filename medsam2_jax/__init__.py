"""medsam2-jax: Medical SAM 2 in JAX/Flax."""
