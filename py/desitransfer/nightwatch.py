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
from .common import unavailable, unavailable_options


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
    return unavailable_options("Sync the nightwatch QA output from KPNO to NERSC all night "
                               "(run under nohup).", args)


def main():
    """Entry point for :command:`desi_nightwatch_transfer`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`.
    """
    _options()
    return unavailable('desi_nightwatch_transfer')
