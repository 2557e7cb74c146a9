"""The dispatcher's LLM pool: OpenAI-compatible endpoint, provider health, breakers, failover."""

from dispatcher.llm.app import LLMPoolHandle, start_llm_pool
from dispatcher.llm.pool import LLMPool

__all__ = ["LLMPool", "LLMPoolHandle", "start_llm_pool"]
