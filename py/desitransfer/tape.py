# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=================
desitransfer.tape
=================

HPSS, the tape archive, as :command:`desi_transfer_daemon` uses it: the
NERSC status API, the listing of an archive directory (:command:`hsi`), the
archive of a night (:command:`htar`) and the list of what it holds.

Every answer is a fact or *unknown*: an HPSS status that cannot be read, an
:command:`hsi` that fails or answers something that is not a listing, means
"wait", never "not on tape", so an archive is never written again because a
listing was unreadable.
"""
import os
import re
import tempfile
import time

from .common import EXPID, log
from .processes import Background
from .text import tail

#: Seconds before htar, hsi or the status request is given up.
HTAR_TIMEOUT = 12 * 3600
HSI_TIMEOUT = 600
HPSS_STATUS_TIMEOUT = 30

#: One line of ``hsi ls -l``: mode, links, owner, group, size, date, name.
_ls_line = re.compile(r'[-dlcbps][-rwxsStT]{9}[+.@]?\s+[0-9]+\s+\S+\s+\S+\s+(?P<size>[0-9]+)\s+'
                      r'(?P<date>[A-Z][a-z]{2}\s+[0-9]{1,2})\s+'
                      r'(?:(?P<hm>[0-9]{1,2}:[0-9]{2})|(?P<year>[0-9]{4}))\s+(?P<name>.+)')

#: One member in ``htar -tvf``: mode, owner, size, date, time, name.
_member = re.compile(r'HTAR: (?P<mode>[-dlcbps][-rwxsStT]{9})\s+\S+\s+(?P<size>[0-9]+)\s+'
                     r'[0-9]{4}-[0-9]{2}-[0-9]{2}\s+[0-9]{2}:[0-9]{2}\s+(?P<name>.+)')

#: hsi's words for a path that does not exist.
ABSENT = ('HPSS_ENOENT', 'No such file or directory')


def archive_name(hpss, night):
    """The archive of `night` in HPSS directory `hpss`: ``hpss`` with ``/`` as
    ``_``, then ``_NIGHT.tar``."""
    return f"{hpss.replace('/', '_')}_{night}.tar"


class Archive(object):
    """HPSS for one daemon.

    Parameters
    ----------
    bin : :class:`str`
        Directory holding :command:`hsi` and :command:`htar`; empty: ``PATH``.
    status_url : :class:`str`
        The NERSC status API for the archive.
    scratch : :class:`str`
        Directory for temporary files (the listing written by ``hsi -O``).
    actions : :class:`desitransfer.executor.Actions`
        Runs the commands (htar only logged in test mode).
    """

    def __init__(self, bin, status_url, scratch, actions):
        self.bin = bin
        self.status_url = status_url
        self.scratch = scratch
        self.actions = actions
        self.new_pass()

    def new_pass(self):
        """Forget what was learned: HPSS is asked again in the next pass."""
        self._available = None
        self._listings = {}

    def program(self, name):
        return os.path.join(self.bin, name) if self.bin else name

    def available(self):
        """``True`` if the status API says the archive is ``active`` (asked
        once per pass); anything else, an error or no answer, means "not now".
        """
        if self._available is None:
            self._available = self._ask_status()
        return self._available

    def _get(self, url):
        """GET `url` in a thread, so that a stop does not wait for the timeout."""
        import requests  # Only needed after noon: keep start-up quick.
        answer = {}

        def get():
            try:
                answer['response'] = requests.get(url, timeout=HPSS_STATUS_TIMEOUT)
            except BaseException as err:
                answer['error'] = err

        Background(get, 'hpss-status').wait(HPSS_STATUS_TIMEOUT + 5, self.actions.stop)
        if 'error' in answer:
            raise answer['error']
        if 'response' not in answer:
            raise requests.Timeout('stopped')
        return answer['response']

    def _ask_status(self):
        import requests
        url = self.status_url
        try:
            response = self._get(url)
            response.raise_for_status()
            answer = response.json()
        except requests.Timeout:
            reason = f'no answer within {HPSS_STATUS_TIMEOUT:d} s'
        except requests.ConnectionError as err:
            reason = f'connection failed: {_short(err)}'
        except requests.HTTPError:
            reason = f'HTTP {response.status_code:d} {response.reason}'
        except (requests.RequestException, ValueError) as err:
            reason = f'{type(err).__name__}: {_short(err)}'
        else:
            state = answer.get('status') if isinstance(answer, dict) else None
            if state == 'active':
                return True
            log.info("HPSS status service at %s says the archive is %r, not 'active'; "
                     "archiving waits.", url, state)
            return False
        log.warning("HPSS status service at %s did not answer (%s); archiving waits.",
                    url, reason)
        return False

    def listing(self, hpss):
        """Names in HPSS directory `hpss`; an empty set if the directory does
        not exist; ``None`` if unknown (hsi failed or answered garbage)."""
        if hpss not in self._listings:
            self._listings[hpss] = self._list(hpss)
        return self._listings[hpss]

    def _hsi_ls(self, hpss, quiet=False):
        """hsi's answer to ``ls -l HPSS``: its result, what it listed, and
        whether it said the directory does not exist."""
        # hsi -O appends: a fresh private directory for each listing.  In test
        # mode (or without scratch) it is in the system temporary directory.
        with tempfile.TemporaryDirectory(
                prefix='desi_transfer_hsi.',
                dir=None if self.actions.test or not self.scratch else self.scratch) as tmp:
            out = os.path.join(tmp, 'listing.txt')
            result = self.actions.ask([self.program('hsi'), '-O', out, 'ls', '-l', hpss],
                                      timeout=HSI_TIMEOUT, ok=(0, 64), quiet=quiet)
            try:
                with open(out, errors='replace') as f:
                    text = f.read()
            except OSError:
                text = ''
        absent = (result.returncode == 64 and any(w in result.stderr for w in ABSENT) and
                  hpss.rstrip('/') in result.stderr)
        return result, text, absent

    def directory(self, hpss):
        """The HPSS directory `hpss`, asked now and quietly (for the
        operator tools): ``({name: (size, ms)}, '')``, ``({}, '')`` if it does
        not exist, or ``(None, why)`` if unknown (hsi failed or answered
        something that is not a listing).  ``ms`` is the modification time
        to the minute (to the day for old files), ``None`` if it cannot be
        read."""
        result, text, absent = self._hsi_ls(hpss, quiet=True)
        if absent:
            return {}, ''
        if result.returncode != 0:
            return None, f"hsi returned {result.returncode:d}: {_said(result)}"
        _, why = parse_listing(text)
        if why:
            return None, f"hsi answered {why}"
        entries = {}
        for line in text.splitlines():
            m = _ls_line.fullmatch(line.rstrip())
            if m:
                entries[m.group('name').split('/')[-1]] = (int(m.group('size')), _listed_ms(m))
        return entries, ''

    def _list(self, hpss):
        result, text, absent = self._hsi_ls(hpss)
        if absent:
            log.info("HPSS directory %s does not exist yet.", hpss)
            return set()
        why = ''
        if result.returncode != 0:
            why = f'hsi returned {result.returncode:d}'
        else:
            names, why = parse_listing(text)
            if not why:
                return names
        log.error("Could not list %s on HPSS (%s); archiving waits for a later pass, "
                  "and nothing is written to tape again.", hpss, why)
        return None

    def on_tape(self, hpss, night):
        """``True`` if the archive of `night` and its index are listed in
        `hpss`, ``False`` if not, ``None`` if unknown."""
        names = self.listing(hpss)
        if names is None:
            return None
        archive = archive_name(hpss, night)
        return archive in names and archive + '.idx' in names

    def create(self, destination, hpss, night):
        """Archive ``DESTINATION/NIGHT`` as ``HPSS/ARCHIVE`` with htar.

        Returns
        -------
        :class:`desitransfer.runner.Result`
            htar's outcome; the listing of `hpss` is asked again afterwards.
        """
        self._listings.pop(hpss, None)
        return self.actions.run([self.program('htar'), '-cvhf',
                                 f'{hpss}/{archive_name(hpss, night)}',
                                 '-H', 'crc:verify=all', night],
                                cwd=destination, timeout=HTAR_TIMEOUT)

    def index(self, hpss, night):
        """The exposures of `night` in the index of its archive in `hpss`
        (``htar -tvf``): ``({EXPID: {file: size}}, '')``, or ``(None, why)``
        if it cannot be read."""
        archive = f'{hpss}/{archive_name(hpss, night)}'
        result = self.actions.ask([self.program('htar'), '-tvf', archive],
                                  timeout=HSI_TIMEOUT, quiet=True)
        if result.returncode != 0 or 'HTAR SUCCESSFUL' not in result.stdout:
            return None, f"htar returned {result.returncode:d}: {_said(result)}"
        found = {}
        for line in result.stdout.splitlines():
            m = _member.fullmatch(line.rstrip())
            parts = m.group('name').rstrip('/').split('/') if m else []
            if len(parts) >= 2 and parts[0] == night and EXPID.fullmatch(parts[1]):
                files = found.setdefault(parts[1], {})
                if len(parts) > 2 and m.group('mode')[0] == '-':
                    files['/'.join(parts[2:])] = int(m.group('size'))
        return found, ''

    def exposures(self, hpss, night):
        """Exposures (``NIGHT/EXPID``) held by the archive of `night`, from its
        index (:meth:`index`), or ``None`` if it cannot be read."""
        found, why = self.index(hpss, night)
        if found is None:
            log.error("Could not list the contents of %s/%s (%s).", hpss,
                      archive_name(hpss, night), why)
            return None
        return {f'{night}/{expid}' for expid in found}


def parse_listing(text):
    """Names listed by ``hsi ls -l DIR``, and ``''``; or an empty set and why
    `text` is not such a listing."""
    names = set()
    header = False
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _ls_line.fullmatch(line.rstrip())
        if m:
            names.add(m.group('name').split('/')[-1])
        elif line.startswith('/') and line.rstrip().endswith(':') and not header:
            header = True
        else:
            return set(), f'not a listing: {line.strip()[:100]!r}'
    if not header and not names:
        return set(), 'empty answer'
    return names, ''


def _listed_ms(m):
    """Unix milliseconds of the date of a line of ``hsi ls -l`` (local time,
    as hsi prints it; the year of a recent date is the one that puts it in
    the past)."""
    try:
        if m.group('year'):
            t = time.strptime(f"{m.group('date')} {m.group('year')}", '%b %d %Y')
            return int(time.mktime(t) * 1000)
        now = time.localtime()
        for year in (now.tm_year, now.tm_year - 1):
            t = time.strptime(f"{m.group('date')} {year:d} {m.group('hm')}", '%b %d %Y %H:%M')
            if time.mktime(t) <= time.time() + 86400:
                return int(time.mktime(t) * 1000)
    except (ValueError, OverflowError):
        pass
    return None


def _said(result):
    """The end of what a command said on standard error, on one line."""
    return tail(result.stderr, 200) or 'no message'


def _short(err):
    return ' '.join(str(err).split())[:200]
