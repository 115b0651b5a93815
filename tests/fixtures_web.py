# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Web fixtures: a real static HTTP server on 127.0.0.1 serving a directory.
"""
import functools
import threading
from collections import namedtuple
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

#: What :func:`http_directory` returns: the base URL (ending in ``/``), the
#: directory served, and the requests received as ``(method, path, status)``.
WebDirectory = namedtuple('WebDirectory', ['url', 'directory', 'requests'])


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serve files; record each request instead of printing it."""

    def log_request(self, code='-', size='-'):
        self.server.requests.append((self.command, self.path, int(getattr(code, 'value', code))))

    def log_message(self, format, *args):
        pass


@pytest.fixture
def http_directory():
    """Serve directories over HTTP on 127.0.0.1, like a plain web directory.

    Call ``http_directory(path)`` to start a server for `path`; it returns a
    :class:`WebDirectory`.  Every server stops when the test ends.
    """
    servers = []

    def serve(directory):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = ThreadingHTTPServer(('127.0.0.1', 0), handler)
        server.daemon_threads = True
        server.requests = []
        thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05},
                                  name=f'http {directory}', daemon=True)
        thread.start()
        servers.append((server, thread))
        port = server.server_address[1]
        return WebDirectory(f'http://127.0.0.1:{port}/', str(directory), server.requests)

    yield serve
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
