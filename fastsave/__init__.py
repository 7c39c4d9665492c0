"""fastsave: save QLoRA-trained models as adapters, merged 16-bit or merged 4-bit checkpoints."""

__version__ = "0.1.0"
