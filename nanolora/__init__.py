"""nanolora: LoRA and QLoRA fine-tuning in plain PyTorch and Triton."""
from nanolora.load import load_model, load_tokenizer

__all__ = ["load_model", "load_tokenizer"]
