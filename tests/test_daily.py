# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of desitransfer.daily: unit tests of the commands it builds, and
desi_daily_transfer run as cron runs it, with real rsync over the loopback
sshd from a mountain at the real absolute paths (``kpno`` fixture)."""
import os
import re
import shlex
import subprocess
import time

import pytest
from helpers import mode, refuse_chmod

from desitransfer import __version__, daily
from desitransfer.processes import single_instance
from desitransfer.configuration import ConfigurationError
from desitransfer.daily import DailyDirectory, _config, _options

#: What stamp() writes.
STAMP = r'[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} P[SD]T'

#: The noon set, in order.
NOON = ['lost+found', 'calibration', 'calib_logs', 'kpno', 'sequence_logs', 'hwtables']


def tree(top):
    """Everything under `top`: files, ``dir/``, ``link -> target``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, top)
            if os.path.islink(path):
                found.append(f'{rel} -> {os.readlink(path)}')
            elif os.path.isdir(path):
                found.append(rel + '/')
            else:
                found.append(rel)
    return sorted(found)


def snapshot(top):
    """Path, mode, size and mtime of everything under `top`."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [''] + dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            result[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return result


def daily_cli(kpno, *args, env=None, alert=None):
    """Run desi_daily_transfer as cron would (alerts off unless `alert` is an SMTP server)."""
    mail = ['--alert-to', 'desi-alarms@example.org', '--smtp', alert.hostport] if alert else \
        ['--alert-to', '']
    return subprocess.run(['desi_daily_transfer', '--kill', str(kpno.kill)] + mail + list(args),
                          capture_output=True, text=True, timeout=120, env=env)


def engineering(kpno, *parts):
    """The real directory behind $DESI_ROOT/engineering."""
    return kpno.top.joinpath('nersc', 'cfs', 'engineering', *parts)


def noon_mountain(kpno):
    """Every noon source directory, with names that must and must not arrive."""
    kpno.write('/data/dts/exposures/raw/20240101/00001234/desi-00001234.fits.fz', 'fits\n')
    kpno.link('/data/dts/exposures/lost+found/20240101/00001234', '../../raw/20240101/00001234')
    kpno.write('/data/dts/exposures/lost+found/notes.txt')
    kpno.link('/data/dts/exposures/lost+found/notes-link.txt', 'notes.txt')
    outside = kpno.top / 'outside.txt'
    outside.write_text('not ours\n')
    outside.chmod(0o666)
    outdir = kpno.top / 'outside-dir'
    outdir.mkdir()
    outdir.chmod(0o777)
    kpno.write('/data/focalplane/calibration/fp_calib.json', '{}\n', mode=0o664)
    kpno.write('/data/focalplane/calibration/sub/deep.txt', mode=0o600)
    kpno.link('/data/focalplane/calibration/latest.json', 'fp_calib.json')
    kpno.link('/data/focalplane/calibration/dangling', 'does-not-exist')
    kpno.link('/data/focalplane/calibration/outside', str(outside))
    kpno.link('/data/focalplane/calibration/outside-dir', str(outdir))
    for name in ('calib_logs', 'kpno', 'sequence_logs'):
        kpno.write(f'/data/focalplane/logs/{name}/{name}-20240101.log')
    for name in ('pos.csv', 'pos.csv.bak', 'pos.CSV', 'notes.txt', 'sub/inner.csv'):
        kpno.write(f'/data/focalplane/fp_temp_files/{name}')
    engineering(kpno, 'focalplane', 'logs').mkdir(parents=True)
    kpno.nersc('spectro', 'staging', 'status').mkdir(parents=True)
    return outside, outdir


def morning_mountain(kpno):
    nightlogs = '/software/www2/html/nightlogs'
    arrive = ['20240101/nightlog_kpno.html', '20240101/NightSummary20240101.html',
              '20240101/images/dome.png', '20240101/images/sub/sky.jpg',
              '20240101/Observers/notes.json', 'kpno_index.html']
    stay = ['index.html', '20240101/nightlog.html', '20240101/NightSummary2024010.html',
            '20240101/NightSummary20240101.htm', '20240101/OperationsScientist/os.html',
            '2024010/nightlog_kpno.html', '20240101/imagesX/a.png']
    for name in arrive + stay:
        kpno.write(f'{nightlogs}/{name}')
    kpno.write('/data/focalplane/endofnight/20240101/fp.dat')
    kpno.nersc('survey', 'ops').mkdir()
    engineering(kpno, 'focalplane').mkdir()
    return arrive


# ----------------------------------------------------------------------
# Unit tests.
# ----------------------------------------------------------------------
def test_options(monkeypatch):
    monkeypatch.setenv('HOME', '/home/desi')
    o = _options(['noon'])
    assert (o.timeframe, o.completion, o.kill, o.permission, o.test, o.only, o.debug) == \
        ('noon', '$DESI_ROOT/spectro/staging/status/daily.txt', '/home/desi/stop_desi_transfer',
         True, False, None, False)
    assert (o.alert_to, o.smtp) == (['desi-alarms-transfer@desi.lbl.gov'], 'localhost:25')
    o = _options(['-c', '/x/d.txt', '-d', '-P', '-t', '--only', 'kpno', '--alert-to', '',
                  'morning'])
    assert (o.completion, o.debug, o.permission, o.test, o.only, o.alert_to) == \
        ('/x/d.txt', True, False, True, 'kpno', [])


@pytest.mark.parametrize('args', [[], ['evening'], ['noon', '--smtp', 'a b'],
                                  ['noon', '--alert-to', 'nobody'], ['noon', '--bogus']])
def test_bad_options(tmp_path, args):
    """One error line, exit status 2, nothing written."""
    p = subprocess.run(['desi_daily_transfer'] + args, capture_output=True, text=True,
                       cwd=tmp_path, env={'PATH': os.environ['PATH']})
    assert p.returncode == 2
    assert p.stdout == '' and p.stderr.splitlines()[-1].startswith('desi_daily_transfer: error:')
    assert os.listdir(tmp_path) == []


def test_help_needs_no_environment():
    for args in (['--help'], ['--version']):
        p = subprocess.run(['desi_daily_transfer'] + args, capture_output=True, text=True,
                           env={'PATH': os.environ['PATH']})
        assert p.returncode == 0 and 'desi_daily_transfer' in p.stdout
    p = subprocess.run(['desi_daily_transfer', '--help'], capture_output=True, text=True)
    assert '$DESI_ROOT/spectro/staging/status/daily.txt' in p.stdout


def test_command(monkeypatch):
    monkeypatch.delenv('RSYNC_RSH', raising=False)
    ssh = ('--rsh=ssh -o BatchMode=yes -o ConnectTimeout=30 -o ServerAliveInterval=30 '
           '-o ServerAliveCountMax=4')
    d = DailyDirectory('/src/d0', '/dst/d0')
    assert d.log == '/dst/d0.log' and d.name == 'd0'
    assert d.command() == ['/bin/rsync', ssh, '--timeout=600', '--verbose', '--recursive',
                           '--links', '--safe-links', '--times', '--omit-dir-times',
                           'dts:/src/d0/', '/dst/d0/']
    d = DailyDirectory('/src/d0', '/dst/d0', extra=['--include', '*.csv', '--exclude', '*'],
                       dirlinks=True)
    # With dirlinks no link is copied by this command; see DailyDirectory.follow.
    assert d.command()[3:] == ['--verbose', '--recursive', '--times',
                               '--omit-dir-times', '--include', '*.csv', '--exclude', '*',
                               'dts:/src/d0/', '/dst/d0/']
    monkeypatch.setenv('RSYNC_RSH', '"/opt/my ssh" -F /x')
    assert d.command()[1].startswith("--rsh='/opt/my ssh' -F /x -o BatchMode=yes")


def test_config(kpno):
    eng = os.path.realpath(kpno.nersc('engineering'))
    assert eng != str(kpno.nersc('engineering'))
    spectro, survey = str(kpno.nersc('spectro')), str(kpno.nersc('survey'))
    morning = _config('morning')
    assert [(d.name, d.source, d.destination) for d in morning] == [
        ('nightlogs', '/software/www2/html/nightlogs', f'{survey}/ops/nightlogs'),
        ('endofnight', '/data/focalplane/endofnight', f'{eng}/focalplane/endofnight')]
    include = os.path.join(os.path.dirname(daily.__file__), 'data',
                           'desi_nightlog_transfer_kpno.txt')
    assert morning[0].extra == ['--include-from', include, '--exclude', '*']
    with open(include) as f:
        patterns = [line.strip() for line in f if not line.startswith('#')]
    assert patterns == ['20??????', '*kpno*', 'NightSummary????????.html', 'images/***',
                        'Observers/***']
    noon = _config('noon')
    assert [d.name for d in noon] == NOON
    assert [(d.source, d.destination, d.dirlinks) for d in noon] == [
        ('/data/dts/exposures/lost+found', f'{spectro}/staging/lost+found', True),
        ('/data/focalplane/calibration', f'{eng}/focalplane/calibration', False),
        ('/data/focalplane/logs/calib_logs', f'{eng}/focalplane/logs/calib_logs', False),
        ('/data/focalplane/logs/kpno', f'{eng}/focalplane/logs/kpno', False),
        ('/data/focalplane/logs/sequence_logs', f'{eng}/focalplane/logs/sequence_logs', False),
        ('/data/focalplane/fp_temp_files', f'{eng}/focalplane/hwtables', False)]
    assert noon[-1].extra == ['--include', '*.csv', '--exclude', '*']
    assert all(d.extra == [] for d in noon[:-1])
    with pytest.raises(ValueError):
        _config('evening')


def test_config_needs_desi_root(monkeypatch):
    monkeypatch.delenv('DESI_ROOT', raising=False)
    with pytest.raises(ConfigurationError, match='DESI_ROOT, which is not set'):
        _config('noon')


@pytest.mark.parametrize('text, message', [
    ('', 'no directory section'),
    ('[a]\ntimeframe = evening\nsource = /s\ndestination = /d\n', 'timeframe'),
    ('[a]\ntimeframe = noon\nsource = s\ndestination = /d\n', r'\[a\] source'),
    ('[a]\ntimeframe = noon\nsource = /s\ndestination = ../d\n', r'\[a\] destination'),
    ('[a]\ntimeframe = noon\nsource = /s\n', r'\[a\] destination is missing'),
    ('[a]\ntimeframe = noon\nsource = /s\ndestination = /d\ndirlinks = maybe\n', 'dirlinks'),
    ('[a]\ntimeframe = noon\nsource = /s\ndestination = /d\nincludes = *\n', 'includes'),
    ('[a]\ntimeframe = noon\nsource = /s\ndestination = /d\ninclude_from = nope.txt\n',
     'include_from'),
    ('[a b]\ntimeframe = noon\nsource = /s\ndestination = /d\n', r'\[a b\]'),
    ('[a]\ntimeframe = noon\nsource = /s\ndestination = /d\n'
     '[b]\ntimeframe = morning\nsource = /t\ndestination = /d/\n',
     r'\[b\] destination /d is also the destination of \[a\]'),
    ('[a]\ntimeframe = noon\nsource = /s\ndestination = /d\n[a]\n', 'already exists'),
    ('no section\n', 'no section headers'),
])
def test_bad_configuration(tmp_path, text, message):
    conf = tmp_path / 'daily.ini'
    conf.write_text(text)
    with pytest.raises(ConfigurationError, match=message) as err:
        daily.read_configuration(str(conf))
    assert str(conf) in str(err.value) and '\n' not in str(err.value)


def test_operator_configuration(kpno, tmp_path):
    """An operator's file replaces the shipped one without editing code."""
    conf = tmp_path / 'mine.ini'
    conf.write_text(f"[docs]\ntimeframe = noon\nsource = /data/docs\n"
                    f"destination = {tmp_path}/docs\ninclude = *.pdf\n  *.txt\n")
    (d,) = _config('noon', str(conf))
    assert (d.name, d.source, d.destination, d.extra) == (
        'docs', '/data/docs', f'{tmp_path}/docs',
        ['--include', '*.pdf', '--include', '*.txt', '--exclude', '*'])
    assert _config('morning', str(conf)) == []
    kpno.write('/data/docs/a.pdf')
    kpno.write('/data/docs/b.txt')
    kpno.write('/data/docs/c.doc')
    kpno.nersc('spectro', 'staging', 'status').mkdir(parents=True)
    p = daily_cli(kpno, '--configuration', str(conf), '-P', 'noon')
    assert p.returncode == 0, p.stdout + p.stderr
    assert tree(tmp_path / 'docs') == ['a.pdf', 'b.txt']
    completion = kpno.nersc('spectro', 'staging', 'status', 'daily.txt').read_text()
    assert completion.splitlines()[1:] == ['docs: ok']


