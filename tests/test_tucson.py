# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of desitransfer.tucson against a real rsync daemon, sshd, HTTP and
SMTP server on 127.0.0.1."""
import contextlib
import datetime as dt
import getpass
import os
import shlex
import socket
import subprocess
import sys
import threading
import time

import pytest

from desitransfer import common, tucson
from desitransfer.alerts import configure_log
from desitransfer.transport import SSH_OPTIONS
from desitransfer.tucson import (Mirror, _environment, _options, _rsync, read_directories,
                                 running)
from fixtures_http import Answer
from mirror_site import NOW, MirrorSite, Recorder, slow_ssh, still_running, tree, write

#: The commands run as subprocesses read the real clock: the years of the
#: files at NERSC follow it (on the calendar of Kitt Peak).
TODAY = dt.datetime.now(common.MST)
YEAR = TODAY.year
#: Last year's entries are still mirrored in January.
LAST_YEAR = TODAY.month == 1

DYNAMIC = ['spectro/data', 'spectro/nightwatch/kpno', 'spectro/staging/lost+found',
           'spectro/redux/daily', 'spectro/redux/daily/exposures',
           'spectro/redux/daily/preproc', 'spectro/redux/daily/tiles',
           'engineering/focalplane', 'engineering/focalplane/hwtables',
           'software/CiscoSecureClient']
PRIORITY = ['spectro/data', 'spectro/redux/daily', 'spectro/redux/daily/exposures',
            'spectro/redux/daily/preproc', 'spectro/redux/daily/tiles']
CATCHUP = ['spectro/data', 'spectro/nightwatch/kpno', 'spectro/staging/lost+found',
           'spectro/redux/daily', 'spectro/redux/daily/exposures',
           'spectro/redux/daily/preproc', 'spectro/redux/daily/tiles',
           'engineering/focalplane']

#: Files at NERSC in most tests, and whether each is mirrored.
NERSC = {
    'spectro/data/20190101/00001234/desi-00001234.fits.fz': False,  # an old year
    f'spectro/data/{YEAR - 2:d}1231/00200000/desi-00200000.fits.fz': False,
    f'spectro/data/{YEAR - 1:d}1231/00250000/desi-00250000.fits.fz': LAST_YEAR,
    f'spectro/data/{YEAR:d}0614/00300000/desi-00300000.fits.fz': True,
    f'spectro/data/{YEAR:d}0614/00300001/desi-00300001.fits.fz': True,
    'spectro/nightwatch/kpno/20201231/qa.html': True,
    'spectro/nightwatch/kpno/20210101/qa.html': False,
    f'spectro/nightwatch/kpno/{YEAR:d}0614/qa.html': True,
    'spectro/staging/lost+found/20260614/x.fits': True,
    'spectro/redux/daily/calibnight/20260614/psf.fits': True,
    'spectro/redux/daily/calibnight/20260614/psf.fits.tmp': False,
    'spectro/redux/daily/attic/old.fits': False,
    'spectro/redux/daily/dark_preproc/d.fits': False,
    'spectro/redux/daily/temp/t.fits': False,
    'spectro/redux/daily/exposures/20181231/00000100/frame.fits': True,  # before 2019
    f'spectro/redux/daily/exposures/{YEAR - 2:d}1231/00200000/frame.fits': False,
    f'spectro/redux/daily/exposures/{YEAR:d}0614/00300000/frame.fits': True,
    f'spectro/redux/daily/exposures/{YEAR:d}0614/00300000/frame.fits.tmp': False,
    f'spectro/redux/daily/preproc/{YEAR - 2:d}1231/00200000/fibermap-00200000.fits': False,
    f'spectro/redux/daily/preproc/{YEAR:d}0614/00300000/fibermap-00300000.fits': True,
    f'spectro/redux/daily/preproc/{YEAR:d}0614/00300000/preproc-b0-00300000.fits': False,
    f'spectro/redux/daily/preproc/{YEAR:d}0614/00300000/preproc-b1-00300000.fits.gz': False,
    'spectro/redux/daily/tiles/cumulative/1000/coadd.fits': True,
    'spectro/redux/daily/tiles/temp/x.fits': False,
    'engineering/focalplane/pos.ecsv': True,
    'engineering/focalplane/archive/a.ecsv': False,
    'engineering/focalplane/nb.ipynb': False,
    'engineering/focalplane/.ipynb_checkpoints/nb.ipynb': False,
    'engineering/focalplane/hwtables/table.csv': True,
    'engineering/focalplane/hwtables/table.txt': True,  # all of it, every day
    'software/CiscoSecureClient/client.tar.gz': True,
    # The entries dr8, dr9, ... only (see CATALOGS), not what they hold.
    'target/catalogs/dr9/1.0.0/targets.fits': False,
    'target/catalogs/dr10/x.fits': False,
    'target/catalogs/README': False,
    'spectro/templates/basis_templates/.svn/entries': False,
    'spectro/templates/basis_templates/basis_templates_svn-old/x.fits': False,
    'spectro/templates/basis_templates/v3.2/galaxy.fits': True,
}

#: The directories of target/catalogs at NERSC, and whether each is mirrored
#: (as an empty directory).
CATALOGS = {'dr8': True, 'dr9': True, 'dr9/1.0.0': False, 'dr10': False,
            'gaiadr2': True, 'subpriority': True}


@pytest.fixture(autouse=True)
def reset_log():
    yield
    configure_log()
    tucson._lock = None


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setattr(common, '_utcnow', lambda: NOW)


def make_nersc(module, static=True):
    """Every directory of the table (empty), and the files of :data:`NERSC`."""
    for d in read_directories():
        if static or d.set != 'static':
            os.makedirs(os.path.join(module, d.directory), mode=0o755, exist_ok=True)
    for name in NERSC:
        if static or not name.startswith(('target/', 'spectro/templates/')):
            write(os.path.join(module, name))
    if static:
        for name in CATALOGS:
            os.makedirs(os.path.join(module, 'target', 'catalogs', name), exist_ok=True)
    for root, dirs, _ in os.walk(module):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)


class Site(MirrorSite):
    """NERSC (an rsync daemon), its status URL, a mail server and the Tucson
    mirror; desi_tucson_transfer as cron runs it."""

    def __init__(self, tmp_path, rsyncd, http_site, smtp_server):
        super().__init__(tmp_path, http_site, smtp_server, 'mirror',
                         ('DESISYNC_', 'MAIL', 'DESI_ROOT', 'RSYNC_RSH'))
        self.rsyncd = rsyncd
        self.nersc = str(rsyncd.module)
        self.web.route('/daily/finished.txt', Answer(200, b'done'))
        self.env.update(HOME=str(rsyncd.home), DESISYNC_HOSTNAME=rsyncd.hostname,
                        DESISYNC_STATUS_URL=self.web.url + '/daily/finished.txt',
                        MAILFROM='mirror@example.org', MAILTO='alerts@example.org',
                        MAILHOST=smtp_server.hostport, DESI_ROOT=self.mirror)
        self.argv = ['desi_tucson_transfer', '-l', self.logs]


@pytest.fixture
def site(tmp_path, rsyncd, http_site, smtp_server):
    return Site(tmp_path, rsyncd, http_site, smtp_server)


# ----------------------------------------------------------------------
# The rsync command and the table of directories.
# ----------------------------------------------------------------------
def test_rsync_command(monkeypatch, clock):
    monkeypatch.setenv('HOME', '/home/mirror')
    monkeypatch.delenv('RSYNC_RSH', raising=False)
    base = ['/usr/bin/rsync', '--archive', '--verbose', '--delete', '--delete-after',
            '--no-motd', '--password-file', '/home/mirror/.desi']
    assert _rsync('rsync://host/desi', '/m', 'spectro/redux/daily/tiles') == base + [
        '--exclude', '*.tmp', '--exclude', 'temp',
        'rsync://host/desi/spectro/redux/daily/tiles/', '/m/spectro/redux/daily/tiles/']
    assert _rsync('S', 'D', 'sv', checksum=True) == (
        base[:2] + ['--checksum'] + base[2:] + ['S/sv/', 'D/sv/'])
    assert _rsync('S', 'D', 'engineering/focalplane')[8:-2] == [
        '--exclude', 'archive', '--exclude', 'hwtables', '--exclude', '.ipynb_checkpoints',
        '--exclude', '*.ipynb']
    # All of hwtables every day; the *.csv filter is the --hwtables run's.
    assert _rsync('S', 'D', 'engineering/focalplane/hwtables')[8:-2] == []
    assert _rsync('S', 'D', 'spectro/redux/daily')[8:-2] == [
        '--exclude', '*.tmp', '--exclude', 'attic', '--exclude', 'dark_preproc',
        '--exclude', 'exposures', '--exclude', 'preproc', '--exclude', 'temp',
        '--exclude', 'tiles']
    assert _rsync('S', 'D', 'spectro/redux/daily/preproc')[8:-2] == [
        a for y in range(2019, 2026) for a in ('--exclude', f'{y:d}*')] + [
        '--exclude', '*.tmp', '--exclude', 'preproc-*.fits', '--exclude', 'preproc-*.fits.gz']
    assert _rsync('S', 'D', 'survey/ops/surveyops/trunk')[8:-2] == [
        '--exclude', '.svn', '--exclude', 'cronupdate.log']
    # The entries, not their contents.
    assert _rsync('S', 'D', 'target/catalogs')[8:-2] == [
        '--include', 'dr8', '--include', 'dr9', '--include', 'gaiadr2',
        '--include', 'subpriority', '--exclude', '*']
    assert _rsync('S', 'D', 'not/in/the/table') == base + ['S/not/in/the/table/',
                                                           'D/not/in/the/table/']


@pytest.mark.parametrize('utc, last', [
    (NOW, 2025),
    # 03:00 UTC on 1 January 2026 is still 31 December 2025 at Kitt Peak.
    (dt.datetime(2026, 1, 1, 3, tzinfo=dt.timezone.utc), 2024),
    # Last year is still mirrored through January...
    (dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc), 2024),
    (dt.datetime(2026, 2, 1, 6, 59, tzinfo=dt.timezone.utc), 2024),
    # ... and left out from 1 February, Kitt Peak time.
    (dt.datetime(2026, 2, 1, 7, 0, tzinfo=dt.timezone.utc), 2025),
    (dt.datetime(2026, 12, 31, 12, tzinfo=dt.timezone.utc), 2025),
])
def test_rsync_old_years(monkeypatch, utc, last):
    """Years from the first one in the table to last year are left out,
    except that last year is still mirrored in January."""
    def years(d):
        return [a for a in _rsync('S', 'D', d)[8:-2] if a != '--exclude']

    monkeypatch.setattr(common, '_utcnow', lambda: utc)
    assert years('spectro/data') == [f'{y}*' for y in range(2018, last + 1)]
    assert years('spectro/nightwatch/kpno') == [f'{y}*' for y in range(2021, last + 1)]
    assert years('spectro/redux/daily/exposures') == [
        f'{y}*' for y in range(2019, last + 1)] + ['*.tmp']
    assert years('spectro/redux/daily/preproc')[:-3] == [
        f'{y}*' for y in range(2019, last + 1)]


def test_rsync_no_old_years_yet(monkeypatch):
    monkeypatch.setattr(common, '_utcnow',
                        lambda: dt.datetime(2022, 1, 15, tzinfo=dt.timezone.utc))
    assert _rsync('S', 'D', 'spectro/nightwatch/kpno')[8:-2] == []
    monkeypatch.setattr(common, '_utcnow',
                        lambda: dt.datetime(2022, 6, 1, tzinfo=dt.timezone.utc))
    assert _rsync('S', 'D', 'spectro/nightwatch/kpno')[8:-2] == ['--exclude', '2021*']


def test_rsync_ssh_form(monkeypatch, clock):
    """With RSYNC_RSH, no password file: the non-interactive ssh program instead."""
    monkeypatch.setenv('RSYNC_RSH', 'ssh -i /home/mirror/key')
    command = _rsync('nersc:/global/cfs/cdirs/desi', '/m', 'sv')
    assert '--password-file' not in command
    assert command == ['/usr/bin/rsync', '--archive', '--verbose', '--delete',
                       '--delete-after', '--no-motd',
                       '--rsh=ssh -i /home/mirror/key ' + ' '.join(SSH_OPTIONS),
                       'nersc:/global/cfs/cdirs/desi/sv/', '/m/sv/']


def test_directory_table():
    directories = read_directories()
    assert [d.name for d in directories if d.set == 'dynamic'] == DYNAMIC
    assert [d.name for d in directories if d.set == 'static'] == [
        'cmx', 'datachallenge', 'engineering/2021_summer_illumination_checks',
        'engineering/donut', 'engineering/fvc', 'engineering/fvc_distortion',
        'engineering/gfa', 'engineering/pfa2positioner', 'engineering/platemaker',
        'engineering/spectrograph', 'engineering/svn_export_focalplane_12302018',
        'engineering/umdata', 'protodesi', 'public/epo', 'public/ets',
        'spectro/desi_spectro_calib', 'spectro/redux/denali', 'spectro/redux/everest',
        'spectro/templates/basis_templates', 'survey/ops/surveyops/trunk', 'sv',
        'target/catalogs', 'target/secondary', 'target/cmx_files']
    assert [d for d in directories if d.set == 'hwtables'] == [
        tucson.Directory('hwtables', 'engineering/focalplane/hwtables', 'hwtables', True,
                         False, None, ('--include', '*.csv', '--exclude', '*'))]
    assert all(d.name == d.directory for d in directories if d.set != 'hwtables')
    assert [d.name for d in directories if d.priority and d.set == 'dynamic'] == PRIORITY
    assert [d.name for d in directories if d.catchup] == CATCHUP
    assert {d.name: d.years for d in directories if d.years} == {
        'spectro/data': 2018, 'spectro/nightwatch/kpno': 2021,
        'spectro/redux/daily/exposures': 2019, 'spectro/redux/daily/preproc': 2019}
    assert {d.name: d.filters for d in directories}['spectro/desi_spectro_calib'] == (
        '--exclude', '.svn')


@pytest.mark.parametrize('text, message', [
    ('[a]\nset = dynamic\nsize = 3\n', 'unknown key(s) size'),
    ('[a]\nset = sometimes\n', 'dynamic, static or hwtables'),
    ('[a]\n', 'dynamic, static or hwtables'),
    ('[a]\nset = static\npriority = maybe\n', 'priority: yes or no'),
    ('[a]\nset = static\ncatchup = often\n', 'catchup: yes or no'),
    ('[a]\nset = hwtables\ncatchup = yes\n', 'not a hwtables one'),
    ('[a]\nset = static\nyears = 18\n', 'a year YYYY'),
    ('[a]\nset = static\nfilter = exclude\n', "'include PATTERN' or 'exclude PATTERN'"),
    ('[a]\nset = static\nfilter =\n    protect x\n', "'include PATTERN' or"),
    ('[../etc]\nset = static\n', 'not a directory relative'),
    ('[/abs]\nset = static\n', 'not a directory relative'),
    ('[a]\nset = hwtables\ndirectory = a/../../etc\n', 'not a directory relative'),
    ('[a]\nset = static\n[a]\nset = static\n', 'already exists'),
    ('[a]\nset = static\n[b]\nset = dynamic\ndirectory = a\n', 'already mirrored'),
    ('[a]\nset = hwtables\n[b]\nset = hwtables\ndirectory = a\n', 'already mirrored'),
    ('set = static\n', 'no section headers'),
])
def test_directory_table_errors(text, message):
    with pytest.raises(ValueError) as err:
        read_directories(text, source='table.ini')
    assert message in str(err.value) and 'table.ini' in str(err.value)


# ----------------------------------------------------------------------
# Every command line against the original's for the same date.
#
# The original's commands are written down here from its code (desitransfer
# 1.0.6: desitransfer.tucson, bin/desi_tucson_transfer_catchup.sh,
# bin/desi_tucson_hwtables.sh); its years come from time.localtime() on
# the NOIRLab host, whose calendar is that of Kitt Peak (Arizona).
# ----------------------------------------------------------------------
#: The original desi_tucson_transfer, rsync daemon form (its only form), and
#: the catch-up script's two forms (ssh when RSYNC_RSH is set).
ORIGINAL_FORM = {
    'daemon': ('/usr/bin/rsync --archive --verbose --delete --delete-after --no-motd '
               '--password-file /home/mirror/.desi {filters} '
               'rsync://nersc.example.org/desi/{d}/ {dst}/{d}/'),
    'ssh': ('/usr/bin/rsync --archive --verbose --delete --delete-after --no-motd '
            '{filters} nersc.example.org:/global/cfs/cdirs/desi/{d}/ {dst}/{d}/'),
}

#: The original desi_tucson_transfer's filters that do not depend on the date;
#: every dynamic and static directory is here or in ORIGINAL_YEARS.
ORIGINAL_FILTERS = {
    # dynamic
    'spectro/staging/lost+found': '',
    'spectro/redux/daily': ('--exclude *.tmp --exclude attic --exclude dark_preproc '
                            '--exclude exposures --exclude preproc --exclude temp '
                            '--exclude tiles'),
    'spectro/redux/daily/tiles': '--exclude *.tmp --exclude temp',
    'engineering/focalplane': ('--exclude archive --exclude hwtables '
                               '--exclude .ipynb_checkpoints --exclude *.ipynb'),
    'engineering/focalplane/hwtables': '',
    'software/CiscoSecureClient': '',
    # static
    'cmx': '', 'datachallenge': '', 'engineering/2021_summer_illumination_checks': '',
    'engineering/donut': '', 'engineering/fvc': '', 'engineering/fvc_distortion': '',
    'engineering/gfa': '', 'engineering/pfa2positioner': '', 'engineering/platemaker': '',
    'engineering/spectrograph': '', 'engineering/svn_export_focalplane_12302018': '',
    'engineering/umdata': '', 'protodesi': '', 'public/epo': '', 'public/ets': '',
    'spectro/desi_spectro_calib': '--exclude .svn',
    'spectro/redux/denali': '', 'spectro/redux/everest': '',
    'spectro/templates/basis_templates': '--exclude .svn --exclude basis_templates_svn-old',
    'survey/ops/surveyops/trunk': '--exclude .svn --exclude cronupdate.log',
    'sv': '',
    'target/catalogs': ('--include dr8 --include dr9 --include gaiadr2 --include subpriority '
                        '--exclude *'),
    'target/secondary': '', 'target/cmx_files': '',
}

#: The original's filters of the directories with old years, in 2025 and 2026.
ORIGINAL_2025 = {
    'spectro/data': ('--exclude 2018* --exclude 2019* --exclude 2020* --exclude 2021* '
                     '--exclude 2022* --exclude 2023* --exclude 2024*'),
    'spectro/nightwatch/kpno': '--exclude 2021* --exclude 2022* --exclude 2023* --exclude 2024*',
    'spectro/redux/daily/exposures': ('--exclude 2019* --exclude 2020* --exclude 2021* '
                                      '--exclude 2022* --exclude 2023* --exclude 2024* '
                                      '--exclude *.tmp'),
    'spectro/redux/daily/preproc': ('--exclude 2019* --exclude 2020* --exclude 2021* '
                                    '--exclude 2022* --exclude 2023* --exclude 2024* '
                                    '--exclude *.tmp --exclude preproc-*.fits '
                                    '--exclude preproc-*.fits.gz'),
}
ORIGINAL_2026 = {
    'spectro/data': ('--exclude 2018* --exclude 2019* --exclude 2020* --exclude 2021* '
                     '--exclude 2022* --exclude 2023* --exclude 2024* --exclude 2025*'),
    'spectro/nightwatch/kpno': ('--exclude 2021* --exclude 2022* --exclude 2023* '
                                '--exclude 2024* --exclude 2025*'),
    'spectro/redux/daily/exposures': ('--exclude 2019* --exclude 2020* --exclude 2021* '
                                      '--exclude 2022* --exclude 2023* --exclude 2024* '
                                      '--exclude 2025* --exclude *.tmp'),
    'spectro/redux/daily/preproc': ('--exclude 2019* --exclude 2020* --exclude 2021* '
                                    '--exclude 2022* --exclude 2023* --exclude 2024* '
                                    '--exclude 2025* --exclude *.tmp --exclude preproc-*.fits '
                                    '--exclude preproc-*.fits.gz'),
}
ORIGINAL_YEARS = {'2025-01-15': ORIGINAL_2025, '2025-04-15': ORIGINAL_2025,
                  '2025-12-15': ORIGINAL_2025, '2026-02-10': ORIGINAL_2026}

#: The original's directories at normal priority; the others ran under os.nice(5).
ORIGINAL_PRIORITY = ('spectro/data', 'spectro/redux/daily', 'spectro/redux/daily/exposures',
                     'spectro/redux/daily/preproc', 'spectro/redux/daily/tiles')

#: The catch-up script's ('nice' or '', excludes) of each directory, as the
#: script stood on each date (its years were edited by hand: 2024 was added
#: on 20 March 2025, 2025 on 29 April 2026).
ORIGINAL_CATCHUP = {
    '2025-12-15': {
        'engineering/focalplane': ('nice', '--exclude archive --exclude hwtables '
                                           '--exclude *.ipynb --exclude .ipynb_checkpoints'),
        'spectro/data': ('', '--exclude 2018* --exclude 2019* --exclude 2020* --exclude 2021* '
                             '--exclude 2022* --exclude 2023* --exclude 2024*'),
        'spectro/redux/daily': ('', '--exclude *.tmp --exclude attic --exclude dark_preproc '
                                    '--exclude exposures --exclude preproc --exclude temp '
                                    '--exclude tiles'),
        'spectro/redux/daily/exposures': ('', '--exclude 2019* --exclude 2020* --exclude 2021* '
                                              '--exclude 2022* --exclude 2023* --exclude 2024* '
                                              '--exclude *.tmp'),
        'spectro/redux/daily/preproc': ('', '--exclude 2019* --exclude 2020* --exclude 2021* '
                                            '--exclude 2022* --exclude 2023* --exclude 2024* '
                                            '--exclude *.tmp --exclude preproc-*.fits '
                                            '--exclude preproc-*.fits.gz'),
        'spectro/redux/daily/tiles': ('', '--exclude *.tmp --exclude temp'),
        'spectro/nightwatch/kpno': ('nice', '--exclude 2021* --exclude 2022* --exclude 2023* '
                                            '--exclude 2024*'),
        'spectro/staging/lost+found': ('nice', ''),
    },
    '2026-06-15': {
        'engineering/focalplane': ('nice', '--exclude archive --exclude hwtables '
                                           '--exclude *.ipynb --exclude .ipynb_checkpoints'),
        'spectro/data': ('', '--exclude 2018* --exclude 2019* --exclude 2020* --exclude 2021* '
                             '--exclude 2022* --exclude 2023* --exclude 2024* --exclude 2025*'),
        'spectro/redux/daily': ('', '--exclude *.tmp --exclude attic --exclude dark_preproc '
                                    '--exclude exposures --exclude preproc --exclude temp '
                                    '--exclude tiles'),
        'spectro/redux/daily/exposures': ('', '--exclude 2019* --exclude 2020* --exclude 2021* '
                                              '--exclude 2022* --exclude 2023* --exclude 2024* '
                                              '--exclude 2025* --exclude *.tmp'),
        'spectro/redux/daily/preproc': ('', '--exclude 2019* --exclude 2020* --exclude 2021* '
                                            '--exclude 2022* --exclude 2023* --exclude 2024* '
                                            '--exclude 2025* --exclude *.tmp '
                                            '--exclude preproc-*.fits '
                                            '--exclude preproc-*.fits.gz'),
        'spectro/redux/daily/tiles': ('', '--exclude *.tmp --exclude temp'),
        'spectro/nightwatch/kpno': ('nice', '--exclude 2021* --exclude 2022* --exclude 2023* '
                                            '--exclude 2024* --exclude 2025*'),
        'spectro/staging/lost+found': ('nice', ''),
    },
}

#: The hwtables script's command.
ORIGINAL_HWTABLES = ("/usr/bin/rsync --verbose --archive --delete --delete-after --no-motd "
                     "--include '*.csv' --exclude '*' "
                     "--rsh='ssh -i ~/.ssh/nersc -o IdentitiesOnly=yes' "
                     "mirror@nersc.example.org:/global/cfs/cdirs/desi/engineering/focalplane/"
                     "hwtables/ {dst}/engineering/focalplane/hwtables/")

# The deliberate differences, each documented in doc/tucson.rst:
#: statistics, the I/O timeout and the deletion bound, right after --no-motd;
ADDED = ['--stats', '--timeout=1800', '--max-delete=10000']
#: last year is still mirrored in January (the original dropped it on 1 January);
KEPT_IN_JANUARY = {'2025-01-15': '2024*'}
#: the same niceness with the nice command (os.nice(5) in the original, plain
#: nice, that is 10, in the catch-up script);
NICENESS = {'daily': 5, 'catchup': 10}
#: the catch-up has the daily run's filters, so its two exclusions of notebooks
#: come in the daily run's order;
CATCHUP_FOCALPLANE = ('--exclude archive --exclude hwtables --exclude .ipynb_checkpoints '
                      '--exclude *.ipynb')
#: the ssh program (RSYNC_RSH, which the original left to rsync to read) is
#: given with --rsh, non-interactive;
RSYNC_RSH = 'ssh -i /home/mirror/.ssh/other'


def ours(original, niceness=None, rsh=None, kept=None):
    """The command expected of this package, from the `original` one with
    the deliberate differences above."""
    words = list(original)
    at = words.index('--no-motd') + 1
    words[at:at] = ADDED + ([f'--rsh={rsh} ' + ' '.join(SSH_OPTIONS)] if rsh else [])
    if kept:
        at = words.index(kept)
        del words[at - 1:at + 1]
    return (['nice', '-n', str(niceness)] if niceness else []) + words


def commands(monkeypatch, tmp_path, date, *args, rsh=None):
    """The command of every directory of the run chosen by `args`, at noon on
    `date` at Kitt Peak, by directory."""
    noon = dt.datetime.fromisoformat(date + 'T12:00:00-07:00').astimezone(dt.timezone.utc)
    monkeypatch.setattr(common, '_utcnow', lambda: noon)
    for k in ('RSYNC_RSH', 'DESISYNC_ROOT', 'MAILHOST'):
        monkeypatch.delenv(k, raising=False)
    env = dict(HOME='/home/mirror', DESISYNC_HOSTNAME='nersc.example.org',
               DESISYNC_STATUS_URL='https://data.example.org/daily_noon.txt',
               MAILFROM='mirror@example.org', MAILTO='alerts@example.org',
               NERSC_USER='mirror', NERSC_HOST='nersc.example.org', DESI_ROOT=str(tmp_path))
    if rsh:
        env['RSYNC_RSH'] = rsh
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    options = _options(list(args) + ['-l', str(tmp_path / 'logs')])
    mirror = Mirror(options, _environment(options))
    return {d.directory: mirror._command(d) for d in mirror.directories}


@pytest.mark.parametrize('date', sorted(ORIGINAL_YEARS))
def test_daily_commands_as_the_original(monkeypatch, tmp_path, date):
    """desi_tucson_transfer --static: every directory's command is the
    original's on the same date, but for the documented differences."""
    found = commands(monkeypatch, tmp_path, date, '--static')
    filters = dict(ORIGINAL_FILTERS, **ORIGINAL_YEARS[date])
    assert sorted(found) == sorted(filters)
    for d, f in filters.items():
        original = shlex.split(ORIGINAL_FORM['daemon'].format(filters=f, d=d, dst=tmp_path))
        niceness = None if d in ORIGINAL_PRIORITY else NICENESS['daily']
        kept = KEPT_IN_JANUARY.get(date) if d in ORIGINAL_YEARS[date] else None
        assert found[d] == ours(original, niceness, kept=kept), d
    # Without --static: the dynamic directories only, the same commands.
    assert commands(monkeypatch, tmp_path, date) == {d: found[d] for d in DYNAMIC}


