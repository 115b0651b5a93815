# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""desi_transfer_daemon on bad days: hostile links, connection loss in every
copy path, a full disk, an unreadable tape listing, a daemon killed between
two steps, SIGTERM in the middle of anything, an unreadable night, cron
starting it twice, and the first start on years of settled history.

Each test runs against the real sshd, rsync, SMTP server and the HPSS
emulator (fixtures in ``fixtures_daemon.py``)."""
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from desitransfer import executor as actions
from desitransfer.processes import Stop
from desitransfer.runner import Result
from desitransfer.tape import Archive
from desitransfer.simulator import exposure_files, make_exposure
from fixtures_daemon import EARLIER, LAST, NOW, snapshot

ROOT = os.geteuid() == 0


def guard_ssh(site, data):
    """An ssh program that refuses (exit 99, and says so in a file) any rsync
    reading a path at the mountain that is not under `data`; so a regression
    of the daemon's own guard can never copy ``/`` or ``/etc``."""
    wrapper = os.path.join(site.top, 'guard-ssh')
    refusals = wrapper + '.refused'
    with open(wrapper, 'w') as f:
        f.write(f'''#!{sys.executable}
import os, shlex, sys
args = sys.argv[1:]
if 'dts' in args:
    words = shlex.split(' '.join(args[args.index('dts') + 1:]))
    if words[:2] == ['rsync', '--server']:
        paths = words[words.index('.') + 1:] if '.' in words else []
        bad = [p for p in paths if not (os.path.realpath(p) + '/').startswith({data!r} + '/')]
        if '--sender' not in words or not paths or bad:
            with open({refusals!r}, 'a') as f:
                f.write(' '.join(words) + '\\n')
            sys.exit(99)
os.execv({site.ssh!r}, [{site.ssh!r}] + args)
''')
    os.chmod(wrapper, 0o755)
    site.write_config(ssh=wrapper, data_root=data)
    return lambda: open(refusals).read() if os.path.exists(refusals) else ''


def every_file(top):
    for root, dirs, files in os.walk(top):
        for name in files:
            yield os.path.join(root, name)


def test_hostile_links_never_followed(site, caplog):
    """Links whose targets are not the exposure's own directory under the
    data area are refused, reported once, and never read; links inside an
    exposure are not followed either."""
    caplog.set_level(logging.INFO)
    read = guard_ssh(site, site.data)
    good = ['00000110', '00000111']
    for e in good:
        site.exposure(LAST, e)
    night = os.path.join(site.source, LAST)
    os.symlink('/etc', os.path.join(night, '00000901'))
    os.symlink('/', os.path.join(night, '00000902'))
    # Named like an exposure, but outside the data area.
    outside = make_exposure(os.path.join(site.top, 'outside'), site.source, LAST, '00000903',
                            link=False)
    os.symlink(outside, os.path.join(night, '00000903'))
    # Another exposure's directory.
    os.symlink(os.path.join(site.data, LAST, '00000110'), os.path.join(night, '00000904'))
    # A relative link into the data area is fine.
    make_exposure(site.data, site.source, LAST, '00000906', link=False)
    os.symlink(f'../../data/{LAST}/00000906', os.path.join(night, '00000906'))
    # A night that is a link out of the transfer area.
    os.symlink('/etc', os.path.join(site.source, '20261117'))
    # Links inside a good exposure.
    os.symlink('/etc/passwd', os.path.join(site.data, LAST, '00000111', 'passwd'))
    os.symlink('/', os.path.join(site.data, LAST, '00000111', 'root'))
    site.write_config(ssh=os.path.join(site.top, 'guard-ssh'), data_root=site.data,
                      catchup='14', backup='20')
    assert site.run() == 0
    assert read() == ''
    expected = {LAST}
    for e in good + ['00000906']:
        site.assert_verified(LAST, e, dir_mode=0o2550)  # archived
        expected |= {f'{LAST}/{e}', f'{LAST}/{e}/checksum-{e}.sha256sum'}
        expected |= {f'{LAST}/{e}/{name}' for name in exposure_files(e)}
    assert site.installed() == expected
    with open('/etc/passwd', 'rb') as f:
        passwd = f.read()
    for path in every_file(os.path.join(site.top, 'nersc')):
        if not path.endswith('.log'):
            with open(path, 'rb') as f:
                assert passwd not in f.read(), path
    assert set(site.hpss.members(f'desi/spectro/data/desi_spectro_data_{LAST}.tar')) == expected
    for bad, why in (('00000901', 'its target /etc is not a directory'),
                     ('00000902', 'its target / is not a directory'),
                     ('00000903', f'is not under {site.data}'),
                     ('00000904', 'is not a directory 20261119/00000904')):
        assert f'{LAST}/{bad} at dts is not transferred: ' in caplog.text
        assert why in caplog.text, why
    assert '20261117 at dts is not transferred: not a night directory' in caplog.text
    assert site.smtp.messages == []
    # Reported once, also across --once runs.
    caplog.clear()
    assert site.run() == 0
    assert 'not transferred' not in caplog.text and read() == ''


