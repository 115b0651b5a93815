# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of desitransfer.common, the rsync scanners against real rsync output."""
import datetime as dt
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import desitransfer
from desitransfer import alerts, common, files, processes, text, transport
from desitransfer.common import (empty_rsync, ensure_scratch, exclude_years, idle_time,
                                 new_exposures, rsync, stamp, today, valid_night, yesterday)
from desitransfer.runner import Result, run
from desitransfer.transport import rsync_ssh, ssh_command
from desitransfer.mountain import Mountain
from desitransfer.processes import Stop
from desitransfer.rsynccommand import RSYNC_DONE, RSYNC_OK, RSYNC_VANISHED, rsync_command
from desitransfer.simulator import make_exposure


def at(monkeypatch, *args):
    """Pretend the time (UTC) is dt.datetime(*args)."""
    t = dt.datetime(*args, tzinfo=dt.timezone.utc)
    monkeypatch.setattr(common, '_utcnow', lambda: t)


def test_constants():
    assert common.dir_perm == 0o2750
    assert common.file_perm == 0o440
    assert common.MST.zone == 'America/Phoenix'


def test_rsync_command():
    assert rsync('/src', '/dst') == ['/bin/rsync', '--verbose', '--recursive',
                                     '--copy-dirlinks', '--times', '--omit-dir-times',
                                     'dts:/src/', '/dst/']
    assert rsync('/src', '/dst', test=True)[:3] == ['/bin/rsync', '--dry-run', '--verbose']
    assert rsync('/src', '/dst', config='foo', reverse=True)[-2:] == ['/src/', 'foo:/dst/']
    assert rsync('/src', '/dst', config=None)[-2:] == ['/src/', '/dst/']


def test_rsync_ssh():
    c = rsync_ssh(rsync('/a', '/b'), ssh_command('/x/my ssh'))
    assert c[0] == '/bin/rsync'
    assert c[1].startswith("--rsh='/x/my ssh' -o BatchMode=yes")
    assert c[2:] == rsync('/a', '/b')[1:]
    assert 'ControlPath=/tmp/c' in ' '.join(ssh_command('ssh', control='/tmp/c'))
    t = rsync_ssh(rsync('/a', '/b'), ['ssh'], io_timeout=600)
    assert t[:3] == ['/bin/rsync', '--rsh=ssh', '--timeout=600'] and t[3:] == c[2:]


def test_exclude_years(monkeypatch):
    at(monkeypatch, 2021, 3, 1, 12)
    assert exclude_years(2018) == ['--exclude', '2018*', '--exclude', '2019*',
                                   '--exclude', '2020*']
    assert exclude_years(2021) == []


@pytest.mark.parametrize('out,empty', [
    ('receiving incremental file list\n\nsent 20 bytes  received 91 bytes  '
     '222.00 bytes/sec\ntotal size is 1,234,567  speedup is 11,122.23\n', True),
    ('receiving incremental file list\n\nsent 20 bytes  received 91 bytes  '
     '222.00 bytes/sec\ntotal size is 4  speedup is 0.04 (DRY RUN)\n', True),
    ('receiving incremental file list\n20200101/\n20200101/00012345/\n'
     '20200101/00012345/desi-00012345.fits.fz\n\nsent 1,020 bytes  received 1,091 bytes  '
     '222.00 bytes/sec\ntotal size is 4  speedup is 0.04\n', False),
    ('', True),
])
def test_empty_rsync_strings(out, empty):
    assert empty_rsync(out) is empty


def test_new_exposures_strings():
    out = ('receiving incremental file list\n00012345/\n00012345/a.fits\n'
           '00012346/b.json\nfoo/00012347/c\n0001234/d\n\nsent 1,020 bytes\n')
    assert new_exposures(out) == {'00012345', '00012346'}
    assert new_exposures('') == set()


@pytest.fixture
def tree(tmp_path):
    """A night of nightwatch-like output: NIGHT/EXPID/files."""
    src = tmp_path / 'src'
    for expid in ('00001000', '00001001'):
        make_exposure(str(src / 'data'), str(src / 'dts'), '20201231', expid)
    return tmp_path


