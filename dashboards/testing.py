"""Real-browser helpers for the dashboard's tests, screenshots and benchmark.

The server runs in a subprocess (`python -m moe_probe dash`) because Dash hands page callbacks to
the first app of a process only; the browser is Debian's chromium driven through the system
chromedriver — nothing is ever downloaded (selenium gets an explicit Service path).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = os.environ.get("MOE_PROBE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MOE_PROBE_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000")


def browser_missing() -> str | None:
    """Why no browser can be driven here, or None."""
    for p in (CHROMIUM, CHROMEDRIVER):
        if not (Path(p).exists() and os.access(p, os.X_OK)):
            return f"{p} not found (apt-get install chromium chromium-driver)"
    return None


def need_browser() -> None:
    """In a test: skip where no browser can be driven, but fail under CI (``CI`` set), where
    the browser tests must run."""
    import pytest

    why = browser_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {why}")
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen | None) -> None:
    """End a server subprocess this process started: SIGTERM, then SIGKILL after 10 s."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


class Server:
    """`moe-probe dash ROOT` in a subprocess; use as a context manager. `repo`: the checkout to
    run (default: this one); `env`: extra environment variables."""

    def __init__(self, root, *, refresh: float = 1.0, port: int | None = None, timeout: float = 60,
                 repo=None, env: dict | None = None):
        self.root, self.refresh, self.port = str(root), refresh, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = timeout
        self.repo = Path(repo) if repo else Path(__file__).resolve().parents[1]
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile("w+", prefix="moe_probe_dash_", suffix=".log",
                                               delete=False)

    def __enter__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **self.env}
        env["PYTHONPATH"] = str(self.repo) + os.pathsep + env.get("PYTHONPATH", "")
        # cwd: `python -m` puts the working directory first on sys.path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moe_probe", "dash", self.root, "--port", str(self.port),
             "--refresh", str(self.refresh)], stdout=self.log, stderr=subprocess.STDOUT, env=env,
            cwd=self.repo)
        deadline = time.time() + self.timeout
        why = f"did not start in {self.timeout}s"
        while time.time() < deadline:
            if self.proc.poll() is not None:
                why = f"exited with {self.proc.returncode}"
                break
            try:
                with urllib.request.urlopen(self.url + "/_dash-layout", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        out = self.output()
        self.__exit__()
        raise RuntimeError(f"dashboard {why}: {out}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def __exit__(self, *exc):
        stop(self.proc)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        return False


def make_driver(width: int = 1400, height: int = 1000, trace_categories: str | None = None):
    """Headless chromium through the system chromedriver, with browser logs kept; with
    `trace_categories`, chromium's trace events come back through `get_log("performance")`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    why = browser_missing()
    if why:
        raise RuntimeError(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in CHROME_FLAGS:
        opts.add_argument(f)
    profile = tempfile.mkdtemp(prefix="moe_probe_chromium_")
    opts.add_argument(f"--user-data-dir={profile}")
    if trace_categories:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        opts.add_experimental_option("perfLoggingPrefs", {
            "traceCategories": trace_categories, "enableNetwork": False, "enablePage": False})
    else:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_window_size(width, height)
    driver._moe_profile = profile  # removed by quit_driver
    return driver


def quit_driver(driver) -> None:
    try:
        driver.quit()
    finally:
        shutil.rmtree(getattr(driver, "_moe_profile", ""), ignore_errors=True)


def severe_logs(driver) -> list[dict]:
    """SEVERE browser console entries since the last call (reading clears them)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


# Plotly keeps what Dash sent in gd.data, where numpy arrays may arrive base64-encoded
# ({dtype, bdata, shape}); _fullData holds them decoded, so read the arrays from there.
_READ_GRAPH_JS = """
const el = document.getElementById(arguments[0]);
if (!el) return null;
const gd = el.classList.contains('js-plotly-plot') ? el : el.querySelector('.js-plotly-plot');
if (!gd || !gd._fullData) return null;
const arr = v => (v == null) ? null
    : (ArrayBuffer.isView(v) ? Array.from(v)
    : (Array.isArray(v) ? v.map(r => (ArrayBuffer.isView(r) || Array.isArray(r)) ? arr(r) : r) : v));
const title = gd.layout && gd.layout.title ? (gd.layout.title.text || gd.layout.title) : '';
return JSON.stringify({title: title, traces: gd._fullData.map(t => ({
    type: t.type, name: t.name, visible: t.visible, x: arr(t.x), y: arr(t.y), z: arr(t.z)}))});
"""


_TITLE_JS = """
const el = document.getElementById(arguments[0]);
const gd = el && (el.classList.contains('js-plotly-plot') ? el : el.querySelector('.js-plotly-plot'));
if (!gd || !gd._fullLayout || !gd._fullData || !gd._fullData.length) return null;
const t = gd._fullLayout.title; return [t ? (t.text || '') : '', gd._fullData.length];
"""


def graph_title(driver, graph_id: str):
    """(title, number of traces) of a drawn graph, or None: a cheap poll that does not ship the
    plotted arrays over the webdriver (which would itself slow a timed page down)."""
    return driver.execute_script(_TITLE_JS, graph_id)


def graph_data(driver, graph_id: str) -> dict | None:
    """Title and traces (type, name, x, y, z) that the page's plotly graph is drawing."""
    raw = driver.execute_script(_READ_GRAPH_JS, graph_id)
    return None if raw is None else json.loads(raw)


def wait_for(fn, timeout: float = 30, interval: float = 0.2, what: str = "condition"):
    """Poll `fn` until it returns something truthy (returned); TimeoutError naming `what`."""
    deadline = time.time() + timeout
    last_exc = None
    while time.time() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - the page may be mid-render
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


def wait_graph(driver, graph_id: str, pred=lambda g: True, timeout: float = 30):
    """Graph data once it holds traces satisfying `pred` (not the 'loading…' placeholder)."""
    def ready():
        g = graph_data(driver, graph_id)
        return g if g and g["traces"] and pred(g) else None
    return wait_for(ready, timeout, what=f"graph {graph_id}")


def zoom_x(driver, graph_id: str, lo: float, hi: float, timeout: float = 30) -> None:
    """Zoom a graph's x axis as a user's box zoom does (a plotly_relayout event).

    Plotly draws (and fills _fullData) before Dash's Graph binds its relayout listener; a zoom
    in between is lost, so wait for the listener first."""
    sel = f"#{graph_id} .js-plotly-plot"
    wait_for(lambda: driver.execute_script(
        "const gd = document.querySelector(arguments[0]);"
        "return !!(gd && gd._ev && gd._ev._events && gd._ev._events.plotly_relayout);", sel),
        timeout, interval=0.05, what=f"{graph_id} listening")
    driver.execute_script("Plotly.relayout(document.querySelector(arguments[0]),"
                          " {'xaxis.range[0]': arguments[1], 'xaxis.range[1]': arguments[2]});",
                          sel, lo, hi)


def dash_idle(driver) -> bool:
    """No callback in flight (Dash marks the document while it waits for callbacks)."""
    return driver.execute_script(
        "return !document.querySelector('[data-dash-is-loading=\"true\"]');")
