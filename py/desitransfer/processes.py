# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
======================
desitransfer.processes
======================

Processes as ``/proc`` shows them: whether one is alive and when it started,
its parents and children, the holder of a single-instance lock
(:func:`desitransfer.common.single_instance`) read from ``/proc/locks``
without taking it, and :func:`original_processes`, copies of a program from
another installation (such as the original desitransfer) that hold no such
lock.  Used by :command:`desi_transfer_init` and by the long-running commands
at start-up.
"""

import datetime as dt
import errno
import fcntl
import os
import pwd
import re
import shlex
import sys
import sysconfig
from collections import namedtuple

from .common import log, single_instance

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
