# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
==================
desitransfer.store
==================

The status store: the transfer status of DESI raw exposures, which every
command records in or reads (:class:`TransferStatus`, :func:`read_status`),
and the status web page installed beside it (:func:`install_page`).
:command:`desi_transfer_status` (:mod:`desitransfer.status`) is its command
line.
The status of a year lives in one JSON file, ``desi_transfer_status_YYYY.json``,
shaped ``{"NIGHT": {"EXPID": [[stage, ok, ms], ...]}}``: EXPID is the exposure
number without leading zeros, stage is 0 (rsync), 1 (checksum), 2 (backup) or
3 (linked: when the exposure's link appeared at the mountain), ok is 1 or 0,
ms is the Unix time in milliseconds, and the newest row comes first.  There
is one row per exposure and stage.

Every change is a read-modify-write of the whole file under an exclusive
:func:`fcntl.flock` on a separate lock file, ``.desi_transfer_status_YYYY.lock``,
so that several processes can record at once without losing an update.  Each
update writes the new version twice, each time to a temporary file that is
fsync'ed and then renamed (:func:`os.replace`): first a second complete copy,
``desi_transfer_status_YYYY.json.copy``, then the status file itself, whose
previous version is kept as ``desi_transfer_status_YYYY.json.bak``; the
directory is fsync'ed before the update returns.  A malformed or missing
status file is kept as ``.bad`` and restored from the copy, so that no
acknowledged update is lost; only if the copy is bad too does the ``.bak``
serve.
"""
import datetime as dt
import errno
import html
import json
import os
import re
import shutil
import stat
import threading
import time
from contextlib import contextmanager
from importlib.resources import files
from urllib.parse import urlsplit

import fcntl

from .common import FILE_MODE, log, valid_night
from .files import (aside_name, create_file, discard, fsync_directory, mode_of, remove_leftover,
                    sweep_temporary, temporary_name, write_text)
from .processes import open_lock

#: Files of the status web page, installed from the package data.
PAGE_FILES = ('index.html', 'desi_transfer_status.js', 'desi_transfer_status.css')

#: Mode of the installed status page files, whatever the umask: readable by
#: the web server.
PAGE_MODE = 0o644


def _page_source():
    """Directory (package data) holding the status page files (replaced in tests).
    """
    return files('desitransfer') / 'data'


#: Where the status page links each exposure: ``DATA_URL/NIGHT/EXPID/``, EXPID
#: in 8 digits (the DESI data server, as in the original page).
DATA_URL = 'https://data.desi.lbl.gov/desi/spectro/data/'

#: The element of ``index.html`` that gives the page its data URL.
_DATA_URL_META = re.compile(r'<meta name="desi-data-url" content="([^"<>]*)">')


def data_url(value):
    """`value` checked as the base of the exposure links of the status page.

    Parameters
    ----------
    value : :class:`str`
        An ``http://`` or ``https://`` URL of a directory, without query,
        fragment, user name or password; only the characters of a URL path
        (percent-encode the others), so that nothing can break out of the
        page's markup.

    Returns
    -------
    :class:`str`
        `value`, ending with ``/``.

    Raises
    ------
    ValueError
        If `value` is not such a URL; the message says why, in one line.
    """
    text = value if isinstance(value, str) else ''
    why = None
    if len(text) > 1000:
        why = "longer than 1000 characters"
    elif re.fullmatch(r"[A-Za-z0-9._~:/@!$&()*+,;=%-]+", text) is None:
        why = ("it may hold only letters, digits and -._~:/@!$&()*+,;=% "
               "(no quote, space, markup, query or fragment)")
    elif re.search(r'%(?![0-9A-Fa-f]{2})', text):
        why = "a % is not followed by two hexadecimal digits"
    elif re.match(r'https?://', text, re.IGNORECASE) is None:
        why = "it is not an http:// or https:// URL"
    else:
        scheme, rest = text.split(':', 1)
        text = scheme.lower() + ':' + rest
        parts = urlsplit(text)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if '@' in parts.netloc:
            why = "it holds a user name or password"
        elif not parts.hostname or not port_ok:
            why = "its host or port is not valid"
    if why is not None:
        shown = repr(text[:100]) + ('...' if len(text) > 100 else '')
        raise ValueError(f"{shown} is not a base URL for the exposure links: {why}; "
                         f"give one such as {DATA_URL}")
    return text if text.endswith('/') else text + '/'


def _installed_data_url(directory):
    """The data URL of the page installed in `directory`, ``None`` if none."""
    try:
        with open(os.path.join(directory, 'index.html'), 'rb') as f:
            text = f.read(1_000_000).decode('utf-8', errors='replace')
    except OSError:
        return None
    m = _DATA_URL_META.search(text)
    if m is None:
        return None
    try:
        return data_url(html.unescape(m.group(1)))
    except ValueError as err:
        log.warning("The installed status page of %s: %s; it gets the default.", directory, err)
        return None


def install_page(directory, url=None):
    """Copy the status page files (:data:`PAGE_FILES`) from the package data
    to `directory`, each written to a new temporary file renamed over the old
    (:func:`desitransfer.files.write_text`: never through a link planted in
    the directory), with mode :data:`PAGE_MODE`.

    Parameters
    ----------
    directory : :class:`str`
        The status directory, created (with its parents) if missing.
    url : :class:`str`, optional
        Link each exposure to ``URL/NIGHT/EXPID/`` (checked with
        :func:`data_url`).  If not set, the URL of the page already installed
        there is kept, else :data:`DATA_URL`.

    Raises
    ------
    ValueError
        If `url` is not a usable URL; nothing is written.
    """
    url = data_url(url) if url is not None else (_installed_data_url(directory) or DATA_URL)
    if not os.path.isdir(directory):
        os.makedirs(directory)
        log.info("Created status directory %s.", directory)
    source = _page_source()
    installed = []
    for name in PAGE_FILES:
        page = source / name
        if not page.is_file():
            continue
        content = page.read_bytes()
        if name == 'index.html':
            text, n = _DATA_URL_META.subn(
                f'<meta name="desi-data-url" content="{html.escape(url)}">',
                content.decode('utf-8'), count=1)
            if n == 0:
                log.warning("The packaged %s has no data URL element; its exposures are "
                            "not linked to %s.", page, url)
            content = text.encode('utf-8')
        write_text(os.path.join(directory, name), content, mode=PAGE_MODE)
        installed.append(name)
    if installed:
        log.info("Installed status page %s in %s; exposures link to %s.",
                 ', '.join(installed), directory, url)
    missing = sorted(set(PAGE_FILES) - set(installed))
    if missing:
        log.warning("Status page file(s) %s missing from the package data %s; "
                    "not installed in %s.", ', '.join(missing), source, directory)


def _open_regular(path):
    """The regular file `path` open for reading bytes, never through a link.

    Raises :exc:`OSError` (errno ``ELOOP`` for a link, ``EINVAL`` for
    anything but a regular file) if it is not one.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link, not followed", path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return os.fdopen(fd, 'rb')


def milliseconds():
    """Current Unix time in milliseconds (replaced in tests).
    """
    return int(time.time() * 1000)


def _exposure_key(exposure):
    """Exposure number as stored: the string of a non-negative integer.
    """
    if isinstance(exposure, int) and not isinstance(exposure, bool) and exposure >= 0:
        return str(exposure)
    if isinstance(exposure, str) and re.fullmatch(r'[0-9]+', exposure):
        return str(int(exposure))
    raise ValueError(f"Exposure must be a non-negative integer, not {exposure!r}.")


def plural(n, word):
    """``'1 night'``, ``'2 nights'``."""
    return f"{n:d} {word}{'' if n == 1 else 's'}"


def _malformed(data):
    """Why `data` is not in the status format, or an empty string if it is.
    """
    if not isinstance(data, dict):
        return f"top level is {type(data).__name__}, not an object"
    for night, exposures in data.items():
        if not isinstance(exposures, dict):
            return f"night {night} is not an object"
        for exposure, rows in exposures.items():
            if type(rows) is not list:
                return f"rows of {night}/{exposure} are not a list"
    return ''


class TransferStatus(object):
    """Simple object for interacting with desitransfer status reports.

    The directory is created if it does not exist, and the status page
    (:data:`PAGE_FILES`) is installed in it if `install` is set, if the
    directory is new, or if ``index.html`` is missing.

    Parameters
    ----------
    directory : :class:`str`
        Retrieve and store JSON-encoded transfer status data in `directory`.
    install : :class:`bool`, optional
        If ``True``, install HTML and JS files.
    year : :class:`str` or :class:`int`, optional
        Update records belonging to `year`.  If not set, the current year is
        assumed.  This is the year loaded in :attr:`status` and :attr:`json`;
        a record always goes to the file of its night's own year, so that a
        night is never split between files at New Year.
    """

    #: Stage names and their codes in the file.  ``linked`` is when the
    #: exposure's link appeared at the mountain (its modification time there):
    #: the latency of an exposure is its checksum time minus its linked time.
    stages = {'rsync': 0, 'checksum': 1, 'backup': 2, 'linked': 3}

    def __init__(self, directory, install=False, year=None):
        self.directory = os.path.abspath(directory)
        self.year = dt.datetime.now().year if year is None else int(year)
        self.json = self._path(self.year)
        self._cache = {}
        self._locked = set()
        self._swept = False
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory)
            log.info("Created status directory %s.", self.directory)
            install = True
        if install or not os.path.exists(os.path.join(self.directory, 'index.html')):
            self._install()
        self._data(self.year)

    #: The first year of DESI records, the first of the status page's years.
    first_year = '2018'

    @property
    def current_year(self):
        """:attr:`year` as a string, the original's name for it."""
        return str(self.year)

    @property
    def _stages(self):
        """:attr:`stages`, the original's name for it."""
        return self.stages

    @property
    def status(self):
        """The records of :attr:`year`, re-read if another process changed them.
        """
        return self._data(self.year)

    def _path(self, year):
        return os.path.join(self.directory, f'desi_transfer_status_{year:d}.json')

    def _install(self):
        """Copy the status page files from the package data to the directory,
        keeping the data URL of the page installed there (:func:`install_page`).
        """
        install_page(self.directory)

    @contextmanager
    def _lock(self, year):
        """Hold the exclusive lock of the file of `year` (re-entrant in a thread).
        """
        held = (threading.get_ident(), year)
        if held in self._locked:
            yield
            return
        name = os.path.join(self.directory, f'.desi_transfer_status_{year:d}.lock')
        fd, _ = open_lock(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._locked.add(held)
            yield
        finally:
            self._locked.discard(held)
            os.close(fd)

    @staticmethod
    def _stamp(st):
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @staticmethod
    def _read(path):
        """Records in `path` and the stamp of the file read.

        Raises :exc:`FileNotFoundError`, or :exc:`ValueError` if malformed
        (a symbolic link or anything but a regular file is not followed: malformed).
        """
        try:
            f = _open_regular(path)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.EINVAL):
                raise ValueError(err.strerror) from None
            raise
        with f:
            st = os.fstat(f.fileno())
            stamp = TransferStatus._stamp(st)
            text = f.read()
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise ValueError(f"not valid JSON ({err})") from None
        why = _malformed(data)
        if why:
            raise ValueError(why)
        return data, stamp

    def _load(self, year):
        """Read the file of `year` from disk, recovering it if it is malformed.
        """
        path = self._path(year)
        try:
            data, stamp = self._read(path)
        except FileNotFoundError:
            spares = [p for p in (path + '.copy', path + '.bak') if os.path.exists(p)]
            if not spares:
                self._cache[year] = (None, {})
                return {}
            log.error("Status file %s is missing; restoring it from %s.",
                      path, ' or '.join(spares))
        except ValueError as err:
            log.error("Status file %s is malformed: %s; repairing it.", path, err)
        else:
            self._cache[year] = (stamp, data)
            self._check_copy(year, stamp)
            return data
        with self._lock(year):
            # Another process may have repaired it while we waited.
            try:
                data, stamp = self._read(path)
            except (FileNotFoundError, ValueError):
                return self._handle_malformed(year)
            self._cache[year] = (stamp, data)
            return data

    def _check_copy(self, year, stamp):
        """Make the copy of the good status file of `year` (whose stamp is
        `stamp`) mirror it again if another program wrote the file.

        Each update gives the copy the modification time of the status file
        it mirrors; a file with another time or size was written by another
        program (the original desitransfer writes the file in place and knows
        nothing of the copy), so the copy is stale: it is written again from
        the file, under the lock, with a WARNING.  Best effort: a directory
        this process cannot write is left as it is (the copy is then checked
        before it is used, see :meth:`_handle_malformed`).
        """
        path = self._path(year)
        try:
            copy = os.stat(path + '.copy')
            if (copy.st_mtime_ns, copy.st_size) == (stamp[3], stamp[2]):
                return
            stale = True
        except FileNotFoundError:
            stale = False
        except OSError:
            return
        try:
            with self._lock(year):
                with _open_regular(path) as f:
                    st = os.fstat(f.fileno())
                    text = f.read()
                if self._stamp(st) != stamp:
                    return  # Changed again meanwhile: checked at its next reading.
                tmp = temporary_name(path + '.copy')
                try:
                    self._write_file(tmp, text, stat.S_IMODE(st.st_mode) & 0o777)
                    os.utime(tmp, ns=(time.time_ns(), stamp[3]))
                    os.replace(tmp, path + '.copy')
                finally:
                    discard(tmp)
        except OSError as err:
            log.debug("Could not write the copy of %s: %s.", path, err)
            return
        if stale:
            log.warning("Status file %s does not match its copy %s.copy (the file was "
                        "written by another program, such as the original desitransfer, "
                        "or the copy was damaged); the copy is written again from the file.",
                        path, path)

    def _data(self, year):
        """Records of `year`, from memory unless the file changed on disk.
        """
        try:
            stamp = self._stamp(os.stat(self._path(year)))
        except FileNotFoundError:
            stamp = None
        if year in self._cache and self._cache[year][0] == stamp:
            return self._cache[year][1]
        return self._load(year)

    @staticmethod
    def _write_file(path, text, mode):
        """Write `text` to the new file `path` with `mode`, synced to disk; its stamp.

        The file is created by :func:`desitransfer.files.create_file`: a new
        file, never reached through a link.
        """
        f, _ = create_file(path, mode, beside=False)
        with f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            return TransferStatus._stamp(os.fstat(f.fileno()))

    def _write(self, year, data, backup=True):
        """Write the records of `year`: the copy, then the status file, whose
        previous version is kept as ``.bak`` if `backup` is set.

        Both new files are written and synced before either is renamed into
        place, so that a full disk changes nothing.  The caller holds the lock
        of `year`.
        """
        if not self._swept:
            sweep_temporary(self.directory)
            self._swept = True
        path = self._path(year)
        # Not escaping non-ASCII is twice as fast, and the same for the usual digits.
        text = json.dumps(data, separators=(',', ':'), ensure_ascii=False).encode('utf-8')
        # The mode of the file replaced, else FILE_MODE: never from the umask,
        # which is never changed (threads may be starting programs).
        mode = mode_of(path, FILE_MODE)
        copy, tmp = temporary_name(path + '.copy'), temporary_name(path)
        bak = temporary_name(path + '.bak')
        try:
            for target in (path + '.copy', path, path + '.bak'):
                # Left by a killed process that had our process id before us.
                remove_leftover(target)
            self._write_file(copy, text, mode)
            stamp = self._write_file(tmp, text, mode)
            # The copy carries the time of the file it mirrors: a file written
            # by another program afterwards has another (see _check_copy).
            os.utime(copy, ns=(time.time_ns(), stamp[3]))
            # The copy is a file of its own (not a second name): a corruption
            # of the status file in place cannot reach it.
            os.replace(copy, path + '.copy')
            if backup and os.path.exists(path):
                # A second name for the version being replaced: cheaper than a copy.
                try:
                    os.link(path, bak)
                except OSError:
                    self._copy_new(path, bak)
                os.replace(bak, path + '.bak')
            os.replace(tmp, path)
        finally:
            for leftover in (copy, tmp, bak):
                discard(leftover)
        fsync_directory(self.directory)
        self._cache[year] = (stamp, data)

    @staticmethod
    def _keep(path, suffix):
        """Keep `path` under a new name ending in `suffix`, never replacing one.
        """
        name = aside_name(path, suffix)
        try:
            os.link(path, name)
        except OSError:
            TransferStatus._copy_new(path, name)
        return name

    @staticmethod
    def _copy_new(source, name):
        """Copy the file `source` (not through a link) to the new file `name`
        (:func:`desitransfer.files.create_file`), with its mode and times.
        """
        with _open_regular(source) as f:
            st = os.fstat(f.fileno())
            out, _ = create_file(name, stat.S_IMODE(st.st_mode) & 0o777, beside=False)
            try:
                with out:
                    shutil.copyfileobj(f, out)
                    out.flush()
                    os.utime(out.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
            except BaseException:
                discard(name)
                raise

    def _handle_malformed(self, year=None):
        """Handle malformed JSON files.

        The malformed (or missing) status file is kept as ``.bad``
        (``.bad.1``, ... if that exists) for later analysis, and the records
        are restored from the copy written with the last update,
        ``.json.copy``, with an ERROR message: no update is lost.  If the copy
        is malformed or missing too, the version before the last update,
        ``.json.bak``, is restored with a CRITICAL message, since the last
        update may be lost.  Only if neither is good does the status file
        start empty (``{}``), with a CRITICAL message.  A malformed copy or
        ``.bak`` is kept as ``.copy.bad`` or ``.bak.bad``.

        Parameters
        ----------
        year : :class:`int`, optional
            Year of the file to repair, :attr:`year` by default.

        Returns
        -------
        :class:`dict`
            The records now in the status file.
        """
        year = self.year if year is None else int(year)
        path = self._path(year)
        with self._lock(year):
            if os.path.exists(path):
                problem, kept = 'malformed', [f"kept it as {self._keep(path, '.bad')}"]
            else:
                problem, kept = 'missing', []
            spares = [path + '.copy', path + '.bak']
            stale = self._stale_copy(path)
            if stale:
                # Another program wrote the file after the copy: the .bak it
                # left is the newer version.
                spares.reverse()
                kept.append(f"{path}.copy is older than the last update of another "
                            f"program (such as the original desitransfer), which left "
                            f"{path}.bak")
            for spare in spares:
                try:
                    data, stamp = self._read(spare)
                    break
                except FileNotFoundError:
                    kept.append(f"{spare} is missing")
                except ValueError as err:
                    bad = self._keep(spare, '.bad')
                    kept.append(f"{spare} is malformed ({err}), kept as {bad}")
            else:
                log.critical("Status file %s was %s and there is no good copy (%s); "
                             "STARTING AN EMPTY STATUS FILE, records of %d are lost "
                             "unless recovered by hand.", path, problem, '; '.join(kept), year)
                data, spare = {}, None
            if spare is not None:
                when = dt.datetime.fromtimestamp(stamp[3] / 1e9, dt.timezone.utc)
                kept.append(f"restored {plural(len(data), 'night')} from {spare}, written "
                            f"{when:%Y-%m-%d %H:%M:%S} UTC")
                if stale:
                    log.critical("Status file %s was %s: %s: THE RECORDS WRITTEN BY THE "
                                 "OTHER PROGRAM SINCE MAY BE LOST; look for them in the "
                                 ".bad file.", path, problem, '; '.join(kept))
                elif spare.endswith('.copy'):
                    log.error("Status file %s was %s: %s with the last update; "
                              "no record is lost.", path, problem, '; '.join(kept))
                else:
                    log.critical("Status file %s was %s: %s, the version before the last "
                                 "update: THE LAST UPDATE MAY BE LOST; look for it in the "
                                 ".bad file.", path, problem, '; '.join(kept))
            self._write(year, data, backup=False)
        return data

    @staticmethod
    def _stale_copy(path):
        """``True`` if the copy of status file `path` is known not to mirror
        its last version: another program wrote the file after the last
        update of this package (the original desitransfer copies the file to
        ``.bak``, keeping its time, before it writes it; this package's updates
        leave a ``.bak`` older than the copy)."""
        try:
            return (os.stat(path + '.bak').st_mtime_ns >=
                    os.stat(path + '.copy').st_mtime_ns)
        except OSError:
            return False

    def _night(self, night):
        night = str(night)
        if not valid_night(night):
            raise ValueError(f"Night must be a date in YYYYMMDD format, not {night!r}.")
        return night, int(night[:4])

    def _stage(self, stage):
        try:
            return self.stages[stage]
        except (KeyError, TypeError):
            raise ValueError(f"Unknown stage {stage!r}; known stages are "
                             f"{', '.join(self.stages)}.") from None

    def find(self, night, exposure=None, stage=None):
        """Find status entries that match `night`, etc.

        The records are read from the file of the night's year, again if
        another process changed it.  Rows are ``[stage, ok, ms]`` lists,
        newest first (copies: changing them changes nothing on disk).  An
        index ``k`` returned for an exposure points to the row
        ``find(night)[exposure][k]``; :meth:`records` returns the rows
        themselves.

        Parameters
        ----------
        night : :class:`str`
            Night of observation.
        exposure : :class:`str`, optional
            Exposure number.
        stage : :class:`str`, optional
            Stage of data transfer ('rsync', 'checksum', 'backup', ...).

        Returns
        -------
        :class:`dict` or :class:`list`
            If only `night` is set, return a dict containing information on all
            exposures for that night (their rows).  If `exposure` is not set,
            return a dict keyed by exposure containing, for each exposure of
            that night, the indexes of its rows matching `stage`.  If `stage` is
            not set, return a list containing indexes pointing to all data about
            that exposure.  If both `exposure` and `stage` are set, return a
            list of indexes pointing to the data for `exposure` filtered on
            `stage`.  An exposure without records gives an empty list.

        Raises
        ------
        KeyError
            If `night` is not yet defined (with both `exposure` and `stage`,
            an empty list is returned instead, as the original did).
        """
        try:
            found = self.records(night, exposure, stage=None)
        except KeyError:
            if exposure is not None and stage is not None:
                self._stage(stage)
                return []  # As the original: no rows of an unknown night.
            raise
        if exposure is None and stage is None:
            return found
        code = None if stage is None else self._stage(stage)

        def indexes(rows):
            return [k for k, row in enumerate(rows) if code is None or row[0] == code]

        if exposure is None:
            return {e: indexes(rows) for e, rows in found.items()}
        return indexes(found)

    def records(self, night, exposure=None, stage=None):
        """The rows that match `night`, etc.: like :meth:`find`, with the rows
        themselves instead of their indexes.

        Parameters
        ----------
        night : :class:`str`
            Night of observation.
        exposure : :class:`str`, optional
            Exposure number.
        stage : :class:`str`, optional
            Stage of data transfer ('rsync', 'checksum', 'backup', ...).

        Returns
        -------
        :class:`dict` or :class:`list`
            Without `exposure`, a dict keyed by exposure of its rows (matching
            `stage` if set); with `exposure`, the list of its rows (matching
            `stage` if set), empty if it has none.

        Raises
        ------
        KeyError
            If `night` is not yet defined.
        """
        night, year = self._night(night)
        code = None if stage is None else self._stage(stage)
        records = self._data(year)[night]

        def rows(r):
            return [list(row) for row in r if code is None or row[0] == code]

        if exposure is None:
            return {e: rows(r) for e, r in records.items()}
        return rows(records.get(_exposure_key(exposure), []))

    def update(self, night, exposure, stage, failure=False):
        """Update the transfer status.

        There is one row per exposure and stage: a new outcome replaces the
        row (whatever its time, so that a success after a failure is recorded
        even if the clock went back) and moves it first; the same outcome
        again changes nothing.  New nights and exposures are added.  The
        record goes to the file of the night's year.

        Parameters
        ----------
        night : :class:`str`
            Night of observation.
        exposure : :class:`str`
            Exposure number, or ``'all'`` for every exposure already recorded
            for `night` (nothing, if the night is unknown).
        stage : :class:`str`
            Stage of data transfer ('rsync', 'checksum', 'backup', ...).
        failure : :class:`bool`, optional
            Indicate failure.

        Returns
        -------
        :class:`int`
            The number of updates performed.

        Raises
        ------
        ValueError
            If `night`, `exposure` or `stage` is not valid.
        """
        return self.update_many([(night, exposure, stage, failure)])

    def update_many(self, records):
        """Update the transfer status of several exposures at once.

        Each record is applied exactly as by :meth:`update`, but each year's
        file is locked, read and written once for all of them: the way to
        record a whole backlog of exposures quickly.

        Parameters
        ----------
        records : :class:`list`
            ``(night, exposure, stage, failure)`` tuples, applied in order.
            A fifth element, if present, is the time of the outcome in Unix
            milliseconds (by default, the time of the update).

        Returns
        -------
        :class:`int`
            The number of updates performed.

        Raises
        ------
        ValueError
            If any record is not valid; then nothing is recorded.
        """
        by_year = {}
        for night, exposure, stage, failure, *when in records:
            night, year = self._night(night)
            key = None if exposure == 'all' else _exposure_key(exposure)
            if when and (isinstance(when[0], bool) or not isinstance(when[0], int)
                         or when[0] < 0 or len(when) > 1):
                raise ValueError(f"Time of a record must be Unix milliseconds, not {when!r}.")
            by_year.setdefault(year, []).append((night, key, stage, self._stage(stage),
                                                 0 if failure else 1, when))
        total = 0
        for year, changes in by_year.items():
            with self._lock(year):
                data = self._load(year)
                now = []  # One time for the whole batch, read only if something changes.
                n = sum(self._apply(data, year, now, *change) for change in changes)
                if n:
                    self._write(year, data)
            total += n
        return total

    def _apply(self, data, year, now, night, key, stage, code, ok, when):
        """Apply one update to the records `data` of `year`; the number of rows changed.

        `now` holds the time of the batch in milliseconds once it is read.
        """
        if key is None and not data.get(night):
            log.warning("No exposures of night %s are recorded in %s; "
                        "%s of 'all' not recorded.", night, self._path(year), stage)
            return 0
        exposures = data.setdefault(night, {})
        n = 0
        for e in (list(exposures) if key is None else [key]):
            rows = exposures.setdefault(e, [])
            old = [row for row in rows if row[0] == code]
            if len(old) == 1 and old[0][1] == ok:
                continue
            if not when and not now:
                now.append(milliseconds())
            ms = when[0] if when else now[0]
            rows[:] = [[code, ok, ms]] + [row for row in rows if row[0] != code]
            n += 1
        log.debug("Recorded %s %s for %d exposure(s) of night %s in %s.", stage,
                  'success' if ok else 'failure', n, night, self._path(year))
        return n


def read_status(directory, year):
    """The records of `year` in the status directory `directory`, read without
    changing anything: no lock is taken and a damaged file is not repaired.

    A status file that is missing or malformed is read from its copy, or
    else from its ``.bak``, as :class:`TransferStatus` would restore it.

    Parameters
    ----------
    directory : :class:`str`
        The status directory.
    year : :class:`int`
        The year.

    Returns
    -------
    :class:`tuple`
        The records (``{}`` if there is no file at all) and ``''``, or a
        sentence saying which file was damaged and what was read instead.
    """
    path = os.path.join(directory, f'desi_transfer_status_{int(year):d}.json')
    problem = ''
    for name in (path, path + '.copy', path + '.bak'):
        try:
            data, _ = TransferStatus._read(name)
        except FileNotFoundError:
            if name == path:
                problem = f"{path} is missing"
            continue
        except ValueError as err:
            if name == path:
                problem = f"{path} is malformed ({err})"
            continue
        if name == path:
            return data, ''
        return data, f"{problem}; read {name} instead"
    if problem.endswith('missing'):
        return {}, ''
    return {}, f"{problem}, and neither its copy nor its .bak can be read; read nothing"


def status_directory(section):
    """The status directory of a destination section of the daemon's
    configuration: ``status`` beside its staging directory."""
    return os.path.join(os.path.dirname(section.staging), 'status')


def status_rows(records, night):
    """``{EXPID (8 digits): {stage code: (ok, ms)}}`` of `night` in the records
    of its year, the newest row of each stage."""
    found = {}
    exposures = records.get(night)
    for key, rows in exposures.items() if isinstance(exposures, dict) else ():
        if not (isinstance(key, str) and key.isdigit() and isinstance(rows, list)):
            continue
        stages = found.setdefault(f'{int(key):08d}', {})
        for row in rows:
            if (isinstance(row, list) and len(row) >= 3 and isinstance(row[2], (int, float))
                    and (row[0] not in stages or row[2] > stages[row[0]][1])):
                stages[row[0]] = (bool(row[1]), row[2])
    return found


def latencies(status, night):
    """Seconds from link to verified of each exposure of `night` that has both.

    Parameters
    ----------
    status : :class:`~desitransfer.status.TransferStatus` or :class:`dict`
        The status store, or the records of the night's year
        (``{NIGHT: {EXPID: rows}}``).
    night : :class:`str`
        The night, YYYYMMDD.

    Returns
    -------
    :class:`list`
        The latency in seconds (:class:`float`) of every exposure of `night`
        with a ``linked`` row and a successful ``checksum`` row, in the order
        of the exposure numbers; empty if there is none (an unknown night, or
        records older than the ``linked`` stage).
    """
    if isinstance(status, dict):
        exposures = status.get(night, {})
    else:
        try:
            exposures = status.records(night)
        except KeyError:
            exposures = {}
    found = []
    for expid in sorted(exposures, key=lambda e: int(e) if e.isdigit() else -1):
        seconds = latency(exposures[expid])
        if seconds is not None:
            found.append(seconds)
    return found


def latency(rows):
    """Seconds from link to verified of one exposure, from its status `rows`;
    ``None`` without a ``linked`` row and a successful ``checksum`` row."""
    linked, verified = TransferStatus.stages['linked'], TransferStatus.stages['checksum']
    times = {}
    for row in rows if isinstance(rows, list) else []:
        if (isinstance(row, list) and len(row) >= 3 and row[1] in (1, True) and
                isinstance(row[2], (int, float)) and row[0] in (linked, verified)):
            times[row[0]] = row[2]
    if len(times) < 2:
        return None
    return (times[verified] - times[linked]) / 1000


def percentile(values, q):
    """The `q`-th percentile (0 to 100) of `values`, interpolated linearly
    between the closest ranks; ``None`` if `values` is empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(values):
    """``{'count': N, 'p50': s, 'p95': s, 'max': s}`` of latencies in seconds
    (``None`` for each when there are none)."""
    return {'count': len(values), 'p50': percentile(values, 50),
            'p95': percentile(values, 95), 'max': max(values) if values else None}
