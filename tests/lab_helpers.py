"""A headless JupyterLab for the browser tests of widgets (the explorer, ``lenscope.show``).

:func:`running_lab` starts JupyterLab (from PyPI, in the ``test`` extra) on a
free port with a throw-away root folder holding the given notebooks;
:func:`open_and_run` opens one in the ``browser`` fixture's Chromium and runs
its cells once the kernel is up; :func:`wait` polls the page for a condition.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKEN = "lenscope-test"

SETUP = f"""import sys
sys.path.insert(0, {str(REPO / "tests")!r})
import tempfile
import lenscope
from conftest import make_tiny_model, make_tiny_tokenizer

model = make_tiny_model(make_tiny_tokenizer(tempfile.mkdtemp()))
"""
"""Notebook code that builds the tests' seeded tiny model as ``model``."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook_json(source: str) -> str:
    """A notebook of one code cell, ``source``, on the default Python kernel."""
    notebook = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": "setup",
                "metadata": {},
                "outputs": [],
                "source": source,
            }
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(notebook)


@contextlib.contextmanager
def running_lab(root: Path, notebooks: dict[str, str]) -> Iterator[str]:
    """A JupyterLab server on a free port serving ``root``; yields its URL.

    Args:
        root: An empty folder, the server's root.
        notebooks: ``{file name: code of its one cell}``, written into ``root``.
    """
    if (
        shutil.which("jupyter-lab") is None
        and not (Path(sys.executable).parent / "jupyter-lab").exists()
    ):
        message = 'JupyterLab is not installed; pip install -e ".[test]"'
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    port = _free_port()
    # No "news" toast over the bottom right of the notebook, and no user settings read.
    settings = root.parent / f"{root.name}-settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True, exist_ok=True)
    (
        settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    ).write_text(json.dumps({"fetchNews": "false"}))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            f"--port={port}",
            "--ip=127.0.0.1",
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={root}",
            "--allow-root",
            "--ServerApp.terminals_enabled=False",
            "--LabApp.extension_manager=readonly",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=",
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={settings}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.terminate()
                log.close()
                raise AssertionError(
                    f"JupyterLab did not start: {(root / 'server.log').read_text()}"
                ) from None
            time.sleep(0.5)
    for name, source in notebooks.items():
        (root / name).write_text(notebook_json(source))
    try:
        yield url
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def wait(driver, script, what, timeout=120.0, *args, shown=None):
    """Poll ``script`` until it returns something true; on timeout say what the page shows.

    Args:
        driver: The selenium driver.
        script: JavaScript returning the condition.
        what: What is awaited, for the error.
        timeout: Seconds.
        *args: Arguments of ``script``.
        shown: CSS selector of the element whose text the error quotes
            (default: the page's).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value:
            return value
        if time.monotonic() > deadline:
            text = driver.execute_script(
                "const w = arguments[0] && document.querySelector(arguments[0]);"
                "return w ? w.innerText : document.body.innerText.slice(0, 2000)",
                shown,
            )
            raise AssertionError(f"timed out waiting for {what}; the page shows: {text}")
        time.sleep(0.1)


def open_and_run(driver, url: str, name: str) -> None:
    """Open notebook ``name`` in JupyterLab and run all its cells once the kernel is up."""
    driver.get(f"{url}/lab/tree/{name}?token={TOKEN}")
    wait(
        driver,
        "return !!(window.jupyterapp && document.querySelector('.jp-Notebook'))",
        "JupyterLab",
    )
    wait(
        driver,
        "const w = window.jupyterapp.shell.currentWidget;"
        "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
        " && w.sessionContext.session.kernel.connectionStatus === 'connected')",
        "the kernel",
    )
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
