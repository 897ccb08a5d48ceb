"""The website, as a reader opens it: `make site` with warnings as errors, then headless Chromium.

The site is built once per run into a temporary SITE_DIR by the Makefile's own `site` target. The
tests without the `browser` marker read the built files: a page per notebook in the README's order, a
page per public flaxtrain module, each notebook page linking to its .ipynb, nothing loaded from
another host. The `browser` ones open every page from file:// in the headless Chromium that
tests/test_browser.py drives (found the same way, skipped without it except under CI=true): no
console error, no broken internal link or image, every formula typeset by the bundled MathJax, and
the search finding notebook 05 by a word only it uses, from file:// and from a local server.
Screenshots go where the browser tests put theirs ($FLAXTRAIN_SCREENSHOTS, else a printed temporary
directory), named site-*.png.
"""

from __future__ import annotations

import contextlib
import functools
import html.parser
import http.server
import importlib
import inspect
import os
import pathlib
import pkgutil
import re
import subprocess
import threading
import time
import urllib.parse

import nbformat
import pytest

import _jupyterlab as jl

ROOT = jl.ROOT
SEARCH_WORD = 'geometrically'  # in notebook 05's introduction, in no other page
SEARCH_PAGE = 'notebooks/05_gradient_clipping.html'
README_NOTEBOOK = re.compile(r'\]\(notebooks/(\d\d_\w+)\.ipynb\)')
RAW_MATHS = re.compile(r'(?<![\\\w])\$[^$\s][^$\n]*\$|\\\(|\\\[')  # $x$, \( or \[ left as text


class Links(html.parser.HTMLParser):
  """The ids of a page, and the targets of its links, images, scripts and stylesheets."""

  def __init__(self):
    super().__init__()
    self.ids, self.links, self.resources = set(), [], []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if attrs.get('id'):
      self.ids.add(attrs['id'])
    if tag == 'a' and attrs.get('href'):
      self.links.append(attrs['href'])
    for name in ('src', 'href') if tag != 'a' else ():
      if attrs.get(name) and not (tag == 'link' and attrs.get('rel') in ('canonical',)):
        self.resources.append(attrs[name])


@functools.cache
def parsed(path: pathlib.Path) -> Links:
  links = Links()
  links.feed(path.read_text(encoding='utf-8'))
  return links


def pages(html_dir: pathlib.Path) -> list[pathlib.Path]:
  """Every HTML page of the site (not the theme's template fragments under _static/)."""
  return sorted(p for p in html_dir.rglob('*.html') if '_static' not in p.relative_to(html_dir).parts)


def readme_notebooks() -> list[str]:
  return list(dict.fromkeys(README_NOTEBOOK.findall((ROOT / 'README.md').read_text())))


def public_modules() -> list[str]:
  import flaxtrain
  return sorted(m.name for m in pkgutil.walk_packages(flaxtrain.__path__, prefix='flaxtrain.')
                if not any(part.startswith('_') for part in m.name.split('.')))


def is_external(url: str) -> bool:
  return urllib.parse.urlsplit(url).scheme not in ('', 'file', 'data', 'blob')


