# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of desitransfer.nightwatch: desi_nightwatch_transfer as an operator
starts it, and its loop with an injected clock, with real rsync over the
loopback sshd from a mountain at the real absolute paths (``kpno`` fixture)."""
import datetime as dt
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from helpers import mode
from loopback import terminate_when

from desitransfer import common, nightwatch
from desitransfer.processes import single_instance
from desitransfer.nightwatch import NightwatchTransfer, _options

SOURCE = '/exposures/nightwatch'

#: Nightwatch output of a night: what arrives, and what the exclude list keeps
#: at the mountain (with near misses of each pattern, which arrive).
ARRIVE = ['nightwatch_summary.html', 'nightwatch-debugger.txt', 'webapp.log.1',
          'partial.tmp.html', 'redux2/x.fits', 'tests/t.html',
          '00001234/qa-00001234.html', '00001234/preproc-b1-00001234.fits.gz',
          '00001234/qsky_b1-00001234.fits', '00001234/qsky-b1-00001234.fits.fz',
          '00001234/x.fits']
EXCLUDED = ['nightwatch.log', 'nightwatch-debug.log', 'nightwatch-webapp.log', 'webapp.log',
            'partial.tmp', 'redux/x.fits', 'test/t.html', '00001234/preproc-b1-00001234.fits',
            '00001234/qsky-b1-00001234.fits', '00001234/redux/y.fits', '00001234/a.tmp']
TOP_LEVEL = ['nights.html', 'nightlinks.js', 'qa-lastexp.html']


def files_under(top):
    """Files (and links) under `top`, relative, sorted."""
    return sorted(os.path.relpath(os.path.join(d, f), top)
                  for d, dirs, fs in os.walk(top) for f in fs + [x for x in dirs
                                                                 if os.path.islink(
                                                                     os.path.join(d, x))])


def make_night(kpno, night, top_level=TOP_LEVEL, mode_=0o2775):
    for name in ARRIVE + EXCLUDED:
        kpno.write(f'{SOURCE}/{night}/{name}', f'{name}\n')
    kpno.path(f'{SOURCE}/{night}').chmod(mode_)
    for name in top_level:
        kpno.write(f'{SOURCE}/{name}', f'{name}\n', mode=0o600)
    kpno.write(f'{SOURCE}/index.html')
    kpno.write(f'{SOURCE}/nightwatch.log')


def kpno_dir(kpno, *parts):
    return kpno.nersc('spectro', 'nightwatch', 'kpno', *parts)


def nightwatch_cli(kpno, *args, env=None, alert=None):
    """Run desi_nightwatch_transfer (alerts off unless `alert` is an SMTP server)."""
    mail = ['--alert-to', 'desi-alarms@example.org', '--smtp', alert.hostport] if alert else \
        ['--alert-to', '']
    return subprocess.run(['desi_nightwatch_transfer', '--kill', str(kpno.kill)] + mail +
                          list(args), capture_output=True, text=True, timeout=120, env=env)


def log_text(kpno):
    return kpno.nersc('spectro', 'nightwatch', 'desi_nightwatch_transfer.log').read_text()


@pytest.fixture
def clock(monkeypatch):
    """Set the UTC time seen by the package."""
    def set_time(*args):
        t = dt.datetime(*args, tzinfo=dt.timezone.utc)
        monkeypatch.setattr(common, '_utcnow', lambda: t)
        return t
    return set_time


@pytest.fixture
def transfer(kpno):
    """Make NightwatchTransfer objects in this process (no log file, no email);
    their ssh connections are closed at the end of the test."""
    made = []

    def make(*args):
        made.append(NightwatchTransfer(_options(['--kill', str(kpno.kill), '--alert-to', '']
                                                + list(args))))
        return made[-1]

    yield make
    for t in made:
        t.connection.close()


# ----------------------------------------------------------------------
# Options.
# ----------------------------------------------------------------------
def test_options(monkeypatch):
    monkeypatch.setenv('HOME', '/home/desi')
    monkeypatch.setenv('DESI_ROOT', '/desi')
    o = _options([])
    assert (o.debug, o.maxerrors, o.kill, o.permission, o.sleep, o.once, o.night) == \
        (False, 10, '/home/desi/stop_desi_transfer', True, 1, False, None)
    o = _options(['-d', '-e', '3', '-P', '-s', '0.5', '--once', '--night', '20240229'])
    assert (o.debug, o.maxerrors, o.permission, o.sleep, o.once, o.night) == \
        (True, 3, False, 0.5, True, '20240229')


@pytest.mark.parametrize('args', [['-s', '0'], ['-s', 'x'], ['-s', 'nan'], ['-s', '-1'],
                                  ['-e', '-1'], ['-e', '1.5'], ['--night', '20230229'],
                                  ['--night', '2024010'], ['--night', '../x'], ['--bogus'],
                                  ['--smtp', 'a:b']])
def test_bad_options(tmp_path, args):
    """One error line, exit status 2, nothing written."""
    env = {'PATH': os.environ['PATH'], 'DESI_ROOT': str(tmp_path / 'desi')}
    p = subprocess.run(['desi_nightwatch_transfer'] + args, capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ''
    assert p.stderr.splitlines()[-1].startswith('desi_nightwatch_transfer: error:')
    assert os.listdir(tmp_path) == []


def test_help_needs_no_environment(tmp_path):
    for args in (['--help'], ['--version']):
        p = subprocess.run(['desi_nightwatch_transfer'] + args, capture_output=True,
                           text=True, env={'PATH': os.environ['PATH']})
        assert p.returncode == 0 and 'desi_nightwatch_transfer' in p.stdout
    p = subprocess.run(['desi_nightwatch_transfer', '--once'], capture_output=True, text=True,
                       env={'PATH': os.environ['PATH']}, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.splitlines()[-1] == (
        'desi_nightwatch_transfer: error: DESI_ROOT is not set; the data and the log go '
        'under $DESI_ROOT/spectro/nightwatch')
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------
# desi_nightwatch_transfer against the loopback mountain.
# ----------------------------------------------------------------------
def test_catch_up_a_night(kpno):
    """Exclude list honoured (near misses kept), top-level files world-readable,
    permissions reset, nothing deleted at NERSC, the log where operators look."""
    night = '20240101'
    make_night(kpno, night)
    make_night(kpno, '20231231')
    kept = kpno_dir(kpno, night, 'only-at-nersc.html')
    kept.parent.mkdir(parents=True)
    kept.write_text('x')
    p = nightwatch_cli(kpno, '--once', '--night', night)
    assert p.returncode == 0, p.stdout + p.stderr
    assert files_under(kpno_dir(kpno, night)) == sorted(ARRIVE + ['only-at-nersc.html'])
    assert (kpno_dir(kpno, night, '00001234', 'x.fits').read_text() == '00001234/x.fits\n')
    assert sorted(os.listdir(kpno_dir(kpno))) == sorted([night] + TOP_LEVEL)
    for name in TOP_LEVEL:
        assert mode(kpno_dir(kpno, name)) == 0o644
    # As the original calls it: the night's directory, no option.
    assert kpno.fix_calls() == [[str(kpno_dir(kpno, night))]]
    text = log_text(kpno)
    assert f'Syncing night {night}.' in text and 'ERROR' not in text
    # -P: no permission reset.
    p = nightwatch_cli(kpno, '--once', '--night', night, '-P')
    assert p.returncode == 0 and len(kpno.fix_calls()) == 1


def test_tonight_with_setgid_and_sticky_bits(kpno):
    """Tonight's directory is found whatever its mode bits; look-alike names are not it."""
    night = common.today()
    kpno.path(SOURCE).mkdir()
    p = nightwatch_cli(kpno, '--once')
    assert p.returncode == 0, p.stdout + p.stderr
    assert f'No nightwatch data for night {night} at dts:{SOURCE}/ yet' in log_text(kpno)
    for decoy in (f'1{night}', f'{night}.old', f'{night}-test'):
        kpno.write(f'{SOURCE}/{decoy}/x.html')
    p = nightwatch_cli(kpno, '--once')
    assert p.returncode == 0 and not kpno_dir(kpno).exists()
    make_night(kpno, night, mode_=0o3777)
    p = nightwatch_cli(kpno, '--once')
    assert p.returncode == 0, p.stdout + p.stderr
    assert files_under(kpno_dir(kpno, night)) == sorted(ARRIVE)
    assert sorted(os.listdir(kpno_dir(kpno))) == sorted([night] + TOP_LEVEL)


