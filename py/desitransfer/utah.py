# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=================
desitransfer.utah
=================

Entry point for :command:`desi_utah_transfer`.

Mirror the daily DESI reductions and the GFA data from NERSC to the
University of Utah with parallel :command:`rsync`, run by cron.  The
directories, and the filters of each, are listed in the shipped file
``desi_utah_transfer.ini``: three directories keep only the last 30 nights,
``tiles/cumulative`` only the paths listed in a file published at NERSC.
The generated lists go to a private temporary directory, removed at the end.

The mirror must never wipe itself: a directory that is empty or missing at
NERSC while its copy holds data is refused, so is an empty or unreadable list
of paths, and each :command:`rsync` deletes at most ``--max-delete`` files
unless ``--force-delete`` is given.
"""
import configparser
import datetime as dt
import functools
import os
import re
import shlex
import shutil
import stat
import sys
import tempfile
import time
from argparse import ArgumentParser, ArgumentTypeError
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files

import requests
import urllib3

from . import __version__ as dtVersion
from . import common
from .common import (MST, Stop, alert_options, configure_log, environment_ssh, log, run,
                     single_instance, stamp)

#: The name of the command, in logs, alerts and file names.
PROGRAM = 'desi_utah_transfer'

#: The rsync program.
RSYNC = '/usr/bin/rsync'

#: The DESI tree at NERSC, the source of the ssh form (:envvar:`RSYNC_RSH` set).
REMOTE_ROOT = '/global/cfs/cdirs/desi'

#: The directory left out by ``-A, --no-archive``.
ARCHIVE = 'spectro/redux/daily/tiles/archive'

#: Most rsync commands running at once.
MAX_PROCESSES = 10

#: Niceness of the rsync of a directory marked ``nice`` (that of a bare ``nice``).
NICENESS = 10

#: Default bound on the files (and directories) one rsync may delete, unless
#: the table gives another.
MAX_DELETE = 10000

#: Seconds before an rsync mirroring a directory is killed.
RSYNC_TIMEOUT = 20 * 3600

#: Seconds before an rsync listing a source directory is killed.
LIST_TIMEOUT = 600

#: Seconds without any data after which rsync gives up (its ``--timeout``).
IO_TIMEOUT = 1800

#: Connect and read timeouts of the request for a list of paths.
HTTP_TIMEOUT = (10, 60)

#: Seconds the download of a list of paths may take in all.
HTTP_DEADLINE = 600

#: Most bytes of a list of paths.
LIST_LIMIT = 64 * 2**20

#: A per-directory log larger than this is renamed ``.1`` before the next run.
LOG_SIZE = 100 * 2**20

#: The time zone of the time stamps in the per-directory logs.
ZONE = 'America/Denver'

#: A mirrored directory: its name relative to the top of the tree, whether it
#: runs under ``nice``, the number of nights kept (0: no window), the rules
#: repeated for each night, the other rsync filter arguments, whether what is
#: filtered out is deleted at Utah, the environment variable holding the URL
#: of its list of paths, whether user write permission is added first, and
#: its bound on deletions.
Directory = namedtuple('Directory', ['name', 'nice', 'nights', 'night_filter', 'filters',
                                     'delete_excluded', 'files_from', 'user_write',
                                     'max_delete'])

#: What became of one directory: status, seconds, regular files transferred,
#: bytes transferred, files deleted, and the directory's rsync log.
Outcome = namedtuple('Outcome', ['directory', 'status', 'seconds', 'files', 'bytes',
                                 'deleted', 'log'])

#: The status of a directory that did not fail.
SUCCESS = ('ok', 'excluded', 'test mode')

_keys = {'nice', 'nights', 'night_filter', 'filter', 'delete_excluded', 'files_from',
         'user_write', 'max_delete'}

#: A component of a path in a list of paths (``.`` and ``..`` are refused apart).
_component = re.compile(r'[A-Za-z0-9_.+=,@-]+')

_stats = {'files': re.compile(r'^Number of regular files transferred: ([0-9,]+)', re.M),
          'bytes': re.compile(r'^Total transferred file size: ([0-9,]+)', re.M),
          'deleted': re.compile(r'^Number of deleted files: ([0-9,]+)', re.M)}


def _rules(lines, where):
    """rsync arguments of filter `lines`, ``include PATTERN`` or ``exclude PATTERN``."""
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


def read_directories(text=None, source='desi_utah_transfer.ini'):
    """Read the table of mirrored directories.

    Parameters
    ----------
    text : :class:`str`, optional
        The table, in the format of the shipped ``desi_utah_transfer.ini``,
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
        text = (files('desitransfer') / 'data' / 'desi_utah_transfer.ini').read_text()
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
        if any(p in ('', '.', '..') for p in name.split('/')) or re.search(r'\s', name):
            raise ValueError(f"{where}: not a directory relative to the top of the tree")
        unknown = sorted(set(section) - _keys)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
        flags = {}
        for key in ('nice', 'delete_excluded', 'user_write'):
            try:
                flags[key] = section.getboolean(key, fallback=False)
            except ValueError:
                raise ValueError(f"{where} {key}: yes or no, not {section[key]!r}") from None
        nights = section.get('nights', '0')
        if re.fullmatch(r'[0-9]{1,3}', nights) is None or not int(nights) <= 366:
            raise ValueError(f"{where} nights: a number of nights up to 366, not {nights!r}")
        night_filter = _rules(section.get('night_filter', ''), f"{where} night_filter")
        if int(nights) and (not night_filter or '--exclude' in night_filter or
                            not all('NIGHT' in p for p in night_filter[1::2])):
            raise ValueError(f"{where} night_filter: 'include PATTERN' rules with NIGHT in "
                             "each pattern are needed with nights")
        if night_filter and not int(nights):
            raise ValueError(f"{where} night_filter: only with nights")
        files_from = section.get('files_from')
        if files_from is not None and re.fullmatch(r'[A-Z_][A-Z0-9_]*', files_from) is None:
            raise ValueError(f"{where} files_from: the name of an environment variable, "
                             f"not {files_from!r}")
        bound = section.get('max_delete', str(MAX_DELETE))
        if re.fullmatch(r'[0-9]{1,9}', bound) is None:
            raise ValueError(f"{where} max_delete: a number of files, not {bound!r}")
        directories.append(Directory(name, flags['nice'], int(nights), tuple(night_filter[1::2]),
                                     tuple(_rules(section.get('filter', ''), f"{where} filter")),
                                     flags['delete_excluded'], files_from, flags['user_write'],
                                     int(bound)))
    for d in directories:
        nested = [n.name for n in directories if n.name.startswith(d.name + '/')]
        if d.delete_excluded and nested:
            raise ValueError(f"{source} [{d.name}] delete_excluded: it would delete "
                             f"{', '.join(nested)}, mirrored on their own")
    return directories


