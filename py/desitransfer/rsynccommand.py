# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=========================
desitransfer.rsynccommand
=========================

The rsync command lines of the copies between the mountain and NERSC, built
in one place (:func:`rsync_command`), and the names of rsync's exit codes
that the package acts on.  :func:`desitransfer.common.rsync` (the documented
command of the original), the daemon's copies
(:meth:`desitransfer.mountain.Mountain.rsync`), :command:`desi_daily_transfer`
and :command:`desi_nightwatch_transfer` all build theirs here.  The mirrors
(:command:`desi_tucson_transfer`, :command:`desi_utah_transfer`) keep the
layout of the original's mirror commands, which operators run again by hand.

This module imports nothing of the package, so that every module may use it.
"""
import shlex

#: The rsync program, at NERSC and at the mountain.
RSYNC = '/bin/rsync'

#: rsync's exit code when every file was copied.
RSYNC_OK = 0

#: rsync's exit code when some source files vanished before they could be
#: copied (for example a temporary file): what was there was copied.
RSYNC_VANISHED = 24

#: rsync's exit codes meaning that everything it found was copied.
RSYNC_DONE = (RSYNC_OK, RSYNC_VANISHED)

#: Seconds after which an rsync that receives nothing gives up (``--timeout``;
#: exit status 30).
RSYNC_IO_TIMEOUT = 600


def rsync_command(options, sources, destination=None, ssh=None, io_timeout=None,
                  dry_run=False, program=RSYNC):
    """An rsync command line, as an argument list.

    Parameters
    ----------
    options : :class:`list`
        rsync's options, in order.
    sources : :class:`list`
        What is copied (or listed, without `destination`).
    destination : :class:`str`, optional
        Where it is copied to; none for a listing (``--list-only``).
    ssh : :class:`list`, optional
        The ssh command rsync connects with (``--rsh``), such as returned by
        :func:`desitransfer.transport.ssh_command`.
    io_timeout : :class:`int`, optional
        rsync gives up (exit status 30) when nothing is received for this
        many seconds (``--timeout``).
    dry_run : :class:`bool`, optional
        Only say what would be copied (``--dry-run``).
    program : :class:`str`, optional
        The rsync program.

    Returns
    -------
    :class:`list`
        `program`, ``--rsh``, ``--timeout``, ``--dry-run`` (those asked
        for), then `options`, `sources` and `destination`.
    """
    command = [program]
    if ssh is not None:
        command.append('--rsh=' + shlex.join(ssh))
    if io_timeout is not None:
        command.append(f'--timeout={io_timeout:d}')
    if dry_run:
        command.append('--dry-run')
    return command + list(options) + list(sources) + ([] if destination is None
                                                      else [destination])
