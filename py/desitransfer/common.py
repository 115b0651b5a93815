# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===================
desitransfer.common
===================

Code needed by all scripts: the rsync command builder and the scanners of
its output, night and time helpers, permission constants, the logging and
alert set-up, and the one subprocess runner every module uses.
"""
import datetime as dt
import errno
import fcntl
import functools
import hashlib
import json
import locale
import logging
import logging.handlers
import math
import os
import re
import secrets
import selectors
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from argparse import ArgumentTypeError
from collections import namedtuple

import pytz
from desiutil.log import get_logger


#: Permission of locked directories (group-readable, setgid).
dir_perm = 0o2750

#: Permission of locked files (read-only for user and group).
file_perm = 0o440

#: The time zone of Kitt Peak, where DESI observes (no daylight saving time).
MST = pytz.timezone('America/Phoenix')

#: Timeout in seconds of an external command, unless the caller sets one.
DEFAULT_TIMEOUT = 3600

#: Options that make every ssh connection non-interactive and quick to fail.
SSH_OPTIONS = ('-o', 'BatchMode=yes',
               '-o', 'ConnectTimeout=30',
               '-o', 'ServerAliveInterval=30',
               '-o', 'ServerAliveCountMax=4')

#: The shared logger of every desitransfer module.
log = get_logger(timestamp=True)

#: Bytes of its standard output, and of its standard error, kept of a command
#: unless the caller sets another limit; past it the command is stopped.
OUTPUT_LIMIT = 64 * 2**20

#: Return code of a command stopped because its output passed the limit (as
#: if killed by SIGXFSZ, "file size limit exceeded"): its answer is unknown.
OUTPUT_TOO_LARGE = -signal.SIGXFSZ

#: rsync's exit code when every file was copied.
RSYNC_OK = 0

#: rsync's exit code when some source files vanished before they could be
#: copied (for example a temporary file): what was there was copied.
RSYNC_VANISHED = 24

#: rsync's exit codes meaning that everything it found was copied.
RSYNC_DONE = (RSYNC_OK, RSYNC_VANISHED)

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


def _utcnow():
    """Current time, timezone-aware in UTC (replaced in tests).
    """
    return dt.datetime.now(dt.timezone.utc)


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
            if not selector.get_map():
                if proc.poll() is not None:
                    break
                try:
                    proc.wait(timeout=max(0.0, min(0.5, until - now)))
                except subprocess.TimeoutExpired:
                    pass
                continue
            # Wake up at least every half second to notice `stop`.
            for key, _ in selector.select(max(0.0, min(0.5, until - now))):
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


def round_trip(ssh, host, tries=2, timeout=30):
    """The network round trip to `host`, in seconds: the fastest of `tries`
    exchanges of one line with ``cat`` at `host`, within one ssh session (so
    that starting programs is not counted); ``None`` if it cannot be measured.

    This is the one exchange the runner :func:`run`, which collects the output
    at the end, cannot make; the command is logged and bounded the same way.

    Parameters
    ----------
    ssh : :class:`list`
        The ssh command, such as returned by :func:`ssh_command`.
    host : :class:`str`
        The ssh host alias.
    tries : :class:`int`, optional
        Exchanges to make.
    timeout : :class:`float`, optional
        Give up after this many seconds in all.
    """
    import select
    command = [str(c) for c in ssh] + [host, 'cat']
    log.debug("Running: %s", shlex.join(command))
    try:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=command_environment(),
                                start_new_session=True)
    except OSError as err:
        log.warning("Could not start %s: %s", command[0], err)
        return None
    deadline = time.monotonic() + timeout
    best = None
    try:
        for i in range(tries + 1):  # the first exchange also opens the session: not counted
            t0 = time.monotonic()
            proc.stdin.write(b'.\n')
            proc.stdin.flush()
            # Read the two bytes expected, never more, and never past the deadline.
            answer = b''
            while answer != b'.\n':
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                    return None
                data = os.read(proc.stdout.fileno(), 2 - len(answer))
                answer += data
                if not data or not b'.\n'.startswith(answer):
                    return None
            if i > 0:
                seconds = time.monotonic() - t0
                best = seconds if best is None else min(best, seconds)
        return best
    except OSError:
        return None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:  # a line that could not be written: nobody reads it
                pass
        proc.wait()


def interval(value, bare=1):
    """Seconds of a time written ``30s``, ``1.5m``, ``1h``, ``2d``, or a bare
    number counted in units of `bare` seconds; :exc:`ValueError` unless it is
    positive and finite."""
    m = re.fullmatch(r'([0-9]*\.?[0-9]+)\s*([smhd]?)', value.strip())
    seconds = (float(m.group(1)) * {'s': 1, 'm': 60, 'h': 3600, 'd': 86400, '': bare}[m.group(2)]
               if m else 0)
    if not 0 < seconds < float('inf'):
        raise ValueError(f"{value!r} is not a positive time such as 30s, 15m, 1h, 2d or a "
                         f"number of {'seconds' if bare == 1 else 'minutes'}")
    return seconds


def write_json(path, data):
    """Write `data` to `path` as JSON atomically: a temporary file beside it,
    flushed and synced to disk, then renamed over `path`.

    Parameters
    ----------
    path : :class:`str`
        The file to write.
    data : :class:`dict` or :class:`list`
        What to write.
    """
    write_text(path, json.dumps(data, indent=1, sort_keys=True))


def fsync_directory(directory):
    """Flush `directory` to disk, so that a rename in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Mode of the files this package creates, set explicitly whatever the umask:
