# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===================
desitransfer.tucson
===================

Entry point for :command:`desi_tucson_transfer`.

Mirror DESI data from NERSC to Tucson (NOIRLab) with parallel :command:`rsync`,
run daily by cron.  The directories, and the filters of each, are listed in
the shipped file ``desi_tucson_transfer.ini``.  Two other runs use the same
table: ``--catchup``, the catch-up after an outage, and ``--hwtables``, the
tables of the focal plane over ssh with their own key.

The mirror must never wipe itself: a directory that is empty or missing at
NERSC while its copy holds data is refused, and each :command:`rsync` deletes
at most ``--max-delete`` files unless ``--force-delete`` is given.
"""
import configparser
import functools
import os
import re
import shlex
import sys
import time
from argparse import ArgumentParser, ArgumentTypeError
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from importlib.resources import files

import requests

from . import __version__ as dtVersion
from . import common
from .common import (MST, AlertHandler, Stop, configure_log, interval, log, run,
                     single_instance, ssh_command, stamp)

#: The rsync program.
RSYNC = '/usr/bin/rsync'

#: The DESI tree at NERSC, the source of the ssh form (:envvar:`RSYNC_RSH` set).
REMOTE_ROOT = '/global/cfs/cdirs/desi'

#: The ssh program of ``--hwtables`` unless :envvar:`RSYNC_RSH` names one:
#: the key ``~/.ssh/nersc``, and no other.
HWTABLES_SSH = ('ssh', '-i', os.path.join('~', '.ssh', 'nersc'), '-o', 'IdentitiesOnly=yes')

#: Most rsync commands running at once.
MAX_PROCESSES = 10

#: Niceness added to the rsync of directories that are not a priority.
NICENESS = 5

#: The same in the catch-up: that of a plain ``nice``.
CATCHUP_NICENESS = 10

#: Default bound on the files one rsync may delete.
MAX_DELETE = 10000

#: Seconds before an rsync mirroring a directory is killed.
RSYNC_TIMEOUT = 20 * 3600

#: Seconds before an rsync listing a source directory is killed.
LIST_TIMEOUT = 600

#: Seconds without any data after which rsync gives up (its ``--timeout``).
IO_TIMEOUT = 1800

#: Connect and read timeouts of a request to :envvar:`DESISYNC_STATUS_URL`.
STATUS_TIMEOUT = (10, 60)

#: How long to wait for :envvar:`DESISYNC_STATUS_URL` to answer 200.
WAIT_LIMIT = timedelta(hours=12)

#: A per-directory log larger than this is renamed ``.1`` before the next run.
LOG_SIZE = 100 * 2**20

#: The environment variables needed, besides :envvar:`DESI_ROOT`, by the
#: daily run.
REQUIRED = ('DESISYNC_HOSTNAME', 'DESISYNC_STATUS_URL', 'MAILFROM', 'MAILTO')

#: The name the alert emails come from, in front of :envvar:`MAILFROM`.
SENDER = 'NOIRLab Mirror Account'

#: What distinguishes the three runs: the environment variables each needs
#: (besides :envvar:`DESI_ROOT`), whether it waits for the daily transfer at
#: NERSC, its lock file (in the log directory) and the niceness of its
#: directories that are not a priority.
Run = namedtuple('Run', ['required', 'wait', 'lock', 'niceness'])

#: The runs: ``daily`` (cron, the default), ``catchup`` (``--catchup``, by hand
#: after an outage: no waiting; it shares the lock of the daily run, as both
#: write the same directories) and ``hwtables`` (``--hwtables``, over ssh).
RUNS = {'daily': Run(REQUIRED, True, 'desi_tucson_transfer.pid', NICENESS),
        'catchup': Run(('DESISYNC_HOSTNAME',), False, 'desi_tucson_transfer.pid',
                       CATCHUP_NICENESS),
        'hwtables': Run(('NERSC_USER', 'NERSC_HOST'), False,
                        'desi_tucson_transfer_hwtables.pid', NICENESS)}

#: A mirrored directory, a section of the table: its name (the section), the
#: directory relative to the top of the tree, its set (``dynamic``,
#: ``static`` or ``hwtables``), whether it is a priority (started first, at
#: normal priority), whether ``--catchup`` mirrors it, the first of the old
#: years not mirrored any more (or ``None``) and its rsync filter arguments.
Directory = namedtuple('Directory', ['name', 'directory', 'set', 'priority', 'catchup',
                                     'years', 'filters'])

#: The sets of the table.
SETS = ('dynamic', 'static', 'hwtables')

#: What became of one directory: status, seconds, regular files transferred,
#: bytes transferred, files deleted, and the directory's rsync log.
Outcome = namedtuple('Outcome', ['directory', 'status', 'seconds', 'files', 'bytes',
                                 'deleted', 'log'])

#: The status of a directory that did not fail.
SUCCESS = ('ok', 'excluded', 'test mode')

#: The lock of this process, kept open while it runs (see :func:`running`).
_lock = None

_stats = {'files': re.compile(r'^Number of regular files transferred: ([0-9,]+)', re.M),
          'bytes': re.compile(r'^Total transferred file size: ([0-9,]+)', re.M),
          'deleted': re.compile(r'^Number of deleted files: ([0-9,]+)', re.M)}

#: What the environment may hold, checked before it reaches a command line.
_formats = {'DESISYNC_HOSTNAME': (re.compile(r'(?:[A-Za-z0-9_][A-Za-z0-9_.+-]*@)?'
                                             r'[A-Za-z0-9][A-Za-z0-9.-]*(?::[0-9]{1,5})?'),
                                  'a host, user@host or host:port'),
            'NERSC_USER': (re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.-]*'), 'a user name'),
            'NERSC_HOST': (re.compile(r'[A-Za-z0-9][A-Za-z0-9.-]*'), 'a host name'),
            'DESISYNC_ROOT': (re.compile(r'/[A-Za-z0-9_./+-]*'), 'an absolute path'),
            'MAILFROM': (re.compile(r'[^@\s<>,"]+@[^@\s<>,"]+'), 'an email address'),
            'MAILTO': (re.compile(r'[^@\s<>,"]+@[^@\s<>,"]+(?:[,\s]+[^@\s<>,"]+@[^@\s<>,"]+)*'),
                       'comma-separated email addresses'),
            'MAILHOST': (re.compile(r'[A-Za-z0-9][A-Za-z0-9.-]*(?::[0-9]{1,5})?'),
                         'host or host:port')}


def _relative(name):
    """``True`` if `name` is a directory relative to the top of the tree."""
    return not (any(p in ('', '.', '..') for p in name.split('/')) or re.search(r'\s', name))


def read_directories(text=None, source='desi_tucson_transfer.ini'):
    """Read the table of mirrored directories.

    Parameters
    ----------
    text : :class:`str`, optional
        The table, in the format of the shipped ``desi_tucson_transfer.ini``,
        which is read if not set.
    source : :class:`str`, optional
        Name of the table in error messages.

    Returns
    -------
    :class:`list`
        :class:`Directory` objects, in the order of the table.

    Raises
    ------
    ValueError
        If the table is malformed; the message names the section and key.
    """
    if text is None:
        text = (files('desitransfer') / 'data' / 'desi_tucson_transfer.ini').read_text()
    parser = configparser.ConfigParser(interpolation=None, default_section='\0')
    parser.optionxform = str
    try:
        parser.read_string(text, source=source)
    except configparser.Error as err:
        raise ValueError(str(err)) from None
    directories = []
    for name in parser.sections():
        section = parser[name]
        where = f"{source} [{name}]"
        directory = section.get('directory', name).strip()
        if not (_relative(name) and _relative(directory)):
            raise ValueError(f"{where}: not a directory relative to the top of the tree")
        unknown = sorted(set(section) - {'set', 'directory', 'priority', 'catchup', 'years',
                                         'filter'})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
        if section.get('set') not in SETS:
            raise ValueError(f"{where} set: {', '.join(SETS[:-1])} or {SETS[-1]}, "
                             f"not {section.get('set')!r}")
        flags = {}
        for key in ('priority', 'catchup'):
            try:
                flags[key] = section.getboolean(key, fallback=False)
            except ValueError:
                raise ValueError(f"{where} {key}: yes or no, not {section[key]!r}") from None
        if flags['catchup'] and section['set'] == 'hwtables':
            raise ValueError(f"{where} catchup: the catch-up mirrors dynamic or static "
                             "directories, not a hwtables one")
        years = section.get('years')
        if years is not None:
            if re.fullmatch(r'[0-9]{4}', years) is None:
                raise ValueError(f"{where} years: a year YYYY, not {years!r}")
            years = int(years)
        filters = []
        for line in section.get('filter', '').splitlines():
            rule, _, pattern = line.strip().partition(' ')
            if not rule:
                continue
            if rule not in ('include', 'exclude') or not pattern.strip():
                raise ValueError(f"{where} filter: 'include PATTERN' or 'exclude PATTERN', "
                                 f"not {line.strip()!r}")
            filters += [f'--{rule}', pattern.strip()]
        directories.append(Directory(name, directory, section['set'], flags['priority'],
                                     flags['catchup'], years, tuple(filters)))
    # One run never mirrors a directory twice (two rsync commands at once).
    for chosen in ([d for d in directories if d.set != 'hwtables'],
                   [d for d in directories if d.set == 'hwtables']):
        seen = set()
        for d in chosen:
            if d.directory in seen:
                raise ValueError(f"{source} [{d.name}]: directory {d.directory} is already "
                                 "mirrored by another section of the same run")
            seen.add(d.directory)
    return directories


@functools.lru_cache(maxsize=1)
def _table():
    """The shipped table of directories, read once."""
    return tuple(read_directories())


def _old_years(start):
    """rsync arguments leaving out the entries ``YYYY*`` from year `start` to
    last year (on the calendar of Kitt Peak), but for last year in January,
    so that the nights of late December, and their reductions, still arrive.
    """
    today = common._utcnow().astimezone(MST)
    last = today.year - (2 if today.month == 1 else 1)
    return [a for year in range(start, last + 1) for a in ('--exclude', f'{year:d}*')]


def _section_filters(section):
    """The rsync filter arguments of the :class:`Directory` `section`: its
    old years first, then its filter."""
    years = _old_years(section.years) if section.years else []
    return years + list(section.filters)


def _ssh():
    """``True`` if :envvar:`RSYNC_RSH` asks for the ssh form."""
    return bool(os.environ.get('RSYNC_RSH', '').strip())


def _transport(run='daily'):
    """rsync options of the connection of `run` (a key of :data:`RUNS`).

    The daily run and the catch-up use the ssh program of :envvar:`RSYNC_RSH`,
    or else the password file of the rsync daemon, ``~/.desi``; ``hwtables``
    always uses ssh: :envvar:`RSYNC_RSH` or else :data:`HWTABLES_SSH`.  The
    options of :func:`~desitransfer.common.ssh_command` are added to ssh,
    so that it never waits for a password or a dead connection.
    """
    ssh = shlex.split(os.environ.get('RSYNC_RSH', '').strip())
    if run == 'hwtables' and not ssh:
        ssh = [os.path.expanduser(a) for a in HWTABLES_SSH]
    if ssh:
        return ['--rsh=' + shlex.join(ssh_command(ssh))]
    return ['--password-file', os.path.expanduser(os.path.join('~', '.desi'))]


def _rsync_command(src, dst, section, transport, checksum=False):
    """The :command:`rsync` command mirroring the :class:`Directory` `section`
    from `src` to `dst` with the connection options `transport`."""
    cmd = [RSYNC, '--archive', '--verbose', '--delete', '--delete-after',
           '--no-motd'] + list(transport)
    if checksum:
        cmd.insert(cmd.index('--verbose'), '--checksum')
    cmd += _section_filters(section)
    cmd += [f'{src}/{section.directory}/', f'{dst}/{section.directory}/']
    return cmd


def _rsync(src, dst, d, checksum=False):
    """Construct an :command:`rsync` command to transfer `d`.

    Parameters
    ----------
    src : :class:`str`
        Root source directory.
    dst : :class:`str`
        Root destination directory.
    d : :class:`str`
        Directory to transfer relative to `src`, `dst`.
    checksum : :class:`bool`, optional
        If ``True``, pass the ``--checksum`` option to :command:`rsync`.

    Returns
    -------
    :class:`list`
        The command of the daily run, with the filters of `d` in the table
        (none if `d` is not in it).  When :envvar:`RSYNC_RSH` is set, the
        connection is made with that ssh program (non-interactive options
        added) instead of the password file.
    """
    section = Directory(d, d, 'dynamic', False, False, None, ())
    for s in _table():
        if s.set != 'hwtables' and s.directory == d:
            section = s
            break
    return _rsync_command(src, dst, section, _transport(), checksum=checksum)


def running(pid_file):
    """Test for a duplicate process already running.

    The test takes a kernel lock (:func:`fcntl.flock`) on `pid_file`, kept
    until this process ends; it dies with its holder, so that neither a crash
    nor a recycled process id is ever taken for a running transfer.

    Parameters
    ----------
    pid_file : :class:`str`
        Name of file containing a process id.

    Returns
    -------
    :class:`bool`
        ``True`` if a duplicate process is detected.
    """
    global _lock
    lock, holder = single_instance(pid_file)
    if lock is None:
        log.critical("Another desi_tucson_transfer (pid %s) is running (lock %s); exiting.",
                     holder, pid_file)
        return True
    _lock = lock
    return False


def _configure_log(debug, log_dir=None, test=False):
    """Re-configure the default logger returned by ``desiutil.log``.

    CRITICAL messages are emailed from ``NOIRLab Mirror Account
    <$MAILFROM>`` to :envvar:`MAILTO` (comma-separated addresses) through
    :envvar:`MAILHOST` (default ``localhost:25``), each message at most once
    every six hours.  Without a usable :envvar:`MAILFROM` they come from
    ``USER@HOST``; without a usable :envvar:`MAILTO` they are only logged.

    Parameters
    ----------
    debug : :class:`bool`
        If ``True`` set the log level to ``DEBUG``.
    log_dir : :class:`str`, optional
        Also log to ``desi_tucson_transfer.log`` in this directory, and
        remember the alerts sent there.
    test : :class:`bool`, optional
        Test mode: no log file, no email.
    """
    to = [] if test or _environ('MAILTO') is None else \
        [a for a in re.split(r'[,\s]+', _environ('MAILTO')) if a]
    keep = log_dir is not None and not test
    configure_log(debug=debug,
                  filename=os.path.join(log_dir, 'desi_tucson_transfer.log') if keep else None,
                  to=to, mailhost=_environ('MAILHOST') or 'localhost:25',
                  program='desi_tucson_transfer',
                  memory=os.path.join(log_dir, 'desi_tucson_transfer_alerts.json') if keep
                  else None)
    sender = _environ('MAILFROM')
    for handler in log.handlers:
        if sender and isinstance(handler, AlertHandler):
            handler.fromaddr = f'{SENDER} <{sender}>'


def _environ(name):
    """The value of the environment variable `name`, stripped, or ``None``
    if it is unset, empty or not in the form :data:`_formats` gives it."""
    value = os.environ.get(name, '').strip()
    if not value or (name in _formats and _formats[name][0].fullmatch(value) is None):
        return None
    return value


def _interval(value):
    """Seconds in ``30s``, ``15m``, ``1h``, ``2d`` or a number of seconds (argument type)."""
    try:
        return interval(value)
    except ValueError as err:
        raise ArgumentTypeError(str(err)) from None


def _processes(value):
    """A number of rsync commands at once, 1 to :data:`MAX_PROCESSES` (argument type)."""
    if re.fullmatch(r'[0-9]+', value.strip()) is None or not 1 <= int(value) <= MAX_PROCESSES:
        raise ArgumentTypeError(f"{value!r}: from 1 to {MAX_PROCESSES:d} rsync commands at once")
    return int(value)


def _count(value):
    """A number of files, 0 or more (argument type)."""
    if re.fullmatch(r'[0-9]+', value.strip()) is None:
        raise ArgumentTypeError(f"{value!r} is not a number of files")
    return int(value)


def _options(args=None):
    """Parse command-line options for :command:`desi_tucson_transfer`.

    Parameters
    ----------
    args : :class:`list`, optional
        Command-line arguments; ``sys.argv[1:]`` if not set.

    Returns
    -------
    :class:`argparse.Namespace`
        The parsed command-line options.
    """
    desc = "Mirror DESI data from NERSC to Tucson (NOIRLab) with parallel rsync."
    prsr = ArgumentParser(prog=os.path.basename(sys.argv[0]), description=desc)
    prsr.add_argument('-c', '--checksum', action='store_true',
                      help="Pass -c, --checksum to rsync.")
    prsr.add_argument('-d', '--debug', action='store_true',
                      help="Set log level to DEBUG.")
    prsr.add_argument('-D', '--destination', metavar='DIR',
                      help="Mirror into DIR instead of $DESI_ROOT.")
    prsr.add_argument('-e', '--exclude', metavar='DIR', nargs='*', action='extend', default=[],
                      help="Do not mirror DIR this time; several may be given.")
    prsr.add_argument('--force-delete', action='store_true', dest='force_delete',
                      help="Lift the bound on deletions for this run (by hand, after "
                           "checking that the deletions are intended).")
    prsr.add_argument('-l', '--log', metavar='DIR',
                      default=os.path.join(os.path.expanduser('~'), 'Documents', 'Logfiles'),
                      help="Write log files, one per directory, in DIR, created if missing "
                           "(default %(default)s).")
    prsr.add_argument('-m', '--max-delete', metavar='N', type=_count, default=MAX_DELETE,
                      dest='max_delete',
                      help="Let each rsync delete at most N files (default %(default)s).")
    prsr.add_argument('-p', '--processes', metavar='N', type=_processes, default=MAX_PROCESSES,
                      dest='nproc',
                      help=f"Run up to N rsync commands at once, at most {MAX_PROCESSES:d} "
                           "(default %(default)s).")
    runs = prsr.add_mutually_exclusive_group()
    runs.add_argument('-s', '--static', action='store_true', dest='static',
                      help="Also mirror the static data sets.")
    runs.add_argument('--catchup', action='store_const', const='catchup', dest='run',
                      default='daily',
                      help="Catch up after an outage: mirror the directories marked "
                           "'catchup' in the table now, without waiting for the daily "
                           "transfer at NERSC.")
    runs.add_argument('--hwtables', action='store_const', const='hwtables', dest='run',
                      help="Mirror the focal plane tables (*.csv) from "
                           "$NERSC_USER@$NERSC_HOST over ssh, with $RSYNC_RSH or else "
                           "the key ~/.ssh/nersc; no waiting.")
    prsr.add_argument('-S', '--sleep', metavar='TIME', type=_interval, default='15m',
                      help="Wait TIME (30s, 15m, 1h, 2d or seconds) between checks that "
                           "the daily transfer is finished (default %(default)s).")
    prsr.add_argument('-t', '--test', action='store_true',
                      help="Test mode: log every command, run none, change nothing. "
                           "Implies -d.")
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    options = prsr.parse_args(args)
    try:
        known = {name for d in _table() for name in (d.name, d.directory)}
    except ValueError as err:
        prsr.error(str(err))
    options.exclude = [e.strip('/') for e in options.exclude]
    unknown = [e for e in options.exclude if e not in known]
    if unknown:
        prsr.error(f"argument -e/--exclude: not a mirrored directory: {', '.join(unknown)}")
    return options


def _environment(options):
    """Source, destination, status URL and connection of the run chosen by
    `options`, from the environment and `options`.

    Every problem is one CRITICAL line, emailed if :envvar:`MAILTO` allows
    (see :func:`_configure_log`, called before).

    Returns
    -------
    :class:`dict`
        ``source``, ``destination``, ``status_url`` (``None`` unless the run
        waits for it) and ``transport`` (the connection options of rsync);
        ``None`` if something is missing or malformed.
    """
    run = RUNS[options.run]
    problems = [f"{e} is not set; desi_tucson_transfer{_flag(options)} needs it."
                for e in run.required if not os.environ.get(e, '').strip()]
    used = ('NERSC_USER', 'NERSC_HOST') if options.run == 'hwtables' else ('DESISYNC_HOSTNAME',)
    for name in used + ('DESISYNC_ROOT', 'MAILFROM', 'MAILTO', 'MAILHOST'):
        pattern, what = _formats[name]
        value = os.environ.get(name, '').strip()
        if value and pattern.fullmatch(value) is None:
            problems.append(f"{name} is not {what}: {value[:200]!r}.")
    url = os.environ.get('DESISYNC_STATUS_URL', '').strip()
    if run.wait and url and re.fullmatch(r'https?://[^\s]+', url) is None:
        problems.append(f"DESISYNC_STATUS_URL is not an http(s) URL: {url[:200]!r}.")
    destination = options.destination or os.environ.get('DESI_ROOT', '').strip()
    if not destination:
        problems.append("DESI_ROOT is not set and no destination (-D DIR) is given.")
    elif not os.path.isdir(destination):
        problems.append(f"The destination {destination} is not a directory.")
    for problem in problems:
        log.critical("%s Nothing was mirrored.", problem)
    if problems:
        return None
    if not options.test and _environ('MAILTO') is None:
        log.warning("MAILTO is not set: alerts are logged, not emailed.")
    root = _environ('DESISYNC_ROOT') or REMOTE_ROOT
    if options.run == 'hwtables':
        source = f"{_environ('NERSC_USER')}@{_environ('NERSC_HOST')}:{root}"
    elif _ssh():
        source = f"{_environ('DESISYNC_HOSTNAME')}:{root}"
    else:
        source = f"rsync://{_environ('DESISYNC_HOSTNAME')}/desi"
    return {'source': source, 'destination': os.path.abspath(destination),
            'status_url': url if run.wait else None, 'transport': _transport(options.run)}


def _flag(options):
    """The option choosing the run of `options`, as typed (``''`` for the daily run)."""
    return '' if options.run == 'daily' else f' --{options.run}'


def _holds_data(directory):
    """``True`` if `directory` has any entry, or cannot be read (then assume it has)."""
    try:
        with os.scandir(directory) as entries:
            return any(True for _ in entries)
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _statistics(out):
    """Files transferred, bytes transferred and files deleted, from ``rsync --stats``."""
    found = []
    for key in ('files', 'bytes', 'deleted'):
        m = _stats[key].search(out)
        found.append(int(m.group(1).replace(',', '')) if m else 0)
    return found


class Mirror(object):
    """Mirror the directories chosen by `options`.

    Parameters
    ----------
    options : :class:`argparse.Namespace`
        The parsed command-line options.
    environment : :class:`dict`
        What :func:`_environment` returns.
    """

    def __init__(self, options, environment):
        self.options = options
        self.test = options.test
        self.source = environment['source']
        self.destination = environment['destination']
        self.status_url = environment['status_url']
        self.transport = environment.get('transport') or _transport(options.run)
        self.run_kind = RUNS[options.run]
        self.stop = Stop()
        if options.run == 'catchup':
            self.directories = [d for d in _table() if d.catchup]
        elif options.run == 'hwtables':
            self.directories = [d for d in _table() if d.set == 'hwtables']
        else:
            self.directories = [d for d in _table()
                                if d.set == 'dynamic' or (options.static and d.set == 'static')]

    def run(self):
        """Wait for the daily transfer at NERSC (daily run only), then mirror
        every directory of the run.

        Returns
        -------
        :class:`int`
            0 if every directory was mirrored, 1 otherwise.
        """
        debug = self.options.debug or self.test
        if not self.test:
            _configure_log(debug)
            try:
                os.makedirs(self.options.log, exist_ok=True)
            except OSError as err:
                log.critical("Cannot create the log directory %s: %s. Nothing was mirrored.",
                             self.options.log, err)
                return 1
        _configure_log(debug, self.options.log, self.test)
        if self.test:
            log.info("Test mode: commands are logged, not run; nothing is changed.")
        elif running(os.path.join(self.options.log, self.run_kind.lock)):
            return 1
        if self.run_kind.wait:
            if not self._wait_for_nersc():
                return 1
        else:
            log.info("desi_tucson_transfer%s: mirroring %s from %s now, without waiting for "
                     "the daily transfer at NERSC.", _flag(self.options),
                     ', '.join(d.directory for d in self.directories), self.source)
        outcomes = self.mirror()
        for o in outcomes:
            log.info("%s: %s in %.1f s; %d files, %d bytes transferred, %d deleted%s.",
                     o.directory, o.status, o.seconds, o.files, o.bytes, o.deleted,
                     '' if o.status in SUCCESS else f'; see {o.log}')
        return 0 if all(o.status in SUCCESS for o in outcomes) else 1

    def _wait_for_nersc(self):
        """Wait until :envvar:`DESISYNC_STATUS_URL` answers 200 (the daily
        transfer at NERSC is finished), at most :data:`WAIT_LIMIT`."""
        if self.test:
            log.info("Test mode, would wait until %s answers 200.", self.status_url)
            return True
        deadline = common._utcnow() + WAIT_LIMIT
        while True:
            try:
                with requests.get(self.status_url, timeout=STATUS_TIMEOUT, stream=True) as r:
                    answer = f"HTTP status {r.status_code:d}"
                    if r.status_code == 200:
                        log.info("%s answers 200: the daily transfer is finished.",
                                 self.status_url)
                        return True
            except requests.RequestException as err:
                answer = str(err)
            if common._utcnow() >= deadline:
                log.critical("%s has not answered 200 (the daily transfer at NERSC is not "
                             "finished) in %s; last answer: %s. Nothing was mirrored.",
                             self.status_url, WAIT_LIMIT, answer)
                return False
            log.info("Daily transfer incomplete (%s: %s); sleeping %s s.", self.status_url,
                     answer, f'{self.options.sleep:g}')
            if self.stop.wait(self.options.sleep):
                log.warning("Stopped (%s) while waiting; nothing was mirrored.",
                            self.stop.reason)
                return False

    def mirror(self):
        """Mirror every directory, priority ones first, up to ``--processes`` at once.

        Returns
        -------
        :class:`list`
            An :class:`Outcome` for every directory, in the order of the table.
        """
        todo = [d for d in self.directories if d.priority] + \
               [d for d in self.directories if not d.priority]
        with ThreadPoolExecutor(max_workers=self.options.nproc) as pool:
            done = {o.directory: o for o in pool.map(self._mirror, todo)}
        return [done[d.name] for d in self.directories]

    def _log_file(self, d):
        return os.path.join(self.options.log,
                            'desi_tucson_transfer_' + d.name.replace('/', '_') + '.log')

    def _mirror(self, d):
        """Mirror one directory; never raises, so that the others finish."""
        t0 = time.monotonic()
        stats = (0, 0, 0)
        try:
            status, stats = self._mirror_directory(d)
        except Exception as err:
            log.critical("Mirroring %s failed unexpectedly (%s: %s); the other directories "
                         "continue.", d.name, err.__class__.__name__, err, exc_info=True)
            status = 'failed'
        return Outcome(d.name, status, time.monotonic() - t0, *stats, self._log_file(d))

    def _mirror_directory(self, d):
        """Mirror `d`: check the source, run rsync, say what happened.

        Returns
        -------
        :class:`tuple`
            The status and the statistics (files, bytes, deleted).
        """
        none = (0, 0, 0)
        if d.name in self.options.exclude or d.directory in self.options.exclude:
            log.warning("%s skipped at user request.", d.name)
            return 'excluded', none
        if self.stop.is_set():
            return 'stopped', none
        source = f'{self.source}/{d.directory}/'
        copy = os.path.join(self.destination, d.directory)
        state = self._source_state(d, source)
        if state not in ('ok', 'empty', 'missing'):
            if self.stop.is_set():
                log.warning("Listing %s stopped (%s).", source, self.stop.reason)
                return 'stopped', none
            log.critical("Cannot list %s (%s); see %s. %s is left as it is; the other "
                         "directories continue.", source, state, self._log_file(d), copy)
            return 'failed', none
        if state != 'ok' and _holds_data(copy):
            log.critical("%s is %s at NERSC while its copy %s holds data: refusing to mirror "
                         "it, which would delete the copy. The copy is kept; check NERSC, and "
                         "remove the copy by hand if the removal is intended.",
                         source, state, copy)
            return 'refused', none
        if state == 'missing':
            log.critical("%s is missing at NERSC, and there is no copy at %s: nothing to "
                         "mirror.", source, copy)
            return 'failed', none
        command = self._command(d)
        if not self.test:
            os.makedirs(copy, exist_ok=True)
        result = run(command, timeout=RSYNC_TIMEOUT, ok=(0, 24), stop=self.stop,
                     test=self.test)
        if self.test:
            return 'test mode', none
        self._append_log(d, command, result)
        stats = tuple(_statistics(result.stdout))
        if result.returncode in (0, 24):
            return 'ok', stats
        if self.stop.is_set():
            log.warning("Mirroring %s stopped (%s); see %s.", d.name, self.stop.reason,
                        self._log_file(d))
            return 'stopped', stats
        if result.returncode == 25:
            log.critical("Deletions in %s stopped at the bound of %d files (rsync status 25): "
                         "many files disappeared at NERSC. Nothing more was deleted; check "
                         "%s and, if the deletions are intended, run desi_tucson_transfer%s "
                         "--force-delete by hand. See %s.", copy, self.options.max_delete,
                         source, _flag(self.options), self._log_file(d))
            return 'deletion bound reached', stats
        log.critical("rsync of %s failed with status %d; see %s. The other directories "
                     "continue.", d.directory, result.returncode, self._log_file(d))
        return 'failed', stats

    def _source_state(self, d, source):
        """List `source` without recursion: ``'ok'``, ``'empty'``, ``'missing'``,
        or what went wrong."""
        command = [RSYNC, '--list-only', '--no-motd', f'--timeout={IO_TIMEOUT:d}'] + \
            self.transport + [source]
        result = run(command, timeout=LIST_TIMEOUT, ok=(0, 23, 24), stop=self.stop,
                     test=self.test, quiet=True)
        if self.test:
            return 'ok'
        if result.returncode not in (0, 24):
            self._append_log(d, command, result)
        entries = [line for line in result.stdout.splitlines()
                   if line.strip() and line.split(None, 4)[-1] != '.']
        if result.returncode in (0, 24):
            return 'ok' if entries else 'empty'
        if (result.returncode == 23 and not entries and
                'No such file or directory' in result.stderr):
            return 'missing'
        # The first messages say why ('@ERROR: auth failed on module desi'); the
        # last one only that rsync stopped.
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        why = [line.rstrip('.') for line in lines
               if line.startswith(('@ERROR', 'rsync:', 'ssh:'))]
        return '; '.join([f"rsync status {result.returncode:d}"] +
                         (why or [line.rstrip('.') for line in lines[-1:]])[:2])

    def _command(self, d):
        """The rsync command mirroring the :class:`Directory` `d`, with
        statistics, timeouts and the deletion bound; under ``nice`` unless `d`
        is a priority."""
        command = _rsync_command(self.source, self.destination, d, self.transport,
                                 checksum=self.options.checksum)
        extra = ['--stats', f'--timeout={IO_TIMEOUT:d}']
        if not self.options.force_delete:
            extra.append(f'--max-delete={self.options.max_delete:d}')
        at = command.index('--no-motd') + 1
        command[at:at] = extra
        if not d.priority:
            command = ['nice', '-n', str(self.run_kind.niceness)] + command
        return command

    def _append_log(self, d, command, result):
        """Append the command, its output and its status to the log of `d`."""
        if self.test:
            return
        path = self._log_file(d)
        try:
            if os.path.exists(path) and os.path.getsize(path) > LOG_SIZE:
                os.replace(path, path + '.1')
            with open(path, 'a') as f:
                f.write(f"# {stamp('America/Phoenix')}: {shlex.join(command)}\n")
                f.write(result.stdout)
                if result.stderr:
                    f.write("# Standard error:\n" + result.stderr)
                f.write(f"# Exit status {result.returncode:d}\n")
        except OSError as err:
            log.error("Could not write the log %s: %s.", path, err)


def main():
    """Entry point for :command:`desi_tucson_transfer`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`.
    """
    options = _options()
    # Alerts first, so that a missing setting reaches MAILTO if it can.
    _configure_log(options.debug or options.test, test=options.test)
    environment = _environment(options)
    if environment is None:
        return 1
    mirror = Mirror(options, environment)
    mirror.stop.handle_signals()
    return mirror.run()
