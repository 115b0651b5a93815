# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===================
desitransfer.status
===================

Entry point for :command:`desi_transfer_status`.

Record or show the transfer status of DESI raw exposures.

This command is not available in this release: it answers ``--help`` and
``--version`` and refuses to run, so that nothing pretends to work.
"""
import os
import sys
from argparse import ArgumentParser

from . import __version__ as dtVersion


def _options(args=None):
    """Parse command-line options for :command:`desi_transfer_status`.

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
                          description="Record or show the transfer status of DESI raw exposures. "
                                      "Not available in this release of desitransfer.")
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    return prsr.parse_args(args)


def main():
    """Entry point for :command:`desi_transfer_status`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`.
    """
    _options()
    print("desi_transfer_status: not available in this release of desitransfer; nothing was done.",
          file=sys.stderr)
    return 2
