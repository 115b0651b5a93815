# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
====================
desitransfer.restore
====================

Entry point for :command:`desi_transfer_restore`: put exposures that are
missing from the destination back into it, from one of three sources:

* the tape (the default): the night's archive on HPSS, written by
  :command:`desi_transfer_daemon`, extracted with :command:`htar`;
* night tarballs (``--tarball DIR``): ``NIGHT.tar`` beside ``NIGHT.sha256sum``;
* the lost+found area (``--lost-found``): exposures that reached NERSC
  outside the daemon, moved into the destination.

Whatever the source, each exposure goes through the same steps: an exposure
already in the destination is never replaced (it is compared, and any
difference reported); another is verified against its checksum file, locked
(files ``0o440``, directories ``0o2750``, or ``0o2550`` in a night that is
archived) and moved into the destination, under its final name only once it
is complete.  Test mode (``-t``) reads and lists, and changes nothing.
"""
import os
import posixpath
import re
import stat
import sys
import tarfile
import tempfile
from argparse import ArgumentParser, ArgumentTypeError
from collections import namedtuple

from . import __version__ as dtVersion
from .checksum import MAX_CHECKSUM_FILE_SIZE, sha256_file, verify_checksum
from .alerts import configure_log
from .common import EXPID, dir_perm, file_perm, log, valid_night
from .files import lstat_tree, write_text
from .processes import Stop
from .runner import run
from .configuration import ConfigurationError, read_configuration
from .executor import for_mode
from .tape import HTAR_TIMEOUT, Archive, archive_name
from .store import TransferStatus, status_directory

#: Mode of exposure directories in a night that is archived (user write removed).
ARCHIVED_DIR_PERM = 0o2550

#: What happened to an exposure (or, without `expid`, to a whole night).
Outcome = namedtuple('Outcome', ['night', 'expid', 'what', 'detail'])

INSTALLED = 'installed'
INSTALLED_UNVERIFIED = 'installed, not verified'
WOULD_INSTALL = 'would install'
IDENTICAL = 'already there'
PRESENT = 'already there, not compared'
DIFFERS = 'differs'
UNVERIFIED = 'not verified'
NO_CHECKSUM = 'no checksum file'
FAILED = 'failed'
ARCHIVED = 'archived'

#: Outcomes that need an operator: the exit status is 1 if any is met.
PROBLEMS = (INSTALLED_UNVERIFIED, DIFFERS, UNVERIFIED, NO_CHECKSUM, FAILED)


class Restore(object):
    """One run of :command:`desi_transfer_restore`.

    Parameters
    ----------
    options : :class:`argparse.Namespace`
        The parsed command-line options.

    Raises
    ------
    ConfigurationError
        If the configuration or a directory given cannot be used.
    """

    def __init__(self, options):
        self.options = options
        self.test = options.test
        directories, self.conf, _ = read_configuration(options.configuration)
        names = [d.name for d in directories]
        if options.section and options.section not in names:
            raise ConfigurationError(f"no section [{options.section}] in the configuration "
                                     f"(sections: {', '.join(names)})")
        self.section = directories[names.index(options.section) if options.section else 0]
        self.destination = os.path.abspath(options.destination or self.section.destination)
        self.hpss = self.section.hpss
        self.source = ('tarball' if options.tarball else
                       'lost+found' if options.lost_found is not None else 'tape')
        if self.source == 'lost+found':
            self.lost_found = os.path.abspath(options.lost_found or os.path.join(
                os.path.dirname(self.section.staging), 'lost+found'))
        self.work_root = os.path.abspath(options.work or self.section.staging)
        self.status_dir = None
        if self.source != 'tape' and options.record:
            self.status_dir = os.path.abspath(options.status or
                                              status_directory(self.section))
        required = [('destination', self.destination), ('work', self.work_root)]
        required += [('tarball', os.path.abspath(options.tarball))] if options.tarball else []
        required += [('lost+found', self.lost_found)] if self.source == 'lost+found' else []
        required += [('status', self.status_dir)] if self.status_dir else []
        for what, path in required:
            if not os.path.isdir(path):
                raise ConfigurationError(f"the {what} directory {path} does not exist")
        self.stop = Stop()
        self.actions = for_mode(self.test, self.stop)
        self.archive = Archive(self.conf['hpss'], '', self.work_root, self.actions)
        self.work = None
        self.outcomes = []
        self.kept = []

    # ------------------------------------------------------------------
    # The run.
    # ------------------------------------------------------------------
    def run(self):
        """Restore every night asked for; the exit status.

        Returns
        -------
        :class:`int`
            0 if every exposure is installed or already there identical; 1 if
            anything needs an operator (see :data:`PROBLEMS`).
        """
        nights = self._nights()
        if not nights:
            log.info("Nothing to restore: no night found in the %s source.", self.source)
        if not self.test:
            self.work = tempfile.mkdtemp(prefix='.desi_transfer_restore.', dir=self.work_root)
        try:
            for night in nights:
                if self.stop.is_set():
                    self._outcome(night, '', FAILED, f"not restored: {self.stop.reason}")
                    continue
                self._night(night)
        finally:
            if self.work is not None:
                self._clean_work()
        return 1 if any(o.what in PROBLEMS for o in self.outcomes) else 0

    def _nights(self):
        """The nights to restore: those given, or those the source holds."""
        given = self.options.nights
        if self.source == 'tape' or given:
            return sorted(set(given))
        if self.source == 'tarball':
            names = os.listdir(self.options.tarball)
            return sorted(n[:-len('.sha256sum')] for n in names
                          if n.endswith('.sha256sum') and valid_night(n[:-len('.sha256sum')]))
        return sorted(n for n in os.listdir(self.lost_found)
                      if valid_night(n) and os.path.isdir(os.path.join(self.lost_found, n)))

    def _night(self, night):
        try:
            self._restore_night(night)
        except OSError as err:
            self._outcome(night, '', FAILED, f"{type(err).__name__}: {err}; stopped restoring "
                          "this night")

    def _restore_night(self, night):
        if self.source == 'tape':
            top = self._from_tape(night)
        elif self.source == 'tarball':
            top = self._from_tarball(night)
        else:
            top = self.lost_found
            if not os.path.isdir(os.path.join(top, night)):
                self._outcome(night, '', FAILED, f"{os.path.join(top, night)} does not exist")
                top = None
        if top is None:
            return
        installed = self.settle(night, top)
        if installed and self.status_dir:
            self._record(night, installed)
        if installed and self.options.archive:
            self._archive(night, installed)

    # ------------------------------------------------------------------
    # Sources.
    # ------------------------------------------------------------------
    def _from_tape(self, night):
        """Extract the exposures of `night` to restore from its archive into
        the work directory; the directory holding ``NIGHT/``, or ``None``."""
        archive = archive_name(self.hpss, night)
        path = f'{self.hpss}/{archive}'
        names = self.archive.listing(self.hpss)
        if names is None:
            self._outcome(night, '', FAILED, f"the HPSS directory {self.hpss} could not be "
                          "listed; nothing restored: try again later")
            return None
        if archive not in names or archive + '.idx' not in names:
            missing = ' and '.join(n for n in (archive, archive + '.idx') if n not in names)
            self._outcome(night, '', FAILED, f"{missing} not in the HPSS directory {self.hpss}: "
                          "the night is not on tape")
            return None
        held = self.archive.exposures(self.hpss, night)
        if held is None:
            self._outcome(night, '', FAILED, f"the index of {path} could not be read")
            return None
        held = sorted(name.split('/')[1] for name in held)
        wanted = [e for e in held if not self.options.exposures or e in self.options.exposures]
        for expid in sorted(set(self.options.exposures) - set(held)):
            self._outcome(night, expid, FAILED, f"not in the archive {path}")
        present = [e for e in wanted if os.path.lexists(os.path.join(self.destination,
                                                                     night, e))]
        if not self.options.compare:
            for expid in present:
                self._outcome(night, expid, PRESENT, "in the destination; not extracted "
                              "(--compare to compare it with the archive)")
            wanted = [e for e in wanted if e not in present]
        if not wanted:
            return None
        members = ([] if len(wanted) == len(held) else [f'{night}/{e}' for e in wanted])
        command = [self.archive.program('htar'), '-xvf', path] + members
        if self.test:
            run(command, test=True, cwd=self.work_root)
            for expid in wanted:
                if expid in present:
                    self._outcome(night, expid, PRESENT, "in the destination; it would be "
                                  "compared with the archive")
                else:
                    self._outcome(night, expid, WOULD_INSTALL, f"from {path}, once verified")
            return None
        result = run(command, cwd=self.work, timeout=HTAR_TIMEOUT, stop=self.stop)
        if result.returncode != 0 or 'HTAR SUCCESSFUL' not in result.stdout:
            self._discard(night)
            self._outcome(night, '', FAILED, f"htar could not extract {path} (exit status "
                          f"{result.returncode:d}); nothing installed from it")
            return None
        return self.work

    def _from_tarball(self, night):
        """Verify ``NIGHT.tar`` against ``NIGHT.sha256sum`` and unpack it into
        the work directory; the directory holding ``NIGHT/``, or ``None``."""
        tarball = os.path.join(os.path.abspath(self.options.tarball), f'{night}.tar')
        sums = tarball[:-len('.tar')] + '.sha256sum'
        problem = tarball_problem(tarball, sums)
        if problem:
            if not self.options.ignore_tarball_checksum or not os.path.isfile(tarball):
                self._outcome(night, '', FAILED, problem + "; not unpacked")
                return None
            log.warning("%s; unpacking it anyway (--ignore-tarball-checksum): every "
                        "exposure is still verified against its own checksum file.", problem)
        else:
            log.info("%s matches %s.", tarball, sums)
        try:
            with tarfile.open(tarball) as tar:
                members, refused = _safe_members(tar, night)
                for name, why in refused:
                    self._outcome(night, '', FAILED, f"{tarball}: member {name!r} {why}; "
                                  "not unpacked")
                if self.test:
                    for expid in sorted({m.name.split('/')[1] for m in members
                                         if m.name.count('/') >= 1}):
                        present = os.path.lexists(os.path.join(self.destination, night, expid))
                        self._outcome(night, expid, PRESENT if present else WOULD_INSTALL,
                                      f"from {tarball}" +
                                      ("" if present else ", once verified"))
                    return None
                log.info("Unpacking %s into %s.", tarball, self.work)
                if hasattr(tarfile, 'data_filter'):
                    tar.extractall(self.work, members=members, filter='data')
                else:
                    tar.extractall(self.work, members=members)
        except (tarfile.TarError, EOFError, OSError) as err:
            self._discard(night)
            self._outcome(night, '', FAILED, f"{tarball} could not be unpacked: {err}")
            return None
        return self.work

    # ------------------------------------------------------------------
    # One flow for every source.
    # ------------------------------------------------------------------
    def settle(self, night, top):
        """Compare, verify, lock and install every exposure in ``TOP/NIGHT``.

        Parameters
        ----------
        night : :class:`str`
            The night.
        top : :class:`str`
            The directory holding ``NIGHT/EXPID`` from the source.

        Returns
        -------
        :class:`list`
            ``(expid, checksum errors)`` of each exposure installed.
        """
        source_night = os.path.join(top, night)
        if not os.path.isdir(source_night):
            self._outcome(night, '', FAILED, f"the source holds no directory {night}/")
            return []
        candidates = []
        for name in sorted(os.listdir(source_night)):
            path = os.path.join(source_night, name)
            if not (EXPID.fullmatch(name) and os.path.isdir(path)
                    and not os.path.islink(path)):
                (log.debug if self.source == 'lost+found' else log.warning)(
                    "%s is not an exposure directory (EXPID, 8 digits); left alone.", path)
                continue
            if self.options.exposures and name not in self.options.exposures:
                continue
            if self.source == 'lost+found' and not self._lost_found_candidate(path, name):
                continue
            candidates.append(name)
        night_dir = os.path.join(self.destination, night)
        installed = []
        for expid in candidates:
            if self.stop.is_set():
                self._outcome(night, expid, FAILED, f"not restored: {self.stop.reason}")
                continue
            source = os.path.join(source_night, expid)
            destination = os.path.join(night_dir, expid)
            if os.path.lexists(destination):
                self._compare(night, expid, source, destination)
                continue
            checksum = os.path.join(source, self.section.checksum_file.format(exposure=expid))
            if not os.path.lexists(checksum):
                if self.source == 'lost+found' and self.options.create_checksum:
                    if not self._create_checksum(night, expid, source, checksum):
                        continue
                else:
                    self._outcome(night, expid, NO_CHECKSUM, f"{checksum} is missing" +
                                  ("; --create-checksum makes it"
                                   if self.source == 'lost+found' else "") +
                                  f"; left in {source_night}")
                    self._keep(source)
                    continue
            if self.test:
                problems = verify_checksum(checksum) if os.path.exists(checksum) else ''
                if problems and not self.options.install_unverified:
                    self._outcome(night, expid, UNVERIFIED, _one_line(problems))
                else:
                    self._outcome(night, expid, WOULD_INSTALL, f"from {source}")
                continue
            problems = verify_checksum(checksum)
            if problems and not self.options.install_unverified:
                self._outcome(night, expid, UNVERIFIED, f"{_one_line(problems)}; left in "
                              f"{source} (--install-unverified installs it all the same)")
                self._keep(source)
                continue
            try:
                self.install(source, night_dir, expid)
            except OSError as err:
                self._outcome(night, expid, FAILED, f"could not be installed in {night_dir}: "
                              f"{err}; left in {source}")
                self._keep(source)
                continue
            installed.append((expid, bool(problems)))
            self._outcome(night, expid, INSTALLED_UNVERIFIED if problems else INSTALLED,
                          f"into {destination}" + (f"; checksum errors: {_one_line(problems)}"
                                                   if problems else ""))
        return installed

    def _lost_found_candidate(self, path, expid):
        """``True`` if `path` holds the file that makes it an exposure to
        recover (``desi-EXPID.fits.fz`` by default)."""
        wanted = f'{self.options.file_type}-{expid}{self.options.extension}'
        if os.path.isfile(os.path.join(path, wanted)):
            return True
        log.debug("%s has no %s; not recovered.", path, wanted)
        return False

    def _create_checksum(self, night, expid, source, checksum):
        """Write the missing checksum file of an exposure of the lost+found
        area, listing every regular file in it; ``True`` if written."""
        entries, problems = lstat_tree(source)
        odd = sorted(n for n, st in entries.items() if not (stat.S_ISREG(st.st_mode) or
                                                            stat.S_ISDIR(st.st_mode)))
        if problems or odd:
            why = '; '.join(problems + [f'{n} is not a regular file' for n in odd])
            self._outcome(night, expid, NO_CHECKSUM, f"{checksum} is missing and cannot be "
                          f"made: {why}")
            return False
        files = sorted(n for n, st in entries.items() if stat.S_ISREG(st.st_mode))
        if self.test:
            log.info("Test mode, would write %s listing %d files.", checksum, len(files))
            return True
        try:
            text = ''.join(f'{sha256_file(os.path.join(source, n))}  {n}\n' for n in files)
            write_text(checksum, text)
            os.chmod(checksum, file_perm)
        except OSError as err:
            self._outcome(night, expid, NO_CHECKSUM, f"{checksum} is missing and could not "
                          f"be written: {err}")
            return False
        log.info("Wrote %s listing %d files (--create-checksum).", checksum, len(files))
        return True

    def _compare(self, night, expid, source, destination):
        """An exposure already in the destination: never replaced, compared."""
        differences = compare_exposures(source, destination)
        if differences:
            self._outcome(night, expid, DIFFERS, f"{destination} is kept; differences with "
                          f"{source}: " + '; '.join(differences))
            self._keep(source)
        else:
            self._outcome(night, expid, IDENTICAL, f"{destination}, identical")

    def install(self, source, night_dir, expid):
        """Lock the exposure `source` and move it to ``NIGHT_DIR/EXPID``.

        The night directory is created (``0o2750``, or ``0o2550`` for a
        night restored from tape, which is archived) or, if it is archived
        (no user write), opened for the move and closed again.  The exposure
        directory gets the mode of an exposure in such a night.  The move is
        a rename; across file systems the copy is made beside its final name
        and renamed in, so the destination never holds a partial exposure.
        """
        created = not os.path.isdir(night_dir)
        if created:
            os.mkdir(night_dir)
            mode = ARCHIVED_DIR_PERM if self.source == 'tape' else dir_perm
            os.chmod(night_dir, dir_perm)
        else:
            mode = stat.S_IMODE(os.stat(night_dir).st_mode)
            self.actions.writable(night_dir)
        archived = not mode & stat.S_IWUSR
        done = False
        try:
            # The exposure is locked as the daemon locks it; in an archived night
            # its directories lose user write too, as the daemon's archive step does.
            self.actions.lock(source)
            destination = os.path.join(night_dir, expid)
            if os.path.lexists(destination):
                raise FileExistsError(f"{destination} appeared while restoring")
            self.actions.move_in(source, destination)
            if archived:
                self.actions.remove_user_write(destination)
            done = True
            log.info("Installed %s as %s.", source, destination)
        finally:
            if created and not done and not os.listdir(night_dir):
                os.rmdir(night_dir)
            else:
                os.chmod(night_dir, mode)

    # ------------------------------------------------------------------
    # After installing: status and archive.
    # ------------------------------------------------------------------
    def _record(self, night, installed):
        """Record rsync (arrived) and checksum outcomes of exposures installed
        from a tarball or the lost+found area, as the daemon would have."""
        records = []
        for expid, errors in installed:
            records += [(night, expid, 'rsync', False), (night, expid, 'checksum', errors)]
        status = TransferStatus(self.status_dir, year=night[:4])
        n = status.update_many(records)
        log.info("Recorded rsync and checksum of %d exposure(s) of night %s in %s "
                 "(%d record(s) changed).", len(installed), night, self.status_dir, n)

    def _archive(self, night, installed):
        """Archive `night` again with htar, now that it holds the exposures
        installed, and record their backup once the archive is on tape."""
        path = f'{self.hpss}/{archive_name(self.hpss, night)}'
        night_dir = os.path.join(self.destination, night)
        on_tape = self.archive.on_tape(self.hpss, night)
        if on_tape is None:
            self._outcome(night, '', FAILED, f"the HPSS directory {self.hpss} could not be "
                          "listed; the night is not archived again: try --archive later")
            return
        if on_tape:
            held = self.archive.exposures(self.hpss, night)
            here = {f'{night}/{e}' for e in os.listdir(night_dir)}
            if held is None or held - here:
                lost = ', '.join(sorted(held - here)) if held else ''
                self._outcome(night, '', FAILED, f"{path} " + (
                    f"holds exposures not in {night_dir} ({lost}): archiving the night again "
                    f"would lose them; restore them first (desi_transfer_restore {night})"
                    if held else "exists and its index could not be read") +
                    "; not archived again")
                return
        self.actions.remove_user_write(night_dir)
        result = self.archive.create(self.destination, self.hpss, night)
        held = self.archive.exposures(self.hpss, night) if result.returncode == 0 else None
        if held is None:
            self._outcome(night, '', FAILED, f"archiving the night as {path} failed (htar exit "
                          f"status {result.returncode:d})")
            return
        done = [e for e, _ in installed if f'{night}/{e}' in held]
        self._outcome(night, '', ARCHIVED, f"as {path}, holding {len(held):d} exposure(s)")
        if self.status_dir and done:
            status = TransferStatus(self.status_dir, year=night[:4])
            status.update_many([(night, e, 'backup', False) for e in done])

    # ------------------------------------------------------------------
    # Bookkeeping.
    # ------------------------------------------------------------------
    def _outcome(self, night, expid, what, detail):
        outcome = Outcome(night, expid, what, detail)
        self.outcomes.append(outcome)
        # The summary table reports every outcome; the log says what was done.
        log.debug("%s%s: %s%s.", night, f'/{expid}' if expid else '', what,
                  f' ({detail})' if detail else '')

    def _keep(self, source):
        if self.work is not None and source.startswith(self.work + os.sep):
            self.kept.append(source)

    def _discard(self, night):
        """Remove what an extraction that failed left in the work directory."""
        if self.work is not None:
            self.actions.remove_tree(os.path.join(self.work, night))

    def _clean_work(self):
        """Remove the work directory, unless it holds exposures kept for an operator."""
        if self.kept:
            log.warning("Kept for inspection in %s: %s; remove it when done.", self.work,
                        ', '.join(os.path.relpath(k, self.work) for k in sorted(self.kept)))
            for name in os.listdir(self.work):
                night = os.path.join(self.work, name)
                for expid in os.listdir(night) if os.path.isdir(night) else []:
                    path = os.path.join(night, expid)
                    if path not in self.kept:
                        self.actions.remove_tree(path)
            return
        self.actions.remove_tree(self.work)

    def summary(self):
        """The outcomes as lines of text: a count per night, then a table."""
        lines = []
        nights = sorted({o.night for o in self.outcomes})
        where = {'tape': f"from tape ({self.hpss})", 'tarball': f"from {self.options.tarball}",
                 'lost+found': "from the lost+found area " + getattr(self, 'lost_found', '')}
        for night in nights:
            counts = {}
            for o in self.outcomes:
                if o.night == night and o.expid:
                    counts[o.what] = counts.get(o.what, 0) + 1
            lines.append(f"Night {night} {where[self.source]} into "
                         f"{os.path.join(self.destination, night)}: " +
                         ('; '.join(f'{n:d} {what}' for what, n in sorted(counts.items()))
                          or 'no exposure') + '.')
        if self.outcomes:
            lines.append(f"{'NIGHT':9} {'EXPID':9} {'OUTCOME':28} DETAIL")
            for o in self.outcomes:
                lines.append(f"{o.night:9} {o.expid or '-':9} {o.what:28} {o.detail}")
        if self.test:
            lines.append("Test mode: nothing was changed.")
        return lines


def _one_line(problems):
    lines = problems.splitlines()
    return '; '.join(lines[:5]) + (f'; and {len(lines) - 5:d} more' if len(lines) > 5 else '')


def tarball_problem(tarball, sums):
    """What is wrong with `tarball` according to the checksum file `sums`
    (``sha256sum`` format, listing the tarball by name); ``''`` if nothing."""
    name = os.path.basename(tarball)
    if not os.path.isfile(tarball):
        return f"{tarball} is missing"
    try:
        with open(sums, 'rb') as f:
            data = f.read(MAX_CHECKSUM_FILE_SIZE + 1)
    except OSError as err:
        return f"{sums} cannot be read: {err.strerror or err}"
    if len(data) > MAX_CHECKSUM_FILE_SIZE:
        return f"{sums} is larger than {MAX_CHECKSUM_FILE_SIZE:d} bytes"
    expected = None
    for line in data.decode(errors='replace').splitlines():
        m = re.fullmatch(r'([0-9a-fA-F]{64}) [ *](.+)', line.strip())
        if m and os.path.basename(m.group(2)) == name:
            expected = m.group(1).lower()
    if expected is None:
        return f"{sums} does not list {name}"
    try:
        digest = sha256_file(tarball)
    except OSError as err:
        return f"{tarball} cannot be read: {err.strerror or err}"
    if digest != expected:
        return f"checksum failure when verifying {tarball}: expected {expected}, computed {digest}"
    return ''


def _safe_members(tar, night):
    """Members of `tar` that may be unpacked: directories and regular files
    under ``NIGHT/``; and ``(name, why)`` for the others."""
    members, refused = [], []
    for member in tar:
        name = member.name
        parts = name.split('/')
        normal = posixpath.normpath(name)
        if name.startswith('/') or '..' in parts:
            refused.append((name, 'would leave the directory it is unpacked in'))
        elif normal != night and not normal.startswith(night + '/'):
            refused.append((name, f'is not under {night}/'))
        elif not (member.isdir() or member.isfile()):
            refused.append((name, 'is not a directory or a regular file'))
        else:
            members.append(member)
    return members, refused


def compare_exposures(first, second):
    """Differences between two copies of an exposure directory.

    Parameters
    ----------
    first, second : :class:`str`
        The two directories.

    Returns
    -------
    :class:`list`
        One sentence per difference: a name in one only, another kind of
        entry, another size, other contents (sha256); empty if identical.
    """
    one, problems = lstat_tree(first)
    two, more = lstat_tree(second)
    differences = problems + more
    for name in sorted(set(one) | set(two)):
        if name not in two:
            differences.append(f"{name} only in {first}")
        elif name not in one:
            differences.append(f"{name} only in {second}")
        elif stat.S_IFMT(one[name].st_mode) != stat.S_IFMT(two[name].st_mode):
            differences.append(f"{name} is not the same kind of entry in both")
        elif stat.S_ISREG(one[name].st_mode):
            if one[name].st_size != two[name].st_size:
                differences.append(f"{name}: {one[name].st_size:d} bytes here, "
                                   f"{two[name].st_size:d} there")
            else:
                try:
                    same = (sha256_file(os.path.join(first, name)) ==
                            sha256_file(os.path.join(second, name)))
                except OSError as err:
                    differences.append(f"{name} could not be read: {err.strerror or err}")
                    continue
                if not same:
                    differences.append(f"{name}: other contents (sha256)")
    return differences


def _night(value):
    if not valid_night(value):
        raise ArgumentTypeError(f"{value!r} is not a night, YYYYMMDD")
    return value


def _exposure(value):
    if not EXPID.fullmatch(value):
        raise ArgumentTypeError(f"{value!r} is not an exposure number, 8 digits")
    return value


def _word(value):
    if not re.fullmatch(r'[A-Za-z0-9_.+-]{1,64}', value):
        raise ArgumentTypeError(f"{value!r} is not a file type or extension")
    return value


def _options(args=None):
    """Parse command-line options for :command:`desi_transfer_restore`.

    Parameters
    ----------
    args : :class:`list`, optional
        Command-line arguments; ``sys.argv[1:]`` if not set.

    Returns
    -------
    :class:`argparse.Namespace`
        The parsed command-line options.
    """
    desc = ("Restore exposures missing from the destination: from the night's archive on "
            "tape (default), from night tarballs (--tarball) or from the lost+found area "
            "(--lost-found).  An exposure already in the destination is never replaced.")
    prsr = ArgumentParser(prog=os.path.basename(sys.argv[0]), description=desc)
    prsr.add_argument('nights', metavar='NIGHT', nargs='*', type=_night,
                      help="Night(s) to restore, YYYYMMDD; from tape at least one.  From "
                           "tarballs or lost+found, by default every night found there.")
    prsr.add_argument('-c', '--configuration', metavar='FILE',
                      help="Read the daemon's configuration from FILE (default: the shipped "
                           "desi_transfer_daemon.ini).")
    prsr.add_argument('--section', metavar='NAME',
                      help="The destination section of the configuration (default: the "
                           "first, DESI_SPECTRO_DATA).")
    prsr.add_argument('--destination', metavar='DIR',
                      help="Install into DIR instead of the section's destination.")
    prsr.add_argument('--work', metavar='DIR',
                      help="Unpack into a private directory in DIR (default: the section's "
                           "staging directory, on the destination's file system).")
    prsr.add_argument('-e', '--exposure', metavar='EXPID', type=_exposure, action='append',
                      dest='exposures', default=[],
                      help="Only this exposure (repeat for more); with one NIGHT.")
    prsr.add_argument('--compare', action='store_true',
                      help="From tape: also extract the exposures already in the destination "
                           "and report how they differ from the archive.")
    prsr.add_argument('--tarball', metavar='DIR',
                      help="Restore from NIGHT.tar verified by NIGHT.sha256sum in DIR.")
    prsr.add_argument('-I', '--ignore-tarball-checksum', action='store_true',
                      dest='ignore_tarball_checksum',
                      help="With --tarball: unpack a tarball that fails its checksum.")
    prsr.add_argument('--lost-found', metavar='DIR', nargs='?', const='', dest='lost_found',
                      help="Move exposures from the lost+found area, DIR (default: lost+found "
                           "beside the staging directory).")
    prsr.add_argument('--create-checksum', action='store_true', dest='create_checksum',
                      help="With --lost-found: write a missing checksum file, listing every "
                           "file of the exposure.")
    prsr.add_argument('--file-type', metavar='TYPE', type=_word, default='desi',
                      dest='file_type',
                      help="With --lost-found: recover exposures holding TYPE-EXPID.EXT "
                           "(default %(default)s).")
    prsr.add_argument('--extension', metavar='EXT', type=_word, default='.fits.fz',
                      help="With --lost-found: see --file-type (default %(default)s).")
    prsr.add_argument('--install-unverified', action='store_true', dest='install_unverified',
                      help="Also install exposures whose checksum does not verify (the "
                           "errors are reported, and recorded).")
    prsr.add_argument('--archive', action='store_true',
                      help="From tarballs or lost+found: archive each night that received "
                           "exposures to HPSS again, and record their backup.")
    prsr.add_argument('--status', metavar='DIR',
                      help="Record in the status directory DIR (default: the daemon's).")
    prsr.add_argument('--no-status', action='store_false', dest='record',
                      help="Record nothing in the status.")
    prsr.add_argument('-t', '--test', action='store_true',
                      help="Test mode: read and list, say what would be done, change nothing.")
    prsr.add_argument('-v', '--verbose', action='store_true',
                      help="Log every step (DEBUG).")
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    options = prsr.parse_args(args)
    tape = options.tarball is None and options.lost_found is None
    rules = [(options.tarball is not None and options.lost_found is not None,
              "--tarball and --lost-found are two sources; give one"),
             (tape and not options.nights, "restoring from tape needs at least one NIGHT"),
             (options.exposures and len(options.nights) != 1,
              "--exposure needs exactly one NIGHT"),
             (options.compare and not tape, "--compare is for restoring from tape"),
             (options.archive and tape, "--archive is for tarballs and lost+found"),
             (options.ignore_tarball_checksum and options.tarball is None,
              "--ignore-tarball-checksum goes with --tarball"),
             ((options.create_checksum or options.file_type != 'desi' or
               options.extension != '.fits.fz') and options.lost_found is None,
              "--create-checksum, --file-type and --extension go with --lost-found"),
             (options.status and not options.record, "--status and --no-status disagree")]
    for broken, message in rules:
        if broken:
            prsr.error(message)
    return options


def main():
    """Entry point for :command:`desi_transfer_restore`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`: 0 if every
        exposure is in place, 1 if anything needs an operator, 2 for bad input.
    """
    options = _options()
    configure_log(debug=options.verbose)
    try:
        restore = Restore(options)
    except ConfigurationError as err:
        print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr)
        return 2
    restore.stop.handle_signals()
    code = restore.run()
    print('\n'.join(restore.summary()))
    return code
