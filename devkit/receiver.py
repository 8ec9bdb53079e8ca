"""A loopback HTTP server in a thread, for tests that need something to call (webhook receivers)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def loopback_server(handler: type[BaseHTTPRequestHandler], path: str = "/hook") -> Iterator[str]:
    """Serves ``handler`` on a free port of 127.0.0.1 (a thread per request) until the block ends;
    yields the URL of ``path`` there. The socket is closed and the thread joined on the way out."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{path}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