@functools.lru_cache(maxsize=1)
def _table():
    """The shipped table of directories, read once."""
    return tuple(read_directories())


def night_window(nights):
    """The `nights` dates before today's date at Kitt Peak, newest first, YYYYMMDD."""
    today = common._utcnow().astimezone(MST).date()
    return [(today - dt.timedelta(days=n)).strftime('%Y%m%d') for n in range(1, nights + 1)]


def night_rules(d):
    """The patterns of the night window of `d`, for ``rsync --include-from``."""
    return [p.replace('NIGHT', night) for night in night_window(d.nights)
            for p in d.night_filter]


def parse_list(text):
    """The paths of a list for ``rsync --files-from``, checked.

    Parameters
    ----------
    text : :class:`str`
        One path per line, relative to the mirrored directory (a leading
        ``./``, as :command:`find` writes, is removed); blank lines are ignored.

    Returns
    -------
    :class:`list`
        The paths.

    Raises
    ------
    ValueError
        If a line is not a relative path without ``.`` and ``..``; the
        message names the first such line.
    """
    paths = []
    for n, line in enumerate(text.splitlines(), 1):
        path = line.strip()
        while path.startswith('./'):
            path = path[2:].lstrip('/')
        if not path:
            continue
        if len(path) > 4096 or any(c in ('.', '..') or _component.fullmatch(c) is None
                                   for c in path.split('/')):
            raise ValueError(f"line {n:d} is not a relative path: {line[:200]!r}")
        paths.append(path)
    return paths


def download(url, stop=None):
    """GET the text at `url`, bounded in time and size.

    Returns
    -------
    :class:`str`
        The text.

    Raises
    ------
    ValueError
        Anything but a complete 200 answer, in UTF-8, within the bounds.
    """
    deadline = time.monotonic() + HTTP_DEADLINE
    chunks, size = [], 0
    try:
        with requests.get(url, timeout=HTTP_TIMEOUT, stream=True) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP status {response.status_code:d} {response.reason}")
            for chunk in _chunks(response):
                size += len(chunk)
                if size > LIST_LIMIT:
                    raise ValueError(f"more than {LIST_LIMIT:d} bytes; abandoned")
                if time.monotonic() > deadline:
                    raise ValueError(f"not complete after {HTTP_DEADLINE:g} s; abandoned")
                if stop is not None and stop.is_set():
                    raise ValueError(f"stopped ({stop.reason})")
                chunks.append(chunk)
            length = response.headers.get('Content-Length', '')
            if (length.isdigit() and 'Content-Encoding' not in response.headers and
                    int(length) != size):
                raise ValueError(f"truncated: {size:d} of {length} bytes received")
    except urllib3.exceptions.HTTPError as err:
        # ProtocolError('Connection broken: IncompleteRead(...)', IncompleteRead(...))
        reason = err.args[0] if err.args and isinstance(err.args[0], str) else err
        raise ValueError(f"reading the answer failed: {reason}") from None
    except (requests.RequestException, OSError) as err:
        raise ValueError(str(err) or err.__class__.__name__) from None
    try:
        return b''.join(chunks).decode('utf-8')
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text ({err.reason} at byte {err.start:d})") from None


def _chunks(response):
    """The body of `response` in pieces as they arrive, so that a server sending
    a byte now and then cannot stretch one read beyond the deadline."""
    raw = response.raw
    if not hasattr(raw, 'read1'):
        # urllib3 before version 2: small pieces bound the wait instead.
        yield from response.iter_content(chunk_size=1024)
        return
    while True:
        chunk = raw.read1(65536, decode_content=True)
        if not chunk:
            return
        yield chunk


def add_user_write(top, test=False):
    """Give the user write permission on `top` and every directory and file
    under it that lacks it (as ``chmod -R u+w``; links are left alone).

    Returns
    -------
    :class:`tuple`
        The number of entries changed (or to change, in test mode) and the
        problems met, one sentence each.
    """
    changed, problems = 0, []
    if not os.path.isdir(top) or os.path.islink(top):
        return 0, []
    pending = [top]
    entries = [(top, os.lstat(top))]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as listing:
                for entry in listing:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                        entries.append((entry.path, st))
                    if stat.S_ISDIR(st.st_mode):
                        pending.append(entry.path)
        except OSError as err:
            problems.append(f"{directory} cannot be listed: {err.strerror or err}")
    for path, st in entries:
        if st.st_mode & stat.S_IWUSR:
            continue
        changed += 1
        if not test:
            try:
                os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)
            except OSError as err:
                problems.append(f"{path}: {err.strerror or err}")
    return changed, problems


def _statistics(out):
    """Files transferred, bytes transferred and files deleted, from ``rsync --stats``."""
    found = []
    for key in ('files', 'bytes', 'deleted'):
        m = _stats[key].search(out)
        found.append(int(m.group(1).replace(',', '')) if m else 0)
    return found


