# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of desitransfer.utah against a real rsync daemon, sshd, HTTP and
SMTP server on 127.0.0.1."""
import datetime as dt
import os
import shlex
import stat
import subprocess
import sys
import threading
import time

import pytest

from desitransfer import __version__, common, utah
from desitransfer.alerts import configure_log
from desitransfer.processes import single_instance
from desitransfer.transport import SSH_OPTIONS
from desitransfer.utah import (Mirror, _environment, _options, add_user_write, download,
                               night_window, parse_list, read_directories)
from fixtures_http import Answer
from mirror_site import NOW, MirrorSite, Recorder, slow_ssh, still_running, tree, write

#: The shipped command, run as cron would (whether or not the package's
#: console scripts were installed again since it was added).
COMMAND = [sys.executable, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'bin', 'desi_utah_transfer')]

DAILY = 'spectro/redux/daily'
DIRECTORIES = [DAILY, f'{DAILY}/calibnight', f'{DAILY}/exposure_tables', f'{DAILY}/exposures',
               f'{DAILY}/preproc', f'{DAILY}/processing_tables', f'{DAILY}/tiles/cumulative',
               'survey/GFA', f'{DAILY}/tiles/archive']

#: The list of paths of tiles/cumulative published at NERSC.
TILES_LIST = b'./1000/20260614/coadd-0-1000-thru20260614.fits\n./2000/20250101\n\n'

#: Files at NERSC in most tests, and whether each is mirrored on NOW.
NERSC = {
    f'{DAILY}/dashboard.html': True,
    f'{DAILY}/exposures-daily.csv': True,
    f'{DAILY}/tiles.csv': True,
    f'{DAILY}/tiles-daily.fits': True,
    f'{DAILY}/tsnr-exposures.fits': True,
    f'{DAILY}/other.txt': False,
    f'{DAILY}/run/scripts/night.sh': False,
    f'{DAILY}/dark_preproc/dark.fits': False,
    f'{DAILY}/calibnight/20260614/psfnight-b0-20260614.fits': True,
    f'{DAILY}/calibnight/20260614/tmp/psf-b0.fits': True,
    f'{DAILY}/calibnight/20260614/old/psf-b0.fits.gz': True,
    f'{DAILY}/calibnight/20260614/notes.txt': False,
    f'{DAILY}/calibnight/20260516/fiberflatnight-b0-20260516.fits': True,  # 30th night
    f'{DAILY}/calibnight/20260515/fiberflatnight-b0-20260515.fits': False,  # 31st
    f'{DAILY}/calibnight/20260615/psfnight-b0-20260615.fits': False,  # today
    f'{DAILY}/exposure_tables/202606/exposure_table_20260614.csv': True,
    f'{DAILY}/exposures/20260614/00300000/cframe-b0-00300000.fits': True,
    f'{DAILY}/exposures/20260614/00300000/sky-b0-00300000.fits.gz': True,
    f'{DAILY}/exposures/20260614/00300000/tsnr.csv': True,
    f'{DAILY}/exposures/20260614/00300000/log.txt': False,
    f'{DAILY}/exposures/20260401/00200000/cframe-b0-00200000.fits': False,
    f'{DAILY}/preproc/20260614/00300000/fibermap-00300000.fits': True,
    f'{DAILY}/preproc/20260614/00300000/preproc-b0-00300000.fits.gz': True,
    f'{DAILY}/preproc/20260614/00300000/preproc-b0-00300000.fits': False,
    f'{DAILY}/preproc/20260614/00300000/tilepix-1000.json': True,
    f'{DAILY}/preproc/20260514/00290000/fibermap-00290000.fits': False,
    f'{DAILY}/processing_tables/processing_table_daily-20260614.csv': True,
    f'{DAILY}/tiles/cumulative/1000/20260614/coadd-0-1000-thru20260614.fits': True,
    f'{DAILY}/tiles/cumulative/1000/20260501/coadd-0-1000-thru20260501.fits': False,
    f'{DAILY}/tiles/archive/2000/20250101/coadd-0-2000-20250101.fits': True,
    f'{DAILY}/tiles/archive/2000/20250101/rrdetails-0-2000-20250101.h5': False,
    'survey/GFA/2026/gfa-20260614.fits': True,
    'spectro/data/20260614/00300000/desi-00300000.fits.fz': False,
}

#: A link of tiles/cumulative into tiles/archive, at NERSC and, mirrored, at Utah.
LINK = (f'{DAILY}/tiles/cumulative/2000/20250101', '../../archive/2000/20250101')


@pytest.fixture(autouse=True)
def reset_log():
    yield
    configure_log()


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setattr(common, '_utcnow', lambda: NOW)


def expected(extra=()):
    return sorted([n for n, mirrored in NERSC.items() if mirrored] + [' -> '.join(LINK)] +
                  list(extra))


def only(*directories):
    """Options mirroring only `directories` this time."""
    return ['-e'] + [d for d in DIRECTORIES if d not in directories]


def summary(text, d):
    """The last summary line of directory `d` in the log `text`."""
    return [line.split(': ', 1)[1] for line in text.splitlines()
            if line.split(': ', 1)[-1].startswith(f'{d}: ')][-1]


def make_nersc(top):
    for name in NERSC:
        write(os.path.join(top, name))
    os.makedirs(os.path.join(top, os.path.dirname(LINK[0])), exist_ok=True)
    os.symlink(LINK[1], os.path.join(top, LINK[0]))
    for root, dirs, _ in os.walk(top):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)


class Site(MirrorSite):
    """NERSC (an rsync daemon, or only a directory), its list of tiles, a mail
    server and the Utah mirror; desi_utah_transfer as cron runs it."""

    def __init__(self, tmp_path, http_site, smtp_server, rsyncd=None):
        super().__init__(tmp_path, http_site, smtp_server, 'utah',
                         ('DESISYNC_', 'DESI_ROOT', 'RSYNC_RSH', 'DAILY_'))
        self.rsyncd = rsyncd
        if rsyncd is None:
            self.nersc = str(tmp_path / 'nersc')
            os.mkdir(self.nersc)
            home, self.hostname = tmp_path / 'home', 'desi@127.0.0.1:9'
            home.mkdir()
        else:
            self.nersc = str(rsyncd.module)
            home, self.hostname = rsyncd.home, rsyncd.hostname
        self.home = str(home)
        self.tmp = tmp_path / 'tmp'
        self.tmp.mkdir()
        self.web.route('/daily_tiles_cumulative.txt', Answer(200, TILES_LIST))
        self.env.update(HOME=self.home, DESISYNC_HOSTNAME=self.hostname,
                        DESI_ROOT=self.mirror, TMPDIR=str(self.tmp),
                        DAILY_TILES_CUMULATIVE_OUTPUT=self.web.url + '/daily_tiles_cumulative.txt')
        self.alerts = ['--alert-to', 'alerts@example.org', '--smtp', smtp_server.hostport]
        self.argv = COMMAND + ['-l', self.logs] + self.alerts

    def run(self, monkeypatch, *args, **env):
        """Run the mirror in this process (its clock may be set): exit status."""
        self.use_environment(monkeypatch, **env)
        monkeypatch.setattr(utah.tempfile, 'tempdir', None)
        options = _options(['-l', self.logs] + self.alerts + list(args))
        environment = _environment(options)
        assert environment is not None
        return Mirror(options, environment).run()

    def main_log(self):
        with open(os.path.join(self.logs, 'desi_utah_transfer.log')) as f:
            return f.read()


@pytest.fixture
def site(tmp_path, rsyncd, http_site, smtp_server):
    """NERSC is an rsync daemon."""
    return Site(tmp_path, http_site, smtp_server, rsyncd)


@pytest.fixture
def local_site(tmp_path, http_site, smtp_server):
    """NERSC is a directory (reached over ssh, or not at all)."""
    return Site(tmp_path, http_site, smtp_server)


# ----------------------------------------------------------------------
# The commands for a fixed date, against the original script.
# ----------------------------------------------------------------------
#: The original's list of the top-level daily files (comments dropped).
ORIGINAL_DAILY = ['dashboard', 'dashboard.html', 'exposures-daily.*', 'tiles.*',
                  'tiles-daily.*', 'tsnr-exposures.*']

#: For each directory of the original, whether it runs under nice and its
#: rsync arguments between the connection options and the directories.
ORIGINAL = {
    DAILY: (True, '--include-from DESITRANSFER/py/desitransfer/data/desi_utah_daily.txt '
                  '--exclude *'),
    f'{DAILY}/calibnight': (True, '--delete-excluded --include-from '
                                  'DESI_ROOT/spectro/redux/daily_calibnight.txt --exclude *'),
    f'{DAILY}/exposure_tables': (False, ''),
    f'{DAILY}/exposures': (True, '--delete-excluded --include-from '
                                 'DESI_ROOT/spectro/redux/daily_exposures.txt --exclude *'),
    f'{DAILY}/preproc': (True, '--delete-excluded --include-from '
                               'DESI_ROOT/spectro/redux/daily_preproc.txt --exclude *'),
    f'{DAILY}/processing_tables': (False, ''),
    f'{DAILY}/tiles/cumulative': (True, '--delete-excluded --files-from '
                                        'DESI_ROOT/spectro/redux/daily_tiles_cumulative.txt'),
    'survey/GFA': (False, ''),
    f'{DAILY}/tiles/archive': (False, '--exclude rrdetails-*.h5'),
}


def original_include_file(path, today):
    """The lines the original's local_include_file writes on `today`."""
    lines = []
    for day in range(1, 31):
        night = (today - dt.timedelta(days=day)).strftime('%Y%m%d')
        lines.append(night)
        if path != 'calibnight':
            lines.append(f'{night}/????????')
    if path == 'preproc':
        return lines + ['fibermap-*.fits', 'preproc-*.fits.gz', 'tilepix-*.json']
    return lines + ['*.fits', '*.fits.gz', '*.csv'] + (['tmp', 'old'] if path == 'calibnight'
                                                       else [])


