# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
==================
desitransfer.nersc
==================

The NERSC tree, as every command reads it: a night in a destination
directory (:func:`nersc_night`), the :class:`Exposure` directories in it,
what an exposure's checksum file tells without reading the data
(:func:`light_check`), and whether an exposure is installed
(:func:`installed`).  Reading only: what is written there goes through
:mod:`desitransfer.executor`.
"""
import os
import stat
from collections import namedtuple

from .checksum import parse_checksums, read_checksum_file
from .common import EXPID
from .files import lstat_tree
from .text import some

#: Problems listed in one line before "and N more".
SHOWN = 3


def installed(d, link):
    """Whether the exposure of `link` is installed in the destination of `d`."""
    return os.path.isdir(os.path.join(d.destination, link.night, link.expid))


class Exposure(namedtuple('Exposure', ['path', 'st', 'entries', 'problems'])):
    """An exposure directory at NERSC: its :func:`os.lstat`, and
    :func:`desitransfer.files.lstat_tree` of what is in it."""

    __slots__ = ()

    @property
    def files(self):
        """``{name: os.stat_result}`` of the regular files."""
        return {n: st for n, st in self.entries.items() if stat.S_ISREG(st.st_mode)}

    @property
    def rsync_ms(self):
        """When rsync finished writing it: the modification time of the directory."""
        return int(self.st.st_mtime * 1000)

    @property
    def checksum_ms(self):
        """When it was locked to be verified: the last change of a file's mode
        (never before :attr:`rsync_ms`)."""
        changes = [st.st_ctime for st in self.files.values()]
        return max([self.rsync_ms] + [int(c * 1000) for c in changes])


def nersc_night(destination, night):
    """The night at NERSC: the :func:`os.lstat` of its directory (``None`` if
    absent), ``{EXPID: Exposure}`` of what is in it, and why it could not be
    read (``''`` if it could: then what is not there is absent)."""
    path = os.path.join(destination, night)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, {}, ''
    except OSError as err:
        return None, {}, f"{path} cannot be examined: {err.strerror or err}"
    if not stat.S_ISDIR(st.st_mode):
        return st, {}, ''
    try:
        names = os.listdir(path)
    except OSError as err:
        return st, {}, f"{path} cannot be listed: {err.strerror or err}"
    found = {}
    for expid in names:
        if EXPID.fullmatch(expid):
            exposure = os.path.join(path, expid)
            try:
                est = os.lstat(exposure)
            except OSError:
                continue
            entries, problems = lstat_tree(exposure) if stat.S_ISDIR(est.st_mode) else ({}, [])
            found[expid] = Exposure(exposure, est, entries, problems)
    return st, found, ''


def light_check(exposure, name):
    """What is wrong with `exposure` (an :class:`Exposure`) that its checksum
    file `name` tells without reading the data: the checksum file unreadable
    or malformed, files listed but missing, files not listed.  The names
    come from the directory listing: no listed name is ever opened."""
    try:
        digests, unverified, problems = parse_checksums(
            read_checksum_file(os.path.join(exposure.path, name)), name)
    except OSError as err:
        return [f"its checksum file {name} cannot be read: {err.strerror or err}"]
    listed = set(digests) | unverified
    present = {n for n, st in exposure.entries.items() if not stat.S_ISDIR(st.st_mode)}
    parents = {os.path.dirname(n) for n in listed} - {''}
    parents |= {p for n in parents for p in _ancestors(n)}
    missing = listed - present
    extra = {n for n in exposure.entries if n not in listed and n not in parents} - {name}
    found = [p.rstrip('.') for p in problems[:SHOWN]]
    found += [f"listed in {name} but missing: {some(sorted(missing), SHOWN)}"] if missing else []
    found += [f"not listed in {name}: {some(sorted(extra), SHOWN)}"] if extra else []
    return found


def _ancestors(name):
    while name:
        name = os.path.dirname(name)
        if name:
            yield name
