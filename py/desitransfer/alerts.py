# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===================
desitransfer.alerts
===================

Logging and alert emails: the set-up of the shared logger (level, rotating
log file, alert emails), the handler that emails CRITICAL messages at most
once per period each, and the command-line options of alert emails.
"""
import errno
import hashlib
import json
import logging
import logging.handlers
import math
import os
import re
import socket
import stat
import sys
import time
from argparse import ArgumentTypeError

from .common import log
from .files import aside_name, open_append, write_json


#: Most bytes of the body of an alert email; the rest is cut, and the email says so.
ALERT_BODY_LIMIT = 64 * 2**10

#: Most alerts remembered by :class:`AlertHandler` (the oldest are forgotten first).
ALERT_KEYS = 1000

#: Longest message remembered as it is; a longer one is remembered by its
#: start and its SHA-256 digest.
ALERT_KEY_SIZE = 400

#: Largest alert memory file read; a larger one is set aside, never read.
ALERT_MEMORY_LIMIT = 8 * 2**20


def alert_key(message):
    """What :class:`AlertHandler` remembers of `message`: the message itself,
    or its start and its SHA-256 digest if it is longer than
    :data:`ALERT_KEY_SIZE` characters (at most that many in all)."""
    if len(message) <= ALERT_KEY_SIZE:
        return message
    digest = hashlib.sha256(message.encode('utf-8', errors='surrogatepass')).hexdigest()
    return f"{message[:ALERT_KEY_SIZE - 80]}... sha256:{digest}"


def cut_text(text, limit):
    """`text` cut to at most `limit` bytes of UTF-8, followed by a line saying
    how much was cut, or `text` itself if it is not longer."""
    data = text.encode('utf-8', errors='surrogatepass')
    if len(data) <= limit:
        return text
    note = f"\n\n[{len(data) - limit + 200:d} more bytes cut: the limit is {limit:d} bytes.]\n"
    return data[:limit - 200].decode('utf-8', errors='ignore') + note


class AlertHandler(logging.handlers.SMTPHandler):
    """Email CRITICAL messages, at most once per `repeat` seconds per message.

    Whatever a message holds, an email is at most :data:`ALERT_BODY_LIMIT`
    bytes, at most :data:`ALERT_KEYS` messages are remembered, each in at
    most :data:`ALERT_KEY_SIZE` characters, and the memory file is read only
    if it is at most :data:`ALERT_MEMORY_LIMIT` bytes; a memory file that is
    larger, not a regular file or not a memory of alerts is set aside (as
    ``.bad``) with one error, and forgotten.

    Parameters
    ----------
    mailhost : :class:`str`
        SMTP server as ``host:port``.
    recipients : :class:`list`
        Email addresses.
    program : :class:`str`
        Name of the program, used in the subject, ``Error reported by
        PROGRAM!`` as mail filters of the collaboration expect.
    repeat : :class:`float`, optional
        Seconds before the same message is emailed again.
    memory : :class:`str`, optional
        JSON file remembering when each message was last emailed, so that
        runs started one after another (cron with ``--once``) do not repeat
        an alert either.
    subject : :class:`str`, optional
        The subject instead of ``Error reported by PROGRAM!``, for a
        command whose alerts the mail filters know by another subject.
    """

    def __init__(self, mailhost, recipients, program, repeat=6*3600, memory=None,
                 subject=None):
        host, _, port = mailhost.rpartition(':')
        if not host:
            host, port = port, '25'
        user = os.environ.get('USER', 'desi')
        self.hostname = socket.getfqdn()
        super().__init__((host, int(port)), f'{user}@{self.hostname}', recipients,
                         subject or f'Error reported by {program}!', timeout=30)
        self.setLevel(logging.CRITICAL)
        self.repeat = repeat
        self.memory = memory
        self._sent = self._recall(memory) if memory else {}

    @staticmethod
    def _recall(memory):
        """The alerts remembered in the file `memory`, read within the bounds."""
        why = None
        try:
            fd = os.open(memory, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as err:
            if err.errno != errno.ELOOP:
                # Forgetting costs at most one repeated email.
                log.warning("Alert memory %s is unreadable (%s); starting afresh.", memory, err)
                return {}
            why = "a symbolic link"
        else:
            with os.fdopen(fd, 'rb') as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    why = "not a regular file"
                elif st.st_size > ALERT_MEMORY_LIMIT:
                    why = f"{st.st_size:d} bytes, more than the {ALERT_MEMORY_LIMIT:d} read"
                else:
                    data = f.read(ALERT_MEMORY_LIMIT + 1)
                    if len(data) > ALERT_MEMORY_LIMIT:
                        why = f"more than the {ALERT_MEMORY_LIMIT:d} bytes read"
        if why is None:
            try:
                sent = json.loads(data)
                if not isinstance(sent, dict):
                    raise ValueError("not a JSON object")
                remembered = sorted((float(t), alert_key(str(k))) for k, t in sent.items()
                                    if math.isfinite(float(t)))
            except (ValueError, TypeError, OverflowError, RecursionError) as err:
                why = f"not a memory of alerts ({str(err)[:200]})"
            else:
                return {k: t for t, k in remembered[-ALERT_KEYS:]}
        try:
            aside = aside_name(memory, '.bad')
            os.rename(memory, aside)
            kept = f"set aside as {aside}"
        except OSError as err:
            kept = f"could not be set aside ({err})"
        log.error("Alert memory %s is %s: %s, and not read; the alerts it remembered may be "
                  "emailed once more.", memory, why, kept)
        return {}

    def _remember(self):
        if not self.memory:
            return
        try:
            write_json(self.memory, self._sent)
        except OSError as err:
            sys.stderr.write(f"desitransfer: could not write {self.memory}: {err}\n")

    def format(self, record):
        """The body of the email: the message, cut to :data:`ALERT_BODY_LIMIT` bytes."""
        return cut_text(super().format(record), ALERT_BODY_LIMIT)

    def emit(self, record):
        try:
            key = alert_key(record.getMessage())
        except Exception:
            # A mistake in the arguments of an alert must not hide the alert.
            record = logging.makeLogRecord(record.__dict__)
            record.msg = f"{record.msg} (bad log arguments {record.args!r})"
            record.args = ()
            key = alert_key(str(record.msg))
        now = time.time()
        last = self._sent.get(key)
        if last is not None and 0 <= now - last < self.repeat:
            return
        # Forget messages not seen for a long time, and the oldest beyond the
        # bound: years of distinct alerts add up.
        recent = sorted((t, k) for k, t in self._sent.items() if 0 <= now - t < self.repeat)
        self._sent = {k: t for t, k in recent[-(ALERT_KEYS - 1):]}
        self._sent[key] = now
        super().emit(record)
        self._remember()

    def handleError(self, record):
        # A broken mail server must not stop transfers; say so where it is seen.
        sys.stderr.write(f"desitransfer: could not email alert to {', '.join(self.toaddrs)} "
                         f"via {self.mailhost}:{self.mailport}: {sys.exc_info()[1]}\n")
        try:
            self._sent.pop(alert_key(record.getMessage()), None)
        except Exception:
            pass
        self._remember()


class _LogFile(logging.handlers.RotatingFileHandler):
    """A rotating log file opened without following a link, and created with
    :data:`~desitransfer.common.FILE_MODE` whatever the umask."""

    def _open(self):
        return open_append(self.baseFilename, encoding=self.encoding, errors=self.errors)


def configure_log(debug=False, filename=None, size=100_000_000, backups=10,
                  to=None, mailhost='localhost:25', program='desitransfer', memory=None,
                  subject=None):
    """Re-configure the shared logger: level, rotating log file, alert emails.

    Calling it again replaces the file and email handlers set before.

    Parameters
    ----------
    debug : :class:`bool`, optional
        If ``True`` set the log level to DEBUG.
    filename : :class:`str`, optional
        Also log to this file, rotated at `size` bytes, keeping `backups` old
        files; opened without following a link, created with
        :data:`~desitransfer.common.FILE_MODE`.
    size : :class:`int`, optional
        Rotate the log file at this size in bytes.
    backups : :class:`int`, optional
        Number of rotated log files kept.
    to : :class:`list`, optional
        Email CRITICAL messages to these addresses.
    mailhost : :class:`str`, optional
        SMTP server as ``host:port``.
    program : :class:`str`, optional
        Program name for alert emails.
    memory : :class:`str`, optional
        File remembering the alerts sent, see :class:`AlertHandler`.
    subject : :class:`str`, optional
        Subject of alert emails, see :class:`AlertHandler`.

    Returns
    -------
    :class:`logging.Logger`
        The shared logger.
    """
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    for h in list(log.handlers):
        if getattr(h, '_desitransfer', False):
            log.removeHandler(h)
            h.close()
    if filename:
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        fh = _LogFile(filename, maxBytes=size, backupCount=backups)
        fh.setFormatter(logging.Formatter('%(levelname)s:%(filename)s:%(lineno)s:'
                                          '%(funcName)s:%(asctime)s: %(message)s',
                                          datefmt='%Y-%m-%dT%H:%M:%S'))
        fh._desitransfer = True
        log.addHandler(fh)
    if to:
        ah = AlertHandler(mailhost, list(to), program, memory=memory, subject=subject)
        ah.setFormatter(logging.Formatter(f'At %(asctime)s, {program} on {ah.hostname} '
                                          'reported this serious error:\n\n'
                                          '%(levelname)s %(module)s.%(funcName)s: '
                                          '%(message)s\n',
                                          datefmt='%Y-%m-%dT%H:%M:%S%z'))
        ah._desitransfer = True
        log.addHandler(ah)
    return log


#: Where CRITICAL alerts are emailed unless a command is told otherwise.
ALERT_TO = 'desi-alarms-transfer@desi.lbl.gov'


def _addresses(value):
    addresses = [a.strip() for a in value.split(',') if a.strip()]
    for a in addresses:
        if re.fullmatch(r'[^@\s]+@[^@\s]+', a) is None:
            raise ArgumentTypeError(f"{a!r} is not an email address")
    return addresses


def _mailhost(value):
    if re.fullmatch(r'[^:\s]+(:[0-9]+)?', value) is None:
        raise ArgumentTypeError(f"{value!r} is not HOST or HOST:PORT")
    return value


def alert_options(parser):
    """Add the options of alert emails, ``--alert-to ADDRESSES`` and
    ``--smtp HOST:PORT``, to the :class:`argparse.ArgumentParser` `parser`.

    ``--alert-to`` becomes a list of addresses (empty: no email), ``--smtp``
    the `mailhost` of :func:`configure_log`.
    """
    parser.add_argument('--alert-to', metavar='ADDRESSES', type=_addresses, default=ALERT_TO,
                        dest='alert_to',
                        help="Email CRITICAL alerts to these comma-separated ADDRESSES; "
                             "empty: no email (default %(default)s).")
    parser.add_argument('--smtp', metavar='HOST:PORT', type=_mailhost, default='localhost:25',
                        help="Send alert emails through this SMTP server "
                             "(default %(default)s).")
