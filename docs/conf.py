"""Sphinx configuration of the flaxtrain website: `make site` builds it into build/site/html.

The site shows what is stored in the repository and runs nothing: the README as the home page, every
notebook with the outputs it was stored with (myst-nb, nb_execution_mode='off'), and the API reference
read from the docstrings (autodoc + napoleon). It needs no network, neither to build nor to read it:
MathJax comes from the sphinx-mathjax-offline package and is copied into the site.

The source folder is the repository itself (`sphinx-build -c docs . OUT`), so the README's relative links
(`notebooks/05_gradient_clipping.ipynb`) and the notebooks' links to each other resolve to the pages,
and nothing is copied into docs/. `include_patterns` says which files are pages. The API reference is
one page per public module of flaxtrain, written into docs/api/ (git-ignored) at each build, so a new
module gets its page without editing anything here.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import re
import shutil
import sys

from docutils import nodes

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the flaxtrain of this tree, whatever else is installed

NOTEBOOK = re.compile(r'\(notebooks/(\d\d_[A-Za-z0-9_]+)\.ipynb\)')  # a README link to a notebook


def notebooks_in_reading_order() -> list[str]:
  """Notebook docnames in the order the README lists them, then any stored notebook it does not list."""
  listed = list(dict.fromkeys(NOTEBOOK.findall((ROOT / 'README.md').read_text(encoding='utf-8'))))
  stored = sorted(p.stem for p in (ROOT / 'notebooks').glob('[0-9][0-9]_*.ipynb'))
  return [f'notebooks/{name}' for name in [n for n in listed if n in stored] +
          [n for n in stored if n not in listed]]


def public_modules() -> list[str]:
  """flaxtrain's modules and subpackages, recursively, leaving out private ones (a leading `_`)."""
  import flaxtrain
  found = []
  for info in pkgutil.walk_packages(flaxtrain.__path__, prefix='flaxtrain.'):
    if not any(part.startswith('_') for part in info.name.split('.')):
      found.append(info.name)
  return sorted(found)


def write_if_changed(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` unless ``path`` already holds it, so an unchanged page is not rebuilt."""
  if not path.exists() or path.read_text(encoding='utf-8') != text:
    path.write_text(text, encoding='utf-8')


def documented_here(module: str, modules: list[str]) -> list[str]:
  """The names of ``module.__all__`` that its page documents.

  A name that another public module defines (``steps`` re-exports ``losses.LossFn``) is documented on
  that module's page only, so each object has one page and one link target; submodules have their own.
  """
  mod = importlib.import_module(module)
  names = getattr(mod, '__all__', [n for n in vars(mod) if not n.startswith('_')])
  return [name for name in names if not inspect.ismodule(getattr(mod, name))
          and getattr(getattr(mod, name), '__module__', module) not in set(modules) - {module}]


def write_api_pages(app) -> None:
  """One page per public module in docs/api/, its members read from the docstrings."""
  api = DOCS / 'api'
  api.mkdir(exist_ok=True)
  modules = public_modules()
  for module in modules:  # reStructuredText: autodoc writes reST, which a Markdown page would not parse
    title = f'``{module}``'
    mod, members = importlib.import_module(module), documented_here(module, modules)
    code = [n for n in members if inspect.isclass(getattr(mod, n)) or inspect.isroutine(getattr(mod, n))]
    data = [n for n in members if n not in code]  # constants: automodule would drop one without a docstring
    write_if_changed(api / f'{module}.rst', f'{title}\n{"=" * len(title)}\n\n.. automodule:: {module}\n' +
                     (f'   :members: {", ".join(code)}\n' if code else '') +
                     ''.join(f'\n.. autodata:: {module}.{name}\n' for name in data))
  for stale in api.glob('flaxtrain*.rst'):  # a module that was removed or renamed
    if stale.stem not in modules:
      stale.unlink()


def skip_tuple_field_aliases(app, what, name, obj, skip, options):
  """Leaves out a NamedTuple's "Alias for field number N": its docstring's Attributes section says more."""
  if what == 'class' and (getattr(obj, '__doc__', None) or '').startswith('Alias for field number'):
    return True
  return None


def add_toctrees(app, docname: str, source: list[str]) -> None:
  """Appends the site's navigation to the home page: the notebooks in the README's order, then reference."""
  if docname != root_doc:
    return
  notebooks = '\n'.join(notebooks_in_reading_order())
  source[0] += (f'\n\n```{{toctree}}\n:caption: Notebooks\n:hidden:\n\n{notebooks}\n```\n'
                '\n```{toctree}\n:caption: Reference\n:hidden:\n\n'
                'docs/api\nnotebooks/README\nbenchmarks/README\n```\n')


