"""LoRA adapters: reading PEFT checkpoints and validating them against the base model; never imports the model."""