def counting_ssh(site, fail_from, rsync_only=True):
    """ssh that lets the first `fail_from` rsync connections through and then
    fails like a lost network (exit 255)."""
    counter = os.path.join(site.top, 'rsync-connections')
    return site.ssh_wrapper('counting-ssh', before_rsync=(
        f'n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}; '
        f'[ "$n" -lt {fail_from:d} ] || {{ echo "Connection reset by peer" >&2; exit 255; }}'))


@pytest.mark.parametrize('path', ['bulk', 'fallback', 'retry', 'catchup'])
def test_connection_lost_in_every_copy_path(site, caplog, path):
    """Losing the mountain in any copy path installs and records nothing new,
    leaves staging as it is, and the next pass converges."""
    caplog.set_level(logging.INFO)
    expids = [f'{1100 + j:08d}' for j in range(3)]
    for e in expids:
        site.exposure(LAST, e)
    if path in ('retry', 'catchup'):
        directory = os.path.join(site.data, LAST, expids[0])
        if path == 'retry':  # A complete copy with a checksum error is installed.
            with open(os.path.join(directory, f'desi-{expids[0]}.fits.fz'), 'r+b') as f:
                f.write(b'corrupt')
        assert site.run() == 0
        if path == 'catchup':  # A late file for the morning catch-up.
            with open(os.path.join(directory, 'late.json'), 'w') as f:
                f.write('{}\n')
            site.write_config(catchup='14')
        counting_ssh(site, 1 if path == 'catchup' else 0)
        if path == 'catchup':
            site.write_config(ssh=site.top + '/counting-ssh', catchup='14')
    elif path == 'bulk':
        counting_ssh(site, 0)
    else:  # The night's rsync fails for one exposure; then the mountain is lost.
        obstacle = os.path.join(site.staging, LAST, expids[1], f'desi-{expids[1]}.fits.fz',
                                'x')
        os.makedirs(obstacle)
        counting_ssh(site, 1)
    rows = site.status_rows()
    installed = snapshot(site.destination)
    emails = len(site.smtp.messages)
    assert site.run() == 1
    assert 'Could not ' in caplog.text and '(1 pass in a row)' in caplog.text
    assert site.status_rows() == rows
    assert snapshot(site.destination) == installed
    assert not site.smtp.wait(emails + 1, timeout=0.3)
    if path == 'bulk':
        assert not [e for e in os.listdir(os.path.join(site.staging, LAST))]
    if path == 'retry':
        assert site.state()['retries'] == {f'{LAST}/{expids[0]}': 0}
    if path == 'catchup':
        assert site.state()['caught_up'] == []
        assert not os.path.exists(site.dest(LAST, expids[0], 'late.json'))
    # The network is back.
    site.write_config(catchup='14' if path == 'catchup' else '30')
    if path == 'fallback':
        shutil.rmtree(os.path.dirname(obstacle))
    if path == 'retry':
        good = os.path.join(site.data, LAST, expids[0], f'desi-{expids[0]}.fits.fz')
        with open(good, 'wb') as f:
            f.write(exposure_files(expids[0])[f'desi-{expids[0]}.fits.fz'])
        os.utime(good, (time.time() + 5, time.time() + 5))
    assert site.run() == 0
    for e in expids:
        if path == 'catchup' and e == expids[0]:
            # The late file is not in the checksum file: installed, but not verified.
            assert os.path.exists(site.dest(LAST, e, 'late.json'))
            assert site.status_rows()[(LAST, int(e))] == {0: 1, 1: 0}
        else:
            site.assert_verified(LAST, e)
    assert os.listdir(os.path.join(site.staging, LAST)) == []


