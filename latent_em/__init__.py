"""latent_em: Bootstrapping Latent Thoughts (BoLT) in JAX/Flax."""
__version__ = "0.1.0"