#: read and write for the owner, read for the others (web pages, records).
FILE_MODE = 0o644


def temporary_name(path):
    """An unpredictable name for a temporary file beside `path`:
    ``.NAME.RANDOM.PID.tmp`` in the same directory, RANDOM being 16
    hexadecimal digits, which :func:`sweep_temporary` recognises once this
    process is gone.  Create the file with :func:`create_file`."""
    directory, name = os.path.split(path)
    # A long name keeps its first 200 characters, so that the result is not too long.
    return os.path.join(directory, f'.{name[:200]}.{secrets.token_hex(8)}.{os.getpid():d}.tmp')


def _legacy_temporary_name(path):
    """The name :func:`temporary_name` gave before it was unpredictable,
    ``.NAME.PID.tmp``, which this process never makes."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f'.{name}.{os.getpid():d}.tmp')


_temporary = re.compile(r'\.(?P<name>.+)\.(?P<pid>[0-9]{1,10})\.tmp')


def create_file(target, mode=FILE_MODE, beside=True):
    """Create a new file for `target`, safely in a directory that other users
    may write (a planted symbolic link or file is never followed nor reused).

    The file is opened with ``O_CREAT|O_EXCL|O_NOFOLLOW``: it is a new file,
    made by this call; its mode is set with :func:`os.fchmod`, whatever the
    umask (which is never changed).  The helper by which this package
    creates its files.

    Parameters
    ----------
    target : :class:`str`
        The file to be written.
    mode : :class:`int`, optional
        Permission bits of the new file.
    beside : :class:`bool`, optional
        If ``True`` (the default), the new file is a temporary file with an
        unpredictable name (:func:`temporary_name`) in the directory of
        `target`, to be renamed over `target` with :func:`os.replace` once
        written; if ``False``, it is `target` itself, which must not exist.

    Returns
    -------
    :class:`tuple`
        The new file, open for writing bytes, and its name.

    Raises
    ------
    OSError
        If it cannot be created (:exc:`FileExistsError` if the name exists,
        whatever it is); nothing is left behind.
    """
    name = temporary_name(target) if beside else target
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchmod(fd, mode)
        return os.fdopen(fd, 'wb'), name
    except BaseException:
        os.close(fd)
        discard(name)
        raise


def discard(path):
    """Remove the file `path` if it exists (a symbolic link itself, never
    what it points to)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def mode_of(path, default=FILE_MODE):
    """Permission bits of the regular file `path` (not following a link), to
    give its replacement; `default` if it is not such a file."""
    try:
        st = os.lstat(path)
    except OSError:
        return default
    return stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else default


