"""Sampling (prefill + while-loop decode) and teacher-forced scoring."""