def _holds_data(directory):
    """``True`` if `directory` has any entry, or cannot be read (then assume it has)."""
    try:
        with os.scandir(directory) as entries:
            return any(True for _ in entries)
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Mirror(object):
    """Mirror the directories of the table, as `options` say.

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
        self.transport = environment['transport']
        self.lists = environment['lists']
        self.stop = Stop()
        self.directories = list(_table())
        self.private = None
        self._lock = None

    def run(self):
        """Take the lock, mirror every directory, report.

        Returns
        -------
        :class:`int`
            0 if every directory was mirrored (or excluded), 1 otherwise.
        """
        if not self.test:
            try:
                os.makedirs(self.options.log, exist_ok=True)
            except OSError as err:
                log.critical("Cannot create the log directory %s: %s. Nothing was mirrored.",
                             self.options.log, err)
                return 1
        _configure_log(self.options, self.options.log)
        if self.test:
            log.info("Test mode: commands are logged, not run; nothing is changed.")
        else:
            lock_file = os.path.join(self.options.log, f'{PROGRAM}.pid')
            self._lock, holder = single_instance(lock_file)
            if self._lock is None:
                log.critical("Another %s (pid %s) is running (lock %s); exiting. "
                             "Nothing was mirrored.", PROGRAM, holder, lock_file)
                return 1
        try:
            try:
                self.private = self._private_directory()
            except OSError as err:
                log.critical("Cannot create a private temporary directory in %s: %s. "
                             "Nothing was mirrored.", tempfile.gettempdir(), err)
                return 1
            outcomes = self.mirror()
        finally:
            if self.private and not self.test:
                shutil.rmtree(self.private, ignore_errors=True)
            if self._lock is not None:
                self._lock.close()
        for o in outcomes:
            log.info("%s: %s in %.1f s; %d files, %d bytes transferred, %d deleted%s.",
                     o.directory, o.status, o.seconds, o.files, o.bytes, o.deleted,
                     '' if o.status in SUCCESS else f'; see {o.log}')
        return 0 if all(o.status in SUCCESS for o in outcomes) else 1

    def _private_directory(self):
        """A new directory for the generated lists, readable by this user only;
        the directories of earlier runs that were killed are removed."""
        top = tempfile.gettempdir()
        if self.test:
            return os.path.join(top, f'{PROGRAM}-{os.getpid():d}-test')
        for name in sorted(os.listdir(top)):
            m = re.fullmatch(rf'{PROGRAM}-([0-9]+)-\w+', name)
            path = os.path.join(top, name)
            if (m is not None and not _alive(int(m.group(1))) and
                    os.lstat(path).st_uid == os.getuid()):
                shutil.rmtree(path, ignore_errors=True)
        return tempfile.mkdtemp(prefix=f'{PROGRAM}-{os.getpid():d}-')

    def mirror(self):
        """Mirror every directory, up to ``--processes`` at once.

        Returns
        -------
        :class:`list`
            An :class:`Outcome` for every directory, in the order of the table.
        """
        # In test mode one at a time, so that the commands read in order.
        with ThreadPoolExecutor(max_workers=1 if self.test else self.options.nproc) as pool:
            return list(pool.map(self._mirror, self.directories))

    def _log_file(self, d):
        return os.path.join(self.options.log, f'{PROGRAM}_' + d.name.replace('/', '_') + '.log')

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
        """Mirror `d`: check the source, prepare its lists, run rsync, say what happened.

        Returns
        -------
        :class:`tuple`
            The status and the statistics (files, bytes, deleted).
        """
        none = (0, 0, 0)
        if d.name in self.options.exclude:
            log.warning("%s skipped at user request.", d.name)
            return 'excluded', none
        if self.stop.is_set():
            return 'stopped', none
        source = f'{self.source}/{d.name}/'
        copy = os.path.join(self.destination, d.name)
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
        include_from = self._night_list(d) if d.nights else None
        files_from = None
        if d.files_from:
            files_from = self._path_list(d, copy)
            if files_from in ('failed', 'refused', 'stopped'):
                return files_from, none
        if d.user_write:
            self._user_write(copy)
        command = self._command(d, include_from, files_from)
        if not self.test:
            os.makedirs(copy, exist_ok=True)
        t0 = time.monotonic()
        result = run(command, timeout=RSYNC_TIMEOUT, ok=(0, 24), stop=self.stop,
                     test=self.test)
        if self.test:
            return 'test mode', none
        self._append_log(d, command, result, time.monotonic() - t0)
        stats = tuple(_statistics(result.stdout))
        if result.returncode in (0, 24):
            return 'ok', stats
        if self.stop.is_set():
            log.warning("Mirroring %s stopped (%s); see %s.", d.name, self.stop.reason,
                        self._log_file(d))
            return 'stopped', stats
        if result.returncode == 25:
            log.critical("Deletions in %s stopped at the bound of %d files (rsync status 25): "
                         "many files disappeared at NERSC or left the window of nights. "
                         "Nothing more was deleted; check %s and, if the deletions are "
                         "intended, run %s --force-delete by hand. See %s.", copy,
                         self._max_delete(d), source, PROGRAM, self._log_file(d))
            return 'deletion bound reached', stats
        log.critical("rsync of %s failed with status %d; see %s. The other directories "
                     "continue.", d.name, result.returncode, self._log_file(d))
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
        # The first messages say why ('@ERROR: auth failed on module desi').
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        why = [line.rstrip('.') for line in lines
               if line.startswith(('@ERROR', 'rsync:', 'ssh:'))]
        return '; '.join([f"rsync status {result.returncode:d}"] +
                         (why or [line.rstrip('.') for line in lines[-1:]])[:2])

    def _night_list(self, d):
        """Write the patterns of the night window of `d` for ``--include-from``."""
        path = os.path.join(self.private, 'nights_' + d.name.replace('/', '_') + '.txt')
        nights = night_window(d.nights)
        rules = night_rules(d)
        log.info("%s: the %d nights from %s to %s.", d.name, len(nights), nights[-1], nights[0])
        if self.test:
            log.debug("Test mode, would write %s: %s", path, ' '.join(rules))
        else:
            with open(path, 'x') as f:
                f.write(''.join(r + '\n' for r in rules))
        return path

    def _path_list(self, d, copy):
        """Download, check and write the list of paths of `d` for ``--files-from``:
        its file name, or the status of `d` if it cannot be used."""
        url = self.lists[d.files_from]
        path = os.path.join(self.private, 'paths_' + d.name.replace('/', '_') + '.txt')
        if self.test:
            log.info("Test mode, would download %s (%s) to %s.", url, d.files_from, path)
            return path
        try:
            paths = parse_list(download(url, self.stop))
        except ValueError as err:
            if self.stop.is_set():
                log.warning("Download of %s stopped (%s).", url, self.stop.reason)
                return 'stopped'
            log.critical("The list of paths of %s from %s (%s) cannot be used: %s. %s is "
                         "left as it is; the other directories continue.", d.name, url,
                         d.files_from, err, copy)
            return 'failed'
        if not paths:
            log.critical("The list of paths of %s from %s (%s) names no path: refusing to "
                         "mirror with it. %s is left as it is; check the list at NERSC.",
                         d.name, url, d.files_from, copy)
            return 'refused'
        with open(path, 'x') as f:
            f.write(''.join(p + '\n' for p in paths))
        log.info("%s: %d paths listed by %s.", d.name, len(paths), url)
        return path

    def _user_write(self, copy):
        changed, problems = add_user_write(copy, test=self.test)
        for problem in problems:
            log.warning("Adding user write permission: %s.", problem)
        if changed:
            log.info("%s user write permission to %d entries under %s.",
                     "Test mode, would add" if self.test else "Added", changed, copy)

    def _command(self, d, include_from=None, files_from=None):
        """The rsync command mirroring `d`, with statistics, timeouts and the
        deletion bound; under ``nice`` if `d` says so."""
        command = [RSYNC, '--archive', '--verbose', '--delete', '--delete-after', '--no-motd',
                   '--stats', f'--timeout={IO_TIMEOUT:d}']
        if not self.options.force_delete:
            command.append(f'--max-delete={self._max_delete(d):d}')
        command += self.transport
        if d.delete_excluded:
            command.append('--delete-excluded')
        if include_from:
            command += ['--include-from', include_from]
        command += list(d.filters)
        if files_from:
            command += ['--files-from', files_from]
        command += [f'{self.source}/{d.name}/', f'{self.destination}/{d.name}/']
        if d.nice:
            command = ['nice', '-n', str(NICENESS)] + command
        return command

    def _max_delete(self, d):
        """The bound on the deletions of `d`: ``--max-delete``, else the table's."""
        return d.max_delete if self.options.max_delete is None else self.options.max_delete

    def _append_log(self, d, command, result, seconds=None):
        """Append the command, its output, its status and duration to the log of `d`."""
        path = self._log_file(d)
        try:
            if os.path.exists(path) and os.path.getsize(path) > LOG_SIZE:
                os.replace(path, path + '.1')
            with open(path, 'a') as f:
                f.write(f"# {stamp(ZONE)}: {shlex.join(command)}\n")
                f.write(result.stdout)
                if result.stderr:
                    f.write("# Standard error:\n" + result.stderr)
                took = '' if seconds is None else f" after {seconds:.1f} s"
                f.write(f"# Exit status {result.returncode:d}{took}\n")
        except OSError as err:
            log.error("Could not write the log %s: %s.", path, err)


