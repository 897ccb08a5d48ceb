"""Live output in notebooks: training curves redrawn in place, and a text progress bar.

Both update one output area of the running cell through an IPython display
handle, so a notebook shows one figure and one progress line that change as
training goes on, and the stored notebook keeps their final state (a PNG and
plain text, which any viewer shows without JavaScript). Outside IPython the
figure is only redrawn, and the progress bar writes to stderr as usual.

Neither touches the device: they draw what a :class:`flaxtrain.History`
already holds, so call them where the loop already brings metrics to the host
(every ``log_every`` steps, at the end of an epoch), never every step.
"""

from __future__ import annotations

import difflib
import io
import numbers
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from matplotlib.figure import Figure
from tqdm.std import tqdm as _text_tqdm

from flaxtrain import checks
from flaxtrain.history import History
from flaxtrain.plotting import plot_history

__all__ = ['LivePlot', 'progress_bar']


def in_notebook() -> bool:
  """True inside a Jupyter kernel (IPython with a kernel attached)."""
  shell = sys.modules.get('IPython') and sys.modules['IPython'].get_ipython()
  return shell is not None and getattr(shell, 'kernel', None) is not None


def _display(data: dict[str, Any], handle: Any) -> Any:
  """Shows ``data`` (mime type -> content) in a new output, or in place of ``handle``'s."""
  from IPython.display import display
  if handle is None:
    return display(data, raw=True, display_id=True)
  handle.update(data, raw=True)
  return handle


class LivePlot:
  """Training curves that redraw in place, for ``fit(live_plot=...)`` or a hand-written loop.

  Each call to :meth:`update` draws ``metrics`` from a History on one row of
  axes (with :func:`flaxtrain.plot_history`) and replaces the previous drawing
  in the notebook, so the cell shows one figure that grows as training runs.
  Redraws are rate-limited to one every ``min_interval`` seconds unless
  forced (drawing a PNG takes tens of milliseconds).

  Args:
    metrics: the metrics to plot, one axes each, e.g. ``('loss', 'accuracy')``.
    min_interval: the least time between two unforced redraws, in seconds.
    log_scale: metrics to draw on a logarithmic y axis (e.g. ``('loss',)``).
    figsize: the figure size in inches; by default 4.5 wide per metric, 3.5 high.

  Example:
    >>> live = ft.LivePlot(('loss', 'accuracy'))          # doctest: +SKIP
    >>> for epoch in range(epochs):                        # doctest: +SKIP
    ...   ...  # train, history.record_step(...), history.record_epoch(...)
    ...   live.update(history)
  """

  def __init__(
      self,
      metrics: Sequence[str] = ('loss', 'accuracy'),
      *,
      min_interval: float = 1.0,
      log_scale: Sequence[str] = (),
      figsize: tuple[float, float] | None = None,
  ):
    if isinstance(metrics, str) or not metrics or not all(isinstance(m, str) for m in metrics):
      raise ValueError(f"metrics: expected a non-empty sequence of metric names such as ('loss',), got {metrics!r}")
    self.min_interval = checks.check_real(
        'min_interval', min_interval, expected='a number >= 0', valid=lambda v: v >= 0)
    if isinstance(log_scale, str) or not set(log_scale) <= set(metrics):
      raise ValueError(f'log_scale: expected a sequence of names from metrics {list(metrics)}, got {log_scale!r}')
    if figsize is not None and not (
        isinstance(figsize, (tuple, list)) and len(figsize) == 2
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < 1000 for v in figsize)):
      raise ValueError(f'figsize: expected (width, height) in inches, two numbers in (0, 1000), got {figsize!r}')
    self.metrics, self.log_scale = tuple(metrics), tuple(log_scale)
    self.figure = Figure(figsize=figsize or (4.5 * len(self.metrics), 3.5), layout='constrained')
    self._warned: set[str] = set()
    self.axes = self.figure.subplots(1, len(self.metrics), squeeze=False)[0]
    self.redraws = 0
    self._last = -float('inf')
    self._handle = None

  def update(self, history: History, *, force: bool = False) -> bool:
    """Redraws the curves from ``history`` if ``min_interval`` has passed or ``force``.

    Metrics not recorded yet are left blank. No device work: ``history``
    holds host floats.

    Args:
      history: the :class:`flaxtrain.History` to draw.
      force: redraw even if the last redraw was less than ``min_interval`` ago.

    Returns:
      True if it redrew.
    """
    if not isinstance(history, History):
      raise TypeError(f'history: expected a flaxtrain.History, got {type(history).__name__}')
    now = time.perf_counter()
    if not force and now - self._last < self.min_interval:
      return False
    self._last = now
    for ax, metric in zip(self.axes, self.metrics):
      ax.clear()
      try:
        plot_history(history, metric, ax=ax, log_scale=metric in self.log_scale)
      except ValueError:  # not recorded yet
        ax.set_title(f'{metric} (not recorded yet)')
    self._warn_unknown(history)
    self.redraws += 1
    self.show()
    return True

  def _warn_unknown(self, history: History) -> None:
    """Warns once per metric that is still not recorded after a whole epoch: a misspelled name."""
    epochs = history.epochs()
    if not len(epochs['epoch']):
      return  # before the first epoch ends, val_ metrics are legitimately missing
    known = {name for name in history.steps() if name != 'step'}
    known |= {name.split('_', 1)[1] for name in epochs if name.startswith(('train_', 'val_'))}
    for metric in self.metrics:
      if metric not in known and metric not in self._warned:
        self._warned.add(metric)
        close = difflib.get_close_matches(metric, sorted(known), n=1)
        hint = f' Did you mean {close[0]!r}?' if close else ''
        warnings.warn(f'metrics: nothing named {metric!r} was recorded in a whole epoch; the recorded '
                      f'metrics are {sorted(known)}.{hint}', RuntimeWarning, stacklevel=3)

  def show(self) -> None:
    """Puts the current figure in the notebook output, replacing the previous one."""
    if not in_notebook():
      return
    buffer = io.BytesIO()
    self.figure.savefig(buffer, format='png', dpi=80)
    self._handle = _display({'image/png': buffer.getvalue(),
                             'text/plain': f'<LivePlot of {", ".join(self.metrics)}>'}, self._handle)


