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

The flow lives in small modules: :mod:`~desitransfer.daemon.remote` (the
mountain), :mod:`~desitransfer.daemon.transfer` (copy-verify and its
outcomes), :mod:`~desitransfer.daemon.archive` (HPSS),
:mod:`~desitransfer.daemon.state` (the state file),
:mod:`~desitransfer.daemon.actions` (every change, and test mode),
:mod:`~desitransfer.daemon.core` (the loop and one pass) and
:mod:`~desitransfer.daemon.cli` (the command line).
"""
import os

from ..checksum import verify_checksum
from ..common import rsync, run
from .actions import lock_directory, unlock_directory
from .cli import _options, main
from .core import TransferDaemon
from .remote import RSYNC_TIMEOUT

__all__ = ['TransferDaemon', '_options', '_popen', 'lock_directory', 'main', 'rsync_night',
           'unlock_directory', 'verify_checksum']


def _popen(command):
    """Simple wrapper for :class:`subprocess.Popen` to avoid repeated code.

    A thin wrapper of :func:`desitransfer.common.run`, the one subprocess
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

    For use by hand: the night is unlocked, synced from ``dts:SOURCE/NIGHT``
    with :func:`desitransfer.common.rsync` and locked again.  The daemon's own
    catch-up does not use it: it copies each changed exposure through its
    one copy-verify step.

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
    :class:`desitransfer.common.Result`
        The outcome of rsync.
    """
    night_dir = os.path.join(destination, night)
    unlock_directory(night_dir, test)
    result = run(rsync(os.path.join(source, night), night_dir), timeout=RSYNC_TIMEOUT,
                 test=test, ok=(0, 24))
    lock_directory(night_dir, test)
    return result
