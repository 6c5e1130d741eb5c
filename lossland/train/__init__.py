"""Train state, compiled steps, the host loop, checkpoints and optimizers."""
from lossland.train.checkpoint import Checkpointer
from lossland.train.loop import FitResult, fit, tokens_per_second
from lossland.train.objectives import classification_loss, next_token_loss
from lossland.train.optim import adamw, warmup_cosine
from lossland.train.steps import TrainState, init_train_state, make_evaluate, make_train_block

__all__ = ['Checkpointer', 'FitResult', 'TrainState', 'adamw', 'classification_loss', 'fit',
           'init_train_state', 'make_evaluate', 'make_train_block', 'next_token_loss',
           'tokens_per_second', 'warmup_cosine']
