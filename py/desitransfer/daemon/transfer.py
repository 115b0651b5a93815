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
decides, from the outcomes, which it receives as soon as they are known.

A backlog is copied in several rsync streams at once (``[common] streams``),
each a thread running one rsync at a time over an ssh connection of its own,
taking batches of exposures from one queue; batches are cut by size, large
first and small last, so the streams finish together.  A batch copied is
verified by one hashing thread at a lower CPU priority, while the streams
copy the next ones, and its outcomes go to the caller at once.

While exposures are copied (a backlog, or one that takes seconds), those the
caller learns of meanwhile (linked at the mountain during the copy) do not
wait behind them: they go to an extra stream kept for them (the express
stream), which copies and verifies each as soon as it is known, then hands
it to the caller like the others.
"""
import os
import queue
import threading
import time
from collections import namedtuple

from ..common import log
from ..text import tail
from ..rsynccommand import RSYNC_DONE
from ..store import milliseconds
from ..mountain import RSYNC_TIMEOUT, only
from ..processes import Waker, wait_for, wakers_of

#: What happened to the copy of an exposure.
COPIED = 'copied'                     #: complete in staging: may be installed
#: rsync failed for this exposure (for example an unreadable file)
FAILED = 'copy failed'
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

#: Smallest batch worth an rsync of its own, in bytes (below it, the start
#: of an rsync, a few round trips, costs more than the streams gain).
MIN_BATCH_BYTES = 8 << 20

#: Largest batch, in bytes, so that the first exposures of a long backlog
#: are installed early (the start of an rsync costs about 1% of it).
MAX_BATCH_BYTES = 1 << 30

#: Batches are cut to at most the bytes left over this many times the
#: number of streams: large first, small at the end, when streams finish.
SPLIT = 2

#: Seconds between looks for the kill file while the watch during a copy waits.
KILL_LOOK = 0.5

#: How much lower the CPU priority of verification is than the copy's (nice).
VERIFY_NICE = 5

#: How much lower the CPU priority of the copy's streams (their rsync and ssh)
#: is than the express stream's, so that an exposure linked during a copy is
#: not slowed by it where the CPU is short (nice).
STREAM_NICE = 2


class Outcome(namedtuple('Outcome', ['link', 'copy', 'returncode', 'detail', 'errors',
                                     'rsync_ms', 'checksum_ms'])):
    """What :func:`copy_verify` did with one exposure.

    Attributes
    ----------
    link : :class:`desitransfer.mountain.Link`
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
        """Status records ``(night, expid, stage, failure, ms)`` of what happened:
        ``linked`` (the time of the link at the mountain), ``rsync`` and
        ``checksum``."""
        night, expid = self.link.night, self.link.expid
        if self.copy not in (COPIED, FAILED):
            return []
        # When the link appeared at the mountain: latency is measured from it.
        records = ([(night, expid, 'linked', False, int(self.link.mtime * 1000))]
                   if self.link.mtime and self.link.mtime > 0 else [])
        if self.copy == FAILED:
            return records + [(night, expid, 'rsync', True, self.rsync_ms)]
        records.append((night, expid, 'rsync', False, self.rsync_ms))
        if self.errors is not None:
            records.append((night, expid, 'checksum', bool(self.errors), self.checksum_ms))
        return records


def classify(result, stop):
    """What an rsync `result` means for the exposures it carried."""
    if stop.is_set() and result.returncode not in RSYNC_DONE:
        return STOPPED
    if any(word in result.stderr for word in _FULL):
        return DISK_FULL
    if result.returncode in RSYNC_DONE:
        return COPIED
    if result.returncode in LOST_CONNECTION:
        return CONNECTION_LOST
    return FAILED