@pytest.mark.skipif(not ROOT, reason='mounting a small file system needs root (CI is root)')
def test_disk_full(site, caplog):
    """The NERSC file system fills up during a backlog: nothing partial is
    installed or recorded, copies stay in staging, one alert (not one per
    exposure); once there is space the next pass completes everything."""
    caplog.set_level(logging.INFO)
    expids = [f'{1200 + j:08d}' for j in range(6)]
    for e in expids:
        site.exposure(LAST, e, nfiles=3, size=200_000)
    nersc = os.path.join(site.top, 'nersc')
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m,mode=0755', 'tmpfs', nersc],
                   check=True)
    try:
        for d in (site.staging, site.destination):
            os.makedirs(d)
        assert site.run() == 1
        assert site.smtp.wait(1, timeout=10)
        assert not site.smtp.wait(2, timeout=0.5)
        body = site.smtp.messages[0].get_content()
        assert 'is full' in body and site.staging in body
        installed = os.listdir(site.dest(LAST)) if os.path.isdir(site.dest(LAST)) else []
        assert len(installed) < len(expids)
        for e in installed:
            site.assert_verified(LAST, e, nfiles=3, size=200_000)
        recorded = {e for (_, e) in site.status_rows()}
        assert recorded <= {int(e) for e in installed}
        assert 'Transfer pass of' not in caplog.text
        # The pass stopped at the full disk: no exposure was tried on its own.
        assert 'copying each on its own' not in caplog.text
        assert 'has errors' not in caplog.text
        subprocess.run(['mount', '-o', 'remount,size=30m', nersc], check=True)
        assert site.run() == 0
        for e in expids:
            site.assert_verified(LAST, e, nfiles=3, size=200_000)
        assert os.listdir(os.path.join(site.staging, LAST)) == []
    finally:
        subprocess.run(['umount', '-l', nersc])


GARBAGE_HSI = {
    'fails': 'echo "*** HSI: Unable to setup communication to HPSS" >&2; exit 72',
    'garbage': ('while [ $# -gt 0 ]; do [ "$1" = -O ] && out=$2; shift; done; '
                'printf "Welcome to HPSS\\nYour password expires soon\\n" >> "$out"; exit 0'),
    'empty': 'exit 0',
    'truncated': ('while [ $# -gt 0 ]; do [ "$1" = -O ] && out=$2; shift; done; '
                  'printf "/home/d/desi/desi/spectro/data:\\n-rw-r-----    1 desi  " >> "$out"; '
                  'exit 0'),
}


@pytest.mark.parametrize('trouble', sorted(GARBAGE_HSI))
def test_unreadable_tape_listing_means_wait(site, caplog, trouble):
    """A night on tape, a daemon without state (so it must look), and hsi that
    fails or answers garbage: nothing is written to tape again, nothing is
    alerted as overdue, and the pass says it failed."""
    caplog.set_level(logging.INFO)
    site.exposure(EARLIER, '00001300')
    site.write_config(backup='20')
    assert site.run() == 0
    archive = site.hpss.path(f'desi/spectro/data/desi_spectro_data_{EARLIER}.tar')
    tape = snapshot(str(site.hpss.root))
    rows = site.status_rows()
    os.remove(site.state_file)
    site.clock(2026, 11, 23, 21, 0, 0)  # three days overdue
    site.hpss_wrapper('broken-hsi', 'hsi', GARBAGE_HSI[trouble])
    site.write_config(backup='20', hpss=site.top + '/broken-hsi')
    caplog.clear()
    assert site.run() == 1
    assert site.htar_calls() == [['htar', '-cvhf', str(archive.relative_to(site.hpss.root)),
                                  '-H', 'crc:verify=all', EARLIER]]  # only the first run's
    assert snapshot(str(site.hpss.root)) == tape
    assert 'Could not list desi/spectro/data on HPSS' in caplog.text
    assert site.status_rows() == rows
    assert site.smtp.messages == []


class Killed(BaseException):
    """The daemon dies here (no except clause of the daemon catches it)."""


def run_and_die_in(site, method):
    """One pass that dies at the first call of ``Actions.method``."""
    def dying(self, *args, **kwargs):
        raise Killed(method)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(actions.Actions, method, dying)
        with pytest.raises(Killed):
            site.run()


