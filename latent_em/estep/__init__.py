"""E-step: infer latent thoughts for a corpus with the current model (DESIGN.md §4)."""
