"""Helpers for tests/test_browser.py: `make lab` driven in headless Chromium, as a learner uses it.

`Lab` starts the Makefile's own `lab` target (the same command and flags as `make lab`) on a copy of
`notebooks/`, with a free localhost port, its own token and its own Jupyter config, data, runtime,
settings, workspace and IPython directories, so nothing from earlier runs (trust, open tabs, user
settings) leaks in and nothing the test does (saving, a new Untitled.ipynb) touches the working tree.
The other helpers read what the page shows (JupyterLab 4.6 keeps off-screen cells in the DOM with
`content-visibility: auto`, so they read `textContent`, never `innerText`) and what the notebook files
say the page should show.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import nbformat

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / 'notebooks'
STAMP = '.venv/.flaxtrain-installed'  # the Makefile's set-up stamp; `make lab` is run without redoing set-up
KERNEL, DISPLAY_NAME = 'flaxtrain', 'Python (flaxtrain)'  # as the Makefile registers the kernel
CHROMIUM_NAMES = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')
CHROMIUM_ARGS = ['--no-sandbox', '--headless=new', '--disable-gpu', '--disable-dev-shm-usage']
PANEL = '.jp-NotebookPanel:not(.lm-mod-hidden)'  # the notebook on screen
PROGRESS = re.compile(  # a tqdm reading: "epoch 8/8: 100%|####| 1344/1344 [00:13<00:00, 96.9step/s, ...]"
    r'(?P<percent>\d{1,3})%(?:\|[^|\n]*\|)?\s*(?P<done>\d+)/(?P<total>\d+)\s*\[(?P<info>[^\]\n]*)')


def find_chromium() -> str | None:
  """The Chromium to drive: $FLAXTRAIN_CHROMIUM, else the first Chromium or Chrome on PATH."""
  explicit = os.environ.get('FLAXTRAIN_CHROMIUM')
  if explicit:
    return explicit if os.access(explicit, os.X_OK) else None
  return next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


def missing() -> str | None:
  """Why the browser tests cannot run here, or None when Playwright and Chromium are both present."""
  try:
    import playwright.sync_api  # noqa: F401
  except ImportError:
    return ('Playwright is not installed in this environment: `make test` (or `make setup`) installs '
            'the pinned test dependencies, Playwright included')
  if find_chromium() is None:
    return ('no Chromium found (looked for $FLAXTRAIN_CHROMIUM, then ' + ', '.join(CHROMIUM_NAMES) +
            ' on PATH): install it with `sudo apt-get install chromium` on Debian/Ubuntu, or point '
            'FLAXTRAIN_CHROMIUM at a Chrome or Chromium binary. Playwright cannot download its own.')
  return None


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Lab:
  """`make lab` on a copy of notebooks/, on a free port with its own token and Jupyter directories."""

  def __init__(self, workdir: pathlib.Path):
    self.workdir = workdir
    self.notebook_dir, self.pristine = workdir / 'notebooks', workdir / 'as-stored'
    shutil.copytree(NOTEBOOKS, self.pristine, ignore=shutil.ignore_patterns(
        '_scratch', 'checkpoints', '.ipynb_checkpoints', '__pycache__', 'Untitled*'))
    self.reset()
    self.port, self.token = free_port(), secrets.token_hex(16)
    self.log = workdir / 'jupyterlab.log'
    self.process: subprocess.Popen | None = None

  def reset(self) -> None:
    """Puts back the notebooks as they were stored when the tests started (undoes saves, Untitled)."""
    shutil.rmtree(self.notebook_dir, ignore_errors=True)
    shutil.copytree(self.pristine, self.notebook_dir)

  def command(self) -> list[str]:
    flags = (f'--no-browser --ServerApp.port={self.port} --ServerApp.port_retries=0 '
             f'--IdentityProvider.token={self.token}')
    return ['make', '--no-print-directory', '-s', '-o', STAMP, 'lab',
            f'LAB_DIR={self.notebook_dir}', f'LAB_FLAGS={flags}']

  def environment(self) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()  # not the flags of a `make test` this runs under
           if k not in ('MAKEFLAGS', 'MFLAGS', 'MAKELEVEL')}
    env.pop('MPLBACKEND', None)  # a learner's kernel uses the inline backend
    for var, name in [('JUPYTER_CONFIG_DIR', 'config'), ('JUPYTER_DATA_DIR', 'data'),
                      ('JUPYTER_RUNTIME_DIR', 'runtime'), ('JUPYTERLAB_SETTINGS_DIR', 'settings'),
                      ('JUPYTERLAB_WORKSPACES_DIR', 'workspaces'), ('IPYTHONDIR', 'ipython')]:
      path = self.workdir / 'jupyter' / name
      path.mkdir(parents=True, exist_ok=True)
      env[var] = str(path)
    # No "get notified about Jupyter news?" pop-up over the screenshots (nor a request for the news).
    news = self.workdir / 'jupyter' / 'settings' / '@jupyterlab' / 'apputils-extension'
    news.mkdir(parents=True, exist_ok=True)
    (news / 'notification.jupyterlab-settings').write_text('{"fetchNews": "false"}')
    return env

  def start(self, timeout: float = 180) -> None:
    with open(self.log, 'wb') as log:
      self.process = subprocess.Popen(self.command(), cwd=ROOT, env=self.environment(), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
      if self.process.poll() is not None:
        raise RuntimeError(f'`make lab` exited with {self.process.returncode}:\n{self.log_tail()}')
      with contextlib.suppress(OSError):
        self.api('status')
        return
      if time.monotonic() > deadline:
        raise TimeoutError(f'JupyterLab did not answer within {timeout:.0f} s:\n{self.log_tail()}')
      time.sleep(0.5)

  def log_tail(self, lines: int = 30) -> str:
    return '\n'.join(self.log.read_text(errors='replace').splitlines()[-lines:])

  def url(self, path: str) -> str:
    sep = '&' if '?' in path else '?'
    return f'http://127.0.0.1:{self.port}/{path}{sep}token={self.token}'

  def api(self, path: str, method: str = 'GET'):
    request = urllib.request.Request(f'http://127.0.0.1:{self.port}/api/{path}', method=method,
                                     headers={'Authorization': f'token {self.token}'})
    with urllib.request.urlopen(request, timeout=30) as response:
      body = response.read()
    return json.loads(body) if body else None

  def kernel_state(self, path: str) -> tuple[str | None, str | None]:
    """(kernel name, execution state) of the session of the notebook at ``path``."""
    for session in self.api('sessions'):
      if session['path'] == path and session.get('kernel'):
        return session['kernel']['name'], session['kernel'].get('execution_state')
    return None, None

  def new_session(self, timeout: float) -> str:
    """The path of the one session, once JupyterLab has created it (the test starts with none)."""
    deadline = time.monotonic() + timeout
    while not (sessions := self.api('sessions')):
      assert time.monotonic() < deadline, f'no kernel session started within {timeout:.0f} s'
      time.sleep(0.5)
    assert len(sessions) == 1, f'expected one session, found {[s["path"] for s in sessions]}'
    return sessions[0]['path']

  def shut_down_sessions(self) -> None:
    for session in self.api('sessions'):
      self.api(f'sessions/{session["id"]}', method='DELETE')

  def processes(self) -> list[int]:
    """Live processes started for this lab: the server and kernels name files under ``workdir``."""
    found = []
    for proc in pathlib.Path('/proc').glob('[0-9]*'):
      with contextlib.suppress(OSError):
        if str(self.workdir).encode() in (proc / 'cmdline').read_bytes():
          found.append(int(proc.name))
    return found

  def stop(self, timeout: float = 30) -> list[int]:
    """Shuts kernels down, ends `make lab`'s process group; returns pids still alive (none, normally)."""
    if self.process is None:
      return []
    with contextlib.suppress(OSError, ValueError):
      for kernel in self.api('kernels'):
        self.api(f'kernels/{kernel["id"]}', method='DELETE')
    for sig in (signal.SIGTERM, signal.SIGKILL):
      with contextlib.suppress(ProcessLookupError):
        os.killpg(self.process.pid, sig)
      deadline = time.monotonic() + timeout
      while time.monotonic() < deadline and (self.process.poll() is None or self.processes()):
        time.sleep(0.2)
      if self.process.poll() is not None and not self.processes():
        break
    return self.processes()


