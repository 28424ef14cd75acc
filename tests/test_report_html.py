"""``reports/index.html`` and the executed notebooks' pages, opened in a real headless browser
(Debian's ``chromium``) with the network off: every CircuitsVis view renders (its DOM is built),
and no page asks for a remote URL.

Chromium's own network log (``--log-net-log``) records every request a page starts, including
those that fail at once (the proxy points nowhere and every host name resolves to nothing);
requests the browser makes for itself (update checks) carry no page as initiator and are set
aside. Where Chromium is absent these tests say so and skip; ``.ci/run`` installs it first.
"""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser():
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it so CI runs this test")


def render(page: Path, tmp: Path) -> tuple[str, list[str]]:
    """Open ``page`` in headless Chromium with the network off.

    Returns:
        The DOM after scripts ran, and the URLs of the requests the page started (not the
        browser's own), in order.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "netlog.json"
    cmd = [
        _browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
        f"--user-data-dir={tmp / 'profile'}", "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--log-net-log={log}", "--virtual-time-budget=10000", "--dump-dom", Path(page).resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"chromium failed on {page}: {done.stderr[-2000:]}"
    net = json.loads(log.read_text())
    names = {v: k for k, v in net["constants"]["logEventTypes"].items()}
    urls = []
    for event in net["events"]:
        params = event.get("params", {})
        if names.get(event["type"]) == "URL_REQUEST_START_JOB" and "url" in params:
            by_page = params.get("initiator") != "not an origin" or "file://" in params.get("network_isolation_key", "")
            if by_page and not params["url"].startswith(("file:", "data:", "blob:")):
                urls.append(params["url"])
    return done.stdout, urls


class _Views(HTMLParser):
    """For each CircuitsVis container (``<div id="circuits-vis-...">``), its first child tag."""

    def __init__(self):
        super().__init__()
        self.first_child: dict[str, str] = {}
        self._open: str = ""

    def handle_starttag(self, tag, attrs):
        if self._open:
            self.first_child[self._open] = tag
            self._open = ""
        ident = dict(attrs).get("id") or ""
        if tag == "div" and ident.startswith("circuits-vis-"):
            self.first_child[ident] = ""
            self._open = ident

    def handle_endtag(self, tag):
        self._open = ""


def views(dom: str) -> dict[str, str]:
    parser = _Views()
    parser.feed(dom)
    return parser.first_child


def test_the_check_sees_remote_requests(tmp_path):
    """The network check can fail: a page that loads a script, a stylesheet, an image and a fetch
    from remote hosts is caught on each of them."""
    page = tmp_path / "remote.html"
    page.write_text(
        '<html><head><script src="https://cdn.example.com/x.js"></script>'
        '<link rel="stylesheet" href="http://fonts.example.org/a.css"></head>'
        '<body><img src="https://img.example.net/i.png">'
        '<script>fetch("https://api.example.com/q").catch(() => {})</script></body></html>'
    )
    _, urls = render(page, tmp_path / "chromium")
    hosts = {re.sub(r"^https?://([^/]+)/.*$", r"\1", u) for u in urls}
    assert hosts == {"cdn.example.com", "fonts.example.org", "img.example.net", "api.example.com"}


def test_an_offline_view_renders_without_network(tmp_path):
    from mechlib.views import attention_heads

    page = attention_heads(torch.eye(4)[None].repeat(2, 1, 1), ["a", "b", "c", "d"], ["L0H0", "L0H1"]).save(
        tmp_path / "v.html"
    )
    assert views(page.read_text()), "the saved view holds no CircuitsVis container"
    dom, urls = render(page, tmp_path / "chromium")
    assert urls == []
    assert all(child == "div" for child in views(dom).values()), f"a view did not render: {views(dom)}"


@pytest.mark.notebook
@pytest.mark.slow
def test_index_and_notebook_pages_render_offline(tmp_path, monkeypatch):
    """``make reproduce``'s HTML, on notebook 00 (it has a CircuitsVis view): the index links the
    executed notebook, its views render, and no page asks for a remote URL."""
    from mechlib.publish import write_index
    from mechlib.runner import REPO, run_notebooks

    _browser()
    monkeypatch.setenv("MECHLIB_PROFILE", "quick")
    reports = tmp_path / "reports"
    runs = run_notebooks([REPO / "notebooks" / "00_tour.py"], reports=reports, timeout=900, log=lambda *_: None)
    assert all(r.ok for r in runs), [r.error for r in runs]
    index = write_index(reports, runs)

    dom, urls = render(index, tmp_path / "chromium-index")
    assert urls == [], f"index.html asked for remote URLs: {urls}"
    links = re.findall(r'href="(executed/[^"]+\.html)"', index.read_text())
    assert links == [f"executed/{runs[0].name}.html"], links
    assert "00_tour" in dom and "Findings" in dom

    for i, link in enumerate(links):
        page = reports / link
        expected = views(page.read_text())
        assert expected, f"{link}: no CircuitsVis view in the page"
        dom, urls = render(page, tmp_path / f"chromium-{i}")
        assert urls == [], f"{link} asked for remote URLs: {urls}"
        rendered = views(dom)
        assert set(rendered) == set(expected)
        assert all(child == "div" for child in rendered.values()), f"{link}: views not rendered: {rendered}"
