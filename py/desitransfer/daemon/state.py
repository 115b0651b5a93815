# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
==========================
desitransfer.daemon.state
==========================

The state that :command:`desi_transfer_daemon` keeps between passes and
between runs (cron starting ``--once``), in
``desi_transfer_daemon_state.json`` next to the staging directory.

Per destination section it holds:

``pending``
    ``{"NIGHT/EXPID": [[stage, failure, ms], ...]}``: records of exposures
    being installed, written *before* the install and removed once the
    records are in the status store, so that a daemon killed in between
    records exactly what was installed on its next start.
``retries``
    ``{"NIGHT/EXPID": n}``: exposures with errors, transferred again on later
    passes; ``n`` passes so far.
``given_up``
    Exposures whose retries ran out: not transferred again until an
    operator removes them from this list.
``caught_up``, ``backed_up``, ``overdue``
    Nights whose morning catch-up is done, that are on tape, and whose
    overdue alert was sent.
``archive_failures``
    ``{"NIGHT": n}``: failed archive attempts.
``unreachable``
    Passes in a row that could not reach the mountain.
``unlisted``
    ``{"NIGHT": n}``: passes in a row on which a night could not be listed.
``hpss_unavailable``
    Unix time (ms) since which HPSS has not been available, or ``null``.
``reported``
    Problems already reported (malformed links, exposures left in staging),
    and nights whose morning report was sent, so that each is said once, also
    across ``--once`` runs.  In memory a set (a :class:`Reported`), on disk a
    sorted list of strings.  A key is forgotten with its night, and a refused
    link as soon as the mountain no longer has it; at most
    :data:`MAX_REPORTED` refused links are remembered.
``late``
    ``{"NIGHT": [EXPID, ...]}``: exposures in which a catch-up found late or
    changed files, for the morning report.
``round_trip``
    The round trip to the mountain in seconds, last measured for
    ``[common] streams = auto`` (in the first section only), or ``null``.