@pytest.fixture(scope='module')
def site(tmp_path_factory, request) -> pathlib.Path:
  """`make site` into a temporary SITE_DIR (with -W --keep-going, as the Makefile runs it); the html dir."""
  out = tmp_path_factory.mktemp('site')
  env = {k: v for k, v in os.environ.items() if k not in ('MAKEFLAGS', 'MFLAGS', 'MAKELEVEL')}
  start = time.monotonic()
  done = subprocess.run(['make', '--no-print-directory', '-s', '-o', jl.STAMP, 'site', f'SITE_DIR={out}'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  seconds = time.monotonic() - start
  assert done.returncode == 0, (f'`make site` failed (exit {done.returncode}); warnings are errors:\n'
                                f'{done.stdout[-3000:]}\n{done.stderr[-12000:]}')
  capture = request.config.pluginmanager.get_plugin('capturemanager')
  with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
    print(f'\nsite built in {seconds:.0f} s: {len(pages(out / "html"))} pages in {out / "html"}', flush=True)
  return out / 'html'


def test_home_page_is_the_readme_and_lists_every_notebook_in_its_order(site):
  index = (site / 'index.html').read_text(encoding='utf-8')
  assert '<h1>flaxtrain' in index, 'index.html is not the README'
  nav = re.search(r'<nav class="[^"]*\bbd-docs-nav\b.*?</nav>', index, re.S)
  assert nav, 'index.html has no navigation sidebar'
  in_nav = re.findall(r'href="notebooks/(\d\d_\w+)\.html"', nav[0])
  stored = sorted(p.stem for p in (ROOT / 'notebooks').glob('[0-9][0-9]_*.ipynb'))
  listed = [n for n in readme_notebooks() if n in stored]
  assert in_nav == listed + [n for n in stored if n not in listed], 'the navigation is not in the README\'s order'
  for name in stored:
    assert (site / 'notebooks' / f'{name}.html').is_file(), f'no page for notebooks/{name}.ipynb'


def test_api_reference_documents_every_public_module_from_its_docstrings(site):
  modules = public_modules()
  assert {p.stem for p in (site / 'docs' / 'api').glob('flaxtrain*.html')} == set(modules)
  ids = {module: parsed(site / 'docs' / 'api' / f'{module}.html').ids for module in modules}
  for module in modules:
    assert f'module-{module}' in ids[module], f'the page of {module} does not document the module'
    mod = importlib.import_module(module)
    missing = []
    for name in getattr(mod, '__all__', []):
      obj = getattr(mod, name)
      home = getattr(obj, '__module__', module)  # a re-exported name may be documented where it is defined
      if not inspect.ismodule(obj) and f'{module}.{name}' not in ids[module] and f'{home}.{name}' not in ids.get(home, ()):
        missing.append(name)
    assert not missing, f'{module}: {missing} are in __all__ but on no API page'


def test_each_notebook_page_links_its_ipynb_and_says_how_to_run_it(site):
  for source in sorted((ROOT / 'notebooks').glob('[0-9][0-9]_*.ipynb')):
    page = site / 'notebooks' / f'{source.stem}.html'
    text = ' '.join(re.sub(r'<[^>]+>', ' ', page.read_text(encoding='utf-8')).split())
    assert 'run make lab' in text, f'{page.name} does not say how to run the notebook'
    assert source.name in parsed(page).links, f'{page.name} does not link to {source.name}'
    copied = page.parent / source.name
    assert copied.is_file() and copied.read_bytes() == source.read_bytes(), f'{copied} is not the stored notebook'


def test_no_page_loads_anything_from_another_host(site):
  """Scripts, stylesheets, images and MathJax come with the site: it reads the same with no network."""
  for page in pages(site):
    external = [url for url in parsed(page).resources if is_external(url)]
    assert not external, f'{page.relative_to(site)} loads {external}'
  assert (site / '_static' / 'mathjax' / 'tex-svg.js').is_file(), 'MathJax is not bundled'


# In the browser: what a reader sees.

class Reader:
  """A browser tab that records console errors, page errors, failed loads and any request off the site."""

  def __init__(self, browser):
    self.context = browser.new_context(viewport={'width': 1400, 'height': 900})
    self.context.set_default_timeout(60_000)
    self.problems: list[str] = []
    self.context.route(lambda url: is_external(url), self._refuse)
    self.page = self.context.new_page()
    self.page.on('console', lambda m: m.type == 'error' and self.problems.append(f'console error: {m.text}'))
    self.page.on('pageerror', lambda e: self.problems.append(f'page error: {e}'))
    self.page.on('requestfailed', lambda r: self.problems.append(f'failed to load {r.url}: {r.failure}'))

  def _refuse(self, route):
    if not route.request.url.startswith(('http://127.0.0.1', 'http://localhost')):
      self.problems.append(f'request off the site: {route.request.url}')
      return route.abort()
    return route.continue_()

  def open(self, url: str) -> None:
    self.problems.clear()
    self.page.goto(url, wait_until='load')
    self.page.evaluate('() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null')


@pytest.fixture
def reader(browser):
  tab = Reader(browser)
  try:
    yield tab
  finally:
    tab.context.close()


# Runs in the page once MathJax is done: links, images, and maths that is not typeset.
PAGE_JS = r"""() => {
  const article = document.querySelector('article.bd-article') || document.body;
  const maths = Array.from(article.querySelectorAll('.math'));
  const prose = article.cloneNode(true);
  prose.querySelectorAll('pre, code, .highlight, .cell_output, mjx-container, script, style').forEach(e => e.remove());
  return {
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
    images: Array.from(document.images).map(i => ({src: i.src, ok: i.complete && i.naturalWidth > 0})),
    maths: maths.length,
    typeset: maths.filter(m => m.querySelector('mjx-container svg')).length,
    prose: prose.textContent,
  };
}"""


def broken_link(url: str, site: pathlib.Path) -> str | None:
  """Why a link of the site points nowhere (a missing file, or an anchor the page lacks), or None."""
  parts = urllib.parse.urlsplit(url)
  if parts.scheme != 'file':
    return None  # external (the README's link to nbval's repository): not the site's to check
  path = pathlib.Path(urllib.parse.unquote(parts.path))
  if not path.is_relative_to(site):
    return f'{url} leaves the site'
  if not path.is_file():
    return f'{url}: no such file'
  if parts.fragment and path.suffix == '.html' and urllib.parse.unquote(parts.fragment) not in parsed(path).ids:
    return f'{url}: {path.name} has no anchor #{parts.fragment}'
  return None


@pytest.mark.browser
def test_every_page_loads_clean_with_links_images_and_maths(site, reader, screenshots):
  maths_pages = 0
  for page in pages(site):
    where = str(page.relative_to(site))
    reader.open(page.as_uri())
    shown = reader.page.evaluate(PAGE_JS)
    assert not reader.problems, f'{where}: {reader.problems}'
    broken = sorted({why for url in shown['links'] if (why := broken_link(url, site))})
    assert not broken, f'{where}: broken links {broken}'
    bad = [i['src'] for i in shown['images'] if not i['ok']]
    assert not bad, f'{where}: images that did not load: {bad}'
    assert shown['typeset'] == shown['maths'], (
        f'{where}: {shown["maths"] - shown["typeset"]} of {shown["maths"]} formulas not typeset by MathJax')
    raw = RAW_MATHS.findall(shown['prose'])
    assert not raw, f'{where}: maths left as raw text: {raw[:5]}'
    maths_pages += shown['maths'] > 0
    if page.parent == site or page.parent.name == 'notebooks':
      reader.page.screenshot(path=screenshots / f'site-{page.stem}.png')
  assert maths_pages >= 5, f'only {maths_pages} pages show typeset maths: is MathJax loaded?'


@pytest.mark.browser
def test_maths_and_plots_of_notebook_05_as_a_reader_sees_them(site, reader, screenshots):
  reader.open((site / SEARCH_PAGE).as_uri())
  for name, selector in [('maths', 'mjx-container[display="true"]'), ('plot', '.cell_output img')]:
    shown = reader.page.locator(selector).first
    shown.scroll_into_view_if_needed()
    box = shown.bounding_box()
    assert box and box['width'] > 50 and box['height'] > 10, f'notebook 05: the first {name} is not drawn: {box}'
    reader.page.screenshot(path=screenshots / f'site-05-{name}.png')
  assert not reader.problems, reader.problems


def explorer_cells() -> list[tuple[str, int]]:
  """(notebook, index among its code cells) of each cell that shows an explorer of ft.widgets."""
  found = []
  for path in sorted((ROOT / 'notebooks').glob('[0-9][0-9]_*.ipynb')):
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == 'code']
    found += [(path.stem, k) for k, c in enumerate(code) if re.search(r'\bwidgets\.\w+_explorer\(', c.source)]
  return found


@pytest.mark.browser
def test_explorers_show_their_stored_image_and_values(site, reader, screenshots):
  """Without a kernel, an explorer shows the image and the values it stored at its default settings."""
  cells = explorer_cells()
  assert cells, 'no notebook shows an explorer (ft.widgets.*_explorer)'
  for name, k in cells:
    code = [c for c in nbformat.read(ROOT / 'notebooks' / f'{name}.ipynb', as_version=4).cells
            if c.cell_type == 'code']
    reader.open((site / 'notebooks' / f'{name}.html').as_uri())
    shown = reader.page.locator('div.cell')
    assert shown.count() == len(code), f'{name}: {shown.count()} cells on the page, {len(code)} in the notebook'
    image = shown.nth(k).locator('.cell_output img')
    assert image.count() == jl.stored_images(code[k]) >= 1, f'{name}: the explorer shows {image.count()} images'
    image.first.scroll_into_view_if_needed()
    assert image.first.evaluate('i => i.complete && i.naturalWidth > 0'), f'{name}: the explorer\'s image did not load'
    values = ' '.join(jl.stored_text(code[k]).split())
    assert values and values in ' '.join(shown.nth(k).locator('.cell_output').text_content().split()), (
        f'{name}: the explorer\'s printed values are not on the page')
    reader.page.screenshot(path=screenshots / f'site-{name[:2]}-explorer.png')
    assert not reader.problems, f'{name}: {reader.problems}'


@contextlib.contextmanager
def local_server(directory: pathlib.Path):
  """The site served over http on a free localhost port (what `python -m http.server` does)."""
  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(directory)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}/'
  finally:
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.mark.browser
@pytest.mark.parametrize('how', ['file', 'http'])
def test_search_finds_the_notebook_that_uses_a_word(site, reader, screenshots, how):
  assert SEARCH_WORD in (ROOT / 'notebooks' / '05_gradient_clipping.ipynb').read_text()
  with local_server(site) if how == 'http' else contextlib.nullcontext(site.as_uri() + '/') as root:
    reader.open(f'{root}search.html?q={SEARCH_WORD}')
    results = reader.page.locator('#search-results ul.search li a')
    reader.page.wait_for_function(
        "() => /found|did not match/i.test((document.querySelector('#search-results') || {}).textContent || '')")
    found = [urllib.parse.urlsplit(href).path for href in results.evaluate_all('as => as.map(a => a.href)')]
    if how == 'http':  # served, each result also shows an excerpt of its page with the word
      reader.page.locator('#search-results ul.search li p.context').first.wait_for()
    reader.page.screenshot(path=screenshots / f'site-search-{how}.png')
    assert not reader.problems, reader.problems
  assert any(path.endswith('/' + SEARCH_PAGE) for path in found), f'searching {SEARCH_WORD!r} found {found}'