def test_lock_leaves_links_alone(tmp_path):
    """Directories 0o2750, files 0o440, only where the mode differs; links are
    never followed, wherever they point; a dangling link stops nothing."""
    top = tmp_path / 'dst'
    (top / 'a' / 'b').mkdir(parents=True)
    outside = tmp_path / 'outside.txt'
    outside.write_text('x')
    outside.chmod(0o666)
    outdir = tmp_path / 'outdir'
    outdir.mkdir()
    outdir.chmod(0o777)
    (top / 'a' / 'dangling').symlink_to('nowhere')
    (top / 'a' / 'out').symlink_to(outside)
    (top / 'a' / 'outdir').symlink_to(outdir)
    for name in ('f1', 'a/f2', 'a/b/f3', 'z'):
        (top / name).write_text(name)
    (top / 'f1').chmod(0o440)
    (top / 'a' / 'b').chmod(0o2750)
    os.mkfifo(top / 'a' / 'fifo', 0o600)
    before = {n: os.lstat(top / n).st_ctime_ns for n in ('f1', 'a/b')}
    time.sleep(0.02)
    d = DailyDirectory('/src', str(top))
    assert d.lock() is True
    for name in ('', 'a', 'a/b'):
        assert mode(top / name) == 0o2750
    for name in ('f1', 'a/f2', 'a/b/f3', 'z'):
        assert mode(top / name) == 0o440
    assert (mode(outside), mode(outdir), mode(top / 'a' / 'fifo')) == (0o666, 0o777, 0o600)
    # Modes already right are not touched again (chmod would change ctime).
    assert {n: os.lstat(top / n).st_ctime_ns for n in ('f1', 'a/b')} == before
    lines = (tmp_path / 'dst.log').read_text().splitlines()
    assert len(lines) == 1 and re.fullmatch(f'DEBUG: Lock complete: {STAMP}', lines[0])


