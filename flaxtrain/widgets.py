"""Interactive explorers for notebooks: move a slider, see what the library does.

Each function returns an explorer that shows itself when it is the last
expression of a cell:

* :func:`schedule_explorer` (notebook 04): a learning-rate schedule built by
  :func:`flaxtrain.warmup_cosine` or :func:`flaxtrain.exponential_decay`,
  redrawn as its settings change, with the rate at chosen steps;
* :func:`clipping_explorer` (notebook 05): recorded gradient norms before and
  after ``optax.clip_by_global_norm`` (what ``make_optimizer(clip_norm=...)``
  chains in), and the fraction of steps clipped, for a threshold on a slider;
* :func:`optimizer_explorer` (notebook 03): SGD, SGD with momentum and Adam,
  built by :func:`flaxtrain.make_optimizer`, walking the same 2-D loss surface.

In a kernel started by a Jupyter server (JupyterLab, Notebook 7) an explorer
is a live ipywidget, displayed as one output that also holds a PNG of its
starting figure and its values as text. JupyterLab shows the widget while the
kernel that made it runs; once that kernel is gone (the notebook reopened
later) it would show "Error displaying widget: model not found" instead of the
PNG, so ``make lab`` saves such outputs as their PNG and text only (a pre-save
hook in ``tools/jupyter/jupyter_server_config.py``): a saved notebook shows the
static image in JupyterLab, in nbconvert and on a code host. In a notebook
executed headless to be stored (nbclient, ``make notebooks``) an explorer shows
that PNG and prints its values, so the stored notebook shows the default
settings to a reader on a code host, where widgets cannot run. ``explorer.widget`` is the live widget itself, to display
explicitly in a front end that supports widgets but is not detected (e.g. an
editor that starts kernels itself).

Every explorer has the same Python API: ``set(**settings)`` changes settings
(the sliders call it too) and returns whether they were accepted; settings the
library refuses leave the last good figure and put the library's message in
``message`` (shown in red in the widget), never a traceback. ``settings``,
``values``, ``text``, ``png`` and ``figure`` hold the current state, and
``controls`` maps each setting to its ipywidgets control. Redraws recompute
only what the changed settings affect and bring results to the host once.
"""

from __future__ import annotations

import html
import io
import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure

from flaxtrain import checks
from flaxtrain.live import in_notebook
from flaxtrain.optim import make_optimizer
from flaxtrain.schedules import exponential_decay
from flaxtrain.schedules import warmup_cosine

__all__ = ['schedule_explorer', 'clipping_explorer', 'optimizer_explorer']

STATIC_NOTE = 'Static image of the default settings: run the notebook in JupyterLab to move the sliders.'
SAVED_NOTE = 'Static image of the settings the explorer started with: run the cell again to move the sliders.'
SLIDER_WIDTH = '500px'        # about 280 px of track (it was about 70): fine enough to drag
DESCRIPTION_WIDTH = '150px'


def _widget_frontend() -> bool:
  """True in a kernel that a widget front end is likely to show: one started for a Jupyter server's UI.

  A Jupyter server (JupyterLab, Notebook 7) starts each notebook's kernel
  with ``JPY_SESSION_NAME`` set; a notebook executed headless (nbclient,
  nbval, ``make notebooks``) has none. Other front ends that show widgets
  (VS Code) can show ``explorer.widget`` with ``display``.
  """
  return in_notebook() and bool(os.environ.get('JPY_SESSION_NAME'))


def _png(figure: Figure) -> bytes:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=80)
  return buffer.getvalue()


