"""DiffRhythm network, sampler, VAE and style encoder."""