def _mine(st):
    """``True`` if `st` is the status of a regular file of this user."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def remove_leftover(target):
    """Remove the temporary file of `target` that an earlier process with
    this process's id left under the predictable name of earlier versions,
    ``.NAME.PID.tmp`` (never made now), if it is a regular file of this user:
    never another user's file, never through a link.

    Returns
    -------
    :class:`bool`
        ``True`` if one was removed.
    """
    path = _legacy_temporary_name(target)
    try:
        if _mine(os.lstat(path)):
            os.unlink(path)
            return True
    except FileNotFoundError:
        pass
    return False


def alive(pid):
    """``True`` if process `pid` exists (signal 0), as far as this user can tell."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def sweep_temporary(directory):
    """Remove temporary files left in `directory` by writers that were killed.

    Only names made by :func:`temporary_name` (or by earlier versions,
    ``.NAME.PID.tmp``) are considered, and only those of processes that no
    longer exist (a live writer's file is left alone).  Only regular files of
    this user are removed: never a link, never another user's file.

    Parameters
    ----------
    directory : :class:`str`
        The directory to sweep; nothing happens if it does not exist.

    Returns
    -------
    :class:`list`
        The files removed.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return []
    removed = []
    try:
        for name in sorted(os.listdir(fd)):
            m = _temporary.fullmatch(name)
            if m is None:
                continue
            if alive(int(m.group('pid'))):
                continue
            path = os.path.join(directory, name)
            try:
                # Looked at and removed in the directory opened, never through a link.
                if _mine(os.lstat(name, dir_fd=fd)):
                    os.unlink(name, dir_fd=fd)
                    removed.append(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                log.warning("Could not remove stale temporary file %s: %s.", path, err)
    except OSError as err:
        log.warning("Could not sweep temporary files of %s: %s.", directory, err)
    finally:
        os.close(fd)
    if removed:
        log.info("Removed %d temporary file(s) left by killed writers in %s: %s.",
                 len(removed), directory, ', '.join(os.path.basename(r) for r in removed))
    return removed


def aside_name(path, suffix):
    """A name to keep `path` aside for analysis: ``path + suffix``, or
    ``path + suffix + '.N'`` with the first N that does not exist yet, so that
    an earlier copy is never replaced.
    """
    name, n = path + suffix, 0
    while os.path.lexists(name):
        n += 1
        name = f'{path}{suffix}.{n:d}'
    return name


class Stop(object):
    """A request to stop: SIGTERM (once :meth:`handle_signals` is called),
    the kill file, or :meth:`set`.

    It can be passed as `stop` to :func:`run`, which then notices the kill
    file within a second too, and :meth:`wait` sleeps in short steps so that
    the kill file ends a long sleep within `interval` seconds.

    Parameters
    ----------
    kill : :class:`str`, optional
        Stop when this file exists.
    interval : :class:`float`, optional
        Seconds between looks for the kill file while waiting.
    """

    def __init__(self, kill=None, interval=2.0):
        self.kill = kill
        self.interval = interval
        self.event = threading.Event()
        self.reason = None

    def set(self, reason='stop requested'):
        """Ask every loop and command using this object to stop."""
        if not self.event.is_set():
            self.reason = reason
        self.event.set()

    def handle_signals(self, *signums):
        """Set this object when one of `signums` (default SIGTERM) arrives."""
        for signum in signums or (signal.SIGTERM,):
            signal.signal(signum, lambda n, frame: self.set(f'{signal.Signals(n).name} received'))

    def is_set(self):
        """``True`` once a stop was asked for; looks for the kill file."""
        if self.event.is_set():
            return True
        if self.kill and os.path.exists(self.kill):
            log.info("%s exists; stopping.", self.kill)
            self.set(f'{self.kill} exists')
            return True
        return False

    def wait(self, seconds):
        """Sleep up to `seconds`, less if a stop is asked for.

        Returns
        -------
        :class:`bool`
            ``True`` if stopping.
        """
        deadline = time.monotonic() + seconds
        while not self.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.event.wait(min(left, self.interval))
        return True


def open_lock(path, mode=FILE_MODE):
    """Open the lock file `path`, created with `mode` if it is missing,
    never through a symbolic link (safe in a directory that other users may
    write).  Take the lock with :func:`fcntl.flock` on the descriptor.

    Parameters
    ----------
    path : :class:`str`
        The lock file.
    mode : :class:`int`, optional
        Permission bits of a new lock file (set explicitly, whatever the umask).

    Returns
    -------
    :class:`tuple`
        The open descriptor (read and write if allowed, else read only: a
        lock needs no more) and ``True`` if this call created the file.

    Raises
    ------
    OSError
        If `path` is a symbolic link or not a regular file (refused, with the
        reason), or cannot be opened.
    """
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # A planted FIFO does not block.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | flags, 0o600)
    except FileExistsError:
        created = False
        try:
            try:
                fd = os.open(path, os.O_RDWR | flags)
            except PermissionError:
                fd = os.open(path, os.O_RDONLY | flags)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, "a symbolic link, not followed: refusing to use "
                              "it as a lock file", path) from None
            raise
    else:
        created = True
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file: refusing to use it as a lock file",
                      path)
    return fd, created


def single_instance(path):
    """Take the single-instance lock `path`: an exclusive kernel lock
    (:func:`fcntl.flock`) that dies with its process, so a crash never leaves
    a stale lock behind, and a recycled pid never looks like a holder.

    The lock file is opened by :func:`open_lock`, never through a link; the
    pid is written only into a lock file of this user with one name (made by
    this program), never into a file another user planted or linked there.

    Parameters
    ----------
    path : :class:`str`
        The lock file; created (with its directory) if missing.  The holder's
        pid is written in it, for people.

    Returns
    -------
    :class:`tuple`
        ``(file, None)`` with the open lock file (keep it open to keep the
        lock) or ``(None, pid)`` if another process holds it, `pid` being
        what that process wrote (``'unknown'`` if nothing, or not a pid).

    Raises
    ------
    OSError
        If the lock file cannot be opened, or is a link or not a regular file.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, created = open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode('ascii', errors='replace').strip()
        os.close(fd)
        return None, holder if re.fullmatch(r'[0-9]{1,10}', holder) else 'unknown'
    st = os.fstat(fd)
    writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    if writable and (created or (st.st_uid == os.geteuid() and st.st_nlink == 1)):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'{os.getpid():d}\n'.encode('ascii'), 0)
    return os.fdopen(fd, 'r+' if writable else 'r'), None