class Explorer:
  """Base of the explorers: settings, validation, redraws, controls and display.

  Subclasses define ``_check(settings)`` (raise ValueError naming the
  setting), ``_update(settings, changed)`` (compute what changed, redraw the
  figure, return the values and their text) and ``_make_controls()``.
  """

  def __init__(self, settings: dict[str, Any]):
    self.settings: dict[str, Any] = {}
    self.message = ''
    self.redraws = 0
    self.values: dict[str, Any] = {}
    self.text = ''
    self.png = b''
    self._ui = None
    self._controls: dict[str, Any] = {}
    self._syncing = False
    self._check(settings)
    self._apply(dict(settings), set(settings))

  # The Python API.

  def set(self, **changes: Any) -> bool:
    """Changes settings and redraws; returns False, with ``message`` set, for settings the library refuses.

    Args:
      **changes: new values of settings named in ``settings``.

    Returns:
      True if the settings were accepted and the figure redrawn; False if they
      were refused (the previous settings, figure and values stay).

    Raises:
      ValueError: for a name that is not a setting of this explorer.
    """
    unknown = sorted(set(changes) - set(self.settings))
    if unknown:
      raise ValueError(f'set: expected settings among {sorted(self.settings)}, got {unknown}')
    new = {**self.settings, **changes}
    changed = {k for k, v in changes.items() if not _same(v, self.settings[k])}
    try:
      self._check(new)
    except (ValueError, TypeError) as error:
      self._show_message(str(error))
      return False
    self._apply(new, changed)
    self._show_message('')
    self._sync_controls()
    return True

  @property
  def controls(self) -> dict[str, Any]:
    """The ipywidgets control of each setting (built on first use)."""
    self._build()
    return self._controls

  @property
  def widget(self) -> Any:
    """The live widget: controls, message, figure and values (built on first use)."""
    self._build()
    return self._ui

  # Internals.

  def _apply(self, settings: dict[str, Any], changed: set[str]) -> None:
    values, self.text = self._update(settings, changed)
    self.settings = settings
    if values is self.values:  # nothing drawn changed: keep the PNG
      return
    self.values = values
    self.png = _png(self.figure)
    self.redraws += 1
    if self._ui is not None:
      self._image.value = self.png
      self._values.value = f'<pre style="margin:0">{html.escape(self.text)}</pre>'

  def _show_message(self, message: str) -> None:
    self.message = message
    if self._ui is not None:
      self._message.value = (f'<span style="color:#b00020">{html.escape(message)}</span>' if message else '')

  def _on_control(self, name: str, value: Any) -> None:
    if self._syncing:
      return
    try:  # every control's value: one moved into a refused combination counts once another fixes it
      settings = self._constrain({**{n: c.value for n, c in self._controls.items()}, name: value}, name)
      self.set(**settings)
    except Exception as error:  # a callback must never raise: show it instead
      self._show_message(f'{name}: {type(error).__name__}: {error}')

  def _sync_controls(self) -> None:
    if self._ui is None:
      return
    self._syncing = True
    try:
      self._after_sync()   # ranges first, so that no new value is clamped by an old range
      for name, control in self._controls.items():
        if not _same(control.value, self.settings[name]):
          control.value = self.settings[name]
      self._after_sync()
    finally:
      self._syncing = False

  def _after_sync(self) -> None:
    """Hook: adjust controls (enable or disable them, tie one's range to another's value) after settings change."""

  def _constrain(self, settings: dict[str, Any], moved: str) -> dict[str, Any]:
    """Hook: the settings a slider move asks for, kept inside the ranges that make them valid together."""
    return settings

  def _build(self) -> None:
    if self._ui is not None:
      return
    import ipywidgets as w
    self._controls = self._make_controls()
    for name, control in self._controls.items():
      control.observe(lambda change, name=name: self._on_control(name, change['new']), names='value')
    self._message = w.HTML('')
    self._image = w.Image(value=self.png, format='png')
    self._values = w.HTML(f'<pre style="margin:0">{html.escape(self.text)}</pre>')
    controls = w.Box(list(self._controls.values()),   # as many wide sliders per row as fit, then the next row
                     layout=w.Layout(display='flex', flex_flow='row wrap'))
    self._ui = w.VBox([controls, self._message, self._image, self._values])
    self._syncing = True
    try:
      self._after_sync()
    finally:
      self._syncing = False
    self._show_message(self.message)

  def _ipython_display_(self) -> None:
    from IPython.display import display
    if _widget_frontend():
      # One output: the live widget, and the static image and values for wherever the widget cannot show
      # (nbconvert, a code host, and JupyterLab once `make lab`'s pre-save hook has dropped the widget view).
      bundle = self.widget._repr_mimebundle_()
      bundle['image/png'] = self.png
      bundle['text/plain'] = f'{self.text}\n{SAVED_NOTE}'
      # The hook prints the values and the note below the saved image, as a headless run shows them.
      display(bundle, raw=True, metadata={'flaxtrain': {'print_when_saved': bundle['text/plain']}})
    else:
      display({'image/png': self.png, 'text/plain': f'<{type(self).__name__} (static image)>'}, raw=True)
      print(self.text)
      print(STATIC_NOTE)

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.settings})'


def _same(a: Any, b: Any) -> bool:
  return type(a) is type(b) and a == b


def _slider_style() -> dict[str, Any]:
  import ipywidgets as w
  return dict(style={'description_width': DESCRIPTION_WIDTH}, layout=w.Layout(width=SLIDER_WIDTH),
              continuous_update=False)


# Learning-rate schedules (notebook 04).

_KINDS = ('warmup_cosine', 'exponential_decay')
_SCHEDULE_KEYS = {
    'warmup_cosine': ('peak_value', 'total_steps', 'warmup_steps', 'alpha'),
    'exponential_decay': ('peak_value', 'total_steps', 'transition_steps', 'decay_rate', 'staircase'),
}


