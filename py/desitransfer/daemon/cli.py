# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
========================
desitransfer.daemon.cli
========================

Command line of :command:`desi_transfer_daemon`.
"""
import os
import sys
from argparse import ArgumentParser

from .. import __version__ as dtVersion
from ..common import log
from ..configuration import ConfigurationError
from .core import TransferDaemon


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
    desc = "Transfer DESI raw data files."
    prsr = ArgumentParser(prog=os.path.basename(sys.argv[0]), description=desc)
    prsr.add_argument('-B', '--no-backup', action='store_false', dest='backup',
                      help="Skip NERSC HPSS backups (nights are still caught up and "
                           "write-protected when due).")
    prsr.add_argument('-c', '--configuration', metavar='FILE',
                      help="Read configuration from FILE (default: the shipped "
                           "desi_transfer_daemon.ini).")
    prsr.add_argument('-d', '--debug', action='store_true',
                      help="Set log level to DEBUG.")
    prsr.add_argument('-k', '--kill', metavar='FILE',
                      default=os.path.expanduser('~/stop_desi_transfer'),
                      help="Exit the script when FILE is detected (default %(default)s).")
    prsr.add_argument('--once', action='store_true',
                      help="Make one full pass, then exit: 0 if it did its job, 1 if not "
                           "(for cron and tests).")
    prsr.add_argument('-t', '--test', action='store_true',
                      help="Test mode: log exactly what would run and change nothing. "
                           "Without --once it loops like the daemon until stopped.")
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
    options = _options()
    try:
        daemon = TransferDaemon(options)
    except ConfigurationError as err:
        log.critical("desi_transfer_daemon cannot start: %s", err)
        return 1
    daemon.stop.handle_signals()
    return daemon.run()