def test_lock_failure_is_reported(tmp_path, monkeypatch):
    """A path that cannot be changed is an error in the log, and the rest is still locked."""
    top = tmp_path / 'dst'
    top.mkdir()
    for name in ('a', 'b'):
        (top / name).write_text(name)
    d = DailyDirectory('/src', str(top))
    refuse_chmod(monkeypatch, '/a')
    assert d.lock() is False
    monkeypatch.undo()
    assert mode(top / 'b') == 0o440
    text = (tmp_path / 'dst.log').read_text()
    assert f'ERROR: {top}/a: Operation not permitted' in text
    assert 'Lock incomplete: 1 path(s)' in text and 'Lock complete' not in text
    assert d.problems == ['lock incomplete (1 path(s))']


def test_missing_fix_permissions_is_an_error_in_the_log(tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path))
    d = DailyDirectory('/src', str(tmp_path / 'dst'))
    assert d.permission() == 127
    text = (tmp_path / 'dst.log').read_text()
    assert f'DEBUG: fix_permissions.sh {tmp_path}/dst\n' in text
    assert "No such file or directory: 'fix_permissions.sh'" in text
    assert re.search(f'ERROR: Permission reset failed: fix_permissions.sh exit status 127: '
                     f'{STAMP}', text)
    assert 'Permission reset complete' not in text
    assert d.problems == ['permission reset failed (fix_permissions.sh exit status 127)']


