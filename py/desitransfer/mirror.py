# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===================
desitransfer.mirror
===================

What the mirrors of the DESI tree at NERSC have in common:
:command:`desi_tucson_transfer` (:mod:`desitransfer.tucson`) and
:command:`desi_utah_transfer` (:mod:`desitransfer.utah`) each mirror the
directories of a shipped table with parallel :command:`rsync`, from the
rsync daemon at NERSC or over ssh.

This module reads the common parts of such a table, builds the connection
options and the source, declares the options both commands take, and runs
the mirror of one directory (:class:`BaseMirror`): list the source without
recursion, refuse a source that is empty or missing while its copy holds
data, run :command:`rsync`, append its output to the directory's log, and
say what became of the directory.  Each command says what differs: its
table, its rsync command and what must be done before it.
"""
import configparser
import contextlib
import os
import re
import shlex
import time
from argparse import ArgumentTypeError
from collections import namedtuple
from importlib.resources import files

from .common import log, stamp
from .executor import for_mode
from .processes import Stop
from .rsynccommand import RSYNC_DONE
from .transport import ssh_command

#: The rsync program.
RSYNC = '/usr/bin/rsync'

#: The DESI tree at NERSC, the source of the ssh form (:envvar:`RSYNC_RSH` set).
REMOTE_ROOT = '/global/cfs/cdirs/desi'

#: Most rsync commands running at once.
MAX_PROCESSES = 10

#: Default bound on the files (and directories) one rsync may delete.
MAX_DELETE = 10000

#: Seconds before an rsync mirroring a directory is killed.
RSYNC_TIMEOUT = 20 * 3600

#: Seconds before an rsync listing a source directory is killed.
LIST_TIMEOUT = 600

#: Seconds without any data after which rsync gives up (its ``--timeout``).
IO_TIMEOUT = 1800

#: A per-directory log larger than this is renamed ``.1`` before the next run.
LOG_SIZE = 100 * 2**20

#: What became of one directory: status, seconds, regular files transferred,
#: bytes transferred, files deleted, and the directory's rsync log.
Outcome = namedtuple('Outcome', ['directory', 'status', 'seconds', 'files', 'bytes',
                                 'deleted', 'log'])

#: The status of a directory that did not fail.
SUCCESS = ('ok', 'excluded', 'test mode')

_stats = {'files': re.compile(r'^Number of regular files transferred: ([0-9,]+)', re.M),
          'bytes': re.compile(r'^Total transferred file size: ([0-9,]+)', re.M),
          'deleted': re.compile(r'^Number of deleted files: ([0-9,]+)', re.M)}


# ----------------------------------------------------------------------
# The table of directories.
# ----------------------------------------------------------------------
def relative(name):
    """``True`` if `name` is a directory relative to the top of the tree."""
    return not (any(p in ('', '.', '..') for p in name.split('/')) or re.search(r'\s', name))


def read_table(text, source, shipped):
    """The sections of a table of mirrored directories, each named by a
    directory relative to the top of the tree.

    Parameters
    ----------
    text : :class:`str` or ``None``
        The table, in the INI format; the shipped file if ``None``.
    source : :class:`str`
        Name of the table in error messages.
    shipped : :class:`str`
        The name of the shipped table, in the package data.

    Returns
    -------
    :class:`list`
        ``(name, section, where)`` for each section, in the order of the
        table: its name, its keys (a :class:`configparser.SectionProxy`)
        and ``SOURCE [NAME]``, for error messages.

    Raises
    ------
    ValueError
        If the table is malformed, or a section is not named by a relative
        directory; the message names the section.
    """
    if text is None:
        text = (files('desitransfer') / 'data' / shipped).read_text()
    parser = configparser.ConfigParser(interpolation=None, default_section='\0')
    parser.optionxform = str
    try:
        parser.read_string(text, source=source)
    except configparser.Error as err:
        raise ValueError(str(err)) from None
    sections = []
    for name in parser.sections():
        where = f"{source} [{name}]"
        if not relative(name):
            raise ValueError(f"{where}: not a directory relative to the top of the tree")
        sections.append((name, parser[name], where))
    return sections


def check_keys(section, known, where):
    """Raise :exc:`ValueError` naming the keys of `section` not in `known`."""
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")


def flags(section, keys, where):
    """The yes-or-no `keys` of `section` (``False`` if missing), by key.

    Raises
    ------
    ValueError
        If one is neither yes nor no; the message names it.
    """
    found = {}
    for key in keys:
        try:
            found[key] = section.getboolean(key, fallback=False)
        except ValueError:
            raise ValueError(f"{where} {key}: yes or no, not {section[key]!r}") from None
    return found


def filter_rules(lines, where):
    """rsync arguments of filter `lines`, ``include PATTERN`` or ``exclude PATTERN``.

    Raises
    ------
    ValueError
        If a line is another rule or has no pattern; the message (which
        starts with `where`) names the line.
    """
    args = []
    for line in lines.splitlines():
        rule, _, pattern = line.strip().partition(' ')
        if not rule:
            continue
        if rule not in ('include', 'exclude') or not pattern.strip():
            raise ValueError(f"{where}: 'include PATTERN' or 'exclude PATTERN', "
                             f"not {line.strip()!r}")
        args += [f'--{rule}', pattern.strip()]
    return args


# ----------------------------------------------------------------------
# Options and the connection to NERSC.
# ----------------------------------------------------------------------
def count(value):
    """A number of files, 0 or more (argument type)."""
    if re.fullmatch(r'[0-9]+', value.strip()) is None:
        raise ArgumentTypeError(f"{value!r} is not a number of files")
    return int(value)


def processes(value):
    """A number of rsync commands at once, 1 to :data:`MAX_PROCESSES` (argument type)."""
    if re.fullmatch(r'[0-9]+', value.strip()) is None or not 1 <= int(value) <= MAX_PROCESSES:
        raise ArgumentTypeError(f"{value!r}: from 1 to {MAX_PROCESSES:d} rsync commands at once")
    return int(value)


def force_delete_option(parser):
    """Add ``--force-delete`` to the :class:`argparse.ArgumentParser` `parser`."""
    parser.add_argument('--force-delete', action='store_true', dest='force_delete',
                        help="Lift the bound on deletions for this run (by hand, after "
                             "checking that the deletions are intended).")


def log_option(parser):
    """Add ``-l, --log DIR`` to the :class:`argparse.ArgumentParser` `parser`."""
    parser.add_argument('-l', '--log', metavar='DIR',
                        default=os.path.join(os.path.expanduser('~'), 'Documents', 'Logfiles'),
                        help="Write log files, one per directory, in DIR, created if missing "
                             "(default %(default)s).")


def processes_option(parser):
    """Add ``-p, --processes N`` (``nproc``) to the :class:`argparse.ArgumentParser` `parser`."""
    parser.add_argument('-p', '--processes', metavar='N', type=processes,
                        default=MAX_PROCESSES, dest='nproc',
                        help=f"Run up to N rsync commands at once, at most {MAX_PROCESSES:d} "
                             "(default %(default)s).")


def test_mode_option(parser):
    """Add ``-t, --test`` to the :class:`argparse.ArgumentParser` `parser`."""
    parser.add_argument('-t', '--test', action='store_true',
                        help="Test mode: log every command, run none, change nothing. "
                             "Implies -d.")


def check_exclusions(parser, options, known):
    """Remove the trailing ``/`` of the directories of ``-e, --exclude`` in
    `options`; exit with a usage error of `parser` if one is not in `known`."""
    options.exclude = [e.strip('/') for e in options.exclude]
    unknown = [e for e in options.exclude if e not in known]
    if unknown:
        parser.error(f"argument -e/--exclude: not a mirrored directory: {', '.join(unknown)}")


def ssh_form():
    """``True`` if :envvar:`RSYNC_RSH` asks for the ssh form."""
    return bool(os.environ.get('RSYNC_RSH', '').strip())


def transport(ssh=None):
    """rsync options of the connection to NERSC.

    Parameters
    ----------
    ssh : :class:`list`, optional
        An ssh program and its options; if not set, that of
        :envvar:`RSYNC_RSH`, if set.

    Returns
    -------
    :class:`list`
        ``--rsh`` with the ssh program, to which the options of
        :func:`~desitransfer.transport.ssh_command` are added so that it never
        waits for a password or a dead connection; without one, the
        password file of the rsync daemon, ``~/.desi``.

    Raises
    ------
    ValueError
        If :envvar:`RSYNC_RSH` is not a command (unbalanced quotes).
    """
    if ssh is None and ssh_form():
        ssh = shlex.split(os.environ['RSYNC_RSH'].strip())
    if ssh:
        return ['--rsh=' + shlex.join(ssh_command(ssh))]
    return ['--password-file', os.path.expanduser(os.path.join('~', '.desi'))]


#: :envvar:`DESISYNC_HOSTNAME`: ``HOST``, ``USER@HOST`` or ``HOST:PORT``,
#: neither part starting with ``-`` (rsync would read it as an option).
HOSTNAME = re.compile(r'(?:[A-Za-z0-9_][A-Za-z0-9_.+-]*@)?[A-Za-z0-9][A-Za-z0-9.-]*'
                      r'(?::[0-9]{1,5})?')


def nersc_source(host, root):
    """The rsync address of the DESI tree at NERSC: ``HOST:ROOT`` in the ssh
    form (see :func:`ssh_form`), else the module ``desi`` of the rsync daemon
    of `host`."""
    return f"{host}:{root}" if ssh_form() else f"rsync://{host}/desi"


# ----------------------------------------------------------------------
# The mirror of one directory.
# ----------------------------------------------------------------------
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


class BaseMirror(object):
    """Mirror directories from NERSC, each as :meth:`_mirror` says.

    The ``Mirror`` of a command sets :attr:`program` (and the other class
    attributes where it differs), chooses its directories and runs each
    through :meth:`_mirror` (in threads, in its own order), and gives
    :meth:`_prepare`: what must come before the rsync of a directory, and
    that rsync command.

    Parameters
    ----------
    options : :class:`argparse.Namespace`
        The parsed command-line options; used here: ``test``, ``log``,
        ``exclude``, and ``max_delete`` unless :meth:`_max_delete` is replaced.
    environment : :class:`dict`
        ``source`` (the tree at NERSC, as rsync names it), ``destination``
        (the top of the copy) and ``transport`` (the connection options of
        rsync).
    """

    #: The name of the command, in logs, alerts and file names.
    program = None

    #: The time zone of the time stamps in the per-directory logs.
    zone = 'America/Phoenix'

    #: Whether the per-directory log says how long each rsync took.
    timed_log = False

    #: Why the deletions of one rsync may reach the bound, in the alert.
    deletions = "many files disappeared at NERSC"

    def __init__(self, options, environment):
        self.options = options
        self.source = environment['source']
        self.destination = environment['destination']
        self.transport = environment.get('transport')
        self.stop = Stop()
        self.actions = for_mode(options.test, self.stop, ask=False)

    def _path(self, d):
        """The directory `d` mirrors, relative to the top of the tree."""
        return d.name

    def _log_file(self, d):
        """The log of the rsync commands of `d`."""
        return os.path.join(self.options.log,
                            f'{self.program}_' + d.name.replace('/', '_') + '.log')

    def _make_log_directory(self):
        """Create the log directory if needed: ``False``, after an alert, if it cannot be."""
        try:
            self.actions.makedirs(self.options.log)
        except OSError as err:
            log.critical("Cannot create the log directory %s: %s. Nothing was mirrored.",
                         self.options.log, err)
            return False
        return True

    def _report(self, outcomes):
        """Log one line for each of the :class:`Outcome` `outcomes`.

        Returns
        -------
        :class:`int`
            0 if every directory was mirrored (or excluded), 1 otherwise.
        """
        for o in outcomes:
            log.info("%s: %s in %.1f s; %d files, %d bytes transferred, %d deleted%s.",
                     o.directory, o.status, o.seconds, o.files, o.bytes, o.deleted,
                     '' if o.status in SUCCESS else f'; see {o.log}')
        return 0 if all(o.status in SUCCESS for o in outcomes) else 1

    def _mirror(self, d):
        """Mirror one directory; never raises, so that the others finish.

        Returns
        -------
        :class:`Outcome`
            What became of `d`.
        """
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
        """Mirror `d`: check the source, prepare, run rsync, say what happened.

        Returns
        -------
        :class:`tuple`
            The status and the statistics (files, bytes, deleted).
        """
        none = (0, 0, 0)
        path = self._path(d)
        if d.name in self.options.exclude or path in self.options.exclude:
            log.warning("%s skipped at user request.", d.name)
            return 'excluded', none
        if self.stop.is_set():
            return 'stopped', none
        source = f'{self.source}/{path}/'
        copy = os.path.join(self.destination, path)
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
        status, command = self._prepare(d, copy)
        if status is not None:
            return status, none
        self.actions.makedirs(copy)
        t0 = time.monotonic()
        # rsync --verbose of a first mirror lists every file: its output goes
        # to the log as it comes; the result keeps its tail, with --stats.
        with self._open_log(d, command) as output:
            result = self.actions.run(command, timeout=RSYNC_TIMEOUT, ok=RSYNC_DONE,
                                      output=output)
            self._close_log(d, output, result,
                            time.monotonic() - t0 if self.timed_log else None)
        if self.actions.test:
            return 'test mode', none
        stats = tuple(_statistics(result.stdout))
        if result.returncode in RSYNC_DONE:
            return 'ok', stats
        if self.stop.is_set():
            log.warning("Mirroring %s stopped (%s); see %s.", d.name, self.stop.reason,
                        self._log_file(d))
            return 'stopped', stats
        if result.returncode == 25:
            log.critical("Deletions in %s stopped at the bound of %d files (rsync status 25): "
                         "%s. Nothing more was deleted; check %s and, if the deletions are "
                         "intended, run %s --force-delete by hand. See %s.", copy,
                         self._max_delete(d), self.deletions, source, self._again(),
                         self._log_file(d))
            return 'deletion bound reached', stats
        log.critical("rsync of %s failed with status %d; see %s. The other directories "
                     "continue.", path, result.returncode, self._log_file(d))
        return 'failed', stats

    def _prepare(self, d, copy):
        """Do what must come before the rsync of `d` into `copy`.

        Returns
        -------
        :class:`tuple`
            ``(None, command)``, the rsync command mirroring `d`, or
            ``(status, None)`` if `d` cannot be mirrored this time.
        """
        raise NotImplementedError

    def _max_delete(self, d):
        """The bound on the deletions of `d`."""
        return self.options.max_delete

    def _again(self):
        """The command to run again by hand with ``--force-delete``."""
        return self.program

    def _source_state(self, d, source):
        """List `source` without recursion: ``'ok'``, ``'empty'``, ``'missing'``,
        or what went wrong."""
        command = [RSYNC, '--list-only', '--no-motd', f'--timeout={IO_TIMEOUT:d}'] + \
            self.transport + [source]
        result = self.actions.ask(command, timeout=LIST_TIMEOUT, ok=(0, 23, 24), quiet=True)
        if result is None:
            # Not asked (test mode): nothing is known against mirroring it.
            return 'ok'
        if result.returncode not in RSYNC_DONE:
            self._append_log(d, command, result)
        entries = [line for line in result.stdout.splitlines()
                   if line.strip() and line.split(None, 4)[-1] != '.']
        if result.returncode in RSYNC_DONE:
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

    def _append_log(self, d, command, result, seconds=None):
        """Append the command, its output, its status and, if given, its
        duration in `seconds` to the log of `d`."""
        with self._open_log(d, command) as f:
            if f is not None:
                self._write_log(d, f, result.stdout.encode(errors='replace'))
            self._close_log(d, f, result, seconds)

    @contextlib.contextmanager
    def _open_log(self, d, command):
        """The log of `d` (rotated when large), open for appending bytes and
        headed by `command`; ``None`` if it cannot be written (said once)."""
        path = self._log_file(d)
        f = None
        try:
            f = self.actions.open_append(path, binary=True, rotate=LOG_SIZE)
            f.write(f"# {stamp(self.zone)}: {shlex.join(command)}\n".encode(errors='replace'))
            f.flush()
        except OSError as err:
            log.error("Could not write the log %s: %s.", path, err)
            if f is not None:
                f.close()
            f = None
        try:
            yield f
        finally:
            if f is not None:
                f.close()

    def _write_log(self, d, f, data):
        try:
            f.write(data)
            f.flush()
        except OSError as err:
            log.error("Could not write the log %s: %s.", self._log_file(d), err)

    def _close_log(self, d, f, result, seconds=None):
        """End the entry of `result` in the log `f` of `d`: its standard error,
        its status and, if given, its duration in `seconds`."""
        if f is None:
            return
        took = '' if seconds is None else f" after {seconds:.1f} s"
        text = ("# Standard error:\n" + result.stderr if result.stderr else '') + \
            f"# Exit status {result.returncode:d}{took}\n"
        self._write_log(d, f, text.encode(errors='replace'))
