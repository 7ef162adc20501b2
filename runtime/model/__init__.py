"""The JAX model layer: transformer, sharding, per-token losses, checkpoints, generation."""
