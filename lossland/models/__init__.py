"""Flax linen reference models. Params are plain pytrees; `model.apply` is pure."""
from lossland.models.cnn import CNN
from lossland.models.mlp import MLP
from lossland.models.precision import preferred_matmul_dtype
from lossland.models.transformer import Attention, DecoderBlock, GatedMLP, TransformerLM
from lossland.models.unet import CrossAttention, TextEncoder, TextUNet
from lossland.models.vit import ViT

__all__ = ['Attention', 'CNN', 'CrossAttention', 'DecoderBlock', 'GatedMLP', 'MLP', 'TextEncoder',
           'TextUNet', 'TransformerLM', 'ViT', 'preferred_matmul_dtype']
