# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===================
desitransfer.daemon
===================

Entry point for :command:`desi_transfer_daemon`.

Raw exposures linked at KPNO as ``SOURCE/NIGHT/EXPID`` are copied into a
staging area, locked, verified against their sha256 checksum file and moved
into the destination; the outcome of each stage is recorded in the status
store.  In the morning whole nights are compared again to pick up late
files, and after noon each finished night is archived to HPSS with
:command:`htar`.

The flow lives in small modules: :mod:`~desitransfer.mountain` (the
mountain), :mod:`~desitransfer.daemon.transfer` (copy-verify and its
outcomes), :mod:`~desitransfer.tape` (HPSS),
:mod:`~desitransfer.daemon.state` (the state file),
:mod:`~desitransfer.executor` (every change, and test mode),
:mod:`~desitransfer.daemon.core` (the loop and one pass) and
:mod:`~desitransfer.daemon.cli` (the command line).
"""
import os
import shlex

from ..checksum import verify_checksum
from ..common import log
from ..processes import Stop
from ..runner import Result, run
from ..text import one_line, shown
from ..rsynccommand import RSYNC_DONE
from ..executor import lock_directory, unlock_directory
from .cli import _options, main
from .core import TransferDaemon
from ..mountain import RSYNC_TIMEOUT, Mountain, by_directory, only

__all__ = ['TransferDaemon', '_options', '_popen', 'lock_directory', 'main', 'rsync_night',
           'unlock_directory', 'verify_checksum']


def _popen(command):
    """Simple wrapper for :class:`subprocess.Popen` to avoid repeated code.

    A thin wrapper of :func:`desitransfer.runner.run`, the one subprocess
    runner, kept for scripts written against it.

    Parameters
    ----------
    command : :class:`list`
        Command to pass to :class:`subprocess.Popen`.

    Returns
    -------
    :func:`tuple`
        The returncode (as a :class:`str`), standard output and standard error.
    """
    result = run(command)
    return (str(result.returncode), result.stdout, result.stderr)


def rsync_night(source, destination, night, test=False):
    """Run an rsync command on an entire night, for example, to pick up delayed files.

    For use by hand: the night is unlocked, synced from the mountain (host
    ``dts``, through the ssh program of :envvar:`RSYNC_RSH`) and locked again.
    The night's links are resolved at the mountain first, as the daemon's
    survey does: only an exposure link whose target passes its checks is
    copied, from that physical directory, by an rsync that follows no link; a
    link to anywhere else is reported and never read (the original followed
    every link, ``--copy-dirlinks``).  The daemon's own catch-up does not use
    it: it copies each changed exposure through its one copy-verify step.

    Parameters
    ----------
    source : :class:`str`
        Source directory.
    destination : :class:`str`
        Destination directory.
    night : :class:`str`
        Night directory.
    test : :class:`bool`, optional
        If ``True``, only print the commands.

    Returns
    -------
    :class:`desitransfer.runner.Result`
        The outcome of rsync (the first that failed), or status 1 if the
        mountain could not be surveyed.
    """
    night_dir = os.path.join(destination, night)
    ssh = shlex.split(os.environ.get('RSYNC_RSH', '').strip()) or 'ssh'
    mountain = Mountain('dts', ssh, Stop())
    try:
        survey = mountain.survey(source, '', [night])
        if survey.answer != 'links' or night in survey.unknown_nights:
            why = survey.unknown_nights.get(night) or survey.result.stderr.strip()[-200:]
            log.error("Could not list night %s in %s at dts (%s); nothing is copied.",
                      night, source, one_line(why or survey.answer))
            return Result(1, '', 'the mountain could not be surveyed')
        for name, why in sorted(survey.refused.items()):
            log.warning("%s at dts is not copied: %s.", shown(name), one_line(str(why)))
        unlock_directory(night_dir, test)
        result = Result(0, '', '')
        for parent, links in by_directory(survey.links.values()):
            extra = only(sorted(link.expid for link in links))
            r = run(mountain.rsync(parent, night_dir, extra=extra), timeout=RSYNC_TIMEOUT,
                    test=test, ok=RSYNC_DONE)
            if result.returncode in RSYNC_DONE:
                result = r
        lock_directory(night_dir, test)
        return result
    finally:
        mountain.close()
