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
import fcntl
import functools
import json
import logging
import logging.handlers
import os
import re
import shlex
import shutil
import signal
import socket
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

#: Return code, standard output and standard error of an external command.
Result = namedtuple('Result', ['returncode', 'stdout', 'stderr'])


def _utcnow():
    """Current time, timezone-aware in UTC (replaced in tests).
    """
    return dt.datetime.now(dt.timezone.utc)


def run(command, timeout=DEFAULT_TIMEOUT, cwd=None, env=None, ok=(0,),
        test=False, quiet=False, stop=None):
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
        Environment of the command; secrets belong here, not in `command`.
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

    Returns
    -------
    :class:`Result`
        Return code (-9 after a timeout, -15 after `stop`, 127 if the program
        does not exist), standard output and standard error.
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
                                cwd=cwd, env=env, text=True, errors='replace',
                                start_new_session=True)
    except OSError as err:
        log.error("Could not start %s: %s", quoted, err)
        return Result(127, '', str(err))
    deadline = time.monotonic() + timeout
    while True:
        try:
            # Wake up every second to notice `stop`; no output is lost by retrying.
            out, err = proc.communicate(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            code = proc.returncode
            break
        except subprocess.TimeoutExpired:
            stopped = stop is not None and stop.is_set()
            if not stopped and time.monotonic() < deadline:
                continue
            # The command runs in its own session; stop ssh & co. started by it too.
            how = signal.SIGTERM if stopped else signal.SIGKILL
            out, err = _end(proc, how)
            err += ("\nStopped on request." if stopped else
                    f"\nTimed out after {timeout} seconds and was killed.")
            code = -how
            break
    if code not in ok:
        log.error("Command failed with return code %d%s: %s", code, where, quoted)
        if out.strip():
            log.error("Standard output of %s: %s", command[0], out.strip()[-4000:])
        if err.strip():
            log.error("Standard error of %s: %s", command[0], err.strip()[-4000:])
    return Result(code, out, err)


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
                                stderr=subprocess.DEVNULL, start_new_session=True)
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
            ready = select.select([proc.stdout], [], [], max(0, deadline - t0))[0]
            if not ready or proc.stdout.readline() != b'.\n':
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


def _end(proc, how):
    """Send `how` to the process group of `proc`, then SIGKILL if it is still
    there after a few seconds; its output so far.

    Once the process is gone its output is not waited for: a process outside
    the group may hold the pipes (an OpenSSH control master is handed the
    standard streams of the ssh client it serves, and keeps them until the
    remote command ends).
    """
    for signum, wait in ((how, 3.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            gone = proc.poll() is not None
            try:
                return proc.communicate(timeout=0.5 if gone else 0.2)
            except subprocess.TimeoutExpired:
                if gone:
                    return _abandon(proc)
    return _abandon(proc)


def _abandon(proc):
    """Close the pipes of `proc` without reading them to their end."""
    for stream in (proc.stdout, proc.stderr):
        stream.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    return '', '(output abandoned: the pipes were held by another process)'


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


def temporary_name(path):
    """The name of a temporary file beside `path` for this process:
    ``.NAME.PID.tmp`` in the same directory, which :func:`sweep_temporary`
    recognises once this process is gone."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f'.{name}.{os.getpid():d}.tmp')


_temporary = re.compile(r'\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp')


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temporary(directory):
    """Remove temporary files left in `directory` by writers that were killed.

    Only names made by :func:`temporary_name` are considered, and only those
    of processes that no longer exist (a live writer's file is left alone).

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
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        m = _temporary.fullmatch(name)
        if m is None or _alive(int(m.group('pid'))):
            continue
        path = os.path.join(directory, name)
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)
                removed.append(path)
        except OSError as err:
            log.warning("Could not remove stale temporary file %s: %s.", path, err)
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


def single_instance(path):
    """Take the single-instance lock `path`: an exclusive kernel lock
    (:func:`fcntl.flock`) that dies with its process, so a crash never leaves
    a stale lock behind, and a recycled pid never looks like a holder.

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
        what that process wrote (``'unknown'`` if nothing).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lock = open(path, 'a+')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or 'unknown'
        lock.close()
        return None, holder
    lock.seek(0)
    lock.truncate(0)
    lock.write(f'{os.getpid():d}\n')
    lock.flush()
    return lock, None


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


class AlertHandler(logging.handlers.SMTPHandler):
    """Email CRITICAL messages, at most once per `repeat` seconds per message.

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
        self._sent = {}
        if memory:
            try:
                with open(memory) as f:
                    sent = json.load(f)
                self._sent = {str(k): float(t) for k, t in sent.items()}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, TypeError, AttributeError) as err:
                # Forgetting costs at most one repeated email.
                log.warning("Alert memory %s is unreadable (%s); starting afresh.", memory, err)

    def _remember(self):
        if not self.memory:
            return
        try:
            write_json(self.memory, self._sent)
        except OSError as err:
            sys.stderr.write(f"desitransfer: could not write {self.memory}: {err}\n")

    def emit(self, record):
        try:
            key = record.getMessage()
        except Exception:
            # A mistake in the arguments of an alert must not hide the alert.
            record = logging.makeLogRecord(record.__dict__)
            record.msg = f"{record.msg} (bad log arguments {record.args!r})"
            record.args = ()
            key = record.msg
        now = time.time()
        last = self._sent.get(key)
        if last is not None and 0 <= now - last < self.repeat:
            return
        # Forget messages not seen for a long time: years of distinct alerts add up.
        self._sent = {k: t for k, t in self._sent.items() if 0 <= now - t < self.repeat}
        self._sent[key] = now
        super().emit(record)
        self._remember()

    def handleError(self, record):
        # A broken mail server must not stop transfers; say so where it is seen.
        sys.stderr.write(f"desitransfer: could not email alert to {', '.join(self.toaddrs)} "
                         f"via {self.mailhost}:{self.mailport}: {sys.exc_info()[1]}\n")
        try:
            self._sent.pop(record.getMessage(), None)
        except Exception:
            pass
        self._remember()


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
        Also log to this file, rotated at `size` bytes, keeping `backups` old files.
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
        fh = logging.handlers.RotatingFileHandler(filename, maxBytes=size,
                                                  backupCount=backups)
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


def write_text(path, text):
    """Write `text` to `path` atomically: a temporary file beside it, flushed
    and synced to disk, then renamed over `path`, so that a reader sees the
    old contents or the new, never a part.

    Parameters
    ----------
    path : :class:`str`
        The file to write.
    text : :class:`str`
        What to write.

    Raises
    ------
    OSError
        If it cannot be written (the temporary file is removed, `path` is unchanged).
    """
    tmp = temporary_name(path)
    try:
        with open(tmp, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
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
                    m = re.fullmatch(r'desitransfer-ssh-([0-9]+)-\w+', name)
                    if m is not None and not _alive(int(m.group(1))):
                        shutil.rmtree(os.path.join(top, name), ignore_errors=True)
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
        for name in sorted(os.listdir(self._directory)):
            control = os.path.join(self._directory, name)
            run(self._command() + ['-o', f'ControlPath={control}', '-O', 'exit', self.host],
                timeout=30, quiet=True, ok=(0, 255))
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
    import stat  # Here rather than above, so that this helper stays in one place.
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
