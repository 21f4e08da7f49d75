"""LoRAX/TGI-compatible REST routes."""
