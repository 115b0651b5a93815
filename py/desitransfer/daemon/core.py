# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=========================
desitransfer.daemon.core
=========================

:class:`TransferDaemon`: the loop of :command:`desi_transfer_daemon` and one
pass, which for each destination reads as survey → copy-verify → record →
install → catch-up → archive.  The steps themselves live in the sibling
modules :mod:`~desitransfer.daemon.remote`,
:mod:`~desitransfer.daemon.transfer`, :mod:`~desitransfer.daemon.archive`
and :mod:`~desitransfer.daemon.state`; every change goes through
:mod:`~desitransfer.daemon.actions`, which is also test mode.
"""
import datetime as dt
import errno
import os

from .. import common
from ..common import (Stop, configure_log, ensure_scratch, log, new_exposures,
                      single_instance, sweep_temporary, valid_night)
from ..configuration import ConfigurationError, read_configuration
from ..status import TransferStatus
from .actions import Actions, DryRun
from .archive import Archive, archive_name
from .remote import Mountain, RSYNC_TIMEOUT
from .state import STATE_FILE, State
from .transfer import (COPIED, CONNECTION_LOST, DISK_FULL, FAILED, FATAL, SOURCE_CHANGED,
                       STOPPED, classify, copy_verify)

#: A night not archived this long after its backup hour is alerted (once).
OVERDUE = dt.timedelta(days=1)

#: The third pass in a row that cannot reach the mountain is emailed.
UNREACHABLE_ALERT = 3


def _passes(n):
    return f"{n:d} pass{'' if n == 1 else 'es'}"


class TransferDaemon(object):
    """Manage data transfer configuration, options, and operations.

    Parameters
    ----------
    options : :class:`argparse.Namespace`
        The parsed command-line options.

    Raises
    ------
    ConfigurationError
        If the configuration cannot be used.
    """

    def __init__(self, options):
        self.options = options
        self.test = options.test
        self.tape = not options.no_backup
        self.directories, self.conf, self.log_conf = read_configuration(options.configuration)
        try:
            self.scratch = ensure_scratch(self.conf['temporary'])
        except FileNotFoundError as err:
            raise ConfigurationError(f"[common] temporary: {err}") from None
        self.top = os.path.dirname(self.directories[0].staging)
        self._configure_log(options.debug)
        self.stop = Stop(options.kill)
        self.actions = DryRun(self.stop) if self.test else Actions(self.stop)
        self.mountain = Mountain(self.conf['host'], self.conf['ssh'], self.stop)
        self.archive = Archive(self.conf['hpss'], self.conf['hpss_status'], self.scratch,
                               self.actions)
        self.lock_file = os.path.join(self.top, 'desi_transfer_daemon.lock')
        self.state = State(os.path.join(self.top, STATE_FILE),
                           [d.name for d in self.directories], keep_bad=not self.test)
        self.failed = False
        self._surveys = {}
        self._caught_up_now = set()
        self._copied_now = set()

    def _configure_log(self, debug):
        """Re-configure the default logger returned by ``desiutil.log``.

        Parameters
        ----------
        debug : :class:`bool`
            If ``True`` set the log level to DEBUG.
        """
        c = self.log_conf
        # Test mode changes nothing: no log file, no alert email.
        configure_log(debug=debug, filename=None if self.test else c['filename'],
                      size=c['size'], backups=c['backups'], to=[] if self.test else c['to'],
                      mailhost=c['smtp'], program='desi_transfer_daemon',
                      memory=os.path.join(self.top, 'desi_transfer_daemon_alerts.json'))

    # ------------------------------------------------------------------
    # The loop.
    # ------------------------------------------------------------------
    def run(self):
        """Run the daemon: refuse a second copy, then :meth:`transfer`.

        Returns
        -------
        :class:`int`
            0; with ``--once``, 1 if the pass could not do its job.
        """
        if self.test:
            log.info("Test mode: nothing is changed; commands are logged, not run.")
            self.transfer()
            return 0
        lock, holder = single_instance(self.lock_file)
        if lock is None:
            log.info("desi_transfer_daemon is already running (pid %s, lock %s); "
                     "nothing to do.", holder, self.lock_file)
            return 0
        with lock:
            for directory in [self.top] + [self._status_directory(d) for d in self.directories]:
                sweep_temporary(directory)
            try:
                self.actions.save(self.state)
            except OSError as err:
                log.error("Could not write the state file %s: %s.", self.state.path, err)
            self.transfer()
        return 1 if self.options.once and self.failed else 0

    def transfer(self):
        """Loop over and transfer all configured directories.

        With ``--once``, make one pass and return; otherwise pass, sleep and
        pass again until SIGTERM or the kill file stops the loop.  A pass that
        fails is logged with its traceback and the next pass still runs.
        """
        if self.state.new:
            self._first_start()
        try:
            while not self.stop.is_set():
                self._pass()
                if self.options.once or self.stop.is_set():
                    break
                log.debug("Sleeping %g minutes.", self.conf['sleep'])
                self.stop.wait(self.conf['sleep'] * 60)
        finally:
            self.mountain.close()
        log.info("desi_transfer_daemon stops.")

    def _pass(self):
        self.failed = False
        self.archive.new_pass()
        self._surveys = {}
        self._caught_up_now = set()
        self._copied_now = set()
        self.state.forget_before(self._oldest())
        for d in self.directories:
            if self.stop.is_set():
                return
            try:
                self.directory(d)
            except OSError as err:
                self.failed = True
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    self._disk_full(d, str(err))
                else:
                    log.critical("Transfer pass of %s failed: %s: %s; the next pass will "
                                 "try again.", d.name, type(err).__name__, err, exc_info=True)
            except Exception as err:
                self.failed = True
                log.critical("Transfer pass of %s failed: %s: %s; the next pass will try "
                             "again.", d.name, type(err).__name__, err, exc_info=True)

    def _first_start(self):
        """Say once how many settled nights a new deployment leaves alone."""
        oldest = self._oldest()
        for d in self.directories:
            old = sorted(n for n in _listdir(d.destination) if valid_night(n) and n < oldest)
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
        days = self.conf['recent']
        return (common._utcnow() - dt.timedelta(days=days)).strftime('%Y%m%d')

    def _window(self):
        """Every night of the recent window, up to tomorrow (UTC)."""
        now = common._utcnow()
        return [(now - dt.timedelta(days=n)).strftime('%Y%m%d')
                for n in range(self.conf['recent'], -2, -1)]

    @staticmethod
    def _due(night, hour):
        """``True`` once it is `hour` UTC on the morning after `night` (or later).

        An hour outside 0-23 disables the step.
        """
        if not 0 <= hour <= 23:
            return False
        return common._utcnow() >= _due_time(night, hour)

    # ------------------------------------------------------------------
    # One destination.
    # ------------------------------------------------------------------
    def _status_directory(self, d):
        return os.path.join(os.path.dirname(d.staging), 'status')

    def _status(self, d):
        """The status store of `d`; ``None`` in test mode if it does not exist yet."""
        directory = self._status_directory(d)
        if self.test and not os.path.isdir(directory):
            return None
        return TransferStatus(directory)

    def _recent_nights(self, d):
        """Nights in the destination from the recent window."""
        oldest = self._oldest()
        return sorted(n for n in _listdir(d.destination) if valid_night(n) and n >= oldest)

    def _installed(self, d, link):
        return os.path.isdir(os.path.join(d.destination, link.night, link.expid))

    def directory(self, d):
        """Data transfer operations for a single destination directory.

        Parameters
        ----------
        d : :func:`collections.namedtuple`
            Configuration for the destination directory.
        """
        status = self._status(d)
        self._replay_pending(d, status)
        log.debug("Looking for new exposures in %s.", d.source)
        survey = self.mountain.survey(d.source, self.conf['checksum_lock'], self._window(),
                                      d.data_root)
        if survey.answer == 'unknown':
            if not self.stop.is_set():
                self._unreachable(d, f"list the exposures in {d.source}",
                                  survey.result.stderr)
            return
        if survey.answer == 'locked':
            log.info("Checksums are being computed at %s (%s exists); waiting for the next "
                     "pass.", self.mountain.name, self.conf['checksum_lock'])
            return
        self._reachable(d)
        self._surveys[d.name] = survey
        for night, why in sorted(survey.unknown_nights.items()):
            self.failed = True
            log.error("Night %s could not be listed in %s at %s (%s); its exposures wait "
                      "until it can be.", night, d.source, self.mountain.name, why)
        self._report(d, survey)
        state = self.state[d.name]
        todo = [link for name, link in sorted(survey.links.items())
                if name not in state['given_up'] and
                (name in state['retries'] or not self._installed(d, link))]
        if todo and not self._copy(d, todo, status):
            return
        due = self._due_for_archive(d)
        if due:
            # Nights already on tape (a new deployment) need no catch-up.
            self._archive(d, status, due, on_tape_only=True)
        for night in self._recent_nights(d):
            if self.stop.is_set():
                return
            if (night not in state['caught_up'] and night not in state['backed_up'] and
                    night in survey.nights and self._due(night, self.conf['catchup'])):
                if not self.catchup(d, night, status):
                    return
                state['caught_up'].append(night)
                self._caught_up_now.add(night)
                self.actions.save(self.state)
        due = self._due_for_archive(d)
        if due:
            self._archive(d, status, due)

    def _copy(self, d, links, status):
        """Copy-verify `links`, then settle their outcomes; ``False`` if the
        pass must end (the mountain lost, a full disk, a stop)."""
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
        outcomes = copy_verify(links, self.mountain, d.staging, d.checksum_file,
                               self.actions, basis=d.destination)
        for o in outcomes:
            if o.copy in FATAL and o.name in retries:
                retries[o.name] -= 1  # Not the exposure's fault: the try does not count.
        return self._settle(d, outcomes, status)

    def _settle(self, d, outcomes, status):
        """Record and install what :func:`~desitransfer.daemon.transfer.copy_verify`
        did: the one place deciding install, wait, retry and alert.

        Returns ``False`` if the pass must end.
        """
        state = self.state[d.name]
        complete = [o for o in outcomes if o.copy == COPIED]
        # Written ahead: a daemon killed after installing records them on its next start.
        for o in complete:
            state['pending'][o.name] = [[stage, failure, ms]
                                        for _, _, stage, failure, ms in o.records()]
        if complete:
            self.actions.save(self.state)
        for o in complete:
            self.actions.install(os.path.join(d.staging, o.link.night, o.link.expid),
                                 os.path.join(d.destination, o.link.night, o.link.expid))
        self.actions.record(status, [r for o in outcomes for r in o.records()])
        for o in complete:
            del state['pending'][o.name]
            self._copied_now.add(o.name)
        for o in outcomes:
            self._conclude(d, o)
        self.actions.save(self.state)
        fatal = next((o for o in outcomes if o.copy in FATAL), None)
        if fatal is not None:
            waiting = sum(1 for o in outcomes if o.copy == fatal.copy)
            if fatal.copy == STOPPED:
                log.info("Stopped; %d exposure%s stay in staging (or at the mountain) for "
                         "the next run.", waiting, '' if waiting == 1 else 's')
            elif fatal.copy == DISK_FULL:
                self.failed = True
                self._disk_full(d, fatal.detail)
            else:
                self._unreachable(d, f'copy exposures of night {fatal.link.night}',
                                  fatal.detail)
            return False
        return True

    def _conclude(self, d, o):
        """Messages, alerts and retries after the outcome `o` of one exposure."""
        state = self.state[d.name]
        retries = state['retries']
        where = os.path.join(d.destination, o.link.night, o.link.expid)
        if o.copy in FATAL:
            return
        if o.copy == SOURCE_CHANGED:
            log.warning("Exposure %s was not found at %s when it was copied; it is looked "
                        "for again next pass.", o.name, self.mountain.name)
            return
        if o.copy == COPIED and o.errors is None:
            return  # Test mode.
        if o.copy == COPIED and o.verified:
            if o.name in retries:
                log.info("Exposure %s is now transferred and verified.", o.name)
                del retries[o.name]
            else:
                log.info("Exposure %s is installed in %s and verified.", o.name, where)
            if o.link.night in state['backed_up']:
                log.critical("Exposure %s arrived after night %s was archived to HPSS; the "
                             "night must be archived again by hand.", o.name, o.link.night)
            return
        problems = '; '.join(p.rstrip('.') for p in o.problems)
        installed = (f"It is installed in {where} anyway" if o.copy == COPIED else
                     f"It is incomplete, kept in {d.staging} and not installed")
        limit = self.conf['retries']
        if o.name in retries:
            if retries[o.name] < limit:
                log.error("Exposure %s still has errors: %s.", o.name, problems)
                return
            del retries[o.name]
            state['given_up'].append(o.name)
            log.critical("Exposure %s still has errors after %d more transfers: %s. %s; "
                         "giving up: it is not transferred again. Fix it by hand, then record "
                         "it with desi_transfer_status.", o.name, limit, problems, installed)
            return
        if limit > 0:
            retries[o.name] = 0
            later = f"will be transferred and verified again on the next {limit:d} passes"
        else:
            state['given_up'].append(o.name)
            later = "is not transferred again ([common] retries = 0)"
        log.critical("Exposure %s has errors: %s. %s and %s.", o.name, problems, installed,
                     later)

    def _replay_pending(self, d, status):
        """Record exposures installed by a daemon killed before it recorded them."""
        pending = self.state[d.name]['pending']
        if not pending:
            return
        records = []
        for name, rows in sorted(pending.items()):
            night, expid = name.split('/')
            if (os.path.isdir(os.path.join(d.destination, night, expid)) and
                    not os.path.lexists(os.path.join(d.staging, night, expid))):
                records += [(night, expid, stage, failure, ms) for stage, failure, ms in rows]
                log.info("Exposure %s was installed by a run that stopped before recording "
                         "it; recording it now.", name)
        self.actions.record(status, records)
        pending.clear()
        self.actions.save(self.state)

    def _report(self, d, survey):
        """Report, once each, what the mountain links but is not transferred, and
        exposures left in staging whose link is gone."""
        reported = self.state[d.name]['reported']
        new = []
        for name, why in sorted(survey.refused.items()):
            key = f'link {name}'
            if key not in reported:
                log.warning("%s/%s at %s is not transferred: %s.", d.source, name,
                            self.mountain.name, why)
                new.append(key)
        for night in _listdir(d.staging):
            if not valid_night(night) or night < self._oldest() or night in survey.unknown_nights:
                continue
            for expid in _listdir(os.path.join(d.staging, night)):
                name = f'{night}/{expid}'
                key = f'staging {name}'
                if name not in survey.links and key not in reported:
                    log.critical("Exposure %s is in staging (%s) but no longer linked at %s: "
                                 "it is not installed, recorded or archived. Check it, then "
                                 "install it by hand or remove it.", name,
                                 os.path.join(d.staging, night, expid), self.mountain.name)
                    new.append(key)
        if new:
            reported += new
            self.actions.save(self.state)

    # ------------------------------------------------------------------
    # Trouble that ends a pass.
    # ------------------------------------------------------------------
    def _unreachable(self, d, what, detail):
        """Count passes in a row that could not reach the mountain; alert on the third."""
        self.failed = True
        state = self.state[d.name]
        state['unreachable'] += 1
        n = state['unreachable']
        level = log.critical if n == UNREACHABLE_ALERT else log.error
        level("Could not %s at %s (%s in a row): %s; will try again next pass.", what,
              self.mountain.name, _passes(n), ' '.join(detail.split())[-300:] or 'no answer')
        self.actions.save(self.state)

    def _reachable(self, d):
        state = self.state[d.name]
        if state['unreachable']:
            log.info("%s is reachable again after %s.", self.mountain.name,
                     _passes(state['unreachable']))
            state['unreachable'] = 0
            self.actions.save(self.state)

    def _disk_full(self, d, detail):
        log.error("No space left (%s).", ' '.join(detail.split())[-300:])
        log.critical("The disk of %s or %s is full: transfers stop for this pass, and copies "
                     "already in staging are kept. Free some space; the daemon carries on by "
                     "itself.", d.staging, d.destination)

    # ------------------------------------------------------------------
    # Catch-up.
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
        survey = self._surveys.get(d.name)
        if survey is None or night in survey.unknown_nights:
            return False
        # An exposure copied in this very pass is as fresh as a catch-up would make it.
        links = [link for link in survey.links.values()
                 if link.night == night and self._installed(d, link) and
                 f'{night}/{link.expid}' not in self._copied_now]
        if not links:
            log.info("Night %s is up to date: every exposure was copied in this pass.", night)
            return True
        log.info("%s of night %s: looking for late or changed files.",
                 'Final catch-up' if backup else 'Catch-up', night)
        groups = {}
        for link in links:
            groups.setdefault(os.path.dirname(link.target), []).append(link)
        changed = []
        for parent, members in sorted(groups.items()):
            extra = [f'--include=/{link.expid}/***' for link in members] + ['--exclude=*']
            dry = self.actions.ask(self.mountain.rsync(parent, os.path.join(d.destination, night),
                                                       extra=extra, dry_run=True),
                                   timeout=RSYNC_TIMEOUT, ok=(0, 24))
            outcome = classify(dry, self.stop)
            if outcome == CONNECTION_LOST:
                self._unreachable(d, f'look for late files of night {night}', dry.stderr)
                return False
            if outcome != COPIED:
                log.error("Catch-up of night %s could not compare it with %s (rsync "
                          "returned %d); will try again next pass.", night,
                          self.mountain.name, dry.returncode)
                self.failed = True
                return False
            found = new_exposures(dry.stdout)
            changed += [link for link in members if link.expid in found]
        if not changed:
            log.info("Night %s is up to date.", night)
            return True
        log.info("Night %s: late or changed files in exposures %s.", night,
                 ', '.join(link.expid for link in changed))
        outcomes = copy_verify(changed, self.mountain, d.staging, d.checksum_file,
                               self.actions, basis=d.destination)
        return self._settle(d, outcomes, status)

    # ------------------------------------------------------------------
    # Archive.
    # ------------------------------------------------------------------
    def hpss_status(self):
        """Check HPSS availability.

        Returns
        -------
        :class:`bool`
            ``True`` if HPSS is available.
        """
        self.archive.new_pass()
        return self.archive.available()

    def _due_for_archive(self, d):
        """Finished nights of the recent window not known to be on tape."""
        if not self.tape:
            return []
        done = self.state[d.name]['backed_up']
        return [n for n in self._recent_nights(d)
                if n not in done and self._due(n, self.conf['backup'])]

    def _archive(self, d, status, due, on_tape_only=False):
        """Archive the nights `due` that are not on tape; with `on_tape_only`,
        only take note of those that are."""
        if not self.archive.available():
            if not on_tape_only:
                self._hpss_unavailable(d, due, 'its status service does not say it is active')
            return
        for night in due:
            if self.stop.is_set():
                return
            on_tape = self.archive.on_tape(d.hpss, night)
            if on_tape is None:
                # Unknown: wait, never write the archive again.
                self.failed = True
                if not on_tape_only:
                    self._hpss_unavailable(d, due, 'hsi could not list the archive')
                return
            self.state[d.name]['hpss_unavailable'] = None
            if on_tape:
                log.info("Night %s is on tape as %s/%s.", night, d.hpss,
                         _archive_name(d, night))
                self._archived(d, night, status)
            elif not on_tape_only and not self.backup(d, night, status):
                self._overdue(d, night)

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
        state = self.state[d.name]
        survey = self._surveys.get(d.name)
        if survey is not None and night in survey.unknown_nights:
            return False
        if night in self._caught_up_now:
            log.info("Night %s was caught up in this pass; archiving it.", night)
        elif survey is not None and night in survey.nights:
            if not self.catchup(d, night, status, backup=True):
                return False
        else:
            log.info("Night %s is no longer linked at %s; archiving it without a final "
                     "catch-up.", night, self.mountain.name)
        waiting = sorted(name for name in state['retries'] if name.startswith(night + '/'))
        if waiting:
            log.info("Night %s is not archived yet: exposures %s have errors and are being "
                     "transferred again.", night, ', '.join(waiting))
            return False
        night_dir = os.path.join(d.destination, night)
        self.actions.remove_user_write(night_dir)
        result = self.archive.create(d.destination, d.hpss, night)
        if self.stop.is_set() and result.returncode != 0:
            log.info("Stopped while archiving night %s; it is archived again next run.", night)
            return False
        if result.returncode == 0 and self.archive.on_tape(d.hpss, night):
            log.info("Night %s is archived as %s/%s.", night, d.hpss, _archive_name(d, night))
            return self._archived(d, night, status)
        if self.test:
            return False
        self.failed = True
        failures = state['archive_failures']
        failures[night] = failures.get(night, 0) + 1
        # Emailed once per night, also when cron starts each pass with --once.
        (log.critical if failures[night] == 1 else log.error)(
            "Archiving night %s to HPSS as %s/%s failed (htar returned %d; %d attempt%s "
            "failed); will try again on a later pass.", night, d.hpss,
            _archive_name(d, night), result.returncode, failures[night],
            '' if failures[night] == 1 else 's')
        self.actions.save(self.state)
        return False

    def _archived(self, d, night, status):
        """The archive of `night` is on tape: record stage backup for the
        installed exposures that its index holds; ``True`` when done."""
        state = self.state[d.name]
        installed = {f'{night}/{e}' for e in _listdir(os.path.join(d.destination, night))
                     if os.path.isdir(os.path.join(d.destination, night, e))}
        recorded = set()
        if status is not None:
            try:
                recorded = {f'{night}/{int(e):08d}'
                            for e, rows in status.find(night, stage='backup').items() if rows}
            except KeyError:
                pass
        if installed - recorded:
            held = self.archive.exposures(d.hpss, night)
            if held is None:
                self.failed = True
                return False
            missing = sorted(installed - held)
            if missing:
                log.critical("The archive %s/%s of night %s lacks exposures %s that are "
                             "installed in %s; archive the night again by hand.", d.hpss,
                             _archive_name(d, night), night, ', '.join(missing),
                             d.destination)
            self.actions.record(status, [(night, name.split('/')[1], 'backup', False)
                                         for name in sorted((installed - recorded) & held)])
        state['backed_up'].append(night)
        state['caught_up'] = [n for n in state['caught_up'] if n != night]
        state['overdue'] = [n for n in state['overdue'] if n != night]
        state['archive_failures'].pop(night, None)
        self.actions.save(self.state)
        return True

    def _overdue(self, d, night):
        """Alert once if `night` is still not on tape a day after it was due
        (called only once the tape was listed and the archive is absent)."""
        state = self.state[d.name]
        late = common._utcnow() - _due_time(night, self.conf['backup'])
        if (late < OVERDUE or night in state['overdue'] or self.test or
                state['archive_failures'].get(night)):
            return  # Not late yet, said already, or its archive failure was emailed.
        log.critical("Night %s is still not archived to HPSS %d hours after it was due (see "
                     "the log for htar or catch-up problems); the daemon keeps trying on "
                     "every pass.", night, late.total_seconds() // 3600)
        state['overdue'].append(night)
        self.actions.save(self.state)

    def _hpss_unavailable(self, d, due, why):
        """Alert once if HPSS has not been usable for a day while nights wait."""
        state = self.state[d.name]
        now = common._utcnow()
        since = state['hpss_unavailable']
        if since is None:
            state['hpss_unavailable'] = int(now.timestamp() * 1000)
            self.actions.save(self.state)
            return
        start = dt.datetime.fromtimestamp(since / 1000, dt.timezone.utc)
        key = f'hpss unavailable {since:d}'
        if now - start >= OVERDUE and key not in state['reported'] and not self.test:
            log.critical("HPSS has not been available for archiving since %s UTC (now: %s); "
                         "nights %s wait to be archived.", start.strftime('%Y-%m-%d %H:%M'),
                         why, ', '.join(due))
            state['reported'].append(key)
            self.actions.save(self.state)

    # ------------------------------------------------------------------
    # The documented single steps.
    # ------------------------------------------------------------------
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
            The exposure, ``NIGHT/EXPID``.
        status : :class:`desitransfer.status.TransferStatus`
            The status store.

        Returns
        -------
        :class:`bool`
            ``False`` if it was not copied: not linked at the mountain, or
            the copy did not complete.
        """
        night = link.split('/')[0]
        survey = self.mountain.survey(d.source, self.conf['checksum_lock'], [night],
                                      d.data_root)
        if link not in survey.links:
            log.error("Exposure %s is not linked at %s (%s); nothing is transferred.", link,
                      self.mountain.name, survey.refused.get(link, survey.answer))
            return False
        log.info("Transferring exposure %s from %s.", link, d.source)
        outcomes = copy_verify([survey.links[link]], self.mountain, d.staging,
                               d.checksum_file, self.actions, basis=d.destination)
        return self._settle(d, outcomes, status) and outcomes[0].copy in (COPIED, FAILED)

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


def _due_time(night, hour):
    start = dt.datetime.strptime(night, '%Y%m%d').replace(tzinfo=dt.timezone.utc)
    return start + dt.timedelta(days=1, hours=hour)


def _archive_name(d, night):
    return archive_name(d.hpss, night)


def _listdir(directory):
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []
