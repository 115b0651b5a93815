# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===================
desitransfer.status
===================

Entry point for :command:`desi_transfer_status`.

Record or show the transfer status of DESI raw exposures in the status store
(:mod:`desitransfer.store`, whose :class:`TransferStatus` is also here, as in
the original package), install the status page, and run the operator tools:
the audit (:mod:`desitransfer.audit`), the rebuild of lost records
(:mod:`desitransfer.rebuild`) and the statistics
(:mod:`desitransfer.statistics`).
"""
import datetime as dt
import json
import logging
import os
import re
import shlex
import sys
from argparse import Action, ArgumentParser

from . import __version__ as dtVersion
from . import common
from .audit import Auditor, format_table
from .alerts import configure_log
from .common import log, valid_night
from .configuration import ConfigurationError, read_configuration
from .dates import dates
from .rebuild import rebuild, summary
from .statistics import format_statistics, parse_period, statistics
from .store import (DATA_URL, TransferStatus, data_url, install_page, plural, read_status,
                    status_directory)

__all__ = ['TransferStatus', 'main', 'read_status', 'install_page', 'status_directory']


#: Stages recorded by hand.  ``linked`` is when the link appeared at the
#: mountain, which only the daemon knows.
BY_HAND = ('rsync', 'checksum', 'backup')

#: The columns of :func:`_show`: ``linked`` came last, after the others.
SHOWN = ('rsync', 'checksum', 'backup', 'linked')

#: The operator tools, options of :command:`desi_transfer_status`.
TOOLS = ('audit', 'rebuild', 'statistics')


class _Directory(Action):
    """Store ``-d DIR`` and remember that it was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.directory_given = True


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
    root = os.environ.get('DESI_ROOT')
    default = os.path.join(root, 'spectro', 'staging', 'status') if root else None
    where = ("%(default)s, that is $DESI_ROOT/spectro/staging/status" if root else
             "$DESI_ROOT/spectro/staging/status, but DESI_ROOT is not set")
    prsr = ArgumentParser(prog=os.path.basename(sys.argv[0]),
                          description="Record the transfer status of DESI raw exposures "
                                      "(NIGHT EXPID STAGE), or show it (NIGHT [EXPID]); "
                                      "or audit, rebuild or count it (--audit, --rebuild, "
                                      "--statistics).")
    prsr.add_argument('-d', '--directory', metavar='DIR', default=default, action=_Directory,
                      help=f"Status directory (default {where}; with --audit, --rebuild or "
                           "--statistics, the status directory of the configuration).")
    prsr.add_argument('-f', '--failure', action='store_true',
                      help="Record a failure instead of a success.")
    prsr.add_argument('-i', '--install', action='store_true',
                      help="(Re-)install the status web page in the status directory, "
                           "creating the directory if needed.")
    prsr.add_argument('--data-url', metavar='URL', dest='data_url',
                      help="With -i: link each exposure of the status page to "
                           "URL/NIGHT/EXPID/ (default: the URL of the page installed "
                           f"there, else {DATA_URL}).")
    prsr.add_argument('--create', action='store_true',
                      help="Create the status directory (and its parents) if it does not "
                           "exist; without it (or -i), recording into a missing directory "
                           "is refused, so that a typo in -d is not a new status tree.")
    prsr.add_argument('-v', '--verbose', action='store_true', help="Print extra information.")
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    prsr.add_argument('night', metavar='NIGHT', nargs='?',
                      help="Night of observation (YYYYMMDD).")
    prsr.add_argument('expid', metavar='EXPID', nargs='?',
                      help="Exposure number, or 'all' for every exposure of the night.")
    prsr.add_argument('stage', metavar='STAGE', nargs='?', choices=BY_HAND,
                      help="Stage to record: %(choices)s.  Without STAGE, show the status "
                           "of NIGHT (or of EXPID) and change nothing.")
    tools = prsr.add_argument_group(
        'operator tools', "Each reads the configuration of desi_transfer_daemon (-c) for the "
        "mountain, the destination, the tape and the status directory, and changes nothing "
        "but what --rebuild writes.")
    one = tools.add_mutually_exclusive_group()
    one.add_argument('--audit', metavar='NIGHT|YEAR',
                     help="Compare, for every exposure of NIGHT or of every night of YEAR, "
                          "the links at the mountain, the files at NERSC, the status records "
                          "and the tape archive; print each disagreement with what to do; "
                          "exit status 1 if there is any.")
    one.add_argument('--rebuild', metavar='YEAR',
                     help="Rebuild the status file of YEAR from the exposures at NERSC, the "
                          "tape archive and the links at the mountain, into "
                          "desi_transfer_status_YEAR.json.rebuilt beside it, and say how it "
                          "differs from the current one.")
    one.add_argument('--statistics', metavar='YEAR|FYnnnn',
                     help="Nights, exposures, files, bytes and transfer latency per month of "
                          "YEAR, or of a DOE fiscal year (FY2026: 2025-10-01 to 2026-09-30).")
    tools.add_argument('-c', '--configuration', metavar='FILE',
                       help="The configuration of desi_transfer_daemon (default: the shipped "
                            "desi_transfer_daemon.ini).")
    tools.add_argument('--deep', action='store_true',
                       help="With --audit or --rebuild: verify every checksum (read every "
                            "file) instead of comparing names, sizes and times.")
    tools.add_argument('--replace', action='store_true',
                       help="With --rebuild: replace the status file by the rebuilt one, "
                            "under the lock of the store, keeping the old one.")
    tools.add_argument('--json', action='store_true',
                       help="With --statistics: print JSON.")
    options = prsr.parse_args(args)
    if not hasattr(options, 'directory_given'):
        options.directory_given = False
    options.tool = next((t for t in TOOLS if getattr(options, t) is not None), None)
    if options.tool is None:
        _check_record(prsr, options)
    else:
        _check_tool(prsr, options)
    return options


def _check_record(prsr, options):
    """Check the options of recording or showing a status."""
    for given, name in ((options.configuration is not None, '-c/--configuration'),
                        (options.deep, '--deep'), (options.replace, '--replace'),
                        (options.json, '--json')):
        if given:
            prsr.error(f"{name} goes with --audit, --rebuild or --statistics only.")
    if options.data_url is not None:
        if not options.install:
            prsr.error("--data-url goes with -i/--install: it is written into the page.")
        try:
            options.data_url = data_url(options.data_url)
        except ValueError as err:
            prsr.error(f"argument --data-url: {err}")
    if options.night is None:
        prsr.error("NIGHT is required (or one of --audit, --rebuild, --statistics).")
    if not valid_night(options.night):
        prsr.error(f"NIGHT must be a real date in YYYYMMDD format, not '{options.night}'.")
    if options.expid not in (None, 'all') and re.fullmatch(r'[0-9]+', options.expid) is None:
        prsr.error(f"EXPID must be a non-negative integer or 'all', not '{options.expid}'.")
    if options.directory is None:
        prsr.error("DESI_ROOT is not set: give the status directory with -d DIR.")
    if options.stage is None and options.failure:
        prsr.error("-f/--failure needs NIGHT EXPID STAGE: nothing to record.")
    if not os.path.isdir(options.directory):
        what = "is not a directory" if os.path.lexists(options.directory) else "does not exist"
        if options.stage is None:
            prsr.error(f"status directory {options.directory} {what}: nothing to show.")
        if what != "does not exist" or not (options.create or options.install):
            prsr.error(f"status directory {options.directory} {what}; nothing was recorded "
                       "(check -d, or give --create to start a new status directory).")


def _check_tool(prsr, options):
    """Check the options of --audit, --rebuild and --statistics; read the configuration."""
    tool = f'--{options.tool}'
    if options.night is not None:
        given = ' '.join(a for a in (options.night, options.expid, options.stage) if a)
        prsr.error(f"{tool} takes no NIGHT EXPID STAGE arguments (found '{given}').")
    for given, name, tools in ((options.failure, '-f/--failure', ()),
                               (options.install, '-i/--install', ()),
                               (options.data_url is not None, '--data-url', ()),
                               (options.create, '--create', ()),
                               (options.deep, '--deep', ('audit', 'rebuild')),
                               (options.replace, '--replace', ('rebuild',)),
                               (options.json, '--json', ('statistics',))):
        if given and options.tool not in tools:
            prsr.error(f"{name} does not go with {tool}.")
    value = getattr(options, options.tool)
    options.nights = options.period = None
    if options.tool == 'audit' and valid_night(value):
        options.nights = [value]
    elif options.tool in ('audit', 'rebuild') and _year(value):
        today = common._utcnow().strftime('%Y%m%d')
        options.nights = [n for n in dates(f'{value}0101', f'{value}1231') if n <= today]
        if not options.nights:
            prsr.error(f"{tool} {value}: no night of {value} has begun yet.")
    elif options.tool == 'statistics':
        try:
            options.period = parse_period(value)
        except ValueError:
            pass
    if options.nights is None and options.period is None:
        want = {'audit': 'a night (YYYYMMDD, a real date) or a year (YYYY)',
                'rebuild': 'a year (YYYY)',
                'statistics': 'a year (YYYY) or a DOE fiscal year (FYYYYY, such as FY2026)'}
        prsr.error(f"{tool} takes {want[options.tool]}, not '{value}'.")
    try:
        options.sections, options.common, _ = read_configuration(options.configuration)
    except ConfigurationError as err:
        prsr.error(str(err))
    directories = ([options.directory] if options.directory_given else
                   sorted({status_directory(d) for d in options.sections}))
    for directory in directories:
        if not os.path.isdir(directory):
            what = "is not a directory" if os.path.lexists(directory) else "does not exist"
            prsr.error(f"status directory {directory} {what}; nothing to "
                       f"{options.tool} (check -d or the staging directory of the "
                       "configuration).")
    if not options.directory_given:
        options.directory = None