@pytest.mark.parametrize('form', ['daemon', 'ssh'])
@pytest.mark.parametrize('date', sorted(ORIGINAL_CATCHUP))
def test_catchup_commands_as_the_original(monkeypatch, tmp_path, date, form):
    """desi_tucson_transfer --catchup: the directories and commands of the
    catch-up script on the same date, in either of its forms."""
    rsh = RSYNC_RSH if form == 'ssh' else None
    found = commands(monkeypatch, tmp_path, date, '--catchup', rsh=rsh)
    assert sorted(found) == sorted(ORIGINAL_CATCHUP[date])
    for d, (nice, f) in ORIGINAL_CATCHUP[date].items():
        if d == 'engineering/focalplane':
            assert sorted(shlex.split(f)) == sorted(shlex.split(CATCHUP_FOCALPLANE))
            f = CATCHUP_FOCALPLANE
        original = shlex.split(ORIGINAL_FORM[form].format(filters=f, d=d, dst=tmp_path))
        niceness = NICENESS['catchup'] if nice else None
        assert found[d] == ours(original, niceness, rsh=rsh), d


def test_hwtables_command_as_the_original(monkeypatch, tmp_path):
    """desi_tucson_transfer --hwtables: the script's command, with the options
    in the usual order and the non-interactive ssh."""
    found = commands(monkeypatch, tmp_path, '2025-04-15', '--hwtables')
    original = shlex.split(ORIGINAL_HWTABLES.format(dst=tmp_path))
    assert found == {'engineering/focalplane/hwtables': [
        '/usr/bin/rsync', '--archive', '--verbose', '--delete', '--delete-after', '--no-motd',
        '--stats', '--timeout=1800', '--max-delete=10000',
        '--rsh=ssh -i /home/mirror/.ssh/nersc -o IdentitiesOnly=yes ' + ' '.join(SSH_OPTIONS),
        '--include', '*.csv', '--exclude', '*',
        'mirror@nersc.example.org:/global/cfs/cdirs/desi/engineering/focalplane/hwtables/',
        f'{tmp_path}/engineering/focalplane/hwtables/']}
    # The same words, but for the additions and the ssh program...
    command = found['engineering/focalplane/hwtables']
    assert sorted(set(command) - set(original)) == sorted(ADDED + [command[9]])
    assert set(original) - set(command) == {original[10]}
    assert len(command) == len(original) + len(ADDED)
    # ... which is the script's, non-interactive, with the key's absolute path.
    assert original[10] == '--rsh=ssh -i ~/.ssh/nersc -o IdentitiesOnly=yes'
    assert command[9] == (original[10].replace('~', '/home/mirror') + ' ' +
                          ' '.join(SSH_OPTIONS))
    # RSYNC_RSH names another ssh program.
    found = commands(monkeypatch, tmp_path, '2025-04-15', '--hwtables', rsh=RSYNC_RSH)
    assert found['engineering/focalplane/hwtables'][9] == (
        f'--rsh={RSYNC_RSH} ' + ' '.join(SSH_OPTIONS))


