# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
============================
desitransfer.daemon.streams
============================

How many rsync streams copy a backlog from the mountain: ``[common]
streams``, or for ``auto`` one stream per :data:`AUTO_STREAM_RTT` of round
trip to the mountain.  The round trip is measured in the background over the
connection of the survey that reached the mountain, kept in the daemon's
state file, and measured again after :data:`AUTO_REFRESH` seconds.  One
:class:`StreamPlanner` serves :command:`desi_transfer_daemon`, given only
what it uses: the mountain, the setting, where the round trip is kept and
how to save it.
"""
import math
import threading
import time

from ..common import log

#: ``[common] streams = auto``: one stream per this many seconds of round
#: trip (one ssh stream carries about 2 MiB per round trip), at most
#: :data:`AUTO_MAX_STREAMS`, measured again after :data:`AUTO_REFRESH` seconds.
AUTO_STREAM_RTT = 0.008
AUTO_MAX_STREAMS = 8
AUTO_REFRESH = 600

#: Seconds a copy waits at most for the round trip to be measured.
AUTO_WAIT = 10


class StreamPlanner(object):
    """The number of rsync streams of a copy from `mountain`.

    Parameters
    ----------
    mountain : :class:`desitransfer.mountain.Mountain`
        Measures the round trip and opens the streams' connections.
    setting : :class:`int` or :class:`str`
        ``[common] streams``: a number, or ``'auto'``.
    section : :class:`dict`
        The part of the daemon's state that keeps ``round_trip`` (seconds,
        or ``None``) between runs.
    save : callable
        Saves the state (and says so if it cannot).
    stop : :class:`threading.Event`
        Set when the daemon stops.
    """

    def __init__(self, mountain, setting, section, save, stop):
        self.mountain = mountain
        self.setting = setting
        self.section = section
        self.save = save
        self.stop = stop
        self._rtt = None  # (when measured, monotonic; seconds or None)
        self._thread = None

    def streams(self):
        """``[common] streams``; for ``auto``, one stream per
        :data:`AUTO_STREAM_RTT` (or part of it) of round trip to the mountain,
        1 to :data:`AUTO_MAX_STREAMS` (see :meth:`measure`).  The express
        stream's connection is opened meanwhile (those of the streams, by
        :func:`~desitransfer.daemon.transfer.copy_verify` for a backlog)."""
        if self.setting == 'auto':
            self.measure()
            if self.round_trip() is None:
                # Never measured here: wait for the measurement of this pass.
                self._thread.join(timeout=AUTO_WAIT)
            n = self._auto()
        else:
            n = self.setting
        # The express stream's connection, for exposures linked meanwhile (its
        # answers must not queue behind a bulk copy); copy_verify opens the
        # bulk streams' own for a backlog.
        self.mountain.open_streams(n + 1, first=n)
        return n

    def round_trip(self):
        """The round trip measured last, in seconds, or ``None``."""
        return self._rtt[1] if self._rtt else None

    def _auto(self, unknown=1):
        """Streams for the round trip measured last (`unknown` if none yet)."""
        rtt = self.round_trip()
        return unknown if rtt is None else max(1, min(AUTO_MAX_STREAMS,
                                                      math.ceil(rtt / AUTO_STREAM_RTT)))

    def measure(self):
        """For ``streams = auto``, measure the round trip to the mountain in the
        background, over the connection of the survey (after each survey that
        answered, and when a pass finds a backlog), unless it was measured less
        than :data:`AUTO_REFRESH` seconds ago.

        The round trip is kept in the state file: after a start, the one the
        last run measured serves while it is measured again, so that a backlog
        found by the first pass does not wait for the measurement.
        """
        if self.setting != 'auto':
            return
        if self._rtt is None:
            self._rtt = (None, self.section['round_trip'])
        elif self._rtt[1] is not None:
            self.section['round_trip'] = round(self._rtt[1], 6)  # saved with the state
        now = time.monotonic()
        if self._thread is not None and (self._thread.is_alive() or
                                         now - self._rtt[0] <= AUTO_REFRESH):
            return

        def measure():
            # Over the shared connection, which the survey opened.
            rtt, last = None, self._rtt[1]
            try:
                rtt = self.mountain.round_trip()
            except Exception as err:  # a thread of its own: said here, or lost
                log.warning("Could not measure the round trip to %s: %s: %s.",
                            self.mountain.name, type(err).__name__, err)
            finally:  # unknown: the last measurement, if any, stands
                self._rtt = (time.monotonic(), last if rtt is None else rtt)
            if rtt is None:
                return
            n = self._auto()
            log.info("Round trip to %s: %.1f ms; a backlog is copied in up to %d "
                     "stream%s.", self.mountain.name, 1000 * rtt, n, '' if n == 1 else 's')

        self._thread = threading.Thread(target=measure, name='round-trip', daemon=True)
        self._thread.start()

    def keep(self):
        """Before the daemon stops, keep the round trip measured last in the
        state file; if none is known yet, let the measurement end first (a
        ``--once`` pass may end before it)."""
        if self.setting != 'auto' or self._thread is None:
            return
        if self.section['round_trip'] is None and not self.stop.is_set():
            self._thread.join(timeout=AUTO_WAIT)
        rtt = self.round_trip()
        if rtt is not None and self.section['round_trip'] != round(rtt, 6):
            self.section['round_trip'] = round(rtt, 6)
            self.save()