def _year(value):
    """``True`` if `value` is a year, YYYY, from 1970."""
    return re.fullmatch(r'[0-9]{4}', value) is not None and int(value) >= 1970


def _show(status, night, exposure=None):
    """Print the status of `night` (or of one exposure) as a table; 1 if unknown.
    """
    where = status._path(int(night[:4]))
    one = exposure not in (None, 'all')
    try:
        records = status.records(night, exposure if one else None)
    except KeyError:
        return _error(f"night {night} is not in {where}.")
    if one:
        if not records:
            return _error(f"exposure {exposure} of night {night} is not recorded in {where}.")
        records = {str(int(exposure)): records}
    stage_of = {code: name for name, code in status.stages.items()}
    print(f"{'EXPID':8}  " + ''.join(f"{s:32}" for s in SHOWN).rstrip())
    for e in sorted(records, key=int):
        cells = dict.fromkeys(SHOWN, '-')
        for code, ok, ms in reversed(records[e]):
            if code in stage_of:
                t = dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)
                cells[stage_of[code]] = f"{'ok' if ok else 'FAILED':6} {t:%Y-%m-%d %H:%M:%S} UTC"
        print(f"{int(e):08d}  " + ''.join(f"{cells[s]:32}" for s in SHOWN).rstrip())
    return 0


def _error(message):
    """Print one error line for :command:`desi_transfer_status`; return 1."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    return 1


def _record(status, options):
    """Record the stage given on the command line; the exit status.
    """
    n = status.update(options.night, options.expid, options.stage, failure=options.failure)
    if options.expid == 'all' and options.night not in status.status:
        return 1  # Nothing to back up: update() has said so.
    log.info("Recorded %s %s of %s/%s in %s (%s changed).", options.stage,
             'failure' if options.failure else 'success', options.night, options.expid,
             status._path(int(options.night[:4])), plural(n, 'record'))
    return 0


def _audit(options):
    """:command:`desi_transfer_status --audit`; the exit status."""
    auditor = Auditor((options.sections, options.common), deep=options.deep,
                      directory=options.directory)
    found = auditor.run(options.nights)
    print('\n'.join(auditor.summary))
    print(format_table(found) if found else
          "No disagreement: the mountain, NERSC, the status and the tape agree.")
    return 1 if found else 0


def _rebuild(options):
    """:command:`desi_transfer_status --rebuild`; the exit status."""
    code = 0
    for rebuilt in rebuild((options.sections, options.common), options.rebuild,
                           deep=options.deep, directory=options.directory):
        current, problem = read_status(rebuilt.directory, rebuilt.year)
        rebuilt.write()
        print('\n'.join(summary(rebuilt, current, problem)))
        if not options.replace:
            again = ['desi_transfer_status'] + (['-c', options.configuration]
                                                if options.configuration else [])
            again += (['-d', options.directory] if options.directory else [])
            again += ['--rebuild', options.rebuild] + (['--deep'] if options.deep else [])
            print(f"To replace {rebuilt.path} by it (keeping the old file): "
                  f"{shlex.join(again + ['--replace'])}")
        elif rebuilt.unknown:
            code = _error(f"{rebuilt.path} was not replaced: a place could not be read "
                          "(see above); rebuild again when it can be.")
        else:
            kept = rebuilt.replace()
            print(f"Replaced {rebuilt.path} by the rebuilt records" +
                  (f"; the old file is kept as {kept}." if kept else "."))
    return code


def _statistics(options):
    """:command:`desi_transfer_status --statistics`; the exit status."""
    found = statistics((options.sections, options.common), options.period,
                       directory=options.directory)
    print(json.dumps(found, indent=1) if options.json else format_statistics(found))
    return 0


def main():
    """Entry point for :command:`desi_transfer_status`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`.
    """
    options = _options()
    if options.verbose:
        configure_log(debug=True)
    elif options.tool and log.level == logging.INFO:
        log.setLevel(logging.WARNING)  # The tools print tables, not every command they run.
    try:
        if options.tool:
            return {'audit': _audit, 'rebuild': _rebuild, 'statistics': _statistics}[
                options.tool](options)
        if options.install:
            # The page first, with its data URL; the store then finds it installed.
            install_page(options.directory, options.data_url)
        status = TransferStatus(options.directory, year=options.night[:4])
        if options.stage is None:
            return _show(status, options.night, options.expid)
        return _record(status, options)
    except OSError as err:
        return _error(f"{err}; nothing was {'recorded' if not options.tool else 'changed'}.")
