"""Real JupyterLab in headless Chromium: run 01_quickstart and check the dashboard renders.

Needs ``pip install jupyterlab playwright`` and Debian's ``apt-get install -y chromium`` (never
``playwright install``: the browser is the system one). Skips with the reason when one is missing.
Run with ``pytest -m browser``; the screenshot lands in ``test-output/dashboard.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("LL_CHROMIUM", "/usr/bin/chromium")
OUT = ROOT / "test-output"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]


def _requirements() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (no `playwright install`)")
    pytest.importorskip("jupyterlab", reason="pip install jupyterlab")
    pytest.importorskip("ipywidgets", reason="pip install ipywidgets")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    _requirements()
    root = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", root)
    port, token = _free_port(), "ll-test-token"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "_WANDB"))}
    env.update(FAST="1", WANDB_MODE="offline", WANDB_SILENT="true",
               JUPYTER_CONFIG_DIR=str(tmp_path / "jcfg"), JUPYTER_DATA_DIR=str(tmp_path / "jdata"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jrun"),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    # kernelspecs live in JUPYTER_DATA_DIR/sys.prefix; keep the default python3 kernel visible
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [os.environ.get("JUPYTER_PATH"),
                                                        str(Path(sys.prefix) / "share" / "jupyter")]))
    # render every cell (JupyterLab 4 virtualises off-screen cells) and skip the news prompt
    settings = tmp_path / "jcfg" / "lab" / "user-settings" / "@jupyterlab"
    (settings / "notebook-extension").mkdir(parents=True)
    (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        '{"windowingMode": "none"}')
    (settings / "apputils-extension").mkdir(parents=True)
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false}')
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--ServerApp.open_browser=False", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
         "jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
         # fresh state per run (no restored workspace), and window.jupyterapp so the test can wait
         # on the notebook's real session instead of guessing from the DOM
         f"--LabApp.user_settings_dir={tmp_path / 'jcfg' / 'lab' / 'user-settings'}",
         f"--LabApp.workspaces_dir={tmp_path / 'jcfg' / 'lab' / 'workspaces'}",
         "--LabApp.expose_app_in_browser=True",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyterlab exited: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        pytest.fail("jupyterlab did not start in 90 s")
    yield base, token
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_quickstart_dashboard_renders_in_jupyterlab(jupyterlab):
    from playwright.sync_api import sync_playwright

    base, token = jupyterlab
    OUT.mkdir(exist_ok=True)
    (OUT / "failure.png").unlink(missing_ok=True)  # only this run's failure, if any
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}", timeout=60_000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
            _wait_kernel_ready(page)
            _run_all(page)
            dashboard = page.locator(".ll-dashboard")
            _wait_no_dialog(page, dashboard, timeout=240.0)
            # the dashboard cell: its buttons and the curves image (a PNG data/blob URL)
            dashboard.scroll_into_view_if_needed()
            for label in ("Step", "Run N", "Pause"):
                assert dashboard.get_by_role("button", name=label).count() == 1, label
            image = dashboard.locator("img").first
            image.wait_for(timeout=60_000)
            # wait for the last cell (dash.run(1)) to print its summary, i.e. all cells ran
            page.get_by_text(re.compile(r"steps so far: \d+")).wait_for(timeout=240_000)
            assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
                                ).filter(has_text="Traceback").count() == 0
            width = image.evaluate("img => img.naturalWidth")
            assert width > 200, f"curves image not rendered (naturalWidth={width})"
            assert re.search(r"step \d+ done in", dashboard.inner_text())
            dashboard.scroll_into_view_if_needed()
            dashboard.screenshot(path=str(OUT / "dashboard.png"))
            # the credit panel: old vs new advantage heatmap of the last step
            dashboard.get_by_role("tab", name="Credit").click()
            heatmap = dashboard.locator(".widget-tab-contents img, .lm-TabPanel-stackedPanel img"
                                        ).filter(visible=True).first
            heatmap.wait_for(timeout=30_000)
            assert heatmap.evaluate("img => img.naturalWidth") > 200
            assert "recomputed in" in dashboard.inner_text()
            dashboard.screenshot(path=str(OUT / "credit_panel.png"))
        except Exception:
            page.screenshot(path=str(OUT / "failure.png"))  # what the browser showed, for the log
            raise
        finally:
            browser.close()
    assert (OUT / "dashboard.png").stat().st_size > 10_000


NOTEBOOK = "01_quickstart.ipynb"

# The notebook's SessionContext, via window.jupyterapp (--LabApp.expose_app_in_browser).
_SESSION_JS = """(path) => {
    const app = window.jupyterapp;
    if (!app || !app.shell) return null;
    for (const w of app.shell.widgets('main')) {
        if (w.sessionContext && w.context && w.context.path === path) return w.sessionContext;
    }
    return null;
}"""

_KERNEL_STATE_JS = f"""(path) => {{
    const s = ({_SESSION_JS})(path);
    if (!s) return {{ready: false, why: 'notebook panel not open yet'}};
    const k = s.session && s.session.kernel;
    const state = {{name: s.kernelDisplayName, status: s.kernelDisplayStatus,
                    connection: k ? k.connectionStatus : null, preference: s.kernelPreference}};
    state.ready = !!(s.isReady && !s.hasNoKernel && k && k.connectionStatus === 'connected'
                     && k.status === 'idle');
    return state;
}}"""


def _dialog_text(page) -> str | None:
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and dialog.first.is_visible():
        return " ".join(dialog.first.inner_text().split())
    return None


def _wait_kernel_ready(page, timeout: float = 120.0) -> None:
    """Wait until the notebook's session has a kernel that is connected and idle.

    Why this matters: JupyterLab renders the cells before it has read the notebook's kernelspec
    metadata and started its session. A Run All in that window either silently drops the cells
    (session pending) or, while ``kernelPreference`` is still empty (``hasNoKernel`` with
    ``autoStartDefault: false``), finds no default kernel and opens the modal "Select Kernel"
    dialog, which then stays up although the session's own kernel starts fine. The toolbar's
    ``.jp-Notebook-ExecutionIndicator`` is no readiness signal: it says ``data-status="idle"``
    before any kernel exists. So ask the SessionContext itself."""
    deadline = time.time() + timeout
    state: dict | None = None
    while time.time() < deadline:
        state = page.evaluate(_KERNEL_STATE_JS, NOTEBOOK)
        if state.get("ready"):
            # the kernel answers kernel_info (the websocket round trip really works)
            page.evaluate(f"""async (path) => {{
                const s = ({_SESSION_JS})(path);
                await s.ready;
                await s.session.kernel.info;
            }}""", NOTEBOOK)
            return
        text = _dialog_text(page)
        if text:  # nothing has been run yet, so JupyterLab has no reason to ask anything
            raise AssertionError(f"unexpected JupyterLab dialog while the kernel starts: {text!r}")
        time.sleep(0.25)
    raise TimeoutError(f"the notebook's kernel was not connected and idle within {timeout:.0f} s: "
                       f"{state}")


def _run_all(page) -> None:
    """Run All Cells on the (active) quickstart notebook through JupyterLab's command, the same
    command the Run menu calls; not awaited (it resolves only when the last cell is done)."""
    page.evaluate(f"""(path) => {{
        const app = window.jupyterapp;
        const s = ({_SESSION_JS})(path);
        const panel = Array.from(app.shell.widgets('main')).find(w => w.sessionContext === s);
        app.shell.activateById(panel.id);
        void app.commands.execute('notebook:run-all-cells');
    }}""", NOTEBOOK)


def _wait_no_dialog(page, target, timeout: float) -> None:
    """Wait for ``target`` to be attached; fail at once (with its text) if JupyterLab opens a
    dialog instead, since nobody would answer it and the run would just hang."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if target.count():
            return
        text = _dialog_text(page)
        if text:
            raise AssertionError(f"unexpected JupyterLab dialog after Run All: {text!r}")
        time.sleep(0.5)
    raise TimeoutError(f"{target} did not appear within {timeout:.0f} s of Run All")
