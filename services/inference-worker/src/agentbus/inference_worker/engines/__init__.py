"""Engines behind the LLMEngine port."""
