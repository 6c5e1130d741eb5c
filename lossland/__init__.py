"""lossland: studying and shaping loss landscapes and representations in JAX.

Subpackages: `models`, `data`, `parallel`, `train` (shared machinery) and the
method modules `curvature`, `stitching`, `guidance`, `lowrank`.
"""
from lossland import data, models, parallel, train
from lossland import curvature, guidance, lowrank, stitching
from lossland.data import lm_batch, load_image_dataset, load_text_file, load_tfds_text
from lossland.models import CNN, MLP, TransformerLM, ViT
from lossland.parallel import make_mesh, param_shardings, shard_batch
from lossland.train import adamw, fit, next_token_loss, warmup_cosine

__version__ = '0.1.0'