# ----------------------------------------------------------------------
# desi_daily_transfer against the loopback mountain.
# ----------------------------------------------------------------------
def test_noon(kpno, monkeypatch):
    outside, outdir = noon_mountain(kpno)
    status_dir = kpno.nersc('spectro', 'staging', 'status')
    (status_dir / 'daily.txt').write_text('yesterday\n')
    # While the run goes on, the completion file is gone: the mirror waits.
    seen = kpno.top / 'completion-seen-during-the-run'
    monkeypatch.setenv('RSYNC_RSH', kpno.wrapper(
        'ssh-look', f"if [ -e {status_dir / 'daily.txt'} ]; then touch {seen}; fi",
        match='/calibration/'))
    p = daily_cli(kpno, 'noon')
    assert p.returncode == 0, p.stdout + p.stderr
    assert not seen.exists()
    eng = engineering(kpno, 'focalplane')
    # lost+found: links to exposure directories are followed (dirlinks), links to files skipped.
    assert tree(kpno.nersc('spectro', 'staging', 'lost+found')) == [
        '20240101/', '20240101/00001234/', '20240101/00001234/desi-00001234.fits.fz',
        'notes.txt']
    assert (kpno.nersc('spectro', 'staging', 'lost+found', '20240101', '00001234',
                       'desi-00001234.fits.fz').read_text() == 'fits\n')
    # calibration: links are kept as links, even dangling, but never leading out of the tree.
    assert tree(eng / 'calibration') == [
        'dangling -> does-not-exist', 'fp_calib.json', 'latest.json -> fp_calib.json',
        'sub/', 'sub/deep.txt']
    for name in ('calib_logs', 'kpno', 'sequence_logs'):
        assert tree(eng / 'logs' / name) == [f'{name}-20240101.log']
    # hwtables: only *.csv at the top; near misses and subdirectories stay at the mountain.
    assert tree(eng / 'hwtables') == ['pos.csv']
    # Locked; what the links point to is untouched.
    for top in [eng / 'calibration', eng / 'hwtables',
                kpno.nersc('spectro', 'staging', 'lost+found')]:
        for dirpath, dirnames, filenames in os.walk(top):
            assert mode(dirpath) == 0o2750
            for f in filenames:
                p_ = os.path.join(dirpath, f)
                assert os.path.islink(p_) or mode(p_) == 0o440, p_
    assert (mode(outside), mode(outdir)) == (0o666, 0o777)
    # The completion file: a stamp, then one line per directory.
    lines = (status_dir / 'daily.txt').read_text().splitlines()
    assert re.fullmatch(STAMP, lines[0])
    assert lines[1:] == [f'{n}: ok' for n in NOON]
    # fix_permissions.sh ran on every destination.
    assert kpno.fix_calls() == [[d.destination] for d in _config('noon')]
    # The log of a directory, in order.
    log = (eng / 'calibration.log').read_text().splitlines()
    assert log[0] == f'DEBUG: desi_daily_transfer {__version__}'
    command = shlex.split(log[1][len('DEBUG: '):])
    assert command[0] == '/bin/rsync' and command[1].startswith(f"--rsh={os.environ['RSYNC_RSH']} ")
    assert command[2:] == ['--timeout=600', '--verbose', '--recursive', '--links',
                           '--safe-links', '--times', '--omit-dir-times',
                           'dts:/data/focalplane/calibration/', f'{eng}/calibration/']
    assert re.fullmatch(f'DEBUG: Transfer start: {STAMP}', log[2])
    assert 'fp_calib.json' in log and 'latest.json -> fp_calib.json' in log

    def at(prefix):
        return next(i for i, line in enumerate(log) if line.startswith(prefix))

    order = [at(prefix) for prefix in (
        'DEBUG: desi_daily_transfer ', 'DEBUG: /bin/rsync ', 'DEBUG: Transfer start: ',
        'receiving incremental file list', 'DEBUG: Transfer complete: ',
        'DEBUG: Lock complete: ', f'DEBUG: fix_permissions.sh {eng}/calibration',
        f'fix_permissions.sh: permissions of {eng}/calibration reset',
        'DEBUG: Permission reset complete: ')]
    assert order == list(range(4)) + sorted(order[4:]) and order[4] > 4
    assert all(re.fullmatch(f'DEBUG: [A-Za-z ]+: {STAMP}', log[i]) for i in order[4:6])
    # A second run copies nothing new, changes no mode, appends to each log.
    before = snapshot(eng)
    p = daily_cli(kpno, 'noon', '-P')
    assert p.returncode == 0, p.stdout + p.stderr
    after = snapshot(eng)
    logs = [k for k in after if k.endswith('.log')]
    assert {k: v for k, v in after.items() if k not in logs} == \
        {k: v for k, v in before.items() if k not in logs}
    assert (eng / 'calibration.log').read_text().count('DEBUG: Transfer start') == 2
    assert len(kpno.fix_calls()) == len(NOON)


def test_morning(kpno):
    arrive = morning_mountain(kpno)
    status = kpno.nersc('spectro', 'staging', 'status')
    status.mkdir(parents=True)
    (status / 'daily.txt').write_text('yesterday\n')
    p = daily_cli(kpno, 'morning')
    assert p.returncode == 0, p.stdout + p.stderr
    expected = set(arrive)
    for name in arrive:
        parts = name.split('/')
        expected |= {'/'.join(parts[:i]) + '/' for i in range(1, len(parts))}
    assert tree(kpno.nersc('survey', 'ops', 'nightlogs')) == sorted(expected)
    assert tree(engineering(kpno, 'focalplane', 'endofnight')) == ['20240101/',
                                                                   '20240101/fp.dat']
    # The morning run leaves the completion file alone.
    assert (status / 'daily.txt').read_text() == 'yesterday\n'


def test_failures_do_not_stop_the_others(kpno, smtp_server, monkeypatch):
    """Two directories fail with different statuses: the others are still
    copied, the exit status is the first failure's, one alert names both."""
    noon_mountain(kpno)
    kpno.path('/data/focalplane/calibration').rename(kpno.top / 'gone')
    monkeypatch.setenv('RSYNC_RSH', kpno.wrapper('ssh-down-for-kpno', 'exit 255',
                                                 match='/logs/kpno/'))
    p = daily_cli(kpno, 'noon', alert=smtp_server)
    assert p.returncode == 23, p.stdout + p.stderr
    eng = engineering(kpno, 'focalplane')
    assert tree(eng / 'logs' / 'sequence_logs') == ['sequence_logs-20240101.log']
    assert tree(eng / 'hwtables') == ['pos.csv']
    lines = kpno.nersc('spectro', 'staging', 'status', 'daily.txt').read_text().splitlines()
    # ssh failing: rsync says 255 or 12 (protocol stream), whichever it notices first.
    lines[4] = re.sub(r'status (255|12); see .*/logs/kpno.log$', 'status 255; see LOG', lines[4])
    assert lines[1:] == [
        'lost+found: ok',
        f'calibration: failed: rsync exit status 23; see {eng}/calibration.log',
        'calib_logs: ok',
        'kpno: failed: rsync exit status 255; see LOG',
        'sequence_logs: ok', 'hwtables: ok']
    assert 'ERROR: rsync exit status 23;' in (eng / 'calibration.log').read_text()
    assert not (eng / 'calibration').exists()
    # Only the directories that were copied are locked and opened to the collaboration.
    assert [c[0] for c in kpno.fix_calls()] == [
        d.destination for d in _config('noon') if d.name not in ('calibration', 'kpno')]
    assert smtp_server.wait(1)
    (message,) = smtp_server.messages
    assert message['Subject'] == 'Error reported by desi_daily_transfer!'
    body = message.get_content()
    assert '2 of 6 directories failed' in body
    assert f'calibration (failed: rsync exit status 23; see {eng}/calibration.log)' in body
    assert re.search(f'kpno \\(failed: rsync exit status (255|12); see {eng}/logs/kpno.log\\)',
                     body)


