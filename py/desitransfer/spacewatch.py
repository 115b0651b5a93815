# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=======================
desitransfer.spacewatch
=======================

Entry point for :command:`desi_spacewatch_transfer`.

Download all-sky Spacewatch camera images from KPNO over HTTP.

This command is not available in this release: it answers ``--help`` and
``--version`` and refuses to run, so that nothing pretends to work.
"""
from .common import unavailable, unavailable_options


def _options(args=None):
    """Parse command-line options for :command:`desi_spacewatch_transfer`.

    Parameters
    ----------
    args : :class:`list`, optional
        Command-line arguments; ``sys.argv[1:]`` if not set.

    Returns
    -------
    :class:`argparse.Namespace`
        The parsed command-line options.
    """
    return unavailable_options("Download all-sky Spacewatch camera images from KPNO over "
                               "HTTP.", args)


def main():
    """Entry point for :command:`desi_spacewatch_transfer`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`.
    """
    _options()
    return unavailable('desi_spacewatch_transfer')