def _configure_log(options, log_dir=None):
    """Re-configure the shared logger: DEBUG with ``--debug`` or ``--test``;
    CRITICAL messages emailed to ``--alert-to`` (except in test mode), each
    at most once every six hours; the log file ``desi_utah_transfer.log`` in
    `log_dir`, if given (except in test mode)."""
    keep = log_dir is not None and not options.test
    configure_log(debug=options.debug or options.test,
                  filename=os.path.join(log_dir, f'{PROGRAM}.log') if keep else None,
                  to=[] if options.test else options.alert_to, mailhost=options.smtp,
                  program=PROGRAM,
                  memory=os.path.join(log_dir, f'{PROGRAM}_alerts.json') if keep else None)


def _count(value):
    """A number of files, 0 or more (argument type)."""
    if re.fullmatch(r'[0-9]+', value.strip()) is None:
        raise ArgumentTypeError(f"{value!r} is not a number of files")
    return int(value)


def _processes(value):
    """A number of rsync commands at once, 1 to :data:`MAX_PROCESSES` (argument type)."""
    if re.fullmatch(r'[0-9]+', value.strip()) is None or not 1 <= int(value) <= MAX_PROCESSES:
        raise ArgumentTypeError(f"{value!r}: from 1 to {MAX_PROCESSES:d} rsync commands at once")
    return int(value)


