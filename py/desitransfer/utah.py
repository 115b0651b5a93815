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
import datetime as dt
import functools
import os
import re
import stat
import sys
import tempfile
from argparse import ArgumentParser
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import requests
import urllib3

from . import __version__ as dtVersion
from . import common, mirror, processes, web
from .alerts import alert_options, configure_log
from .common import MST, log
from .mirror import IO_TIMEOUT, MAX_DELETE, REMOTE_ROOT, RSYNC

#: The name of the command, in logs, alerts and file names.
PROGRAM = 'desi_utah_transfer'

#: The directory left out by ``-A, --no-archive``.
ARCHIVE = 'spectro/redux/daily/tiles/archive'

#: Niceness of the rsync of a directory marked ``nice`` (that of a bare ``nice``).
NICENESS = 10

#: Connect and read timeouts of the request for a list of paths.
HTTP_TIMEOUT = (10, 60)

#: Seconds the download of a list of paths may take in all: connection,
#: status line, headers, redirects and body.
HTTP_DEADLINE = 600

#: Most bytes of a list of paths.
LIST_LIMIT = 64 * 2**20

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

_keys = {'nice', 'nights', 'night_filter', 'filter', 'delete_excluded', 'files_from',
         'user_write', 'max_delete'}

#: A component of a path in a list of paths (``.`` and ``..`` are refused apart).
_component = re.compile(r'[A-Za-z0-9_.+=,@-]+')


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
    directories = []
    for name, section, where in mirror.read_table(text, source, 'desi_utah_transfer.ini'):
        mirror.check_keys(section, _keys, where)
        flags = mirror.flags(section, ('nice', 'delete_excluded', 'user_write'), where)
        nights = section.get('nights', '0')
        if re.fullmatch(r'[0-9]{1,3}', nights) is None or not int(nights) <= 366:
            raise ValueError(f"{where} nights: a number of nights up to 366, not {nights!r}")
        night_filter = mirror.filter_rules(section.get('night_filter', ''),
                                           f"{where} night_filter")
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
        filters = mirror.filter_rules(section.get('filter', ''), f"{where} filter")
        directories.append(Directory(name, flags['nice'], int(nights), tuple(night_filter[1::2]),
                                     tuple(filters), flags['delete_excluded'], files_from,
                                     flags['user_write'], int(bound)))
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

    The whole request, from the connection to the last byte of the body,
    status line and headers included, may take at most :data:`HTTP_DEADLINE`
    seconds (see :class:`desitransfer.web.Deadline`).

    Parameters
    ----------
    url : :class:`str`
        The list.
    stop : :class:`desitransfer.processes.Stop`, optional
        Checked between pieces of the body.

    Returns
    -------
    :class:`str`
        The text.

    Raises
    ------
    ValueError
        Anything but a complete 200 answer, in UTF-8, within the bounds.
    """
    late = f"not complete after {HTTP_DEADLINE:g} s; abandoned"
    deadline = web.Deadline(HTTP_DEADLINE)
    chunks, size = [], 0
    try:
        with deadline, web.session() as session:
            with session.get(url, timeout=HTTP_TIMEOUT, stream=True) as response:
                if response.status_code != 200:
                    raise ValueError(f"HTTP status {response.status_code:d} "
                                     f"{response.reason}")
                for chunk in _chunks(response):
                    size += len(chunk)
                    if size > LIST_LIMIT:
                        raise ValueError(f"more than {LIST_LIMIT:d} bytes; abandoned")
                    if deadline.expired:
                        raise ValueError(late)
                    if stop is not None and stop.is_set():
                        raise ValueError(f"stopped ({stop.reason})")
                    chunks.append(chunk)
                length = response.headers.get('Content-Length', '')
                if (length.isdigit() and 'Content-Encoding' not in response.headers and
                        int(length) != size):
                    raise ValueError(f"truncated: {size:d} of {length} bytes received")
    except urllib3.exceptions.HTTPError as err:
        if deadline.expired:
            raise ValueError(late) from None
        # ProtocolError('Connection broken: IncompleteRead(...)', IncompleteRead(...))
        reason = err.args[0] if err.args and isinstance(err.args[0], str) else err
        raise ValueError(f"reading the answer failed: {reason}") from None
    except (requests.RequestException, OSError, ValueError) as err:
        if deadline.expired:
            raise ValueError(late) from None
        if isinstance(err, ValueError):
            raise
        raise ValueError(str(err) or err.__class__.__name__) from None
    if deadline.expired:
        # The end of a connection may look like the end of a body sent without a length.
        raise ValueError(late)
    try:
        return b''.join(chunks).decode('utf-8')
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text ({err.reason} at byte {err.start:d})") from None


def _chunks(response):
    """The body of `response` in pieces as they arrive, so that the size limit
    and a stop are checked as the body comes."""
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


class Mirror(mirror.BaseMirror):
    """Mirror the directories of the table, as `options` say.

    Parameters
    ----------
    options : :class:`argparse.Namespace`
        The parsed command-line options.
    environment : :class:`dict`
        What :func:`_environment` returns.
    """

    program = PROGRAM
    zone = ZONE
    timed_log = True
    deletions = "many files disappeared at NERSC or left the window of nights"

    def __init__(self, options, environment):
        super().__init__(options, environment)
        self.lists = environment['lists']
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
        if not self._make_log_directory():
            return 1
        _configure_log(self.options, self.options.log)
        self.actions.start()
        lock_file = os.path.join(self.options.log, f'{PROGRAM}.pid')
        try:
            self._lock, holder = self.actions.single_instance(lock_file)
        except OSError as err:
            log.critical("Cannot take the lock %s: %s. Nothing was mirrored.",
                         lock_file, err)
            return 1
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
            if self.private:
                try:
                    self.actions.remove_tree(self.private)
                except OSError as err:
                    log.warning("Could not remove %s: %s.", self.private, err)
            self._lock.close()
        return self._report(outcomes)

    def _private_directory(self):
        """A new directory for the generated lists, readable by this user only;
        the directories of earlier runs that were killed are removed."""
        top = tempfile.gettempdir()
        for name in sorted(os.listdir(top)):
            m = re.fullmatch(rf'{PROGRAM}-([0-9]+)-\w+', name)
            path = os.path.join(top, name)
            if (m is not None and not processes.alive(int(m.group(1))) and
                    os.lstat(path).st_uid == os.getuid()):
                try:
                    self.actions.remove_tree(path)
                except OSError as err:
                    log.warning("Could not remove %s: %s.", path, err)
        return self.actions.scratch(f'{PROGRAM}-{os.getpid():d}-')

    def mirror(self):
        """Mirror every directory, up to ``--processes`` at once.

        Returns
        -------
        :class:`list`
            An :class:`~desitransfer.mirror.Outcome` for every directory, in the
            order of the table.
        """
        # In test mode one at a time, so that the commands read in order.
        with ThreadPoolExecutor(max_workers=1 if self.actions.test else self.options.nproc) \
                as pool:
            return list(pool.map(self._mirror, self.directories))

    def _prepare(self, d, copy):
        """Write the lists of `d` (its window of nights, its list of paths),
        add user write permission to `copy` if the table says so: the status
        of `d` if a list cannot be used, else its rsync command."""
        include_from = self._night_list(d) if d.nights else None
        files_from = None
        if d.files_from:
            files_from = self._path_list(d, copy)
            if files_from in ('failed', 'refused', 'stopped'):
                return files_from, None
        if d.user_write:
            self._user_write(copy)
        return None, self._command(d, include_from, files_from)

    def _night_list(self, d):
        """Write the patterns of the night window of `d` for ``--include-from``."""
        path = os.path.join(self.private, 'nights_' + d.name.replace('/', '_') + '.txt')
        nights = night_window(d.nights)
        rules = night_rules(d)
        log.info("%s: the %d nights from %s to %s.", d.name, len(nights), nights[-1], nights[0])
        self.actions.write_file(path, ''.join(r + '\n' for r in rules))
        return path

    def _path_list(self, d, copy):
        """Download, check and write the list of paths of `d` for ``--files-from``:
        its file name, or the status of `d` if it cannot be used."""
        url = self.lists[d.files_from]
        path = os.path.join(self.private, 'paths_' + d.name.replace('/', '_') + '.txt')
        try:
            paths = self.actions.query(f"download {url} ({d.files_from}) to {path}",
                                       lambda: parse_list(download(url, self.stop)))
        except ValueError as err:
            if self.stop.is_set():
                log.warning("Download of %s stopped (%s).", url, self.stop.reason)
                return 'stopped'
            log.critical("The list of paths of %s from %s (%s) cannot be used: %s. %s is "
                         "left as it is; the other directories continue.", d.name, url,
                         d.files_from, err, copy)
            return 'failed'
        if paths is None:
            return path  # Not asked (test mode).
        if not paths:
            log.critical("The list of paths of %s from %s (%s) names no path: refusing to "
                         "mirror with it. %s is left as it is; check the list at NERSC.",
                         d.name, url, d.files_from, copy)
            return 'refused'
        self.actions.write_file(path, ''.join(p + '\n' for p in paths))
        log.info("%s: %d paths listed by %s.", d.name, len(paths), url)
        return path

    def _user_write(self, copy):
        changed, problems = add_user_write(copy, test=self.actions.test)
        for problem in problems:
            log.warning("Adding user write permission: %s.", problem)
        if changed:
            log.info("%s user write permission to %d entries under %s.",
                     "Test mode, would add" if self.actions.test else "Added", changed, copy)

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
    mirror.force_delete_option(prsr)
    mirror.log_option(prsr)
    prsr.add_argument('-m', '--max-delete', metavar='N', type=mirror.count, dest='max_delete',
                      help=f"Let each rsync delete at most N files (default {MAX_DELETE:d}, "
                           "or the bound of the directory in the table).")
    mirror.processes_option(prsr)
    mirror.test_mode_option(prsr)
    alert_options(prsr)
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    options = prsr.parse_args(args)
    try:
        known = {d.name for d in _table()}
    except ValueError as err:
        prsr.error(str(err))
    mirror.check_exclusions(prsr, options, known)
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
    elif mirror.HOSTNAME.fullmatch(host) is None:
        problems.append(f"DESISYNC_HOSTNAME is not [USER@]HOST[:PORT]: {host[:100]!r}")
    destination = os.environ.get('DESI_ROOT', '').strip()
    if not destination:
        problems.append("DESI_ROOT is not set")
    elif not os.path.isabs(destination) or not os.path.isdir(destination):
        problems.append(f"DESI_ROOT is not an existing directory: {destination[:200]!r}")
    root = os.environ.get('DESISYNC_ROOT', '').strip() or REMOTE_ROOT
    try:
        transport = mirror.transport()
    except ValueError as err:
        problems.append(f"RSYNC_RSH is not a command: {err}")
    if mirror.ssh_form() and (re.fullmatch(r'/[A-Za-z0-9._+/-]*', root) is None or
                              '/../' in root + '/'):
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
    return {'source': mirror.nersc_source(host, root),
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
    transfer = Mirror(options, environment)
    transfer.stop.handle_signals()
    return transfer.run()
