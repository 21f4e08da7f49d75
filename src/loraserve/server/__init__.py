"""HTTP APIs over the async engine: LoRAX/TGI-compatible routes (and, later, OpenAI-compatible ones)."""
