# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===================
desitransfer.tucson
===================

Entry point for :command:`desi_tucson_transfer`.

Mirror DESI data from NERSC to Tucson with parallel rsync (run by cron at NOIRLab).

This command is not available in this release: it answers ``--help`` and
``--version`` and refuses to run, so that nothing pretends to work.
"""
from .common import unavailable, unavailable_options


def _options(args=None):
    """Parse command-line options for :command:`desi_tucson_transfer`.

    Parameters
    ----------
    args : :class:`list`, optional
        Command-line arguments; ``sys.argv[1:]`` if not set.

    Returns
    -------
    :class:`argparse.Namespace`
        The parsed command-line options.
    """
    return unavailable_options("Mirror DESI data from NERSC to Tucson with parallel rsync "
                               "(run by cron at NOIRLab).", args)


def main():
    """Entry point for :command:`desi_tucson_transfer`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`.
    """
    _options()
    return unavailable('desi_tucson_transfer')
