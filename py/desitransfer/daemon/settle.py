# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===========================
desitransfer.daemon.settle
===========================

What :command:`desi_transfer_daemon` does with the outcomes of the
copy-verify step (:mod:`~desitransfer.daemon.transfer`): the one place that
decides, for new exposures, retries and catch-up alike, what is recorded,
installed, retried and alerted; and the trouble that ends a pass: one
:class:`Settler`, a collaborator of
:class:`~desitransfer.daemon.core.TransferDaemon`.

Names and messages that come from the mountain are logged escaped (see
:func:`shown` and :func:`one_line`): one name is always one log line, and
two different names never look the same.
"""
import os

from ..common import log, valid_night
from ..text import one_line, shown, some
from ..executor import listdir
from .state import MAX_REPORTED
from .transfer import COPIED, DISK_FULL, FATAL, SOURCE_CHANGED, STOPPED, copy_verify

#: The third pass in a row that cannot reach the mountain is emailed.
UNREACHABLE_ALERT = 3

#: Refused links reported one by one in a pass; the others of the pass are
#: counted in one message (and remembered all the same).
MAX_TOLD = 20

#: Key of ``reported`` while more refused links are found than can be remembered.
TOO_MANY_REFUSED = 'too many refused links'


def _passes(n):
    return f"{n:d} pass{'' if n == 1 else 'es'}"


class Settler(object):
    """Record, install, retry and alert after copy-verify; the trouble that
    ends a pass.  One collaborator of
    :class:`~desitransfer.daemon.core.TransferDaemon`, given only what it
    uses; what a pass did goes in the :class:`~desitransfer.daemon.core.Pass`
    given to each call.

    Parameters
    ----------
    state : :class:`~desitransfer.daemon.state.State`
        The daemon's state (retries, given up, pending records, what was said).
    mountain : :class:`~desitransfer.mountain.Mountain`
        Where exposures are copied from.
    actions : :class:`~desitransfer.executor.Actions`
        Every change (test mode: :class:`~desitransfer.executor.DryRun`).
    retries : :class:`int`
        ``[common] retries``.
    window : callable
        The nights of the recent window, oldest first (it moves with the date).
    """

    def __init__(self, state, mountain, actions, retries, window):
        self.state = state
        self.mountain = mountain
        self.actions = actions
        self.retries = retries
        self.window = window

    def copy_verify(self, d, links, status, this_pass, settle=None, arrivals=None):
        """Copy-verify `links` in up to ``[common] streams`` rsyncs at once, and
        settle each batch as soon as it is verified (with :meth:`settle`, or
        `settle`); the outcomes.  With `arrivals`, exposures linked meanwhile
        go ahead of a backlog (see :func:`~desitransfer.daemon.transfer.copy_verify`)."""
        if settle is None:
            def settle(outcomes):
                self.settle(d, outcomes, status, this_pass)
        streams = self.mountain.planner.streams() if len(links) > 1 else 1
        return copy_verify(links, self.mountain, d.staging, d.checksum_file, self.actions,
                           basis=d.destination, streams=streams, settle=settle,
                           arrivals=arrivals)

    def settle(self, d, outcomes, status, this_pass):
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
        this_pass.nights.pop(d.name, None)  # a new night directory may appear
        for o in complete:
            self.actions.install(os.path.join(d.staging, o.link.night, o.link.expid),
                                 os.path.join(d.destination, o.link.night, o.link.expid))
        self.actions.record(status, [r for o in outcomes for r in o.records()])
        for o in complete:
            del state['pending'][o.name]
            this_pass.copied.add(o.name)
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
                this_pass.failed = True
                self.disk_full(d, fatal.detail)
            else:
                self.unreachable(d, f'copy exposures of night {fatal.link.night}',
                                 fatal.detail, this_pass)
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
        problems = one_line('; '.join(p.rstrip('.') for p in o.problems))
        installed = (f"It is installed in {where} anyway" if o.copy == COPIED else
                     f"It is incomplete, kept in {d.staging} and not installed")
        limit = self.retries
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

    def replay_pending(self, d, status):
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

    def report(self, d, survey):
        """Report, once each, what the mountain links but is not transferred, and
        exposures left in staging whose link is gone.

        A refused link is remembered while the mountain still has it (the
        survey lists every entry of the transfer area, and every link of the
        nights of the window it could list), at most :data:`MAX_REPORTED` of
        them: past that, one CRITICAL message says how many cannot be
        remembered, and an ERROR repeats it at each pass while it lasts.
        """
        reported = self.state[d.name]['reported']
        window = self.window()
        oldest = window[0]
        window = set(window) - set(survey.unknown_nights)
        reported -= {k for k in reported if k.startswith('link ') and
                     k[5:] not in survey.refused and
                     ('/' not in k or k[5:].split('/')[0] in window)}
        told, summed, untold = [], [], []
        room = MAX_REPORTED - sum(1 for k in reported if k.startswith('link '))
        for name in sorted(survey.refused):
            key = f'link {name}'
            if key in reported:
                continue
            if len(told) + len(summed) >= room:
                untold.append(name)
                continue
            (told if len(told) < MAX_TOLD else summed).append(name)
            reported.add(key)
        for name in told:
            log.warning("%s/%s at %s is not transferred: %s.", d.source, shown(name),
                        self.mountain.name, one_line(survey.refused[name]))
        if summed:
            log.warning("%d more entries of %s at %s are not transferred (%s); each is "
                        "reported once.", len(summed), d.source, self.mountain.name,
                        some(summed))
        self._too_many_refused(d, reported, untold)
        for night in listdir(d.staging):
            if not valid_night(night) or night < oldest or night in survey.unknown_nights:
                continue
            for expid in listdir(os.path.join(d.staging, night)):
                name = f'{night}/{expid}'
                key = f'staging {name}'
                if name not in survey.links and self.state.first_time(d.name, key):
                    log.critical("Exposure %s is in staging (%s) but no longer linked at %s: "
                                 "it is not installed, recorded or archived. Check it, then "
                                 "install it by hand or remove it.", shown(name),
                                 shown(os.path.join(d.staging, night, expid)),
                                 self.mountain.name)
        self.actions.save(self.state)  # written only if something changed

    def _too_many_refused(self, d, reported, untold):
        """Say that the refused links `untold` cannot be remembered (see :meth:`report`)."""
        if not untold:
            reported.discard(TOO_MANY_REFUSED)
            return
        level = log.error if TOO_MANY_REFUSED in reported else log.critical
        level("%d more entries of %s at %s are not transferred (%s), but are not remembered: "
              "%d refused links are remembered already, the most kept. They are said again "
              "at each pass until the transfer area holds fewer; clean it up at %s.",
              len(untold), d.source, self.mountain.name, some(untold), MAX_REPORTED,
              self.mountain.name)
        reported.add(TOO_MANY_REFUSED)

    # ------------------------------------------------------------------
    # Trouble that ends a pass.
    # ------------------------------------------------------------------
    def unreachable(self, d, what, detail, this_pass):
        """Count passes in a row that could not reach the mountain; alert on the third."""
        this_pass.failed = True
        state = self.state[d.name]
        state['unreachable'] += 1
        n = state['unreachable']
        level = log.critical if n == UNREACHABLE_ALERT else log.error
        level("Could not %s at %s (%s in a row): %s; will try again next pass.", what,
              self.mountain.name, _passes(n),
              one_line(' '.join(detail.split())[-300:]) or 'no answer')
        self.actions.save(self.state)

    def unlisted(self, d, survey, this_pass):
        """Count passes in a row on which a night could not be listed at the
        mountain; alert on the third."""
        unlisted = self.state[d.name]['unlisted']
        for night in sorted(set(unlisted) - set(survey.unknown_nights)):
            log.info("Night %s can be listed again at %s.", night, self.mountain.name)
            del unlisted[night]
        for night, why in sorted(survey.unknown_nights.items()):
            this_pass.failed = True
            unlisted[night] = n = unlisted.get(night, 0) + 1
            level = log.critical if n == UNREACHABLE_ALERT else log.error
            level("Night %s could not be listed in %s at %s (%s, %s in a row); its exposures "
                  "wait until it can be.", night, d.source, self.mountain.name,
                  one_line(why[:300]), _passes(n))
        if survey.unknown_nights or unlisted:
            self.actions.save(self.state)

    def reachable(self, d):
        state = self.state[d.name]
        if state['unreachable']:
            log.info("%s is reachable again after %s.", self.mountain.name,
                     _passes(state['unreachable']))
            state['unreachable'] = 0
            self.actions.save(self.state)

    def disk_full(self, d, detail):
        log.error("No space left (%s).", one_line(' '.join(detail.split())[-300:]))
        log.critical("The disk of %s or %s is full: transfers stop for this pass, and copies "
                     "already in staging are kept. Free some space; the daemon carries on by "
                     "itself.", d.staging, d.destination)