def test_missing_night_by_hand_is_an_error(kpno):
    kpno.path(SOURCE).mkdir()
    p = nightwatch_cli(kpno, '--once', '--night', '20240101')
    assert p.returncode == 1
    assert f'Night 20240101 is not in dts:{SOURCE}/; nothing to sync.' in log_text(kpno)


def test_vanished_file_is_a_warning(kpno, monkeypatch):
    """rsync exit status 24 (a file vanished while it was synced) is not an error."""
    night = '20240101'
    make_night(kpno, night)
    # The sender, slowed to 400 KiB/s, is still on the big file (more than its
    # buffers hold) when the last file is removed: as soon as the big file
    # is being written at NERSC, so after the file list was sent, however
    # slowly the machine starts rsync.
    kpno.write(f'{SOURCE}/{night}/0-big.bin', 'x' * 800_000)
    vanishing = kpno.write(f'{SOURCE}/{night}/zz-last.html')
    receiving = kpno_dir(kpno, night)
    remove = (f'i=0; while [ $i -lt 400 ] && ! ls -a {receiving} 2>/dev/null | '
              f"grep -q '^\\.0-big\\.bin\\.'; do sleep 0.05; i=$((i + 1)); done; "
              f'rm -f {vanishing}')
    monkeypatch.setenv('RSYNC_RSH', kpno.wrapper(
        'ssh-vanish', f'({remove}) >/dev/null 2>&1 &',
        match=f'nightwatch/{night}/', server_args=['--bwlimit=400']))
    p = nightwatch_cli(kpno, '--once', '--night', night)
    assert p.returncode == 0, p.stdout + p.stderr
    text = log_text(kpno)
    assert (f'Some files of night {night} vanished at the mountain while it was synced '
            '(rsync exit status 24)') in text
    assert 'ERROR' not in text
    assert kpno_dir(kpno, night, '0-big.bin').exists()
    assert not kpno_dir(kpno, night, 'zz-last.html').exists()
    assert len(kpno.fix_calls()) == 1 and mode(kpno_dir(kpno, 'nights.html')) == 0o644


