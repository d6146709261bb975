"""Teacher synthesis: latent thoughts and WRAP paraphrases from a chat model (DESIGN.md §5)."""
from latent_em.synthesis.backend import (FAILURE_KINDS, Backend, Request, Result,
                                         UsageStats)
from latent_em.synthesis.cache import CachingBackend, RequestCache, request_key
from latent_em.synthesis.prompts import KINDS, PromptConfig, build_messages, source_tag

__all__ = [
    "FAILURE_KINDS", "Backend", "Request", "Result", "UsageStats",
    "CachingBackend", "RequestCache", "request_key", "KINDS", "PromptConfig", "build_messages",
    "source_tag",
]