def rules(args, read):
    """The filter rules of rsync arguments `args`, in order, as (include|exclude,
    pattern), with the lines of each --include-from file given by ``read(name)``;
    the other arguments; the files of --files-from."""
    found, other, files_from = [], [], None
    args = list(args)
    while args:
        a = args.pop(0)
        if a in ('--include', '--exclude'):
            found.append((a[2:], args.pop(0)))
        elif a == '--include-from':
            found += [('include', line) for line in read(args.pop(0))]
        elif a == '--files-from':
            files_from = read(args.pop(0))
        else:
            other.append(a)
    return found, other, files_from


def test_commands_match_the_original(monkeypatch, tmp_path, clock):
    """On a given date, each directory gets the options, filters and night
    window of the original, plus the documented bounds."""
    monkeypatch.setenv('HOME', '/home/utah')
    options = _options(['-l', str(tmp_path / 'logs')])
    mirror = Mirror(options, {'source': 'rsync://desisync.nersc.gov/desi', 'destination': '/u',
                              'transport': ['--password-file', '/home/utah/.desi'],
                              'lists': {'DAILY_TILES_CUMULATIVE_OUTPUT': 'http://x/list'}})
    mirror.private = str(tmp_path)
    (tmp_path / 'paths.txt').write_text('./1000/20260614/coadd.fits\n')
    today = dt.date(2026, 6, 15)
    original_files = {
        'DESITRANSFER/py/desitransfer/data/desi_utah_daily.txt': ORIGINAL_DAILY,
        'DESI_ROOT/spectro/redux/daily_tiles_cumulative.txt': ['./1000/20260614/coadd.fits']}
    for path in ('calibnight', 'exposures', 'preproc'):
        original_files[f'DESI_ROOT/spectro/redux/daily_{path}.txt'] = original_include_file(
            path, today)

    def ours(name):
        with open(name) as f:
            return f.read().splitlines()

    assert [d.name for d in mirror.directories] == list(ORIGINAL)
    for d in mirror.directories:
        include_from = mirror._night_list(d) if d.nights else None
        command = mirror._command(d, include_from, str(tmp_path / 'paths.txt')
                                  if d.files_from else None)
        nice, filters = ORIGINAL[d.name]
        assert (command[:3] == ['nice', '-n', '10']) == nice, d.name
        if nice:
            command = command[3:]
        # The original: "/usr/bin/rsync --archive --verbose --delete
        # --delete-after --no-motd --password-file ~/.desi FILTERS SRC/D/ DST/D/".
        assert command[:6] == ['/usr/bin/rsync', '--archive', '--verbose', '--delete',
                               '--delete-after', '--no-motd']
        # Added: statistics, the I/O timeout and the deletion bound (higher
        # where a night leaves the window every day).
        bound = 100000 if d.nights else 10000
        assert command[6:9] == ['--stats', '--timeout=1800', f'--max-delete={bound:d}']
        assert command[9:11] == ['--password-file', '/home/utah/.desi']
        assert command[-2:] == [f'rsync://desisync.nersc.gov/desi/{d.name}/', f'/u/{d.name}/']
        assert rules(command[11:-2], ours) == rules(shlex.split(filters),
                                                    original_files.__getitem__), d.name
    # The generated lists are in the private directory, and only there.
    assert sorted(os.listdir(tmp_path)) == [
        'nights_spectro_redux_daily_calibnight.txt',
        'nights_spectro_redux_daily_exposures.txt', 'nights_spectro_redux_daily_preproc.txt',
        'paths.txt']
    with open(tmp_path / 'nights_spectro_redux_daily_calibnight.txt') as f:
        assert f.read().splitlines() == original_include_file('calibnight', today)[:30]


