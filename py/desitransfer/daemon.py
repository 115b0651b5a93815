# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===================
desitransfer.daemon
===================

Entry point for :command:`desi_transfer_daemon`.

Transfer raw exposures from KPNO to NERSC, verify their checksums and archive each night to HPSS.

This command is not available in this release: it answers ``--help`` and
``--version`` and refuses to run, so that nothing pretends to work.
"""
import os
import sys
from argparse import ArgumentParser

from . import __version__ as dtVersion
from .common import run


def _options(args=None):
    """Parse command-line options for :command:`desi_transfer_daemon`.

    Parameters
    ----------
    args : :class:`list`, optional
        Command-line arguments; ``sys.argv[1:]`` if not set.

    Returns
    -------
    :class:`argparse.Namespace`
        The parsed command-line options.
    """
    prsr = ArgumentParser(prog=os.path.basename(sys.argv[0]),
                          description="Transfer raw exposures from KPNO to NERSC, verify their checksums and archive each night to HPSS. "
                                      "Not available in this release of desitransfer.")
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    return prsr.parse_args(args)


def main():
    """Entry point for :command:`desi_transfer_daemon`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`.
    """
    _options()
    print("desi_transfer_daemon: not available in this release of desitransfer; nothing was done.",
          file=sys.stderr)
    return 2


def _popen(command):
    """Simple wrapper for :class:`subprocess.Popen` to avoid repeated code.

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