def test_mountain_down(kpno, smtp_server, monkeypatch):
    noon_mountain(kpno)
    monkeypatch.setenv('RSYNC_RSH', kpno.wrapper('ssh-down', 'exit 255'))
    p = daily_cli(kpno, 'noon', alert=smtp_server)
    assert p.returncode in (12, 255)
    lines = kpno.nersc('spectro', 'staging', 'status', 'daily.txt').read_text().splitlines()
    assert all(re.search(': failed: rsync exit status (255|12); see ', line)
               for line in lines[1:])
    assert lines[1].endswith(f'status {p.returncode:d}; see '
                             f"{kpno.nersc('spectro', 'staging', 'lost+found.log')}")
    assert len(lines) == 7 and kpno.fix_calls() == []
    assert smtp_server.wait(1) and '6 of 6 directories failed' in \
        smtp_server.messages[0].get_content()


def test_garbage_from_the_mountain(kpno, monkeypatch):
    noon_mountain(kpno)
    monkeypatch.setenv('RSYNC_RSH', kpno.wrapper('ssh-garbage', "printf 'Welcome!\\n\\n'",
                                                 match='/calibration/'))
    p = daily_cli(kpno, 'noon')
    assert p.returncode not in (0, 23)
    lines = kpno.nersc('spectro', 'staging', 'status', 'daily.txt').read_text().splitlines()
    assert lines[2].startswith('calibration: failed: rsync exit status ')
    assert [line for line in lines[1:] if line.endswith(': ok')] == [
        f'{n}: ok' for n in NOON if n != 'calibration']


