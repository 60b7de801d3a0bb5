"""Dynamic request batching: a pure dispatch policy, adaptive sizing, the batcher, and the
adapters that give it one way to compute a batch."""