def test_night_window(monkeypatch):
    monkeypatch.setattr(common, '_utcnow', lambda: NOW)
    nights = night_window(30)
    assert nights[0] == '20260614' and nights[-1] == '20260516' and len(nights) == 30
    # 05:00 UTC on 1 January is 22:00 on 31 December at Kitt Peak.
    monkeypatch.setattr(common, '_utcnow',
                        lambda: dt.datetime(2026, 1, 1, 5, tzinfo=dt.timezone.utc))
    assert night_window(3) == ['20251230', '20251229', '20251228']
    monkeypatch.setattr(common, '_utcnow',
                        lambda: dt.datetime(2024, 3, 31, 8, tzinfo=dt.timezone.utc))
    assert night_window(31)[-2:] == ['20240301', '20240229']


def test_list_needed_only_if_mirrored(monkeypatch, tmp_path):
    monkeypatch.setenv('DESISYNC_HOSTNAME', 'desisync.nersc.gov')
    monkeypatch.setenv('DESI_ROOT', str(tmp_path))
    monkeypatch.delenv('DAILY_TILES_CUMULATIVE_OUTPUT', raising=False)
    monkeypatch.delenv('RSYNC_RSH', raising=False)
    assert _environment(_options([])) is None
    environment = _environment(_options(['-e', f'{DAILY}/tiles/cumulative']))
    assert environment['source'] == 'rsync://desisync.nersc.gov/desi'
    assert environment['lists'] == {}


