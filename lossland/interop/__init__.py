"""Checkpoints of other libraries in and out of lossland.

`lossland.interop.hf`: Hugging Face causal-LM folders (config.json,
safetensors, tokenizer.json) for the llama, qwen2, olmo2 and gpt2 families,
loaded into `lossland.models.CausalLM` (optionally straight onto a mesh) and
written back. `lossland.interop.gguf` (imported by name; it needs the `gguf`
package): llama.cpp GGUF files of the llama and qwen2 families, dequantized
into the same `CausalLM`, params, config and tokenizer, and exportable as
Hugging Face folders. `lossland.interop.text`: text files and (prefix, suffix) pairs as
a checkpoint's token ids. `lossland.interop.tiny`: a byte-level tokenizer and
random-weight folders made locally (tests, notebooks).
"""
from lossland.interop import hf, text, tiny

__all__ = ['hf', 'text', 'tiny']