def environment_ssh(control=None):
    """The ssh command for rsync and remote commands, from :envvar:`RSYNC_RSH`
    (rsync's own convention: a program and its options) or else ``ssh``, with
    the non-interactive options of :func:`ssh_command`.
    """
    return ssh_command(shlex.split(os.environ.get('RSYNC_RSH', '').strip() or 'ssh'),
                       control=control)


def ssh_command(ssh='ssh', control=None):
    """The ssh client command, non-interactive, as an argument list.

    Parameters
    ----------
    ssh : :class:`str` or :class:`list`, optional
        The ssh program (a wrapper that adds ``-F CONFIG`` is fine), or a
        program and its own options as a list.
    control : :class:`str`, optional
        Path of an OpenSSH control socket to share one connection.

    Returns
    -------
    :class:`list`
        The ssh program and its options.
    """
    command = ([ssh] if isinstance(ssh, str) else list(ssh)) + list(SSH_OPTIONS)
    if control:
        command += ['-o', 'ControlMaster=auto', '-o', f'ControlPath={control}',
                    '-o', 'ControlPersist=120']
    return command


def rsync(s, d, test=False, config='dts', reverse=False):
    """Set up rsync command.

    Parameters
    ----------
    s : :class:`str`
        Source directory.
    d : :class:`str`
        Destination directory.
    test : :class:`bool`, optional
        If ``True``, add ``--dry-run`` to the command.
    config : :class:`str`, optional
        Pass this configuration to the ssh command.  If empty or ``None``,
        both directories are local.
    reverse : :class:`bool`
        If ``True``, attach `config` to `d` instead of `s`.

    Returns
    -------
    :class:`list`
        A list suitable for passing to :class:`subprocess.Popen`.
    """
    host = f'{config}:' if config else ''
    if reverse:
        src, dst = f'{s}/', f'{host}{d}/'
    else:
        src, dst = f'{host}{s}/', f'{d}/'
    c = ['/bin/rsync', '--verbose', '--recursive', '--copy-dirlinks',
         '--times', '--omit-dir-times', src, dst]
    if test:
        c.insert(1, '--dry-run')
    return c


def rsync_ssh(command, ssh):
    """Make an rsync command use an ssh command as its transport.

    Parameters
    ----------
    command : :class:`list`
        An rsync command, such as returned by :func:`rsync`.
    ssh : :class:`list`
        An ssh command, such as returned by :func:`ssh_command`.

    Returns
    -------
    :class:`list`
        A copy of `command` with ``--rsh`` set.
    """
    return command[:1] + ['--rsh=' + shlex.join(ssh)] + command[1:]


def exclude_years(start_year):
    """rsync arguments to exclude every year from `start_year` to last year.

    Parameters
    ----------
    start_year : :class:`int`
        First year to exclude.

    Returns
    -------
    :class:`list`
        ``['--exclude', '2018*', '--exclude', '2019*', ...]`` up to, not
        including, the current year.
    """
    args = []
    for year in range(int(start_year), _utcnow().year):
        args += ['--exclude', f'{year:d}*']
    return args


_rsync_summary = re.compile(r'^(?:'
                            r'(?:receiving|sending) incremental file list|'
                            r'receiving file list \.\.\. done|'
                            r'(?:building|sending) file list \.\.\. done|'
                            r'created directory .*|'
                            r'\./|'
                            r'sent [0-9.,]+[KMGTP]? bytes\s+received [0-9.,]+[KMGTP]? bytes.*|'
                            r'total size is [0-9.,]+[KMGTP]?\s+speedup is [0-9.,]+.*'
                            r')$')


def empty_rsync(out):
    """Scan rsync output for files to be transferred.

    Parameters
    ----------
    out : :class:`str`
        Output from rsync.

    Returns
    -------
    :class:`bool`
        ``True`` if there are no files to transfer.
    """
    return all(_rsync_summary.match(line) is not None
               for line in out.splitlines() if line.strip())


_exposure_line = re.compile(r'^([0-9]{8})/')


def new_exposures(out):
    """Scan rsync output for exposures to be transferred.

    Parameters
    ----------
    out : :class:`str`
        Output from rsync.

    Returns
    -------
    :class:`set`
        The unique exposure numbers detected in `out`.
    """
    exposures = set()
    for line in out.splitlines():
        m = _exposure_line.match(line)
        if m is not None:
            exposures.add(m.group(1))
    return exposures


def stamp(zone='US/Pacific'):
    """Simple timestamp.

    Parameters
    ----------
    zone : :class:`str`, optional
        Operational timezone.

    Returns
    -------
    :class:`str`
        A nicely-formatted timestamp.
    """
    return _utcnow().astimezone(pytz.timezone(zone)).strftime('%Y-%m-%d %H:%M:%S %Z')


def ensure_scratch(directories):
    """Try an alternate temporary directory if the primary temporary directory is unavilable.

    Parameters
    ----------
    directories : :class:`list`
        A list of candidate directories.

    Returns
    -------
    :class:`str`
        The first available temporary directory found.

    Raises
    ------
    FileNotFoundError
        If no candidate is a writable directory; the message lists them all.
    """
    for d in directories:
        if d and os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
            return d
        log.warning("Temporary directory %s is not available, trying the next one.", d)
    raise FileNotFoundError("No temporary directory is available; tried: " +
                            ', '.join(map(str, directories)))


def _night(offset):
    """Night in YYYYMMDD format, `offset` days after the night in progress.
    """
    # The DESI night rolls over at 12:00 MST = 19:00 UTC: 7/24 + 0.5 days.
    t = _utcnow() - dt.timedelta(days=7/24 + 0.5 - offset)
    return t.strftime('%Y%m%d')


def today():
    """Today's date in DESI "NIGHT" format, YYYYMMDD.

    This formulation, with the offset 7/24+0.5, is inherited from previous
    nightwatch transfer scripts.
    """
    return _night(0)


def yesterday():
    """Yesterday's date in DESI "NIGHT" format, YYYYMMDD.

    The calendar date before today at Kitt Peak (MST), as the original's
    calendar yesterday: in the morning it is the night just observed, which
    :func:`today` still names until noon MST.
    """
    return (_utcnow().astimezone(MST) - dt.timedelta(days=1)).strftime('%Y%m%d')


def valid_night(night):
    """``True`` if `night` is an 8-digit, real calendar date (YYYYMMDD).
    """
    if not isinstance(night, str) or re.fullmatch(r'[0-9]{8}', night) is None:
        return False
    return _real_date(night)


