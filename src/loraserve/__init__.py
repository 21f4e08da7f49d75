"""loraserve: one base model, any number of LoRA adapters, served from one continuously batched engine."""

__version__ = "0.1.0"
