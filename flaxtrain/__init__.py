"""flaxtrain: small, tested pieces for training loops in Flax NNX.

Import it as ``import flaxtrain as ft``. Everything public is listed in
``__all__`` below; tests/test_api.py pins that list, so changing it is a
deliberate act. Each block names the module and the notebook that
introduces it.
"""

# losses (notebook 01)
from flaxtrain.losses import l2_penalty
from flaxtrain.losses import masked_mean
from flaxtrain.losses import mean_squared_error
from flaxtrain.losses import softmax_cross_entropy
from flaxtrain.losses import softmax_cross_entropy_with_integer_labels

# metrics (notebook 00)
from flaxtrain.metrics import accuracy

# steps (notebooks 00, 02)
from flaxtrain.losses import LossFn  # documented Protocol: help(ft.LossFn)
from flaxtrain.steps import classification_loss
from flaxtrain.steps import current_learning_rate
from flaxtrain.evaluation import eval_view
from flaxtrain.evaluation import evaluate
from flaxtrain.evaluation import make_eval_step
from flaxtrain.steps import make_train_step
from flaxtrain.steps import stack_batches

# data (notebook 00)
from flaxtrain.data import DataLoader
from flaxtrain.data import Splits
from flaxtrain.data import load_digits

# models (notebook 00)
from flaxtrain.models import CNN
from flaxtrain.models import MLP
from flaxtrain.models import TransformerLM  # notebook 11

# optim (notebook 03)
from flaxtrain.optim import make_optimizer

# schedules (notebook 04)
from flaxtrain.schedules import constant_schedule
from flaxtrain.schedules import exponential_decay
from flaxtrain.schedules import warmup_cosine

# history and plotting (notebook 00)
from flaxtrain.history import History
from flaxtrain.plotting import plot_history
from flaxtrain.plotting import plot_schedule

# live plots (notebook 08) and the learning-rate finder (notebook 04)
from flaxtrain.live import LivePlot
from flaxtrain.lr_finder import LRFinderResult
from flaxtrain.lr_finder import find_learning_rate
from flaxtrain.lr_finder import plot_lr_finder

# precision (notebook 06)
from flaxtrain.precision import DynamicLossScale
from flaxtrain.precision import adjust_loss_scale
from flaxtrain.precision import all_finite
from flaxtrain.precision import count_underflow
from flaxtrain.precision import dynamic_loss_scale
from flaxtrain.precision import param_bytes
from flaxtrain.precision import scale_loss
from flaxtrain.precision import unscale_grads

# debugging tools, used as ft.debug.grad_norms etc. (notebook 07)
from flaxtrain import debug

# interactive explorers, used as ft.widgets.schedule_explorer() etc. (notebooks 03, 04, 05)
from flaxtrain import widgets

# text for a character-level language model (notebook 11)
from flaxtrain.text import CharVocab
from flaxtrain.text import TextLoader
from flaxtrain.text import TextSplits
from flaxtrain.text import bigram_bits_per_char
from flaxtrain.text import load_python_docs
from flaxtrain.text import next_token_loss
from flaxtrain.text import sample_text
from flaxtrain.text import unigram_bits_per_char

# checkpoint and loop (notebook 08)
from flaxtrain.checkpoint import CheckpointError
from flaxtrain.checkpoint import CheckpointInfo
from flaxtrain.checkpoint import Checkpoints
from flaxtrain.checkpoint import restore_checkpoint
from flaxtrain.loop import fit
# many devices (notebook 10)
from flaxtrain.parallel import DataParallel

# export for inference, used as ft.export.load(path)(images) etc. (notebook 13)
from flaxtrain import export

# exercises at the end of notebooks 01-12, used as ft.exercises.check('04.1', answer)
from flaxtrain import exercises

__version__ = '0.1.0'

__all__ = [
    # losses
    'l2_penalty',
    'masked_mean',
    'mean_squared_error',
    'softmax_cross_entropy',
    'softmax_cross_entropy_with_integer_labels',
    # metrics
    'accuracy',
    # steps
    'LossFn',
    'classification_loss',
    'current_learning_rate',
    'eval_view',
    'evaluate',
    'make_eval_step',
    'make_train_step',
    'stack_batches',
    # data
    'DataLoader',
    'Splits',
    'load_digits',
    # models
    'CNN',
    'MLP',
    'TransformerLM',
    # optim
    'make_optimizer',
    # schedules
    'constant_schedule',
    'exponential_decay',
    'warmup_cosine',
    # history and plotting
    'History',
    'plot_history',
    'plot_schedule',
    # live plots and the learning-rate finder
    'LivePlot',
    'LRFinderResult',
    'find_learning_rate',
    'plot_lr_finder',
    # precision
    'DynamicLossScale',
    'adjust_loss_scale',
    'all_finite',
    'count_underflow',
    'dynamic_loss_scale',
    'param_bytes',
    'scale_loss',
    'unscale_grads',
    # debugging (a module: ft.debug.<name>, its own __all__)
    'debug',
    # explorers (a module: ft.widgets.<name>, its own __all__)
    'widgets',
    # text
    'CharVocab',
    'TextLoader',
    'TextSplits',
    'bigram_bits_per_char',
    'load_python_docs',
    'next_token_loss',
    'sample_text',
    'unigram_bits_per_char',
    # checkpoint and loop
    'CheckpointError',
    'CheckpointInfo',
    'Checkpoints',
    'restore_checkpoint',
    'fit',
    # many devices
    'DataParallel',
    # export for inference (a module: ft.export.<name>, its own __all__)
    'export',
    # exercises (a module: ft.exercises.check etc., its own __all__)
    'exercises',
]