def copy_verify(links, mountain, staging, checksum_file, actions, basis=None,
                streams=1, settle=None, arrivals=None):
    """Copy exposures into staging, lock and verify them.

    Exposures of a night whose targets share a directory at the mountain
    are copied in batches, each by one rsync, cut by size as the mountain
    reports it (see :func:`plan`); up to `streams` rsyncs run at once.  Each
    batch is verified as soon as its copy is complete, while the next ones
    are copied, and handed to `settle`.  If a batch fails for another
    reason than the connection, the disk or a stop, each of its exposures is
    copied again on its own, so a failure stays with the exposures it
    touched.  After a fatal outcome in any stream nothing more is copied:
    the other streams are stopped and every exposure not complete gets the
    same outcome.  A batch whose copy completed is still verified.

    Parameters
    ----------
    links : :class:`list`
        :class:`~desitransfer.mountain.Link` of the exposures.
    mountain : :class:`desitransfer.mountain.Mountain`
        Where they come from.
    staging : :class:`str`
        The staging area: each arrives as ``STAGING/NIGHT/EXPID``.
    checksum_file : :class:`str`
        Name of the checksum file, with ``{exposure}``.
    actions : :class:`desitransfer.executor.Actions`
        Makes the changes (or, in test mode, logs them).
    basis : :class:`str`, optional
        The destination: exposures installed there already serve as the
        basis of the copy (``--link-dest``), so only what changed is sent.
    streams : :class:`int`, optional
        Most rsyncs at once.  Only when there are more exposures than
        streams are the sizes of the exposures asked of the mountain, while
        the streams' connections are opened; otherwise each is copied by an
        rsync of its own, which opens its stream's connection itself.
    settle : callable, optional
        Called in the calling thread with a list of :class:`Outcome` as soon
        as they are known: each batch once verified, while other batches are
        being copied; the fatal outcomes, if any, all together at the end.
        If it raises, every stream is stopped and the exception propagates.
    arrivals : callable, optional
        Called, in a thread of its own, as ``arrivals(done, add, stream)``: it
        learns of new exposures while `links` are copied (one exposure that
        takes seconds, or a backlog) and passes each list of them to
        ``add``, which puts them on the express stream, ahead of `links`; it
        must return soon after ``done.is_set()`` is true (`links` are
        copied, or the copy was stopped), and can be given `done` as `stop`
        of :func:`desitransfer.runner.run`; it may ask the mountain over
        the connection of `stream`, the express stream's (the others carry
        the bulk of the copy: an answer there waits behind it).  Their
        outcomes are settled like the others'; they are not in the list
        returned.

    Returns
    -------
    :class:`list`
        One :class:`Outcome` per exposure, in the order of `links`.
    """
    if not links:
        return []
    backlog = len(links) > max(1, streams)
    if backlog:
        # Each stream copies batch after batch over a connection of its own
        # (a TCP window of its own), opened while the sizes are asked.  A few
        # exposures are one rsync each, which opens its stream's connection
        # itself (ssh's ControlMaster=auto), with no handshake made ahead.
        mountain.open_streams(streams)
    sizes = mountain.sizes(sorted({link.target for link in links})) if backlog else None
    batches = plan(links, sizes, streams)
    for night in sorted({link.night for link in links}):
        actions.makedirs(os.path.join(staging, night))
    copy = _Copy(mountain, staging, checksum_file, actions, basis, batches)
    express = streams  # The connection opened for it (StreamPlanner.streams).
    streams = min(streams, len(batches))
    if sizes:
        log.info("Copying %d exposures (%.1f MB) in %d rsync%s, %d at a time.", len(links),
                 sum(sizes.get(link.target, 0) for link in links) / 1e6, len(batches),
                 '' if len(batches) == 1 else 's', streams)
    outcomes = copy.run(streams, settle, arrivals, express)
    return [outcomes[link] for link in links]


def fatal(outcomes):
    """The first outcome that ends the pass, or ``None``."""
    return next((o for o in outcomes if o.copy in FATAL), None)


def plan(links, sizes, streams):
    """Cut `links` into batches to copy, in order.

    Exposures of one night and one directory at the mountain go together,
    at most :data:`BATCH` at a time.  With `sizes` (bytes of each target),
    each batch holds at most the bytes left divided by ``SPLIT * streams``,
    within :data:`MIN_BATCH_BYTES` and :data:`MAX_BATCH_BYTES` (and at least
    one exposure): large batches first, single exposures at the end, so that
    the streams end together and the last verification is short; even one
    stream verifies a batch while it copies the next.  Without `sizes` each
    exposure counts as one byte, and one stream copies a night at once.

    Parameters
    ----------
    links : :class:`list`
        :class:`~desitransfer.mountain.Link` of the exposures, in order.
    sizes : :class:`dict` or ``None``
        Physical directory of an exposure -> bytes.
    streams : :class:`int`
        Rsyncs at once.

    Returns
    -------
    :class:`list`
        Lists of links.
    """
    def size(link):
        return max(1, sizes.get(link.target, 0)) if sizes else 1

    smallest, largest = (MIN_BATCH_BYTES, MAX_BATCH_BYTES) if sizes else (1, float('inf'))
    groups = {}
    for link in links:
        groups.setdefault((link.night, os.path.dirname(link.target)), []).append(link)
    left = sum(size(link) for link in links)
    batches = []
    for members in groups.values():
        i = 0
        while i < len(members):
            most = (min(largest, max(smallest, left / (SPLIT * streams)))
                    if sizes or streams > 1 else left)
            batch, total = [members[i]], size(members[i])
            i += 1
            while (i < len(members) and len(batch) < BATCH and
                   total + size(members[i]) <= most):
                batch.append(members[i])
                total += size(members[i])
                i += 1
            left -= total
            batches.append(batch)
    return batches