def test_missing_top_level_file(kpno):
    """A top-level file missing at the mountain is an error, not a crash; the
    others are still synced and made world-readable."""
    night = '20240101'
    make_night(kpno, night, top_level=TOP_LEVEL[:2])
    p = nightwatch_cli(kpno, '--once', '--night', night)
    assert p.returncode == 1
    assert [mode(kpno_dir(kpno, n)) for n in TOP_LEVEL[:2]] == [0o644, 0o644]
    text = log_text(kpno)
    assert 'Syncing the top-level files nights.html, nightlinks.js, qa-lastexp.html' in text
    assert f'Top-level file {kpno_dir(kpno, "qa-lastexp.html")} is not at NERSC' in text
    assert files_under(kpno_dir(kpno, night)) == sorted(ARRIVE)


def test_top_level_link_is_left_alone(kpno, tmp_path):
    """A top-level file that is a link inside the nightwatch directory arrives
    as a link; one pointing out of it is not copied (an error); what either
    points to keeps its mode."""
    night = '20240101'
    make_night(kpno, night, top_level=TOP_LEVEL[2:])
    kpno.link(f'{SOURCE}/nightlinks.js', f'{night}/nightwatch_summary.html')
    target = tmp_path / 'private.html'
    target.write_text('private')
    target.chmod(0o600)
    kpno.link(f'{SOURCE}/nights.html', str(target))
    p = nightwatch_cli(kpno, '--once', '--night', night)
    assert p.returncode == 1, p.stdout + p.stderr
    assert os.readlink(kpno_dir(kpno, 'nightlinks.js')) == f'{night}/nightwatch_summary.html'
    assert not os.path.lexists(kpno_dir(kpno, 'nights.html'))
    assert mode(target) == 0o600
    assert f'Top-level file dts:{SOURCE}/nights.html is a link out of' in log_text(kpno)


