# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=====================
desitransfer.mountain
=====================

The mountain, as :command:`desi_transfer_daemon` sees it: shared ssh
connections (one for the survey and the first rsync stream, one for each
further stream, how many planned by the mountain's own
:class:`~desitransfer.streams.StreamPlanner`), a survey of the exposure
links with their targets resolved at the mountain, and the rsync commands
that copy from there.

A survey is one round trip: a small POSIX shell script, run at the
mountain, answers whether checksums are being computed (the lock file) and
otherwise lists, for the nights of the recent window only, every link
``SOURCE/NIGHT/EXPID`` with its modification time and, for a link to a
directory, the physical path it resolves to (``cd -P`` and ``pwd -P``: no
program is started per link).  Entries of ``SOURCE`` that are not night
directories are listed too, to be reported.  The answer is NUL-separated and
ends with a marker, so that a truncated or garbled answer is recognised as
*unknown*, never read as "no exposures".

Nothing the mountain answers reaches a command line unless it passes
:func:`safe_path`: every component of a path is letters, digits and
``._+-``, and does not start with ``-``.  A wildcard (``*?[``) would be
expanded by rsync at the mountain, whatever the quoting, and a shell
character (``$``, a quote, a space) would be run by the remote shell under
rsync's old argument handling; neither can pass.

The same module lists the links to directories under a tree that
:command:`desi_nightwatch_transfer` and :command:`desi_daily_transfer` copy
(:data:`LINKS_SCRIPT`, :func:`parse_links`): each resolved at the mountain,
so that only those inside the tree (or under a directory named in the
configuration) are followed, each copied from its physical directory by an
:command:`rsync` that follows no link (:func:`link_copies`).
"""
import posixpath
import re
import shlex
import threading
from collections import namedtuple

from .common import EXPID, log, valid_night
from .processes import Background
from .runner import run
from .streams import StreamPlanner
from .rsynccommand import RSYNC_IO_TIMEOUT, rsync_command
from .transport import SharedConnection, round_trip

#: One component of a path at the mountain that may be put on a command line.
_component = re.compile(r'[A-Za-z0-9._+][A-Za-z0-9._+-]*')

#: Longest path at the mountain that may be put on a command line.
MAX_PATH = 4096

#: Seconds before a remote command is killed.
REMOTE_TIMEOUT = 300

#: Seconds a connection opened ahead of its rsync stream may take; its
#: first command waits that long for it at most.
OPEN_WAIT = 60

#: Seconds before the question of the sizes of a backlog is abandoned.
SIZES_TIMEOUT = 120

#: Seconds before an rsync is killed; ``--timeout`` stops an rsync that hears nothing.
RSYNC_TIMEOUT = 2 * 3600

#: An exposure link at the mountain: its night and exposure, the physical
#: directory it resolves to, and its modification time (Unix seconds).
Link = namedtuple('Link', ['night', 'expid', 'target', 'mtime'])

#: A survey's stamp as ``stat --printf=%y/`` prints it (``2026-12-05
#: 01:02:03.123456789 +0000/`` for each directory), which the next watch is
#: given on its command line: anything else is not used.
STAMP = re.compile(r'([0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})? '
                   r'[+-][0-9]{4}/)*')

#: Longest stamp used (a bound on the watch's command line): the transfer
#: area and a window of a few hundred nights.
MAX_STAMP = 32 * 1024


def valid_link(link):
    """``True`` if `link` is ``NIGHT/EXPID`` with a real date and an 8-digit exposure."""
    parts = link.split('/') if isinstance(link, str) else []
    return (len(parts) == 2 and valid_night(parts[0]) and
            EXPID.fullmatch(parts[1]) is not None)


class Survey(namedtuple('Survey', ['answer', 'links', 'refused', 'unknown_nights',
                                   'result', 'stamp'], defaults=[''])):
    """What the mountain answered.

    Attributes
    ----------
    answer : :class:`str`
        ``'links'``, ``'locked'`` (checksums are being computed) or
        ``'unknown'`` (no usable answer: wait).
    links : :class:`dict`
        ``'NIGHT/EXPID'`` -> :class:`Link`, the links that may be copied.
    refused : :class:`dict`
        Entry at the mountain -> why it is not transferred.
    unknown_nights : :class:`dict`
        Nights that could not be listed (for example unreadable) -> why:
        nothing about them is concluded in this pass.
    result : :class:`desitransfer.runner.Result`
        The remote command's outcome, for messages.
    stamp : :class:`str`
        The modification times of the transfer area and of the nights asked
        (each followed by a ``/``, on one line),
        taken before anything was listed (see :meth:`Mountain.watch`).
    """

    @property
    def nights(self):
        """Nights with at least one link."""
        return sorted({link.night for link in self.links.values()})


#: The stamp of the transfer area ``$src`` and of the nights that are the
#: arguments: their modification times, each followed by ``/``, on one line
#: (run in ``$(...)``, which leaves the arguments as they are).  The survey
#: takes it; the watch of :data:`WATCH_SURVEY_SCRIPT` compares it.
_STAMP = ('for n in "$@"; do shift; set -- "$@" "$src/$n"; done; '
          'stat --printf=%y/ -- "$src" "$@" 2>/dev/null')

#: What the survey compares and lists, after ``src`` (the transfer area) and
#: ``lock`` (the checksum lock) are set and the nights of the window are the
#: arguments (see :data:`SURVEY_SCRIPT`).
_SURVEY_BODY = [
    """if [ -e "$lock" ]; then printf '#locked\\0#end\\0'; exit 0; fi""",
    'if [ ! -d "$src" ]; then echo "$src is not a directory" >&2; exit 3; fi',
    # What the watch compares with (see WATCH_SCRIPT), taken before anything
    # is listed: a link made after this is seen by the watch that follows.
    """printf '%%%s\\0' "$(""" + _STAMP + ')"',
    # Entries of SOURCE that are not night directories, to be reported.
    """find "$src" -mindepth 1 -maxdepth 1 -regextype posix-extended \\( ! -type d -o ! """
    """-regex '.*/20[0-9]{2}(0[1-9]|1[0-2])(0[1-9]|[12][0-9]|3[01])' \\) -printf '!%P\\0'""",
    # The nights of the window that exist.
    """for n in "$@"; do shift; if [ -e "$src/$n" ] || [ -L "$src/$n" ]; then """
    """set -- "$@" "$src/$n"; fi; done""",
    # Each link, its time, and for a link to a directory its physical path.
    """if [ $# -gt 0 ]; then find "$@" -mindepth 1 -maxdepth 1 -type l -printf '@%p\\0%T@\\0' """
    """\\( -xtype d -exec sh -c 'for l; do if cd -P -- "$l" 2>/dev/null; then """
    """printf "=%s\\0" "$l"; pwd -P; printf "\\0"; fi; done' sh {} + \\); """
    """printf '#find %d\\0' $?; fi""",
    """printf '#end\\0'""",
]