def _rsync_twice(command_for, dst):
    """Run the rsync given by command_for(dry_run) as dry-run, for real, and again."""
    outputs = []
    for dry in (True, False, True, False):
        p = subprocess.run(command_for(dry), capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        outputs.append(p.stdout)
    return outputs


def test_scanners_real_local_rsync(tree):
    """Local copies print 'sending incremental file list'."""
    src = str(tree / 'src' / 'data' / '20201231')
    dst = str(tree / 'dst')
    dry, real, dry2, real2 = _rsync_twice(lambda t: rsync(src, dst, test=t, config=None),
                                          dst)
    assert 'sending incremental file list' in dry
    assert '(DRY RUN)' in dry
    assert not empty_rsync(dry) and not empty_rsync(real)
    assert new_exposures(dry) == new_exposures(real) == {'00001000', '00001001'}
    assert empty_rsync(dry2) and empty_rsync(real2)
    assert new_exposures(dry2) == set()
    # One late file in one exposure.
    (tree / 'src' / 'data' / '20201231' / '00001001' / 'late.fits').write_bytes(b'x' * 5000)
    p = subprocess.run(rsync(src, dst, test=True, config=None), capture_output=True,
                       text=True)
    assert not empty_rsync(p.stdout)
    assert new_exposures(p.stdout) == {'00001001'}


def test_scanners_real_ssh_rsync(tree, dts):
    """Pulls over ssh print 'receiving incremental file list' and big numbers with commas."""
    src = tree / 'src' / 'data' / '20201231'
    (src / '00001000' / 'big.fits').write_bytes(os.urandom(1_500_000))
    dst = str(tree / 'dst')
    ssh = ssh_command(dts.ssh)
    dry, real, dry2, real2 = _rsync_twice(
        lambda t: rsync_ssh(rsync(str(src), dst, test=t, config=dts.host), ssh), dst)
    assert 'receiving incremental file list' in dry
    assert ',' in real  # thousands separators: total size is 1,5xx,xxx
    assert not empty_rsync(dry) and not empty_rsync(real)
    assert new_exposures(real) == {'00001000', '00001001'}
    assert empty_rsync(dry2), dry2
    assert empty_rsync(real2), real2
    os.utime(src / '00001000' / 'big.fits', (time.time() + 100, time.time() + 100))
    p = subprocess.run(rsync_ssh(rsync(str(src), dst, test=True, config=dts.host), ssh),
                       capture_output=True, text=True)
    assert not empty_rsync(p.stdout)
    assert new_exposures(p.stdout) == {'00001000'}


@pytest.mark.parametrize('utc,night,previous', [
    # yesterday(): the calendar date before today at Kitt Peak (MST).
    ((2020, 1, 24, 18, 59, 59), '20200123', '20200123'),
    ((2020, 1, 24, 19, 0, 0), '20200124', '20200123'),
    ((2021, 1, 1, 5, 0, 0), '20201231', '20201230'),
    ((2021, 1, 1, 7, 0, 0), '20201231', '20201231'),
    ((2021, 1, 1, 19, 0, 1), '20210101', '20201231'),
    ((2020, 3, 1, 18, 0, 0), '20200229', '20200229'),
    # US DST starts 2021-03-14; Arizona (and the DESI night) does not care.
    ((2021, 3, 14, 18, 59, 0), '20210313', '20210313'),
    ((2021, 3, 14, 19, 1, 0), '20210314', '20210313'),
    ((2021, 11, 7, 19, 0, 0), '20211107', '20211106'),
])
def test_today_yesterday(monkeypatch, utc, night, previous):
    at(monkeypatch, *utc)
    assert today() == night
    assert yesterday() == previous


def test_today_ignores_host_timezone(monkeypatch):
    at(monkeypatch, 2021, 3, 14, 19, 30)
    for tz in ('UTC', 'Pacific/Kiritimati', 'America/Los_Angeles'):
        monkeypatch.setenv('TZ', tz)
        time.tzset()
        assert today() == '20210314'
    monkeypatch.delenv('TZ')
    time.tzset()


def test_today_real_clock():
    t = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=19)
    assert today() in (t.strftime('%Y%m%d'),
                       (t + dt.timedelta(seconds=5)).strftime('%Y%m%d'))