def test_killed_after_install_before_record(site, caplog):
    """Killed after installing, before recording: the next start records
    exactly what was installed (even if the links are gone by then)."""
    caplog.set_level(logging.INFO)
    expids = ['00001400', '00001401']
    for e in expids:
        site.exposure(LAST, e)
    run_and_die_in(site, 'record')
    assert sorted(os.listdir(site.dest(LAST))) == expids
    assert site.status_rows() == {}
    assert sorted(site.state()['pending']) == [f'{LAST}/{e}' for e in expids]
    for e in expids:
        os.remove(os.path.join(site.source, LAST, e))
    assert site.run() == 0
    for e in expids:
        site.assert_verified(LAST, e)
    assert 'was installed by a run that stopped before recording it' in caplog.text
    assert site.state()['pending'] == {}


def test_killed_before_install_then_link_removed(site, caplog):
    """Killed after the outcomes were written ahead but before installing, then
    one link is removed at the mountain: that exposure is reported once, never
    recorded, installed or archived; the others are completed and archived."""
    caplog.set_level(logging.INFO)
    expids = ['00001500', '00001501', '00001502']
    for e in expids:
        site.exposure(LAST, e)
    run_and_die_in(site, 'install')
    assert not os.path.exists(site.dest(LAST))
    assert sorted(os.listdir(os.path.join(site.staging, LAST))) == expids
    gone = expids[0]
    os.remove(os.path.join(site.source, LAST, gone))
    site.write_config(catchup='14', backup='20')
    assert site.run() == 0
    assert sorted(os.listdir(site.dest(LAST))) == expids[1:]
    for e in expids[1:]:
        assert site.status_rows()[(LAST, int(e))] == {0: 1, 1: 1, 2: 1}
    assert (LAST, int(gone)) not in site.status_rows()
    members = site.hpss.members(f'desi/spectro/data/desi_spectro_data_{LAST}.tar')
    assert not [m for m in members if gone in m]
    assert site.smtp.wait(1, timeout=10)
    assert f'Exposure {LAST}/{gone} is in staging' in site.smtp.messages[0].get_content()
    assert os.path.isdir(os.path.join(site.staging, LAST, gone))
    assert site.run() == 0
    assert not site.smtp.wait(2, timeout=0.5)


def test_backup_only_for_installed_exposures_in_the_index(site):
    """A status row for an exposure that is not installed (recorded by hand,
    say) never gets a backup record."""
    site.exposure(LAST, '00001600')
    assert site.run() == 0
    subprocess.run(['desi_transfer_status', '-d', site.status_dir, LAST, '1601', 'rsync'],
                   check=True, capture_output=True)
    site.write_config(backup='20')
    assert site.run() == 0
    rows = site.status_rows()
    assert rows[(LAST, 1600)] == {0: 1, 1: 1, 2: 1}
    assert rows[(LAST, 1601)] == {0: 1}


def test_sigterm_during_htar(site):
    """htar can run for hours: SIGTERM stops it within seconds, nothing is
    recorded as archived, and the next run archives the night."""
    site.exposure(LAST, '00001700')
    started = os.path.join(site.top, 'htar-started')
    site.hpss_wrapper('slow-htar', 'htar', f'touch {started}; sleep 60; exec '
                      f'{site.hpss.htar} "$@"')
    site.write_config(backup='20', hpss=site.top + '/slow-htar')
    code, out, seconds = site.terminate_when(lambda: os.path.exists(started), '--once')
    assert seconds < 5, out
    assert code == 0, out
    assert 'Stopped while archiving night 20261119' in out
    assert site.status_rows()[(LAST, 1700)] == {0: 1, 1: 1}
    assert site.state()['backed_up'] == []
    site.write_config(backup='20')
    assert site.run() == 0
    assert site.status_rows()[(LAST, 1700)] == {0: 1, 1: 1, 2: 1}


def test_sigterm_during_survey_and_kill_file_during_sleep(site):
    """A remote command that hangs is stopped by SIGTERM within seconds; a
    kill file ends a long sleep within seconds."""
    site.exposure(LAST, '00001800')
    started = os.path.join(site.top, 'ssh-started')
    site.ssh_wrapper('slow-ssh', before_command=f'touch {started}; sleep 60')
    code, out, seconds = site.terminate_when(lambda: os.path.exists(started), '--once')
    assert seconds < 5 and code == 0, out
    assert not os.path.exists(site.dest(LAST))
    # A long-running daemon sleeping ten minutes between passes.
    site.write_config(sleep='10')
    proc = site.start('--debug')
    try:
        deadline = time.monotonic() + 60
        while 'Sleeping 600 seconds' not in site.log_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        site.assert_verified(LAST, '00001800')
        t0 = time.monotonic()
        open(site.kill, 'w').close()
        out, _ = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 5
        assert proc.returncode == 0 and 'exists; stopping' in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_one_unreadable_night(open_site, caplog):
    """find fails on one night at the mountain (unreadable for the transfer
    account): the other nights are transferred; that night is said to wait,
    not the whole mountain to be unreachable."""
    site = open_site
    caplog.set_level(logging.INFO)
    site.exposure(EARLIER, '00001900')
    site.exposure(LAST, '00001910')
    if ROOT:  # The mountain's commands run as an unprivileged user, as at KPNO.
        site.ssh_wrapper('nobody-ssh', prefix='setpriv --reuid=65534 --regid=65534 '
                         '--clear-groups')
    os.chmod(os.path.join(site.source, LAST), 0)
    try:
        for n in range(1, 4):
            assert site.run() == 1
            assert site.smtp.wait(1, timeout=0.3) is (n == 3)
    finally:
        os.chmod(os.path.join(site.source, LAST), 0o755)
    site.assert_verified(EARLIER, '00001900')
    assert not os.path.exists(site.dest(LAST))
    assert f'Night {LAST} could not be listed' in caplog.text
    assert 'Permission denied, 1 pass in a row' in caplog.text
    assert f'Night {LAST} could not be listed' in site.smtp.messages[0].get_content()
    assert 'Could not ' not in caplog.text  # the mountain is not said to be unreachable
    assert site.state()['unreachable'] == 0
    assert site.run() == 0
    site.assert_verified(LAST, '00001910')
    assert site.state()['unlisted'] == {}
    assert not site.smtp.wait(2, timeout=0.3)


def test_cron_double_start(site):
    """cron "starts it or checks it is alive": a second start while the daemon
    runs says so in one line, exits 0 and emails nothing."""
    site.exposure(LAST, '00002000')
    proc = site.start()
    try:
        deadline = time.monotonic() + 60
        while not os.path.isdir(site.dest(LAST, '00002000')):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        command, env = site.command('--once')
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0
        lines = [line for line in second.stdout.splitlines() if line.strip()]
        assert len(lines) == 1 and 'already running' in lines[0], second.stdout
        assert lines[0].startswith('INFO') and f'pid {proc.pid}' in lines[0]
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and 'desi_transfer_daemon stops' in out
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not site.smtp.wait(1, timeout=0.5)


def test_first_start_on_settled_history(site, caplog):
    """An existing deployment: 400 nights linked at the mountain, already at
    NERSC and on tape, recorded in the status, and no state file.  The first
    start costs an ordinary pass: a handful of ssh connections, no catch-up
    of old nights, no warnings, no email, one line about the settled nights."""
    caplog.set_level(logging.INFO)
    wrapper_calls = site.ssh_wrapper('counted-ssh')
    site.write_config(ssh=site.top + '/counted-ssh', catchup='14', backup='20')
    today = dt.datetime(*NOW)
    nights = [(today - dt.timedelta(days=d)).strftime('%Y%m%d') for d in range(402, 1, -1)]
    assert len(nights) == 401 and nights[-1] == EARLIER
    status = {}
    tape = site.hpss.path('desi/spectro/data')
    tape.mkdir(parents=True)
    for i, night in enumerate(nights):
        expid = f'{10000 + i:08d}'
        files = exposure_files(expid, nfiles=1, size=64)
        directory = site.exposure(night, expid, files=files)
        installed = site.dest(night, expid)
        os.makedirs(installed)
        for name in os.listdir(directory):
            with open(os.path.join(directory, name), 'rb') as f, \
                    open(os.path.join(installed, name), 'wb') as g:
                g.write(f.read())
        ms = int(dt.datetime.strptime(night, '%Y%m%d').timestamp() * 1000) + 86_400_000
        status.setdefault(night[:4], {})[night] = {str(int(expid)): [[2, 1, ms + 3600_000],
                                                                     [1, 1, ms],
                                                                     [0, 1, ms]]}
        for suffix in ('.tar', '.tar.idx'):
            (tape / f'desi_spectro_data_{night}{suffix}').write_bytes(b'x')
    os.makedirs(site.status_dir)
    for year, data in status.items():
        with open(os.path.join(site.status_dir, f'desi_transfer_status_{year}.json'), 'w') as f:
            json.dump(data, f)
    # Last night is new.
    for j in range(2):
        site.exposure(LAST, f'{20000 + j:08d}')
    t0 = time.monotonic()
    assert site.run() == 0
    seconds = time.monotonic() - t0
    connections = [c for c in wrapper_calls() if '-O' not in c]
    # The survey, the copy, the catch-up; the measure of the round trip
    # (streams = auto), and the watch for exposures linked during the copy
    # over the express stream's connection, opened while the sizes are asked
    # (a copy that ends before that connection is open has no watch: the
    # watch between passes compares with the survey).
    assert len([c for c in connections if c[-1] == 'cat']) == 1, connections
    watches = [c for c in connections if 'echo quiet' in c[-1]]
    opened = [c for c in connections if c[-1] == 'true']
    assert len(watches) <= 1 and len(opened) <= 1, [c[-1][:80] for c in connections]
    assert len([c for c in connections if c[-1] not in ('cat', 'true') and
                c not in watches]) <= 3, connections
    assert seconds < 10
    for j in range(2):
        assert site.status_rows()[(LAST, 20000 + j)] == {0: 1, 1: 1, 2: 1}
    assert [c[-1] for c in site.htar_calls()] == [LAST]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [], [r.getMessage() for r in warnings]
    oldest = (today - dt.timedelta(days=30)).strftime('%Y%m%d')
    old = [n for n in nights if n < oldest]
    settled = [r.getMessage() for r in caplog.records if 'settled history' in r.getMessage()]
    assert len(settled) == 1, settled
    assert f'the {len(old)} nights' in settled[0] and f'({old[0]} to {old[-1]})' in settled[0]
    assert site.smtp.messages == []
    caplog.clear()
    assert site.run() == 0
    assert 'settled history' not in caplog.text


def test_no_false_overdue_alarm(site):
    """Nights days past their backup hour on a first start are archived in that
    pass: no overdue alert, no email at all."""
    site.exposure(EARLIER, '00002100')
    site.exposure('20261116', '00002101')
    site.write_config(catchup='14', backup='20')
    assert site.run() == 0
    assert site.status_rows()[(EARLIER, 2100)] == {0: 1, 1: 1, 2: 1}
    assert site.status_rows()[('20261116', 2101)] == {0: 1, 1: 1, 2: 1}
    assert not site.smtp.wait(1, timeout=0.5)


def test_hpss_unavailable_for_a_day(site, caplog):
    """HPSS down: archiving waits quietly; after a day, one alert."""
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00002200')
    site.write_config(backup='20')
    site.hpss_status.set_status('down')
    assert site.run() == 0
    site.clock(2026, 11, 21, 12, 0, 0)
    assert site.run() == 0
    assert not site.smtp.wait(1, timeout=0.3)
    site.clock(2026, 11, 21, 22, 0, 0)
    assert site.run() == 0
    assert site.run() == 0
    assert site.smtp.wait(1, timeout=10)
    assert not site.smtp.wait(2, timeout=0.5)
    body = site.smtp.messages[0].get_content()
    assert 'HPSS has not been available for archiving since 2026-11-20 21:00 UTC' in body
    assert LAST in body
    site.hpss_status.set_status('active')
    assert site.run() == 0
    assert site.status_rows()[(LAST, 2200)] == {0: 1, 1: 1, 2: 1}
    assert site.state()['hpss_unavailable'] is None


def test_overdue_when_listed_absent(site, caplog):
    """A night that cannot be archived (its final catch-up cannot reach the
    mountain) is emailed as overdue once, after the tape was listed."""
    caplog.set_level(logging.INFO)
    site.exposure(EARLIER, '00002300')
    site.exposure(LAST, '00002301')  # due one hour ago: not late yet
    assert site.run('--no-backup') == 0
    counting_ssh(site, 0)  # no rsync gets through: the final catch-up fails
    site.write_config(ssh=site.top + '/counting-ssh', backup='20')
    for _ in range(2):
        assert site.run() == 1
    assert site.smtp.wait(1, timeout=10)
    assert not site.smtp.wait(2, timeout=0.5)
    body = site.smtp.messages[0].get_content()
    assert f'Night {EARLIER} is still not archived to HPSS 25 hours after it was due' in body
    assert LAST not in body
    hsi = [c for c in site.hpss.calls() if os.path.basename(c[0]) == 'hsi']
    assert hsi, 'the tape was listed before the alert'


