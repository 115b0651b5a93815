# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
==================
desitransfer.audit
==================

Do the four places where a night lives agree: the links at the mountain,
the files at NERSC, the status records and the archive on tape?  This is
:command:`desi_transfer_status --audit`, and the audit of the daemon's
morning report.

Every place is read once for all the nights asked: one survey of the
mountain over ssh (the daemon's survey script, ignoring the checksum lock),
one listing of the tape directory (:command:`hsi`), the index of each
night's archive (:command:`htar -tvf`, a few at a time), the status files,
and the exposure directories at NERSC.  Then, for every exposure, the places
are compared and each disagreement is a :class:`Disagreement` saying what is
wrong where and what to do.

Without `deep`, an exposure at NERSC is checked against its checksum file
by names (every file listed present, nothing else), by modes, by the
modification times of its files against the time its checksum was
recorded, and by the sizes of its files against the archive's index; with
`deep`, every checksum is verified (:func:`desitransfer.checksum.verify_checksum`).
A place that cannot be read (the mountain unreachable, HPSS not answering)
is a disagreement too: an audit that could not look is not clean.

What the mountain answers is checked as the daemon checks it (a link whose
target is not a path of letters, digits and ``._+-`` is refused, see
:func:`desitransfer.mountain.safe_path`), and is written in the table
escaped (Python style): a name from the mountain is always one line of it.
"""
import os
import shlex
import stat
import time
from collections import namedtuple

from . import common
from .checksum import verify_checksum
from .common import EXPID, dir_perm, file_perm, valid_night
from .configuration import configured
from .processes import Stop
from .text import some
from .dates import due_time
from .tape import archive_name
from .mountain import shown
from .nersc import SHOWN, light_check
from .places import read_places
from .store import TransferStatus, status_directory

#: The places a night lives, in the order of the table.
PLACES = ('mountain', 'nersc', 'status', 'tape')

#: Modes of directories at NERSC: locked, and without user write once archived.
DIR_MODES = (dir_perm, dir_perm & ~stat.S_IWUSR)

#: Seconds by which a file may seem modified after its checksum was recorded
#: (the clocks of the mountain and of NERSC).
CLOCK_TOLERANCE = 5

_RSYNC, _CHECKSUM, _BACKUP = (TransferStatus.stages[s] for s in ('rsync', 'checksum', 'backup'))


class Disagreement(namedtuple('Disagreement', ['night', 'expid', 'place', 'problem', 'todo'])):
    """One thing that the places of a night disagree on.

    Attributes
    ----------
    night : :class:`str`
        The night, YYYYMMDD.
    expid : :class:`str` or ``None``
        The exposure, 8 digits; ``None`` for the whole night.
    place : :class:`str`
        Where it is wrong or could not be known: ``'mountain'``, ``'nersc'``,
        ``'status'`` or ``'tape'``.
    problem : :class:`str`
        What is wrong.
    todo : :class:`str`
        What to do: re-transfer, re-verify, re-archive, record by hand (with
        the exact :command:`desi_transfer_status` command), or look.
    """

    __slots__ = ()


def _utc(ms):
    return time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(ms / 1000))


class Auditor(object):
    """Audit nights in every destination of the daemon's configuration.

    Parameters
    ----------
    configuration : :class:`str` or :class:`tuple`, optional
        The daemon's configuration, see :func:`desitransfer.configuration.configured`.
    deep : :class:`bool`, optional
        Verify every checksum.
    directory : :class:`str`, optional
        The status directory; by default ``status`` beside each staging directory.
    stop : :class:`desitransfer.processes.Stop`, optional
        Interrupts the commands (the survey, hsi, htar).
    """

    def __init__(self, configuration=None, deep=False, directory=None, stop=None):
        self.sections, self.conf = configured(configuration)
        self.deep = deep
        self.directory = directory
        self.stop = stop if stop is not None else Stop()
        #: One line per destination saying what was compared.
        self.summary = []

    def run(self, nights):
        """The disagreements of `nights` (YYYYMMDD), sorted by night,
        exposure and place."""
        nights = sorted(set(nights))
        bad = [n for n in nights if not valid_night(n)]
        if bad or not nights:
            raise ValueError(f"Nights must be real dates in YYYYMMDD format, not {bad!r}.")
        found = []
        for section in self.sections:
            found += self._section(section, nights)
        return sorted(found, key=lambda d: (d.night, d.expid or '', PLACES.index(d.place)))

    def _section(self, d, nights):
        status_dir = self.directory or status_directory(d)
        host = self.conf['host'] or 'localhost'
        places = read_places(d, self.conf, nights, status_dir, self.stop)
        found, counts, seen = [], [0, 0, 0, 0], 0
        reported = set()
        for night in places.nersc:
            view = Night(self, d, night, status_dir, host, **places.night(night))
            note = places.notes.get(night[:4])
            if note and night[:4] not in reported and view.anything():
                reported.add(night[:4])
                found.append(Disagreement(night, None, 'status', note,
                                          f"desi_transfer_status -d {status_dir} {night} "
                                          "restores it from its copy; then audit again"))
            found += view.compare()
            seen += view.anything()
            for i, n in enumerate((len(view.links), len(view.exposures), len(view.rows),
                                   len(view.index or {}))):
                counts[i] += n
        how = ("every checksum verified" if self.deep else "names, modes, times and sizes "
               "compared; --deep verifies every checksum")
        self.summary.append(
            f"[{d.name}] {seen:d} night{'s' if seen != 1 else ''} with exposures "
            + (f"in {nights[0]}" if len(nights) == 1 else f"from {nights[0]} to {nights[-1]}")
            + ": " + (f"the mountain ({host}) could not be asked" if places.mountain_why else
                      f"{counts[0]:d} exposures linked at {host}")
            + f", {counts[1]:d} at NERSC ({d.destination}), {counts[2]:d} recorded "
            f"({status_dir}), " + (f"{counts[3]:d} in archives on tape ({d.hpss})"
                                   if places.tape is not None else
                                   "the tape could not be listed") + f"; {how}.")
        return found


class Night(object):
    """What each place knows of one night, and their comparison (:meth:`compare`).

    The places are keyword arguments: ``mountain_why`` (why the mountain
    could not be asked, or ``''``), ``links`` and ``refused`` (the survey's,
    by exposure), ``night_st``, ``exposures`` and ``nersc_why``
    (:func:`desitransfer.nersc.nersc_night`), ``rows``
    (:func:`desitransfer.store.status_rows`), ``tape`` and ``tape_why``
    (:meth:`desitransfer.tape.Archive.directory`), ``index`` and ``index_why``
    (:meth:`desitransfer.tape.Archive.index`).
    """

    def __init__(self, auditor, d, night, status_dir, host, **places):
        self.auditor, self.d, self.night = auditor, d, night
        self.status_dir, self.host = status_dir, host
        self.archive = archive_name(d.hpss, night)
        self.found = []
        self.__dict__.update(places)

    def anything(self):
        """``True`` if any place knows of this night."""
        return bool(self.links or self.refused or self.exposures or self.rows or self.index
                    or self.night_st is not None or self.nersc_why)

    def add(self, expid, place, problem, todo):
        self.found.append(Disagreement(self.night, expid, place, problem, todo))

    # ------------------------------------------------------------------
    # What to do.
    # ------------------------------------------------------------------
    def record(self, expid, *stages):
        """The exact commands recording `stages` of `expid` by hand."""
        return ' && '.join(shlex.join(['desi_transfer_status', '-d', self.status_dir,
                                       self.night, expid, s]) for s in stages)

    def reverify(self):
        return f"re-verify: desi_transfer_status --audit {self.night} --deep"

    def retransfer(self, expid, installed):
        """What to do to transfer `expid` again (`installed`: a copy is at NERSC)."""
        aside = ("move the installed copy aside (runbook: Transfer one exposure again); "
                 if installed else '')
        if not self.mountain_why and expid not in self.links:
            return (f"re-transfer: {aside}it is not linked at the mountain: copy it by hand "
                    "from where it is there, or restore it from tape")
        oldest = common._utcnow().timestamp() - self.auditor.conf['recent'] * 86400
        if self.night >= time.strftime('%Y%m%d', time.gmtime(oldest)):
            return (f"re-transfer: {aside}the daemon then copies it on its next pass (unless "
                    "it gave up on it: given_up in its state file)")
        return (f"re-transfer: {aside}the night is older than the recent window: copy it by "
                "hand (runbook: A night older than the recent window)")

    def rearchive(self, on_tape):
        aside = (f"move {self.archive} and its .idx aside on HPSS (hsi mv), then " if on_tape
                 else '')
        return (f"re-archive: {aside}cd {self.d.destination} && htar -cvhf "
                f"{self.d.hpss}/{self.archive} -H crc:verify=all {self.night} && "
                f"desi_transfer_status -d {self.status_dir} {self.night} all backup "
                "(runbook: Archive one night again)")

    # ------------------------------------------------------------------
    # The comparison.
    # ------------------------------------------------------------------
    def compare(self):
        """Every disagreement of the night."""
        self._night()
        if self.nersc_why:
            # What NERSC holds is not known: nothing is said to be missing there.
            self.add(None, 'nersc', self.nersc_why, "look at the permissions of the "
                     "destination, then audit again")
            return self.found
        on_index = self.index is not None
        expids = set(self.links) | set(self.exposures) | set(self.rows) | set(self.index or {})
        expids |= {name for name in self.refused if EXPID.fullmatch(name)}
        for expid in sorted(expids):
            if expid in self.exposures:
                self._installed(expid, self.exposures[expid], on_index)
            else:
                self._missing(expid)
        return self.found

    def _night(self):
        d, night = self.d, self.night
        if self.mountain_why:
            self.add(None, 'mountain', f"the links of the night could not be listed at "
                     f"{self.host}: {self.mountain_why}", f"check ssh to {self.host} (ssh -o "
                     f"BatchMode=yes {self.host} true) and audit again")
        for name, why in sorted(self.refused.items()):
            if not EXPID.fullmatch(name):
                self.add(None, 'mountain', f"{d.source}/{night}/{shown(name)} is not "
                         f"transferred: {why}", "rename or remove it at the mountain")
        if (not self.mountain_why and not self.links and not self.refused and
                (self.exposures or self.rows)):
            self.add(None, 'mountain', f"no exposure of the night is linked in {d.source} at "
                     f"{self.host}", f"nothing to do if {self.host} no longer keeps the links "
                     f"of this night; otherwise look at {d.source}/{night} there")
        if self.night_st is not None and (not stat.S_ISDIR(self.night_st.st_mode) or
                                          stat.S_IMODE(self.night_st.st_mode) not in DIR_MODES):
            what = (f"mode {stat.S_IMODE(self.night_st.st_mode):#o}, not 0o2750 (0o2550 once "
                    "archived)" if stat.S_ISDIR(self.night_st.st_mode) else
                    "not a directory")
            self.add(None, 'nersc', f"{os.path.join(d.destination, night)}: {what}",
                     f"fix it: chmod 2750 {os.path.join(d.destination, night)} (2550 once "
                     "archived)" if stat.S_ISDIR(self.night_st.st_mode) else
                     "look at it: it must be the night's directory")
        self._tape()

    def _tape(self):
        archive = self.archive
        if self.tape is None:
            self.add(None, 'tape', f"{self.d.hpss} could not be listed on HPSS: "
                     f"{self.tape_why}", f"check hsi (hsi -q ls -l {self.d.hpss}) and audit "
                     "again")
            return
        held = [n for n in (archive, archive + '.idx') if n in self.tape]
        backed = [e for e, rows in self.rows.items() if rows.get(_BACKUP, (False,))[0]]
        if len(held) == 1:
            self.add(None, 'tape', f"{held[0]} is on tape without "
                     f"{archive if held[0] != archive else archive + '.idx'}: the archive is "
                     "incomplete", self.rearchive(True))
        elif not held and self.exposures:
            hour = self.auditor.conf['backup']
            if common._utcnow() >= due_time(self.night, hour if 0 <= hour <= 23 else 20):
                self.add(None, 'tape', f"{archive} is not on tape ({self.d.hpss})",
                         self.rearchive(False) + "; or let the daemon archive it if the night "
                         "is among the recent ones")
        if len(held) < 2 and backed:
            self.add(None, 'status', f"backup recorded for {len(backed):d} exposure(s) "
                     f"({some(sorted(backed), SHOWN)}) but {archive} is not on tape",
                     self.rearchive(bool(held)))
        if len(held) == 2 and self.index is None:
            self.add(None, 'tape', f"the index of {archive} could not be read: "
                     f"{self.index_why}", f"check htar (htar -tvf {self.d.hpss}/{archive}) and "
                     "audit again")

    def _missing(self, expid):
        """An exposure that is not installed at NERSC."""
        link, rows = self.links.get(expid), self.rows.get(expid, {})
        staged = os.path.isdir(os.path.join(self.d.staging, self.night, expid))
        waits = '; a copy waits in staging' if staged else ''
        recorded = ', '.join(f"{name} {'ok' if rows[code][0] else 'FAILED'} at "
                             f"{_utc(rows[code][1])}" for name, code in
                             (('rsync', _RSYNC), ('checksum', _CHECKSUM), ('backup', _BACKUP))
                             if code in rows)
        if expid in self.refused:
            self.add(expid, 'mountain', f"its link is not transferred: {self.refused[expid]}",
                     "restore the exposure at the mountain (the daemon then copies it), or "
                     "find it elsewhere")
        if recorded:
            self.add(expid, 'status', f"recorded ({recorded}) but not at NERSC{waits}",
                     self.retransfer(expid, False) if link else
                     "find the data (the records say it arrived), or restore it from tape")
        elif link is not None:
            self.add(expid, 'nersc', f"linked at the mountain since {_utc(link.mtime * 1000)} "
                     f"but not at NERSC{waits}", self.retransfer(expid, False))
        if self.index and expid in self.index:
            self.add(expid, 'nersc', f"in the archive {self.archive} but not at NERSC",
                     f"restore it from tape: cd {os.path.join(self.d.destination)} && htar "
                     f"-xvf {self.d.hpss}/{self.archive} {self.night}/{expid}")

    def _installed(self, expid, exposure, on_index):
        """An exposure installed at NERSC."""
        if expid in self.refused:
            self.add(expid, 'mountain', f"its link is not transferred: {self.refused[expid]}",
                     "nothing is lost (it is at NERSC); repair or remove the link at the "
                     "mountain")
        elif (self.links or self.refused) and expid not in self.links:
            self.add(expid, 'mountain', f"at NERSC but not linked in {self.d.source}/"
                     f"{self.night} at {self.host}", "nothing to transfer; look at the "
                     "mountain for why it is not linked")
        if not stat.S_ISDIR(exposure.st.st_mode):
            self.add(expid, 'nersc', f"{exposure.path} is not a directory",
                     self.retransfer(expid, True))
            return
        verified = self._nersc(expid, exposure)
        self._rows(expid, verified)
        if on_index:
            self._index(expid, exposure)

    def _nersc(self, expid, exposure):
        """Check the copy at NERSC; ``True`` if verified (deep), ``False`` if
        found wrong, ``None`` if it seems right (light)."""
        bad_dirs = sorted(n for n, st in exposure.entries.items() if stat.S_ISDIR(st.st_mode)
                          and stat.S_IMODE(st.st_mode) not in DIR_MODES)
        if stat.S_IMODE(exposure.st.st_mode) not in DIR_MODES:
            bad_dirs.insert(0, '.')
        bad_files = sorted(n for n, st in exposure.files.items()
                           if stat.S_IMODE(st.st_mode) != file_perm)
        if bad_dirs or bad_files:
            what = [f"director{'y' if len(bad_dirs) == 1 else 'ies'} "
                    f"{some(sorted(bad_dirs), SHOWN)} not 0o2750 (0o2550 once archived)"
                    ] if bad_dirs else []
            what += [f"file(s) {some(sorted(bad_files), SHOWN)} not 0o440"] if bad_files else []
            self.add(expid, 'nersc', f"modes: {'; '.join(what)}", f"fix them: find "
                     f"{exposure.path} -type f -exec chmod 440 {{}} + ; chmod 2750 on the "
                     "directories (2550 once the night is archived)")
        for problem in exposure.problems:
            self.add(expid, 'nersc', problem, "look at the permissions, then audit again")
        if exposure.problems:
            return None  # Not all of it could be seen: neither right nor wrong.
        name = self.d.checksum_file.format(night=self.night, exposure=expid)
        if self.auditor.deep:
            errors = verify_checksum(os.path.join(exposure.path, name))
            if errors:
                lines = errors.splitlines()
                more = f' (and {len(lines) - SHOWN:d} more)' if len(lines) > SHOWN else ''
                self.add(expid, 'nersc', '; '.join(lines[:SHOWN]) + more,
                         self.retransfer(expid, True))
            return not errors
        problems = light_check(exposure, name)
        if problems:
            self.add(expid, 'nersc', '; '.join(problems), self.retransfer(expid, True))
            return False
        rows = self.rows.get(expid, {})
        when = rows.get(_CHECKSUM, rows.get(_RSYNC))
        if when is not None:
            late = sorted(n for n, st in exposure.files.items()
                          if st.st_mtime * 1000 > when[1] + CLOCK_TOLERANCE * 1000)
            if late:
                self.add(expid, 'nersc', f"modified after its checksum was recorded at "
                         f"{_utc(when[1])}: {some(sorted(late), SHOWN)}",
                         self.reverify() + "; re-transfer if it fails")
                return False
        return None

    def _rows(self, expid, verified):
        """Check the status records of an installed exposure."""
        rows = self.rows.get(expid, {})
        rsync, checksum = rows.get(_RSYNC), rows.get(_CHECKSUM)
        if verified:
            first = "record by hand: "
        elif verified is None:
            first = self.reverify() + ", then record by hand: "
        else:
            first = None  # The copy is wrong: what to do is said already.
        if rsync is None and checksum is None:
            self.add(expid, 'status', "at NERSC but not recorded",
                     first + self.record(expid, 'rsync', 'checksum') if first else
                     self.retransfer(expid, True))
            return
        for name, row in (('rsync', rsync), ('checksum', checksum)):
            if row is None:
                self.add(expid, 'status', f"{name} not recorded",
                         first + self.record(expid, name) if first else
                         self.retransfer(expid, True))
            elif not row[0] and verified is not False:
                self.add(expid, 'status', f"{name} recorded as failed at {_utc(row[1])}"
                         + (", but the exposure verifies" if verified else
                            ", but the exposure is installed" if name == 'rsync' else ''),
                         first + self.record(expid, name) +
                         ('' if verified else "; re-transfer if it does not verify"))

    def _index(self, expid, exposure):
        """Check an installed exposure against the archive's index."""
        backup = self.rows.get(expid, {}).get(_BACKUP)
        held = self.index.get(expid)
        if held is None:
            self.add(expid, 'tape', f"not in the archive {self.archive}" +
                     (f" (backup recorded at {_utc(backup[1])})" if backup and backup[0]
                      else ''), self.rearchive(True))
            return
        here = {n: st.st_size for n, st in exposure.files.items()}
        what = [f"{n}: not in the archive" for n in sorted(set(here) - set(held))]
        what += [f"{n}: {here[n]:d} bytes at NERSC, {held[n]:d} on tape"
                 for n in sorted(set(here) & set(held)) if here[n] != held[n]]
        what += [f"{n}: on tape only" for n in sorted(set(held) - set(here))]
        if what:
            more = f' (and {len(what) - SHOWN:d} more)' if len(what) > SHOWN else ''
            self.add(expid, 'tape', f"differs from the archive {self.archive}: "
                     + '; '.join(what[:SHOWN]) + more,
                     self.reverify() + "; if it verifies, " + self.rearchive(True))
        if backup is None or not backup[0]:
            self.add(expid, 'status', f"in the archive {self.archive} but backup "
                     + ("not recorded" if backup is None else
                        f"recorded as failed at {_utc(backup[1])}"),
                     "record by hand: " + self.record(expid, 'backup'))


def audit(configuration=None, nights=(), deep=False, directory=None, stop=None):
    """Compare the mountain, NERSC, the status and the tape for `nights`.

    Parameters
    ----------
    configuration : :class:`str` or :class:`tuple`, optional
        The daemon's configuration file (the shipped one if not set), or what
        :func:`~desitransfer.configuration.read_configuration` returned.
    nights : :class:`list`
        Nights, YYYYMMDD.
    deep : :class:`bool`, optional
        Verify every checksum, instead of comparing names, modes, times and sizes.
    directory : :class:`str`, optional
        The status directory; by default ``status`` beside each staging
        directory, as the daemon has it.
    stop : :class:`desitransfer.processes.Stop`, optional
        Interrupts the audit (the daemon's stop request).

    Returns
    -------
    :class:`list`
        The :class:`Disagreement` found, by night, exposure and place; empty
        if the places agree on every exposure.
    """
    return Auditor(configuration, deep=deep, directory=directory, stop=stop).run(nights)


def format_table(disagreements):
    """The disagreements as a table for people, each with what to do under it."""
    lines = [f"{'NIGHT':8}  {'EXPID':8}  {'PLACE':8}  PROBLEM"]
    for d in disagreements:
        lines.append(f"{d.night:8}  {d.expid or '-':8}  {d.place:8}  {d.problem}")
        lines.append(f"{'':30}to do: {d.todo}")
    lines.append(f"{len(disagreements):d} disagreement{'' if len(disagreements) == 1 else 's'}.")
    return '\n'.join(lines)
