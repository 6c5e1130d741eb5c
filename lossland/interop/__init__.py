"""Checkpoints of other libraries in and out of lossland.

`lossland.interop.hf`: Hugging Face causal-LM folders (config.json,
safetensors, tokenizer.json) for the llama, qwen2, olmo2 and gpt2 families,
loaded into `lossland.models.CausalLM` (optionally straight onto a mesh) and
written back.
"""
from lossland.interop import hf

__all__ = ['hf']
