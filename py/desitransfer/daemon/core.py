# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=========================
desitransfer.daemon.core
=========================

:class:`TransferDaemon`: the loop of :command:`desi_transfer_daemon` and one
pass, which for each destination reads as survey → copy-verify → record →
install → catch-up → archive.  The steps live in the sibling modules:
:mod:`~desitransfer.mountain` (survey), :mod:`~desitransfer.daemon.transfer`
(copy-verify), :mod:`~desitransfer.daemon.settle` (record, install, retry,
alert), :mod:`~desitransfer.streams` (how many rsync streams, owned by the
mountain),
:mod:`~desitransfer.daemon.nights` (catch-up, archive) with
:mod:`~desitransfer.tape` (HPSS), and
:mod:`~desitransfer.daemon.state`; every change goes through
:mod:`~desitransfer.executor`, which is also test mode.
"""
import argparse
import datetime as dt
import errno
import os
import time

from .. import common
from ..alerts import configure_log
from ..common import ensure_scratch, log, valid_night
from ..processes import Stop, repeat
from ..text import one_line, shown, some
from ..configuration import ConfigurationError, read_configuration
from ..store import TransferStatus
from ..executor import for_mode, listdir
from ..tape import Archive
from .nights import Nights, due
from ..nersc import installed
from ..mountain import Mountain
from .report import MorningReport
from .settle import Settler
from .state import STATE_FILE, State, valid_link
from .transfer import COPIED, FATAL, fatal


class Pass(object):
    """What one pass has done so far, made anew for each pass.

    Attributes
    ----------
    surveys : :class:`dict`
        Destination name -> the :class:`~desitransfer.mountain.Survey` of the pass.
    copied : :class:`set`
        ``NIGHT/EXPID`` copied, verified and installed in this pass.
    caught_up : :class:`set`
        Nights caught up in this pass.
    nights : :class:`dict`
        Destination name -> nights of the recent window in it (listed once).
    failed : :class:`bool`
        ``True`` if a step could not do its job (``--once`` exits 1).
    """

    def __init__(self):
        self.surveys = {}
        self.copied = set()
        self.caught_up = set()
        self.nights = {}
        self.failed = False


#: Longest watch at the mountain, in seconds, while exposures are copied (a
#: change ends it at once; the end of the copy too).
ARRIVALS_WATCH = 60


def _complete(options):
    """`options` with every attribute the daemon reads, defaults for the
    missing ones: a namespace built for the original package (without
    ``once``) or with ``no_backup`` instead of ``backup`` is accepted."""
    values = {'configuration': None, 'debug': False, 'test': False, 'once': False,
              'kill': os.path.expanduser('~/stop_desi_transfer')}
    values.update(vars(options))
    if 'backup' not in values:
        values['backup'] = not values.get('no_backup', False)
    values['backup'] = bool(values['backup'])
    return argparse.Namespace(**values)


class TransferDaemon(object):
    """Manage data transfer configuration, options, and operations.

    Parameters
    ----------
    options : :class:`argparse.Namespace`
        The parsed command-line options (:func:`~desitransfer.daemon.cli._options`):
        ``backup``, ``configuration``, ``debug``, ``kill``, ``test`` and
        ``once``.  A namespace without ``once`` (the original's options)
        loops; ``no_backup`` is read where ``backup`` is absent.

    Raises
    ------
    ConfigurationError
        If the configuration cannot be used.
    """

    def __init__(self, options):
        self.options = options = _complete(options)
        self.test = options.test
        self.tape = options.backup
        self.directories, self.conf, self.log_conf = read_configuration(options.configuration)
        try:
            self.scratch = ensure_scratch(self.conf['temporary'])
        except FileNotFoundError as err:
            raise ConfigurationError(f"[common] temporary: {err}") from None
        self.top = os.path.dirname(self.directories[0].staging)
        self.stop = Stop(options.kill)
        self.actions = for_mode(self.test, self.stop)
        self._configure_log(options.debug)
        self.state = State(os.path.join(self.top, STATE_FILE),
                           [d.name for d in self.directories], keep_bad=not self.test)
        # The round trip (streams = auto) is kept with the first destination.
        kept = self.state[self.directories[0].name]

        def remember(rtt):
            kept['round_trip'] = round(rtt, 6)  # saved with the state
        self.mountain = Mountain(self.conf['host'], self.conf['ssh'], self.stop,
                                 streams=self.conf['streams'], round_trip=kept['round_trip'],
                                 remember=remember)
        self.archive = Archive(self.conf['hpss'], self.conf['hpss_status'], self.scratch,
                               self.actions)
        self.lock_file = os.path.join(self.top, 'desi_transfer_daemon.lock')
        self.settler = Settler(self.state, self.mountain, self.actions, self.conf['retries'],
                               self._window)
        self.night_end = Nights(self.state, self.mountain, self.actions, self.archive,
                                self.settler, self.conf, self.tape, self.stop, self._window,
                                self._recent_nights)
        self.this_pass = Pass()
        # The survey made by the watch that ended the last wait:
        # (destination, window, survey), or None.
        self._watched_survey = None
        self.reports = MorningReport(self.directories, self.conf, self.log_conf, self.state,
                                     self.actions, self.stop, self.tape, self._status,
                                     self._recent_nights)

    def _configure_log(self, debug):
        """Re-configure the default logger returned by ``desiutil.log``.

        Parameters
        ----------
        debug : :class:`bool`
            If ``True`` set the log level to DEBUG.
        """
        c = self.log_conf
        filename, to = self.actions.logging(c['filename'], c['to'])
        configure_log(debug=debug, filename=filename,
                      size=c['size'], backups=c['backups'], to=to,
                      mailhost=c['smtp'], program='desi_transfer_daemon',
                      memory=os.path.join(self.top, 'desi_transfer_daemon_alerts.json'))

    # ------------------------------------------------------------------
    # The loop.
    # ------------------------------------------------------------------
    def run(self):
        """Run the daemon: refuse a second copy, then :meth:`transfer` once per
        pass, sleeping between passes until stopped (one pass with ``--once``).

        Returns
        -------
        :class:`int`
            0; with ``--once``, 1 if the pass could not do its job.
        """
        self.actions.start()
        return self.actions.exclusively('desi_transfer_daemon', self.lock_file, self._work)

    def _work(self):
        """The run, holding the lock."""
        for directory in [self.top] + [self._status_directory(d) for d in self.directories]:
            self.actions.sweep_temporary(directory)
        self._save_state()
        if self.stop.is_set():
            self._kill_file_left()
        self._loop()
        return 1 if self.options.once and self.this_pass.failed else 0

    def _save_state(self):
        """Save the state; a failure is an ERROR, not the end of the run."""
        try:
            self.actions.save(self.state)
        except OSError as err:
            log.error("Could not write the state file %s: %s.", self.state.path, err)

    def _loop(self):
        """Pass, sleep and pass again until SIGTERM or the kill file stops the
        loop; with ``--once``, one pass.  A pass that fails is logged with its
        traceback and the next pass still runs."""
        if self.state.new:
            self._first_start()
        try:
            repeat(self.transfer, lambda _: self._wait(self.conf['sleep']), self.stop,
                   self.options.once)
            if self.mountain.planner.settle(stopping=self.stop.is_set()):
                self._save_state()  # the round trip measured, for the next run
        finally:
            self.mountain.close()
        log.info("desi_transfer_daemon stops.")

    def transfer(self):
        """Loop over and transfer all configured directories: one pass.

        :meth:`run` calls it once per pass, sleeping in between.  A
        destination whose pass fails is logged with its traceback; the others
        still run.
        """
        self._pass()

    def _wait(self, seconds):
        """Wait `seconds` for the next pass, or less: while it waits, the
        mountain is watched (over the shared connection) and the wait ends as
        soon as a link is added to, or removed from, a night of the recent
        window, or a night is created, since the survey of the pass."""
        log.debug("Sleeping %g seconds, or until a new exposure is linked.", seconds)
        deadline = time.monotonic() + seconds
        self._watched_survey = None  # Only the survey of this wait's watch serves.
        if seconds >= 2:
            window = self._window()
            surveys = [self.this_pass.surveys.get(d.name) for d in self.directories]
            seen = [survey.stamp if survey is not None else '' for survey in surveys]
            # Compared with what the pass's surveys saw, a link made while the
            # pass ran ends the wait at once; without a survey of each
            # destination, with what the watch sees first.
            since = ''.join(seen) if all(seen) else ''
            if len(self.directories) == 1:
                # The watch surveys as soon as it sees a change, in the same
                # command: the pass it starts begins with that survey.
                d = self.directories[0]
                found = self.mountain.watch_survey(seconds - 1, since, d.source,
                                                   self.conf['checksum_lock'], window,
                                                   d.data_root)
                changed = None if found is None else found is not False
                if changed and found.answer == 'links':
                    self._watched_survey = (d.name, window, found)
            else:
                watched = [path for d in self.directories for path in self._watched(d, window)]
                changed = self.mountain.watch(watched, seconds - 1, since)
            if changed:
                log.debug("New at %s: the next pass starts now.", self.mountain.name)
                return
            if changed is None and not self.stop.is_set():
                log.debug("Could not watch %s; sleeping.", self.mountain.name)
        self.stop.wait(max(0.0, deadline - time.monotonic()))

    def _pass(self):
        self.this_pass = Pass()
        self.archive.new_pass()
        self.state.forget_before(self._oldest())
        for d in self.directories:
            if self.stop.is_set():
                return
            try:
                self.directory(d)
            except OSError as err:
                self.this_pass.failed = True
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    self.settler.disk_full(d, str(err))
                else:
                    log.critical("Transfer pass of %s failed: %s: %s; the next pass will "
                                 "try again.", d.name, type(err).__name__, err, exc_info=True)
            except Exception as err:
                self.this_pass.failed = True
                log.critical("Transfer pass of %s failed: %s: %s; the next pass will try "
                             "again.", d.name, type(err).__name__, err, exc_info=True)
        try:
            self.reports.send()
        except Exception as err:
            log.error("The morning report failed: %s: %s; the next pass will try again.",
                      type(err).__name__, err, exc_info=True)

    def _kill_file_left(self):
        """Say once a day, by email, that the kill file keeps the daemon from working:
        a kill file forgotten after maintenance would stop transfers silently."""
        now = common._utcnow()
        if not self.state.first_time(self.directories[0].name, f"{now:%Y%m%d} kill file"):
            return
        log.critical("On %s UTC %s exists, so desi_transfer_daemon stops as soon as it starts "
                     "and transfers nothing; remove it to let transfers resume.",
                     f"{now:%Y-%m-%d}", self.options.kill)
        self.actions.save(self.state)

    def _first_start(self):
        """Say once how many settled nights a new deployment leaves alone."""
        oldest = self._oldest()
        for d in self.directories:
            old = sorted(n for n in listdir(d.destination) if valid_night(n) and n < oldest)
            if old:
                log.info("No state file yet (%s): the %d nights in %s before %s (%s to %s) "
                         "are settled history and are not transferred, caught up, archived "
                         "or alerted about.", self.state.path, len(old), d.destination,
                         oldest, old[0], old[-1])

    # ------------------------------------------------------------------
    # Time.
    # ------------------------------------------------------------------
    def _oldest(self):
        """The first night of the recent window."""
        return self._window()[0]

    def _window(self):
        """Every night of the recent window, up to tomorrow (UTC)."""
        now = common._utcnow()
        return [(now - dt.timedelta(days=n)).strftime('%Y%m%d')
                for n in range(self.conf['recent'], -2, -1)]

    # ------------------------------------------------------------------
    # One destination.
    # ------------------------------------------------------------------
    def _status_directory(self, d):
        return os.path.join(os.path.dirname(d.staging), 'status')

    def _status(self, d):
        """The status store of `d`, read only when it is first used (a pass with
        nothing to record does not read a year of records); ``None`` in test
        mode if it does not exist yet."""
        directory = self._status_directory(d)
        return self.actions.status(directory, lambda: _Lazy(lambda: TransferStatus(directory)))

    def _recent_nights(self, d):
        """Nights in the destination from the recent window: one listing per
        pass (again after an install), compared as strings first, so that
        years of history cost next to nothing."""
        if d.name not in self.this_pass.nights:
            oldest = self._oldest()
            try:
                names = os.listdir(d.destination)
            except OSError:
                names = []
            self.this_pass.nights[d.name] = sorted(
                n for n in names if len(n) == 8 and n >= oldest and valid_night(n))
        return list(self.this_pass.nights[d.name])

    def directory(self, d):
        """Data transfer operations for a single destination directory.

        Parameters
        ----------
        d : :func:`collections.namedtuple`
            Configuration for the destination directory.
        """
        status = self._status(d)
        self.settler.replay_pending(d, status)
        log.debug("Looking for new exposures in %s.", d.source)
        # One connection to the mountain for a pass that finds nothing new:
        # the connections of further streams are opened only for a backlog
        # (see desitransfer.streams.StreamPlanner.streams).
        survey = self._survey(d)
        if survey.answer == 'unknown':
            if not self.stop.is_set():
                self.settler.unreachable(d, f"list the exposures in {d.source}",
                                         survey.result.stderr, self.this_pass)
            return
        if survey.answer == 'locked':
            log.info("Checksums are being computed at %s (%s exists); waiting for the next "
                     "pass.", self.mountain.name, self.conf['checksum_lock'])
            return
        self.settler.reachable(d)
        # Over the connection the survey opened, in the background: a backlog
        # found by a later pass (or run) knows its number of streams at once.
        self.mountain.planner.measure()
        self.this_pass.surveys[d.name] = survey
        self.settler.unlisted(d, survey, self.this_pass)
        self.settler.report(d, survey)
        state = self.state[d.name]
        # The newest night first: tonight's exposures go ahead of a backlog.
        todo = [link for name, link in sorted(survey.links.items(),
                                              key=lambda item: (-int(item[1].night), item[0]))
                if name not in state['given_up'] and
                (name in state['retries'] or not installed(d, link))]
        if todo and not self._copy(d, todo, status, self._arrivals(d, survey, todo)):
            return
        due_now = self.night_end.due_for_archive(d)
        if due_now:
            # Nights already on tape (a new deployment) need no catch-up.
            self.night_end.archive_due(d, status, due_now, self.this_pass, on_tape_only=True)
        for night in self._recent_nights(d):
            if self.stop.is_set():
                return
            if (night not in state['caught_up'] and night not in state['backed_up'] and
                    night in survey.nights and due(night, self.conf['catchup'])):
                if not self.catchup(d, night, status):
                    return
                state['caught_up'].append(night)
                self.this_pass.caught_up.add(night)
                self.actions.save(self.state)
        due_now = self.night_end.due_for_archive(d)
        if due_now:
            self.night_end.archive_due(d, status, due_now, self.this_pass)

    def _survey(self, d):
        """The survey of `d` for this pass: the one made by the watch that
        started it, if that watch looked at the same window, else a new one."""
        window = self._window()
        watched, self._watched_survey = self._watched_survey, None
        if watched is not None and watched[:2] == (d.name, window):
            return watched[2]
        return self.mountain.survey(d.source, self.conf['checksum_lock'], window, d.data_root)

    @staticmethod
    def _watched(d, window):
        """What a watch of `d` looks at, in the order of its survey's stamp:
        the transfer area and the nights of `window` in it."""
        return [d.source] + [os.path.join(d.source, n) for n in window]

    def _arrivals(self, d, survey, todo):
        """What learns, while `todo` is copied, of exposures linked
        at the mountain since `survey`: as the watch between passes does, it
        waits for a change of the transfer area or of a night of the window,
        then surveys again and passes on the links neither in `todo` nor
        installed nor given up (see :func:`~desitransfer.daemon.transfer.copy_verify`)."""
        known = {f'{link.night}/{link.expid}' for link in todo}
        given_up = set(self.state[d.name]['given_up'])
        window = self._window()

        def arrivals(done, add, stream):
            since = survey.stamp
            while since and not done.is_set():
                # The watch and, after a change, the survey: one command.
                again = self.mountain.watch_survey(ARRIVALS_WATCH, since, d.source,
                                                   self.conf['checksum_lock'], window,
                                                   d.data_root, stop=done, stream=stream)
                if done.is_set():
                    return
                if again is None:
                    done.wait(ARRIVALS_WATCH)  # Unknown: the next pass finds them.
                    continue
                if again is False:
                    continue  # Quiet.
                if again.answer != 'links':
                    done.wait(1)  # Checksums are being computed, or no answer.
                    continue
                since = again.stamp
                new = [link for name, link in sorted(again.links.items())
                       if name not in known and name not in given_up and
                       not installed(d, link)]
                if new:
                    known.update(f'{link.night}/{link.expid}' for link in new)
                    log.info("%d exposure%s linked at %s during the copy of %d other%s "
                             "(%s): copied at once, ahead of them.", len(new),
                             '' if len(new) == 1 else 's', self.mountain.name, len(todo),
                             '' if len(todo) == 1 else 's',
                             some([f'{link.night}/{link.expid}' for link in new]))
                    add(new)
        return arrivals

    def _copy(self, d, links, status, arrivals=None):
        """Copy-verify `links`, then settle their outcomes; ``False`` if the
        pass must end (the mountain lost, a full disk, a stop).  With
        `arrivals` (see :meth:`_arrivals`), exposures linked meanwhile go
        ahead of them."""
        retries = self.state[d.name]['retries']
        new = [link for link in links if f'{link.night}/{link.expid}' not in retries]
        if new:
            nights = sorted({link.night for link in new})
            log.info("%d new exposure%s in %s (night%s %s).", len(new),
                     '' if len(new) == 1 else 's', d.source, '' if len(nights) == 1 else 's',
                     ', '.join(nights))
        for link in links:
            name = f'{link.night}/{link.expid}'
            if name in retries:
                retries[name] += 1
                log.info("Transferring exposure %s again (try %d of %d).", name,
                         retries[name], self.conf['retries'])

        def settle(outcomes):
            for o in outcomes:
                if o.copy in FATAL and o.name in retries:
                    retries[o.name] -= 1  # Not the exposure's fault: the try does not count.
            self.settler.settle(d, outcomes, status, self.this_pass)
        return fatal(self.settler.copy_verify(d, links, status, self.this_pass, settle,
                                              arrivals)) is None

    # ------------------------------------------------------------------
    # The documented single steps.
    # ------------------------------------------------------------------
    def catchup(self, d, night, status, backup=False):
        """Do a "catch-up" transfer to catch delayed files in the morning, rather than at noon.

        A dry run of rsync from the mountain against the installed exposures
        of `night` finds late or changed files; the exposures concerned go
        through the same copy-verify step as new ones, on the basis of the
        installed copy, and replace it.

        Parameters
        ----------
        d : :func:`collections.namedtuple`
            Configuration for the destination directory.
        night : :class:`str`
            Night to check.
        status : :class:`desitransfer.status.TransferStatus`
            The status store.
        backup : :class:`bool`, optional
            This is the final catch-up before the night is archived.

        Returns
        -------
        :class:`bool`
            ``True`` if the night is up to date.

        Notes
        -----
        * 07:00 MST = 14:00 UTC.
        * This script can do nothing about exposures that were never linked
          into the DTS area at KPNO in the first place.
        """
        return self.night_end.catchup(d, night, status, self.this_pass, backup=backup)

    def backup(self, d, night, status):
        """Final sync and backup for a specific night.

        The night is archived only when it is complete: its final catch-up
        is done, no exposure of it is being transferred again, and none is
        waiting in staging.  The stage ``backup`` is recorded only for
        exposures that are installed and in the archive's index.

        Parameters
        ----------
        d : :func:`collections.namedtuple`
            Configuration for the destination directory.
        night : :class:`str`
            Night to back up.
        status : :class:`desitransfer.status.TransferStatus`
            The status store.

        Returns
        -------
        :class:`bool`
            ``True`` indicates the backup ran to completion and the transfer
            status was updated to reflect that.

        Notes
        -----
        * 12:00 MST = 19:00 UTC, plus one hour just to be safe, so after 20:00 UTC.
        """
        return self.night_end.backup(d, night, status, self.this_pass)

    def hpss_status(self):
        """Check HPSS availability.

        Returns
        -------
        :class:`bool`
            ``True`` if HPSS is available.
        """
        return self.night_end.hpss_status()

    def checksum_lock(self):
        """See if checksums are being computed at KPNO.

        Returns
        -------
        :class:`bool`
            ``True`` if checksums are being computed, or if the mountain
            cannot be asked (then nothing is transferred either).
        """
        result = self.mountain.remote(['test', '!', '-e', self.conf['checksum_lock']])
        return result.returncode != 0

    def exposure(self, d, link, status):
        """Data transfer operations for a single exposure.

        The exposure is copied into staging, locked, verified, recorded and
        installed, through the same step as every other.  A complete copy
        is installed regardless of checksum errors (they are recorded,
        alerted and retried); an incomplete one is never installed.

        Parameters
        ----------
        d : :func:`collections.namedtuple`
            Configuration for the destination directory.
        link : :class:`str`
            The exposure, ``NIGHT/EXPID``, or the path of its link at the
            mountain (``SOURCE/NIGHT/EXPID``, as the original's ``find`` gave).
        status : :class:`desitransfer.status.TransferStatus`
            The status store.

        Returns
        -------
        :class:`bool`
            ``False`` if it was not copied: not linked at the mountain,
            already installed (and not waiting to be transferred again), or
            the copy did not complete.
        """
        link = '/'.join(link.rstrip('/').split('/')[-2:])
        if not valid_link(link):
            log.error("%s is not an exposure NIGHT/EXPID; nothing is transferred.",
                      shown(link))
            return False
        night, expid = link.split('/')
        if (os.path.isdir(os.path.join(d.destination, night, expid)) and
                link not in self.state[d.name]['retries']):
            log.info("Exposure %s is already installed in %s; nothing is transferred.",
                     link, d.destination)
            return False
        survey = self.mountain.survey(d.source, self.conf['checksum_lock'], [night],
                                      d.data_root)
        if link not in survey.links:
            log.error("Exposure %s is not linked at %s (%s); nothing is transferred.", link,
                      self.mountain.name, one_line(str(survey.refused.get(link, survey.answer))))
            return False
        log.info("Transferring exposure %s from %s.", link, d.source)
        outcomes = self.settler.copy_verify(d, [survey.links[link]], status, self.this_pass)
        return fatal(outcomes) is None and outcomes[0].copy == COPIED

    def checksum(self, checksum_file, status):
        """Verify checksum associated with `checksum_file` and report status.

        The status is reported via log messages and messages passed to the
        status object, not via a return value.

        Parameters
        ----------
        checksum_file : :class:`str`
            The checksum file, ``.../NIGHT/EXPID/checksum-EXPID.sha256sum``.
        status : :class:`desitransfer.status.TransferStatus`
            The status store.
        """
        exposure = os.path.dirname(os.path.abspath(checksum_file))
        night, expid = os.path.basename(os.path.dirname(exposure)), os.path.basename(exposure)
        errors = self.actions.verify(checksum_file)
        if errors is None:
            return
        if errors:
            log.critical("Checksum verification of exposure %s/%s failed (%s): %s", night,
                         expid, checksum_file, '; '.join(errors.splitlines()))
        else:
            log.info("Checksums of %s/%s verified.", night, expid)
        self.actions.record(status, [(night, expid, 'checksum', bool(errors))])


class _Lazy(object):
    """An object made by `factory` the first time one of its attributes is used."""

    def __init__(self, factory):
        self._factory = factory
        self._object = None

    def __getattr__(self, name):
        if self._object is None:
            self._object = self._factory()
        return getattr(self._object, name)