class _Abort(object):
    """The stop request of the daemon, or the first fatal outcome of a stream,
    which stops the others: usable as `stop` of :func:`desitransfer.runner.run`."""

    def __init__(self, stop):
        self.stop = stop
        self.kind = None
        self.detail = ''
        self._lock = threading.Lock()
        self.waker = Waker()

    def set(self, kind, detail=''):
        with self._lock:
            if self.kind is None:
                self.kind, self.detail = kind, detail
        self.waker.wake()

    def wakers(self):
        """What a command run with this as `stop` wakes on (see
        :class:`~desitransfer.processes.Waker`)."""
        return [self.waker] + wakers_of(self.stop)

    def is_set(self):
        return self.kind is not None or self.stop.is_set()

    def outcome(self):
        """What an exposure not copied now gets."""
        return STOPPED if self.stop.is_set() else self.kind


class _Done(object):
    """Set when the streams of a copy have copied everything (or were
    stopped): the end of the express stream's watch."""

    def __init__(self, abort):
        self.abort = abort
        self.event = threading.Event()
        self.waker = Waker()

    def set(self):
        self.event.set()
        self.waker.wake()

    def wakers(self):
        return [self.waker] + self.abort.wakers()

    def is_set(self):
        return self.event.is_set() or self.abort.is_set()

    def wait(self, seconds):
        """Wait up to `seconds` (less if set); whether it is set.  Woken at
        once by a :meth:`set` here, a fatal outcome or a stop (their wakers);
        only the kill file is looked for, every :data:`KILL_LOOK` seconds."""
        return wait_for(self.is_set, self.wakers(), seconds, look=KILL_LOOK)