def test_stale_temporary_files_swept(site):
    dead = subprocess.Popen(['true'])
    dead.wait()
    top = os.path.dirname(site.staging)
    stale = [os.path.join(top, f'.desi_transfer_daemon_state.json.{dead.pid}.tmp'),
             os.path.join(site.status_dir, f'.desi_transfer_status_2026.json.{dead.pid}.tmp')]
    os.makedirs(site.status_dir)
    for path in stale:
        with open(path, 'w') as f:
            f.write('{')
    assert site.run() == 0
    assert not any(os.path.exists(p) for p in stale)


def test_forgotten_kill_file_is_emailed_once_a_day(site):
    site.exposure(LAST, '00002400')
    open(site.kill, 'w').close()
    for _ in range(3):  # cron, every few minutes
        assert site.run() == 0
    assert not os.path.exists(site.dest(LAST))
    assert site.smtp.wait(1, timeout=10)
    assert not site.smtp.wait(2, timeout=0.5)
    assert f'{site.kill} exists' in site.smtp.messages[0].get_content()
    site.clock(2026, 11, 21, 21, 0, 0)
    assert site.run() == 0
    assert site.smtp.wait(2, timeout=10)
    os.remove(site.kill)
    assert site.run() == 0
    site.assert_verified(LAST, '00002400')


def test_new_exposure_wakes_the_daemon(site, caplog):
    """Between passes the daemon watches the mountain: an exposure linked
    during a one-minute sleep is at NERSC seconds later, not a minute later."""
    from desitransfer.configuration import read_configuration
    site.write_config(sleep='1m')
    assert read_configuration(site.config)[1]['sleep'] == 60
    site.write_config(sleep='2h')
    assert read_configuration(site.config)[1]['sleep'] == 7200
    site.write_config(sleep='60s')
    site.exposure(LAST, '00002500')
    proc = site.start('--debug')
    try:
        deadline = time.monotonic() + 60
        while 'Sleeping 60 seconds' not in site.log_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        site.assert_verified(LAST, '00002500')
        time.sleep(1.5)  # the watch has started
        t0 = time.monotonic()
        site.exposure(LAST, '00002501')
        while not os.path.isdir(site.dest(LAST, '00002501')):
            assert time.monotonic() - t0 < 20, 'not woken by the new link'
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        assert seconds < 10, seconds
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert 'the next pass starts now' in site.log_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    site.assert_verified(LAST, '00002501')


def test_morning_report(site, caplog):
    """Once the backup hour of a night has passed, one email says how it went:
    exposures, failures and retries, late files, the archive, the latency, the
    audit; not as an alarm, once per night, not in test mode."""
    caplog.set_level(logging.INFO)
    for j in range(3):
        site.exposure(LAST, f'{2600 + j:08d}')
    broken = site.exposure(LAST, '00002603', checksum=False)
    site.write_config(report='yes')
    site.clock(2026, 11, 20, 10, 0, 0)  # the night is still going on: no report
    assert site.run() == 0
    assert not site.smtp.wait(2, timeout=0.5)  # only the alert of 00002603
    site.smtp.clear()
    # A late file for the morning catch-up, listed in the checksum file.
    from desitransfer.simulator import checksum_text
    files = exposure_files('00002600')
    files['late.json'] = b'{}\n'
    for name in ('late.json', 'checksum-00002600.sha256sum'):
        with open(os.path.join(site.data, LAST, '00002600', name), 'wb') as f:
            f.write(files[name] if name in files else checksum_text(files).encode())
    site.clock(2026, 11, 20, 15, 0, 0)
    site.write_config(report='yes', catchup='14', backup='20')
    assert site.run() == 0
    assert not site.smtp.wait(1, timeout=0.5)  # before the backup hour
    site.clock(*NOW)
    assert site.run('--test') == 0
    assert 'Test mode, would email the report of night 20261119' in caplog.text
    assert not site.smtp.wait(1, timeout=0.5)
    assert site.run() == 0
    assert site.smtp.wait(1, timeout=10)
    report = site.smtp.messages[-1]
    assert report['Subject'].startswith('desi_transfer_daemon: night 20261119 (')
    assert 'Error reported' not in report['Subject']
    body = report.get_content()
    assert '4 exposures installed, 3 verified, 1 with checksum errors (00002603)' in body
    # Its retries ran out on the third pass, so the night was archived.
    assert 'Being transferred again: none; given up: 20261119/00002603.' in body
    assert 'Late files caught up in: 00002600.' in body
    assert ('On tape as desi/spectro/data/desi_spectro_data_20261119.tar, 4 exposures '
            'recorded as archived.') in body
    assert 'Latency from link to verified (' in body and 'median' in body
    assert 'Audit: 1 disagreement:\n  00002603 nersc: its checksum file' in body
    assert os.path.isdir(broken)
    # Once per night.
    n = len(site.smtp.messages)
    assert site.run() == 0
    assert not site.smtp.wait(n + 1, timeout=0.5)


