# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
================
desitransfer.web
================

A total time limit on HTTP requests, shared by the commands that ask a web
server something (:mod:`desitransfer.spacewatch`, :mod:`desitransfer.tucson`,
:mod:`desitransfer.utah`).

The timeouts of :mod:`requests` bound the connection and each read, not the
request: a server sending a byte now and then, in the status line and
headers as in the body, would hold a request for ever.  A request made with
a :func:`session` inside a :class:`Deadline` is bounded in total: when the
deadline passes, every connection the request used is shut down, which ends
at once a read waiting for the server, wherever it is (connection, status
line, headers, redirects or body); the request then fails and
:attr:`Deadline.expired` says why.

Example::

    deadline = Deadline(600)
    try:
        with deadline, session() as s:
            with s.get(url, timeout=(10, 60), stream=True) as response:
                ...
    except requests.RequestException:
        if deadline.expired:
            ...  # not complete in time
"""
import contextvars
import socket
import threading

import requests


class Deadline:
    """The total time the requests made within this context may take, from
    the connection to the last byte of the body, headers and redirects
    included.

    Only the requests of a :func:`session` (or of a session given to
    :func:`watch`) are bounded, and only in the thread (or context) that
    entered the deadline.  When the deadline passes, their connections are
    shut down: a request in progress fails (:mod:`requests` or
    :mod:`urllib3` raise an error, or a body sent without a length ends
    early), and :attr:`expired` is ``True``.  Whoever reads the answer must
    therefore check :attr:`expired` both when a request fails and after it
    seems to succeed.

    A :class:`Deadline` is used once.

    Parameters
    ----------
    seconds : :class:`float`
        The time allowed.
    """

    def __init__(self, seconds):
        #: The time allowed, in seconds.
        self.seconds = seconds
        #: ``True`` once the deadline has passed.
        self.expired = False
        self._sockets = []
        self._over = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._token = None

    def __enter__(self):
        self._token = _deadline.set(self)
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        with self._lock:
            self._over = True
            self._sockets = []
        _deadline.reset(self._token)
        return False

    def watch(self, sock):
        """Shut `sock` down when the deadline passes (at once if it has).

        Parameters
        ----------
        sock : :class:`socket.socket`
            A connected socket, or a TLS socket of :mod:`urllib3`.
        """
        with self._lock:
            if self._over:
                return
            if self.expired:
                _shutdown(sock)
            else:
                self._sockets.append(sock)

    def _expire(self):
        with self._lock:
            if self._over:
                return
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


#: The :class:`Deadline` of the request in progress in this thread, if any.
_deadline = contextvars.ContextVar('_deadline', default=None)


def _shutdown(sock):
    """End every read and write on `sock`, from any thread (closing it would
    not wake a thread waiting in a read).  For TLS, the underlying socket is
    shut down, leaving the TLS state to the thread that uses it."""
    raw = sock if isinstance(sock, socket.socket) else getattr(sock, 'socket', None)
    try:
        socket.socket.shutdown(raw, socket.SHUT_RDWR)
    except (OSError, TypeError):
        pass  # already closed


class _WatchedConnection:
    """Mixin of the connection classes of :mod:`urllib3`: the socket of each
    request is given to the :class:`Deadline` in progress, as soon as it is
    connected and again when the answer is read (a kept-alive connection is
    connected once and used for several requests)."""

    def connect(self, *args, **kwargs):
        result = super().connect(*args, **kwargs)
        self._watch()
        return result

    def getresponse(self, *args, **kwargs):
        self._watch()
        return super().getresponse(*args, **kwargs)

    def _watch(self):
        deadline = _deadline.get()
        if deadline is not None and getattr(self, 'sock', None) is not None:
            deadline.watch(self.sock)


_watched_pools = {}
_watched_lock = threading.Lock()


def _watched_pool(pool_class):
    """A subclass of the :mod:`urllib3` pool class `pool_class` whose
    connections are :class:`_WatchedConnection`."""
    if issubclass(pool_class.ConnectionCls, _WatchedConnection):
        return pool_class
    with _watched_lock:
        if pool_class not in _watched_pools:
            connection = type(pool_class.ConnectionCls.__name__,
                              (_WatchedConnection, pool_class.ConnectionCls), {})
            _watched_pools[pool_class] = type(pool_class.__name__, (pool_class,),
                                              {'ConnectionCls': connection})
        return _watched_pools[pool_class]


def _watch_manager(manager):
    """Make the pools that `manager` creates use watched connections."""
    manager.pool_classes_by_scheme = {scheme: _watched_pool(cls) for scheme, cls
                                      in manager.pool_classes_by_scheme.items()}
    return manager


class WatchedAdapter(requests.adapters.HTTPAdapter):
    """The transport of :func:`session`: every connection, through a proxy
    or not, is subject to the :class:`Deadline` in progress."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        _watch_manager(self.poolmanager)

    def proxy_manager_for(self, *args, **kwargs):
        return _watch_manager(super().proxy_manager_for(*args, **kwargs))


def watch(session):
    """Give `session` the transport of :func:`session` where it lacks it.

    Parameters
    ----------
    session : :class:`requests.Session`
        Any HTTP session.

    Returns
    -------
    :class:`requests.Session`
        `session`, whose HTTP and HTTPS requests a :class:`Deadline` now bounds.
    """
    for prefix in ('http://', 'https://'):
        if not isinstance(session.get_adapter(prefix), WatchedAdapter):
            session.mount(prefix, WatchedAdapter())
    return session


def session():
    """A new HTTP session whose requests a :class:`Deadline` can bound in total.

    Returns
    -------
    :class:`requests.Session`
        The session (close it, or use it as a context manager).
    """
    return watch(requests.Session())
