# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===========================
desitransfer.daemon.remote
===========================

The mountain, as :command:`desi_transfer_daemon` sees it: shared ssh
connections (one for the survey and the first rsync stream, one for each
further stream), a survey of the exposure links with their targets resolved
at the mountain, and the rsync commands that copy from there.

A survey is one round trip: a small POSIX shell script, run at the
mountain, answers whether checksums are being computed (the lock file) and
otherwise lists, for the nights of the recent window only, every link
``SOURCE/NIGHT/EXPID`` with its modification time and, for a link to a
directory, the physical path it resolves to (``cd -P`` and ``pwd -P``: no
program is started per link).  Entries of ``SOURCE`` that are not night
directories are listed too, to be reported.  The answer is NUL-separated and
ends with a marker, so that a truncated or garbled answer is recognised as
*unknown*, never read as "no exposures".
"""
import re
import shlex
import threading
from collections import namedtuple

from ..common import SharedConnection, log, round_trip, run, valid_night
from .state import valid_link

#: Seconds before a remote command is killed.
REMOTE_TIMEOUT = 300

#: Seconds before the question of the sizes of a backlog is abandoned.
SIZES_TIMEOUT = 120

#: Seconds before an rsync is killed; ``--timeout`` stops an rsync that hears nothing.
RSYNC_TIMEOUT = 2 * 3600
RSYNC_IO_TIMEOUT = 600

#: An exposure link at the mountain: its night and exposure, the physical
#: directory it resolves to, and its modification time (Unix seconds).
Link = namedtuple('Link', ['night', 'expid', 'target', 'mtime'])


class Survey(namedtuple('Survey', ['answer', 'links', 'refused', 'unknown_nights',
                                   'result'])):
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
    result : :class:`desitransfer.common.Result`
        The remote command's outcome, for messages.
    """

    @property
    def nights(self):
        """Nights with at least one link."""
        return sorted({link.night for link in self.links.values()})


#: The survey, run by ``sh -c SCRIPT sh SOURCE LOCK NIGHT...`` at the mountain
#: (one line, so that it is logged on one line).
SURVEY_SCRIPT = '; '.join([
    'export LC_ALL=C',
    'cd /',
    'src=$1 lock=$2',
    'shift 2',
    """if [ -e "$lock" ]; then printf '#locked\\0#end\\0'; exit 0; fi""",
    'if [ ! -d "$src" ]; then echo "$src is not a directory" >&2; exit 3; fi',
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
])

#: Most directories in one question of sizes (a bound on its command line).
SIZES_CHUNK = 1000

#: The watch, run by ``sh -c SCRIPT sh SECONDS PATH...`` at the mountain: it
#: answers ``changed`` as soon as the modification time of one of the
#: directories PATH changes (a link added, a night created), or ``quiet``
#: after SECONDS.  It looks once a second, at the mountain: no traffic.
WATCH_SCRIPT = '; '.join([
    'export LC_ALL=C',
    'cd /',
    'n=$1',
    'shift',
    's0=$(stat -c %y -- "$@" 2>/dev/null)',
    'i=0',
    'while [ $i -lt "$n" ]; do sleep 1; s=$(stat -c %y -- "$@" 2>/dev/null); '
    'if [ "$s" != "$s0" ]; then echo changed; exit 0; fi; i=$((i + 1)); done',
    'echo quiet',
])

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
    stop : :class:`desitransfer.common.Stop`
        Interrupts every command.
    """

    def __init__(self, host, ssh, stop):
        self.host = host
        self.ssh = ssh
        self.stop = stop
        self.connection = SharedConnection(host, program=ssh)

    @property
    def name(self):
        return self.host or 'localhost'

    def ssh_command(self, stream=0):
        """The ssh command, sharing one connection (an OpenSSH control master
        kept between passes; ssh makes a new one if it died).  Each rsync
        `stream` after the first has a connection of its own, kept the same
        way, so that it has its own TCP window."""
        return self.connection.ssh(stream)

    def close(self):
        """Stop the shared connections and remove their private directory."""
        self.connection.close()

    def remote(self, words, timeout=REMOTE_TIMEOUT, stream=0):
        """Run the command `words` (a list) at the mountain, over the connection
        of `stream`; ssh's own failure is 255."""
        if not self.host:
            return run(words, timeout=timeout, ok=(0,), quiet=True, stop=self.stop)
        return run(self.ssh_command(stream) + [self.host, shlex.join(words)],
                   timeout=timeout, ok=(0,), quiet=True, stop=self.stop)

    def open_streams(self, streams):
        """Open, in the background, the connections of rsync streams 1 to
        `streams` - 1 that are not open yet (an ssh handshake takes several
        round trips: better while something else is asked)."""
        if not self.host:
            return
        for stream in range(1, streams):
            if not self.connection.is_open(stream):
                # Whatever it answers is not a failure: the rsync of the
                # stream opens it again if needed, and reports what fails.
                command = self.ssh_command(stream) + [self.host, 'true']
                threading.Thread(target=run, args=(command,),
                                 kwargs={'timeout': 120, 'ok': tuple(range(-64, 256)),
                                         'quiet': True, 'stop': self.stop},
                                 name=f'open-stream-{stream:d}', daemon=True).start()

    def rsync(self, source, destination, extra=(), dry_run=False, stream=0):
        """The rsync command copying directory `source` at the mountain into
        `destination`, with `extra` options, over the connection of `stream`.

        Links are not followed (no ``--copy-dirlinks``): `source` is the
        physical directory found by the survey, so nothing outside it is read.
        """
        command = ['/bin/rsync', '--verbose', '--recursive', '--times', '--omit-dir-times',
                   f'--timeout={RSYNC_IO_TIMEOUT:d}'] + list(extra)
        if dry_run:
            command.insert(1, '--dry-run')
        if self.host:
            command.insert(1, '--rsh=' + shlex.join(self.ssh_command(stream)))
            command.append(f'{self.host}:{source}/')
        else:
            command.append(f'{source}/')
        return command + [f'{destination}/']

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
        :func:`desitransfer.common.round_trip`); 0 for a local source,
        ``None`` if it cannot be measured."""
        if not self.host:
            return 0.0
        return round_trip(self.ssh_command(), self.host)

    def watch(self, directories, seconds):
        """Wait up to `seconds` for a change at the mountain.

        Parameters
        ----------
        directories : :class:`list`
            Directories at the mountain whose modification time is watched
            (a transfer area, tonight's directory in it).
        seconds : :class:`int`
            How long to wait at most.

        Returns
        -------
        :class:`bool` or ``None``
            ``True`` if one of them changed, ``False`` if nothing changed in
            `seconds`, ``None`` if the mountain could not be asked (then the
            caller waits on its own).
        """
        result = self.remote(['sh', '-c', WATCH_SCRIPT, 'sh', str(int(seconds))]
                             + list(directories), timeout=seconds + 60)
        answer = result.stdout.strip() if result.returncode == 0 else ''
        return {'changed': True, 'quiet': False}.get(answer)

    def survey(self, source, checksum_lock, nights, data_root=None):
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

        Returns
        -------
        :class:`Survey`
        """
        result = self.remote(['sh', '-c', SURVEY_SCRIPT, 'sh', source, checksum_lock]
                             + list(nights))
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
    i = 0
    try:
        while i < len(tokens) - 1:
            token = tokens[i]
            if token.startswith('!'):
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
    return Survey('links', links, refused, unknown_nights, result)


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
        return f'its target {target} is not a directory {name}'
    if data_root and not target.startswith(data_root.rstrip('/') + '/'):
        return f'its target {target} is not under {data_root}'
    return ''