def test_ssh_form_options(monkeypatch, tmp_path):
    """With RSYNC_RSH, the non-interactive ssh program instead of the password file."""
    monkeypatch.setenv('RSYNC_RSH', 'ssh -i /home/utah/key')
    monkeypatch.setenv('DESISYNC_HOSTNAME', 'dtn.nersc.gov')
    monkeypatch.setenv('DESI_ROOT', str(tmp_path))
    monkeypatch.setenv('DAILY_TILES_CUMULATIVE_OUTPUT', 'https://data.desi.lbl.gov/list.txt')
    monkeypatch.delenv('DESISYNC_ROOT', raising=False)
    environment = _environment(_options([]))
    assert environment['source'] == 'dtn.nersc.gov:/global/cfs/cdirs/desi'
    assert environment['transport'] == ['--rsh=ssh -i /home/utah/key ' + ' '.join(SSH_OPTIONS)]


# ----------------------------------------------------------------------
# The table, the lists, the permissions.
# ----------------------------------------------------------------------
@pytest.mark.parametrize('text, message', [
    ('[a]\nsize = 3\n', 'unknown key(s) size'),
    ('[a]\nnice = maybe\n', 'nice: yes or no'),
    ('[a]\nnights = 400\nnight_filter = include NIGHT\n', 'up to 366'),
    ('[a]\nnights = 30\n', 'NIGHT in each pattern'),
    ('[a]\nnights = 30\nnight_filter = include *.fits\n', 'NIGHT in each pattern'),
    ('[a]\nnights = 30\nnight_filter = exclude NIGHT\n', 'NIGHT in each pattern'),
    ('[a]\nnight_filter = include NIGHT\n', 'only with nights'),
    ('[a]\nfilter = protect x\n', "'include PATTERN' or 'exclude PATTERN'"),
    ('[a]\nfiles_from = $(reboot)\n', 'name of an environment variable'),
    ('[a]\nmax_delete = -1\n', 'max_delete: a number of files'),
    ('[../etc]\n', 'not a directory relative'),
    ('[a]\ndelete_excluded = yes\n[a/b]\n', 'it would delete a/b'),
    ('nice = yes\n', 'no section headers'),
])
def test_table_errors(text, message):
    with pytest.raises(ValueError) as err:
        read_directories(text, source='table.ini')
    assert message in str(err.value) and 'table.ini' in str(err.value)


def test_parse_list():
    assert parse_list('./1000/20260614/a.fits\n\n  2000/20250101\n././3000\n') == [
        '1000/20260614/a.fits', '2000/20250101', '3000']
    for bad in ('../../etc/passwd', '1000/../../x', '/etc/passwd', '1000/./x', 'a b',
                '#comment', '1000/\x00x', '-' * 5000):
        with pytest.raises(ValueError) as err:
            parse_list(f'./1000/ok\n{bad}\n')
        assert 'line 2 is not a relative path' in str(err.value)


def test_download_bounds(http_site, monkeypatch):
    """A list that is too long, too slow, cut short or not text is refused, in bounded time."""
    web = http_site()
    web.route('/ok', Answer(200, b'./1000/x\n'))
    web.route('/big', Answer(200, b'x' * 5000))
    web.route('/drip', Answer(200, b'./1000/x\n' * 100, drip=0.1))
    web.route('/cut', Answer(200, b'./1000/x\n' * 100, send=50))
    web.route('/binary', Answer(200, b'\xff\xfe\x00'))
    monkeypatch.setattr(utah, 'LIST_LIMIT', 4096)
    monkeypatch.setattr(utah, 'HTTP_DEADLINE', 0.3)
    assert download(web.url + '/ok') == './1000/x\n'
    for path, message in [('/big', 'more than 4096 bytes'),
                          ('/drip', 'not complete after 0.3 s'),
                          ('/cut', 'reading the answer failed: Connection broken'),
                          ('/binary', 'not UTF-8'), ('/missing', 'HTTP status 404')]:
        t0 = time.monotonic()
        with pytest.raises(ValueError) as err:
            download(web.url + path)
        assert message in str(err.value) and time.monotonic() - t0 < 2, path


