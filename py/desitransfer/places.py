# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===================
desitransfer.places
===================

What the four places where a night lives hold of some nights of one
destination, read once for all of them (:func:`read_places`): the links at
the mountain (one survey, :mod:`desitransfer.mountain`), the exposures at
NERSC (:mod:`desitransfer.nersc`), the status records
(:mod:`desitransfer.store`) and the archives on tape (one listing and the
index of each night's archive, :mod:`desitransfer.tape`).  The audit
compares them; rebuild makes status records from them.  Reading only.
"""
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

from .executor import Actions
from .mountain import Mountain
from .nersc import nersc_night
from .processes import Stop
from .store import read_status, status_rows
from .tape import Archive, archive_name
from .text import tail

#: Archive indexes listed at the same time.
INDEX_THREADS = 4


class Places(namedtuple('Places', ['mountain_why', 'links', 'refused', 'tape', 'tape_why',
                                   'indexes', 'nersc', 'records', 'notes'])):
    """What the places hold of some nights of one destination (see :func:`read_places`).

    Attributes
    ----------
    mountain_why : :class:`str`
        Why the mountain could not be asked, or ``''``.
    links, refused : :class:`dict`
        ``{NIGHT: {EXPID: Link}}`` and ``{NIGHT: {NAME: why}}`` from the survey.
    tape, tape_why : :class:`dict`, :class:`str`
        :meth:`desitransfer.tape.Archive.directory` of the tape directory.
    indexes : :class:`dict`
        ``{NIGHT: (index, why)}`` (:meth:`desitransfer.tape.Archive.index`)
        of the nights on tape.
    nersc : :class:`dict`
        ``{NIGHT: (stat, {EXPID: Exposure}, why)}``
        (:func:`desitransfer.nersc.nersc_night`).
    records, notes : :class:`dict`
        The status records of the years of the nights (``{NIGHT: ...}``), and
        ``{YEAR: problem}`` of the status files read (:func:`desitransfer.store.read_status`).
    """

    __slots__ = ()

    def night(self, night):
        """The places of `night`, as keyword arguments (those of the audit's
        ``Night``)."""
        index, index_why = self.indexes.get(night, (None, ''))
        night_st, exposures, nersc_why = self.nersc[night]
        return dict(mountain_why=self.mountain_why, links=self.links.get(night, {}),
                    refused=self.refused.get(night, {}), night_st=night_st,
                    exposures=exposures, nersc_why=nersc_why,
                    rows=status_rows(self.records, night),
                    tape=self.tape, tape_why=self.tape_why, index=index, index_why=index_why)


def read_places(d, conf, nights, status_dir=None, stop=None):
    """Read what every place holds of `nights` for destination `d`: one survey
    of the mountain, one listing of the tape directory and the index of each
    night on tape (all of them while NERSC and the status are read), the
    exposures at NERSC, and the status (if `status_dir` is set).

    Parameters
    ----------
    d : :class:`desitransfer.configuration.DirectoryConfig`
        The destination.
    conf : :class:`dict`
        The ``[common]`` settings.
    nights : :class:`list`
        Nights, YYYYMMDD.
    status_dir : :class:`str`, optional
        The status directory; not read if not set.
    stop : :class:`desitransfer.processes.Stop`, optional
        Interrupts the commands; NERSC is not read further once it is set.

    Returns
    -------
    :class:`Places`
    """
    stop = stop if stop is not None else Stop()
    mountain = Mountain(conf['host'], conf['ssh'], stop)
    archive = Archive(conf['hpss'], conf['hpss_status'], None, Actions(stop))
    records, notes, nersc = {}, {}, {}
    try:
        with ThreadPoolExecutor(INDEX_THREADS) as pool:
            # The survey ignores the checksum lock: no lock file.
            asked = pool.submit(mountain.survey, d.source, '', nights, d.data_root)
            tape, tape_why = archive.directory(d.hpss)
            indexes = {n: pool.submit(archive.index, d.hpss, n) for n in nights
                       if tape and archive_name(d.hpss, n) in tape and
                       archive_name(d.hpss, n) + '.idx' in tape}
            for year in sorted({n[:4] for n in nights}) if status_dir else []:
                data, notes[year] = read_status(status_dir, int(year))
                records.update(data)
            for night in nights:
                if stop.is_set():
                    break
                nersc[night] = nersc_night(d.destination, night)
            links = asked.result()
            indexes = {n: f.result() for n, f in indexes.items()}
    finally:
        mountain.close()
    why = '' if links.answer == 'links' else (
        tail(links.result.stderr, 200) if links.result.stderr.strip() else
        f"ssh returned {links.result.returncode:d} and an unreadable answer")
    by_night, refused = {}, {}
    for link in links.links.values():
        by_night.setdefault(link.night, {})[link.expid] = link
    for name, reason in links.refused.items():
        if '/' in name:
            night, rest = name.split('/', 1)
            refused.setdefault(night, {})[rest] = reason
    return Places(why, by_night, refused, tape, tape_why, indexes, nersc, records, notes)
