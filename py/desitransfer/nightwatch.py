# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=======================
desitransfer.nightwatch
=======================

Entry point for :command:`desi_nightwatch_transfer`.

Sync KPNO nightwatch.  Due to differences in timing and directory structure,
this is kept separate from the raw data transfer daemon.

Every minute (``--sleep``) tonight's directory ``dts:/exposures/nightwatch/NIGHT/``
is synced into ``$DESI_ROOT/spectro/nightwatch/kpno/NIGHT/``, its permissions
are reset for the collaboration, and the top-level pages are synced and made
world-readable.  Between 08:00 and 12:00 MST nothing is observed: the night
that is ending is synced one last time, and the loop sleeps until noon.

The nightwatch tree is opened to the collaboration and served on the web, so
nothing from outside the night's directory at the mountain may reach it: the
links to directories in the night are listed and resolved at the mountain
first (:func:`desitransfer.mountain.parse_links`), and only those that
resolve inside the night are followed; no other link is followed or copied,
and a top-level page that is a link out of the nightwatch directory is not
copied (``--safe-links``).

Catch-up on a specific night::

    desi_nightwatch_transfer --once --night 20200124

By-hand startup sequence (bash shell)::

    source /global/common/software/desi/desi_environment.sh datatran
    module load desitransfer
    nohup nice -19 ${DESITRANSFER}/bin/desi_nightwatch_transfer &> /dev/null &
    tail -f ${DESI_ROOT}/spectro/nightwatch/desi_nightwatch_transfer.log