#: The survey, run by ``sh -c SCRIPT sh SOURCE LOCK NIGHT...`` at the mountain
#: (one line, so that it is logged on one line).
SURVEY_SCRIPT = '; '.join(['export LC_ALL=C', 'cd /', 'src=$1 lock=$2', 'shift 2'] +
                          _SURVEY_BODY)

#: Most directories in one question of sizes (a bound on its command line).
SIZES_CHUNK = 1000

#: Looks a second of :data:`WATCH_SCRIPT` (a ``stat`` of a few directories
#: each: next to nothing at the mountain).
WATCH_LOOKS = 4


def _watch_loop(stamp):
    """The lines of a watch, once ``w`` (how many looks) and ``s0`` (what to
    compare with, or empty: what the first look sees) are set: the shell
    command `stamp` is run in ``$(...)`` :data:`WATCH_LOOKS` times a second
    until its answer differs from ``s0``; if it never does, the answer is
    ``quiet``.  A ``.`` is written after each look: when the connection is
    gone (the daemon stopped), that write ends the watch."""
    return [f'if [ -z "$s0" ]; then s0=$({stamp}); fi',
            's=$s0 i=0',
            f'while [ $i -le "$w" ]; do s=$({stamp}); if [ "$s" != "$s0" ]; then break; fi; '
            f'if [ $i -lt "$w" ]; then sleep {1 / WATCH_LOOKS:g}; printf . || exit 1; fi; '
            'i=$((i + 1)); done',
            'if [ "$s" = "$s0" ]; then echo quiet; exit 0; fi']


