# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
====================
desitransfer.rebuild
====================

Rebuild the status file of a year from what the other places hold, for
:command:`desi_transfer_status --rebuild YEAR`: after a status file was lost
with its copies, or to check one.

For every exposure installed at NERSC:

``rsync``
    success, at the modification time of the exposure's directory (when
    rsync last wrote into it);
``checksum``
    the outcome of the light check of :func:`desitransfer.nersc.light_check`
    (every file of the checksum file present, nothing else), or with `deep`
    of :func:`desitransfer.checksum.verify_checksum`, at the last change of a
    file's mode (when the daemon locked it to verify it);
``backup``
    success, for the exposures named in the index of the night's archive on
    tape, at the time of the archive's ``.idx`` in the tape listing (to the
    minute; to the day for archives older than six months);
``linked``
    the modification time of the exposure's link at the mountain, if it is
    still linked.

The rebuilt records go to ``desi_transfer_status_YYYY.json.rebuilt`` beside
the status file, with a summary of how they differ from it.  With
`replace`, they replace the status file under the store's lock, the old
file being kept as ``desi_transfer_status_YYYY.json.replaced`` (``.1``,
``.2``, ... if that exists); records written meanwhile by the daemon are
kept.  A rebuild for which a place could not be read (the mountain, the
tape, an index) is written, but does not replace the status file.
"""
import json
import os

from . import common
from .checksum import verify_checksum
from .files import write_text
from .text import some
from .tape import archive_name
from .configuration import configured
from .nersc import light_check
from .places import read_places
from .dates import dates
from .store import (TransferStatus, milliseconds, read_status, status_directory,
                    status_rows)

#: The stages, by code.
_NAMES = {code: name for name, code in TransferStatus.stages.items()}

#: Seconds by which a rebuilt time may differ from the recorded one before the
#: summary calls it a difference: linked is exact; rsync and checksum are
#: within the pass that copied the exposure; backup is read to the minute, or
#: to the day for archives older than six months.
TOLERANCE = {'linked': 1, 'rsync': 3600, 'checksum': 3600, 'backup': 86400}


class Rebuilt(object):
    """The rebuilt records of one status directory and year.

    Attributes
    ----------
    directory : :class:`str`
        The status directory.
    year : :class:`int`
        The year.
    records : :class:`dict`
        ``{NIGHT: {EXPID: [[stage, ok, ms], ...]}}``, newest row first.
    unknown : :class:`list`
        What could not be read (then the status file is not replaced).
    notes : :class:`list`
        Other remarks (exposures skipped).
    started : :class:`int`
        Unix milliseconds when the rebuild started.
    """

    def __init__(self, directory, year, started):
        self.directory = directory
        self.year = int(year)
        self.records = {}
        self.unknown = []
        self.notes = []
        self.started = started

    @property
    def path(self):
        """The status file."""
        return os.path.join(self.directory, f'desi_transfer_status_{self.year:d}.json')

    @property
    def rebuilt_path(self):
        """Where the rebuilt records are written."""
        return self.path + '.rebuilt'

    def add(self, night, expid, code, ok, ms):
        rows = self.records.setdefault(night, {}).setdefault(str(int(expid)), [])
        rows[:] = sorted([r for r in rows if r[0] != code] + [[code, int(ok), int(ms)]],
                         key=lambda r: (r[2], r[0]), reverse=True)

    def write(self):
        """Write :attr:`rebuilt_path` (atomically, in the store's format)."""
        write_text(self.rebuilt_path, json.dumps(self.records, separators=(',', ':')))

    def replace(self):
        """Replace the status file by the rebuilt records, under the store's
        lock; the old file is kept.  Rows recorded since the rebuild started
        are kept too.

        Returns
        -------
        :class:`str`
            Where the old status file is kept (``''`` if there was none).
        """
        store = TransferStatus(self.directory, year=self.year)
        with store._lock(self.year):
            current, _ = read_status(self.directory, self.year)
            merged = json.loads(json.dumps(self.records))
            for night, exposures in current.items():
                for expid, rows in exposures.items() if isinstance(exposures, dict) else ():
                    for row in rows if isinstance(rows, list) else ():
                        if (isinstance(row, list) and len(row) >= 3 and
                                isinstance(row[2], int) and row[2] >= self.started):
                            self._keep_newer(merged, night, expid, row)
            kept = store._keep(self.path, '.replaced') if os.path.exists(self.path) else ''
            store._write(self.year, merged)
        return kept

    @staticmethod
    def _keep_newer(records, night, expid, row):
        rows = records.setdefault(night, {}).setdefault(expid, [])
        old = [r for r in rows if r[0] == row[0]]
        if not old or old[0][2] < row[2]:
            rows[:] = [list(row[:3])] + [r for r in rows if r[0] != row[0]]


def rebuild(configuration=None, year=None, deep=False, directory=None, stop=None):
    """Rebuild the status records of `year` from NERSC, the tape and the mountain.

    Parameters
    ----------
    configuration : :class:`str` or :class:`tuple`, optional
        The daemon's configuration, see :func:`desitransfer.configuration.configured`.
    year : :class:`int` or :class:`str`
        The year.
    deep : :class:`bool`, optional
        Verify every checksum for the outcome of stage ``checksum``.
    directory : :class:`str`, optional
        The status directory; by default ``status`` beside each staging directory.
    stop : :class:`desitransfer.processes.Stop`, optional
        Interrupts the commands.

    Returns
    -------
    :class:`list`
        One :class:`Rebuilt` per status directory; nothing is written.
    """
    started = milliseconds()  # The clock of the records, to keep those made meanwhile.
    year = int(year)
    sections, conf = configured(configuration)
    today = common._utcnow().strftime('%Y%m%d')
    nights = [n for n in dates(f'{year:d}0101', f'{year:d}1231') if n <= today]
    found = {}
    for d in sections:
        target = directory or status_directory(d)
        rebuilt = found.setdefault(target, Rebuilt(target, year, started))
        places = read_places(d, conf, nights, stop=stop)
        if places.mountain_why:
            rebuilt.unknown.append(f"the mountain could not be asked ({places.mountain_why}): "
                                   "no linked rows")
        if places.tape is None:
            rebuilt.unknown.append(f"{d.hpss} could not be listed on HPSS "
                                   f"({places.tape_why}): no backup rows")
        for night, (_, exposures, nersc_why) in sorted(places.nersc.items()):
            if nersc_why:
                rebuilt.unknown.append(f"{nersc_why}: no rows for night {night}")
            index, why = places.indexes.get(night, ({}, ''))
            if index is None:
                rebuilt.unknown.append(f"the index of the archive of {night} could not be "
                                       f"read ({why}): no backup rows for it")
            idx = (places.tape or {}).get(archive_name(d.hpss, night) + '.idx')
            for expid, exposure in sorted(exposures.items()):
                _exposure(rebuilt, d, night, expid, exposure, deep,
                          places.links.get(night, {}).get(expid), idx if index and
                          expid in index else None)
    return list(found.values())


def _exposure(rebuilt, d, night, expid, exposure, deep, link, idx):
    """Add the rows of one exposure at NERSC."""
    if not os.path.isdir(exposure.path) or os.path.islink(exposure.path):
        rebuilt.notes.append(f"{exposure.path} is not a directory: not recorded")
        return
    if exposure.problems:
        rebuilt.unknown += [f"{p}: no rows for {night}/{expid}" for p in exposure.problems]
        return
    name = d.checksum_file.format(night=night, exposure=expid)
    if deep:
        ok = verify_checksum(os.path.join(exposure.path, name)) == ''
    else:
        ok = not light_check(exposure, name)
    codes = TransferStatus.stages
    rebuilt.add(night, expid, codes['rsync'], True, exposure.rsync_ms)
    rebuilt.add(night, expid, codes['checksum'], ok, exposure.checksum_ms)
    if link is not None:
        rebuilt.add(night, expid, codes['linked'], True, int(link.mtime * 1000))
    if idx is not None and idx[1] is not None:
        rebuilt.add(night, expid, codes['backup'], True, idx[1])


def _rows(records):
    """``{(NIGHT, EXPID): {stage name: (ok, ms)}}`` of well-formed rows."""
    return {(night, expid): {_NAMES[c]: row for c, row in stages.items() if c in _NAMES}
            for night in records for expid, stages in status_rows(records, night).items()}


def differences(current, rebuilt):
    """How the rebuilt records differ from the current ones.

    Parameters
    ----------
    current, rebuilt : :class:`dict`
        Status records (``{NIGHT: {EXPID: rows}}``).

    Returns
    -------
    :class:`dict`
        ``'only current'`` and ``'only rebuilt'``: exposures (``NIGHT/EXPID``)
        in one only; ``'stages'``: ``{what: [NIGHT/EXPID, ...]}`` for the
        exposures in both whose stage differs, ``what`` being ``STAGE missing
        in the current file``, ``STAGE missing in the rebuilt file``, ``STAGE
        outcome differs`` or ``STAGE time differs by more than N s``
        (:data:`TOLERANCE`); ``'same'``: the number of exposures that agree.
    """
    old, new = _rows(current), _rows(rebuilt)
    result = {'only current': sorted(f'{n}/{e}' for n, e in set(old) - set(new)),
              'only rebuilt': sorted(f'{n}/{e}' for n, e in set(new) - set(old)),
              'stages': {}, 'same': 0}
    for key in sorted(set(old) & set(new)):
        differ = False
        for stage in TransferStatus.stages:
            a, b = old[key].get(stage), new[key].get(stage)
            if a is None and b is None:
                continue
            if a is None or b is None:
                what = f"{stage} missing in the {'current' if a is None else 'rebuilt'} file"
            elif a[0] != b[0]:
                what = f"{stage} outcome differs"
            elif abs(a[1] - b[1]) > TOLERANCE[stage] * 1000:
                what = f"{stage} time differs by more than {TOLERANCE[stage]:d} s"
            else:
                continue
            result['stages'].setdefault(what, []).append('/'.join(key))
            differ = True
        result['same'] += not differ
    return result


def summary(rebuilt, current, problem=''):
    """Lines for people: what was rebuilt, and how it differs from `current`."""
    rows = [row for exposures in rebuilt.records.values() for rs in exposures.values()
            for row in rs]
    per = {name: sum(1 for r in rows if r[0] == code) for code, name in sorted(_NAMES.items())}
    failed = sum(1 for r in rows if not r[1])
    n = sum(len(e) for e in rebuilt.records.values())
    lines = [f"Rebuilt {rebuilt.rebuilt_path}: {len(rebuilt.records):d} nights, {n:d} "
             f"exposures, " + ', '.join(f'{v:d} {k}' for k, v in per.items()) + " rows"
             + (f" ({failed:d} failed)" if failed else '') + '.']
    lines += [f"Could not be read: {u}." for u in rebuilt.unknown]
    lines += [f"Note: {note}." for note in rebuilt.notes]
    if problem:
        lines.append(f"Note: {problem}.")
    diff = differences(current, rebuilt.records)
    n_current = sum(len(e) for e in current.values() if isinstance(e, dict))
    lines.append(f"Compared with {rebuilt.path} ({len(current):d} nights, {n_current:d} "
                 f"exposures): {diff['same']:d} exposures agree (times within "
                 + ', '.join(f'{v:d} s for {k}' for k, v in TOLERANCE.items()) + ").")
    for what in ('only current', 'only rebuilt'):
        if diff[what]:
            lines.append(f"  exposures only in the {what.split()[1]} file: "
                         f"{len(diff[what]):d} ({some(sorted(diff[what]))})")
    for what, keys in sorted(diff['stages'].items()):
        lines.append(f"  {what}: {len(keys):d} ({some(sorted(keys))})")
    return lines
