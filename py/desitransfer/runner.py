# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===================
desitransfer.runner
===================

The one subprocess runner every module uses: an external command runs
without a shell, bounded in time and in the output kept, logged before it
runs and, on failure, with its return code and output.
"""
import locale
import logging
import os
import selectors
import shlex
import signal
import subprocess
import time
from collections import namedtuple

from .common import log
from .processes import wakers_of


#: Timeout in seconds of an external command, unless the caller sets one.
DEFAULT_TIMEOUT = 3600

#: Bytes of its standard output, and of its standard error, kept of a command
#: unless the caller sets another limit; past it the command is stopped.
OUTPUT_LIMIT = 64 * 2**20

#: Return code of a command stopped because its output passed the limit (as
#: if killed by SIGXFSZ, "file size limit exceeded"): its answer is unknown.
OUTPUT_TOO_LARGE = -signal.SIGXFSZ

#: Variables of the environment never passed to a command: ``RSYNC_OLD_ARGS``
#: makes rsync (>= 3.2.4) hand its arguments to the remote shell unprotected.
UNSAFE_ENVIRONMENT = ('RSYNC_OLD_ARGS',)


class Result(namedtuple('Result', ['returncode', 'stdout', 'stderr'])):
    """Return code, standard output and standard error of an external command."""

    __slots__ = ()

    @property
    def too_large(self):
        """``True`` if the command was stopped because its output passed the
        limit of :func:`run` (return code :data:`OUTPUT_TOO_LARGE`)."""
        return self.returncode == OUTPUT_TOO_LARGE


def command_environment(env=None):
    """The environment of a command: `env` (by default this process's own)
    without the variables of :data:`UNSAFE_ENVIRONMENT`."""
    return {k: v for k, v in (os.environ if env is None else env).items()
            if k not in UNSAFE_ENVIRONMENT}


def run(command, timeout=DEFAULT_TIMEOUT, cwd=None, env=None, ok=(0,),
        test=False, quiet=False, stop=None, limit=OUTPUT_LIMIT, output=None, names=False):
    """Run an external command: the one subprocess runner of the package.

    The command is an argument list, never passed to a shell.  It is logged
    before it runs; on failure its return code and output are logged too.

    Parameters
    ----------
    command : :class:`list`
        The program and its arguments.
    timeout : :class:`float`, optional
        Kill the command (and every process it started) after this many seconds.
    cwd : :class:`str`, optional
        Run the command in this directory.
    env : :class:`dict`, optional
        Environment of the command (by default this process's); secrets belong
        here, not in `command`.  The variables of :data:`UNSAFE_ENVIRONMENT`
        are never passed on.
    ok : :class:`tuple`, optional
        Return codes that are not failures (for example rsync's 24,
        "some files vanished", on a live tree).
    test : :class:`bool`, optional
        If ``True``, log what would run and run nothing.
    quiet : :class:`bool`, optional
        If ``True``, log the command at DEBUG level instead of INFO.
    stop : :class:`threading.Event`, optional
        If this is set while the command runs, terminate it (SIGTERM to it
        and every process it started) and return -15.
    limit : :class:`int`, optional
        Bytes kept of the standard output, and of the standard error.  When
        either passes it, the command is stopped (SIGTERM to it and every
        process it started) and the return code is :data:`OUTPUT_TOO_LARGE`:
        its answer is unknown.
    output : file, optional
        A file open for writing bytes: the standard output is written to it
        as it arrives, whatever its size, and only its last `limit` bytes are
        kept in the result (for a long listing such as ``rsync --verbose`` of
        a large tree, whose summary comes last).
    names : :class:`bool`, optional
        The standard output is a list of file names: decode it as file names
        are (:func:`os.fsdecode`), keeping an undecodable byte as a surrogate
        so that two names never become one; whoever logs such a name escapes
        it.

    Returns
    -------
    :class:`Result`
        Return code (-9 after a timeout, -15 after `stop`,
        :data:`OUTPUT_TOO_LARGE` if the output passed `limit`, 127 if the
        program does not exist), standard output and standard error.
    """
    command = [str(c) for c in command]
    quoted = shlex.join(command)
    where = f" (in {cwd})" if cwd else ''
    if test:
        log.info("Test mode, would run: %s%s", quoted, where)
        return Result(0, '', '')
    log.log(logging.DEBUG if quiet else logging.INFO, "Running: %s%s", quoted, where)
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=command_environment(env),
                                start_new_session=True)
    except OSError as err:
        log.error("Could not start %s: %s", quoted, err)
        return Result(127, '', str(err))
    limit = max(1, int(limit))
    try:
        out, err, why = _collect(proc, timeout, stop, limit, output, names)
    except BaseException:
        # Such as a full disk for `output`: the command does not outlive the call.
        _signal_group(proc, signal.SIGKILL)
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        proc.wait()
        raise
    code = proc.returncode
    if why is not None and code is None:
        err += "\n(output abandoned: the pipes were held by another process)"
    if why == 'stop':
        code = -signal.SIGTERM
        err += "\nStopped on request."
    elif why == 'timeout':
        code = -signal.SIGKILL
        err += f"\nTimed out after {timeout} seconds and was killed."
    elif why in ('standard output', 'standard error'):
        code = OUTPUT_TOO_LARGE
        err += (f"\nStopped: its {why} passed the limit of {limit:d} bytes; "
                "its answer is unknown.")
    if why == 'stop' and code not in ok:
        # Asked for (SIGTERM, the kill file, the end of a watch): not a
        # failure of the command.
        log.log(logging.DEBUG if quiet else logging.INFO, "Stopped on request: %s", quoted)
    elif code not in ok:
        log.error("Command failed with return code %d%s: %s", code, where, quoted)
        if out.strip():
            log.error("Standard output of %s: %s", command[0], out.strip()[-4000:])
        if err.strip():
            log.error("Standard error of %s: %s", command[0], err.strip()[-4000:])
    return Result(code, out, err)


def _text(data, names=False):
    """Bytes of a command's output as text, as :mod:`subprocess` gives it
    (the locale's encoding, undecodable bytes replaced, universal newlines);
    with `names`, as file names are decoded (:func:`os.fsdecode`: an
    undecodable byte is kept as a surrogate, so that distinct names stay
    distinct and name the same files again), newlines untouched."""
    if names:
        return os.fsdecode(bytes(data))
    if b'\r' in data:
        data = data.replace(b'\r\n', b'\n').replace(b'\r', b'\n')
    return data.decode(locale.getpreferredencoding(False), errors='replace')


def _collect(proc, timeout, stop, limit, output, names=False):
    """Read the standard output and error of `proc` until both end and it
    exits, keeping at most `limit` bytes of each (see :func:`run`).

    The command is ended early if `stop` is set (SIGTERM), if `timeout`
    seconds pass (SIGKILL), or if one of its outputs passes `limit` (SIGTERM),
    each time to its whole process group, then SIGKILL if it is still there
    after a few seconds.  Once it is gone its output is not waited for: a
    process outside the group may hold the pipes (an OpenSSH control master
    is handed the standard streams of the ssh client it serves, and keeps
    them until the remote command ends).

    Returns
    -------
    :class:`tuple`
        Standard output and standard error as text, and why the command was
        ended early (``'stop'``, ``'timeout'``, ``'standard output'`` or
        ``'standard error'`` for the output that passed `limit`), ``None``
        if it was not; `proc` has no return code if it could not be waited for.
    """
    names = {proc.stdout.fileno(): 'standard output', proc.stderr.fileno(): 'standard error'}
    kept = {fd: bytearray() for fd in names}
    into = {proc.stdout.fileno(): output} if output is not None else {}
    deadline = time.monotonic() + timeout
    why, signals, until, gone, look = None, [], deadline, False, 0.0
    with selectors.DefaultSelector() as selector:
        for fd in names:
            selector.register(fd, selectors.EVENT_READ)
        # A stop set while it waits wakes it at once (not only at its next look).
        wakers = wakers_of(stop)
        for waker in wakers:
            selector.register(waker.fileno(), selectors.EVENT_READ, 'wake')
        while True:
            now = time.monotonic()
            if why is None:
                if stop is not None and now >= look:
                    look = now + 0.5  # Stop.is_set() looks for a file: not at every read.
                    if stop.is_set():
                        why, signals = 'stop', [signal.SIGTERM, signal.SIGKILL]
                if why is None and now >= deadline:
                    why, signals = 'timeout', [signal.SIGKILL, signal.SIGKILL]
                if why is not None:
                    until = now
            if why is not None and now >= until:
                if not signals:
                    if gone:  # What is left of its group, not its pipes' other holders.
                        _signal_group(proc, signal.SIGKILL)
                    break
                _signal_group(proc, signals.pop(0))
                until = now + (3.0 if signals else 2.0)
            if why is not None and not gone and proc.poll() is not None:
                gone, signals, until = True, [], min(until, now + 0.5)
            if all(key.data == 'wake' for key in selector.get_map().values()):
                if proc.poll() is not None:
                    break
                try:
                    proc.wait(timeout=max(0.0, min(0.5, until - now)))
                except subprocess.TimeoutExpired:
                    pass
                continue
            # Wake up at least every half second to notice `stop`.
            for key, _ in selector.select(max(0.0, min(0.5, until - now))):
                if key.data == 'wake':
                    selector.unregister(key.fd)  # readable for good: once is enough
                    look = 0.0
                    continue
                data = os.read(key.fd, 1 << 16)
                if not data:
                    selector.unregister(key.fd)
                    continue
                buffer = kept[key.fd]
                if key.fd in into:
                    into[key.fd].write(data)
                    buffer += data
                    if len(buffer) > 2 * limit:
                        del buffer[:-limit]
                    continue
                room = max(0, limit - len(buffer))
                buffer += data[:room]
                if len(data) > room and why is None:
                    why, signals, until = names[key.fd], [signal.SIGTERM, signal.SIGKILL], now
    for buffer in kept.values():
        del buffer[:-limit]
    out, err = kept.values()
    for stream in (proc.stdout, proc.stderr):
        stream.close()
    if proc.poll() is None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return _text(out, names), _text(err), why


def _signal_group(proc, signum):
    """Send `signum` to the process group of `proc` (it runs in its own session)."""
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass
