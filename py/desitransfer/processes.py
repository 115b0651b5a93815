# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
======================
desitransfer.processes
======================

Processes as ``/proc`` shows them: whether one is alive and when it started,
its parents and children; the single-instance lock of a command
(:func:`single_instance`), and its holder read from ``/proc/locks`` without
taking it; :func:`original_processes`, copies of a program from another
installation (such as the original desitransfer) that hold no such lock; and
the loop of a long-running command and the request to stop it
(:func:`repeat`, :class:`Stop`).  Used by :command:`desi_transfer_init` and
by the long-running commands.
"""

import datetime as dt
import errno
import fcntl
import os
import pwd
import re
import select
import shlex
import signal
import stat
import sys
import sysconfig
import threading
import time
from collections import namedtuple

from .common import FILE_MODE, log

#: A process running a program: its id, its user and its command line.
Process = namedtuple('Process', ['pid', 'user', 'command'])

#: Programs that run a script named on their command line.
_interpreter = re.compile(r'(?:python|pypy)[0-9.]*|(?:ba|da|k|z)?sh')

#: The longest command line read from ``/proc``.
_MAX_CMDLINE = 1 << 16

#: Processes with more open files than this are not looked into.
_MAX_FDS = 4096


# ----------------------------------------------------------------------
# Processes and locks, from /proc.
# ----------------------------------------------------------------------
def _read(path, size=_MAX_CMDLINE):
    with open(path, 'rb') as f:
        return f.read(size)


def command_line(pid):
    """The command line of process `pid`, a list; empty if it cannot be read."""
    try:
        raw = _read(f'/proc/{pid:d}/cmdline')
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b'\0')[:-1]] if raw else []


def stat_fields(pid):
    """Fields of ``/proc/PID/stat`` after the command name (state first); empty if gone."""
    try:
        raw = _read(f'/proc/{pid:d}/stat', 4096).decode(errors='replace')
    except OSError:
        return []
    return raw[raw.rfind(')') + 2:].split()


def alive(pid):
    """``True`` if process `pid` exists and is not a zombie."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] not in ('Z', 'X')


def parent_of(pid):
    fields = stat_fields(pid)
    return int(fields[1]) if len(fields) > 1 else 0


def ancestors(pid):
    """`pid` and every process above it."""
    found = []
    while pid > 0 and pid not in found:
        found.append(pid)
        pid = parent_of(pid)
    return found


def descendants(pid):
    """Every process below `pid` (children, their children, ...)."""
    children = {}
    for name in os.listdir('/proc'):
        if name.isdigit():
            children.setdefault(parent_of(int(name)), []).append(int(name))
    found, pending = [], list(children.get(pid, []))
    while pending:
        p = pending.pop()
        if p not in found:
            found.append(p)
            pending += children.get(p, [])
    return sorted(found)


def started(pid):
    """When process `pid` started, a UTC :class:`datetime.datetime`, or ``None``."""
    fields = stat_fields(pid)
    try:
        ticks = int(fields[19])
        with open('/proc/stat') as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith('btime '))
    except (IndexError, ValueError, OSError, StopIteration):
        return None
    seconds = boot + ticks / os.sysconf('SC_CLK_TCK')
    return dt.datetime.fromtimestamp(int(seconds), dt.timezone.utc)


