"""Save a PNG of every dashboard page: `python scripts/screenshots.py OUT_DIR [ROOT]`.

Without ROOT, the committed fixture stores (fixtures/stores) are shown. The pages are
opened in Debian's headless chromium (no download) and captured once their graphs have drawn.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboards.data import list_runs  # noqa: E402
from dashboards.testing import Server, dash_idle, make_driver, quit_driver, severe_logs, wait_for  # noqa: E402

PAGES = ("runs", "routing", "conflicts", "probes", "experts", "compare", "live")


def _full_page(driver, path: Path) -> None:
    # Grow the window to the page's height so one PNG shows every section.
    h = int(driver.execute_script("return document.documentElement.scrollHeight"))
    want = min(max(h + 40, 800), 6000)
    driver.set_window_size(1400, want)
    # The window's size includes the browser's own frame (~140 px in headless chromium): grow it
    # by what the viewport lacks, or the PNG loses the page's bottom.
    inner = int(driver.execute_script("return window.innerHeight"))
    if inner < want:
        driver.set_window_size(1400, min(2 * want - inner, 6200))
    time.sleep(0.5)
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)


def capture(root, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with Server(root, refresh=5.0) as srv:
        d = make_driver()
        try:
            d.get(srv.url + "/")
            wait_for(lambda: d.find_elements("css selector", "#runs-tbl tbody tr"), 60, what="runs")
            # Tick up to three runs so the Compare page has something to overlay.
            boxes = d.find_elements("css selector", "#runs-pick input[type=checkbox]")
            for b in boxes[:3]:
                b.click()
            for page in PAGES:
                if page != "runs":
                    d.find_element("id", f"nav-{page}").click()  # client-side: keeps selection
                time.sleep(1.0)
                wait_for(lambda: dash_idle(d), 60, what=f"{page} callbacks")
                time.sleep(1.0)
                p = out / f"{page}.png"
                _full_page(d, p)
                shots.append(p)
            errs = severe_logs(d)
            if errs:
                print("browser console errors:", *errs, sep="\n  ", file=sys.stderr)
        finally:
            quit_driver(d)
    return shots


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("root", nargs="?", default=None)
    a = ap.parse_args(argv)
    # the committed fixture stores by default (the dashboard only reads them)
    root = a.root or Path(__file__).resolve().parents[1] / "fixtures" / "stores"
    try:
        if not list_runs(root):
            raise ValueError(f"no runs under {root}")
    except ValueError as e:
        print(f"screenshots: {e}", file=sys.stderr)
        return 2
    shots = capture(root, Path(a.out_dir))
    print("\n".join(map(str, shots)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
