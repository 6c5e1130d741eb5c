"""Flax linen reference models. Params are plain pytrees; `model.apply` is pure."""
from lossland.models.cnn import CNN
from lossland.models.hf_lm import (CausalLM, CausalLMConfig, config_from_transformer_lm,
                                   init_cache)
from lossland.models.mlp import MLP
from lossland.models.precision import preferred_matmul_dtype
from lossland.models.transformer import Attention, DecoderBlock, GatedMLP, TransformerLM
from lossland.models.unet import CrossAttention, TextEncoder, TextUNet
from lossland.models.vit import ViT

__all__ = ['Attention', 'CNN', 'CausalLM', 'CausalLMConfig', 'CrossAttention', 'DecoderBlock',
           'GatedMLP', 'MLP', 'TextEncoder', 'TextUNet', 'TransformerLM', 'ViT',
           'config_from_transformer_lm', 'init_cache', 'preferred_matmul_dtype']
