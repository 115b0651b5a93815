# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
==================
desitransfer.daily
==================

Entry point for :command:`desi_daily_transfer`.

Copy auxiliary directories from KPNO to NERSC.  Cron runs
``desi_daily_transfer morning`` early in the Arizona morning and
``desi_daily_transfer noon`` after noon; the directories of each run are
sections of the shipped ``desi_daily_transfer.ini`` (or of the file given with
``--configuration``).  Each directory keeps its own log, ``DESTINATION.log``.
The noon run removes its completion file before it starts and writes it again
when every directory has been tried: the Tucson mirror waits for that file.

No link at the mountain leads outside the directory it is in: a directory
keeps its links as links only if they point inside it (``--safe-links``), and
a directory whose links to directories are followed (``dirlinks``) follows
only those that resolve, at the mountain, inside it or under the directories
of its ``dirlinks_under`` (:func:`desitransfer.mountain.parse_links`).
"""
import configparser
import os
import re
import shlex
import sys
from argparse import ArgumentParser
from importlib.resources import files

from . import __version__ as dtVersion
from .alerts import alert_options, configure_log
from .common import log, stamp
from .executor import Actions, for_mode
from .processes import Stop
from .runner import Result
from .rsynccommand import RSYNC_IO_TIMEOUT, rsync_command
from .transport import SharedConnection, environment_ssh
from .configuration import ConfigurationError, absolute, get_value
from .mountain import (LINKS_ANSWER_LIMIT, LINKS_TOLD, link_copies, links_command,
                       parse_links, safe_path, shown)

#: Seconds before an rsync is killed.
RSYNC_TIMEOUT = 2 * 3600

#: Seconds before :command:`fix_permissions.sh` is killed.
PERMISSION_TIMEOUT = 3600

#: Seconds before the list of the links to directories of a directory is given up.
LIST_TIMEOUT = 300

#: The runs of a day.
TIMEFRAMES = ('morning', 'noon')

#: The completion file of the noon run, unless ``--completion`` says otherwise.
COMPLETION = os.path.join('$DESI_ROOT', 'spectro', 'staging', 'status', 'daily.txt')

#: Keys of a directory section of the configuration.
_keys = ('timeframe', 'source', 'destination', 'include', 'include_from', 'dirlinks',
         'dirlinks_under')


class DailyDirectory(object):
    """Simple object to hold daily transfer configuration.

    Parameters
    ----------
    source : :class:`str`
        Source directory.
    destination : :class:`str`
        Desitination directory.
    extra : :class:`list`, optional
        Extra :command:`rsync` arguments to splice into command.
    dirlinks : :class:`bool`, optional
        If ``True``, convert source links into linked directory: the links to
        directories that resolve, at the mountain, inside `source` (or under
        one of `dirlinks_under`) are copied as directories; no other link is
        copied.
    name : :class:`str`, optional
        Name of the directory in messages and in the completion file; by
        default the last component of `destination`.
    dirlinks_under : :class:`list`, optional
        With `dirlinks`, directories at the mountain under which the links
        may resolve, besides `source`.

    Attributes
    ----------
    ssh : :class:`list`
        The ssh command of :command:`rsync`; if ``None``,
        :func:`~desitransfer.transport.environment_ssh`.
    actions : :class:`~desitransfer.executor.Actions`
        What makes every change (runs rsync, writes the log, locks); in test
        mode a :class:`~desitransfer.executor.DryRun`, which logs what would
        run and changes nothing.  Its ``stop``, if set, stops a running command.
    problems : :class:`list`
        What went wrong after the copy (lock, permissions, the log itself).
    """

    def __init__(self, source, destination, extra=[], dirlinks=False, name=None,
                 dirlinks_under=()):
        self.source = source
        self.destination = destination
        self.log = self.destination + '.log'
        self.extra = list(extra)
        self.dirlinks = dirlinks
        self.dirlinks_under = list(dirlinks_under)
        self.name = name or os.path.basename(destination)
        self.ssh = None
        self.actions = Actions(None)
        self.problems = []

    def command(self):
        """The :command:`rsync` command of this directory.

        Returns
        -------
        :class:`list`
            :func:`~desitransfer.common.rsync` from the mountain, with `extra`
            right after ``--omit-dir-times``, through the ssh command.  It
            never follows a link: unless `dirlinks`, ``--links --safe-links``
            replace ``--copy-dirlinks`` (links pointing inside the directory
            are kept as links, the others left out); with `dirlinks`, no link
            is copied by this command (see :meth:`follow`).
        """
        return self._command(self.source, self.destination, self.extra,
                             [] if self.dirlinks else ['--links', '--safe-links'])

    def _command(self, source, destination, extra, links):
        # As the original's rsync command, with the links options and the
        # section's; one that receives nothing for 10 minutes gives up (exit
        # status 30).
        return rsync_command(['--verbose', '--recursive'] + list(links) +
                             ['--times', '--omit-dir-times'] + list(extra),
                             [f'dts:{source}/'], f'{destination}/',
                             ssh=self.ssh or environment_ssh(), io_timeout=RSYNC_IO_TIMEOUT)

    def _append(self, *texts):
        """Append `texts` to the log of this directory; a failure is a problem, not a crash."""
        try:
            with self.actions.open_append(self.log) as f:
                f.write(''.join(t if not t or t.endswith('\n') else t + '\n' for t in texts))
        except OSError as err:
            self._unlogged(err)

    def _unlogged(self, err):
        problem = f"log {self.log} not written ({err.strerror or err})"
        if problem not in self.problems:
            self.problems.append(problem)
            log.error("%s: could not write its log %s: %s.", self.name, self.log, err)

    def _rsync(self, command):
        """Run the rsync `command`; its listing goes to the log as it comes
        (a first copy of a large tree lists every file), its standard error
        after it."""
        try:
            f = self.actions.open_append(self.log, binary=True)
        except OSError as err:
            self._unlogged(err)
            f = None
        try:
            result = self.actions.run(command, timeout=RSYNC_TIMEOUT, quiet=True, output=f)
        except OSError as err:
            # Writing the listing failed (a full disk): rsync was stopped.
            self._unlogged(err)
            return Result(1, '', f"the log could not be written: {err}")
        finally:
            if f is not None:
                f.close()
        self._append(result.stderr)
        return result

    def transfer(self, permission=True):
        """Data transfer operations for a single destination directory.

        Parameters
        ----------
        permission : :class:`bool`, optional
            If ``True``, set permissions for DESI collaboration access.

        Returns
        -------
        :class:`int`
            The status returned by :command:`rsync` (-9 after a timeout, -15
            if stopped, 127 if :command:`rsync` could not be started).
        """
        self.problems = []
        command = self.command()
        self._append(f"DEBUG: desi_daily_transfer {dtVersion}",
                     f"DEBUG: {shlex.join(command)}",
                     f"DEBUG: Transfer start: {stamp()}")
        result = self._rsync(command)
        code = result.returncode
        if code == 0 and self.dirlinks:
            code = self.follow()
        self._append(f"DEBUG: Transfer complete: {stamp()}")
        if code != 0:
            self._append(f"ERROR: rsync exit status {code:d}; "
                         f"{self.destination} is not locked.")
            return code
        self.lock()
        if permission:
            self.permission()
        return 0

    def follow(self):
        """Copy, as directories, the links to directories under `source` that
        resolve inside it, or under one of `dirlinks_under`.

        The links are listed and resolved at the mountain in one round trip
        (:func:`desitransfer.mountain.parse_links`); each one followed
        is copied from its physical directory there, by an :command:`rsync`
        that follows no link (links in the same directory into the same
        directory, one rsync).  A link that is not followed is an ``ERROR:``
        line of the log and a problem of this directory.

        Returns
        -------
        :class:`int`
            0, or the status of the first :command:`rsync` that failed.
        """
        ssh = self.ssh or environment_ssh()
        listing = ssh + ['dts', shlex.join(links_command(self.source,
                                                         roots=self.dirlinks_under))]
        self._append(f"DEBUG: Listing the links to directories of {self.source} at the mountain")
        # A question, asked in test mode too: the links it finds are the rsyncs it would run.
        result = self.actions.ask(listing, timeout=LIST_TIMEOUT, ok=(0, 3), quiet=True,
                                  limit=LINKS_ANSWER_LIMIT)
        stop = self.actions.stop
        if stop is not None and stop.is_set():
            return result.returncode or -15
        links = parse_links(result, self.source, roots=self.dirlinks_under)
        if links.why:
            self._append(f"ERROR: No link followed: {links.why}")
            self.problems.append(f"no link followed ({links.why})")
            return 0
        refused = sorted(links.refused.items())
        self._append(*[f"ERROR: Link {shown(link)} not followed: {why}"
                       for link, why in refused[:LINKS_TOLD]])
        if len(refused) > LINKS_TOLD:
            self._append(f"ERROR: {len(refused) - LINKS_TOLD:d} more links not followed")
        if links.refused:
            first = min(links.refused)
            self.problems.append(f"{len(links.refused):d} link(s) not followed, the first "
                                 f"{shown(first)}: {links.refused[first]}")
        for directory, into, filters in link_copies(links.follow):
            destination = os.path.join(self.destination, into) if into else self.destination
            command = self._command(directory, destination, filters, [])
            self._append(f"DEBUG: {shlex.join(command)}")
            self.actions.makedirs(os.path.dirname(destination))
            result = self._rsync(command)
            if result.returncode != 0:
                return result.returncode
        return 0

    def lock(self):
        """Make a directory read-only.

        Directories become ``0o2750`` and files ``0o440``, only where the mode
        differs.  Symbolic links are never followed nor changed, wherever they
        point (nowhere, or outside the tree).

        Returns
        -------
        :class:`bool`
            ``True`` if every mode is now set.
        """
        failed = self.actions.lock_tree(self.destination)
        if failed:
            lines = [f"ERROR: {err.filename}: {err.strerror}" for err in failed]
            self._append(*lines, f"ERROR: Lock incomplete: {len(failed):d} path(s) "
                                 f"could not be locked: {stamp()}")
            self.problems.append(f"lock incomplete ({len(failed):d} path(s))")
            log.error("%s: %d path(s) in %s could not be locked, the first: %s: %s.",
                      self.name, len(failed), self.destination, failed[0].filename,
                      failed[0].strerror)
            return False
        self._append(f"DEBUG: Lock complete: {stamp()}")
        return True

    def permission(self):
        """Set permissions for DESI collaboration access.

        In theory this should not change any permissions set by
        :meth:`~DailyDirectory.lock`.

        Returns
        -------
        :class:`int`
            The status returned by :command:`fix_permissions.sh` (127 if it
            could not be started).
        """
        command = ['fix_permissions.sh', self.destination]
        self._append(f"DEBUG: {shlex.join(command)}")
        result = self.actions.run(command, timeout=PERMISSION_TIMEOUT, quiet=True)
        self._append(result.stdout, result.stderr)
        if result.returncode == 0:
            self._append(f"DEBUG: Permission reset complete: {stamp()}")
        else:
            self._append(f"ERROR: Permission reset failed: fix_permissions.sh exit status "
                         f"{result.returncode:d}: {stamp()}")
            self.problems.append(f"permission reset failed (fix_permissions.sh exit status "
                                 f"{result.returncode:d})")
        return result.returncode


def _desi_root(what):
    """:envvar:`DESI_ROOT`, or :exc:`ConfigurationError` saying what needs it."""
    root = os.environ.get('DESI_ROOT', '')
    if not root:
        raise ConfigurationError(f"{what} needs DESI_ROOT, which is not set")
    return root


def _destination(section, value):
    """Resolve a destination: absolute, or relative to :envvar:`DESI_ROOT` with
    its first component resolved through symbolic links."""
    parts = [p for p in value.split('/') if p]
    if not parts or '..' in parts:
        raise ConfigurationError(f"[{section}] destination = {value!r} is not valid: "
                                 "a path without '..' is required")
    if value.startswith('/'):
        return os.path.normpath(value)
    top = os.path.realpath(os.path.join(_desi_root(f"[{section}] destination"), parts[0]))
    return os.path.join(top, *parts[1:])


def _include_from(section, value):
    """Path of an include file: a bare name is shipped in desitransfer/data."""
    path = str(files('desitransfer') / 'data' / value) if '/' not in value else value
    if not os.path.isabs(path) or not os.path.isfile(path):
        raise ConfigurationError(f"[{section}] include_from = {value!r}: no such file "
                                 "(a bare name is a file in desitransfer/data)")
    return path


def _directory(parser, section):
    """The :class:`DailyDirectory` of one section."""
    if re.fullmatch(r'[A-Za-z0-9_.+-]+', section) is None:
        raise ConfigurationError(f"[{section}]: a name of letters, digits and _.+- is required")
    unknown = sorted(set(parser[section]) - set(_keys))
    if unknown:
        raise ConfigurationError(f"[{section}] {unknown[0]} is not a known key "
                                 f"({', '.join(_keys)})")
    timeframe = get_value(parser, section, 'timeframe')
    if timeframe not in TIMEFRAMES:
        raise ConfigurationError(f"[{section}] timeframe = {timeframe!r} is not morning or noon")
    source = get_value(parser, section, 'source', absolute)
    if source == '/':
        raise ConfigurationError(f"[{section}] source = '/' is not valid")
    destination = _destination(section, get_value(parser, section, 'destination'))
    extra = []
    for pattern in get_value(parser, section, 'include', default='').splitlines():
        if pattern.strip():
            extra += ['--include', pattern.strip()]
    include_from = get_value(parser, section, 'include_from', default='')
    if include_from:
        extra += ['--include-from', _include_from(section, include_from)]
    if extra:
        extra += ['--exclude', '*']
    try:
        dirlinks = parser.getboolean(section, 'dirlinks', fallback=False)
    except ValueError:
        raise ConfigurationError(f"[{section}] dirlinks = {parser[section]['dirlinks']!r} "
                                 "is not yes or no") from None
    if dirlinks and extra:
        # A link is followed by an rsync of its own, to which the patterns do not apply.
        raise ConfigurationError(f"[{section}] dirlinks = yes cannot be combined with "
                                 "include or include_from")
    under = get_value(parser, section, 'dirlinks_under', default='').split()
    for directory in under:
        if not safe_path(directory):
            raise ConfigurationError(f"[{section}] dirlinks_under: {directory!r} is not an "
                                     "absolute path of letters, digits and ._+-")
    if under and not dirlinks:
        raise ConfigurationError(f"[{section}] dirlinks_under needs dirlinks = yes")
    d = DailyDirectory(source, destination, extra=extra, dirlinks=dirlinks, name=section,
                       dirlinks_under=under)
    d.timeframe = timeframe
    return d


def read_configuration(filename=None):
    """Read and validate every directory of a daily transfer configuration.

    Parameters
    ----------
    filename : :class:`str`, optional
        An INI file; the shipped ``desi_daily_transfer.ini`` if not set.

    Returns
    -------
    :class:`list`
        :class:`DailyDirectory` objects, each with a `timeframe` attribute.

    Raises
    ------
    ~desitransfer.configuration.ConfigurationError
        One line naming the file, the section and the key.
    """
    if filename is None:
        filename = str(files('desitransfer') / 'data' / 'desi_daily_transfer.ini')
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    try:
        with open(filename) as f:
            parser.read_file(f, source=filename)
        directories = [_directory(parser, section) for section in parser.sections()]
        if not directories:
            raise ConfigurationError("no directory section")
        seen = {}
        for d in directories:
            if d.destination in seen:
                raise ConfigurationError(f"[{d.name}] destination {d.destination} is also "
                                         f"the destination of [{seen[d.destination]}]")
            seen[d.destination] = d.name
    except OSError as err:
        raise ConfigurationError(f"configuration file {filename} cannot be read: "
                                 f"{err.strerror}") from None
    except configparser.Error as err:
        raise ConfigurationError(f"configuration file {filename}: "
                                 f"{' '.join(str(err).split())}") from None
    except ConfigurationError as err:
        raise ConfigurationError(f"configuration file {filename}: {err}") from None
    return directories


def _config(timeframe, configuration=None):
    """Wrap configuration so that module can be imported without environment variables set.

    Parameters
    ----------
    timeframe : :class:`str`
        Return the set of directories associated with `timeframe`.
    configuration : :class:`str`, optional
        Configuration file; the shipped ``desi_daily_transfer.ini`` if not set.

    Returns
    -------
    :class:`list`
        A list of directories to transfer.

    Raises
    ------
    ValueError
        If `timeframe` is not ``'morning'`` or ``'noon'``.
    ~desitransfer.configuration.ConfigurationError
        If the configuration cannot be used (for example :envvar:`DESI_ROOT` is not set).
    """
    if timeframe not in TIMEFRAMES:
        raise ValueError(f"timeframe must be one of {', '.join(TIMEFRAMES)}, "
                         f"not {timeframe!r}")
    return [d for d in read_configuration(configuration) if d.timeframe == timeframe]


def _exit_status(code):
    """An exit status (1-255) for a failed return code of :func:`~desitransfer.runner.run`:
    a command killed by signal N (-N) gives 128 + N, as in a shell."""
    return 128 - code if code < 0 else min(code, 255)


class DailyTransfer(object):
    """One run of :command:`desi_daily_transfer`.

    Parameters
    ----------
    options : :class:`argparse.Namespace`
        The parsed command-line options.

    Raises
    ------
    ~desitransfer.configuration.ConfigurationError
        If the configuration cannot be used.
    ValueError
        If ``--only`` names no directory of the timeframe.
    """

    def __init__(self, options):
        self.options = options
        self.timeframe = options.timeframe
        self.directories = _config(options.timeframe, options.configuration)
        if options.only:
            names = [d.name for d in self.directories]
            if options.only not in names:
                raise ValueError(f"--only {options.only}: no such {self.timeframe} "
                                 f"directory; choose from {', '.join(names)}")
            self.directories = [d for d in self.directories if d.name == options.only]
        root = _desi_root('desi_daily_transfer')
        self.completion = options.completion
        if self.completion == COMPLETION:
            self.completion = os.path.join(root, *COMPLETION.split('/')[1:])
        self.lock_file = os.path.join(root, 'spectro', 'staging',
                                      f'desi_daily_transfer_{self.timeframe}.lock')
        self.stop = Stop(options.kill)
        self.actions = for_mode(options.test, self.stop)

    @property
    def signals_completion(self):
        """``True`` if this run removes and writes the completion file: a full noon run."""
        return self.timeframe == 'noon' and not self.options.only

    def run(self):
        """Check the kill file, take the lock, transfer every directory.

        Returns
        -------
        :class:`int`
            An exit status: 0, or the first failed status of :command:`rsync`
            (1 if only a later step failed).
        """
        if self.stop.is_set():
            log.info("%s exists: the %s transfer does nothing%s.", self.options.kill,
                     self.timeframe,
                     f" and leaves {self.completion} as it is" if self.signals_completion else '')
            return 0
        self.actions.start()
        try:
            lock, holder = self.actions.single_instance(self.lock_file)
        except OSError as err:
            log.critical("desi_daily_transfer cannot take its lock %s: %s; it does not start.",
                         self.lock_file, err)
            return 1
        if lock is None:
            log.error("Another desi_daily_transfer %s (pid %s) is still running (lock %s); "
                      "this one does nothing.", self.timeframe, holder, self.lock_file)
            return 1
        with lock:
            self.stop.handle_signals()
            return self._transfer()

    def _transfer(self):
        if self.signals_completion and not self._remove_completion():
            return 1
        connection = SharedConnection()
        try:
            results = [(d, self._one(d, connection)) for d in self.directories]
        finally:
            connection.close()
        status = self._report(results)
        if self.signals_completion and not self._write_completion(results):
            status = status or 1
        return status

    def _one(self, d, connection):
        """Transfer one directory: the status of :command:`rsync` (0 if an
        error stopped the transfer before it, see ``d.problems``), or ``None``
        if stopped before it started."""
        if self.stop.is_set():
            return None
        d.ssh, d.actions = connection.ssh(), self.actions
        try:
            code = d.transfer(permission=self.options.permission)
        except Exception as err:
            # A bug or an unforeseen error in one directory does not stop the others.
            # It is reported among the problems of the directory.
            log.error("%s: %s: %s.", d.name, type(err).__name__, err, exc_info=True)
            d.problems.append(f"{type(err).__name__}: {err}")
            return 0
        if code == 0 and not d.problems:
            log.info("%s: %s -> %s transferred.", d.name, d.source, d.destination)
        return code

    def _stopped(self, code):
        return code is None or (code == -15 and self.stop.is_set())

    def _describe(self, d, code):
        """What happened to one directory, for the completion file and the alert."""
        if code is None:
            return f"not transferred (stopped: {self.stop.reason})"
        if self._stopped(code):
            return f"stopped during the transfer ({self.stop.reason}); see {d.log}"
        if code == 0 and not d.problems:
            return "ok"
        what = ([f"rsync exit status {code:d}"] if code else []) + d.problems
        return f"failed: {'; '.join(what)}; see {d.log}"

    def _report(self, results):
        """Log the outcome, alert on failures; return the exit status."""
        failed = [(d, c) for d, c in results if not self._stopped(c) and
                  (c != 0 or d.problems)]
        stopped = [d.name for d, c in results if self._stopped(c)]
        if stopped:
            log.warning("Stopped (%s): %s not transferred completely.", self.stop.reason,
                        ', '.join(stopped))
        if failed:
            log.critical("desi_daily_transfer %s: %d of %d directories failed: %s.",
                         self.timeframe, len(failed), len(results),
                         ', '.join(f"{d.name} ({self._describe(d, c)})" for d, c in failed))
        for d, c in failed:
            if c != 0:
                return _exit_status(c)
        return 1 if failed else 0

    def _remove_completion(self):
        try:
            self.actions.remove_file(self.completion)
        except OSError as err:
            log.critical("Could not remove the completion file %s (%s); the noon transfer "
                         "does nothing.", self.completion, err)
            return False
        return True

    def _write_completion(self, results):
        lines = [stamp()] + [f"{d.name}: {self._describe(d, c)}" for d, c in results]
        try:
            written = self.actions.write_file(self.completion, '\n'.join(lines) + '\n')
        except OSError as err:
            log.critical("Could not write the completion file %s (%s); the Tucson mirror "
                         "waits for it.", self.completion, err)
            return False
        if written:
            log.info("Wrote %s.", self.completion)
        return True


def _options(args=None):
    """Parse command-line options for :command:`desi_daily_transfer`.

    Parameters
    ----------
    args : :class:`list`, optional
        Command-line arguments; ``sys.argv[1:]`` if not set.

    Returns
    -------
    :class:`argparse.Namespace`
        The parsed command-line options.
    """
    desc = "Transfer auxiliary DESI directories from KPNO to NERSC (run by cron)."
    prsr = ArgumentParser(prog=os.path.basename(sys.argv[0]), description=desc)
    prsr.add_argument('-c', '--completion', metavar='FILE', default=COMPLETION,
                      help="Signal completion of the noon transfer via FILE "
                           "(default %(default)s).")
    prsr.add_argument('--configuration', metavar='FILE',
                      help="Read the directories from FILE (default: the shipped "
                           "desi_daily_transfer.ini).")
    prsr.add_argument('-d', '--debug', action='store_true',
                      help="Set log level to DEBUG.")
    prsr.add_argument('-k', '--kill', metavar='FILE',
                      default=os.path.expanduser(os.path.join('~', 'stop_desi_transfer')),
                      help="Exit the script when FILE is detected (default %(default)s).")
    prsr.add_argument('--only', metavar='NAME',
                      help="Transfer only the directory NAME of this timeframe "
                           "(the completion file is left alone).")
    prsr.add_argument('-P', '--no-permission', action='store_false', dest='permission',
                      help="Do not set permissions for DESI collaboration access.")
    prsr.add_argument('-t', '--test', action='store_true',
                      help="Test mode: log what would run and change nothing.")
    alert_options(prsr)
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    prsr.add_argument('timeframe', choices=TIMEFRAMES,
                      help="Run the transfers of this time of day.")
    return prsr.parse_args(args)


def main():
    """Entry point for :command:`desi_daily_transfer`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`.
    """
    options = _options()
    configure_log(debug=options.debug, to=[] if options.test else options.alert_to,
                  mailhost=options.smtp, program='desi_daily_transfer')
    try:
        transfer = DailyTransfer(options)
    except ConfigurationError as err:
        log.critical("desi_daily_transfer %s cannot start: %s.", options.timeframe, err)
        return 1
    except ValueError as err:
        log.error("%s.", err)
        return 2
    return transfer.run()
