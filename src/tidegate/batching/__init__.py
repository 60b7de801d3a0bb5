"""Dynamic request batching: a pure dispatch policy, adaptive sizing, and the batcher."""