def test_stamp(monkeypatch):
    at(monkeypatch, 2021, 7, 1, 12, 0, 0)
    assert stamp() == '2021-07-01 05:00:00 PDT'
    assert stamp('America/Phoenix') == '2021-07-01 05:00:00 MST'
    at(monkeypatch, 2021, 1, 1, 12, 0, 0)
    assert stamp() == '2021-01-01 04:00:00 PST'


@pytest.mark.parametrize('utc,expected', [
    ((2021, 6, 1, 16, 0, 0), 3 * 3600),      # 09:00 MST: 3 h to go
    ((2021, 6, 1, 18, 59, 0), 60),           # 11:59 MST
    ((2021, 6, 1, 19, 0, 0), -(20 * 3600)),  # 12:00 MST: next start tomorrow 08:00
    ((2021, 6, 1, 14, 30, 0), -(30 * 60)),   # 07:30 MST: starts in 30 min
])
def test_idle_time(monkeypatch, utc, expected):
    at(monkeypatch, *utc)
    assert idle_time() == expected


def test_idle_time_tz(monkeypatch):
    at(monkeypatch, 2021, 6, 1, 16, 0, 0)  # 09:00 PDT in summer
    assert idle_time(tz='US/Pacific') == 3 * 3600
    assert idle_time(start=0, end=24, tz='UTC') == 8 * 3600
    assert idle_time(start=17, end=18, tz='UTC') == -3600


def test_valid_night():
    assert valid_night('20200229')
    for bad in ('20190229', '2020010', '202001011', '20201301', 'abcdefgh', None, 20200101):
        assert not valid_night(bad)


def test_ensure_scratch(tmp_path):
    a = tmp_path / 'a'
    b = tmp_path / 'b'
    b.mkdir()
    assert ensure_scratch([str(a), str(b)]) == str(b)
    a.mkdir()
    assert ensure_scratch([str(a), str(b)]) == str(a)
    with pytest.raises(FileNotFoundError, match='tried: .*/x, .*/y'):
        ensure_scratch([str(tmp_path / 'x'), str(tmp_path / 'y')])


