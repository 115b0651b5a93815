# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
====================
desitransfer.streams
====================

How many rsync streams copy a backlog from the mountain: ``[common]
streams``, or for ``auto`` one stream per :data:`AUTO_STREAM_RTT` of round
trip to the mountain.  Each :class:`~desitransfer.mountain.Mountain` owns one
:class:`StreamPlanner`, which measures the round trip in the background over
the mountain's shared connection (after a survey that reached it, again
after :data:`AUTO_REFRESH` seconds) and opens the streams' connections.

The planner knows nothing of where the round trip is kept between runs: it
is given the last one known, and tells its owner of each new one as it is
measured (``remember``, called by the measurement).  Its waits end on
events: the end of a measurement, not a look every so often.
"""
import math
import time

from .common import log
from .processes import Background

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
        Its owner: measures the round trip and opens the streams' connections.
    setting : :class:`int` or :class:`str`, optional
        ``[common] streams``: a number, or ``'auto'``.
    known : :class:`float`, optional
        The round trip (seconds) known from the last run, if any: for
        ``auto``, it serves at once while it is measured again.
    remember : callable, optional
        Called with each round trip measured (seconds), by the measurement
        itself (a thread of its own), for the owner to keep it.
    """

    def __init__(self, mountain, setting=1, known=None, remember=None):
        self.mountain = mountain
        self.setting = setting
        self.remember = remember
        self._rtt = (None, known)  # (when measured, monotonic; seconds or None)
        self._new = False  # a round trip was measured since the last settle()
        self._measuring = None  # the Background of the last measurement

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
                self._measuring.wait(AUTO_WAIT)
            n = self._auto()
        else:
            n = self.setting
        # The express stream's connection, for exposures linked meanwhile (its
        # answers must not queue behind a bulk copy); copy_verify opens the
        # bulk streams' own for a backlog.
        self.mountain.open_streams(n + 1, first=n)
        return n

    def round_trip(self):
        """The round trip measured last (or known from the last run), in
        seconds, or ``None``."""
        return self._rtt[1]

    def _auto(self, unknown=1):
        """Streams for the round trip measured last (`unknown` if none yet)."""
        rtt = self.round_trip()
        return unknown if rtt is None else max(1, min(AUTO_MAX_STREAMS,
                                                      math.ceil(rtt / AUTO_STREAM_RTT)))

    def measure(self):
        """For ``streams = auto``, measure the round trip to the mountain in the
        background, over the connection of the survey (after each survey that
        answered, and when a pass finds a backlog), unless it is being
        measured or was measured less than :data:`AUTO_REFRESH` seconds ago.
        A new round trip goes to `remember` as soon as it is measured."""
        if self.setting != 'auto':
            return
        if self._measuring is not None and (self._measuring.is_alive() or
                                            time.monotonic() - self._rtt[0] <= AUTO_REFRESH):
            return

        def measure():
            # Over the shared connection, which the survey opened.
            rtt, last = None, self._rtt[1]
            try:
                rtt = self.mountain.round_trip()
                if rtt is not None and self.remember is not None:
                    self.remember(rtt)
            except Exception as err:  # a thread of its own: said here, or lost
                log.warning("Could not measure the round trip to %s: %s: %s.",
                            self.mountain.name, type(err).__name__, err)
            finally:  # unknown: the last measurement, if any, stands
                self._rtt = (time.monotonic(), last if rtt is None else rtt)
                self._new = self._new or rtt is not None
            if rtt is None:
                return
            n = self._auto()
            log.info("Round trip to %s: %.1f ms; a backlog is copied in up to %d "
                     "stream%s.", self.mountain.name, 1000 * rtt, n, '' if n == 1 else 's')

        self._measuring = Background(measure, 'round-trip')

    def settle(self, stopping=False):
        """Before the owner stops: if no round trip is known yet, let the
        measurement under way end (a ``--once`` pass may end before it),
        unless `stopping` (a stop was asked for).  ``True`` if a round trip
        was measured since the last call (then the owner saves what
        `remember` kept)."""
        if self.setting != 'auto' or self._measuring is None:
            return False
        if self.round_trip() is None and not stopping:
            self._measuring.wait(AUTO_WAIT)
        new, self._new = self._new, False
        return new
