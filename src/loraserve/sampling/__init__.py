"""Sampling parameters and the batched sampler; independent of the model and the engine."""
