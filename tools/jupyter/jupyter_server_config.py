"""Jupyter server settings for `make lab`: explorers are saved as their static image.

An explorer of ``flaxtrain.widgets`` run in JupyterLab is displayed as one output that holds
both a live widget view and a PNG of its figure. JupyterLab always prefers the widget view,
and in a notebook reopened after its kernel has gone it shows "Error displaying widget: model
not found" instead of the PNG. So that a saved notebook (Lab autosaves too) keeps what a reader
can see, this hook, run by the server before it writes a notebook, drops the widget view from
every output that carries an ``image/png`` beside it: the file keeps the image, the notebook on
screen keeps its live widget until it is closed. Outputs without such a fallback (other
widgets, progress bars) are saved unchanged.

`make lab` passes this file to JupyterLab (``JUPYTER_CONFIG_PATH``); it uses no flaxtrain code,
so the server does not import JAX.
"""

import warnings

WIDGET_VIEW = 'application/vnd.jupyter.widget-view+json'


def keep_static_fallbacks(model, **kwargs):
  """Pre-save hook: in a notebook, drop widget views whose output also holds an image/png.

  An output whose metadata holds ``{"flaxtrain": {"print_when_saved": text}}`` (an
  explorer's values and a note) gets that text printed below its image, as a stream
  output, so that the saved cell reads like one executed without widgets.

  Args:
    model: the contents model the server is about to write (``model['content']`` is the
      notebook as a dict when ``model['type'] == 'notebook'``).
    **kwargs: ``path`` and ``contents_manager``, unused.

  Returns:
    The number of outputs changed (the model is changed in place).

  Example:
    >>> model = {'type': 'notebook', 'content': {'cells': [{'cell_type': 'code', 'outputs': [
    ...     {'output_type': 'display_data', 'data': {WIDGET_VIEW: {}, 'image/png': 'iVBOR'}}]}]}}
    >>> keep_static_fallbacks(model)
    1
  """
  if model.get('type') != 'notebook' or not isinstance(model.get('content'), dict):
    return 0
  changed = 0
  for cell in model['content'].get('cells', []):
    if cell.get('cell_type') != 'code' or not isinstance(cell.get('outputs'), list):
      continue
    outputs = []
    for output in cell['outputs']:
      outputs.append(output)
      data = output.get('data')
      if not (isinstance(data, dict) and WIDGET_VIEW in data and 'image/png' in data):
        continue
      del data[WIDGET_VIEW]
      changed += 1
      text = (output.get('metadata') or {}).pop('flaxtrain', {}).get('print_when_saved')
      if isinstance(text, str) and text:
        outputs.append({'output_type': 'stream', 'name': 'stdout', 'text': text if text.endswith('\n') else text + '\n'})
    cell['outputs'] = outputs
  return changed


if 'get_config' in globals():  # loaded by Jupyter as a config file
  # The server and JupyterLab both load this file, so the hook is set twice; that is expected.
  warnings.filterwarnings('ignore', message='Overriding existing pre_save_hook', category=UserWarning)
  c = get_config()  # noqa: F821
  c.ContentsManager.pre_save_hook = keep_static_fallbacks