def test_kill_file_first(kpno):
    """The kill file is looked at before anything: the completion file stays."""
    noon_mountain(kpno)
    completion = kpno.nersc('spectro', 'staging', 'status', 'daily.txt')
    completion.write_text('yesterday\n')
    kpno.kill.touch()
    before = snapshot(kpno.top / 'nersc')
    p = daily_cli(kpno, 'noon')
    assert p.returncode == 0 and f'{kpno.kill} exists' in p.stdout
    assert snapshot(kpno.top / 'nersc') == before


def test_kill_file_during_the_run(kpno, monkeypatch):
    """The kill file stops a running rsync within seconds; the directories not
    done are said so in the completion file, which is still written."""
    noon_mountain(kpno)
    monkeypatch.setenv('RSYNC_RSH', kpno.wrapper('ssh-slow', f'touch {kpno.kill}; sleep 30',
                                                 match='/calibration/'))
    t0 = time.monotonic()
    p = daily_cli(kpno, 'noon')
    assert time.monotonic() - t0 < 15
    assert p.returncode == 0, p.stdout + p.stderr
    lines = kpno.nersc('spectro', 'staging', 'status', 'daily.txt').read_text().splitlines()
    eng = engineering(kpno, 'focalplane')
    assert lines[1:] == ['lost+found: ok',
                         f'calibration: stopped during the transfer ({kpno.kill} exists); '
                         f'see {eng}/calibration.log'] + \
        [f'{n}: not transferred (stopped: {kpno.kill} exists)' for n in NOON[2:]]
    assert not (eng / 'calibration').exists() and not (eng / 'hwtables').exists()
    assert 'Stopped on request.' in (eng / 'calibration.log').read_text()
    assert 'CRITICAL' not in p.stdout


def test_second_run_refused(kpno):
    noon_mountain(kpno)
    completion = kpno.nersc('spectro', 'staging', 'status', 'daily.txt')
    completion.write_text('yesterday\n')
    lock_file = kpno.nersc('spectro', 'staging', 'desi_daily_transfer_noon.lock')
    lock, holder = single_instance(str(lock_file))
    try:
        p = daily_cli(kpno, 'noon')
        assert p.returncode == 1
        (line,) = p.stdout.splitlines()
        assert f'Another desi_daily_transfer noon (pid {os.getpid()}) is still running' in line
        assert completion.read_text() == 'yesterday\n'
        assert not engineering(kpno, 'focalplane', 'calibration').exists()
        # The morning run is another lock.
        p = daily_cli(kpno, 'morning')
        assert 'still running' not in p.stdout
    finally:
        lock.close()


def test_test_mode_changes_nothing(kpno):
    noon_mountain(kpno)
    kpno.nersc('spectro', 'staging', 'status', 'daily.txt').write_text('yesterday\n')
    before = snapshot(kpno.top)
    p = daily_cli(kpno, '--test', 'noon')
    assert p.returncode == 0, p.stdout + p.stderr
    assert snapshot(kpno.top) == before
    # One rsync for each directory, and one for the link lost+found follows:
    # the links are listed at the mountain (a question), the copies only said.
    assert p.stdout.count('Test mode, would run: /bin/rsync') == 7
    assert re.search(r"Test mode, would run: /bin/rsync .* '--include=/00001234/\*\*\*' "
                     r"'--exclude=\*' dts:\S*/data/dts/exposures/raw/20240101/ "
                     r"\S*/lost\+found/20240101/\n", p.stdout)
    assert p.stdout.count('Test mode, would run: fix_permissions.sh') == 6
    assert p.stdout.count('Test mode, would lock ') == 6
    assert 'Test mode, would take the lock ' in p.stdout
    assert 'would remove' in p.stdout and 'would write' in p.stdout and 'Wrote' not in p.stdout