class _DisplayFile:
  """A file for tqdm that shows the last line written in one notebook output, as text."""

  def __init__(self, show: Callable[[dict[str, Any], Any], Any] | None = None):
    self._show, self._handle, self.line = show, None, ''

  def write(self, text: str) -> None:
    lines = [part for part in text.replace('\r', '\n').split('\n') if part.strip()]
    if lines:
      self.line = lines[-1]
      self._handle = (self._show or _display)({'text/plain': self.line}, self._handle)

  def flush(self) -> None:
    pass


def progress_bar(total: int, *, initial: int = 0, disable: bool = False, **kwargs: Any) -> _text_tqdm:
  """A text tqdm bar; in a notebook it redraws one plain-text output in place.

  Unlike ``tqdm.auto`` (an ipywidget: it needs JavaScript, and a stored
  notebook shows it at its first state), the notebook keeps the bar's last
  line as text, e.g. ``epoch 5/5: 100%|##########| 1344/1344 [...]``. tqdm
  throttles writes to ten a second, and ``close()`` writes the final state.

  Args:
    total: the number of steps.
    initial: steps already done (a resumed run).
    disable: show nothing.
    **kwargs: passed to ``tqdm``.

  Returns:
    The ``tqdm`` bar.
  """
  if in_notebook() and not disable:
    kwargs.setdefault('file', _DisplayFile())
    kwargs.setdefault('ascii', True)  # no width is set: tqdm then never cuts the postfix off
  else:
    kwargs.setdefault('dynamic_ncols', True)
  return _text_tqdm(total=total, initial=initial, disable=disable, **kwargs)


def as_live_plot(live_plot: Any) -> LivePlot | None:
  """``fit``'s ``live_plot`` argument as a LivePlot (or None), validated."""
  if live_plot is None or live_plot is False:
    return None
  if live_plot is True:
    return LivePlot(('loss', 'accuracy'), log_scale=('loss',))
  if isinstance(live_plot, LivePlot):
    return live_plot
  if isinstance(live_plot, Sequence) and not isinstance(live_plot, str):
    return LivePlot(tuple(live_plot))
  raise TypeError(
      "live_plot: expected True, False, a sequence of metric names such as ('loss', 'accuracy') "
      f'or a flaxtrain.LivePlot, got {live_plot!r}'
  )
