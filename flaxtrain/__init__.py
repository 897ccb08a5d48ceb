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
from flaxtrain.steps import LossFn
from flaxtrain.steps import classification_loss
from flaxtrain.steps import current_learning_rate
from flaxtrain.steps import eval_view
from flaxtrain.steps import evaluate
from flaxtrain.steps import make_eval_step
from flaxtrain.steps import make_train_step

# data (notebook 00)
from flaxtrain.data import DataLoader
from flaxtrain.data import Splits
from flaxtrain.data import load_digits

# models (notebook 00)
from flaxtrain.models import CNN
from flaxtrain.models import MLP

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

# checkpoint and loop (notebook 08)
from flaxtrain.checkpoint import Checkpoints
from flaxtrain.checkpoint import restore_checkpoint
from flaxtrain.loop import fit

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
    # data
    'DataLoader',
    'Splits',
    'load_digits',
    # models
    'CNN',
    'MLP',
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
    # checkpoint and loop
    'Checkpoints',
    'restore_checkpoint',
    'fit',
]
