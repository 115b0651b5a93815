# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===========================
desitransfer.daemon.nights
===========================

The end of a night's journey in :command:`desi_transfer_daemon`: the morning
catch-up of late files and the archive to HPSS, with the alerts of a night
that is late for tape: one :class:`Nights`, a collaborator of
:class:`~desitransfer.daemon.core.TransferDaemon`, whose documented methods
``catchup``, ``backup`` and ``hpss_status`` hand over to it.
"""
import datetime as dt
import os

from .. import common
from ..common import log, new_exposures
from ..rsynccommand import RSYNC_DONE
from ..dates import due_time
from ..executor import listdir
from ..tape import archive_name
from ..mountain import RSYNC_TIMEOUT, by_directory, only
from ..nersc import installed
from .transfer import COPIED, CONNECTION_LOST, classify, fatal

#: A night not archived this long after its backup hour is alerted (once).
OVERDUE = dt.timedelta(days=1)


def due(night, hour):
    """``True`` once it is `hour` UTC on the morning after `night` (or later).

    An hour outside 0-23 disables the step.
    """
    if not 0 <= hour <= 23:
        return False
    return common._utcnow() >= due_time(night, hour)


class Nights(object):
    """Catch-up and archive of the nights of the daemon.

    Parameters
    ----------
    state : :class:`~desitransfer.daemon.state.State`
        The daemon's state.
    mountain : :class:`~desitransfer.mountain.Mountain`
        Surveyed and compared with for late files.
    actions : :class:`~desitransfer.executor.Actions`
        Every change (test mode: :class:`~desitransfer.executor.DryRun`).
    archive : :class:`~desitransfer.tape.Archive`
        The tape.
    settler : :class:`~desitransfer.daemon.settle.Settler`
        Copies late files and settles their outcomes.
    conf : :class:`dict`
        ``[common]``: ``backup`` (hour), ``checksum_lock``.
    tape : :class:`bool`
        Archive to tape (``False`` with ``-B``).
    stop : :class:`threading.Event`
        Set when the daemon stops.
    window : callable
        The nights of the recent window.
    recent_nights : callable
        ``recent_nights(d)``: the nights of the window at NERSC.
    """

    def __init__(self, state, mountain, actions, archive, settler, conf, tape, stop, window,
                 recent_nights):
        self.state = state
        self.mountain = mountain
        self.actions = actions
        self.archive = archive
        self.settler = settler
        self.conf = conf
        self.tape = tape
        self.stop = stop
        self.window = window
        self.recent_nights = recent_nights

    @property
    def test(self):
        return self.actions.test

    # ------------------------------------------------------------------
    # Catch-up.
    # ------------------------------------------------------------------
    def catchup(self, d, night, status, this_pass, backup=False):
        """See :meth:`desitransfer.daemon.TransferDaemon.catchup`; what the
        pass did is `this_pass`."""
        survey = self._survey_for(d, night, this_pass)
        if survey is None or night in survey.unknown_nights:
            return False
        # An exposure copied in this very pass is as fresh as a catch-up would make it.
        links = [link for link in survey.links.values()
                 if link.night == night and installed(d, link) and
                 f'{night}/{link.expid}' not in this_pass.copied]
        if not links:
            log.info("Night %s is up to date: every exposure was copied in this pass.", night)
            return True
        log.info("%s of night %s: looking for late or changed files.",
                 'Final catch-up' if backup else 'Catch-up', night)
        changed = []
        for parent, members in by_directory(links):
            extra = only(link.expid for link in members)
            dry = self.actions.ask(self.mountain.rsync(parent, os.path.join(d.destination, night),
                                                       extra=extra, dry_run=True),
                                   timeout=RSYNC_TIMEOUT, ok=RSYNC_DONE)
            outcome = classify(dry, self.stop)
            if outcome == CONNECTION_LOST:
                self.settler.unreachable(d, f'look for late files of night {night}', dry.stderr,
                                         this_pass)
                return False
            if outcome != COPIED:
                log.error("Catch-up of night %s could not compare it with %s (rsync "
                          "returned %d); will try again next pass.", night,
                          self.mountain.name, dry.returncode)
                this_pass.failed = True
                return False
            found = new_exposures(dry.stdout)
            changed += [link for link in members if link.expid in found]
        if not changed:
            log.info("Night %s is up to date.", night)
            return True
        log.info("Night %s: late or changed files in exposures %s.", night,
                 ', '.join(link.expid for link in changed))
        late = self.state[d.name]['late'].setdefault(night, [])
        late += [link.expid for link in changed if link.expid not in late]
        return fatal(self.settler.copy_verify(d, changed, status, this_pass)) is None

    def _survey_for(self, d, night, this_pass):
        """What the mountain says of `night` of `d`: this pass's survey, or,
        for a call by hand outside a pass (or of a night outside the recent
        window), one survey of that night alone; ``None`` if the mountain
        could not tell (wait) or checksums are being computed there."""
        survey = this_pass.surveys.get(d.name)
        if survey is not None and night in self.window():
            return survey
        survey = self.mountain.survey(d.source, self.conf['checksum_lock'], [night],
                                      d.data_root)
        if survey.answer != 'links':
            log.info("Could not survey night %s at %s (%s); nothing is done.", night,
                     self.mountain.name, survey.answer)
            return None
        return survey

    # ------------------------------------------------------------------
    # Archive.
    # ------------------------------------------------------------------
    def hpss_status(self):
        """See :meth:`desitransfer.daemon.TransferDaemon.hpss_status`."""
        self.archive.new_pass()
        return self.archive.available()

    def due_for_archive(self, d):
        """Finished nights of the recent window not known to be on tape (with
        ``-B``: not yet caught up and write-protected for good)."""
        state = self.state[d.name]
        done = state['backed_up'] + ([] if self.tape else state['protected'])
        return [n for n in self.recent_nights(d)
                if n not in done and due(n, self.conf['backup'])]

    def archive_due(self, d, status, nights, this_pass, on_tape_only=False):
        """Archive the due `nights` that are not on tape; with `on_tape_only`,
        only take note of those that are.  With ``-B`` the tape is neither
        listed nor written: the nights get their final catch-up and write
        protection only."""
        if not self.tape:
            for night in [] if on_tape_only else nights:
                if self.stop.is_set() or not self.backup(d, night, status, this_pass):
                    return
            return
        if not self.archive.available():
            if not on_tape_only:
                self._hpss_unavailable(d, nights, 'its status service does not say it is active')
            return
        for night in nights:
            if self.stop.is_set():
                return
            on_tape = self.archive.on_tape(d.hpss, night)
            if on_tape is None:
                # Unknown: wait, never write the archive again.
                this_pass.failed = True
                if not on_tape_only:
                    self._hpss_unavailable(d, nights, 'hsi could not list the archive')
                return
            self.state[d.name]['hpss_unavailable'] = None
            if on_tape:
                log.info("Night %s is on tape as %s/%s.", night, d.hpss,
                         archive_name(d.hpss, night))
                self._archived(d, night, status, this_pass)
            elif not on_tape_only and not self.backup(d, night, status, this_pass):
                self._overdue(d, night)

    def backup(self, d, night, status, this_pass):
        """See :meth:`desitransfer.daemon.TransferDaemon.backup`; what the
        pass did is `this_pass`."""
        state = self.state[d.name]
        if not os.path.isdir(os.path.join(d.destination, night)):
            log.warning("No data from night %s in %s; it is not archived.", night,
                        d.destination)
            return False
        if self.tape:
            on_tape = self.archive.on_tape(d.hpss, night)
            if on_tape is None:
                return False  # Unknown: wait, never write the archive again.
            if on_tape:
                log.info("Night %s is already on tape as %s/%s.", night, d.hpss,
                         archive_name(d.hpss, night))
                self._archived(d, night, status, this_pass)
                return False
        survey = self._survey_for(d, night, this_pass)
        if survey is None or night in survey.unknown_nights:
            return False
        if night in this_pass.caught_up:
            log.info("Night %s was caught up in this pass; archiving it.", night)
        elif night in survey.nights:
            if not self.catchup(d, night, status, this_pass, backup=True):
                return False
        else:
            log.info("Night %s is no longer linked at %s; archiving it without a final "
                     "catch-up.", night, self.mountain.name)
        waiting = sorted(name for name in state['retries'] if name.startswith(night + '/'))
        if waiting:
            log.info("Night %s is not archived yet: exposures %s have errors and are being "
                     "transferred again.", night, ', '.join(waiting))
            return False
        linked = survey.links if survey is not None else {}
        staged = [f'{night}/{e}' for e in listdir(os.path.join(d.staging, night))
                  if f'{night}/{e}' in linked and f'{night}/{e}' not in state['given_up']]
        if staged:
            log.info("Night %s is not archived yet: exposures %s are still in staging.",
                     night, ', '.join(staged))
            return False
        night_dir = os.path.join(d.destination, night)
        self.actions.remove_user_write(night_dir)
        if not self.tape:
            log.info("Night %s is caught up and write-protected; it is not archived: tape "
                     "backup is disabled (-B).", night)
            state['protected'].append(night)
            self.actions.save(self.state)
            return True
        result = self.archive.create(d.destination, d.hpss, night)
        if self.stop.is_set() and result.returncode != 0:
            log.info("Stopped while archiving night %s; it is archived again next run.", night)
            return False
        if result.returncode == 0 and self.archive.on_tape(d.hpss, night):
            log.info("Night %s is archived as %s/%s.", night, d.hpss, archive_name(d.hpss, night))
            return self._archived(d, night, status, this_pass)
        if self.test:
            return False
        this_pass.failed = True
        failures = state['archive_failures']
        failures[night] = failures.get(night, 0) + 1
        # Emailed once per night, also when cron starts each pass with --once.
        (log.critical if failures[night] == 1 else log.error)(
            "Archiving night %s to HPSS as %s/%s failed (htar returned %d; %d attempt%s "
            "failed); will try again on a later pass.", night, d.hpss,
            archive_name(d.hpss, night), result.returncode, failures[night],
            '' if failures[night] == 1 else 's')
        self.actions.save(self.state)
        return False

    def _archived(self, d, night, status, this_pass):
        """The archive of `night` is on tape: record stage backup for the
        installed exposures that its index holds; ``True`` when done."""
        state = self.state[d.name]
        installed = {f'{night}/{e}' for e in listdir(os.path.join(d.destination, night))
                     if os.path.isdir(os.path.join(d.destination, night, e))}
        recorded = set()
        if status is not None:
            try:
                recorded = {f'{night}/{int(e):08d}'
                            for e, rows in status.records(night, stage='backup').items() if rows}
            except KeyError:
                pass
        if installed - recorded:
            held = self.archive.exposures(d.hpss, night)
            if held is None:
                this_pass.failed = True
                return False
            missing = sorted(installed - held)
            if missing:
                log.critical("The archive %s/%s of night %s lacks exposures %s that are "
                             "installed in %s; archive the night again by hand.", d.hpss,
                             archive_name(d.hpss, night), night, ', '.join(missing),
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
        late = common._utcnow() - due_time(night, self.conf['backup'])
        if (late < OVERDUE or night in state['overdue'] or self.test or
                state['archive_failures'].get(night)):
            return  # Not late yet, said already, or its archive failure was emailed.
        log.critical("Night %s is still not archived to HPSS %d hours after it was due (see "
                     "the log for htar or catch-up problems); the daemon keeps trying on "
                     "every pass.", night, late.total_seconds() // 3600)
        state['overdue'].append(night)
        self.actions.save(self.state)

    def _hpss_unavailable(self, d, nights, why):
        """Alert once if HPSS has not been usable for a day while nights wait."""
        state = self.state[d.name]
        now = common._utcnow()
        since = state['hpss_unavailable']
        if since is None:
            state['hpss_unavailable'] = int(now.timestamp() * 1000)
            self.actions.save(self.state)
            return
        start = dt.datetime.fromtimestamp(since / 1000, dt.timezone.utc)
        if (now - start >= OVERDUE and not self.test and
                self.state.first_time(d.name, f'hpss unavailable {since:d}')):
            log.critical("HPSS has not been available for archiving since %s UTC (now: %s); "
                         "nights %s wait to be archived.", start.strftime('%Y-%m-%d %H:%M'),
                         why, ', '.join(nights))
            self.actions.save(self.state)