def _options(args=None):
    """Parse command-line options for :command:`desi_utah_transfer`.

    Parameters
    ----------
    args : :class:`list`, optional
        Command-line arguments; ``sys.argv[1:]`` if not set.

    Returns
    -------
    :class:`argparse.Namespace`
        The parsed command-line options.
    """
    desc = "Mirror the daily DESI reductions from NERSC to Utah with parallel rsync."
    prsr = ArgumentParser(prog=os.path.basename(sys.argv[0]), description=desc)
    prsr.add_argument('-A', '--no-archive', action='store_true', dest='no_archive',
                      help=f"Do not mirror {ARCHIVE} this time.")
    prsr.add_argument('-d', '--debug', action='store_true',
                      help="Set log level to DEBUG.")
    prsr.add_argument('-e', '--exclude', metavar='DIR', nargs='+', action='extend', default=[],
                      help="Do not mirror DIR this time; several may be given.")
    prsr.add_argument('--force-delete', action='store_true', dest='force_delete',
                      help="Lift the bound on deletions for this run (by hand, after "
                           "checking that the deletions are intended).")
    prsr.add_argument('-l', '--log', metavar='DIR',
                      default=os.path.join(os.path.expanduser('~'), 'Documents', 'Logfiles'),
                      help="Write log files, one per directory, in DIR, created if missing "
                           "(default %(default)s).")
    prsr.add_argument('-m', '--max-delete', metavar='N', type=_count, dest='max_delete',
                      help=f"Let each rsync delete at most N files (default {MAX_DELETE:d}, "
                           "or the bound of the directory in the table).")
    prsr.add_argument('-p', '--processes', metavar='N', type=_processes, default=MAX_PROCESSES,
                      dest='nproc',
                      help=f"Run up to N rsync commands at once, at most {MAX_PROCESSES:d} "
                           "(default %(default)s).")
    prsr.add_argument('-t', '--test', action='store_true',
                      help="Test mode: log every command, run none, change nothing. "
                           "Implies -d.")
    alert_options(prsr)
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    options = prsr.parse_args(args)
    try:
        known = {d.name for d in _table()}
    except ValueError as err:
        prsr.error(str(err))
    options.exclude = [e.strip('/') for e in options.exclude]
    unknown = [e for e in options.exclude if e not in known]
    if unknown:
        prsr.error(f"argument -e/--exclude: not a mirrored directory: {', '.join(unknown)}")
    if options.no_archive and ARCHIVE not in options.exclude:
        options.exclude.append(ARCHIVE)
    return options


def _environment(options):
    """Source, destination, transport and URLs of the lists, from the environment.

    Returns
    -------
    :class:`dict`
        ``source``, ``destination``, ``transport`` (rsync options of the
        connection) and ``lists`` (environment variable: URL); ``None``,
        after one CRITICAL line naming every problem, if something is
        missing or malformed.
    """
    problems = []
    host = os.environ.get('DESISYNC_HOSTNAME', '').strip()
    if not host:
        problems.append("DESISYNC_HOSTNAME is not set")
    elif re.fullmatch(r'(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9][A-Za-z0-9.-]*(?::[0-9]{1,5})?',
                      host) is None:
        problems.append(f"DESISYNC_HOSTNAME is not [USER@]HOST[:PORT]: {host[:100]!r}")
    destination = os.environ.get('DESI_ROOT', '').strip()
    if not destination:
        problems.append("DESI_ROOT is not set")
    elif not os.path.isabs(destination) or not os.path.isdir(destination):
        problems.append(f"DESI_ROOT is not an existing directory: {destination[:200]!r}")
    ssh = bool(os.environ.get('RSYNC_RSH', '').strip())
    root = os.environ.get('DESISYNC_ROOT', '').strip() or REMOTE_ROOT
    transport = ['--password-file', os.path.expanduser(os.path.join('~', '.desi'))]
    if ssh:
        try:
            transport = ['--rsh=' + shlex.join(environment_ssh())]
        except ValueError as err:
            problems.append(f"RSYNC_RSH is not a command: {err}")
        if re.fullmatch(r'/[A-Za-z0-9._+/-]*', root) is None or '/../' in root + '/':
            problems.append(f"DESISYNC_ROOT is not an absolute path: {root[:200]!r}")
    lists = {}
    for d in _table():
        if d.files_from and d.name not in options.exclude:
            url = os.environ.get(d.files_from, '').strip()
            if not url:
                problems.append(f"{d.files_from} (the list of paths of {d.name}) is not set")
            elif len(url) > 2000 or re.fullmatch(r'https?://[^\s/]+\S*', url) is None:
                problems.append(f"{d.files_from} is not an http(s) URL: {url[:200]!r}")
            lists[d.files_from] = url
    if problems:
        log.critical("%s cannot start: %s. Nothing was mirrored.", PROGRAM, '; '.join(problems))
        return None
    return {'source': f"{host}:{root}" if ssh else f"rsync://{host}/desi",
            'destination': os.path.abspath(destination), 'transport': transport,
            'lists': lists}


def main():
    """Entry point for :command:`desi_utah_transfer`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`.
    """
    options = _options()
    _configure_log(options)
    environment = _environment(options)
    if environment is None:
        return 1
    mirror = Mirror(options, environment)
    mirror.stop.handle_signals()
    return mirror.run()