Only nights of the recent window are kept: older ones are settled history.
The file is written only when something in it changed, as the status store
writes: first a complete second copy, ``desi_transfer_daemon_state.json.copy``,
then the file itself, each to a new temporary file, synced and renamed.  A
state file that is not JSON or not of this shape while its copy is
good is read from the copy (nothing is lost: retry counts, reports already
sent); the bad file is kept as ``.bad`` (``.bad.1``, ...).  Only if the copy
is bad too does the daemon start afresh.  A state file that is missing means
a start afresh (a first start, or an operator removed it): its copy is not
read, and is rewritten.
"""
import json
import os
import re

from ..common import EXPID, log, valid_night
from ..files import aside_name, write_text
from ..mountain import valid_link

#: Name of the state file, next to the staging directory.
STATE_FILE = 'desi_transfer_daemon_state.json'

#: Most refused links at the mountain remembered as reported, per destination.
MAX_REPORTED = 10000


#: The night of a key of ``reported``: ``link NIGHT/...``, ``staging NIGHT/EXPID``,
#: ``NIGHT report``, ``NIGHT kill file``.
_key_night = re.compile(r'(?:link |staging )([0-9]{8})/|([0-9]{8}) ')

#: The key of the alert of an HPSS outage, by the time it began.
_key_outage = re.compile(r'hpss unavailable ([0-9]+)')


def _is_count(value):
    return type(value) is int and value >= 0


def _is_records(value):
    return (isinstance(value, list) and
            all(isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and
                type(r[1]) is bool and (r[2] is None or _is_count(r[2])) for r in value))


#: Every key of a section: (default, check of its value).
_FIELDS = {
    'pending': (dict, lambda v: isinstance(v, dict) and
                all(valid_link(k) and _is_records(r) for k, r in v.items())),
    'retries': (dict, lambda v: isinstance(v, dict) and
                all(valid_link(k) and _is_count(n) for k, n in v.items())),
    'given_up': (list, lambda v: isinstance(v, list) and all(valid_link(k) for k in v)),
    'caught_up': (list, lambda v: isinstance(v, list) and all(valid_night(n) for n in v)),
    'backed_up': (list, lambda v: isinstance(v, list) and all(valid_night(n) for n in v)),
    'protected': (list, lambda v: isinstance(v, list) and all(valid_night(n) for n in v)),
    'overdue': (list, lambda v: isinstance(v, list) and all(valid_night(n) for n in v)),
    'archive_failures': (dict, lambda v: isinstance(v, dict) and
                         all(valid_night(k) and _is_count(n) for k, n in v.items())),
    'unreachable': (int, _is_count),
    'unlisted': (dict, lambda v: isinstance(v, dict) and
                 all(valid_night(k) and _is_count(n) for k, n in v.items())),
    'hpss_unavailable': (type(None), lambda v: v is None or _is_count(v)),
    'reported': (list, lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v)),
    'round_trip': (type(None), lambda v: v is None or (type(v) in (int, float) and
                                                       0 <= v < 3600)),
    'late': (dict, lambda v: isinstance(v, dict) and
             all(valid_night(k) and isinstance(e, list) and
                 all(EXPID.fullmatch(x or '') for x in e) for k, e in v.items())),
}


class Reported(set):
    """Keys of problems already reported: a set, so that looking one up takes
    the same time however many there are; saved as a sorted list."""

    def append(self, key):
        """Remember `key` (as :meth:`set.add`)."""
        self.add(key)


def key_night(key):
    """The night (YYYYMMDD) a key of ``reported`` belongs to, or ``None``."""
    m = _key_night.match(key)
    night = m and (m.group(1) or m.group(2))
    return night if night and valid_night(night) else None


def _settled(key, oldest, section):
    """``True`` if the key `key` of ``reported`` in `section` can be forgotten:
    its night is before `oldest`, or it is the alert of an HPSS outage that
    is over.  A refused entry of the transfer area that is not in a night is
    forgotten when the mountain no longer has it (see
    :mod:`~desitransfer.daemon.settle`)."""
    night = key_night(key)
    if night is not None:
        return night < oldest
    m = _key_outage.fullmatch(key)
    return m is not None and int(m.group(1)) != section['hpss_unavailable']


class State(object):
    """The daemon's state file.

    Parameters
    ----------
    path : :class:`str`
        The state file.
    names : :class:`list`
        Names of the destination sections.
    keep_bad : :class:`bool`, optional
        If ``True`` (not in test mode), move an unreadable file aside.

    Attributes
    ----------
    new : :class:`bool`
        ``True`` if there was no state file (the first start of a deployment).
    """

    def __init__(self, path, names, keep_bad=True):
        self.path = path
        self.copy = path + '.copy'
        self.new = False
        self._saved = None  # the text of the file, as this object last wrote or read it
        data, why = _read(path, names)
        if why == 'missing':
            # Never written, or removed to start afresh: the copy is not read.
            self.new = True
            data = {}
        elif why is not None:
            copy, copy_why = _read(self.copy, names)
            bad = aside_name(path, '.bad')
            if copy_why is None:
                log.warning("State file %s is unreadable (%s); it is kept as %s and the "
                            "state is read from its copy %s: nothing is lost.", path,
                            why, bad, self.copy)
                data = copy
            else:
                log.error("State file %s is unreadable (%s); it is kept as %s and the "
                          "daemon starts afresh (its copy %s: %s): nights are looked up "
                          "on tape again, and exposures waiting to be transferred again "
                          "are not retried.", path, why, bad, self.copy, copy_why)
                data = {}
            if keep_bad:
                os.replace(path, bad)
        else:
            self._saved = json.dumps(data, indent=1, sort_keys=True, default=sorted)
        for name in names:
            section = data.setdefault(name, {})
            for key, (default, _) in _FIELDS.items():
                section.setdefault(key, default())
            section['reported'] = Reported(section['reported'])
        self.data = data

    def __getitem__(self, name):
        return self.data[name]

    def first_time(self, name, key):
        """``True`` the first time `key` (a problem, a report) is said for
        section `name`, which is then remembered with the state, across runs,
        until its night leaves the window: the one "say it once" of every
        alert.  Saving is the caller's."""
        reported = self.data[name]['reported']
        if key in reported:
            return False
        reported.add(key)
        return True

    def save(self):
        """Write the state atomically, unless the file already holds it (as this
        object read or wrote it last)."""
        text = json.dumps(self.data, indent=1, sort_keys=True, default=sorted)
        if text == self._saved:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # The copy first: if the file is damaged, whatever the copy holds was
        # saved before, or is the same.
        write_text(self.copy, text)
        write_text(self.path, text)
        self._saved = text

    def forget_before(self, oldest):
        """Forget nights before `oldest` (YYYYMMDD): settled history."""
        for section in self.data.values():
            for key in ('caught_up', 'backed_up', 'protected', 'overdue'):
                section[key] = [n for n in section[key] if n >= oldest]
            for key in ('archive_failures', 'unlisted', 'late'):
                section[key] = {n: c for n, c in section[key].items() if n >= oldest}
            for key in ('retries', 'pending'):
                section[key] = {k: v for k, v in section[key].items() if k[:8] >= oldest}
            section['given_up'] = [k for k in section['given_up'] if k[:8] >= oldest]
            reported = section['reported']
            reported -= {k for k in reported if _settled(k, oldest, section)}


def _read(path, names):
    """The state in `path` and ``None``; or ``{}`` and why it cannot be used
    (``'missing'`` if there is no such file)."""
    try:
        with open(path) as f:
            data = json.loads(f.read())
        _check(data, names)
    except FileNotFoundError:
        return {}, 'missing'
    except (OSError, ValueError) as err:
        return {}, str(err) or type(err).__name__
    return data, None


def _check(data, names):
    """Raise :exc:`ValueError` unless `data` has the shape :meth:`State.save` writes.

    Names in it become paths: an exposure that is not ``NIGHT/EXPID`` or a
    night that is not a date could lead out of the destination.
    """
    if not isinstance(data, dict):
        raise ValueError('not a JSON object')
    for name in names:
        section = data.get(name, {})
        if not isinstance(section, dict):
            raise ValueError(f'{name} is not a JSON object')
        for key, (_, valid) in _FIELDS.items():
            if key in section and not valid(section[key]):
                raise ValueError(f'{name}: {key} is not valid')