def test_second_instance_refused(kpno):
    lock_file = kpno.nersc('spectro', 'nightwatch', 'desi_nightwatch_transfer.lock')
    lock, holder = single_instance(str(lock_file))
    try:
        p = nightwatch_cli(kpno, '--once')
        assert p.returncode == 0
        (line,) = p.stdout.splitlines()
        assert line.startswith('INFO:') and line.endswith(
            f'desi_nightwatch_transfer is already running (pid {os.getpid()}, lock '
            f'{lock_file}); nothing to do.')
        assert not kpno_dir(kpno).exists()
    finally:
        lock.close()


@pytest.mark.alone
def test_original_running_refused(kpno, tmp_path):
    """A desi_nightwatch_transfer of another installation (the original's)
    runs: this one refuses to start, saying how to stop it, and copies nothing."""
    script = tmp_path / 'original' / 'bin' / 'desi_nightwatch_transfer'
    script.parent.mkdir(parents=True)
    script.write_text(f'#!{sys.executable}\nimport time\ntime.sleep(60)\n')
    script.chmod(0o755)
    original = subprocess.Popen([str(script)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with open(f'/proc/{original.pid:d}/cmdline', 'rb') as f:
                if str(script).encode() in f.read():
                    break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        p = nightwatch_cli(kpno, '--once')
        assert p.returncode == 1
        (line,) = p.stdout.splitlines()
        assert line.startswith('CRITICAL:') and f'pid {original.pid:d}' in line
        assert 'desi_nightwatch_init.sh stop' in line
        assert not kpno_dir(kpno).exists()
    finally:
        original.kill()
        original.wait()


def test_sigterm_while_sleeping(kpno):
    """Started as operators do (nohup nice -19 ... &> /dev/null &), SIGTERM ends
    the loop within seconds, even in a long sleep."""
    kpno.path(SOURCE).mkdir()
    proc = subprocess.Popen(['nohup', 'nice', '-19', 'desi_nightwatch_transfer', '--kill',
                             str(kpno.kill), '--alert-to', '', '-s', '60'],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=kpno.top)
    code, _, seconds = terminate_when(
        proc, lambda: 'No nightwatch data for night' in proc_log(kpno))
    assert seconds < 5
    assert code == 0
    assert 'desi_nightwatch_transfer stops (SIGTERM received).' in log_text(kpno)
    assert not (kpno.top / 'nohup.out').exists()


def proc_log(kpno):
    try:
        return log_text(kpno)
    except FileNotFoundError:
        return ''


def test_errors_alert_once(kpno, smtp_server, monkeypatch):
    """More than N errors within an hour: one alert email, not one per error;
    the loop goes on until the kill file; USER unset is fine."""
    monkeypatch.setenv('RSYNC_RSH', kpno.wrapper('ssh-down', 'exit 255'))
    env = {k: v for k, v in os.environ.items() if k != 'USER'}
    proc = subprocess.Popen(['desi_nightwatch_transfer', '--kill', str(kpno.kill),
                             '--alert-to', 'desi-alarms@example.org', '--smtp',
                             smtp_server.hostport, '-e', '2', '-s', '0.002',
                             # A night given: every pass lists, whatever the hour (in
                             # 08:00-12:00 MST the loop would sleep until noon).
                             '--night', '20261204'], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert smtp_server.wait(1, timeout=30), proc_log(kpno)[-4000:]
        deadline = time.monotonic() + 30
        while proc_log(kpno).count('ERROR:') < 12:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        kpno.kill.touch()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert not smtp_server.wait(2, timeout=0.5)
    (message,) = smtp_server.messages
    # The subject of the original, which the collaboration's mail filters match.
    assert message['Subject'] == 'Critical error reported by desi_nightwatch_transfer!'
    assert message['From'].startswith('desi@')
    body = message.get_content()
    assert 'More than 2 errors within an hour transferring nightwatch data' in body
    text = log_text(kpno)
    assert text.count('CRITICAL:') == 1
    assert text.count('ERROR:') >= 12 and 'Could not list dts:/exposures/nightwatch/' in text
    assert 'Logging error' not in out


def test_error_count_decays(kpno, clock, caplog, monkeypatch, transfer):
    """Errors spread out over more than an hour never alert; more than N within
    an hour alert once; again only after an hour in which errors continued."""
    monkeypatch.setenv('RSYNC_RSH', kpno.wrapper('ssh-down', 'exit 255'))
    t = transfer('-e', '2')
    start = dt.datetime(2026, 11, 21, 3, 0, tzinfo=dt.timezone.utc)  # 20:00 MST

    def fail_at(minutes):
        clock(*(start + dt.timedelta(minutes=minutes)).timetuple()[:6])
        errors, pause = t.run_once()
        assert errors == 1 and 0 < pause <= 60
        return len([r for r in caplog.records if r.levelno == logging.CRITICAL])

    assert [fail_at(m) for m in (0, 31, 62, 93)] == [0, 0, 0, 0]
    assert [fail_at(m) for m in (94, 95, 120, 150)] == [1, 1, 1, 1]
    assert fail_at(155) == 2
    assert t.errors == 9


def test_idle_window(kpno, clock, transfer):
    """Outside 08:00-12:00 MST tonight is synced; when the window starts the
    ending night is synced one last time; after noon, once more (files written
    in the morning), then the new night."""
    night, new_night = '20261120', '20261121'
    make_night(kpno, night)
    t = transfer('-P')
    clock(2026, 11, 21, 14, 59)  # 07:59 MST
    assert t.run_once() == (0, pytest.approx(60, abs=5))
    assert files_under(kpno_dir(kpno, night)) == sorted(ARRIVE)
    kpno.write(f'{SOURCE}/{night}/written-0800.html')
    clock(2026, 11, 21, 15, 0, 30)  # 08:00:30 MST
    assert t.run_once() == (0, 4 * 3600 - 30)
    assert kpno_dir(kpno, night, 'written-0800.html').exists()
    kpno.write(f'{SOURCE}/{night}/written-0900.html')
    clock(2026, 11, 21, 16, 0)  # 09:00 MST: sleeping, nothing synced
    assert t.run_once() == (0, 3 * 3600)
    assert not kpno_dir(kpno, night, 'written-0900.html').exists()
    kpno.write(f'{SOURCE}/{new_night}/qa.html')
    clock(2026, 11, 21, 19, 0, 5)  # 12:00:05 MST: the night has rolled over
    errors, pause = t.run_once()
    assert errors == 0 and 50 < pause <= 60
    assert kpno_dir(kpno, night, 'written-0900.html').exists()
    assert files_under(kpno_dir(kpno, new_night)) == ['qa.html']
    clock(2026, 11, 21, 19, 2)
    kpno.write(f'{SOURCE}/{night}/written-1201.html')
    t.run_once()
    assert not kpno_dir(kpno, night, 'written-1201.html').exists()


def test_kill_file_during_idle_sleep(kpno, clock, transfer):
    """The kill file ends the idle sleep (up to four hours) within seconds."""
    clock(2026, 11, 21, 16, 0)  # 09:00 MST
    t = transfer()
    result = []
    loop = threading.Thread(target=lambda: result.append(t.loop()), daemon=True)
    loop.start()
    time.sleep(0.5)
    kpno.kill.touch()
    t0 = time.monotonic()
    loop.join(timeout=10)
    assert not loop.is_alive() and result == [0]
    assert time.monotonic() - t0 < 5


def test_hung_mountain_times_out(kpno, monkeypatch, caplog, transfer):
    monkeypatch.setenv('RSYNC_RSH', kpno.wrapper('ssh-hang', 'sleep 30'))
    monkeypatch.setattr(nightwatch, 'LIST_TIMEOUT', 1)
    t = transfer('--night', '20240101')
    t0 = time.monotonic()
    assert t.run_once()[0] == 1
    assert time.monotonic() - t0 < 10
    assert 'Could not list dts:/exposures/nightwatch/ to look for night 20240101 (rsync exit ' \
        'status -9)' in caplog.text


def test_garbage_from_the_mountain(kpno, monkeypatch, caplog, transfer):
    make_night(kpno, '20240101')
    monkeypatch.setenv('RSYNC_RSH', kpno.wrapper('ssh-garbage', "printf 'Welcome!\\n\\n'"))
    t = transfer('--night', '20240101')
    assert t.run_once()[0] == 1
    assert 'Could not list dts:/exposures/nightwatch/' in caplog.text
    assert not kpno_dir(kpno).exists()