def test_only(kpno):
    noon_mountain(kpno)
    completion = kpno.nersc('spectro', 'staging', 'status', 'daily.txt')
    completion.write_text('yesterday\n')
    p = daily_cli(kpno, '--only', 'hwtables', 'noon')
    assert p.returncode == 0, p.stdout + p.stderr
    eng = engineering(kpno, 'focalplane')
    assert tree(eng / 'hwtables') == ['pos.csv'] and not (eng / 'calibration').exists()
    assert completion.read_text() == 'yesterday\n'
    p = daily_cli(kpno, '--only', 'hwtables', 'morning')
    assert p.returncode == 2
    assert 'no such morning directory; choose from nightlogs, endofnight' in p.stdout


def test_bad_configuration_from_cron(kpno, smtp_server, tmp_path):
    """A configuration that cannot be used is one CRITICAL line, emailed, and nothing changes."""
    conf = tmp_path / 'broken.ini'
    conf.write_text('[a]\ntimeframe = noon\nsource = relative\ndestination = /d\n')
    completion = kpno.nersc('spectro', 'staging', 'status', 'daily.txt')
    completion.parent.mkdir(parents=True)
    completion.write_text('yesterday\n')
    before = snapshot(kpno.top / 'nersc')
    p = daily_cli(kpno, '--configuration', str(conf), 'noon', alert=smtp_server)
    assert p.returncode == 1
    (line,) = p.stdout.splitlines()
    assert line.startswith('CRITICAL:') and f'{conf}: [a] source' in line
    assert snapshot(kpno.top / 'nersc') == before
    assert smtp_server.wait(1)
    env = {k: v for k, v in os.environ.items() if k != 'DESI_ROOT'}
    p = daily_cli(kpno, 'noon', env=env)
    assert p.returncode == 1 and 'DESI_ROOT, which is not set' in p.stdout


def test_hung_rsync_times_out(kpno, monkeypatch):
    kpno.write('/data/focalplane/calibration/a.txt')
    monkeypatch.setenv('RSYNC_RSH', kpno.wrapper('ssh-hang', 'sleep 30'))
    monkeypatch.setattr(daily, 'RSYNC_TIMEOUT', 1)
    dest = engineering(kpno, 'focalplane', 'calibration')
    dest.parent.mkdir(parents=True)
    d = DailyDirectory('/data/focalplane/calibration', str(dest))
    t0 = time.monotonic()
    assert d.transfer() == -9
    assert time.monotonic() - t0 < 10
    text = (dest.parent / 'calibration.log').read_text()
    assert 'Timed out after 1 seconds and was killed.' in text
    assert 'Lock complete' not in text and not dest.exists()
    assert daily._exit_status(-9) == 137 and daily._exit_status(23) == 23


def test_full_disk(kpno, tmp_path):
    """A file-size limit standing in for a full disk: rsync fails to write
    there, the directory is reported failed, nothing is locked, the others go on."""
    noon_mountain(kpno)
    kpno.write('/data/focalplane/calibration/big.fits', 'x' * 200_000)
    p = subprocess.run(['prlimit', '--fsize=100000', 'desi_daily_transfer', '--kill',
                        str(kpno.kill), '--alert-to', '', 'noon'],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 11, p.stdout + p.stderr
    eng = engineering(kpno, 'focalplane')
    lines = kpno.nersc('spectro', 'staging', 'status', 'daily.txt').read_text().splitlines()
    assert lines[2] == f'calibration: failed: rsync exit status 11; see {eng}/calibration.log'
    assert 'big.fits": File too large' in (eng / 'calibration.log').read_text()
    assert lines[3:] == [f'{n}: ok' for n in NOON[2:]]
    assert not (eng / 'calibration' / 'big.fits').exists()
    assert str(eng / 'calibration') not in [c[0] for c in kpno.fix_calls()]


def test_sigterm_during_the_run(kpno, monkeypatch):
    """SIGTERM stops a running rsync at once, like the kill file."""
    noon_mountain(kpno)
    started = kpno.top / 'calibration-started'
    monkeypatch.setenv('RSYNC_RSH', kpno.wrapper('ssh-slow', f'touch {started}; sleep 30',
                                                 match='/calibration/'))
    proc = subprocess.Popen(['desi_daily_transfer', '--kill', str(kpno.kill), '--alert-to', '',
                             'noon'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    lines = kpno.nersc('spectro', 'staging', 'status', 'daily.txt').read_text().splitlines()
    assert lines[2].startswith('calibration: stopped during the transfer (SIGTERM received)')
    assert lines[-1] == 'hwtables: not transferred (stopped: SIGTERM received)'