def test_add_user_write(tmp_path):
    top = tmp_path / 'cumulative'
    (top / '1000' / '20260614').mkdir(parents=True)
    (top / '1000' / '20260614' / 'coadd.fits').write_text('x')
    outside = tmp_path / 'outside.fits'
    outside.write_text('x')
    (top / 'link').symlink_to(outside)
    for p in (outside, top / '1000' / '20260614' / 'coadd.fits'):
        os.chmod(p, 0o440)
    for p in (top / '1000' / '20260614', top / '1000'):
        os.chmod(p, 0o550)
    assert add_user_write(str(top), test=True) == (3, [])
    assert stat.S_IMODE(os.stat(top / '1000').st_mode) == 0o550
    assert add_user_write(str(top)) == (3, [])
    assert stat.S_IMODE(os.stat(top / '1000').st_mode) == 0o750
    assert stat.S_IMODE(os.stat(top / '1000' / '20260614' / 'coadd.fits').st_mode) == 0o640
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o440
    assert add_user_write(str(tmp_path / 'missing')) == (0, [])


# ----------------------------------------------------------------------
# Bad input: one error line, nothing changed.
# ----------------------------------------------------------------------
def test_command_refuses_bad_option(local_site):
    site = local_site
    p = subprocess.run(COMMAND + ['--version'], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == f'desi_utah_transfer {__version__}'
    code, out = site.command('-R')
    assert code == 2
    errors = [line for line in out.splitlines() if 'error:' in line]
    assert len(errors) == 1 and 'unrecognized arguments: -R' in errors[0], out
    assert not os.path.exists(site.logs) and tree(site.mirror) == []
    assert os.listdir(site.tmp) == [] and site.web.requests == []


@pytest.mark.parametrize('args, message', [
    (['-p', '11'], 'from 1 to 10'), (['-p', '0'], 'from 1 to 10'),
    (['-e', 'spectro/redux/dail'], 'not a mirrored directory: spectro/redux/dail'),
    (['-m', '-1'], 'is not a number of files'), (['--alert-to', 'nobody'], 'not an email'),
    (['-T'], 'unrecognized arguments: -T'),
])
def test_bad_options(capsys, args, message):
    with pytest.raises(SystemExit) as err:
        _options(args)
    assert err.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if 'error:' in line]
    assert len(errors) == 1 and message in errors[0]


def test_options(monkeypatch, tmp_path):
    monkeypatch.setenv('HOME', str(tmp_path))
    options = _options([])
    assert options.nproc == 10 and options.max_delete is None and options.exclude == []
    assert options.log == str(tmp_path / 'Documents' / 'Logfiles')
    assert not (options.test or options.force_delete or options.debug)
    options = _options(['-A', '-e', 'survey/GFA/', '-p', '2', '-m', '0', '--force-delete'])
    assert options.exclude == ['survey/GFA', 'spectro/redux/daily/tiles/archive']
    assert options.nproc == 2 and options.max_delete == 0 and options.force_delete


