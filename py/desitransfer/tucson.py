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
import functools
import os
import re
import sys
from argparse import ArgumentParser, ArgumentTypeError
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import requests

from . import __version__ as dtVersion
from . import common, mirror, web
from .alerts import AlertHandler, configure_log
from .common import MST, log
from .processes import original_running, single_instance
from .text import interval
from .mirror import IO_TIMEOUT, MAX_DELETE, REMOTE_ROOT, RSYNC

#: The ssh program of ``--hwtables`` unless :envvar:`RSYNC_RSH` names one:
#: the key ``~/.ssh/nersc``, and no other.
HWTABLES_SSH = ('ssh', '-i', os.path.join('~', '.ssh', 'nersc'), '-o', 'IdentitiesOnly=yes')

#: Niceness added to the rsync of directories that are not a priority.
NICENESS = 5

#: The same in the catch-up: that of a plain ``nice``.
CATCHUP_NICENESS = 10

#: Connect and read timeouts of a request to :envvar:`DESISYNC_STATUS_URL`.
STATUS_TIMEOUT = (10, 60)

#: Seconds one request to :envvar:`DESISYNC_STATUS_URL` may take in all:
#: connection, status line, headers, redirects and body.
STATUS_DEADLINE = 120

#: How long to wait for :envvar:`DESISYNC_STATUS_URL` to answer 200.
WAIT_LIMIT = timedelta(hours=12)

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

#: The lock of this process, kept open while it runs (see :func:`running`).
_lock = None

#: What the environment may hold, checked before it reaches a command line.
_formats = {'DESISYNC_HOSTNAME': (mirror.HOSTNAME, 'a host, user@host or host:port'),
            'NERSC_USER': (re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.-]*'), 'a user name'),
            'NERSC_HOST': (re.compile(r'[A-Za-z0-9][A-Za-z0-9.-]*'), 'a host name'),
            'DESISYNC_ROOT': (re.compile(r'/[A-Za-z0-9_./+-]*'), 'an absolute path'),
            'MAILFROM': (re.compile(r'[^@\s<>,"]+@[^@\s<>,"]+'), 'an email address'),
            'MAILTO': (re.compile(r'[^@\s<>,"]+@[^@\s<>,"]+(?:[,\s]+[^@\s<>,"]+@[^@\s<>,"]+)*'),
                       'comma-separated email addresses'),
            'MAILHOST': (re.compile(r'[A-Za-z0-9][A-Za-z0-9.-]*(?::[0-9]{1,5})?'),
                         'host or host:port')}


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
    directories = []
    for name, section, where in mirror.read_table(text, source, 'desi_tucson_transfer.ini'):
        directory = section.get('directory', name).strip()
        if not mirror.relative(directory):
            raise ValueError(f"{where}: not a directory relative to the top of the tree")
        mirror.check_keys(section, ('set', 'directory', 'priority', 'catchup', 'years',
                                    'filter'), where)
        if section.get('set') not in SETS:
            raise ValueError(f"{where} set: {', '.join(SETS[:-1])} or {SETS[-1]}, "
                             f"not {section.get('set')!r}")
        flags = mirror.flags(section, ('priority', 'catchup'), where)
        if flags['catchup'] and section['set'] == 'hwtables':
            raise ValueError(f"{where} catchup: the catch-up mirrors dynamic or static "
                             "directories, not a hwtables one")
        years = section.get('years')
        if years is not None:
            if re.fullmatch(r'[0-9]{4}', years) is None:
                raise ValueError(f"{where} years: a year YYYY, not {years!r}")
            years = int(years)
        filters = mirror.filter_rules(section.get('filter', ''), f"{where} filter")
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


def _transport(run='daily'):
    """rsync options of the connection of `run` (a key of :data:`RUNS`).

    The daily run and the catch-up use the ssh program of :envvar:`RSYNC_RSH`,
    or else the password file of the rsync daemon, ``~/.desi``; ``hwtables``
    always uses ssh: :envvar:`RSYNC_RSH` or else :data:`HWTABLES_SSH`
    (see :func:`desitransfer.mirror.transport`).
    """
    if run == 'hwtables' and not mirror.ssh_form():
        return mirror.transport([os.path.expanduser(a) for a in HWTABLES_SSH])
    return mirror.transport()


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
    try:
        lock, holder = single_instance(pid_file)
    except OSError as err:
        log.critical("Cannot take the lock %s: %s; exiting.", pid_file, err)
        return True
    if lock is None:
        log.critical("Another desi_tucson_transfer (pid %s) is running (lock %s); exiting.",
                     holder, pid_file)
        return True
    if original_running('desi_tucson_transfer'):
        lock.close()
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
    mirror.force_delete_option(prsr)
    mirror.log_option(prsr)
    prsr.add_argument('-m', '--max-delete', metavar='N', type=mirror.count, default=MAX_DELETE,
                      dest='max_delete',
                      help="Let each rsync delete at most N files (default %(default)s).")
    mirror.processes_option(prsr)
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
    mirror.test_mode_option(prsr)
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    options = prsr.parse_args(args)
    try:
        known = {name for d in _table() for name in (d.name, d.directory)}
    except ValueError as err:
        prsr.error(str(err))
    mirror.check_exclusions(prsr, options, known)
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
    try:
        transport = _transport(options.run)
    except ValueError as err:
        log.critical("RSYNC_RSH is not a command: %s. Nothing was mirrored.", err)
        return None
    if options.run == 'hwtables':
        source = f"{_environ('NERSC_USER')}@{_environ('NERSC_HOST')}:{root}"
    else:
        source = mirror.nersc_source(_environ('DESISYNC_HOSTNAME'), root)
    return {'source': source, 'destination': os.path.abspath(destination),
            'status_url': url if run.wait else None, 'transport': transport}