# What the page shows. Cells are read in order; every cell is in the DOM (content-visibility: auto).
CELLS_JS = """(panel) => Array.from(document.querySelectorAll(panel + ' .jp-Notebook .jp-Cell')).map(cell => ({
  code: cell.classList.contains('jp-CodeCell'),
  prompt: ((cell.querySelector('.jp-InputPrompt') || {}).textContent || '').trim(),
  outputs: Array.from(cell.querySelectorAll('.jp-OutputArea-output')).map(
      o => ({mime: o.dataset.mimeType || '', text: o.textContent})),
  images: Array.from(cell.querySelectorAll('.jp-OutputArea-output img')).map(
      i => ({complete: i.complete, width: i.naturalWidth})),
}))"""

# Scrolls every output image into view and waits (at most 10 s each) until it is decoded.
LOAD_IMAGES_JS = """async (panel) => {
  const images = Array.from(document.querySelectorAll(panel + ' .jp-OutputArea-output img'));
  for (const img of images) {
    img.scrollIntoView({block: 'center'});
    await Promise.race([img.decode().catch(() => null), new Promise(done => setTimeout(done, 10000))]);
  }
  return images.length;
}"""

STATUS_JS = """(panel) => ({
  status: (Array.from(document.querySelectorAll('.jp-StatusBar-Item')).map(e => e.textContent.trim())
           .find(t => t.includes(' | ')) || ''),
  kernel: ((document.querySelector(panel + ' .jp-Toolbar-kernelName') || {}).textContent || '').trim(),
  prompts: Array.from(document.querySelectorAll(panel + ' .jp-Notebook .jp-Cell')).map(
      c => ((c.querySelector('.jp-InputPrompt') || {}).textContent || '').trim()),
})"""


