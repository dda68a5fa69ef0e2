"""The circuit viewer: one self-contained HTML page per run (``edgeprune view``).

``sources`` reads a run directory, an ``edges.json`` or a scores file into a ranked edge list;
``payload`` lays the graph out by layer and builds the page's JSON data (deterministic);
``page`` inlines the template, the script and the data into one HTML file and can serve it.
"""

from .page import serve, write_html
from .payload import DEFAULT_CAP, build_payload
from .sources import ViewSource, load_source

__all__ = ["DEFAULT_CAP", "ViewSource", "build_payload", "load_source", "serve", "write_html"]