def test_morning_report_waits_for_the_mail_server(site, caplog):
    caplog.set_level(logging.INFO)
    from conftest import free_port
    site.exposure(LAST, '00002700')
    site.write_config(report='yes', backup='20')
    good = site.smtp.hostport
    site.smtp.hostport = f'127.0.0.1:{free_port()}'  # nothing listens there
    site.write_config(report='yes', backup='20')
    assert site.run() == 0
    assert 'Could not email the report of night 20261119' in caplog.text
    assert '20261119 report' not in site.state()['reported']
    site.smtp.hostport = good
    site.write_config(report='yes', backup='20')
    assert site.run() == 0
    assert site.smtp.wait(1, timeout=10)
    assert site.smtp.messages[0]['Subject'] == 'desi_transfer_daemon: night 20261119 complete'
    assert '20261119 report' in site.state()['reported']


def test_tape_index_reads_only_whole_member_lines():
    """The index of an archive (``htar -tvf``) holds an exposure only on a
    whole member line (mode, owner, size, date, name) of that night: a line
    that merely ends with ``NIGHT/EXPID``, a member of another night or a
    name that is not an exposure counts for nothing.  An answer without
    ``HTAR SUCCESSFUL`` is unknown, with what htar said."""
    class Asked(object):
        test, stop = False, None

        def __init__(self, answer):
            self.answer, self.commands = answer, []

        def ask(self, command, **kwargs):
            self.commands.append(command)
            return self.answer

    listing = '\n'.join([
        f'HTAR: drwxr-s--- desi/desi            0 2026-11-20 08:00  {LAST}/00001800/',
        f'HTAR: -r--r----- desi/desi         1024 2026-11-20 08:00  {LAST}/00001800/a.fits',
        f'HTAR: -r--r----- desi/desi          512 2026-11-20 08:00  {LAST}/00001801/b.fits',
        f'HTAR: {LAST}/00001802',
        f'HTAR: lrwxrwxrwx desi/desi            0 2026-11-20 08:00  {LAST}/00001803/l',
        f'HTAR: -r--r----- desi/desi           10 2026-11-20 08:00  {EARLIER}/00001804/c',
        f'HTAR: -r--r----- desi/desi           10 2026-11-20 08:00  {LAST}/notanexp/c',
        'HTAR: HTAR SUCCESSFUL', ''])
    asked = Asked(Result(0, listing, ''))
    archive = Archive('', 'http://127.0.0.1:9/', None, asked)
    found, why = archive.index('desi/spectro/data', LAST)
    assert why == '' and asked.commands == [
        ['htar', '-tvf', f'desi/spectro/data/desi_spectro_data_{LAST}.tar']]
    assert found == {'00001800': {'a.fits': 1024}, '00001801': {'b.fits': 512},
                     '00001803': {}}
    assert archive.exposures('desi/spectro/data', LAST) == {
        f'{LAST}/00001800', f'{LAST}/00001801', f'{LAST}/00001803'}
    failed = Archive('', 'http://127.0.0.1:9/', None,
                     Asked(Result(72, '', 'HTAR: HTAR FAILED\n')))
    assert failed.index('desi/spectro/data', LAST) == (
        None, 'htar returned 72: HTAR: HTAR FAILED')
    assert failed.exposures('desi/spectro/data', LAST) is None


def test_stop_during_the_hpss_status_request(hpss_status_server, caplog):
    """A stop while the HPSS status service is slow to answer ends the wait
    at once (the request's end and the stop wake it): "not now", said once."""
    caplog.set_level(logging.INFO)
    hpss_status_server.set_delay(20)
    stop = Stop()
    archive = Archive('', hpss_status_server.url, None, actions.Actions(stop))
    threading.Timer(0.3, stop.set, ('SIGTERM received',)).start()
    t0 = time.monotonic()
    assert archive.available() is False
    assert time.monotonic() - t0 < 2
    assert caplog.text.count('archiving waits') == 1
    hpss_status_server.set_delay(0)