#: The watch, run by ``sh -c SCRIPT sh SECONDS SINCE PATH...`` at the
#: mountain: it answers ``changed`` as soon as the modification times of the
#: directories PATH (a transfer area and its nights: a link added, a night
#: created) differ from SINCE, what the last survey saw of them (or, if SINCE
#: is empty, from what they are when it starts), or ``quiet`` after SECONDS
#: (see :func:`_watch_loop`).
WATCH_SCRIPT = '; '.join(['export LC_ALL=C', 'cd /', f'w=$(($1 * {WATCH_LOOKS:d})) s0=$2',
                          'shift 2'] + _watch_loop('stat --printf=%y/ -- "$@" 2>/dev/null') +
                         ['echo changed'])

#: The watch and the survey in one command, run by ``sh -c SCRIPT sh SECONDS
#: SINCE SOURCE LOCK NIGHT...`` at the mountain: it watches the stamp of the
#: transfer area SOURCE and its NIGHTs (SINCE is the last survey's) and, as
#: soon as it changed, answers ``changed`` and the survey's answer (see
#: :data:`SURVEY_SCRIPT`), with no second command to start and no second
#: round trip; or ``quiet`` after SECONDS.
WATCH_SURVEY_SCRIPT = '; '.join(['export LC_ALL=C', 'cd /',
                                 f'w=$(($1 * {WATCH_LOOKS:d})) s0=$2 src=$3 lock=$4',
                                 'shift 4'] + _watch_loop(_STAMP) +
                                ["printf 'changed\\0'"] + _SURVEY_BODY)

#: Most links to directories followed in one tree (a bound on the commands
#: run); the others are reported, not followed.
MAX_LINKS = 1000

#: Bytes of the answer of :data:`LINKS_SCRIPT` read at most.
LINKS_ANSWER_LIMIT = 4 * 2**20

#: Links not followed that are reported one by one; the others are counted.
LINKS_TOLD = 20

#: The links to directories under a tree, run by ``sh -c SCRIPT sh TREE
#: DIRECTORY...`` at the mountain: first the physical path of TREE and of
#: each DIRECTORY (``^PATH``, empty if it is not a directory that can be
#: entered), then, for each link to a directory under TREE (links are not
#: followed while looking), its path relative to TREE and its physical target
#: (``cd -P`` and ``pwd -P``).  NUL-separated, with an end marker, as the survey.
LINKS_SCRIPT = '; '.join([
    'export LC_ALL=C',
    'cd /',
    't=$1',
    """for d in "$@"; do if cd -P -- "$d" 2>/dev/null; then printf '^'; pwd -P; printf '\\0'; """
    """else printf '^\\0'; fi; cd /; done""",
    'cd -P -- "$t" || exit 3',
    """find . -mindepth 1 -type l -xtype d -exec sh -c 'd=$1; shift; for l; do """
    """if cd -P -- "$d/$l" 2>/dev/null; then printf "=%s\\0" "$l"; pwd -P; printf "\\0"; fi; """
    """done' sh "$PWD" {} +""",
    """printf '#find %d\\0' $?""",
    """printf '#end\\0'""",
])

#: What :data:`LINKS_SCRIPT` found under a tree at the mountain.
#:
#: ``tree``: its physical path; ``follow``: ``(link, target)`` of each link to
#: follow, relative to the tree and physical, sorted; ``refused``: link ->
#: why it is not followed; ``why``: ``''``, or why the answer cannot be used
#: (then nothing is followed, and the tree is not copied).
Links = namedtuple('Links', ['tree', 'follow', 'refused', 'why'])

_find_error = re.compile(r"^find: [‘'`\"](?P<path>.*?)[’'\"]?: (?P<why>.+)$")


class Mountain(object):
    """The mountain: a host reached over shared ssh connections, or this
    machine if `host` is empty.

    Parameters
    ----------
    host : :class:`str`
        ssh host alias (``dts``); empty for a source on this machine.
    ssh : :class:`str`
        The ssh program, used for every connection, including rsync's.
    stop : :class:`desitransfer.processes.Stop`
        Interrupts every command.
    streams : :class:`int` or :class:`str`, optional
        ``[common] streams`` of :attr:`planner`: a number, or ``'auto'``.
    round_trip : :class:`float`, optional
        The round trip known from the last run, if any (for ``auto``).
    remember : callable, optional
        Called with each round trip measured (see
        :class:`~desitransfer.streams.StreamPlanner`).
    runner : callable, optional
        Runs every command, with the arguments of
        :func:`desitransfer.runner.run` (the default); a test may record
        instead.

    Attributes
    ----------
    planner : :class:`~desitransfer.streams.StreamPlanner`
        How many rsync streams copy a backlog from here, over connections of
        this mountain.
    """

    def __init__(self, host, ssh, stop, streams=1, round_trip=None, remember=None,
                 runner=run):
        self.host = host
        self.run = runner
        self.ssh = ssh
        self.stop = stop
        self.connection = SharedConnection(host, program=ssh)
        self._opening = {}  # stream -> the Background opening its connection
        self.planner = StreamPlanner(self, streams, known=round_trip, remember=remember)

    @property
    def name(self):
        return self.host or 'localhost'

    def ssh_command(self, stream=0, stop=None):
        """The ssh command, sharing one connection (an OpenSSH control master
        kept between passes; ssh makes a new one if it died).  Each rsync
        `stream` after the first has a connection of its own, kept the same
        way, so that it has its own TCP window.

        If :meth:`open_streams` is opening the connection of `stream`, it
        waits for it (at most :data:`OPEN_WAIT` seconds, less if `stop`, by
        default the mountain's, is set): a command started meanwhile would
        find the control socket half made and open a connection of its own,
        not shared, a whole handshake more.
        """
        opening = self._opening.get(stream)
        if opening is not None and opening.thread is not threading.current_thread():
            opening.wait(OPEN_WAIT, self.stop if stop is None else stop)
        return self.connection.ssh(stream)

    def close(self):
        """Stop the shared connections and remove their private directory."""
        self.connection.close()

    def remote(self, words, timeout=None, stream=0, names=False, stop=None):
        """Run the command `words` (a list) at the mountain, over the connection
        of `stream`, killed after `timeout` seconds (:data:`REMOTE_TIMEOUT` if
        not set); ssh's own failure is 255.  With `names`, its answer is
        file names (see :func:`desitransfer.runner.run`).  It is interrupted
        by `stop` if given, else by the mountain's."""
        stop = self.stop if stop is None else stop
        timeout = REMOTE_TIMEOUT if timeout is None else timeout
        if not self.host:
            return self.run(words, timeout=timeout, ok=(0,), quiet=True, stop=stop,
                            names=names)
        return self.run(self.ssh_command(stream, stop) + [self.host, shlex.join(words)],
                        timeout=timeout, ok=(0,), quiet=True, stop=stop, names=names)

    def open_streams(self, streams, first=1):
        """Open, in the background, the connections of rsync streams `first`
        to `streams` - 1 that are not open yet (an ssh handshake takes several
        round trips: better while something else is asked)."""
        if not self.host:
            return
        for stream in range(first, streams):
            if not self.connection.is_open(stream):
                # Whatever it answers is not a failure: the rsync of the
                # stream opens it again if needed, and reports what fails.
                command = self.ssh_command(stream) + [self.host, 'true']
                self._opening[stream] = Background(
                    lambda command=command: self.run(command, timeout=OPEN_WAIT,
                                                     ok=tuple(range(-64, 256)), quiet=True,
                                                     stop=self.stop),
                    f'open-stream-{stream:d}')

    def rsync(self, source, destination, extra=(), dry_run=False, stream=0):
        """The rsync command copying directory `source` at the mountain into
        `destination`, with `extra` options, over the connection of `stream`.

        Links are not followed (no ``--copy-dirlinks``): `source` is the
        physical directory found by the survey, so nothing outside it is read.
        :exc:`ValueError` if `source` does not pass :func:`safe_path`.
        """
        if not safe_path(source):
            raise ValueError(f"{shown(source)} is not a path that may be put on a command line")
        return rsync_command(['--verbose', '--recursive', '--times', '--omit-dir-times'] +
                             list(extra),
                             [f'{self.host}:{source}/' if self.host else f'{source}/'],
                             f'{destination}/',
                             ssh=self.ssh_command(stream) if self.host else None,
                             io_timeout=RSYNC_IO_TIMEOUT, dry_run=dry_run)

    def sizes(self, directories):
        """Bytes in each of `directories` (physical exposure directories) at
        the mountain, in one round trip; ``None`` if the answer is not usable
        (then a backlog is shared out by count).

        Parameters
        ----------
        directories : :class:`list`
            Absolute paths.

        Returns
        -------
        :class:`dict` or ``None``
            Directory -> bytes.
        """
        sizes = {}
        directories = list(directories)
        for first in range(0, len(directories), SIZES_CHUNK):
            chunk = directories[first:first + SIZES_CHUNK]
            result = self.remote(['du', '--summarize', '--bytes', '--'] + chunk,
                                 timeout=SIZES_TIMEOUT)
            found = parse_sizes(result.stdout, chunk) if result.returncode == 0 else None
            if found is None:
                log.info("The sizes of %d exposures at %s are unknown (return code %d); "
                         "they are shared out among the streams by count.",
                         len(directories), self.name, result.returncode)
                return None
            sizes.update(found)
        return sizes

    def round_trip(self):
        """The network round trip to the mountain in seconds (see
        :func:`desitransfer.transport.round_trip`); 0 for a local source,
        ``None`` if it cannot be measured."""
        if not self.host:
            return 0.0
        return round_trip(self.ssh_command(), self.host)

    def watch(self, directories, seconds, since='', stop=None, stream=0):
        """Wait up to `seconds` for a change at the mountain.

        Parameters
        ----------
        directories : :class:`list`
            Directories at the mountain whose modification time is watched
            (a transfer area, tonight's directory in it).
        seconds : :class:`int`
            How long to wait at most.
        since : :class:`str`, optional
            What the last survey saw of `directories` (the ``stamp`` of each
            :class:`Survey`, in the same order, one after the other): a change
            made since then, even before the watch starts, is seen at once.
            Empty: changes from when the watch starts.
        stop : optional
            Ends the watch when set (see :meth:`remote`).
        stream : :class:`int`, optional
            Over the connection of this rsync stream.

        Returns
        -------
        :class:`bool` or ``None``
            ``True`` if one of them changed, ``False`` if nothing changed in
            `seconds`, ``None`` if the mountain could not be asked (then the
            caller waits on its own).
        """
        result = self.remote(['sh', '-c', WATCH_SCRIPT, 'sh', str(int(seconds)), since]
                             + list(directories), timeout=seconds + 60, stop=stop,
                             stream=stream)
        answer = result.stdout.replace('.', '').strip() if result.returncode == 0 else ''
        return {'changed': True, 'quiet': False}.get(answer)

    def watch_survey(self, seconds, since, source, checksum_lock, nights, data_root=None,
                     stop=None, stream=0):
        """:meth:`watch` the transfer area `source` and its `nights` for up
        to `seconds`, and as soon as one of them changed since the survey of
        stamp `since`, :meth:`survey` them, all in one command at the
        mountain: a link is known one round trip after the look that sees it.

        Returns
        -------
        :class:`Survey`, ``False`` or ``None``
            The survey made after a change (its answer may be ``locked`` or
            ``unknown``, as that of :meth:`survey`); ``False`` if nothing
            changed in `seconds`; ``None`` if the watch could not be asked
            or its answer is not understood.
        """
        result = self.remote(['sh', '-c', WATCH_SURVEY_SCRIPT, 'sh', str(int(seconds)), since,
                              source, checksum_lock] + list(nights),
                             timeout=seconds + REMOTE_TIMEOUT, names=True, stop=stop,
                             stream=stream)
        if result.returncode != 0:
            return None
        answer = result.stdout.lstrip('.')
        if answer.strip() == 'quiet':
            return False
        if not answer.startswith('changed\0'):
            return None
        return parse_survey(result._replace(stdout=answer[len('changed\0'):]), source,
                            data_root)

    def survey(self, source, checksum_lock, nights, data_root=None, stop=None, stream=0):
        """Ask, in one round trip, for the checksum lock and the exposure links
        of `nights` in `source`.

        Parameters
        ----------
        source : :class:`str`
            The transfer area at the mountain, holding ``NIGHT/EXPID`` links.
        checksum_lock : :class:`str`
            While this file exists, checksums are being computed.
        nights : :class:`list`
            The nights to list (the recent window).
        data_root : :class:`str`, optional
            If set, a link is transferred only if it resolves under it.
        stop : optional
            Interrupts the survey (see :meth:`remote`).
        stream : :class:`int`, optional
            Over the connection of this rsync stream.

        Returns
        -------
        :class:`Survey`
        """
        result = self.remote(['sh', '-c', SURVEY_SCRIPT, 'sh', source, checksum_lock]
                             + list(nights), names=True, stop=stop, stream=stream)
        return parse_survey(result, source, data_root)


def parse_survey(result, source, data_root=None):
    """Read the answer of :data:`SURVEY_SCRIPT` (see :meth:`Mountain.survey`)."""
    unknown = Survey('unknown', {}, {}, {}, result)
    if result.returncode != 0:
        return unknown
    tokens = result.stdout.split('\0')
    if tokens[-1] == '':
        tokens.pop()
    if not tokens or tokens[-1] != '#end':
        return unknown
    if tokens[0] == '#locked':
        return Survey('locked', {}, {}, {}, result)
    prefix = source.rstrip('/') + '/'
    mtimes, targets, refused = {}, {}, {}
    stamp = ''
    i = 0
    try:
        while i < len(tokens) - 1:
            token = tokens[i]
            if token.startswith('%') and i == 0:
                # A stamp that is not one is not passed on: the next watch
                # then compares with what it sees when it starts.
                stamp = token[1:] if (len(token) <= MAX_STAMP and
                                      STAMP.fullmatch(token[1:])) else ''
                i += 1
            elif token.startswith('!'):
                refused[token[1:]] = 'not a night directory'
                i += 1
            elif token.startswith('@'):
                mtimes[token[1:]] = float(tokens[i + 1])
                i += 2
            elif token.startswith('='):
                target = tokens[i + 1]
                if not target.endswith('\n'):
                    raise ValueError(f'target of {token[1:]} not terminated')
                targets[token[1:]] = target[:-1]
                i += 2
            elif re.fullmatch(r'#find [0-9]+', token):
                i += 1
            else:
                raise ValueError(f'unexpected {token[:80]!r}')
    except (ValueError, IndexError) as err:
        log.error("The survey of %s returned an unreadable answer (%s).", source, err)
        return unknown
    unknown_nights = {}
    for line in result.stderr.splitlines():
        if not line.startswith('find:'):
            if line.strip():
                log.debug("The survey of %s said: %s", source, line.strip())
            continue
        m = _find_error.match(line.strip())
        path = m.group('path') if m else ''
        night = path[len(prefix):].split('/')[0] if path.startswith(prefix) else ''
        if not valid_night(night):
            log.error("The survey of %s failed: %s", source, line.strip())
            return unknown
        unknown_nights[night] = m.group('why')
    links = {}
    for path, mtime in sorted(mtimes.items()):
        name = path[len(prefix):] if path.startswith(prefix) else path
        if name.split('/')[0] in unknown_nights:
            continue
        why = _refusal(name, targets.get(path), data_root)
        if why:
            refused[name] = why
        else:
            night, expid = name.split('/')
            links[name] = Link(night, expid, targets[path], mtime)
    return Survey('links', links, refused, unknown_nights, result, stamp)