def test_command_refuses_bad_environment(local_site):
    """Unset or malformed variables: one CRITICAL line naming every problem
    (also emailed), exit status 1, nothing changed."""
    site = local_site
    p = subprocess.run(COMMAND + ['-l', site.logs] + site.alerts,
                       env={'PATH': os.environ['PATH'], 'HOME': site.env['HOME'],
                            'TMPDIR': str(site.tmp)},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert len(lines) == 1 and 'CRITICAL' in lines[0], lines
    for name in ('DESISYNC_HOSTNAME is not set', 'DESI_ROOT is not set',
                 'DAILY_TILES_CUMULATIVE_OUTPUT (the list of paths of '
                 'spectro/redux/daily/tiles/cumulative) is not set'):
        assert name in lines[0]
    assert site.subjects() == ['Error reported by desi_utah_transfer!']
    assert not os.path.exists(site.logs) and tree(site.mirror) == []
    assert os.listdir(site.tmp) == [] and site.web.requests == []


@pytest.mark.parametrize('name, value, message', [
    ('DESISYNC_HOSTNAME', '-oProxyCommand=touch /tmp/x', 'is not [USER@]HOST[:PORT]'),
    ('DESISYNC_HOSTNAME', 'host/desi', 'is not [USER@]HOST[:PORT]'),
    ('DESISYNC_HOSTNAME', '-ex@host', 'is not [USER@]HOST[:PORT]'),  # rsync: -e x@host
    ('DESI_ROOT', 'relative/path', 'is not an existing directory'),
    ('DAILY_TILES_CUMULATIVE_OUTPUT', 'file:///etc/passwd', 'is not an http(s) URL'),
    ('DESISYNC_ROOT', '/global/cfs/cdirs/desi /etc', 'is not an absolute path'),
    ('RSYNC_RSH', 'ssh -o "unbalanced', 'is not a command'),
])
def test_malformed_environment(monkeypatch, tmp_path, caplog, name, value, message):
    """A malformed value never reaches a command line: one CRITICAL line."""
    for k, v in [('DESISYNC_HOSTNAME', 'dtn.nersc.gov'), ('DESI_ROOT', str(tmp_path)),
                 ('DAILY_TILES_CUMULATIVE_OUTPUT', 'https://data.desi.lbl.gov/list.txt'),
                 ('RSYNC_RSH', 'ssh'), (name, value)]:
        monkeypatch.setenv(k, v)
    assert _environment(_options([])) is None
    assert [r.levelname for r in caplog.records] == ['CRITICAL']
    assert f'{name} {message}' in caplog.records[0].getMessage()


def test_command_refuses_to_run_twice(local_site, monkeypatch):
    site = local_site
    make_nersc(site.nersc)
    lock, _ = single_instance(os.path.join(site.logs, 'desi_utah_transfer.pid'))
    try:
        assert site.run(monkeypatch) == 1
    finally:
        lock.close()
    assert tree(site.mirror) == [] and site.web.requests == []
    assert f'Another desi_utah_transfer (pid {os.getpid():d}) is running' in site.bodies()


# ----------------------------------------------------------------------
# Mirroring from a real rsync daemon, and over ssh.
# ----------------------------------------------------------------------
def test_mirror(local_site, dts, monkeypatch, clock):
    """The directories of the original, each with its filters and window; what
    left the window is deleted at Utah, what is only filtered out is kept.

    Over ssh (RSYNC_RSH): the rsync daemon of the tests, a module without
    chroot, does not send the regular files named by --files-from (rsync 3.5.0).
    """
    site = local_site
    make_nersc(site.nersc)
    kept = [f'{DAILY}/local-notes.txt',  # not at NERSC, filtered out of the top level
            f'{DAILY}/tiles/archive/1000/20240101/rrdetails-0-1000-20240101.h5']
    gone = [f'{DAILY}/exposures/20260401/00200000/cframe-b0-00200000.fits',  # left the window
            'survey/GFA/2025/gone.fits']
    for name in kept + gone:
        write(os.path.join(site.mirror, name))
    locked = os.path.join(site.mirror, DAILY, 'tiles', 'cumulative', '1000')
    os.makedirs(locked)
    os.chmod(locked, 0o555)
    # The private directories of a killed run and of a live one.
    (site.tmp / 'desi_utah_transfer-999999999-killed').mkdir()
    (site.tmp / f'desi_utah_transfer-{os.getppid():d}-alive').mkdir()
    assert site.run(monkeypatch, RSYNC_RSH=dts.ssh, DESISYNC_HOSTNAME='dts',
                    DESISYNC_ROOT=site.nersc) == 0
    assert tree(site.mirror) == expected(kept)
    for name in expected():
        if ' -> ' not in name:
            with open(os.path.join(site.mirror, name)) as f:
                assert f.read() == f'data {os.path.join(site.nersc, name)}\n'
    text = site.main_log()
    for d in DIRECTORIES:
        assert f'{d}: ok in ' in text
        with open(os.path.join(site.logs, 'desi_utah_transfer_' + d.replace('/', '_') +
                               '.log')) as f:
            log_text = f.read()
        assert '--max-delete=10' in log_text and '# Exit status 0 after ' in log_text
    assert 'the 30 nights from 20260516 to 20260614' in text
    assert 'Added user write permission to 1 entries' in text
    assert '2 paths listed by http://' in text
    assert summary(text, f'{DAILY}/exposures').endswith(', 3 deleted.')  # a file, 2 directories
    assert summary(text, 'survey/GFA').endswith(', 2 deleted.')
    assert site.web.requests == ['/daily_tiles_cumulative.txt']
    assert site.smtp.messages == []
    assert os.listdir(site.tmp) == [f'desi_utah_transfer-{os.getppid():d}-alive']
    # Nothing written into the DESI tree besides the mirror.
    assert not [n for n in os.listdir(os.path.join(site.mirror, 'spectro', 'redux'))
                if n != 'daily']


def test_window_moves_deletion_bound(site, monkeypatch):
    """Forty days later the nights have left the window: deleting them stops at
    the bound, with an alert; --force-delete lifts it for one run."""
    make_nersc(site.nersc)
    windowed = [f'{DAILY}/{d}' for d in ('calibnight', 'exposures', 'preproc')]
    monkeypatch.setattr(common, '_utcnow', lambda: NOW)
    assert site.run(monkeypatch, *only(*windowed)) == 0
    monkeypatch.setattr(common, '_utcnow', lambda: NOW + dt.timedelta(days=40))
    assert site.run(monkeypatch, '-m', '2', *only(*windowed)) == 1
    for d in ('calibnight', 'exposures', 'preproc'):
        assert tree(os.path.join(site.mirror, DAILY, d)) != [], d
        assert summary(site.main_log(), f'{DAILY}/{d}').startswith(
            f'{DAILY}/{d}: deletion bound reached in ')
    assert site.subjects() == ['Error reported by desi_utah_transfer!'] * 3
    assert 'stopped at the bound of 2 files (rsync status 25)' in site.bodies()
    assert '--force-delete' in site.bodies()
    assert f'{DAILY}/tiles/archive skipped at user request' in site.main_log()
    assert site.run(monkeypatch, '--force-delete', *only(*windowed)) == 0
    for d in ('calibnight', 'exposures', 'preproc'):
        assert tree(os.path.join(site.mirror, DAILY, d)) == []


def test_empty_source_refused(site, monkeypatch, clock):
    """A directory empty or missing at NERSC never wipes its copy."""
    make_nersc(site.nersc)
    mirrored = only(f'{DAILY}/exposures', f'{DAILY}/preproc', 'survey/GFA')
    assert site.run(monkeypatch, *mirrored) == 0
    before = tree(site.mirror)
    assert f'{DAILY}/exposures/20260614/00300000/tsnr.csv' in before
    for d in (f'{DAILY}/exposures', f'{DAILY}/preproc'):
        subprocess.run(['rm', '-rf', os.path.join(site.nersc, d)], check=True)
    os.mkdir(os.path.join(site.nersc, DAILY, 'preproc'), 0o755)
    assert site.run(monkeypatch, *mirrored) == 1
    assert tree(site.mirror) == before
    assert summary(site.main_log(), f'{DAILY}/exposures').startswith(
        f'{DAILY}/exposures: refused in')
    assert summary(site.main_log(), f'{DAILY}/preproc').startswith(f'{DAILY}/preproc: refused in')
    assert summary(site.main_log(), 'survey/GFA').startswith('survey/GFA: ok in')
    assert site.subjects() == ['Error reported by desi_utah_transfer!'] * 2
    assert f'/desi/{DAILY}/exposures/ is missing at NERSC while its copy' in site.bodies()
    assert f'/desi/{DAILY}/preproc/ is empty at NERSC while its copy' in site.bodies()
    assert 'The copy is kept' in site.bodies()


def test_bad_tiles_list(site, monkeypatch, clock):
    """A list of tiles that cannot be used leaves tiles/cumulative as it is;
    the other directories are mirrored."""
    make_nersc(site.nersc)
    copy = os.path.join(site.mirror, DAILY, 'tiles', 'cumulative')
    write(os.path.join(copy, '1000', '20260501', 'coadd.fits'))
    for answer, message, status in [
            (Answer(404), 'HTTP status 404', 'failed'),
            (Answer(200, b'./1000/ok.fits\n../../../../etc/passwd\n'),
             'line 2 is not a relative path', 'failed'),
            (Answer(200, b'\n'), 'names no path', 'refused')]:
        site.smtp.clear()
        site.web.route('/daily_tiles_cumulative.txt', answer)
        assert site.run(monkeypatch, *only(f'{DAILY}/tiles/cumulative', 'survey/GFA')) == 1
        assert tree(copy) == ['1000/20260501/coadd.fits']
        assert site.subjects() == ['Error reported by desi_utah_transfer!']
        assert message in site.bodies() and 'is left as it is' in site.bodies()
        assert summary(site.main_log(), f'{DAILY}/tiles/cumulative').startswith(
            f'{DAILY}/tiles/cumulative: {status} in ')
        assert summary(site.main_log(), 'survey/GFA').startswith('survey/GFA: ok in')
        assert tree(os.path.join(site.mirror, 'survey')) == ['GFA/2026/gfa-20260614.fits']


def test_tiles_list_headers_one_byte_at_a_time(site, monkeypatch, clock):
    """A list of tiles whose status line and headers come a byte at a time
    (each read quick, the whole minutes) is abandoned after HTTP_DEADLINE:
    tiles/cumulative is left as it is, the other directories are mirrored."""
    make_nersc(site.nersc)
    copy = os.path.join(site.mirror, DAILY, 'tiles', 'cumulative')
    write(os.path.join(copy, '1000', '20260501', 'coadd.fits'))
    site.web.route('/daily_tiles_cumulative.txt',
                   Answer(200, TILES_LIST, header_drip=0.05,
                          headers=(('X-Padding', 'x' * 4000),)))
    monkeypatch.setattr(utah, 'HTTP_TIMEOUT', (2, 0.5))
    monkeypatch.setattr(utah, 'HTTP_DEADLINE', 1)
    args = only(f'{DAILY}/tiles/cumulative', 'survey/GFA')
    result = []
    thread = threading.Thread(target=lambda: result.append(site.run(monkeypatch, *args)),
                              daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "still running after 60 seconds"
    assert time.monotonic() - t0 < 5
    assert result == [1]
    assert tree(copy) == ['1000/20260501/coadd.fits']
    assert site.subjects() == ['Error reported by desi_utah_transfer!']
    assert 'not complete after 1 s; abandoned' in site.bodies()
    assert summary(site.main_log(), f'{DAILY}/tiles/cumulative').startswith(
        f'{DAILY}/tiles/cumulative: failed in ')
    assert summary(site.main_log(), 'survey/GFA').startswith('survey/GFA: ok in')


def test_command(site):
    """The shipped command, today, from the rsync daemon with the password file."""
    top = site.nersc
    today = dt.datetime.now(dt.timezone(dt.timedelta(hours=-7))).date()
    recent, old = [(today - dt.timedelta(days=n)).strftime('%Y%m%d') for n in (3, 40)]
    for night in (recent, old):
        write(os.path.join(top, DAILY, 'exposures', night, '00300000', 'cframe.fits'))
    write(os.path.join(top, 'survey', 'GFA', 'gfa.fits'))
    code, out = site.command('-e', DAILY, f'{DAILY}/calibnight', f'{DAILY}/exposure_tables',
                             f'{DAILY}/preproc', f'{DAILY}/processing_tables',
                             f'{DAILY}/tiles/cumulative', '-A')
    assert code == 0, out
    assert tree(site.mirror) == [f'{DAILY}/exposures/{recent}/00300000/cframe.fits',
                                 'survey/GFA/gfa.fits']
    assert f'--password-file {site.rsyncd.home}/.desi' in out
    assert f'rsync://{site.rsyncd.hostname}/desi/survey/GFA/' in out
    assert f'{DAILY}/tiles/archive: excluded in' in out and site.web.requests == []


def test_test_mode(local_site):
    """-t logs every command and changes nothing: no log, lock, list, download,
    email or file."""
    site = local_site
    make_nersc(site.nersc)
    code, out = site.command('--test')
    assert code == 0, out
    assert out.count('Test mode, would run: ') == 2 * len(DIRECTORIES)
    commands = [line.split('Test mode, would run: ')[1] for line in out.splitlines()
                if 'would run: nice' in line or 'would run: /usr/bin/rsync --archive' in line]
    assert [c.split()[-2] for c in commands] == [f'rsync://{site.hostname}/desi/{d}/'
                                                 for d in DIRECTORIES]
    assert 'Test mode, would download http://' in out
    assert tree(site.mirror) == [] and not os.path.exists(site.logs)
    assert os.listdir(site.tmp) == [] and site.web.requests == [] and site.smtp.messages == []
    assert all(f'{d}: test mode in ' in out for d in DIRECTORIES)


def test_sigterm(local_site, dts, tmp_path):
    """SIGTERM stops the rsync commands under way (and the ssh they started)
    within seconds; the directories are reported stopped, exit status 1."""
    site = local_site
    make_nersc(site.nersc)
    marker, slow = slow_ssh(tmp_path, dts.ssh)
    code, out, seconds = site.terminate_when(marker.exists, '-p', '2',
                                             env={'RSYNC_RSH': str(slow),
                                                  'DESISYNC_HOSTNAME': 'dts',
                                                  'DESISYNC_ROOT': site.nersc})
    assert seconds < 5 and code == 1
    assert all(f'{d}: stopped in' in out for d in DIRECTORIES), out
    assert tree(site.mirror) == [] and site.smtp.messages == [] and os.listdir(site.tmp) == []
    assert still_running(slow) == ''


# ----------------------------------------------------------------------
# Scheduling, with a recorder instead of the runner.
# ----------------------------------------------------------------------
@pytest.mark.parametrize('processes', [1, 3])
def test_bounded_parallelism(monkeypatch, tmp_path, clock, processes):
    """Up to N commands at once, started in the order of the table."""
    recorder = Recorder(0.1 if processes > 1 else 0.001)
    monkeypatch.setattr('desitransfer.executor.run', recorder)
    monkeypatch.setattr(utah, 'download', lambda url, stop: './1000/x\n')
    options = _options(['-p', str(processes), '-l', str(tmp_path / 'logs')])
    mirror = Mirror(options, {'source': 'rsync://nersc/desi', 'destination': str(tmp_path),
                              'transport': [], 'lists': {'DAILY_TILES_CUMULATIVE_OUTPUT': 'x'}})
    mirror.private = str(tmp_path)
    outcomes = mirror.mirror()
    assert recorder.most == processes
    names = [c[-1][len(str(tmp_path)) + 1:-1] for c in recorder.started]
    assert sorted(names) == sorted(DIRECTORIES)
    if processes == 1:
        assert names == DIRECTORIES
    assert [o.directory for o in outcomes] == DIRECTORIES
    assert all(o.status == 'ok' and o.files == 1234 and o.bytes == 5678901 for o in outcomes)
