# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=======================
desitransfer.statistics
=======================

What arrived in a year, or in a DOE fiscal year (``FY2026`` is 2025-10-01 to
2026-09-30): nights, exposures, files and bytes at NERSC, per month of the
night and in total, with the transfer latency of the exposures from the
status store, for :command:`desi_transfer_status --statistics`.

The latency of an exposure is the time from its link appearing at the
mountain (stage ``linked``) to its checksum being verified at NERSC (stage
``checksum``, successful); exposures recorded before the ``linked`` stage
existed have none.  Percentiles interpolate linearly between the closest
ranks (as :func:`numpy.percentile` does by default).
"""
import os
import re
import stat

from .common import EXPID, valid_night
from .files import lstat_tree
from .configuration import configured
from .store import (TransferStatus, latencies, latency, latency_summary,  # noqa: F401
                    percentile, read_status, status_directory)
from .text import duration


def parse_period(value):
    """The nights of a year or a DOE fiscal year.

    Parameters
    ----------
    value : :class:`str`
        ``YYYY``, or ``FYYYYY`` (``FY2026`` is 2025-10-01 to 2026-09-30).

    Returns
    -------
    :class:`tuple`
        The period as given (upper case), its first and its last night.

    Raises
    ------
    ValueError
        If `value` is neither.
    """
    m = re.fullmatch(r'(FY)?([0-9]{4})', value.upper())
    if m is None or int(m.group(2)) < 1970:
        raise ValueError(f"not a year (YYYY) or a DOE fiscal year (FYYYYY): {value!r}")
    year = int(m.group(2))
    if m.group(1):
        return value.upper(), f'{year - 1:d}1001', f'{year:d}0930'
    return value, f'{year:d}0101', f'{year:d}1231'


def destination_counts(destination, first, last):
    """What the nights from `first` to `last` hold in `destination`.

    Returns
    -------
    :class:`tuple`
        ``{NIGHT: [exposures, files, bytes]}`` (nights without exposures left
        out; regular files, apparent sizes, symbolic links not followed), and
        the directories that could not be read, one sentence each.
    """
    try:
        nights = sorted(n for n in os.listdir(destination)
                        if valid_night(n) and first <= n <= last)
    except OSError as err:
        return {}, [f"{destination} cannot be listed: {err.strerror or err}"]
    counts, problems = {}, []
    for night in nights:
        directory = os.path.join(destination, night)
        if os.path.islink(directory):
            continue
        try:
            names = sorted(os.listdir(directory))
        except OSError as err:
            problems.append(f"{directory} cannot be listed: {err.strerror or err}")
            continue
        for expid in names:
            path = os.path.join(directory, expid)
            if EXPID.fullmatch(expid) and os.path.isdir(path) and not os.path.islink(path):
                entries, unread = lstat_tree(path)
                sizes = [st.st_size for st in entries.values() if stat.S_ISREG(st.st_mode)]
                problems += unread
                total = counts.setdefault(night, [0, 0, 0])
                total[0] += 1
                total[1] += len(sizes)
                total[2] += sum(sizes)
    return counts, problems


def _months(first, last):
    """``YYYY-MM`` of every month from night `first` to night `last`."""
    months = []
    year, month = int(first[:4]), int(first[4:6])
    while f'{year:04d}{month:02d}' <= last[:6]:
        months.append(f'{year:04d}-{month:02d}')
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months


def statistics(configuration=None, period=None, directory=None):
    """Nights, exposures, files, bytes and latency per month of a period.

    Parameters
    ----------
    configuration : :class:`str` or :class:`tuple`, optional
        The daemon's configuration, see :func:`configured`.
    period : :class:`str` or :class:`tuple`
        ``YYYY``, ``FYYYYY``, or what :func:`parse_period` returns.
    directory : :class:`str`, optional
        The status directory; by default that of each destination section
        (``status`` beside its staging directory).

    Returns
    -------
    :class:`dict`
        ``{'period': 'FY2026', 'first': '20251001', 'last': '20260930',
        'sections': {NAME: {'destination': ..., 'status': ..., 'notes': [...],
        'months': {'2025-10': COUNTS, ...}, 'total': COUNTS}}}``, where
        COUNTS is ``{'nights', 'exposures', 'files', 'bytes', 'latency'}``
        and ``latency`` is :func:`latency_summary` in seconds.
    """
    label, first, last = parse_period(period) if isinstance(period, str) else period
    sections, _ = configured(configuration)
    found = {'period': label, 'first': first, 'last': last, 'sections': {}}
    for section in sections:
        status_dir = directory or status_directory(section)
        records, notes = {}, []
        for year in range(int(first[:4]), int(last[:4]) + 1):
            data, problem = read_status(status_dir, year)
            records.update(data)
            if problem:
                notes.append(problem)
        counts, unread = destination_counts(section.destination, first, last)
        notes += [f"{u}: not counted" for u in unread]
        months = {m: {'nights': 0, 'exposures': 0, 'files': 0, 'bytes': 0, 'latency': []}
                  for m in _months(first, last)}
        for night, (exposures, files, size) in counts.items():
            month = months[f'{night[:4]}-{night[4:6]}']
            month['nights'] += 1
            month['exposures'] += exposures
            month['files'] += files
            month['bytes'] += size
        for night in records:
            if valid_night(night) and first <= night <= last:
                months[f'{night[:4]}-{night[4:6]}']['latency'] += latencies(records, night)
        total = {key: sum(m[key] for m in months.values())
                 for key in ('nights', 'exposures', 'files', 'bytes')}
        total['latency'] = latency_summary([s for m in months.values() for s in m['latency']])
        for month in months.values():
            month['latency'] = latency_summary(month['latency'])
        found['sections'][section.name] = {'destination': section.destination,
                                           'status': status_dir, 'notes': notes,
                                           'months': months, 'total': total}
    return found


def format_statistics(found):
    """The result of :func:`statistics` as a table for people."""
    lines = [f"Statistics of {found['period']} (nights {found['first']} to {found['last']}); "
             "latency from the link at the mountain to the verified checksum at NERSC."]
    header = (f"{'MONTH':8} {'NIGHTS':>6} {'EXPOSURES':>9} {'FILES':>11} {'BYTES':>19}  "
              f"{'LATENCY N':>9} {'p50':>9} {'p95':>9} {'max':>9}")
    for name, section in found['sections'].items():
        lines += ['', f"[{name}] exposures in {section['destination']}, status in "
                      f"{section['status']}"]
        lines += [f"Note: {note}." for note in section['notes']]
        lines.append(header)
        for month, c in list(section['months'].items()) + [('total', section['total'])]:
            lat = c['latency']
            lines.append(f"{month:8} {c['nights']:6d} {c['exposures']:9,d} {c['files']:11,d} "
                         f"{c['bytes']:19,d}  {lat['count']:9,d} {duration(lat['p50']):>9} "
                         f"{duration(lat['p95']):>9} {duration(lat['max']):>9}")
    return '\n'.join(lines)
