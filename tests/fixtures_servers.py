# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Fixtures for the archive and alert paths: the HPSS emulator (``hpss``),
an HTTP server imitating the NERSC status API (``hpss_status_server``) and
an SMTP server collecting alert emails (``smtp_server``).

The servers are started once per session on 127.0.0.1; the function-scoped
fixtures reset their state, so every test starts clean.  See doc/testing.rst.
"""
import email
import email.policy
import json
import os
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_port

#: Directory holding the hsi and htar emulators.
HPSS_BIN = Path(__file__).parent / 'hpss'

#: The HPSS home directory that HPSS_EMULATOR_ROOT stands for.
HPSS_HOME = '/home/d/desi'


class HPSS:
    """The emulated HPSS of one test; see the ``hpss`` fixture."""

    def __init__(self, root, log, monkeypatch):
        self.bin = HPSS_BIN
        self.hsi = str(HPSS_BIN / 'hsi')
        self.htar = str(HPSS_BIN / 'htar')
        self.root = root
        self.log = log
        self._monkeypatch = monkeypatch

    def path(self, hpss_path):
        """Local :class:`~pathlib.Path` of an HPSS path (relative to the HPSS
        home directory, or absolute under it)."""
        hpss_path = str(hpss_path)
        if hpss_path == HPSS_HOME or hpss_path.startswith(HPSS_HOME + '/'):
            hpss_path = hpss_path[len(HPSS_HOME):]
        return self.root.joinpath(*[p for p in hpss_path.split('/') if p])

    def calls(self):
        """Every hsi/htar invocation so far, oldest first, each a list
        ``[program, arg1, arg2, ...]`` (program without its directory)."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def fail(self, *which):
        """Make the named programs (``'hsi'``, ``'htar'``) fail from now on."""
        assert which and set(which) <= {'hsi', 'htar'}, which
        self._monkeypatch.setenv('HPSS_EMULATOR_FAIL', ','.join(which))

    def heal(self):
        """Stop failing."""
        self._monkeypatch.delenv('HPSS_EMULATOR_FAIL', raising=False)

    def members(self, archive):
        """Member names of an archive on the emulated tape, in archive order
        (directories without a trailing ``/``)."""
        with tarfile.open(self.path(archive)) as tar:
            return tar.getnames()


@pytest.fixture
def hpss(tmp_path, monkeypatch):
    """An empty emulated HPSS for one test.

    Sets :envvar:`HPSS_EMULATOR_ROOT`, :envvar:`HPSS_EMULATOR_LOG`, removes
    :envvar:`HPSS_EMULATOR_FAIL` and puts the emulators first on :envvar:`PATH`.
    """
    root = tmp_path / 'hpss_home'
    root.mkdir()
    log = tmp_path / 'hpss_calls.jsonl'
    monkeypatch.setenv('HPSS_EMULATOR_ROOT', str(root))
    monkeypatch.setenv('HPSS_EMULATOR_LOG', str(log))
    monkeypatch.delenv('HPSS_EMULATOR_FAIL', raising=False)
    monkeypatch.setenv('PATH', str(HPSS_BIN) + os.pathsep + os.environ.get('PATH', ''))
    yield HPSS(root, log, monkeypatch)
    # hsi chmod may have removed write permission; let tmp_path be cleaned.
    for top, dirs, _ in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(top, d), 0o755)


class StatusServer(ThreadingHTTPServer):
    """HTTP server imitating ``https://api.nersc.gov/api/v1.2/status/archive``."""

    daemon_threads = True
    path = '/api/v1.2/status/archive'

    def __init__(self, port):
        super().__init__(('127.0.0.1', port), StatusHandler)
        self.url = f'http://127.0.0.1:{port}{self.path}'
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        """Status ``active``, no delay, no requests counted."""
        with self._lock:
            wake = getattr(self, '_wake', None)
            if wake is not None:
                wake.set()  # release requests still sleeping in set_delay
            self._wake = threading.Event()
            self.delay = 0.0
            self.requests = 0
            self.request_paths = []
        self.set_status('active')

    def set_status(self, status, **fields):
        """Serve a normal JSON answer with this ``status`` (and extra fields)."""
        answer = {'name': 'archive', 'full_name': 'HPSS Archive (User)',
                  'description': 'HPSS archive storage system',
                  'system_type': 'storage', 'notes': [], 'status': status,
                  'updated_at': '2021-01-01T12:00:00-08:00'}
        answer.update(fields)
        self.set_raw(json.dumps(answer), content_type='application/json')

    def set_raw(self, body, code=200, content_type='text/html; charset=utf-8'):
        """Serve this body (:class:`str` or :class:`bytes`) with this HTTP code."""
        if isinstance(body, str):
            body = body.encode('utf-8')
        with self._lock:
            self.answer = (code, content_type, body)

    def set_delay(self, seconds):
        """Wait this many seconds before answering (the test's end cuts it short)."""
        with self._lock:
            self.delay = float(seconds)


class StatusHandler(BaseHTTPRequestHandler):

    def do_GET(self):
        server = self.server
        with server._lock:
            server.requests += 1
            server.request_paths.append(self.path)
            delay, wake = server.delay, server._wake
            code, content_type, body = server.answer
        if delay:
            wake.wait(delay)
        if self.path.split('?')[0] != server.path:
            code, content_type = 404, 'application/json'
            body = b'{"detail": "Not Found"}'
        try:
            self.send_response(code)
            self.send_header('Content-Type', content_type)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (timeout test)

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope='session')
def _status_server_session():
    server = StatusServer(free_port())
    thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05},
                              daemon=True)
    thread.start()
    yield server
    server.reset()
    server.shutdown()
    server.server_close()


@pytest.fixture
def hpss_status_server(_status_server_session):
    """The NERSC status API imitation, reset to ``active`` for this test.

    Attributes ``url``, ``requests`` (count), ``request_paths``; methods
    ``set_status``, ``set_raw``, ``set_delay``.
    """
    _status_server_session.reset()
    yield _status_server_session
    _status_server_session.reset()


class MailCollector:
    """aiosmtpd handler keeping every message; see the ``smtp_server`` fixture."""

    def __init__(self, host, port):
        self.host = host
        self.port = port
        self.hostport = f'{host}:{port}'
        self.messages = []
        self.envelopes = []
        self._arrived = threading.Condition()

    async def handle_DATA(self, server, session, envelope):
        # Line ends as the sender wrote them, not CRLF as on the wire.
        raw = (envelope.original_content or envelope.content).replace(b'\r\n', b'\n')
        message = email.message_from_bytes(raw, policy=email.policy.default)
        with self._arrived:
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self.messages.append(message)
            self._arrived.notify_all()
        return '250 Message accepted for delivery'

    def wait(self, n, timeout=5.0):
        """``True`` once at least `n` messages arrived, ``False`` after `timeout` seconds."""
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.messages) >= n, timeout=timeout)

    def clear(self):
        with self._arrived:
            self.messages.clear()
            self.envelopes.clear()


@pytest.fixture(scope='session')
def _smtp_server_session():
    from aiosmtpd.controller import Controller
    collector = MailCollector('127.0.0.1', free_port())
    controller = Controller(collector, hostname=collector.host, port=collector.port)
    controller.start()
    yield collector
    controller.stop()


@pytest.fixture
def smtp_server(_smtp_server_session):
    """A real SMTP server on 127.0.0.1, with no messages yet."""
    _smtp_server_session.clear()
    yield _smtp_server_session
    _smtp_server_session.clear()