def _lower_priority(nice=VERIFY_NICE):
    """Make the calling thread (and the threads and processes it starts)
    yield the CPU to the others: `nice` lower."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid,
                       min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError):
        pass


class _Copy(object):
    """One :func:`copy_verify`: stream threads copying `batches`, one
    verification thread, and the calling thread collecting the outcomes."""

    def __init__(self, mountain, staging, checksum_file, actions, basis, batches):
        self.mountain = mountain
        self.staging = staging
        self.checksum_file = checksum_file
        self.actions = actions
        self.basis = basis
        self.abort = _Abort(actions.stop)
        self.todo = queue.SimpleQueue()
        for batch in batches:
            self.todo.put(batch)
        self.copied = queue.SimpleQueue()
        self.results = queue.SimpleQueue()
        self.done = _Done(self.abort)
        self.express = queue.SimpleQueue()
        self.express_stream = None

    def run(self, streams, settle, arrivals=None, express=None):
        threads = [threading.Thread(target=self._guard, args=('stream', self._stream, n),
                                    name=f'rsync-stream-{n:d}', daemon=True)
                   for n in range(streams)]
        threads.append(threading.Thread(target=self._guard, args=('verifier', self._verifier),
                                        name='verify', daemon=True))
        if arrivals is not None:
            self.express_stream = streams if express is None else express
            threads += [
                threading.Thread(target=self._guard, args=('arrivals', self._arrivals,
                                                           arrivals),
                                 name='arrivals', daemon=True),
                threading.Thread(target=self._guard, args=('express', self._express, streams),
                                 name=f'rsync-stream-{streams:d}-express', daemon=True)]
        for t in threads:
            t.start()
        outcomes, fatal_outcomes, running = {}, [], len(threads)
        left = streams
        try:
            while running:
                # Every thread says when it ends (_guard): no need to look
                # every so often; a signal still interrupts the wait.
                item = self.results.get()
                if isinstance(item, str):
                    running -= 1
                    if item == 'stream':
                        left -= 1
                        if left == 0:
                            # The backlog is copied: so is the verifier
                            # when it is verified, and the watch ends.
                            self.done.set()
                            self.copied.put(None)
                elif isinstance(item, BaseException):
                    raise item
                else:
                    outcomes.update((o.link, o) for o in item)
                    done = [o for o in item if o.copy not in FATAL]
                    fatal_outcomes += [o for o in item if o.copy in FATAL]
                    if done and settle is not None:
                        settle(done)
        except BaseException:
            self.abort.set(STOPPED)
            self.copied.put(None)
            raise
        finally:
            for t in threads:
                t.join()
            for waker in (self.done.waker, self.abort.waker):
                waker.close()
        if fatal_outcomes and settle is not None:
            settle(fatal_outcomes)
        return outcomes

    def _guard(self, kind, work, *args):
        """Run `work`, passing on an unexpected exception to the calling
        thread; then say that the thread of `kind` ended."""
        try:
            work(*args)
        except BaseException as err:
            self.abort.set(STOPPED)
            self.results.put(err)
        finally:
            self.results.put(kind)

    def _arrivals(self, arrivals):
        """Run the caller's `arrivals`; its failure ends the express stream,
        not the copy."""
        try:
            arrivals(self.done, self._add, self.express_stream)
        except Exception as err:
            log.warning("Exposures linked during the copy wait for the next "
                        "pass: %s: %s.", type(err).__name__, err, exc_info=True)
        finally:
            self.express.put(None)  # After what was added: the end of the express stream.

    def _add(self, links):
        """Put `links` on the express stream."""
        links = list(links)
        for night in sorted({link.night for link in links}):
            self.actions.makedirs(os.path.join(self.staging, night))
        for batch in plan(links, None, 1):
            self.express.put(batch)

    def _express(self, n):
        """The express stream (number `n`): copy and verify what is added,
        until the backlog is copied and nothing more can arrive."""
        while True:
            batch = self.express.get()
            if batch is None:
                return
            self._copy(batch, n, verify=True)

    def _stream(self, n):
        if self.express_stream is not None:
            _lower_priority(STREAM_NICE)  # their rsync and ssh too
        while True:
            try:
                batch = self.todo.get_nowait()
            except queue.Empty:
                return
            self._copy(batch, n)

    def _skip(self, batch):
        self.results.put([Outcome(link, self.abort.outcome(), 0, self.abort.detail, None,
                                  None, None) for link in batch])

    def _copy(self, batch, n, verify=False):
        if self.abort.is_set():
            self._skip(batch)
            return
        night, parent = batch[0].night, os.path.dirname(batch[0].target)
        staging_night = os.path.join(self.staging, night)
        for link in batch:
            # A copy left by an earlier pass is completed, not started again.
            leftover = os.path.join(staging_night, link.expid)
            if os.path.isdir(leftover):
                self.actions.unlock(leftover)
        extra = ([f'--link-dest={os.path.join(self.basis, night)}'] if self.basis else [])
        extra += only(link.expid for link in batch)
        what = (f"exposure {night}/{batch[0].expid}" if len(batch) == 1 else
                f"{len(batch):d} exposures of night {night}")
        t0 = time.monotonic()
        result = self.actions.run(self.mountain.rsync(parent, staging_night, extra=extra,
                                                      stream=n),
                                  timeout=RSYNC_TIMEOUT, ok=RSYNC_DONE, stop=self.abort)
        rsync_ms = milliseconds()
        copy = classify(result, self.actions.stop)
        detail = tail(result.stderr)
        if copy != COPIED and self.abort.is_set():
            # Stopped because another stream lost the connection or filled the disk.
            copy = self.abort.outcome()
            detail = self.abort.detail or detail
        log.debug("rsync of %s (stream %d): %s in %.1f s.", what, n, copy,
                  time.monotonic() - t0)
        if copy == COPIED and verify:
            self.results.put(self._verify(batch, result.returncode, rsync_ms))
        elif copy == COPIED:
            self.copied.put((batch, result.returncode, rsync_ms))
        elif copy == FAILED and len(batch) > 1:
            log.warning("rsync of %s failed (return code %d); copying each on its own.",
                        what, result.returncode)
            for link in batch:
                self._copy([link], n, verify)
        else:
            if copy in FATAL:
                self.abort.set(copy, detail)
            self.results.put([Outcome(link, copy, result.returncode, detail, None, rsync_ms,
                                      None) for link in batch])

    def _verifier(self):
        _lower_priority()
        while True:
            item = self.copied.get()
            if item is None:
                return
            self.results.put(self._verify(*item))

    def _verify(self, batch, returncode, rsync_ms):
        """Lock and verify the exposures of `batch`, copied: their outcomes."""
        outcomes = []
        for link in batch:
            exposure = os.path.join(self.staging, link.night, link.expid)
            if self.abort.outcome() == STOPPED:
                outcomes.append(Outcome(link, STOPPED, returncode, '', None, None, None))
            elif not self.actions.copied(exposure):
                outcomes.append(Outcome(link, SOURCE_CHANGED, returncode,
                                        'not found at the mountain when copied', None,
                                        rsync_ms, None))
            else:
                self.actions.lock(exposure)
                errors = self.actions.verify(os.path.join(
                    exposure, self.checksum_file.format(night=link.night, exposure=link.expid)))
                outcomes.append(Outcome(link, COPIED, returncode, '', errors, rsync_ms,
                                        milliseconds()))
        return outcomes
