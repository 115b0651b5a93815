# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Fixture ``http_site``: real HTTP servers on 127.0.0.1 answering what each
test scripts, path by path: Spacewatch index pages and JPEG images, status
pages, and every hostile answer (wrong status, wrong body, truncated, slow,
headers sent a byte at a time, redirected elsewhere, no Content-Type, any
Last-Modified).  See doc/testing.rst.
"""
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

#: Path of the day directories, as on the Spacewatch server.
CROPPED = '/allsky-all/images/cropped'


@dataclass
class Answer:
    """One scripted HTTP answer."""

    #: HTTP status code.
    code: int = 200
    #: The body.
    body: bytes = b''
    #: Other headers, ``(name, value)`` pairs, sent as they are.
    headers: tuple = ()
    #: Content-Length: ``True`` the real length, ``False`` none (the end of
    #: the connection ends the body), or a number to announce.
    length: object = True
    #: Send only this many bytes of the body, then close the connection.
    send: object = None
    #: Seconds to wait before answering (the end of the test cuts it short).
    delay: float = 0.0
    #: Seconds to wait between bytes of the body.
    drip: float = 0.0
    #: Seconds to wait between bytes of the status line and headers.
    header_drip: float = 0.0


def jpeg(n=0, size=2000):
    """A small file shaped like a JPEG image (start and end markers), distinct for each `n`."""
    filler = (f'image {n:d} '.encode() * size)[:max(0, size - 13)]
    return b'\xff\xd8\xff\xe0\x00\x10JFIF\x00' + filler + b'\xff\xd9'


def index_page(day, hrefs, extra=''):
    """An Apache-style index of `day` (``YYYY/MM/DD``) linking `hrefs`."""
    rows = ''.join(f'<tr><td valign="top"><img src="/icons/image2.gif" alt="[IMG]"></td>'
                   f'<td><a href="{h}">{h}</a></td><td align="right">2023-10-31 00:00  </td>'
                   f'<td align="right">142K</td><td>&nbsp;</td></tr>\n' for h in hrefs)
    return f"""<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">
<html>
<head><title>Index of {CROPPED}/{day}</title></head>
<body>
<h1>Index of {CROPPED}/{day}</h1>
<table>
<tr><th><a href="?C=N;O=D">Name</a></th><th><a href="?C=M;O=A">Last modified</a></th></tr>
<tr><td><a href="{CROPPED}/{day.rsplit('/', 1)[0]}/">Parent Directory</a></td></tr>
{rows}{extra}
</table>
</body>
</html>
"""


class Site(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 answering scripted :class:`Answer` objects."""

    daemon_threads = True

    def __init__(self):
        super().__init__(('127.0.0.1', 0), _Handler)
        self.port = self.server_address[1]
        #: ``127.0.0.1:PORT``, what ``--server`` takes.
        self.hostport = f'127.0.0.1:{self.port:d}'
        #: ``http://127.0.0.1:PORT``.
        self.url = f'http://{self.hostport}'
        #: Paths requested, in order.
        self.requests = []
        self.routes = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()

    def route(self, path, *answers):
        """Answer GET `path` with `answers` in turn, the last one for ever after."""
        with self.lock:
            self.routes[path] = list(answers)

    def day(self, day, images, extra='', content_type='text/html;charset=ISO-8859-1',
            modified='Tue, 31 Oct 2023 00:00:24 GMT'):
        """Publish the index of `day` (``YYYY/MM/DD``) and its `images`.

        `images` maps a name to its body (or an :class:`Answer`); each image
        gets `modified` as Last-Modified unless it is an :class:`Answer`.
        Returns the URL of the index.
        """
        path = f'{CROPPED}/{day}/'
        headers = (('Content-Type', content_type),) if content_type else ()
        self.route(path, Answer(body=index_page(day, list(images), extra).encode('latin-1'),
                                headers=headers))
        for name, body in images.items():
            answer = body if isinstance(body, Answer) else Answer(
                body=body, headers=(('Content-Type', 'image/jpeg'),)
                + ((('Last-Modified', modified),) if modified else ()))
            self.route(path + name, answer)
        return self.url + path

    def answer_for(self, path):
        with self.lock:
            self.requests.append(path)
            answers = self.routes.get(path)
            if not answers:
                return Answer(404, b'<html><body>Not Found</body></html>',
                              (('Content-Type', 'text/html'),))
            return answers.pop(0) if len(answers) > 1 else answers[0]


class _Handler(BaseHTTPRequestHandler):

    def do_GET(self):
        server = self.server
        answer = server.answer_for(self.path)
        if answer.delay and server.wake.wait(answer.delay):
            return
        body = answer.body
        data = body if answer.send is None else body[:answer.send]
        headers = list(answer.headers)
        if answer.length is True:
            headers.append(('Content-Length', str(len(body))))
        elif answer.length is not False:
            headers.append(('Content-Length', str(answer.length)))
        try:
            if answer.header_drip:
                head = ''.join([f'{self.protocol_version} {answer.code:d} '
                                f'{self.responses.get(answer.code, ("",))[0]}\r\n']
                               + [f'{name}: {value}\r\n' for name, value in headers]
                               + ['\r\n'])
                if not self._drip(head.encode('latin-1'), answer.header_drip):
                    return
            else:
                self.send_response(answer.code)
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
            if answer.drip:
                self._drip(data, answer.drip)
            else:
                self.wfile.write(data)
        except OSError:
            pass  # the client gave up
        self.close_connection = True

    def _drip(self, data, seconds):
        """Send `data` a byte every `seconds`; ``False`` if the end of the test cut it short."""
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            if self.server.wake.wait(seconds):
                return False
        return True

    def log_message(self, format, *args):
        pass


@pytest.fixture
def http_site():
    """Start HTTP servers on 127.0.0.1: ``http_site()`` returns a new :class:`Site`.

    Every server stops when the test ends, cutting short slow answers.
    """
    sites = []

    def start():
        site = Site()
        thread = threading.Thread(target=site.serve_forever, kwargs={'poll_interval': 0.05},
                                  daemon=True)
        thread.start()
        sites.append((site, thread))
        return site

    yield start
    for site, thread in sites:
        site.wake.set()
        site.shutdown()
        site.server_close()
        thread.join(timeout=10)