def test_run(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    r = run([sys.executable, '-c', 'import sys; print("out"); print("err", file=sys.stderr)'])
    assert r == (0, 'out\n', 'err\n')
    assert 'Running: ' + sys.executable in caplog.text
    r = run(['sh', '-c', 'echo "$0" $$ > pid; exit 3', 'a;b'], cwd=str(tmp_path))
    assert r.returncode == 3
    assert (tmp_path / 'pid').read_text().startswith('a;b ')  # no shell interpretation
    assert 'return code 3' in caplog.text
    assert run(['sh', '-c', 'exit 24'], ok=(0, 24)).returncode == 24
    r = run(['/nonexistent/program'])
    assert r.returncode == 127


def test_run_test_mode(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    r = run(['touch', str(tmp_path / 'x')], test=True)
    assert r.returncode == 0
    assert not (tmp_path / 'x').exists()
    assert f"Test mode, would run: touch {tmp_path}/x" in caplog.text


def test_run_timeout_kills_children(tmp_path):
    """A hung command and the processes it started are killed."""
    marker = tmp_path / 'child'
    t0 = time.monotonic()
    r = run(['sh', '-c', f'(sleep 30; touch {marker}) & sleep 30'], timeout=1)
    assert time.monotonic() - t0 < 10
    assert r.returncode == -9
    assert 'Timed out after 1 seconds' in r.stderr
    out = subprocess.run(['pgrep', '-f', f'touch {marker}'], capture_output=True, text=True)
    assert out.stdout.strip() == ''


def test_daemon_popen():
    from desitransfer.daemon import _popen
    assert _popen(['sh', '-c', 'echo hi; echo ho >&2; exit 2']) == ('2', 'hi\n', 'ho\n')


def _console_scripts():
    """The console scripts declared in setup.cfg."""
    import configparser
    parser = configparser.ConfigParser()
    parser.read(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'setup.cfg'))
    lines = parser['options.entry_points']['console_scripts'].strip().splitlines()
    return dict(line.replace(' ', '').split('=') for line in lines)


def test_console_scripts_and_bin():
    """Every console script has its thin bin/ script, and the other way round."""
    scripts = _console_scripts()
    assert len(scripts) == 9
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert sorted(os.listdir(os.path.join(top, 'bin'))) == sorted(scripts)
    for name, target in scripts.items():
        module, function = target.split(':')
        with open(os.path.join(top, 'bin', name)) as f:
            assert f'from {module} import {function}' in f.read(), name


@pytest.mark.parametrize('command', sorted(_console_scripts()))
def test_commands_version(command):
    from desitransfer import __version__
    exe = shutil.which(command)
    assert exe is not None, f'{command} is not installed'
    p = subprocess.run([exe, '--version'], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    assert p.stdout.strip() == f'{command} {__version__}'
    p = subprocess.run([exe, '--help'], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and 'usage:' in p.stdout


def test_run_stop_event(tmp_path):
    """A stop request terminates a running command and the processes it started."""
    import threading
    marker = tmp_path / 'child'
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    r = run(['sh', '-c', f'(sleep 30; touch {marker}) & sleep 30'], stop=stop)
    assert time.monotonic() - t0 < 5
    assert r.returncode == -15
    assert 'Stopped on request' in r.stderr
    out = subprocess.run(['pgrep', '-f', f'touch {marker}'], capture_output=True, text=True)
    assert out.stdout.strip() == ''
    # Without a stop request, output is complete however long the command takes.
    r = run([sys.executable, '-c', 'import time; print("a"); time.sleep(1.5); print("b")'],
            stop=threading.Event())
    assert r == (0, 'a\nb\n', '')


def test_stop_wakes_a_running_command_at_once():
    """A :class:`Stop` set while a command runs ends it at once, not at the
    next of the runner's looks (every half second): its waker pipe wakes it."""
    import threading
    from desitransfer.processes import Waker
    woken = Waker()
    woken.wake()
    assert select.select([woken], [], [], 0)[0] == [woken]  # woken before its pipe exists
    woken.close()
    for _ in range(3):
        stop = Stop()
        threading.Timer(0.05, stop.set).start()
        t0 = time.monotonic()
        r = run(['sleep', '30'], stop=stop)
        assert r.returncode == -15 and time.monotonic() - t0 < 0.4


def test_stop_kill_file_and_wait(tmp_path):
    kill = tmp_path / 'stop'
    stop = processes.Stop(str(kill), interval=0.05)
    assert not stop.is_set()
    t0 = time.monotonic()
    assert stop.wait(0.2) is False
    assert time.monotonic() - t0 >= 0.2
    # The kill file ends a long sleep within the interval.
    import threading
    threading.Timer(0.2, kill.touch).start()
    t0 = time.monotonic()
    assert stop.wait(60) is True
    assert time.monotonic() - t0 < 2
    assert stop.is_set() and str(kill) in stop.reason


def test_stop_signal_and_run(tmp_path):
    import signal as signal_
    stop = processes.Stop(str(tmp_path / 'stop'), interval=0.05)
    old = signal_.getsignal(signal_.SIGTERM)
    try:
        stop.handle_signals()
        os.kill(os.getpid(), signal_.SIGTERM)
        assert stop.wait(5) is True
        assert stop.reason == 'SIGTERM received'
    finally:
        signal_.signal(signal_.SIGTERM, old)
    # A command under run() ends when the kill file appears.
    stop = processes.Stop(str(tmp_path / 'stop2'))
    import threading
    threading.Timer(0.3, (tmp_path / 'stop2').touch).start()
    t0 = time.monotonic()
    result = run(['sleep', '30'], stop=stop)
    assert result.returncode == -15 and time.monotonic() - t0 < 5


def test_single_instance(tmp_path):
    path = str(tmp_path / 'sub' / 'x.lock')
    lock, holder = processes.single_instance(path)
    assert lock is not None and holder is None
    with open(path) as f:
        assert f.read().strip() == str(os.getpid())
    # Another process is refused while we hold it, and told our pid.
    code = ('import sys; from desitransfer.processes import single_instance; '
            f'l, h = single_instance({path!r}); print(h); sys.exit(0 if l else 3)')
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert p.returncode == 3 and p.stdout.strip() == str(os.getpid())
    lock.close()
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == 'None'


def test_environment_ssh(monkeypatch):
    monkeypatch.delenv('RSYNC_RSH', raising=False)
    assert transport.environment_ssh()[:3] == ['ssh', '-o', 'BatchMode=yes']
    monkeypatch.setenv('RSYNC_RSH', '/x/ssh -F "/a b/config"')
    c = transport.environment_ssh(control='/tmp/c')
    assert c[:3] == ['/x/ssh', '-F', '/a b/config'] and 'ControlPath=/tmp/c' in c


def test_write_json_and_sweep(tmp_path):
    path = str(tmp_path / 'state.json')
    files.write_json(path, {'a': 1})
    assert os.listdir(tmp_path) == ['state.json']
    # A temporary file of a writer that is gone, and one of a live process.
    dead = subprocess.Popen(['true'])
    dead.wait()
    stale = tmp_path / f'.state.json.{dead.pid}.tmp'
    stale.write_text('{')
    live = tmp_path / f'.state.json.{os.getpid()}.tmp'
    live.write_text('{')
    other = tmp_path / 'notes.tmp'
    other.write_text('x')
    assert files.sweep_temporary(str(tmp_path)) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, 'notes.tmp', 'state.json'])
    assert files.sweep_temporary(str(tmp_path / 'missing')) == []


def test_write_text(tmp_path):
    path = tmp_path / 'daily.txt'
    files.write_text(str(path), 'one\n')
    files.write_text(str(path), 'two\nlines\n')
    assert path.read_text() == 'two\nlines\n' and os.listdir(tmp_path) == ['daily.txt']
    # A write that fails (here the rename over a directory) leaves no temporary file.
    (tmp_path / 'taken').mkdir()
    with pytest.raises(OSError):
        files.write_text(str(tmp_path / 'taken'), 'x')
    assert sorted(os.listdir(tmp_path)) == ['daily.txt', 'taken']
    with pytest.raises(OSError):
        files.write_text(str(tmp_path / 'missing' / 'x.txt'), 'x')


def test_shared_connection(dts, monkeypatch):
    """Commands share one ssh connection; close() ends it and removes its directory."""
    monkeypatch.setenv('RSYNC_RSH', dts.ssh)
    connection = transport.SharedConnection()
    ssh = connection.ssh()
    assert ssh[0] == dts.ssh and 'ControlMaster=auto' in ssh
    control = [o.split('=', 1)[1] for o in ssh if o.startswith('ControlPath=')][0]
    assert connection.ssh() == ssh
    assert run(ssh + ['dts', 'true']).returncode == 0
    assert os.path.exists(control)
    # The master answers a check on the same socket.
    assert run(ssh + ['-O', 'check', 'dts']).returncode == 0
    assert run(rsync_ssh(['rsync', '--list-only', 'dts:/'], ssh)).returncode == 0
    connection.close()
    assert not os.path.exists(os.path.dirname(control))
    connection.close()
    # A connection never used leaves nothing behind.
    transport.SharedConnection().close()
    # The directory of a process killed before close() is removed by the next one.
    dead = subprocess.Popen(['true'])
    dead.wait()
    stale = tempfile.mkdtemp(prefix=f'desitransfer-ssh-{dead.pid:d}-')
    mine = tempfile.mkdtemp(prefix=f'desitransfer-ssh-{os.getpid():d}-')
    connection = transport.SharedConnection()
    assert os.path.basename(os.path.dirname(control)).startswith(
        f'desitransfer-ssh-{os.getpid()}-')
    connection.ssh()
    assert not os.path.exists(stale) and os.path.isdir(mine)
    connection.close()
    os.rmdir(mine)
    # Another ssh program than RSYNC_RSH's.
    monkeypatch.delenv('RSYNC_RSH')
    connection = transport.SharedConnection(program=[dts.ssh, '-q'])
    ssh = connection.ssh()
    assert ssh[:3] == [dts.ssh, '-q', '-o'] and run(ssh + ['dts', 'true']).returncode == 0
    connection.close()


def test_alert_options():
    from argparse import ArgumentParser
    parser = ArgumentParser()
    alerts.alert_options(parser)
    o = parser.parse_args([])
    assert (o.alert_to, o.smtp) == (['desi-alarms-transfer@desi.lbl.gov'], 'localhost:25')
    o = parser.parse_args(['--alert-to', 'a@b.org, c@d.org', '--smtp', 'mail:2525'])
    assert (o.alert_to, o.smtp) == (['a@b.org', 'c@d.org'], 'mail:2525')
    assert parser.parse_args(['--alert-to', '']).alert_to == []
    for bad in (['--alert-to', 'nobody'], ['--smtp', 'a:b'], ['--smtp', 'a b']):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_lstat_tree(tmp_path, unprivileged):
    """Every entry below a directory, links not followed; unreadable parts said."""
    import json
    import stat
    top = tmp_path / 'exposure'
    (top / 'sub' / 'deeper').mkdir(parents=True)
    (top / 'a.fits').write_bytes(b'x' * 10)
    (top / 'sub' / 'b.fits').write_bytes(b'y' * 3)
    (top / 'link').symlink_to('/etc')
    (top / 'sub' / 'deeper' / 'c').write_text('c')
    entries, problems = files.lstat_tree(str(top))
    assert sorted(entries) == ['a.fits', 'link', 'sub', 'sub/b.fits', 'sub/deeper',
                               'sub/deeper/c']
    assert entries['a.fits'].st_size == 10 and entries['sub/b.fits'].st_size == 3
    assert stat.S_ISLNK(entries['link'].st_mode) and stat.S_ISDIR(entries['sub'].st_mode)
    assert problems == []
    assert files.lstat_tree(str(tmp_path / 'missing')) == (
        {}, [f'{tmp_path}/missing cannot be listed: No such file or directory'])
    # A subdirectory that cannot be read, as an unprivileged user.
    d = unprivileged.directory()
    script = ("import json, os, sys; from desitransfer.files import lstat_tree; "
              "os.makedirs(sys.argv[1] + '/e/locked'); open(sys.argv[1] + '/e/f', 'w').close(); "
              "os.chmod(sys.argv[1] + '/e/locked', 0); "
              "e, p = lstat_tree(sys.argv[1] + '/e'); print(json.dumps([sorted(e), p]))")
    p = subprocess.run(unprivileged.command('-c', script, d), env=unprivileged.env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == [['f', 'locked'],
                                    [f'{d}/e/locked cannot be listed: Permission denied']]


@pytest.mark.parametrize('module', sorted(
    'desitransfer.' + os.path.relpath(os.path.join(d, f), os.path.dirname(desitransfer.__file__))
    .replace(os.sep, '.')[:-3].replace('.__init__', '')
    for d, _, files in os.walk(os.path.dirname(desitransfer.__file__))
    for f in files if f.endswith('.py')))
def test_import_alone(module):
    """Every module imports first in a fresh interpreter (no import cycle
    hidden by the order in which the tests import them)."""
    p = subprocess.run([sys.executable, '-c', f'import {module}'],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_round_trip(dts, tmp_path):
    """The round trip over ssh is measured by exchanging lines with cat; a
    host that cannot be reached, or a program that does not answer, is
    None, within the time given."""
    rtt = transport.round_trip([dts.ssh], 'dts')
    assert rtt is not None and 0 < rtt < 1
    assert transport.round_trip([dts.ssh, '-o', 'ConnectTimeout=2'], 'nowhere.invalid') is None
    silent = tmp_path / 'silent'
    silent.write_text('#!/bin/sh\nexec sleep 60\n')
    silent.chmod(0o755)
    t0 = time.monotonic()
    assert transport.round_trip([str(silent)], 'dts', timeout=1) is None
    assert time.monotonic() - t0 < 5
    assert transport.round_trip([str(tmp_path / 'missing')], 'dts') is None
    # A program that stops reading after the first line: the next cannot be
    # written (broken pipe).
    deaf = tmp_path / 'deaf'
    deaf.write_text('#!/bin/sh\nread line\nexec 0<&-\necho "$line"\nsleep 5\n')
    deaf.chmod(0o755)
    assert transport.round_trip([str(deaf)], 'dts', timeout=2) is None


@pytest.mark.parametrize('value, bare, seconds', [
    ('30s', 1, 30), ('15m', 1, 900), ('1h', 60, 3600), ('2d', 1, 172800), ('1.5m', 1, 90),
    ('30', 1, 30), ('1', 60, 60), (' 2 m ', 1, 120)])
def test_interval(value, bare, seconds):
    assert text.interval(value, bare=bare) == seconds


@pytest.mark.parametrize('value', ['0', '0s', '-1', 'm', '10x', '1e9999', 'inf', 'nan', ''])
def test_interval_refused(value):
    with pytest.raises(ValueError, match='is not a positive time'):
        text.interval(value)


def test_one_rsync_command_builder():
    """Every rsync command between the mountain and NERSC has the same
    layout: program, transport, timeout, dry run, options, sources,
    destination; the documented rsync() and the daemon's copy are built so."""
    assert (RSYNC_OK, RSYNC_VANISHED) == RSYNC_DONE == (0, 24)
    assert rsync_command(['-v'], ['a/', 'b/'], 'c/', ssh=['ssh', '-o', 'X=1 2'], io_timeout=5,
                         dry_run=True) == ['/bin/rsync', "--rsh=ssh -o 'X=1 2'", '--timeout=5',
                                           '--dry-run', '-v', 'a/', 'b/', 'c/']
    assert rsync_command(['--list-only'], ['dts:/x/']) == ['/bin/rsync', '--list-only', 'dts:/x/']
    assert rsync('/a', '/b', test=True) == ['/bin/rsync', '--dry-run', '--verbose', '--recursive',
                                            '--copy-dirlinks', '--times', '--omit-dir-times',
                                            'dts:/a/', '/b/']
    command = Mountain('dts', 'ssh', Stop()).rsync('/data/20261120', '/staging', extra=['-x'],
                                                   dry_run=True, stream=2)
    assert command[0] == '/bin/rsync' and command[1].startswith('--rsh=ssh ')
    assert 'mux2' in command[1]
    assert command[2:] == ['--timeout=600', '--dry-run', '--verbose', '--recursive', '--times',
                           '--omit-dir-times', '-x', 'dts:/data/20261120/', '/staging/']


def test_mountain_runs_through_its_runner():
    """Every command of a :class:`Mountain` goes through the runner it is
    given (a recorder here): the survey over the shared connection, answered
    "locked" without reaching any host."""
    calls = []

    def recorder(command, **kwargs):
        calls.append((command, kwargs))
        return Result(0, '#locked\0#end\0', '')
    mountain = Mountain('dts', 'ssh', Stop(), runner=recorder)
    try:
        survey = mountain.survey('/data/dts', '/data/lock', ['20261120'])
    finally:
        mountain.close()
    assert survey.answer == 'locked'
    [(command, kwargs)] = calls
    assert command[0] == 'ssh' and any(w.startswith('ControlPath=') for w in command)
    assert command[-2] == 'dts' and command[-1].startswith("sh -c ")
    assert command[-1].endswith(" sh /data/dts /data/lock 20261120")
    assert kwargs['names'] and kwargs['timeout'] == 300


def test_signal_while_the_main_thread_holds_a_lock_of_the_stop():
    """SIGTERM's handler takes no lock: a signal that arrives while the main
    thread holds one of the stop's own locks (as it does, briefly, inside
    every wait and set) must neither deadlock the process nor be lost."""
    script = '''
import os, signal, threading, time
from desitransfer.processes import Stop
stop = Stop()
stop.handle_signals(signal.SIGUSR1)
for lock in (stop.event._cond, stop.waker._lock):
    with lock:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)  # the handler runs here, in this thread
    assert stop.is_set() and stop.reason == 'SIGUSR1 received', stop.reason
    t0 = time.monotonic()
    assert stop.wait(30) and time.monotonic() - t0 < 1
    stop = Stop()
    stop.handle_signals(signal.SIGUSR1)
# A signal during a long wait ends it at once.
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
t0 = time.monotonic()
assert stop.wait(30) and time.monotonic() - t0 < 1.5, time.monotonic() - t0
print('ok')
'''
    try:
        p = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                           timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail('the process hung: the signal handler waited for a lock its thread held')
    assert p.returncode == 0 and p.stdout == 'ok\n', p.stderr
