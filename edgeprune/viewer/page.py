"""One self-contained HTML file: the template, its script and the data payload inlined (no network)."""

from __future__ import annotations

import http.server
import json
from importlib import resources
from pathlib import Path


def render(payload: dict) -> str:
    """The page's HTML text for a payload (deterministic: sorted keys, compact JSON)."""
    static = resources.files("edgeprune.viewer") / "static"
    template = (static / "viewer.html").read_text(encoding="utf-8")
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    data = data.replace("</", "<\\/").replace("<!--", "<\\!--")  # cannot close the <script> element
    return (template.replace("/*__CSS__*/", (static / "viewer.css").read_text(encoding="utf-8"))
            .replace("/*__JS__*/", (static / "viewer.js").read_text(encoding="utf-8"))
            .replace("__PAYLOAD__", data))


def write_html(payload: dict, out_path: str | Path) -> Path:
    out = Path(out_path)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"{out}: the viewer writes an HTML file: the name must end in .html")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(payload), encoding="utf-8")
    return out


def serve(path: str | Path, port: int = 0, ready=None) -> None:
    """Serve the one file ``path`` on 127.0.0.1 until interrupted; ``ready(url)`` is called once listening."""
    body = Path(path).read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler) as httpd:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{Path(path).name}"
        (ready or (lambda u: print(f"serving {path} at {url} (Ctrl-C stops)", flush=True)))(url)
        httpd.serve_forever()