def cells(page) -> list[dict]:
  return page.evaluate(CELLS_JS, PANEL)


def status(page) -> dict:
  """The status bar's kernel item ("Python (flaxtrain) | Idle"), the toolbar's kernel, the prompts."""
  return page.evaluate(STATUS_JS, PANEL)


def load_images(page) -> int:
  return page.evaluate(LOAD_IMAGES_JS, PANEL)


def screenshot(page, index: int, path: pathlib.Path) -> None:
  """Scrolls cell ``index`` into view (its first plot, else its last output) and takes a screenshot."""
  cell = page.locator(f'{PANEL} .jp-Notebook .jp-Cell').nth(index)
  images, outputs = cell.locator('.jp-OutputArea-output img'), cell.locator('.jp-OutputArea-output')
  target = images.first if images.count() else outputs.last if outputs.count() else cell
  target.evaluate("e => e.scrollIntoView({block: 'center'})")
  page.evaluate('() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))')
  page.wait_for_timeout(300)  # content-visibility: auto paints cells that scroll in a frame later
  page.screenshot(path=path)


def menu(page, top: str, item: str) -> None:
  """Clicks ``top`` in the menu bar, then ``item`` in its menu, as a learner does."""
  page.locator(f'.lm-MenuBar-itemLabel:text-is("{top}")').click()
  page.locator(f'.lm-Menu-itemLabel:text-is("{item}")').click()


def open_notebook(page, lab: Lab, name: str, cell_count: int, timeout: float = 180) -> None:
  """Opens ``/lab/tree/<name>?reset=1``; waits for all its cells and its kernel to be idle."""
  page.goto(lab.url(f'lab/tree/{name}?reset=1'))
  page.wait_for_function(f"() => document.querySelectorAll('{PANEL} .jp-Notebook .jp-Cell').length === {cell_count}",
                         timeout=timeout * 1000)
  wait_for_idle(page, lab, name, executed=[], timeout=timeout)


def wait_for_idle(page, lab: Lab, path: str, executed: list[int], timeout: float) -> None:
  """Waits until the status bar says Idle, the sessions API agrees, and cells ``executed`` show a count.

  Both must hold twice in a row: during Run All the kernel is briefly idle between cells. When the
  kernel stays idle for 10 s with cells still uncounted and nothing changing, the run has stopped
  (an error aborted the cells queued after it), and this fails at once with the last cell's output.
  """
  deadline, steady, stalled, before = time.monotonic() + timeout, 0, 0, None
  while True:
    shown = status(page)
    _, state = lab.kernel_state(path)
    prompts = shown['prompts']
    missing = [i for i in executed if i >= len(prompts) or not re.fullmatch(r'\[\d+\]:', prompts[i])]
    idle = shown['status'].endswith('| Idle') and state == 'idle'
    steady = steady + 1 if idle and not missing else 0
    stalled = stalled + 1 if idle and missing and prompts == before and '[*]:' not in prompts else 0
    before = prompts
    if steady >= 2:
      return
    if stalled >= 10 or time.monotonic() > deadline:
      counted = [i for i in executed if i not in missing]
      last = counted[-1] if counted else None
      output = '' if last is None else '\n'.join(o['text'] for o in cells(page)[last]['outputs'])[-3000:]
      raise AssertionError(
          f'{path}: ' + (f'cells {missing} never ran: the run stopped after cell {last}'
                         if stalled >= 10 else f'kernel not idle after {timeout:.0f} s') +
          f' (status bar {shown["status"]!r}, sessions API {state!r}).\nOutput of cell {last}:\n{output}')
    time.sleep(1)