def _flag(options):
    """The option choosing the run of `options`, as typed (``''`` for the daily run)."""
    return '' if options.run == 'daily' else f' --{options.run}'


class Mirror(mirror.BaseMirror):
    """Mirror the directories chosen by `options`.

    Parameters
    ----------
    options : :class:`argparse.Namespace`
        The parsed command-line options.
    environment : :class:`dict`
        What :func:`_environment` returns.
    """

    program = 'desi_tucson_transfer'

    def __init__(self, options, environment):
        super().__init__(options, environment)
        self.status_url = environment['status_url']
        self.transport = self.transport or _transport(options.run)
        self.run_kind = RUNS[options.run]
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
        # Alerts about the log directory itself are emailed as set up by main().
        if not self._make_log_directory():
            return 1
        _configure_log(self.options.debug or self.options.test, self.options.log,
                       self.options.test)
        self.actions.start()
        # Test mode takes no lock, and runs beside anything.
        if not self.actions.test and running(os.path.join(self.options.log,
                                                          self.run_kind.lock)):
            return 1
        if self.run_kind.wait:
            if not self.actions.wait(f"{self.status_url} answers 200", self._wait_for_nersc):
                return 1
        else:
            log.info("desi_tucson_transfer%s: mirroring %s from %s now, without waiting for "
                     "the daily transfer at NERSC.", _flag(self.options),
                     ', '.join(d.directory for d in self.directories), self.source)
        return self._report(self.mirror())

    def _wait_for_nersc(self):
        """Wait until :envvar:`DESISYNC_STATUS_URL` answers 200 (the daily
        transfer at NERSC is finished), at most :data:`WAIT_LIMIT`; each
        request takes at most :data:`STATUS_DEADLINE`."""
        deadline = common._utcnow() + WAIT_LIMIT
        while True:
            answer = self._status()
            if answer is None:
                log.info("%s answers 200: the daily transfer is finished.", self.status_url)
                return True
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

    def _status(self):
        """Ask :envvar:`DESISYNC_STATUS_URL` once, within :data:`STATUS_TIMEOUT`
        and :data:`STATUS_DEADLINE`: ``None`` if it answers 200, else what it
        answered (or why it did not)."""
        late = f"not complete after {STATUS_DEADLINE:g} s; abandoned"
        limit = web.Deadline(STATUS_DEADLINE)
        try:
            with limit, web.session() as session:
                with session.get(self.status_url, timeout=STATUS_TIMEOUT, stream=True) as r:
                    code = r.status_code
        except requests.RequestException as err:
            return late if limit.expired else str(err)
        if limit.expired:
            return late
        return None if code == 200 else f"HTTP status {code:d}"

    def mirror(self):
        """Mirror every directory, priority ones first, up to ``--processes`` at once.

        Returns
        -------
        :class:`list`
            An :class:`~desitransfer.mirror.Outcome` for every directory, in the
            order of the table.
        """
        todo = [d for d in self.directories if d.priority] + \
               [d for d in self.directories if not d.priority]
        with ThreadPoolExecutor(max_workers=self.options.nproc) as pool:
            done = {o.directory: o for o in pool.map(self._mirror, todo)}
        return [done[d.name] for d in self.directories]

    def _path(self, d):
        """The directory of the :class:`Directory` `d`, which may differ from its name."""
        return d.directory

    def _prepare(self, d, copy):
        """Nothing to do before the rsync of `d`: its command."""
        return None, self._command(d)

    def _again(self):
        """The run to repeat with ``--force-delete``, as typed."""
        return f'desi_tucson_transfer{_flag(self.options)}'

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
    transfer = Mirror(options, environment)
    transfer.stop.handle_signals()
    return transfer.run()