# ----------------------------------------------------------------------
# Options, environment, lock.
# ----------------------------------------------------------------------
def test_options(monkeypatch, tmp_path):
    monkeypatch.setenv('HOME', str(tmp_path))
    options = _options([])
    assert options.nproc == 10 and options.sleep == 900 and options.max_delete == 10000
    assert options.log == str(tmp_path / 'Documents' / 'Logfiles')
    assert not (options.static or options.checksum or options.test or options.force_delete)
    assert options.exclude == []
    assert options.run == 'daily'
    options = _options(['-S', '2d', '-p', '3', '-e', 'spectro/data/', 'sv', '-e', 'cmx',
                        '--force-delete', '-m', '0', '-s', '-c', '-t'])
    assert options.sleep == 2 * 86400 and options.nproc == 3 and options.max_delete == 0
    assert options.exclude == ['spectro/data', 'sv', 'cmx']
    assert _options(['--catchup', '-e']).run == 'catchup'
    assert _options(['--hwtables', '-e', 'hwtables']).exclude == ['hwtables']
    for value, seconds in [('30s', 30), ('15m', 900), ('1h', 3600), ('45', 45), ('0.5', 0.5)]:
        assert _options(['-S', value]).sleep == seconds


@pytest.mark.parametrize('args, message', [
    (['-S', '10x'], 'is not a positive time'), (['-S', '0'], 'is not a positive time'),
    (['-S', '-5m'], 'expected one argument'), (['-S', 'm'], 'is not a positive time'),
    (['-p', '11'], 'from 1 to 10'), (['-p', '0'], 'from 1 to 10'), (['-p', 'x'], 'from 1'),
    (['-e', 'spectro/dat'], 'not a mirrored directory: spectro/dat'),
    (['-m', '-1'], 'is not a number of files'), (['--bogus'], 'unrecognized arguments'),
    (['--catchup', '-s'], 'not allowed with argument'),
    (['--hwtables', '--catchup'], 'not allowed with argument'),
])
def test_command_refuses_bad_options(site, args, message):
    code, out = site.command(*args)
    assert code == 2
    errors = [line for line in out.splitlines() if 'error:' in line]
    assert len(errors) == 1 and message in errors[0], out
    assert not os.path.exists(site.logs) and tree(site.mirror) == []
    assert site.web.requests == []


