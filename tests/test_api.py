"""The public API is pinned: notebooks and users import these names."""

import flaxtrain

EXPECTED = {
    # losses
    'l2_penalty', 'masked_mean', 'mean_squared_error', 'softmax_cross_entropy',
    'softmax_cross_entropy_with_integer_labels',
    # metrics
    'accuracy',
    # steps
    'LossFn', 'classification_loss', 'current_learning_rate', 'eval_view', 'evaluate', 'make_eval_step', 'make_train_step',
    'stack_batches',
    # data
    'DataLoader', 'Splits', 'load_digits',
    # models
    'CNN', 'MLP', 'TransformerLM',
    # text
    'CharVocab', 'TextLoader', 'TextSplits', 'bigram_bits_per_char', 'load_python_docs', 'next_token_loss',
    'sample_text', 'unigram_bits_per_char',
    # optim
    'make_optimizer',
    # schedules
    'constant_schedule', 'exponential_decay', 'warmup_cosine',
    # history and plotting
    'History', 'plot_history', 'plot_schedule',
    # precision
    'DynamicLossScale', 'adjust_loss_scale', 'all_finite', 'count_underflow', 'dynamic_loss_scale',
    'param_bytes', 'scale_loss', 'unscale_grads',
    # debugging: a module, used as ft.debug.<name>
    'debug',
    # explorers: a module, used as ft.widgets.<name>
    'widgets',
    # checkpoint and loop
    'CheckpointError', 'CheckpointInfo', 'Checkpoints', 'restore_checkpoint', 'fit',
    'LivePlot', 'LRFinderResult', 'find_learning_rate', 'plot_lr_finder',
    # many devices
    'DataParallel',
    # export for inference: a module, used as ft.export.<name>
    'export',
    # exercises: a module, used as ft.exercises.check(...)
    'exercises',
}

MODULES = {'debug', 'widgets', 'exercises', 'export'}  # exported modules; their own __all__ is pinned below

DEBUG = {
    'grad_norms', 'NonFinite', 'find_nonfinite', 'check_finite', 'layer_outputs', 'dead_relu_fraction',
    'OverfitResult', 'overfit_one_batch', 'Compilations', 'count_compilations', 'Throughput', 'throughput',
}


def test_all_is_pinned():
  assert set(flaxtrain.__all__) == EXPECTED
  assert len(flaxtrain.__all__) == len(set(flaxtrain.__all__)), 'duplicate names in __all__'


def test_every_exported_name_exists_and_is_documented():
  for name in flaxtrain.__all__:
    obj = getattr(flaxtrain, name)
    if callable(obj) and name != 'LossFn':
      assert obj.__doc__ and obj.__doc__.strip(), f'{name} has no docstring'


def test_no_unexported_public_functions_leak():
  public = {n for n in vars(flaxtrain) if not n.startswith('_')}
  modules = {n for n in public if type(getattr(flaxtrain, n)).__name__ == 'module'}
  assert public - modules - {'annotations'} == EXPECTED - MODULES
  assert MODULES <= modules


def test_debug_module_is_pinned_and_documented():
  assert set(flaxtrain.debug.__all__) == DEBUG
  for name in DEBUG:
    assert getattr(flaxtrain.debug, name).__doc__.strip(), f'debug.{name} has no docstring'


WIDGETS = {'schedule_explorer', 'clipping_explorer', 'optimizer_explorer'}


def test_widgets_module_is_pinned_and_documented():
  assert set(flaxtrain.widgets.__all__) == WIDGETS
  for name in WIDGETS:
    assert getattr(flaxtrain.widgets, name).__doc__.strip(), f'widgets.{name} has no docstring'


EXERCISES = {'Result', 'check', 'ids', 'solution', 'solutions'}


def test_exercises_module_is_pinned_and_documented():
  assert set(flaxtrain.exercises.__all__) == EXERCISES
  for name in EXERCISES:
    assert getattr(flaxtrain.exercises, name).__doc__.strip(), f'exercises.{name} has no docstring'


EXPORT = {
    'InferenceModel', 'Predictor', 'dequantize_int8', 'export_model', 'inference_model', 'load', 'load_weights',
    'quantize_int8', 'save_weights',
}


def test_export_module_is_pinned_and_documented():
  assert set(flaxtrain.export.__all__) == EXPORT
  for name in EXPORT:
    assert getattr(flaxtrain.export, name).__doc__.strip(), f'export.{name} has no docstring'
