# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=============================
desitransfer.daemon.transfer
=============================

One copy-verify step for every exposure :command:`desi_transfer_daemon`
moves, whether it is new, retried or caught up: :func:`copy_verify` copies
exposures from the mountain into staging with rsync, locks them and
verifies their checksums, and returns one :class:`Outcome` per exposure
saying exactly what happened.  It installs and records nothing: the caller
decides once, from the outcome.
"""
import os
import time
from collections import namedtuple

from ..common import log
from ..status import _milliseconds
from .remote import RSYNC_TIMEOUT

#: What happened to the copy of an exposure.
COPIED = 'copied'                     #: complete in staging: may be installed
FAILED = 'copy failed'                #: rsync failed for this exposure (for example an unreadable file)
SOURCE_CHANGED = 'source changed'     #: the exposure vanished at the mountain during the copy
CONNECTION_LOST = 'connection lost'   #: the mountain was lost: nothing is known
DISK_FULL = 'disk full'               #: no space left in staging
STOPPED = 'stopped'                   #: SIGTERM or the kill file interrupted the copy

#: The outcomes that end a pass: staging is left as it is for the next one.
FATAL = (CONNECTION_LOST, DISK_FULL, STOPPED)

#: rsync return codes meaning the connection to the mountain failed: ssh (255),
#: protocol start (5), socket I/O (10), protocol stream (12), timeouts (30,
#: 35) and a kill after our own timeout (-9).
LOST_CONNECTION = (255, 5, 10, 12, 30, 35, -9)

#: Words of rsync (from :c:func:`strerror`) meaning the receiving disk is full.
_FULL = ('No space left on device', 'Disk quota exceeded')

#: Most exposures copied by one rsync (a bound on its argument list).
BATCH = 200


class Outcome(namedtuple('Outcome', ['link', 'copy', 'returncode', 'detail', 'errors',
                                     'rsync_ms', 'checksum_ms'])):
    """What :func:`copy_verify` did with one exposure.

    Attributes
    ----------
    link : :class:`desitransfer.daemon.remote.Link`
        The exposure.
    copy : :class:`str`
        :data:`COPIED`, :data:`FAILED`, :data:`SOURCE_CHANGED`,
        :data:`CONNECTION_LOST`, :data:`DISK_FULL` or :data:`STOPPED`.
    returncode : :class:`int`
        rsync's return code.
    detail : :class:`str`
        The end of rsync's standard error, if it failed.
    errors : :class:`str` or ``None``
        Checksum problems, one per line; ``''`` if verified; ``None`` if not
        verified (not copied, or test mode).
    rsync_ms, checksum_ms : :class:`int` or ``None``
        When the copy and the verification finished (Unix milliseconds).
    """

    @property
    def name(self):
        return f'{self.link.night}/{self.link.expid}'

    @property
    def verified(self):
        return self.errors == ''

    @property
    def problems(self):
        """Every problem, for messages."""
        found = [] if self.copy == COPIED else [
            f'rsync returned {self.returncode:d} ({self.copy})'
            + (f': {self.detail}' if self.detail else '')]
        return found + (self.errors.splitlines() if self.errors else [])

    def records(self):
        """Status records ``(night, expid, stage, failure, ms)`` of what happened."""
        night, expid = self.link.night, self.link.expid
        if self.copy == FAILED:
            return [(night, expid, 'rsync', True, self.rsync_ms)]
        if self.copy != COPIED:
            return []
        records = [(night, expid, 'rsync', False, self.rsync_ms)]
        if self.errors is not None:
            records.append((night, expid, 'checksum', bool(self.errors), self.checksum_ms))
        return records


def classify(result, stop):
    """What an rsync `result` means for the exposures it carried."""
    if stop.is_set() and result.returncode not in (0, 24):
        return STOPPED
    if any(word in result.stderr for word in _FULL):
        return DISK_FULL
    if result.returncode in (0, 24):
        return COPIED
    if result.returncode in LOST_CONNECTION:
        return CONNECTION_LOST
    return FAILED


def _tail(text, size=300):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return '; '.join(lines)[-size:]


def copy_verify(links, mountain, staging, checksum_file, actions, basis=None):
    """Copy exposures into staging, lock and verify them.

    Exposures of a night whose targets share a directory at the mountain
    are copied by one rsync (at most :data:`BATCH` at a time).  If it fails
    for another reason than the connection, the disk or a stop, each is
    copied again on its own, so a failure stays with the exposures it
    touched.  After a fatal outcome nothing more is copied: every remaining
    exposure gets the same outcome.

    Parameters
    ----------
    links : :class:`list`
        :class:`~desitransfer.daemon.remote.Link` of the exposures.
    mountain : :class:`desitransfer.daemon.remote.Mountain`
        Where they come from.
    staging : :class:`str`
        The staging area: each arrives as ``STAGING/NIGHT/EXPID``.
    checksum_file : :class:`str`
        Name of the checksum file, with ``{exposure}``.
    actions : :class:`desitransfer.daemon.actions.Actions`
        Makes the changes (or, in test mode, logs them).
    basis : :class:`str`, optional
        The destination: exposures installed there already serve as the
        basis of the copy (``--link-dest``), so only what changed is sent.

    Returns
    -------
    :class:`list`
        One :class:`Outcome` per exposure, in the order of `links`.
    """
    groups = {}
    for link in links:
        groups.setdefault((link.night, os.path.dirname(link.target)), []).append(link)
    outcomes = {}
    for (night, parent), members in groups.items():
        for first in range(0, len(members), BATCH):
            batch = members[first:first + BATCH]
            fatal = next((o.copy for o in outcomes.values() if o.copy in FATAL), None)
            if fatal is None and actions.stop.is_set():
                fatal = STOPPED
            if fatal:
                outcomes.update((link, Outcome(link, fatal, 0, '', None, None, None))
                                for link in batch)
                continue
            for outcome in _copy_batch(batch, night, parent, mountain, staging,
                                       checksum_file, actions, basis):
                outcomes[outcome.link] = outcome
    return [outcomes[link] for link in links]


def _copy_batch(batch, night, parent, mountain, staging, checksum_file, actions, basis):
    staging_night = os.path.join(staging, night)
    actions.makedirs(staging_night)
    for link in batch:
        # A copy left by an earlier pass is completed, not started again.
        leftover = os.path.join(staging_night, link.expid)
        if os.path.isdir(leftover):
            actions.unlock(leftover)
    extra = ([f'--link-dest={os.path.join(basis, night)}'] if basis else [])
    extra += [f'--include=/{link.expid}/***' for link in batch] + ['--exclude=*']
    what = f"exposure {night}/{batch[0].expid}" if len(batch) == 1 else \
        f"{len(batch):d} exposures of night {night}"
    t0 = time.monotonic()
    result = actions.run(mountain.rsync(parent, staging_night, extra=extra),
                         timeout=RSYNC_TIMEOUT, ok=(0, 24))
    rsync_ms = _milliseconds()
    copy = classify(result, actions.stop)
    log.debug("rsync of %s: %s in %.1f s.", what, copy, time.monotonic() - t0)
    if copy == FAILED and len(batch) > 1:
        log.warning("rsync of %s failed (return code %d); copying each on its own.",
                    what, result.returncode)
        outcomes = []
        for link in batch:
            if actions.stop.is_set() or any(o.copy in FATAL for o in outcomes):
                fatal = next((o.copy for o in outcomes if o.copy in FATAL), STOPPED)
                outcomes.append(Outcome(link, fatal, 0, '', None, None, None))
            else:
                outcomes += _copy_batch([link], night, parent, mountain, staging,
                                        checksum_file, actions, basis)
        return outcomes
    detail = '' if copy == COPIED else _tail(result.stderr)
    if copy != COPIED:
        return [Outcome(link, copy, result.returncode, detail, None, rsync_ms, None)
                for link in batch]
    outcomes = []
    for link in batch:
        exposure = os.path.join(staging_night, link.expid)
        if actions.stop.is_set():
            outcomes.append(Outcome(link, STOPPED, result.returncode, '', None, None, None))
        elif not actions.copied(exposure):
            outcomes.append(Outcome(link, SOURCE_CHANGED, result.returncode,
                                    'not found at the mountain when copied', None,
                                    rsync_ms, None))
        else:
            actions.lock(exposure)
            errors = actions.verify(os.path.join(exposure,
                                                 checksum_file.format(exposure=link.expid)))
            outcomes.append(Outcome(link, COPIED, result.returncode, '', errors, rsync_ms,
                                    _milliseconds()))
    return outcomes
