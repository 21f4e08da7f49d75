"""OpenAI-compatible routes: completions, chat completions and models, the adapter named as `model`."""
