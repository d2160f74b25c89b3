"""The optuna-dashboard screenshots in docs/ (docs/mlflow-ui.md#optuna-dashboard), taken in a
real chromium over a study's Optuna storage. Not a test: run it by hand after a study.

    python tests/study/dashboard_screenshots.py sqlite:///optuna.db OUT_DIR [--chromium PATH]

It starts optuna-dashboard on the storage (a free port on 127.0.0.1), opens the first study's
note (the report's importance panel), its first page (hyperparameter importance) and its Smart
Selection page (parallel coordinates, without the `variant` axis), photographs each card, writes
optuna-dashboard-note.png, optuna-dashboard-importance.png and optuna-dashboard-parallel.png to
OUT_DIR, and stops the dashboard. Playwright drives the system chromium (it cannot download
its own browsers here).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# file -> (page under the study, the card to photograph)
PAGES = {"optuna-dashboard-importance.png": ("", "Hyperparameter Importance"),
         "optuna-dashboard-note.png": ("/note", "Which template dimension mattered"),
         "optuna-dashboard-parallel.png": ("/smartSelection", "Parallel Coordinate")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"optuna-dashboard did not answer at {url}")


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("storage")
    args.add_argument("out", type=Path)
    args.add_argument("--chromium", default="/usr/bin/chromium")
    args.add_argument("--study-id", default="1")
    a = args.parse_args()
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "import sys; from optuna_dashboard._cli "
                               "import main; sys.exit(main())", a.storage, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{base}/api/studies")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=a.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for name, (path, card) in PAGES.items():
                page.goto(f"{base}/dashboard/studies/{a.study_id}{path}", wait_until="load")
                page.wait_for_timeout(6000)  # the plots render after the data arrives
                variant_axis = page.get_by_label("Param variant")
                if variant_axis.count():  # one tick per trial: it hides the dimensions' axes
                    variant_axis.uncheck()
                    page.wait_for_timeout(2000)
                page.locator(".MuiCard-root", has_text=card).last.screenshot(path=str(a.out / name))
                print(a.out / name)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