def test_command_refuses_missing_environment(site):
    p = subprocess.run(['desi_tucson_transfer', '-l', site.logs],
                       env={'PATH': os.environ['PATH'], 'HOME': site.env['HOME']},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert len(lines) == 5 and all('CRITICAL' in line for line in lines)
    for name in ('DESISYNC_HOSTNAME', 'DESISYNC_STATUS_URL', 'MAILFROM', 'MAILTO', 'DESI_ROOT'):
        assert sum(name in line for line in lines) == 1, name
    assert not os.path.exists(site.logs) and site.web.requests == []
    assert site.smtp.messages == []
    code, out = site.command(env={'DESI_ROOT': os.path.join(site.mirror, 'missing')})
    assert code == 1 and 'is not a directory' in out
    assert not os.path.exists(os.path.join(site.mirror, 'missing'))
    assert 'is not a directory' in site.bodies()


def test_missing_environment_is_emailed(site):
    """A missing setting is emailed when it can be: to MAILTO, from the
    mirror account, or from this account if MAILFROM is the one missing."""
    code, out = site.command(env={'DESISYNC_HOSTNAME': '', 'DESISYNC_STATUS_URL': ''})
    assert code == 1 and tree(site.mirror) == [] and not os.path.exists(site.logs)
    assert site.subjects() == ['Error reported by desi_tucson_transfer!'] * 2
    assert 'DESISYNC_HOSTNAME is not set' in site.bodies()
    assert 'DESISYNC_STATUS_URL is not set' in site.bodies()
    assert [m['From'] for m in site.smtp.messages] == [
        'NOIRLab Mirror Account <mirror@example.org>'] * 2
    site.smtp.clear()
    code, out = site.command(env={'MAILFROM': ''})
    assert code == 1 and tree(site.mirror) == [] and site.web.requests == []
    assert site.subjects() == ['Error reported by desi_tucson_transfer!']
    assert 'MAILFROM is not set; desi_tucson_transfer needs it.' in site.bodies()
    sender = site.smtp.messages[0]['From']
    assert sender.endswith(f"@{socket.getfqdn()}") and '<' not in sender
    site.smtp.clear()
    # Test mode: said, not emailed.
    code, out = site.command('-t', env={'DESISYNC_HOSTNAME': ''})
    assert code == 1 and 'DESISYNC_HOSTNAME is not set' in out
    assert site.smtp.messages == []


@pytest.mark.parametrize('name, value', [
    ('DESISYNC_HOSTNAME', '-oProxyCommand=touch /tmp/x'),
    ('DESISYNC_HOSTNAME', 'host/desi/../other'),
    ('DESISYNC_ROOT', 'relative/desi'),
    ('DESISYNC_ROOT', '/global/cfs/cdirs/desi --delete-excluded'),
    ('DESISYNC_STATUS_URL', 'file:///etc/passwd'),
    ('MAILFROM', 'Mirror <mirror@example.org>\nBcc: x@example.org'),
    ('MAILHOST', 'localhost:smtp'),
    ('DESISYNC_HOSTNAME', '-ex@host'),
    ('RSYNC_RSH', 'ssh -o "unbalanced'),
])
def test_command_refuses_malformed_environment(site, name, value):
    """A malformed setting never reaches a command line: one CRITICAL line
    naming it, exit 1, nothing done."""
    make_nersc(site.nersc, static=False)
    code, out = site.command(env=dict({'RSYNC_RSH': 'ssh'}, **{name: value}))
    assert code == 1
    lines = [line for line in out.splitlines() if 'CRITICAL' in line]
    assert len(lines) == 1 and f'{name} is not ' in lines[0], out
    assert tree(site.mirror) == [] and not os.path.exists(site.logs)
    assert site.web.requests == []


@contextlib.contextmanager
def lock_held(pid_file):
    """Another process holds the lock `pid_file` until the end of the block."""
    holder = subprocess.Popen([sys.executable, '-c', 'import time\n'
                               'from desitransfer.processes import single_instance\n'
                               f'lock, _ = single_instance({pid_file!r})\n'
                               'print("locked", flush=True)\ntime.sleep(60)\n'],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_running(tmp_path):
    """Only a process really holding the lock counts, whatever the pid file says."""
    pid_file = str(tmp_path / 'logs' / 'desi_tucson_transfer.pid')
    with lock_held(pid_file) as holder:
        assert running(pid_file) is True
    # The holder is gone; its pid is still in the file: not running.
    assert open(pid_file).read().strip() == str(holder.pid)
    assert running(pid_file) is False
    assert open(pid_file).read().strip() == str(os.getpid())
    tucson._lock.close()
    # A pid file naming a live process that holds no lock (a recycled pid).
    with open(pid_file, 'w') as f:
        f.write(f'{os.getppid():d}\n')
    assert running(pid_file) is False


def test_command_refuses_to_run_twice(site):
    make_nersc(site.nersc, static=False)
    pid_file = os.path.join(site.logs, 'desi_tucson_transfer.pid')
    with lock_held(pid_file) as holder:
        code, out = site.command()
    assert code == 1
    assert f'Another desi_tucson_transfer (pid {holder.pid:d}) is running' in out
    assert tree(site.mirror) == [] and site.web.requests == []
    assert site.subjects() == ['Error reported by desi_tucson_transfer!']
    # The holder died: the next run goes ahead although its pid is in the file.
    code, out = site.command()
    assert code == 0, out


def _cmdline(pid):
    with open(f'/proc/{pid:d}/cmdline', 'rb') as f:
        return f.read()


@pytest.mark.alone
def test_command_refuses_beside_the_original(site, tmp_path):
    """The original's desi_tucson_transfer (which holds no kernel lock) runs:
    this one refuses, saying how to stop it, and mirrors nothing."""
    make_nersc(site.nersc, static=False)
    script = tmp_path / 'original' / 'bin' / 'desi_tucson_transfer'
    script.parent.mkdir(parents=True)
    script.write_text(f'#!{sys.executable}\nimport time\ntime.sleep(60)\n')
    script.chmod(0o755)
    original = subprocess.Popen([str(script)], stdout=subprocess.DEVNULL)
    try:
        while str(script).encode() not in _cmdline(original.pid):
            time.sleep(0.02)
        code, out = site.command()
    finally:
        original.kill()
        original.wait()
    assert code == 1
    assert f'running: pid {original.pid:d}' in out and f'kill {original.pid:d}' in out
    assert tree(site.mirror) == [] and site.web.requests == []


# ----------------------------------------------------------------------
# Mirroring from a real rsync daemon.
# ----------------------------------------------------------------------
def expected(static=False):
    return sorted(n for n, mirrored in NERSC.items()
                  if mirrored and (static or not n.startswith(('target/', 'spectro/templates/'))))


def test_mirror(site):
    """The dynamic directories, in parallel; then the static ones too."""
    make_nersc(site.nersc)
    # Kept although no longer at NERSC: an old year is left alone.
    write(os.path.join(site.mirror, 'spectro/data/20190102/00001300/desi-00001300.fits.fz'))
    code, out = site.command('-S', '0.1')
    assert code == 0, out
    assert tree(site.mirror) == sorted(
        expected() + ['spectro/data/20190102/00001300/desi-00001300.fits.fz'])
    for name in expected():
        with open(os.path.join(site.mirror, name)) as f:
            assert f.read() == f'data {os.path.join(site.nersc, name)}\n'
    for d in DYNAMIC:
        assert f'{d}: ok in ' in out
        log_file = os.path.join(site.logs, 'desi_tucson_transfer_' + d.replace('/', '_') + '.log')
        with open(log_file) as f:
            text = f.read()
        assert '--max-delete=10000' in text and text.rstrip().endswith('# Exit status 0')
    assert 'spectro/data: ok in ' in out and '2 files, ' in out
    with open(os.path.join(site.logs, 'desi_tucson_transfer.log')) as f:
        text = f.read()
    # Priority directories at normal priority, the others under nice.
    assert 'Running: /usr/bin/rsync --archive' in text
    for d in DYNAMIC:
        nice = 'Running: nice -n 5 /usr/bin/rsync ' in text.split(f'{d}/ ')[0].splitlines()[-1]
        assert nice == (d not in PRIORITY), d
    assert site.smtp.messages == []
    # Static data sets too.
    code, out = site.command('--static', '-p', '4')
    assert code == 0, out
    assert tree(site.mirror) == sorted(
        expected(static=True) + ['spectro/data/20190102/00001300/desi-00001300.fits.fz'])
    assert 'target/catalogs: ok in' in out and 'cmx: ok in' in out
    # Of target/catalogs, the four entries only, empty.
    catalogs = os.path.join(site.mirror, 'target', 'catalogs')
    assert {n: os.path.isdir(os.path.join(catalogs, n)) for n in CATALOGS} == CATALOGS


def test_mirror_deletes_what_nersc_deleted(site):
    make_nersc(site.nersc, static=False)
    assert site.command()[0] == 0
    os.remove(os.path.join(site.nersc, 'spectro/data/20260614/00300001/desi-00300001.fits.fz'))
    code, out = site.command()
    assert code == 0, out
    assert 'spectro/data/20260614/00300001/desi-00300001.fits.fz' not in tree(site.mirror)
    assert 'spectro/data: ok in' in out and '1 deleted' in out


def test_failing_directory(site):
    """One directory fails: an alert names it and its log; the others finish."""
    make_nersc(site.nersc, static=False)
    secret = os.path.join(site.nersc, 'software/CiscoSecureClient/secret.key')
    write(secret)
    os.chmod(secret, 0)
    code, out = site.command('-e', 'spectro/nightwatch/kpno')
    assert code == 1
    log_file = os.path.join(site.logs, 'desi_tucson_transfer_software_CiscoSecureClient.log')
    assert 'software/CiscoSecureClient: failed in' in out and f'see {log_file}' in out
    assert 'spectro/nightwatch/kpno skipped at user request' in out
    assert 'spectro/nightwatch/kpno: excluded' in out
    assert [d for d in DYNAMIC if f'{d}: ok in' in out] == [
        d for d in DYNAMIC if d not in ('software/CiscoSecureClient', 'spectro/nightwatch/kpno')]
    assert site.subjects() == ['Error reported by desi_tucson_transfer!']
    assert site.smtp.messages[0]['From'] == 'NOIRLab Mirror Account <mirror@example.org>'
    assert site.smtp.envelopes == [('mirror@example.org', ['alerts@example.org'])]
    assert 'rsync of software/CiscoSecureClient failed with status 23' in site.bodies()
    assert log_file in site.bodies()
    with open(log_file) as f:
        assert 'Permission denied' in f.read()
    assert not os.path.exists(os.path.join(site.mirror, 'spectro/nightwatch/kpno'))


@pytest.mark.parametrize('how', ['empty', 'missing'])
def test_empty_source_refused(site, how):
    """A directory empty or missing at NERSC never wipes its copy."""
    make_nersc(site.nersc, static=False)
    assert site.command()[0] == 0
    before = tree(site.mirror)
    data = os.path.join(site.nersc, 'spectro', 'data')
    for root, dirs, names in os.walk(data, topdown=False):
        for n in names:
            os.remove(os.path.join(root, n))
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    if how == 'missing':
        os.rmdir(data)
    code, out = site.command()
    assert code == 1
    assert tree(site.mirror) == before
    assert 'spectro/data: refused in' in out
    assert site.subjects() == ['Error reported by desi_tucson_transfer!']
    assert f'/desi/spectro/data/ is {how} at NERSC while its copy' in site.bodies()
    assert 'The copy is kept' in site.bodies()
    assert 'spectro/redux/daily: ok in' in out


def test_empty_source_without_copy(site):
    """Empty at NERSC and here: nothing to protect, the run succeeds."""
    make_nersc(site.nersc, static=False)
    for name in list(NERSC):
        if name.startswith('software/'):
            os.remove(os.path.join(site.nersc, name))
    code, out = site.command()
    assert code == 0, out
    assert os.path.isdir(os.path.join(site.mirror, 'software/CiscoSecureClient'))
    # Missing at NERSC and here: a failure to look at, nothing deleted.
    os.rmdir(os.path.join(site.nersc, 'software/CiscoSecureClient'))
    os.rmdir(os.path.join(site.mirror, 'software/CiscoSecureClient'))
    code, out = site.command()
    assert code == 1
    assert 'is missing at NERSC, and there is no copy' in site.bodies()


def test_deletion_bound(site):
    """Deletions stop at the bound (rsync 25) with an alert; --force-delete
    lifts it for one run."""
    make_nersc(site.nersc, static=False)
    assert site.command()[0] == 0
    tiles = os.path.join(site.nersc, 'spectro/redux/daily/tiles/cumulative')
    for n in range(30):
        write(os.path.join(tiles, f'{n:d}/coadd.fits'))
    assert site.command()[0] == 0
    copy = os.path.join(site.mirror, 'spectro/redux/daily/tiles/cumulative')
    assert len(tree(copy)) == 31
    for n in range(30):
        os.remove(os.path.join(tiles, f'{n:d}/coadd.fits'))
    code, out = site.command('--max-delete', '10')
    assert code == 1
    assert 'spectro/redux/daily/tiles: deletion bound reached in' in out
    assert len(tree(copy)) == 21
    assert site.subjects() == ['Error reported by desi_tucson_transfer!']
    assert 'stopped at the bound of 10 files (rsync status 25)' in site.bodies()
    assert '--force-delete' in site.bodies()
    code, out = site.command('--force-delete')
    assert code == 0, out
    assert tree(copy) == ['1000/coadd.fits']
    log_file = os.path.join(site.logs, 'desi_tucson_transfer_spectro_redux_daily_tiles.log')
    with open(log_file) as f:
        last = f.read().split('\n# ')[-2]
    assert '--max-delete' not in last


def test_nersc_unreachable(site):
    """The rsync daemon is down, or the password is wrong: every directory
    fails, with an alert; the copy is kept."""
    make_nersc(site.nersc, static=False)
    assert site.command()[0] == 0
    before = tree(site.mirror)
    with open(os.path.join(site.rsyncd.home, '.desi'), 'w') as f:
        f.write('wrong\n')
    code, out = site.command()
    assert code == 1 and tree(site.mirror) == before
    assert 'auth failed' in site.bodies()
    assert all(f'{d}: failed in' in out for d in DYNAMIC)
    site.rsyncd.process.terminate()
    site.rsyncd.process.wait()
    site.smtp.clear()
    code, out = site.command()
    assert code == 1 and tree(site.mirror) == before
    assert len(site.smtp.messages) == len(DYNAMIC)
    assert 'Cannot list rsync://' in site.bodies() and 'is left as it is' in site.bodies()
    assert 'Connection refused' in site.bodies()
    assert os.path.join(site.logs, 'desi_tucson_transfer_spectro_data.log') in site.bodies()


def test_nersc_hangs(site, monkeypatch, clock):
    """A server that accepts connections and never answers costs a bounded time."""
    make_nersc(site.nersc, static=False)
    with socket.socket() as hole:
        hole.bind(('127.0.0.1', 0))
        hole.listen(64)
        site.use_environment(monkeypatch, DESISYNC_HOSTNAME=f'127.0.0.1:{hole.getsockname()[1]}')
        monkeypatch.setattr('desitransfer.mirror.LIST_TIMEOUT', 1)
        options = _options(['-l', site.logs])
        t0 = time.monotonic()
        assert Mirror(options, _environment(options)).run() == 1
        assert time.monotonic() - t0 < 10
    assert 'Timed out after 1 seconds' in site.bodies()
    assert tree(site.mirror) == []


def test_ssh_form(site, dts):
    """With RSYNC_RSH, the same mirror over ssh, without the password file."""
    make_nersc(site.nersc, static=False)
    os.remove(os.path.join(site.rsyncd.home, '.desi'))
    code, out = site.command(env={'RSYNC_RSH': dts.ssh, 'DESISYNC_HOSTNAME': 'dts',
                                  'DESISYNC_ROOT': site.nersc})
    assert code == 0, out
    assert tree(site.mirror) == expected()
    assert '--password-file' not in out and f'--rsh={dts.ssh} -o BatchMode=yes' in out
    assert 'dts:' + site.nersc + '/spectro/data/' in out


# ----------------------------------------------------------------------
# The catch-up and the hwtables runs.
# ----------------------------------------------------------------------
def catchup_files():
    return [n for n in expected() if n.startswith(tuple(d + '/' for d in CATCHUP)) and
            not n.startswith('engineering/focalplane/hwtables/')]


def test_catchup(site):
    """--catchup mirrors the catch-up directories at once, without waiting
    for (or needing) the status URL; the others are left alone."""
    make_nersc(site.nersc, static=False)
    site.web.route('/daily/finished.txt', Answer(503))
    code, out = site.command('--catchup', '-t', env={'DESISYNC_STATUS_URL': ''})
    assert code == 0, out
    assert out.count('Test mode, would run: ') == 2 * len(CATCHUP)
    assert tree(site.mirror) == [] and site.smtp.messages == []
    code, out = site.command('--catchup', env={'DESISYNC_STATUS_URL': ''})
    assert code == 0, out
    assert site.web.requests == [] and 'without waiting' in out
    assert tree(site.mirror) == catchup_files()
    assert [d for d in DYNAMIC if f'{d}: ok in' in out] == CATCHUP
    with open(os.path.join(site.logs, 'desi_tucson_transfer.log')) as f:
        text = f.read()
    for d in CATCHUP:
        line = text.split(f'{d}/ ')[0].splitlines()[-1]
        assert ('Running: nice -n 10 /usr/bin/rsync ' in line) == (d not in PRIORITY), d
    assert site.smtp.messages == []


def test_catchup_waits_for_no_daily_run(site):
    """The catch-up and the daily run write the same directories: never both."""
    make_nersc(site.nersc, static=False)
    with lock_held(os.path.join(site.logs, 'desi_tucson_transfer.pid')) as holder:
        code, out = site.command('--catchup')
    assert code == 1
    assert f'Another desi_tucson_transfer (pid {holder.pid:d}) is running' in out
    assert tree(site.mirror) == []


def test_hwtables(site, dts):
    """--hwtables: the *.csv tables over ssh as NERSC_USER@NERSC_HOST, without
    the password file or the status URL, even while the daily run holds its lock."""
    make_nersc(site.nersc, static=False)
    write(os.path.join(site.nersc, 'engineering/focalplane/hwtables/old/table.csv'))
    os.remove(os.path.join(site.rsyncd.home, '.desi'))
    site.env.update(RSYNC_RSH=dts.ssh, NERSC_USER=getpass.getuser(), NERSC_HOST='dts',
                    DESISYNC_ROOT=site.nersc, DESISYNC_HOSTNAME='', DESISYNC_STATUS_URL='')
    # A file of the copy that is not a table is neither replaced nor deleted.
    write(os.path.join(site.mirror, 'engineering/focalplane/hwtables/notes.txt'))
    with lock_held(os.path.join(site.logs, 'desi_tucson_transfer.pid')):
        code, out = site.command('--hwtables')
    assert code == 0, out
    assert tree(site.mirror) == ['engineering/focalplane/hwtables/notes.txt',
                                 'engineering/focalplane/hwtables/table.csv']
    assert 'hwtables: ok in' in out and site.web.requests == []
    assert (f'Running: /usr/bin/rsync --archive --verbose --delete --delete-after --no-motd '
            f"--stats --timeout=1800 --max-delete=10000 '--rsh={dts.ssh} -o BatchMode=yes") in out
    assert f"{getpass.getuser()}@dts:{site.nersc}/engineering/focalplane/hwtables/" in out
    assert os.path.exists(os.path.join(site.logs, 'desi_tucson_transfer_hwtables.log'))
    # NERSC_HOST missing: one alert, nothing done.
    code, out = site.command('--hwtables', env={'NERSC_HOST': ''})
    assert code == 1
    assert 'NERSC_HOST is not set; desi_tucson_transfer --hwtables needs it.' in site.bodies()


def test_test_mode(site):
    make_nersc(site.nersc, static=False)
    code, out = site.command('--test')
    assert code == 0, out
    assert out.count('Test mode, would run: ') == 2 * len(DYNAMIC)
    assert f'Test mode, would wait until {site.env["DESISYNC_STATUS_URL"]} answers 200' in out
    assert tree(site.mirror) == [] and not os.path.exists(site.logs)
    assert site.web.requests == [] and site.smtp.messages == []
    assert all(f'{d}: test mode in ' in out for d in DYNAMIC)


# ----------------------------------------------------------------------
# Waiting for the daily transfer at NERSC.
# ----------------------------------------------------------------------
def test_waits_for_the_daily_transfer(site):
    make_nersc(site.nersc, static=False)
    site.web.route('/daily/finished.txt', Answer(404), Answer(503), Answer(200, b'done'))
    t0 = time.monotonic()
    code, out = site.command('-S', '0.2')
    assert code == 0, out
    assert time.monotonic() - t0 >= 0.4
    assert site.web.requests == ['/daily/finished.txt'] * 3
    assert out.count('Daily transfer incomplete') == 2
    assert tree(site.mirror) == expected()


def test_wait_is_bounded(site, monkeypatch):
    """After WAIT_LIMIT without a 200 (here: errors, a hang, refusals), one
    alert and nothing mirrored."""
    make_nersc(site.nersc, static=False)
    site.web.route('/daily/finished.txt', Answer(500), Answer(200, delay=5), Answer(404))
    clock = [NOW]

    def now():
        clock[0] += dt.timedelta(hours=1)
        return clock[0]

    monkeypatch.setattr(common, '_utcnow', now)
    monkeypatch.setattr(tucson, 'STATUS_TIMEOUT', (1, 0.3))
    site.use_environment(monkeypatch)
    options = _options(['-l', site.logs, '-S', '0.01'])
    assert Mirror(options, _environment(options)).run() == 1
    assert 10 <= len(site.web.requests) <= 13
    assert tree(site.mirror) == []
    assert site.subjects() == ['Error reported by desi_tucson_transfer!']
    assert 'has not answered 200' in site.bodies() and 'Nothing was mirrored' in site.bodies()


def test_status_headers_one_byte_at_a_time(site, monkeypatch):
    """A status page whose status line and headers come a byte at a time (each
    read quick, the whole minutes) is abandoned after STATUS_DEADLINE: the
    wait goes on, the next answer is a 200 and the copy is made."""
    make_nersc(site.nersc, static=False)
    slow = Answer(200, b'done', header_drip=0.05, headers=(('X-Padding', 'x' * 4000),))
    site.web.route('/daily/finished.txt', slow, Answer(200, b'done'))
    monkeypatch.setattr(tucson, 'STATUS_TIMEOUT', (2, 0.5))
    monkeypatch.setattr(tucson, 'STATUS_DEADLINE', 1)
    site.use_environment(monkeypatch)
    options = _options(['-l', site.logs, '-S', '0.01'])
    mirror = Mirror(options, _environment(options))
    result = []
    thread = threading.Thread(target=lambda: result.append(mirror.run()), daemon=True)
    t0 = time.monotonic()
    thread.start()
    while len(site.web.requests) < 2 and time.monotonic() - t0 < 10:
        time.sleep(0.02)
    assert time.monotonic() - t0 < 3, "the status request was not abandoned in time"
    thread.join(60)
    assert not thread.is_alive(), "still running after 60 seconds"
    assert result == [0]
    with open(os.path.join(site.logs, 'desi_tucson_transfer.log')) as f:
        logged = f.read()
    assert 'Daily transfer incomplete' in logged
    assert f'{site.env["DESISYNC_STATUS_URL"]}: not complete after 1 s; abandoned' in logged
    assert site.web.requests == ['/daily/finished.txt'] * 2
    assert tree(site.mirror) == expected()


def test_sigterm_while_waiting(site):
    site.web.route('/daily/finished.txt', Answer(503))
    code, out, seconds = site.terminate_when(lambda: site.web.requests, '-S', '1h', settle=0.2)
    assert seconds < 5 and code == 1
    assert 'Stopped (SIGTERM received) while waiting; nothing was mirrored.' in out


# ----------------------------------------------------------------------
# Scheduling, with a recorder instead of the runner.
# ----------------------------------------------------------------------
@pytest.mark.parametrize('processes', [1, 3])
def test_parallel_priority_first(monkeypatch, tmp_path, clock, processes):
    """Up to N commands at once; priority directories first (one at a time:
    exactly in order) and at normal priority, the others under nice."""
    recorder = Recorder(0.2 if processes > 1 else 0.001)
    monkeypatch.setattr('desitransfer.executor.run', recorder)
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.delenv('RSYNC_RSH', raising=False)
    options = _options(['-p', str(processes), '-l', str(tmp_path / 'logs')])
    mirror = Mirror(options, {'source': 'rsync://nersc/desi', 'destination': str(tmp_path),
                              'status_url': 'http://unused/'})
    outcomes = mirror.mirror()
    assert recorder.most == processes
    names = [c[-1][len(str(tmp_path)) + 1:-1] for c in recorder.started]
    assert sorted(names) == sorted(DYNAMIC)
    if processes == 1:
        assert names == PRIORITY + [d for d in DYNAMIC if d not in PRIORITY]
    for name, c in zip(names, recorder.started):
        if name in PRIORITY:
            assert c[0] == '/usr/bin/rsync'
        else:
            assert c[:4] == ['nice', '-n', '5', '/usr/bin/rsync']
    assert [o.directory for o in outcomes] == DYNAMIC
    assert all(o.status == 'ok' and o.files == 1234 and o.bytes == 5678901 for o in outcomes)


def test_sigterm_stops_running_rsync(site, dts, tmp_path):
    """SIGTERM stops the rsync commands under way (and what they started)
    within seconds; the directories are reported stopped, exit status 1."""
    make_nersc(site.nersc, static=False)
    marker, slow = slow_ssh(tmp_path, dts.ssh)
    site.env.update(RSYNC_RSH=str(slow), DESISYNC_HOSTNAME='dts', DESISYNC_ROOT=site.nersc)
    code, out, seconds = site.terminate_when(marker.exists, '-p', '2')
    assert seconds < 5 and code == 1
    assert all(f'{d}: stopped in' in out for d in DYNAMIC), out
    assert tree(site.mirror) == [] and site.smtp.messages == []
    assert still_running(slow) == ''


def test_unusable_log_directory(site):
    """The log directory cannot be created: an alert, nothing mirrored."""
    make_nersc(site.nersc, static=False)
    with open(site.logs, 'w') as f:
        f.write('a file where the log directory should be\n')
    code, out = site.command()
    assert code == 1 and 'Cannot create the log directory' in out
    assert tree(site.mirror) == [] and site.web.requests == []
    assert site.subjects() == ['Error reported by desi_tucson_transfer!']
