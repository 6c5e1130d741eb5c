"""Train state, compiled steps, the host loop, checkpoints and optimizers."""
from lossland.train.checkpoint import (Checkpointer, CorruptCheckpointError,
                                       IncompatibleCheckpointError, WorkdirInUseError, WorkdirLock)
from lossland.train.loop import FitResult, Interrupted, check_run_config, fit, tokens_per_second
from lossland.train.objectives import classification_loss, next_token_loss
from lossland.train.optim import adamw, warmup_constant, warmup_cosine
from lossland.train.steps import (EmaState, TrainState, init_train_state, make_evaluate,
                                  make_train_block, with_ema)

__all__ = ['Checkpointer', 'CorruptCheckpointError', 'EmaState', 'FitResult',
           'IncompatibleCheckpointError', 'Interrupted', 'TrainState', 'WorkdirInUseError', 'WorkdirLock', 'adamw',
           'check_run_config', 'classification_loss', 'fit', 'init_train_state', 'make_evaluate',
           'make_train_block', 'next_token_loss', 'tokens_per_second', 'warmup_constant',
           'warmup_cosine', 'with_ema']