def only(names):
    """rsync filters that copy only the directories `names` of the source."""
    return [f'--include=/{name}/***' for name in names] + ['--exclude=*']


def by_directory(links):
    """The :class:`Link` `links` grouped by the physical directory holding
    their targets (one rsync each), sorted by directory."""
    groups = {}
    for link in links:
        groups.setdefault(posixpath.dirname(link.target), []).append(link)
    return sorted(groups.items())


def parse_sizes(answer, directories):
    """Read the answer of :command:`du --summarize --bytes` for `directories`:
    bytes in each; ``None`` unless it names each of them, and nothing else,
    with a size."""
    sizes = {}
    for line in answer.split('\n')[:-1] if answer.endswith('\n') else [None]:
        size, _, directory = (line or '').partition('\t')
        if not (size.isascii() and size.isdigit()) or directory in sizes:
            return None
        sizes[directory] = int(size)
    return sizes if sorted(sizes) == sorted(directories) else None


def _refusal(name, target, data_root):
    """Why link `name` (``NIGHT/EXPID``) resolving to `target` is not transferred,
    or ``''``."""
    if not valid_link(name):
        return 'not NIGHT/EXPID'
    if target is None:
        return 'its target is not a directory that can be read'
    if not target.startswith('/') or target.split('/')[-2:] != name.split('/'):
        return f'its target {shown(target)} is not a directory {name}'
    if not safe_path(target):
        return (f'its target {shown(target)} is not a path of letters, digits and ._+- '
                '(it would be read as a pattern or a command at the mountain)')
    if data_root and not target.startswith(data_root.rstrip('/') + '/'):
        return f'its target {target} is not under {data_root}'
    return ''