def save(page, lab: Lab, path: str, timeout: float = 60) -> nbformat.NotebookNode:
  """Saves the notebook on screen with its toolbar button; returns the file JupyterLab wrote."""
  file = lab.notebook_dir / path
  before = file.stat().st_mtime_ns if file.exists() else 0
  page.locator(f'{PANEL} [data-command="docmanager:save"]').click()
  deadline = time.monotonic() + timeout
  while not (file.exists() and file.stat().st_mtime_ns != before):
    assert time.monotonic() < deadline, f'{path} was not saved within {timeout:.0f} s'
    if page.locator('.jp-Dialog .jp-mod-accept').count():  # "Rename file" on saving an Untitled one
      page.locator('.jp-Dialog .jp-mod-accept').click()
    time.sleep(0.2)
  page.wait_for_function(f"() => !document.querySelector('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty')",
                         timeout=timeout * 1000)
  return nbformat.read(file, as_version=4)


# What the notebook files say the page should show.

def normalized(text: str) -> str:
  return text.replace('\u2007', ' ').replace('\xa0', ' ')


def stored_images(cell) -> int:
  return sum(any(k.startswith('image/') for k in o.get('data', {})) for o in cell.get('outputs', []))


def stored_text(cell) -> str:
  """Text a reader sees in the stored outputs: stdout, and text/plain where nothing richer is shown."""
  parts = []
  for o in cell.get('outputs', []):
    if o.output_type == 'stream' and o.name == 'stdout':
      parts.append(o.text)
    elif o.output_type in ('display_data', 'execute_result') and set(o.data) == {'text/plain'}:
      parts.append(o.data['text/plain'])
  return ''.join(parts)


def shown_text(cell: dict) -> str:
  """The same for a cell on the page."""
  return ''.join(o['text'] for o in cell['outputs']
                 if o['mime'] in ('application/vnd.jupyter.stdout', 'text/plain'))


def has_progress(cell) -> bool:
  """Whether a stored code cell displayed a progress bar (text, or an ipywidget)."""
  for o in cell.get('outputs', []):
    if 'application/vnd.jupyter.widget-view+json' in o.get('data', {}):
      return True
  return bool(PROGRESS.search(normalized(''.join(
      o.get('text', '') + o.get('data', {}).get('text/plain', '') for o in cell.get('outputs', [])))))


def progress_problems(text: str) -> list[str]:
  """Progress readings in ``text`` that do not show a run's final state."""
  found = []
  for reading in PROGRESS.finditer(normalized(text)):
    shown = reading[0].strip()
    if int(reading['done']) == 0 or int(reading['percent']) == 0:
      found.append(f'{shown!r} shows a run at 0%, not its final state')
    elif '?' in ','.join(reading['info'].split(',')[:2]):  # "00:00<?, ?step/s": never updated
      found.append(f'{shown!r} shows the bar as it was created, not the run\'s final state')
  return found


def masked(text: str) -> str:
  """``text`` with numbers, temporary paths and runs of spaces made uniform, for comparing runs."""
  text = re.sub(r'(/tmp|/var/folders)/\S*', '<path>', normalized(text))
  text = re.sub(r'[-+]?\d+(\.\d+)?([eE][-+]?\d+)?', '<n>', text)
  return ' '.join(text.split())


def readme_example(readme: pathlib.Path) -> str:
  """The first Python block of the README's "Using flaxtrain" section."""
  section = re.search(r'^## Using flaxtrain.*?(?=^## )', readme.read_text(), re.M | re.S)
  assert section, 'README.md has no "## Using flaxtrain" section'
  block = re.search(r'```python\n(.*?)```', section[0], re.S)
  assert block, 'the README\'s "Using flaxtrain" section has no ```python block'
  return block[1]