def is_notebook(app, docname: str) -> bool:
  return str(app.env.doc2path(docname)).endswith('.ipynb')


def add_run_note(app, doctree) -> None:
  """Puts a note under each notebook's title: the page is the stored run; the .ipynb and `make lab` run it."""
  docname = app.env.docname
  if not is_notebook(app, docname):
    return
  name = docname.split('/')[-1] + '.ipynb'
  link = nodes.reference('', '', nodes.literal(text=name), refuri=name, classes=['notebook-download'])
  tip = nodes.admonition('', nodes.title(text='Run this notebook'), nodes.paragraph('', '', *[
      nodes.Text('This page shows the outputs stored when the notebook was last executed: nothing runs '
                 'here; plots are the stored images, and an explorer shows its static image and values. '
                 'To run it yourself, download '), link,
      nodes.Text(', or in a clone of the repository run '), nodes.literal(text='make lab'),
      nodes.Text(' (it sets up '), nodes.literal(text='.venv'),
      nodes.Text(' and opens JupyterLab on '), nodes.literal(text='notebooks/'),
      nodes.Text(') and open '), nodes.literal(text=name), nodes.Text(' there.')]),
      classes=['tip', 'run-this-notebook'])
  section = next(iter(doctree.findall(nodes.section)), None)
  if section is not None and section.children and isinstance(section[0], nodes.title):
    section.insert(1, tip)
  else:
    doctree.insert(0, tip)


def finish_site(app, exception) -> None:
  """Puts each notebook's .ipynb next to its page, where the note links, and the home page at index.html."""
  if exception is not None or app.builder.format != 'html':
    return
  out = pathlib.Path(app.outdir)
  shutil.copyfile(out / f'{root_doc}.html', out / 'index.html')  # same folder: its relative links hold
  for docname in app.env.found_docs:
    if is_notebook(app, docname):
      target = out / f'{docname}.ipynb'
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(app.env.doc2path(docname), target)


project = 'flaxtrain'
author = 'the flaxtrain authors'
copyright = 'the flaxtrain authors'  # noqa: A001 (Sphinx's name)

extensions = [
    'myst_nb',                 # .ipynb and .md pages; includes myst_parser
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',     # Google-style Args/Returns/Example sections
    'sphinx.ext.mathjax',
    'sphinx-mathjax-offline',  # MathJax 3 shipped in the package, copied to _static/mathjax
]

# The source folder is the repository: only these files are pages (numbered notebooks, not scratch
# files or checkpoints that runs leave behind), and the folders below are not even walked.
root_doc = 'README'
include_patterns = ['README.md', 'notebooks/[0-9][0-9]_*.ipynb', 'notebooks/README.md',
                    'benchmarks/README.md', 'docs/api.md', 'docs/api/flaxtrain*.rst']
exclude_patterns = ['.*', '**/.*', 'build', 'dist', '*.egg-info', 'flaxtrain', 'tests', 'tools',
                    'notebooks/_scratch', 'notebooks/checkpoints', 'checkpoints', 'runs']

# Render what is stored; never start a kernel.
nb_execution_mode = 'off'
nb_merge_streams = True
nb_render_markdown_format = 'myst'  # Markdown outputs may hold $maths$ too
nb_ipywidgets_js = {}  # the ipywidgets embedder comes from a CDN; explorers store a static image instead
myst_enable_extensions = ['dollarmath', 'amsmath']

# The SVG output of MathJax carries its glyphs in the script: no font files to fetch, which a browser
# refuses from file:// pages. sphinx-mathjax-offline points mathjax_path at its CHTML build; this wins.
mathjax_path = 'mathjax/tex-svg.js'

autodoc_default_options = {'show-inheritance': True}  # each page names its members: documented_here
autodoc_typehints = 'description'
autodoc_member_order = 'bysource'
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = 'sphinx_book_theme'
html_title = 'flaxtrain'
html_copy_source = False  # the notebooks are copied next to their pages instead
html_show_sourcelink = False
html_static_path = ['_static']
html_js_files = ['file-search.js']
html_context = {'default_mode': 'light'}  # the stored plots are drawn on white
html_theme_options = {
    'home_page_in_toc': True,
    'show_toc_level': 2,
    'use_download_button': False,
    'use_fullscreen_button': False,
    'navbar_persistent': [],  # one search box, in the sidebar
}


def setup(app):
  app.config.mathjax_path = mathjax_path  # after sphinx-mathjax-offline's setup set its own
  app.connect('builder-inited', write_api_pages)
  app.connect('source-read', add_toctrees)
  app.connect('autodoc-skip-member', skip_tuple_field_aliases)
  app.connect('doctree-read', add_run_note)
  app.connect('build-finished', finish_site)
  return {'parallel_read_safe': True, 'parallel_write_safe': True}