def safe_path(path, relative=False):
    """``True`` if `path`, from the mountain, may be put on a command line.

    Parameters
    ----------
    path : :class:`str`
        An absolute path; with `relative`, a relative one.
    relative : :class:`bool`, optional
        `path` is relative.

    Returns
    -------
    :class:`bool`
        ``True`` if `path` has at most :data:`MAX_PATH` characters and every
        component is letters, digits and ``._+-``, does not start with ``-``,
        and is neither ``.`` nor ``..`` (no empty component: ``/`` alone,
        ``//`` and a trailing ``/`` are refused).
    """
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH:
        return False
    if path.startswith('/') == relative:
        return False
    parts = path.split('/')[0 if relative else 1:]
    return all(_component.fullmatch(p) and p not in ('.', '..') for p in parts)


def shown(path):
    """`path`, from the mountain, as written in a message: as it is if it has
    only the characters of :func:`safe_path` (and ``/``), otherwise quoted and
    escaped as :func:`repr` does, so that it is one line."""
    return path if re.fullmatch(r'[A-Za-z0-9._+/-]*', path) else repr(path)


def links_command(tree, inside='', roots=()):
    """The command (a list of words) running :data:`LINKS_SCRIPT` at the
    mountain for `tree`; see :func:`parse_links` for the other arguments."""
    return ['sh', '-c', LINKS_SCRIPT, 'sh', tree] + ([inside] if inside else []) + list(roots)


