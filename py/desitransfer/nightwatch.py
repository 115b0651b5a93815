# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=======================
desitransfer.nightwatch
=======================

Entry point for :command:`desi_nightwatch_transfer`.

Sync the nightwatch QA output from KPNO to NERSC all night (run under nohup).

This command is not available in this release: it answers ``--help`` and
``--version`` and refuses to run, so that nothing pretends to work.
"""
import os
import sys
from argparse import ArgumentParser

from . import __version__ as dtVersion


def _options(args=None):
    """Parse command-line options for :command:`desi_nightwatch_transfer`.

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
                          description="Sync the nightwatch QA output from KPNO to NERSC all night (run under nohup). "
                                      "Not available in this release of desitransfer.")
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    return prsr.parse_args(args)


def main():
    """Entry point for :command:`desi_nightwatch_transfer`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`.
    """
    _options()
    print("desi_nightwatch_transfer: not available in this release of desitransfer; nothing was done.",
          file=sys.stderr)
    return 2