class ScheduleExplorer(Explorer):
  """A learning-rate schedule and its rate at chosen steps; see :func:`schedule_explorer`."""

  def __init__(self, settings: dict[str, Any], at_steps: Sequence[int] | None, max_steps: int):
    self.at_steps_given = None if at_steps is None else tuple(int(s) for s in at_steps)
    self.max_steps = max_steps
    self.computes = 0
    self._key = None
    self._cache: dict[tuple[Any, ...], np.ndarray] = {}
    self.figure = Figure(figsize=(7.5, 3.4), layout='constrained')
    self.axes = self.figure.subplots()
    (self._line,) = self.axes.plot([], [], lw=2)
    (self._points,) = self.axes.plot([], [], 'o', color='C3', ms=5, label='rates printed below')
    self._warmup_line = self.axes.axvline(0, color='gray', ls=':', lw=1)
    self.axes.set(xlabel='step t (update t uses schedule(t))', ylabel='learning rate')
    self.axes.grid(alpha=0.3)
    self.axes.legend(loc='upper right', fontsize=8)
    super().__init__(settings)

  def schedule(self, settings: dict[str, Any] | None = None) -> optax.Schedule:
    """The schedule for ``settings`` (default: the current ones), built by flaxtrain."""
    s = self.settings if settings is None else settings
    if s['kind'] == 'warmup_cosine':
      return warmup_cosine(s['peak_value'], s['total_steps'], s['warmup_steps'], alpha=s['alpha'])
    return exponential_decay(s['peak_value'], s['transition_steps'], s['decay_rate'], staircase=s['staircase'])

  def at_steps(self, settings: dict[str, Any] | None = None) -> tuple[int, ...]:
    """The steps whose rate is printed: as given, or 0, the end of warmup, the middle and the last step."""
    s = self.settings if settings is None else settings
    if self.at_steps_given is not None:
      return self.at_steps_given
    middle = s['warmup_steps'] if s['kind'] == 'warmup_cosine' else s['transition_steps']
    return tuple(sorted({0, min(middle, s['total_steps'] - 1), s['total_steps'] // 2, s['total_steps'] - 1}))

  def _check(self, settings: dict[str, Any]) -> None:
    if settings['kind'] not in _KINDS:
      raise ValueError(f'kind: expected one of {list(_KINDS)}, got {settings["kind"]!r}')
    checks.check_int('total_steps', settings['total_steps'], minimum=1)
    try:
      self.schedule(settings)  # the library's own checks, with its messages
    except ValueError as error:  # exponential_decay calls the peak its init_value
      message = str(error)
      if message.startswith('init_value:'):
        raise ValueError('peak_value' + message[len('init_value'):]) from None
      raise

  def _update(self, settings: dict[str, Any], changed: set[str]) -> tuple[dict[str, Any], str]:
    key = (settings['kind'],) + tuple(settings[k] for k in _SCHEDULE_KEYS[settings['kind']]) + (self.at_steps(settings),)
    if key == self._key:
      return self.values, self.text
    total, at = settings['total_steps'], self.at_steps(settings)
    steps = np.arange(total + max(1, total // 10), dtype=np.int32)   # a little past the end of the run
    # One jitted, vectorised evaluation of the curve and the chosen steps, on int32 steps as in an
    # optimizer (so the values are the ones training would use, to the last bit); one transfer.
    # Settings seen before (a slider moved back) are not recomputed: each evaluation compiles the new schedule.
    if key not in self._cache:
      queried = np.concatenate([steps, np.asarray(at, dtype=np.int32)])
      if len(self._cache) >= 128:
        self._cache.pop(next(iter(self._cache)))
      schedule = self.schedule(settings)
      self._cache[key] = np.asarray(jax.jit(jax.vmap(schedule))(queried), dtype=np.float64)
      self.computes += 1
    rates = self._cache[key]
    self._key = key
    curve, at_rates = rates[:steps.size], rates[steps.size:]
    self._line.set_data(steps, curve)
    self._points.set_data(np.asarray(at), at_rates)
    warmup = settings['warmup_steps'] if settings['kind'] == 'warmup_cosine' else 0
    self._warmup_line.set_xdata([warmup, warmup])
    self._warmup_line.set_visible(warmup > 0)
    self.axes.set_xlim(0, steps[-1])
    self.axes.set_ylim(0, 1.08 * max(float(curve.max()), 1e-12))
    if settings['kind'] == 'warmup_cosine':
      title = (f"ft.warmup_cosine(peak {settings['peak_value']:.2g}, {total} steps, warmup "
               f"{settings['warmup_steps']}, alpha {settings['alpha']:g})")
    else:
      title = (f"ft.exponential_decay(init {settings['peak_value']:.2g}, x{settings['decay_rate']:g} every "
               f"{settings['transition_steps']} steps, staircase={settings['staircase']})")
    self.axes.set_title(title, fontsize=9)
    values = {'steps': steps, 'rates': curve, 'at_steps': at, 'rates_at': dict(zip(at, at_rates.tolist()))}
    width = max(10, max(len(str(s)) for s in at) + 2)
    text = ('step  ' + ''.join(f'{s:>{width}d}' for s in at) + '\nrate  '
            + ''.join(f'{r:>{width}.3e}' for r in at_rates))
    return values, text

  def _make_controls(self) -> dict[str, Any]:
    import ipywidgets as w
    s, style = self.settings, _slider_style()
    return {
        'kind': w.Dropdown(options=list(_KINDS), value=s['kind'], description='schedule',
                           style=style['style'], layout=style['layout']),
        'peak_value': w.FloatLogSlider(value=s['peak_value'], base=10, min=-5, max=0, step=0.05,
                                       description='peak rate', readout_format='.2e', **style),
        'total_steps': w.IntSlider(value=s['total_steps'], min=1, max=self.max_steps, description='total steps', **style),
        'warmup_steps': w.IntSlider(value=s['warmup_steps'], min=0, max=self.max_steps,
                                    description='warmup steps', **style),
        'alpha': w.FloatSlider(value=s['alpha'], min=0.0, max=1.0, step=0.01, description='alpha (final/peak)', **style),
        'transition_steps': w.IntSlider(value=s['transition_steps'], min=1, max=self.max_steps,
                                        description='transition steps', **style),
        'decay_rate': w.FloatSlider(value=s['decay_rate'], min=0.05, max=1.0, step=0.01, description='decay rate', **style),
        'staircase': w.Checkbox(value=s['staircase'], description='staircase', indent=False, layout=style['layout']),
    }

  def _constrain(self, settings: dict[str, Any], moved: str) -> dict[str, Any]:
    # A warmup longer than the run is refused by warmup_cosine: the warmup slider ends at the total steps,
    # and shortening the run below the warmup pulls the warmup down with it.
    if moved == 'total_steps' and settings['warmup_steps'] > settings['total_steps']:
      return {**settings, 'warmup_steps': settings['total_steps']}
    return settings

  def _after_sync(self) -> None:
    self._controls['warmup_steps'].max = self.settings['total_steps']
    cosine = self.settings['kind'] == 'warmup_cosine'
    for name in ('warmup_steps', 'alpha'):
      self._controls[name].disabled = not cosine
    for name in ('transition_steps', 'decay_rate', 'staircase'):
      self._controls[name].disabled = cosine


def schedule_explorer(
    peak_value: float = 1e-3,
    total_steps: int = 500,
    warmup_steps: int = 100,
    *,
    alpha: float = 0.0,
    kind: str = 'warmup_cosine',
    transition_steps: int = 100,
    decay_rate: float = 0.5,
    staircase: bool = False,
    at_steps: Sequence[int] | None = None,
    max_steps: int | None = None,
) -> ScheduleExplorer:
  """Sliders for a learning-rate schedule built by flaxtrain; redraws it and prints the rate at chosen steps.

  ``kind='warmup_cosine'`` draws :func:`flaxtrain.warmup_cosine`
  (``peak_value``, ``total_steps``, ``warmup_steps``, ``alpha``);
  ``kind='exponential_decay'`` draws :func:`flaxtrain.exponential_decay`
  with ``peak_value`` as its initial rate (``transition_steps``,
  ``decay_rate``, ``staircase``). The curve runs a tenth past
  ``total_steps``. The warmup slider ends at the total steps, and shortening
  the run pulls the warmup down with it, so the sliders only reach settings
  the builders accept. Settings they refuse when passed to ``set`` (a warmup
  longer than the run, a negative rate, ``alpha`` outside [0, 1]) show the
  builder's message in the widget and keep the last good figure.

  Args:
    peak_value: the peak (cosine) or initial (exponential) rate, >= 0.
    total_steps: length of the run, warmup included; a positive int.
    warmup_steps: linear warmup, an int in ``[0, total_steps]``.
    alpha: final rate of the cosine as a fraction of the peak, in [0, 1].
    kind: ``'warmup_cosine'`` or ``'exponential_decay'``.
    transition_steps: steps per factor ``decay_rate`` (exponential), >= 1.
    decay_rate: factor per ``transition_steps`` (exponential), in (0, 1].
    staircase: drops (True) or a smooth decay (False), exponential only.
    at_steps: steps whose rate is printed; by default 0, the end of the
      warmup (or the first transition), the middle and the last step.
    max_steps: the largest step count the sliders offer; by default
      ``2 * max(total_steps, warmup_steps, transition_steps)``.

  Returns:
    A :class:`ScheduleExplorer`; ``values['rates_at']`` maps each printed
    step to its rate, ``computes`` counts schedule evaluations.

  Raises:
    ValueError: for a starting setting the builders refuse, naming it, or
      ``at_steps`` / ``max_steps`` that are not ints >= 0 / >= 1.

  Example:
    >>> explorer = ft.widgets.schedule_explorer(1e-3, total_steps=500, warmup_steps=100)
    >>> explorer.set(warmup_steps=50)
    True
    >>> explorer.set(warmup_steps=600)   # longer than the run: refused, shown as a message
    False
  """
  if at_steps is not None:
    if isinstance(at_steps, (str, bytes)) or not isinstance(at_steps, Sequence) or not at_steps:
      raise ValueError(f'at_steps: expected a non-empty sequence of steps (ints >= 0), got {at_steps!r}')
    for step in at_steps:
      checks.check_int('at_steps', step, minimum=0)
  settings = dict(kind=kind, peak_value=peak_value, total_steps=total_steps, warmup_steps=warmup_steps,
                  alpha=alpha, transition_steps=transition_steps, decay_rate=decay_rate, staircase=staircase)
  # Both kinds are checked up front: the sliders switch between them.
  for name in ('total_steps', 'transition_steps'):
    checks.check_int(name, settings[name], minimum=1)
  warmup_cosine(peak_value, total_steps, warmup_steps, alpha=alpha)
  exponential_decay(peak_value, transition_steps, decay_rate, staircase=staircase)
  largest = 2 * max(total_steps, warmup_steps, transition_steps)
  max_steps = largest if max_steps is None else checks.check_int('max_steps', max_steps, minimum=1)
  if max_steps < max(total_steps, warmup_steps, transition_steps):
    raise ValueError(f'max_steps: expected at least total_steps, warmup_steps and transition_steps '
                     f'({max(total_steps, warmup_steps, transition_steps)}), got {max_steps}')
  return ScheduleExplorer(settings, at_steps, max_steps)


# Gradient clipping (notebook 05).

@jax.jit
def _norms_after_clipping(grads: Any, threshold: jax.Array) -> jax.Array:
  """The global norm of each step's gradients after ``optax.clip_by_global_norm(threshold)``."""
  clip = optax.clip_by_global_norm(threshold)

  def one(step_grads):
    clipped, _ = clip.update(step_grads, clip.init(step_grads))
    return optax.tree.norm(clipped)
  return jax.vmap(one)(grads)


class ClippingExplorer(Explorer):
  """Recorded gradient norms before and after clipping; see :func:`clipping_explorer`."""

  def __init__(self, grads: Any, norms: np.ndarray, threshold: float, bounds: tuple[float, float]):
    self._grads, self.norms, self.bounds = grads, norms, bounds
    self.computes = 0
    steps = np.arange(norms.size)
    self.figure = Figure(figsize=(7.5, 3.4), layout='constrained')
    self.axes = self.figure.subplots()
    self.axes.plot(steps, norms, color='C3', lw=1, alpha=0.6, label='before clipping')
    (self._after,) = self.axes.plot([], [], color='C0', lw=1.5, label='after clipping')
    self._threshold_line = self.axes.axhline(threshold, color='gray', ls='--', lw=1, label='threshold c')
    self.axes.set(xlabel='step', ylabel='global gradient norm', yscale='log', xlim=(0, max(1, norms.size - 1)))
    self.axes.set_ylim(bounds[0] / 1.5, bounds[1] * 1.5)
    self.axes.grid(alpha=0.3)
    self.axes.legend(loc='upper right', fontsize=8)
    super().__init__({'threshold': threshold})

  def _check(self, settings: dict[str, Any]) -> None:
    checks.check_real('threshold', settings['threshold'], expected='a clip threshold > 0 (the largest norm kept)',
                       valid=lambda v: v > 0)

  def _update(self, settings: dict[str, Any], changed: set[str]) -> tuple[dict[str, Any], str]:
    c = float(settings['threshold'])
    after = np.asarray(_norms_after_clipping(self._grads, jnp.float32(c)), dtype=np.float64)   # the one transfer
    self.computes += 1
    clipped = float(np.mean(self.norms > c))
    self._after.set_data(np.arange(after.size), after)
    self._threshold_line.set_ydata([c, c])
    self.axes.set_title(f'optax.clip_by_global_norm({c:.3g}): {clipped:.0%} of {after.size} steps clipped', fontsize=9)
    values = {'threshold': c, 'after': after, 'fraction_clipped': clipped,
              'max_before': float(self.norms.max()), 'max_after': float(after.max())}
    text = (f'threshold {c:.3g}: clipped at {clipped:.0%} of {after.size} steps; largest norm '
            f'{values["max_before"]:.3g} before, {values["max_after"]:.3g} after; median '
            f'{float(np.median(self.norms)):.3g} before, {float(np.median(after)):.3g} after')
    return values, text

  def _make_controls(self) -> dict[str, Any]:
    import ipywidgets as w
    low, high = (math.floor(math.log10(b)) for b in (self.bounds[0], self.bounds[1]))
    high = max(high + 1, low + 1)
    return {'threshold': w.FloatLogSlider(value=self.settings['threshold'], base=10, min=low, max=high, step=0.02,
                                          description='threshold c', readout_format='.3g', **_slider_style())}


def clipping_explorer(grads: Any, threshold: float = 1.0) -> ClippingExplorer:
  """A threshold slider over recorded gradients: their norms before and after clipping, and how often it clips.

  Clipping is ``optax.clip_by_global_norm``, the transformation
  ``ft.make_optimizer(clip_norm=...)`` chains in, applied to every recorded
  step at once (vmapped and jitted; the threshold is an argument, so moving it
  compiles nothing). The recorded gradients stay fixed: the explorer shows
  what the threshold would do to *these* gradients, not how a run trained with
  it would have gone. A threshold <= 0 shows a message in the widget.

  Args:
    grads: either a 1-D array of recorded global gradient norms, e.g.
      ``history.steps()['grad_norm']`` (each is clipped as a one-number
      gradient of that norm), or a pytree of gradient arrays stacked along a
      leading step axis. Finite, at least one step.
    threshold: the starting threshold ``c``, > 0.

  Returns:
    A :class:`ClippingExplorer`; ``norms`` holds the norms before clipping,
    ``values`` the norms after, the fraction of steps clipped and the
    largest norms; ``computes`` counts clipping passes.

  Raises:
    ValueError: for an empty, non-finite, negative or badly shaped ``grads``,
      or a ``threshold`` that is not a finite number > 0.

  Example:
    >>> explorer = ft.widgets.clipping_explorer(history.steps()['grad_norm'], threshold=1.0)  # doctest: +SKIP
    >>> explorer.set(threshold=2.0)                                                          # doctest: +SKIP
    True
  """
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError(f'grads: expected a 1-D array of gradient norms or a pytree of stacked gradients, got {grads!r}')
  numbers_only = isinstance(grads, (list, tuple)) and all(
      isinstance(v, numbers.Real) and not isinstance(v, bool) for v in grads)
  if numbers_only or isinstance(grads, (np.ndarray, jax.Array)):
    grads = np.asarray(grads)
    if grads.ndim != 1:
      raise ValueError(f'grads: expected a 1-D array of gradient norms (one per step), got shape {grads.shape}; '
                       'pass stacked gradients as a pytree, e.g. {"w": array}')
    if not np.issubdtype(grads.dtype, np.number) or grads.size == 0:
      raise ValueError(f'grads: expected a non-empty 1-D array of gradient norms, '
                       f'got dtype {grads.dtype} shape {grads.shape}')
    if not np.all(np.isfinite(grads)) or np.any(grads < 0):
      bad = np.flatnonzero(~np.isfinite(grads) | (grads < 0))
      raise ValueError(f'grads: expected finite norms >= 0, got {bad.size} other values (first at step {bad[0]}: '
                       f'{grads[bad[0]]!r}); leave those steps out, e.g. norms[np.isfinite(norms)]')
    grads = jnp.asarray(grads, jnp.float32)
    norms = np.asarray(grads, np.float64)
  else:
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
      raise ValueError(f'grads: expected every gradient array stacked along a leading step axis of one size, '
                       f'got shapes {[np.shape(leaf) for leaf in leaves]}')
    for leaf in leaves:
      checks.check_floating('grads', leaf)
    norms = np.asarray(jax.vmap(optax.tree.norm)(grads), np.float64)
    if not np.all(np.isfinite(norms)):
      bad = np.flatnonzero(~np.isfinite(norms))
      raise ValueError(f'grads: expected finite gradients, got non-finite ones at {bad.size} steps '
                       f'(the first: {bad[:5].tolist()})')
  threshold = checks.check_real('threshold', threshold, expected='a clip threshold > 0', valid=lambda v: v > 0)
  positive = norms[norms > 0]
  low = float(min(positive.min() if positive.size else threshold, threshold))
  high = float(max(norms.max(), threshold))
  return ClippingExplorer(grads, norms, threshold, (low, high))


# Optimizers on a 2-D loss surface (notebook 03).

def ravine(w: jax.Array) -> jax.Array:
  """The default surface: a long, narrow valley, ``0.05 x**2 + 2 y**2``, minimum 0 at the origin.

  Its curvature is 40 times larger across the valley (y) than along it (x),
  the shape on which plain SGD zigzags and crawls.
  """
  return 0.05 * w[0] ** 2 + 2.0 * w[1] ** 2


_PATHS = {  # optimizer path -> (make_optimizer name, the settings it depends on)
    'SGD': ('sgd', ('sgd_learning_rate',)),
    'momentum': ('sgd', ('sgd_learning_rate', 'momentum')),
    'Adam': ('adam', ('adam_learning_rate', 'b1', 'b2')),
}
_COLORS = {'SGD': 'C0', 'momentum': 'C1', 'Adam': 'C2'}


def _path_runner(loss_fn: Callable[[jax.Array], jax.Array], path: str, num_steps: int) -> Callable[..., jax.Array]:
  """A jitted ``run(start, hyperparameters) -> (positions, losses)`` for one optimizer.

  ``positions`` has shape ``(num_steps + 1, 2)``, start included, and
  ``losses`` the loss at each of them.

  The optimizer comes from :func:`flaxtrain.make_optimizer`, whose state holds
  its hyperparameters (``optax.inject_hyperparams``): they are passed in as
  arrays, so changing them compiles nothing.
  """
  name, _ = _PATHS[path]
  placeholders = {'SGD': {}, 'momentum': {'momentum': 0.5}, 'Adam': {'b1': 0.5, 'b2': 0.5}}[path]
  tx = make_optimizer(name, 0.1, **placeholders)
  grad = jax.grad(loss_fn)

  @jax.jit
  def run(start: jax.Array, hyperparams: dict[str, jax.Array]) -> jax.Array:
    state = tx.init(start)
    state = state._replace(hyperparams={**state.hyperparams, **hyperparams})

    def step(carry, _):
      w, state = carry
      updates, state = tx.update(grad(w), state, w)
      w = optax.apply_updates(w, updates)
      return (w, state), w
    _, ws = jax.lax.scan(step, (start, state), None, length=num_steps)
    ws = jnp.concatenate([start[None], ws])
    return ws, jax.vmap(loss_fn)(ws)
  return run


class OptimizerExplorer(Explorer):
  """SGD, momentum and Adam paths on one 2-D loss surface; see :func:`optimizer_explorer`."""

  def __init__(self, settings: dict[str, Any], loss_fn: Callable[[jax.Array], jax.Array],
               start: tuple[float, float], num_steps: int, extent: tuple[float, float, float, float]):
    self.loss_fn, self.start, self.num_steps, self.extent = loss_fn, start, num_steps, extent
    self.computes = {path: 0 for path in _PATHS}
    self.paths: dict[str, np.ndarray] = {}
    self.losses: dict[str, np.ndarray] = {}
    self._runners = {path: _path_runner(loss_fn, path, num_steps) for path in _PATHS}
    self.figure = Figure(figsize=(7.5, 4.2), layout='constrained')
    self.axes = self.figure.subplots()
    x0, x1, y0, y1 = extent
    xs, ys = np.linspace(x0, x1, 161), np.linspace(y0, y1, 121)
    grid = jnp.stack(jnp.meshgrid(jnp.asarray(xs), jnp.asarray(ys)), axis=-1).reshape(-1, 2)
    surface = np.asarray(jax.vmap(loss_fn)(grid)).reshape(ys.size, xs.size)   # computed once, drawn once
    self.contour = self.axes.contour(xs, ys, np.log10(surface - surface.min() + 1e-3), levels=18,
                                     cmap='Greys', linewidths=0.7)
    self._lines = {path: self.axes.plot([], [], '.-', color=_COLORS[path], lw=1.2, ms=3, label=path)[0]
                   for path in _PATHS}
    self.axes.plot(*start, 'k*', ms=10)
    self.axes.set(xlim=(x0, x1), ylim=(y0, y1), xlabel='w[0]', ylabel='w[1]')
    self.axes.legend(loc='upper right', fontsize=8)
    super().__init__(settings)

  def _check(self, settings: dict[str, Any]) -> None:
    for path, (name, keys) in _PATHS.items():
      kwargs = {'momentum': settings['momentum']} if path == 'momentum' else {}
      if path == 'Adam':
        kwargs = {'b1': settings['b1'], 'b2': settings['b2']}
      rate = keys[0]
      try:
        make_optimizer(name, settings[rate], **kwargs)   # the library's checks
      except ValueError as error:
        message = str(error)
        if message.startswith('learning_rate:'):  # name the explorer's setting
          message = rate + message[len('learning_rate'):]
        raise ValueError(message) from None

  def _update(self, settings: dict[str, Any], changed: set[str]) -> tuple[dict[str, Any], str]:
    stale = [path for path, (_, keys) in _PATHS.items() if path not in self.paths or changed & set(keys)]
    start = jnp.asarray(self.start, jnp.float32)
    running = {}
    for path in stale:   # dispatched one after another, fetched together
      keys = _PATHS[path][1]
      hyperparams = {('learning_rate' if k.endswith('learning_rate') else k): jnp.float32(settings[k]) for k in keys}
      running[path] = self._runners[path](start, hyperparams)
      self.computes[path] += 1
    for path, (ws, losses) in jax.device_get(running).items():   # the one transfer of this redraw
      self.paths[path], self.losses[path] = np.asarray(ws, np.float64), np.asarray(losses, np.float64)
    lines, values = [], {}
    for path in _PATHS:
      ws = self.paths[path]
      finite = np.all(np.isfinite(ws), axis=1)
      shown = ws[:np.argmin(finite)] if not finite.all() else ws
      if path in stale:
        self._lines[path].set_data(shown[:, 0], shown[:, 1])
      final_loss = float(self.losses[path][-1]) if finite.all() else float('nan')
      values[path] = {'final': ws[-1], 'final_loss': final_loss}
      state = 'diverged' if not finite.all() else f'loss {final_loss:.3g} at ({ws[-1, 0]:+.3f}, {ws[-1, 1]:+.3f})'
      lines.append(f'{path:9s} after {self.num_steps} steps: {state}')
    self.axes.set_title(
        f"SGD lr {settings['sgd_learning_rate']:.3g}, momentum {settings['momentum']:g}; "
        f"Adam lr {settings['adam_learning_rate']:.3g}, b1 {settings['b1']:g}, b2 {settings['b2']:g}", fontsize=9)
    return values, '\n'.join(lines)

  def _make_controls(self) -> dict[str, Any]:
    import ipywidgets as w
    s, style = self.settings, _slider_style()
    return {
        'sgd_learning_rate': w.FloatLogSlider(value=s['sgd_learning_rate'], base=10, min=-3, max=0, step=0.05,
                                              description='SGD rate', readout_format='.3g', **style),
        'momentum': w.FloatSlider(value=s['momentum'], min=0.0, max=0.99, step=0.01, description='momentum', **style),
        'adam_learning_rate': w.FloatLogSlider(value=s['adam_learning_rate'], base=10, min=-3, max=0, step=0.05,
                                               description='Adam rate', readout_format='.3g', **style),
        'b1': w.FloatSlider(value=s['b1'], min=0.0, max=0.99, step=0.01, description='Adam b1', **style),
        'b2': w.FloatSlider(value=s['b2'], min=0.0, max=0.999, step=0.001, readout_format='.3f',
                            description='Adam b2', **style),
    }


def optimizer_explorer(
    loss_fn: Callable[[jax.Array], jax.Array] | None = None,
    *,
    start: tuple[float, float] = (-4.0, 1.5),
    num_steps: int = 50,
    sgd_learning_rate: float = 0.2,
    momentum: float = 0.9,
    adam_learning_rate: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.999,
    extent: tuple[float, float, float, float] = (-5.0, 5.0, -2.5, 2.5),
) -> OptimizerExplorer:
  """Sliders for SGD, SGD with momentum and Adam walking one 2-D loss surface.

  Each optimizer is built by :func:`flaxtrain.make_optimizer` and takes
  ``num_steps`` steps from ``start`` (one jitted ``lax.scan`` per optimizer).
  The surface's contours are computed and drawn once; moving a slider
  recomputes only the paths that depend on it (the SGD rate moves both SGD
  paths, ``momentum`` only the momentum path, the Adam settings only Adam's)
  and brings them to the host in one transfer. A path that diverges is drawn
  up to its last finite point and reported as diverged.

  Args:
    loss_fn: ``w -> loss`` for ``w`` of shape (2,), differentiable with JAX;
      by default :func:`ravine`, a narrow valley.
    start: the starting point, inside ``extent``.
    num_steps: steps per optimizer, an int in [1, 10000].
    sgd_learning_rate: SGD's rate (both SGD paths), > 0.
    momentum: the momentum path's decay, in [0, 1).
    adam_learning_rate: Adam's rate, > 0.
    b1, b2: Adam's decay rates, in [0, 1).
    extent: ``(xmin, xmax, ymin, ymax)`` of the plotted surface.

  Returns:
    An :class:`OptimizerExplorer`; ``paths`` maps ``'SGD'``, ``'momentum'``
    and ``'Adam'`` to their ``(num_steps + 1, 2)`` positions, ``losses`` to
    the loss at each position, ``computes``
    counts how often each was computed, ``contour`` is the surface drawn once.

  Raises:
    ValueError: naming the argument, for a ``loss_fn`` that is not callable or
      does not return a finite scalar at ``start``, a ``start`` outside
      ``extent``, a bad ``num_steps`` or ``extent``, or a setting
      ``make_optimizer`` refuses.

  Example:
    >>> explorer = ft.widgets.optimizer_explorer()
    >>> explorer.set(momentum=0.5)     # recomputes the momentum path only
    True
  """
  loss_fn = ravine if loss_fn is None else loss_fn
  if not callable(loss_fn):
    raise ValueError(f'loss_fn: expected a function w -> loss for w of shape (2,), got {loss_fn!r}')
  if (not isinstance(extent, Sequence) or len(extent) != 4
      or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in extent)
      or not (extent[0] < extent[1] and extent[2] < extent[3])):
    raise ValueError(f'extent: expected (xmin, xmax, ymin, ymax) with xmin < xmax and ymin < ymax, got {extent!r}')
  if (not isinstance(start, Sequence) or len(start) != 2
      or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in start)
      or not (extent[0] <= start[0] <= extent[1] and extent[2] <= start[1] <= extent[3])):
    raise ValueError(f'start: expected a point (x, y) inside extent {tuple(extent)}, got {start!r}')
  num_steps = checks.check_int('num_steps', num_steps, minimum=1)
  if num_steps > 10_000:
    raise ValueError(f'num_steps: expected at most 10000 (every step is drawn), got {num_steps}')
  try:
    value = np.asarray(loss_fn(jnp.asarray(start, jnp.float32)))
  except Exception as error:  # arbitrary user code
    raise ValueError(f'loss_fn: calling it at start {start} failed ({type(error).__name__}: {error})') from error
  if value.shape != () or not np.isfinite(value):
    raise ValueError(f'loss_fn: expected a finite scalar at start {start}, got {value!r}')
  settings = dict(sgd_learning_rate=sgd_learning_rate, momentum=momentum, adam_learning_rate=adam_learning_rate,
                  b1=b1, b2=b2)
  return OptimizerExplorer(settings, loss_fn, tuple(float(v) for v in start), num_steps,
                           tuple(float(v) for v in extent))
