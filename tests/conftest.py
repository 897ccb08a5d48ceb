"""Fixtures shared by the tests that drive headless Chromium (test_browser.py, test_site.py)."""

import contextlib
import os
import pathlib

import pytest

import _jupyterlab as jl


@pytest.fixture(scope='module')
def chromium():
  """The system's Chromium; skipped when missing, except under CI=true, where that fails."""
  reason = jl.missing()
  if reason and os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
    pytest.fail(f'CI=true, so the browser tests must run, but {reason}')
  if reason:
    pytest.skip(reason)
  return jl.find_chromium()


@pytest.fixture(scope='module')
def screenshots(request, tmp_path_factory):
  """Where the screenshots go (FLAXTRAIN_SCREENSHOTS, or a temporary folder), printed once per module."""
  path = pathlib.Path(os.environ.get('FLAXTRAIN_SCREENSHOTS') or tmp_path_factory.mktemp('screenshots'))
  path.mkdir(parents=True, exist_ok=True)
  capture = request.config.pluginmanager.get_plugin('capturemanager')
  with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
    print(f'\n{request.module.__name__} screenshots: {path}', flush=True)
  return path


@pytest.fixture(scope='module')
def browser(chromium):
  """Headless Chromium through Playwright, one per test module."""
  from playwright.sync_api import sync_playwright
  with sync_playwright() as playwright:
    chrome = playwright.chromium.launch(executable_path=chromium, args=jl.CHROMIUM_ARGS)
    try:
      yield chrome
    finally:
      chrome.close()
