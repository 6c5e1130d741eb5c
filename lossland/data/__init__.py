"""Datasets through tensorflow-datasets without TensorFlow, and deterministic batches."""
from lossland.data.blocks import stack_batches
from lossland.data.canaries import (Canaries, flip_labels, make_canaries, read_recitation_pairs,
                                     steps_for_repeats, write_recitation_pairs)
from lossland.data.images import ImageDataset, epoch_indices, load_image_dataset, load_shapes
from lossland.data.sources import data_source, default_data_dir
from lossland.data.text import (TextCorpus, Vocab, corpus_from_text, lm_batch, load_text_file,
                                load_tfds_text)

__all__ = ['Canaries', 'ImageDataset', 'TextCorpus', 'Vocab', 'corpus_from_text', 'data_source',
           'default_data_dir', 'epoch_indices', 'flip_labels', 'lm_batch', 'load_image_dataset',
           'load_shapes', 'load_text_file', 'load_tfds_text', 'make_canaries', 'read_recitation_pairs',
           'stack_batches', 'steps_for_repeats', 'write_recitation_pairs']
