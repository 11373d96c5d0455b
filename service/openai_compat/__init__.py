"""The OpenAI-compatible API: its wire shapes, and the translation to and from jobs."""