@functools.lru_cache(maxsize=8192)
def _real_date(digits):
    try:
        dt.datetime.strptime(digits, '%Y%m%d')
    except ValueError:
        return False
    return True


def idle_time(start=8, end=12, tz=None):
    """Determine whether we are in an idle time during the day.

    Parameters
    ----------
    start : :class:`int`, optional
        Start time in hours.
    end : :class:`int`, optional
        End time in hours.
    tz : :class:`str`, optional
        Time zone to use, by default MST (America/Phoenix).

    Returns
    -------
    :class:`int`
        Number of seconds to wait until the end of the idle period. If outside
        the idle period, this number will be negative: minus the number of
        seconds until the next idle period starts.
    """
    zone = MST if tz is None else pytz.timezone(tz) if isinstance(tz, str) else tz
    now = _utcnow().astimezone(zone)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)

    def at(hour, days=0):
        return zone.localize(midnight + dt.timedelta(days=days, hours=hour))

    if at(start) <= now < at(end):
        return int((at(end) - now).total_seconds())
    following = at(start) if now < at(start) else at(start, days=1)
    return -int((following - now).total_seconds())


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


def open_append(path, binary=False, mode=FILE_MODE, encoding=None, errors=None):
    """Open the log file `path` to append to it, without following a link.

    A new file is created with `mode` whatever the umask; an existing one
    must be a regular file (a link, a FIFO or a device planted in its place
    is refused with :exc:`OSError`).

    Parameters
    ----------
    path : :class:`str`
        The file.
    binary : :class:`bool`, optional
        Open it for bytes (for example for the ``output`` of :func:`run`).
    mode : :class:`int`, optional
        Mode of a new file.
    encoding, errors : :class:`str`, optional
        Of a text file, as for :func:`open`.

    Returns
    -------
    file
        The file object, open for appending.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, mode)
    except FileExistsError:
        fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file: refusing to write into it", path)
    if binary:
        return os.fdopen(fd, 'ab')
    return os.fdopen(fd, 'a', encoding=encoding, errors=errors)


class _LogFile(logging.handlers.RotatingFileHandler):
    """A rotating log file opened without following a link, and created with
    :data:`FILE_MODE` whatever the umask."""

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
        files; opened without following a link, created with :data:`FILE_MODE`.
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


def write_text(path, text, mode=None):
    """Write `text` to `path` atomically: a new temporary file beside it
    (:func:`create_file`), flushed and synced to disk, then renamed over
    `path`, so that a reader sees the old contents or the new, never a part.

    Safe in a directory that other users may write: nothing is written
    through a link planted there, and a link at `path` is replaced, not followed.

    Parameters
    ----------
    path : :class:`str`
        The file to write.
    text : :class:`str` or :class:`bytes`
        What to write (text in UTF-8).
    mode : :class:`int`, optional
        Permission bits of the new `path`; by default those of the file it
        replaces, or :data:`FILE_MODE` for a new one (never from the umask).

    Raises
    ------
    OSError
        If it cannot be written (the temporary file is removed, `path` is unchanged).
    """
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    f, tmp = create_file(path, mode_of(path) if mode is None else mode)
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        discard(tmp)
        raise
    fsync_directory(os.path.dirname(os.path.abspath(path)))


class SharedConnection(object):
    """One ssh connection to `host` shared by the commands of a run (OpenSSH
    connection multiplexing).

    Parameters
    ----------
    host : :class:`str`, optional
        ssh host alias of the mountain.
    program : :class:`str` or :class:`list`, optional
        The ssh program (and its options); by default that of
        :func:`environment_ssh` (:envvar:`RSYNC_RSH`, else ``ssh``).
    """

    def __init__(self, host='dts', program=None):
        self.host = host
        self.program = program
        self._directory = None
        self._lock = threading.Lock()

    def _command(self, control=None):
        if self.program:
            return ssh_command(self.program, control=control)
        return environment_ssh(control=control)

    def ssh(self, stream=0):
        """The ssh command (a list) that shares the connection; give it to
        :func:`rsync_ssh`.  The first command to use it opens the connection.
        A `stream` other than 0 is a connection of its own, shared the same way
        by the commands given the same `stream` (parallel rsyncs, each with its
        own TCP window)."""
        with self._lock:  # streams ask from several threads
            if self._directory is None:
                # Directories of processes that were killed before close().
                top = tempfile.gettempdir()
                for name in os.listdir(top):
                    m = re.fullmatch(r'desitransfer-ssh-([0-9]{1,10})-\w+', name)
                    if m is not None and not alive(int(m.group(1))):
                        path = os.path.join(top, name)
                        try:
                            st = os.lstat(path)
                        except OSError:
                            continue
                        # Only a directory of this user: never another's, never a link.
                        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
                            shutil.rmtree(path, ignore_errors=True)
                self._directory = tempfile.mkdtemp(prefix=f'desitransfer-ssh-{os.getpid():d}-')
        name = f'mux{stream:d}' if stream else 'mux'
        return self._command(control=os.path.join(self._directory, name))

    def is_open(self, stream=0):
        """``True`` if the connection of `stream` has a control socket (it is
        open, or was until it died without cleaning up)."""
        if self._directory is None:
            return False
        return os.path.exists(os.path.join(self._directory,
                                           f'mux{stream:d}' if stream else 'mux'))

    def close(self):
        """Stop the shared connections, if any is open, and remove their private directory."""
        if self._directory is None:
            return
        # All at once: one after the other, each ssh start adds to the stop.
        closing = [threading.Thread(target=run, name=f'close-{name}', daemon=True,
                                    args=(self._command() + ['-o', f'ControlPath={control}',
                                                             '-O', 'exit', self.host],),
                                    kwargs={'timeout': 30, 'quiet': True, 'ok': (0, 255)})
                   for name in sorted(os.listdir(self._directory))
                   for control in [os.path.join(self._directory, name)]]
        for thread in closing:
            thread.start()
        for thread in closing:
            thread.join(timeout=60)
        shutil.rmtree(self._directory, ignore_errors=True)
        self._directory = None


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


def lstat_tree(directory):
    """Everything under `directory`, never following a symbolic link.

    Parameters
    ----------
    directory : :class:`str`
        The top directory.

    Returns
    -------
    :class:`tuple`
        ``{relative name: os.stat_result}`` of every entry below `directory`
        (``sub/name`` in subdirectories, which are entries too), and the
        problems met (a directory that cannot be listed), one sentence each.
    """
    entries, problems = {}, []
    pending = ['']
    while pending:
        prefix = pending.pop()
        try:
            with os.scandir(os.path.join(directory, prefix)) as listing:
                for entry in listing:
                    st = entry.stat(follow_symlinks=False)
                    entries[prefix + entry.name] = st
                    if stat.S_ISDIR(st.st_mode):
                        pending.append(prefix + entry.name + '/')
        except OSError as err:
            problems.append(f"{os.path.join(directory, prefix).rstrip('/')} cannot be listed: "
                            f"{err.strerror or err}")
    return entries, problems


def shown(name):
    """`name` (from the mountain) as written in a message: as it is if it is
    plain printable text, otherwise quoted and escaped as :func:`repr` does,
    so that it is one line, and two names never look the same (an
    undecodable byte, kept as a surrogate, is shown as ``\\udcXX``)."""
    plain = name.isprintable() and name.strip() == name and name[:1] not in ('"', "'")
    return name if plain else repr(name)


def one_line(text):
    """`text` (from the mountain) with every character that is not printable
    escaped as :func:`repr` does: a message that cannot span lines."""
    if text.isprintable():
        return text
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def some(names, most=3):
    """The first `most` of `names`, shown, and how many more."""
    text = ', '.join(shown(n) for n in names[:most])
    return text + (f' and {len(names) - most:d} more' if len(names) > most else '')


def tail(text, size=300):
    """The end of `text` (what a command said) on one line: its non-blank
    lines joined by semicolons, control characters escaped, the last `size`
    characters."""
    return one_line('; '.join(line.strip() for line in text.splitlines() if line.strip()))[-size:]


def repeat(step, wait, stop, once=False):
    """The loop of a long-running command: ``step()``, then ``wait(result)``
    and again, until `stop` is set; with `once`, one step.

    Returns
    -------
    object
        What the last step returned (``None`` if none ran).
    """
    result = None
    while not stop.is_set():
        result = step()
        if once or stop.is_set():
            break
        wait(result)
    return result