def parse_links(result, tree, inside='', roots=()):
    """Read the answer of :data:`LINKS_SCRIPT` (:func:`links_command`): which
    links to directories under `tree` may be followed.

    A link is followed only if its path and its physical target pass
    :func:`safe_path`, and its target is a directory under the tree (or under
    one of `roots`) that does not hold the link itself.  At most
    :data:`MAX_LINKS` are followed.

    Parameters
    ----------
    result : :class:`desitransfer.runner.Result`
        The outcome of the command.
    tree : :class:`str`
        The directory at the mountain that is copied.
    inside : :class:`str`, optional
        If set, `tree` must resolve to a directory under this one (a night of
        nightwatch is under the nightwatch directory, even if it is a link).
    roots : :class:`list`, optional
        Directories at the mountain under which links may resolve, besides
        the tree (from the configuration).

    Returns
    -------
    :class:`Links`
    """
    def unusable(why):
        return Links('', [], {}, why)

    asked = 1 + bool(inside) + len(roots)
    if result.returncode != 0:
        if result.returncode == 3:
            return unusable(f"{tree} is not a directory at the mountain")
        tail = ' '.join(result.stderr.split())[-300:] or 'no message'
        return unusable(f"listing its links failed (return code {result.returncode:d}): {tail}")
    tokens = result.stdout.split('\0')
    if tokens[-1] == '':
        tokens.pop()
    if len(tokens) < asked + 1 or tokens[-1] != '#end':
        return unusable("the list of its links is unreadable")
    physical, found = [], {}
    try:
        for token in tokens[:asked]:
            if not token.startswith('^') or (len(token) > 1 and not token.endswith('\n')):
                raise ValueError(f'unexpected {token[:80]!r}')
            physical.append(token[1:-1] or None)
        i = asked
        while i < len(tokens) - 1:
            token = tokens[i]
            if token.startswith('=./') and tokens[i + 1].endswith('\n'):
                found[token[3:]] = tokens[i + 1][:-1]
                i += 2
            elif re.fullmatch(r'#find [0-9]+', token):
                i += 1
            else:
                raise ValueError(f'unexpected {token[:80]!r}')
    except (ValueError, IndexError) as err:
        log.error("The list of links under %s is unreadable (%s).", tree, err)
        return unusable("the list of its links is unreadable")
    top = physical[0]
    if top is None or not safe_path(top):
        return unusable(f"{tree} resolves to {shown(top or '')}, not a path of letters, "
                        "digits and ._+-")
    if inside and not (physical[1] and top.startswith(physical[1].rstrip('/') + '/')):
        return unusable(f"{tree} resolves to {top}, which is not under {inside}")
    allowed = [top] + [p for p in physical[1 + bool(inside):] if p]
    where = ' or '.join([tree] + list(roots))
    follow, refused = [], {}
    for link, target in sorted(found.items()):
        why = _link_refusal(link, target, top, allowed, where)
        if why:
            refused[link] = why
        elif len(follow) < MAX_LINKS:
            follow.append((link, target))
        else:
            refused[link] = f'more than {MAX_LINKS:d} links to follow'
    return Links(top, follow, refused, '')


def _link_refusal(link, target, top, allowed, where):
    """Why `link` (relative to the tree, physically at `top`) resolving to
    `target` is not followed, or ``''``."""
    if not safe_path(link, relative=True):
        return 'its name is not a path of letters, digits and ._+-'
    if not safe_path(target):
        return f'it resolves to {shown(target)}, not a path of letters, digits and ._+-'
    if not any(target.startswith(a.rstrip('/') + '/') for a in allowed):
        return f'it resolves to {target}, outside {where}'
    if f'{top}/{link}/'.startswith(target + '/'):
        return f'it resolves to {target}, a directory that holds it'
    return ''


def link_copies(follow):
    """The rsync copies that follow the links `follow` (see :class:`Links`).

    Links named as their targets, in the same directory and resolving into
    the same physical directory, are copied together (the layout
    ``NIGHT/EXPID`` of exposures).

    Returns
    -------
    :class:`list`
        ``(directory, into, filters)`` for each copy: the physical directory
        at the mountain, where it goes relative to the copy of the tree, and
        the rsync filters choosing the links' targets in it (empty: all of it).
    """
    groups, copies = {}, []
    for link, target in follow:
        name = posixpath.basename(link)
        if posixpath.basename(target) == name:
            groups.setdefault((posixpath.dirname(target), posixpath.dirname(link)),
                              []).append(name)
        else:
            copies.append((target, link, []))
    for (directory, into), names in groups.items():
        copies.append((directory, into, only(sorted(names))))
    return sorted(copies)
