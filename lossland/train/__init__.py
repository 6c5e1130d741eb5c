"""Train state, compiled steps, the host loop, checkpoints, optimizers, classifiers, rate sweeps."""
from lossland.train.checkpoint import (Checkpointer, CorruptCheckpointError,
                                       IncompatibleCheckpointError, WorkdirInUseError, WorkdirLock)
from lossland.train.classifier import (ClassifierResult, accuracy, eval_stack, fit_classifier,
                                       shuffled_batches)
from lossland.train.loop import FitResult, Interrupted, check_run_config, fit, tokens_per_second
from lossland.train.objectives import classification_loss, next_token_loss
from lossland.train.optim import adamw, warmup_constant, warmup_cosine
from lossland.train.steps import (EmaState, TrainState, init_train_state, make_evaluate,
                                  make_train_block, with_ema)
from lossland.train.sweep import RateSweep, extend_grid, sweep_rates

__all__ = ['Checkpointer', 'ClassifierResult', 'CorruptCheckpointError', 'EmaState', 'FitResult',
           'IncompatibleCheckpointError', 'Interrupted', 'RateSweep', 'TrainState',
           'WorkdirInUseError', 'WorkdirLock', 'accuracy', 'adamw', 'check_run_config',
           'classification_loss', 'eval_stack', 'extend_grid', 'fit', 'fit_classifier',
           'init_train_state', 'make_evaluate', 'make_train_block', 'next_token_loss',
           'shuffled_batches', 'sweep_rates', 'tokens_per_second', 'warmup_constant',
           'warmup_cosine', 'with_ema']
