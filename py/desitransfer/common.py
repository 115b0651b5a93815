# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===================
desitransfer.common
===================

Code needed by all scripts: the shared logger, the rsync command builder and
the scanners of its output, night and time helpers, and the permission
constants.  The subprocess runner is :mod:`desitransfer.runner`, ssh and
rsync transport :mod:`desitransfer.transport`, writing files
:mod:`desitransfer.files`, the log file and alert emails
:mod:`desitransfer.alerts`, short text for messages :mod:`desitransfer.text`,
and the loop and stop of long-running commands :mod:`desitransfer.processes`.
"""
import datetime as dt
import functools
import os
import re

# pytz's own switch: trust its list of zones instead of opening each of its
# ~600 zone files on the first call of pytz.timezone (20 ms in every command).
os.environ.setdefault('PYTZ_SKIPEXISTSCHECK', '1')
import pytz  # noqa: E402
from desiutil.log import get_logger  # noqa: E402

from .rsynccommand import rsync_command  # noqa: E402


#: Permission of locked directories (group-readable, setgid).
dir_perm = 0o2750

#: Permission of locked files (read-only for user and group).
file_perm = 0o440

#: Mode of the files this package creates, set explicitly whatever the umask:
#: read and write for the owner, read for the others (web pages, records).
FILE_MODE = 0o644

#: The time zone of Kitt Peak, where DESI observes (no daylight saving time).
MST = pytz.timezone('America/Phoenix')

#: The shared logger of every desitransfer module.
log = get_logger(timestamp=True)


def _utcnow():
    """Current time, timezone-aware in UTC (replaced in tests).
    """
    return dt.datetime.now(dt.timezone.utc)


def rsync(s, d, test=False, config='dts', reverse=False):
    """Set up rsync command.

    Parameters
    ----------
    s : :class:`str`
        Source directory.
    d : :class:`str`
        Destination directory.
    test : :class:`bool`, optional
        If ``True``, add ``--dry-run`` to the command.
    config : :class:`str`, optional
        Pass this configuration to the ssh command.  If empty or ``None``,
        both directories are local.
    reverse : :class:`bool`
        If ``True``, attach `config` to `d` instead of `s`.

    Returns
    -------
    :class:`list`
        A list suitable for passing to :class:`subprocess.Popen`.
    """
    host = f'{config}:' if config else ''
    if reverse:
        src, dst = f'{s}/', f'{host}{d}/'
    else:
        src, dst = f'{host}{s}/', f'{d}/'
    return rsync_command(['--verbose', '--recursive', '--copy-dirlinks', '--times',
                          '--omit-dir-times'], [src], dst, dry_run=test)


def exclude_years(start_year):
    """rsync arguments to exclude every year from `start_year` to last year.

    Parameters
    ----------
    start_year : :class:`int`
        First year to exclude.

    Returns
    -------
    :class:`list`
        ``['--exclude', '2018*', '--exclude', '2019*', ...]`` up to, not
        including, the current year.
    """
    args = []
    for year in range(int(start_year), _utcnow().year):
        args += ['--exclude', f'{year:d}*']
    return args


_rsync_summary = re.compile(r'^(?:'
                            r'(?:receiving|sending) incremental file list|'
                            r'receiving file list \.\.\. done|'
                            r'(?:building|sending) file list \.\.\. done|'
                            r'created directory .*|'
                            r'\./|'
                            r'sent [0-9.,]+[KMGTP]? bytes\s+received [0-9.,]+[KMGTP]? bytes.*|'
                            r'total size is [0-9.,]+[KMGTP]?\s+speedup is [0-9.,]+.*'
                            r')$')


def empty_rsync(out):
    """Scan rsync output for files to be transferred.

    Parameters
    ----------
    out : :class:`str`
        Output from rsync.

    Returns
    -------
    :class:`bool`
        ``True`` if there are no files to transfer.
    """
    return all(_rsync_summary.match(line) is not None
               for line in out.splitlines() if line.strip())


_exposure_line = re.compile(r'^([0-9]{8})/')


def new_exposures(out):
    """Scan rsync output for exposures to be transferred.

    Parameters
    ----------
    out : :class:`str`
        Output from rsync.

    Returns
    -------
    :class:`set`
        The unique exposure numbers detected in `out`.
    """
    exposures = set()
    for line in out.splitlines():
        m = _exposure_line.match(line)
        if m is not None:
            exposures.add(m.group(1))
    return exposures


def stamp(zone='US/Pacific'):
    """Simple timestamp.

    Parameters
    ----------
    zone : :class:`str`, optional
        Operational timezone.

    Returns
    -------
    :class:`str`
        A nicely-formatted timestamp.
    """
    return _utcnow().astimezone(pytz.timezone(zone)).strftime('%Y-%m-%d %H:%M:%S %Z')


def ensure_scratch(directories):
    """Try an alternate temporary directory if the primary temporary directory is unavilable.

    Parameters
    ----------
    directories : :class:`list`
        A list of candidate directories.

    Returns
    -------
    :class:`str`
        The first available temporary directory found.

    Raises
    ------
    FileNotFoundError
        If no candidate is a writable directory; the message lists them all.
    """
    for d in directories:
        if d and os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
            return d
        log.warning("Temporary directory %s is not available, trying the next one.", d)
    raise FileNotFoundError("No temporary directory is available; tried: " +
                            ', '.join(map(str, directories)))


def _night(offset):
    """Night in YYYYMMDD format, `offset` days after the night in progress.
    """
    # The DESI night rolls over at 12:00 MST = 19:00 UTC: 7/24 + 0.5 days.
    t = _utcnow() - dt.timedelta(days=7/24 + 0.5 - offset)
    return t.strftime('%Y%m%d')


def today():
    """Today's date in DESI "NIGHT" format, YYYYMMDD.

    This formulation, with the offset 7/24+0.5, is inherited from previous
    nightwatch transfer scripts.
    """
    return _night(0)


def yesterday():
    """Yesterday's date in DESI "NIGHT" format, YYYYMMDD.

    The calendar date before today at Kitt Peak (MST), as the original's
    calendar yesterday: in the morning it is the night just observed, which
    :func:`today` still names until noon MST.
    """
    return (_utcnow().astimezone(MST) - dt.timedelta(days=1)).strftime('%Y%m%d')


#: An exposure number as a directory name: eight digits.
EXPID = re.compile(r'[0-9]{8}')


def valid_night(night):
    """``True`` if `night` is an 8-digit, real calendar date (YYYYMMDD).
    """
    if not isinstance(night, str) or re.fullmatch(r'[0-9]{8}', night) is None:
        return False
    return _real_date(night)


@functools.lru_cache(maxsize=8192)
def _real_date(digits):
    try:
        dt.datetime.strptime(digits, '%Y%m%d')
    except ValueError:
        return False
    return True


def idle_time(start=8, end=12, tz=None):
    """Determine whether we are in an idle time during the day.

    Parameters
    ----------
    start : :class:`int`, optional
        Start time in hours.
    end : :class:`int`, optional
        End time in hours.
    tz : :class:`str`, optional
        Time zone to use, by default MST (America/Phoenix).

    Returns
    -------
    :class:`int`
        Number of seconds to wait until the end of the idle period. If outside
        the idle period, this number will be negative: minus the number of
        seconds until the next idle period starts.
    """
    zone = MST if tz is None else pytz.timezone(tz) if isinstance(tz, str) else tz
    now = _utcnow().astimezone(zone)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)

    def at(hour, days=0):
        return zone.localize(midnight + dt.timedelta(days=days, hours=hour))

    if at(start) <= now < at(end):
        return int((at(end) - now).total_seconds())
    following = at(start) if now < at(start) else at(start, days=1)
    return -int((following - now).total_seconds())