def user_of(pid):
    try:
        uid = os.stat(f'/proc/{pid:d}').st_uid
    except OSError:
        return '?'
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def lock_holder(path):
    """The process holding the single-instance lock `path`.

    The kernel's table of locks (``/proc/locks``) names the holder; on a file
    system that keeps its locks to itself, a shared lock is tried (and
    released at once) and the holder is the pid written in the file.

    Parameters
    ----------
    path : :class:`str`
        The lock file.

    Returns
    -------
    :class:`int` or ``None``
        The pid of the holder (0 if it is held by a process whose pid is not
        known), or ``None`` if nobody holds it.

    Raises
    ------
    OSError
        If the lock file exists but cannot be examined: then nobody can tell.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    key = f'{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino:d}'
    try:
        with open('/proc/locks') as f:
            table = f.read()
    except OSError:
        table = ''
    for line in table.splitlines():
        words = line.split()
        # "1: FLOCK  ADVISORY  WRITE 14391 fe:00:2146368 0 EOF"; "1: -> ..." waits.
        if len(words) >= 6 and words[1] == 'FLOCK' and words[5] == key:
            pid = int(words[4]) if words[4].isdigit() else 0
            return pid if pid > 0 and alive(pid) else written_pid(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return written_pid(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def written_pid(path):
    """The pid the holder wrote in the lock file, if it is a live process; else 0."""
    try:
        text = _read(path, 64).decode(errors='replace').strip()
    except OSError:
        return 0
    pid = int(text) if text.isdigit() else 0
    return pid if pid > 0 and alive(pid) else 0


# ----------------------------------------------------------------------
# Another installation of a program.
# ----------------------------------------------------------------------
def script_of(argv, program):
    """The path by which `argv` runs `program`, or ``None``: the program
    itself, or the script given to an interpreter (``python .../PROGRAM``)."""
    if not argv:
        return None
    if os.path.basename(argv[0]) == program:
        return argv[0]
    if _interpreter.fullmatch(os.path.basename(argv[0])):
        for arg in argv[1:]:
            if arg.startswith('-'):
                if arg in ('-c', '-m'):
                    return None  # code or a module, not a script
                continue
            return arg if os.path.basename(arg) == program else None
    return None


def installed_scripts(program):
    """Paths (resolved) at which this installation provides `program`, in
    order of preference: the running script if it is `program`, the console
    script beside the interpreter, in the scripts directory of the
    environment, and in ``bin/`` of the source tree of the package."""
    package = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(os.path.dirname(sys.executable), program),
                  os.path.join(sysconfig.get_path('scripts'), program),
                  os.path.join(os.path.dirname(os.path.dirname(package)), 'bin', program)]
    if os.path.basename(sys.argv[0]) == program:
        candidates.insert(0, sys.argv[0])
    found = []
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.isfile(real) and real not in found:
            found.append(real)
    return found


def _holds_lock_of(pid, program):
    """``True`` if process `pid` has a file ``PROGRAM.lock`` open, as every
    copy of `program` of this package does once it runs (whatever its
    configuration)."""
    directory = f'/proc/{pid:d}/fd'
    try:
        fds = os.listdir(directory)
    except OSError:
        return False
    for fd in fds[:_MAX_FDS]:
        try:
            target = os.readlink(os.path.join(directory, fd))
        except OSError:
            continue
        if os.path.basename(target) == f'{program}.lock':
            return True
    return False


def original_processes(program, exclude=(), all_users=False):
    """Processes running `program` from another installation than this one,
    such as the original desitransfer package.

    A process runs `program` if its command line starts with it, or with an
    interpreter (``python``, ``sh``, ...) given a script of that name.  It is
    of this installation if it has the program's lock file
    (``PROGRAM.lock``) open, as every running copy of this package's
    commands does, or if its script is one of :func:`installed_scripts`.
    This process, its parents and `exclude` are never reported.

    Parameters
    ----------
    program : :class:`str`
        The program's name, such as ``'desi_transfer_daemon'`` or
        ``'desi_nightwatch_transfer'``.
    exclude : iterable of :class:`int`, optional
        Pids known to be of this installation (such as the lock holder).
    all_users : :class:`bool`, optional
        If ``True``, look at the processes of every user; by default only at
        those of the calling user (the account that transfers), so that
        someone else's copy, a developer's test for example, does not count.

    Returns
    -------
    :class:`list`
        :class:`Process` ``(pid, user, command)`` of each, by pid; empty if none.
    """
    ours = set(installed_scripts(program))
    skip = set(ancestors(os.getpid())) | {int(p) for p in exclude}
    uid = os.getuid()
    found = []
    for name in os.listdir('/proc'):
        if not name.isdigit() or int(name) in skip:
            continue
        pid = int(name)
        try:
            if not all_users and os.stat(f'/proc/{pid:d}').st_uid != uid:
                continue
        except OSError:
            continue
        argv = command_line(pid)
        script = script_of(argv, program)
        if script is None or not alive(pid):
            continue
        try:
            cwd = os.readlink(f'/proc/{pid:d}/cwd')
        except OSError:
            cwd = '/'
        if os.path.realpath(os.path.join(cwd, script)) in ours or _holds_lock_of(pid, program):
            continue
        found.append(Process(pid, user_of(pid), shlex.join(argv)))
    return sorted(found)


def original_running(program):
    """``True``, with one CRITICAL line saying how to stop it, if a copy of
    `program` from another installation (such as the original desitransfer)
    runs as this user: two copies would work on the same data, and the
    single-instance lock of this package cannot see that one.

    Parameters
    ----------
    program : :class:`str`
        The program's name, such as ``'desi_transfer_daemon'``.
    """
    originals = original_processes(program)
    if not originals:
        return False
    log.critical("%s of another installation (such as the original desitransfer) is "
                 "running: %s.  This %s does not start, so that two of them never work on "
                 "the same data.  Stop that one first: with the original's init script "
                 "(desi_transfer_init.sh stop, or desi_nightwatch_init.sh stop), or with "
                 "kill %s; then start this one (desi_transfer_init start).", program,
                 '; '.join(f'pid {p.pid:d} ({p.command[:200]})' for p in originals), program,
                 ' '.join(str(p.pid) for p in originals))
    return True


def exclusively(program, lock_file, work):
    """Run `work` (a callable returning an exit status) as the one running
    copy of `program`: holding the kernel lock `lock_file`, and only if no
    copy of it from another installation runs (see :func:`original_running`).

    Returns
    -------
    :class:`int`
        What `work` returned; 0 if another copy holds the lock (a start by a
        keep-alive cron line is no error); 1 if the lock cannot be taken or
        a copy of another installation runs.
    """
    try:
        lock, holder = single_instance(lock_file)
    except OSError as err:
        log.critical("%s cannot take its lock %s: %s; it does not start.", program, lock_file,
                     err)
        return 1
    if lock is None:
        log.info("%s is already running (pid %s, lock %s); nothing to do.", program, holder,
                 lock_file)
        return 0
    with lock:
        if original_running(program):
            return 1
        return work()


# ----------------------------------------------------------------------
# Single-instance locks, and the loop and stop of long-running commands.
# ----------------------------------------------------------------------
class Waker(object):
    """A pipe that becomes readable once :meth:`wake` is called, so that a
    loop waiting in :func:`select.select` (:func:`desitransfer.runner.run`)
    notices a request to stop at once instead of at its next look.  The pipe
    is made at the first :meth:`fileno`.
    """

    def __init__(self):
        self._lock = threading.RLock()  # wake() may come from a signal handler
        self._fds = None
        self._woken = False

    def fileno(self):
        """The end to read of the pipe."""
        with self._lock:
            if self._fds is None:
                self._fds = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                if self._woken:
                    os.write(self._fds[1], b'!')
            return self._fds[0]

    def wake(self):
        """Make the pipe readable (for good)."""
        with self._lock:
            if not self._woken and self._fds is not None:
                os.write(self._fds[1], b'!')
            self._woken = True

    def wake_from_signal(self):
        """:meth:`wake`, for a signal handler: it takes no lock (the handler
        runs in the main thread between two instructions, maybe while that
        thread holds this one), so the pipe must have been made before
        (:meth:`fileno`)."""
        fds = self._fds
        if fds is not None and not self._woken:
            try:
                os.write(fds[1], b'!')
            except OSError:  # full, so readable already; or closed at exit
                pass
        self._woken = True

    def close(self):
        with self._lock:
            if self._fds is not None:
                for fd in self._fds:
                    os.close(fd)
                self._fds = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit, os may be gone already
            pass


def wakers_of(stop):
    """What wakes a wait when `stop` (a :class:`Stop`, anything with
    ``is_set``, or ``None``) is set: its :class:`Waker` objects, if it has any."""
    return stop.wakers() if stop is not None and hasattr(stop, 'wakers') else []


class Background(object):
    """``target()`` run in a daemon thread of its own, started at once, whose
    end (however it ends) wakes :attr:`ended`, so that :meth:`wait` is woken
    by it, not by a look every so often."""

    def __init__(self, target, name):
        self.ended = Waker()

        def run():
            try:
                target()
            finally:
                self.ended.wake()

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()

    def is_alive(self):
        return self.thread.is_alive()

    def wait(self, seconds, stop=None):
        """Wait up to `seconds` for the end, less if `stop` is set; ``True``
        if it has ended."""
        wait_for(lambda: not self.thread.is_alive() or (stop is not None and stop.is_set()),
                 [self.ended] + wakers_of(stop), seconds)
        return not self.thread.is_alive()


def wait_for(done, wakers, seconds, look=0.5):
    """Wait up to `seconds` until ``done()`` is true: woken at once by any of
    `wakers` (:class:`Waker`, made readable by whatever makes ``done()``
    true), looking again every `look` seconds only for what has no waker
    (a kill file).  Whether ``done()`` is true."""
    end = time.monotonic() + seconds
    poller = select.poll()  # not select(): no limit on descriptor numbers
    for waker in wakers:
        poller.register(waker.fileno(), select.POLLIN)
    while not done():
        left = end - time.monotonic()
        if left <= 0:
            return False
        poller.poll(1000 * min(left, look))
    return True


class Stop(object):
    """A request to stop: SIGTERM (once :meth:`handle_signals` is called),
    the kill file, or :meth:`set`.

    It can be passed as `stop` to :func:`~desitransfer.runner.run`, which then notices the kill
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
        self.waker = Waker()
        self._signalled = False  # set by the signal handler, which takes no lock

    def set(self, reason='stop requested'):
        """Ask every loop and command using this object to stop."""
        if not self.event.is_set():
            self.reason = reason
        self.event.set()
        self.waker.wake()

    def wakers(self):
        """What :func:`~desitransfer.runner.run` selects on to notice :meth:`set` at once."""
        return [self.waker]

    def handle_signals(self, *signums):
        """Set this object when one of `signums` (default SIGTERM) arrives.

        The handler runs in the main thread between two instructions, maybe
        while that thread holds a lock of this object (inside :meth:`set`
        or a wait): it takes none.  It notes the signal and wakes the pipe of
        :meth:`wakers` (made now); :meth:`is_set` does the rest.
        """
        self.waker.fileno()

        def handler(signum, frame):
            if self.reason is None:
                self.reason = f'{signal.Signals(signum).name} received'
            self._signalled = True
            self.waker.wake_from_signal()

        for signum in signums or (signal.SIGTERM,):
            signal.signal(signum, handler)

    def is_set(self):
        """``True`` once a stop was asked for; looks for the kill file."""
        if self.event.is_set():
            return True
        if self._signalled:
            self.set(self.reason)
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
        return wait_for(self.is_set, self.wakers(), seconds, look=self.interval)


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