"""
import errno
import fnmatch
import math
import os
import shlex
import stat
import sys
import time
from argparse import ArgumentParser, ArgumentTypeError
from collections import deque
from importlib.resources import files

from . import __version__ as dtVersion
from . import common
from .alerts import alert_options, configure_log
from .common import idle_time, log, today, valid_night
from .processes import Stop, exclusively, repeat
from .runner import run
from .rsynccommand import RSYNC_DONE, RSYNC_IO_TIMEOUT, RSYNC_VANISHED, rsync_command
from .transport import SharedConnection
from .mountain import (LINKS_ANSWER_LIMIT, LINKS_TOLD, link_copies, links_command,
                       parse_links, shown)

#: Nightwatch output at the mountain (ssh host alias ``dts``), one directory a night.
SOURCE = '/exposures/nightwatch'

#: Seconds before an rsync, a listing or :command:`fix_permissions.sh` is killed.
RSYNC_TIMEOUT = 3600
LIST_TIMEOUT = 300
PERMISSION_TIMEOUT = 1800

#: Mode of the top-level files: world-readable, for the web.
TOP_LEVEL_MODE = 0o644

#: Errors are counted over this many seconds for alerts.
ERROR_WINDOW = 3600

#: Refusals remembered (each said once); past that they are forgotten and said again.
MAX_TOLD = 10000

#: Subject of the alert emails: the one the collaboration's mail filters know
#: for this command (the other commands say ``Error reported by ...``).
ALERT_SUBJECT = 'Critical error reported by desi_nightwatch_transfer!'


def _nightwatch():
    """``$DESI_ROOT/spectro/nightwatch``."""
    return os.path.join(os.environ['DESI_ROOT'], 'spectro', 'nightwatch')


def _configure_log(debug, to=None, mailhost='localhost:25'):
    """Re-configure the default logger returned by ``desiutil.log``.

    The log file is ``$DESI_ROOT/spectro/nightwatch/desi_nightwatch_transfer.log``
    (its directory is created if missing), rotated at 100 MB, 100 kept.

    Parameters
    ----------
    debug : :class:`bool`
        If ``True`` set the log level to DEBUG.
    to : :class:`list`, optional
        Email CRITICAL messages to these addresses (each message at most
        once in six hours, remembered across runs), with the subject
        :data:`ALERT_SUBJECT`.
    mailhost : :class:`str`, optional
        SMTP server as ``host:port``.
    """
    top = _nightwatch()
    configure_log(debug=debug, filename=os.path.join(top, 'desi_nightwatch_transfer.log'),
                  size=100_000_000, backups=100, to=to, mailhost=mailhost,
                  program='desi_nightwatch_transfer', subject=ALERT_SUBJECT,
                  memory=os.path.join(top, 'desi_nightwatch_transfer_alerts.json'))


def _patterns(name):
    """Path of the shipped file `name` and the lines in it that are not
    blank or comments (``#`` or ``;``, as for :command:`rsync`)."""
    resource = files('desitransfer') / 'data' / name
    lines = [line.strip() for line in resource.read_text().splitlines()]
    return str(resource), [line for line in lines if line and line[0] not in '#;']


class NightwatchTransfer(object):
    """The loop of :command:`desi_nightwatch_transfer`.

    Parameters
    ----------
    options : :class:`argparse.Namespace`
        The parsed command-line options.
    """

    def __init__(self, options):
        self.options = options
        top = _nightwatch()
        self.kpno = os.path.join(top, 'kpno')
        self.log_file = os.path.join(top, 'desi_nightwatch_transfer.log')
        self.lock_file = os.path.join(top, 'desi_nightwatch_transfer.lock')
        self.exclude, self.excluded = _patterns('desi_nightwatch_transfer_exclude.txt')
        self.top_level = _patterns('desi_nightwatch_transfer_include.txt')[1]
        self.stop = Stop(options.kill)
        self.connection = SharedConnection()
        self.errors = 0
        self._recent = deque()
        self._alerted = None
        self._last_night = None
        self._final = None
        self._told = set()

    def run(self):
        """Refuse a second copy, then loop until stopped.

        Returns
        -------
        :class:`int`
            An exit status.
        """
        return exclusively('desi_nightwatch_transfer', self.lock_file, self._work)

    def _work(self):
        self.stop.handle_signals()
        log.info("desi_nightwatch_transfer %s starts: dts:%s/%s -> %s, every %g minute(s).",
                 dtVersion, SOURCE, self.options.night or 'NIGHT', self.kpno,
                 self.options.sleep)
        try:
            return self.loop()
        finally:
            self.connection.close()
            log.info("desi_nightwatch_transfer stops (%s).", self.stop.reason or 'done')

    def loop(self):
        """Run :meth:`run_once` and pause, until SIGTERM or the kill file.

        Returns
        -------
        :class:`int`
            0, or with ``--once`` 1 if the iteration had errors.
        """
        last = repeat(self.run_once, lambda result: self.stop.wait(result[1]), self.stop,
                      self.options.once)
        return 1 if self.options.once and last is not None and last[0] else 0

    def run_once(self):
        """One iteration; an unexpected error is logged and counted, never fatal.

        Returns
        -------
        :class:`tuple`
            The number of errors and the seconds to pause before the next iteration.
        """
        start, before = time.monotonic(), self.errors
        try:
            pause = self._iteration()
        except Exception as err:
            self._error("Unexpected %s: %s; trying again in %g minute(s).",
                        type(err).__name__, err, self.options.sleep, exc_info=True)
            pause = None
        if pause is None:
            pause = max(0.0, self.options.sleep * 60 - (time.monotonic() - start))
        return self.errors - before, pause

    def _iteration(self):
        """Sync the right night; return the seconds of an idle pause, or ``None``."""
        if self.options.night:
            self.sync(self.options.night, required=True)
            return None
        idle = idle_time()
        night = today()
        if idle > 0:
            # 08:00-12:00 MST: the night is ending (it rolls over at noon).
            if self._final != night:
                log.info("The idle window (08:00-12:00 MST) begins: final sync of night %s.",
                         night)
                self._final = self._last_night = night
                self.sync(night)
            log.info("Idle until 12:00 MST, %d seconds from now.", idle)
            return idle
        if self._last_night not in (None, night):
            # Files written to the night that ended after its final sync.
            log.info("Night %s has ended: one last sync of it.", self._last_night)
            self.sync(self._last_night)
        self._last_night = night
        self.sync(night)
        return None

    # ------------------------------------------------------------------
    # The steps of a sync.
    # ------------------------------------------------------------------
    def _rsync(self, options, sources, destination=None, timeout=RSYNC_TIMEOUT):
        """Run an rsync from the mountain through the shared connection."""
        command = rsync_command(options, sources, destination, ssh=self.connection.ssh(),
                                io_timeout=RSYNC_IO_TIMEOUT)
        return run(command, timeout=timeout, ok=RSYNC_DONE, stop=self.stop, quiet=True)

    def _failed(self, result):
        """``True`` if `result` is a failure, not a stop that was asked for."""
        return result.returncode not in RSYNC_DONE and not self.stop.is_set()

    def _find(self, night):
        """``True`` if `night` is a directory at the mountain, ``False`` if
        not, ``None`` if the mountain could not be asked."""
        result = self._rsync(['--list-only'], [f'dts:{SOURCE}/'], timeout=LIST_TIMEOUT)
        if result.returncode not in RSYNC_DONE:
            if self._failed(result):
                self._error("Could not list dts:%s/ to look for night %s (rsync exit status "
                            "%d): %s; trying again in %g minute(s).", SOURCE, night,
                            result.returncode, result.stderr.strip()[-300:], self.options.sleep)
            return None
        for line in result.stdout.splitlines():
            # drwxrwsr-x          4,096 2024/01/01 19:00:00 20240101
            fields = line.split(None, 4)
            if len(fields) == 5 and fields[4] == night and fields[0][:1] in ('d', 'l'):
                return True
        return False

    def sync(self, night, required=False):
        """Sync one night, reset its permissions, sync the top-level files.

        Parameters
        ----------
        night : :class:`str`
            The night, YYYYMMDD.
        required : :class:`bool`, optional
            If ``True``, a night missing at the mountain is an error.
        """
        found = self._find(night)
        if found is False:
            if required:
                self._error("Night %s is not in dts:%s/; nothing to sync.", night, SOURCE)
            else:
                log.info("No nightwatch data for night %s at dts:%s/ yet; looking again in "
                         "%g minute(s).", night, SOURCE, self.options.sleep)
        if not found:
            return
        links = self._links(night)
        if links is None:
            return
        night_dir = os.path.join(self.kpno, night)
        os.makedirs(self.kpno, exist_ok=True)
        log.info("Syncing night %s.", night)
        if self._copy(night, links.tree, night_dir):
            for directory, into, filters in link_copies(links.follow):
                if self.stop.is_set():
                    break
                destination = os.path.join(night_dir, into) if into else night_dir
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                self._copy(night, directory, destination, filters,
                           f" (links followed into {into or '.'})")
        if self.stop.is_set():
            return
        if not self.options.permission:
            log.debug("Not resetting permissions of %s (--no-permission).", night_dir)
        elif os.path.isdir(night_dir):
            result = run(['fix_permissions.sh', night_dir], timeout=PERMISSION_TIMEOUT,
                         stop=self.stop, quiet=True)
            if result.returncode != 0 and not self.stop.is_set():
                self._error("Resetting permissions of %s failed (fix_permissions.sh exit "
                            "status %d): %s.", night_dir, result.returncode,
                            (result.stderr or result.stdout).strip()[-300:])
        if not self.stop.is_set():
            self._sync_top_level()

    def _links(self, night):
        """The links to directories in `night` at the mountain, resolved there
        (:class:`desitransfer.mountain.Links`), those to follow without
        the ones the exclude list leaves out; ``None`` if the night is not
        to be synced now (the mountain could not be asked, or the night is
        not a directory inside the nightwatch directory)."""
        tree = f'{SOURCE}/{night}'
        command = self.connection.ssh() + ['dts', shlex.join(links_command(tree, SOURCE))]
        result = run(command, timeout=LIST_TIMEOUT, ok=(0, 3), stop=self.stop, quiet=True,
                     limit=LINKS_ANSWER_LIMIT)
        if result.returncode not in (0, 3):
            if self._failed(result):
                self._error("Could not list the links of night %s at dts:%s (exit status %d): "
                            "%s; trying again in %g minute(s).", night, tree,
                            result.returncode, result.stderr.strip()[-300:], self.options.sleep)
            return None
        links = parse_links(result, tree, SOURCE)
        if links.why:
            self._refuse(f"Night {night} is not synced: {links.why}.")
            return None
        follow = []
        for link, target in links.follow:
            inside = os.path.relpath(target, links.tree)
            if self._excluded(link) or self._excluded(inside):
                log.debug("Link %s/%s -> %s is excluded.", tree, link, target)
            else:
                follow.append((link, target))
        refused = [(link, why) for link, why in sorted(links.refused.items())
                   if not self._excluded(link)]
        for link, why in refused[:LINKS_TOLD]:
            self._refuse(f"Link {tree}/{shown(link)} is not followed: {why}.")
        if len(refused) > LINKS_TOLD:
            self._refuse(f"{len(refused) - LINKS_TOLD:d} more links of night {night} are not "
                         "followed.")
        return links._replace(follow=follow)

    def _excluded(self, path):
        """``True`` if a component of `path` (relative) matches a pattern of
        the exclude list (each pattern is a name, matched at every level, as
        rsync does for a pattern without ``/``)."""
        parts = path.split('/')
        return any(fnmatch.fnmatchcase(part, pattern.rstrip('/'))
                   for pattern in self.excluded for part in parts)

    def _refuse(self, message):
        """An error, said once by this process; after that a DEBUG line."""
        if message in self._told:
            log.debug("%s", message)
            return
        if len(self._told) >= MAX_TOLD:
            self._told.clear()
        self._told.add(message)
        self._error("%s", message)

    def _copy(self, night, directory, destination, filters=(), what=''):
        """rsync `directory` at the mountain (a physical path, checked) into
        `destination`, following no link; ``True`` unless it failed."""
        result = self._rsync(['--verbose', '--recursive', '--times', '--omit-dir-times',
                              '--exclude-from', self.exclude] + list(filters),
                             [f'dts:{directory}/'], f'{destination}/')
        if result.returncode == RSYNC_VANISHED:
            log.warning("Some files of night %s%s vanished at the mountain while it was "
                        "synced (rsync exit status 24); the next sync takes what is there "
                        "then.", night, what)
        elif self._failed(result):
            self._error("Syncing night %s%s from dts:%s failed (rsync exit status %d): %s; "
                        "trying again in %g minute(s).", night, what, directory,
                        result.returncode, result.stderr.strip()[-300:], self.options.sleep)
        return result.returncode in RSYNC_DONE

    def _sync_top_level(self):
        """Sync the top-level files of the include list; make them world-readable."""
        # The names of the include list as sources: the same files as the
        # original's --files-from, without rsync's --relative that it implies.
        # --safe-links: a link out of the nightwatch directory is not copied.
        result = self._rsync(['--verbose', '--links', '--safe-links', '--times'],
                             [f'dts:{SOURCE}/{name}' for name in self.top_level], f'{self.kpno}/')
        if self._failed(result):
            self._error("Syncing the top-level files %s from dts:%s/ failed (rsync exit "
                        "status %d): %s.", ', '.join(self.top_level), SOURCE,
                        result.returncode, result.stderr.strip()[-300:])
        for name in self.top_level:
            path = os.path.join(self.kpno, name)
            unsafe = f'ignoring unsafe symlink "{name}"' in result.stdout
            if unsafe:
                self._refuse(f"Top-level file dts:{SOURCE}/{name} is a link out of "
                             f"dts:{SOURCE}; it is not copied.")
            try:
                if not _world_readable(path):
                    target = os.readlink(path) if os.path.islink(path) else ''
                    if target.startswith('/') or '..' in target.split('/'):
                        self._refuse(f"Top-level file {path} is a link out of {self.kpno} "
                                     f"(to {target}); remove it.")
            except FileNotFoundError:
                if not unsafe:
                    log.warning("Top-level file %s is not at NERSC (is it at dts:%s/?).",
                                path, SOURCE)
            except OSError as err:
                self._error("Could not make %s world-readable: %s.", path, err)

    # ------------------------------------------------------------------
    # Errors and alerts.
    # ------------------------------------------------------------------
    def _error(self, message, *args, exc_info=False):
        """Log an error; alert when more than ``--alert-after-errors`` errors
        happened within the last hour, then again only after an hour in which
        errors continued (the email itself at most once in six hours)."""
        log.error(message, *args, exc_info=exc_info)
        self.errors += 1
        now = common._utcnow()
        self._recent.append(now)
        while (now - self._recent[0]).total_seconds() >= ERROR_WINDOW:
            self._recent.popleft()
        if len(self._recent) <= self.options.maxerrors:
            return
        if self._alerted is not None and (now - self._alerted).total_seconds() < ERROR_WINDOW:
            return
        self._alerted = now
        log.critical("More than %d errors within an hour transferring nightwatch data from "
                     "dts:%s to %s; desi_nightwatch_transfer keeps trying every %g "
                     "minute(s); see the ERROR lines of %s.", self.options.maxerrors,
                     SOURCE, self.kpno, self.options.sleep, self.log_file)


def _world_readable(path):
    """Give the regular file `path` the mode :data:`TOP_LEVEL_MODE`, never
    through a link: the file is opened without following a link, then
    changed through that descriptor.

    Returns
    -------
    :class:`bool`
        ``False`` if `path` is not a regular file (a link is left alone, and
        what it points to is not changed).
    """
    # O_PATH opens a file whatever its mode (chmod needs no read access), and
    # with O_NOFOLLOW a link itself, which fstat then tells apart.
    o_path = getattr(os, 'O_PATH', 0)
    flags = (o_path or os.O_RDONLY | os.O_NONBLOCK) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return False
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        if stat.S_IMODE(st.st_mode) != TOP_LEVEL_MODE:
            if o_path:
                # The descriptor's own file (fchmod does not take an O_PATH descriptor).
                os.chmod(f'/proc/self/fd/{fd:d}', TOP_LEVEL_MODE)
            else:
                os.fchmod(fd, TOP_LEVEL_MODE)
        return True
    finally:
        os.close(fd)


def _count(value):
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ArgumentTypeError(f"{value!r} is not a whole number, 0 or more")
    return n


def _minutes(value):
    try:
        m = float(value)
    except ValueError:
        m = math.nan
    if not (0 < m < math.inf):
        raise ArgumentTypeError(f"{value!r} is not a positive number of minutes")
    return m


def _night(value):
    if not valid_night(value):
        raise ArgumentTypeError(f"{value!r} is not a night, YYYYMMDD")
    return value


def _options(args=None):
    """Parse command-line options for :command:`desi_nightwatch_transfer`.

    Parameters
    ----------
    args : :class:`list`, optional
        Command-line arguments; ``sys.argv[1:]`` if not set.

    Returns
    -------
    :class:`argparse.Namespace`
        The parsed command-line options.
    """
    desc = "Transfer DESI nightwatch data files from KPNO to NERSC all night."
    prsr = ArgumentParser(prog=os.path.basename(sys.argv[0]), description=desc)
    prsr.add_argument('-d', '--debug', action='store_true',
                      help="Set log level to DEBUG.")
    prsr.add_argument('-e', '--alert-after-errors', metavar='N', type=_count, default=10,
                      dest='maxerrors',
                      help="Email an alert when more than N errors happen within an hour "
                           "(default %(default)s).")
    prsr.add_argument('-k', '--kill', metavar='FILE',
                      default=os.path.expanduser(os.path.join('~', 'stop_desi_transfer')),
                      help="Exit the script when FILE is detected (default %(default)s).")
    prsr.add_argument('--night', metavar='YYYYMMDD', type=_night,
                      help="Sync this night instead of tonight, at any time of day "
                           "(catch-up by hand, usually with --once).")
    prsr.add_argument('--once', action='store_true',
                      help="Make one iteration, then exit: 0 if it had no error, 1 otherwise.")
    prsr.add_argument('-P', '--no-permission', action='store_false', dest='permission',
                      help="Do not set permissions for DESI collaboration access.")
    prsr.add_argument('-s', '--sleep', metavar='M', type=_minutes, default=1,
                      help="Sleep M minutes before checking for new data "
                           "(default %(default)s minute).")
    alert_options(prsr)
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    options = prsr.parse_args(args)
    if not os.environ.get('DESI_ROOT'):
        prsr.error("DESI_ROOT is not set; the data and the log go under "
                   "$DESI_ROOT/spectro/nightwatch")
    return options


def main():
    """Entry point for :command:`desi_nightwatch_transfer`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`.
    """
    options = _options()
    _configure_log(options.debug, to=options.alert_to, mailhost=options.smtp)
    return NightwatchTransfer(options).run()
