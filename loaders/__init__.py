"""Preference-pair sources, decoding, buckets, the latent cache and the sampler."""
