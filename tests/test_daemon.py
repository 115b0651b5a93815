# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of desi_transfer_daemon on good days, and of its documented API,
against a real sshd, rsync, SMTP and HTTP server on 127.0.0.1 and the HPSS
emulator.  The fixtures are in ``fixtures_daemon.py``."""
import json
import logging
import os
import stat
import subprocess
import time

import pytest

from desitransfer import daemon, tape
from desitransfer.alerts import configure_log
from desitransfer.configuration import ConfigurationError, read_configuration
from desitransfer.daemon import TransferDaemon, lock_directory, rsync_night, unlock_directory
from desitransfer.daemon import transfer
from desitransfer.executor import for_mode
from desitransfer.simulator import checksum_text, exposure_files
from fixtures_daemon import EARLIER, LAST, NOW, TONIGHT, snapshot
from helpers import mode, refuse_chmod


def test_good_exposures_and_malformed_links(site, caplog):
    caplog.set_level(logging.INFO)
    for i, night in enumerate((EARLIER, LAST)):
        for j in range(3):
            site.exposure(night, f'{100 + 10 * i + j:08d}')
    # Malformed links: never copied, also not by the catch-up.
    real = os.path.join(site.data, LAST, '00000110')
    os.symlink(real, os.path.join(site.source, LAST, 'abc'))
    os.makedirs(os.path.join(site.source, '20261399'))
    os.symlink(real, os.path.join(site.source, '20261399', '00000999'))
    os.symlink(real, os.path.join(site.source, 'stray'))
    assert site.run() == 0
    for i, night in enumerate((EARLIER, LAST)):
        # The original's night directories: group-readable, setgid.
        assert mode(site.dest(night)) == 0o2750
        for j in range(3):
            expid = f'{100 + 10 * i + j:08d}'
            site.assert_verified(night, expid)
            assert site.status_rows()[(night, int(expid))] == {0: 1, 1: 1}
            assert not os.path.exists(os.path.join(site.staging, night, expid))
    assert sorted(os.listdir(site.dest(LAST))) == ['00000110', '00000111', '00000112']
    assert sorted(os.listdir(site.destination)) == [EARLIER, LAST]
    assert f'{LAST}/abc at dts is not transferred: not NIGHT/EXPID' in caplog.text
    assert 'stray at dts is not transferred: not a night directory' in caplog.text
    assert '20261399 at dts is not transferred: not a night directory' in caplog.text
    assert site.smtp.messages == []
    # A second pass changes nothing and says nothing again about the bad links.
    before = open(os.path.join(site.status_dir, 'desi_transfer_status_2026.json'), 'rb').read()
    caplog.clear()
    assert site.run() == 0
    assert 'new exposure' not in caplog.text
    assert 'not transferred' not in caplog.text
    after = open(os.path.join(site.status_dir, 'desi_transfer_status_2026.json'), 'rb').read()
    assert before == after
    assert os.path.exists(os.path.join(site.status_dir, 'index.html'))


def test_corrupted_file_alerts_once_and_recovers(site, caplog):
    caplog.set_level(logging.INFO)
    good = exposure_files('00000200')
    directory = site.exposure(LAST, '00000200')
    name = sorted(good)[0]
    with open(os.path.join(directory, name), 'r+b') as f:
        f.seek(100)
        f.write(b'corrupt')
    site.exposure(LAST, '00000201')
    assert site.run() == 0
    rows = site.status_rows()
    assert rows[(LAST, 200)] == {0: 1, 1: 0}
    assert rows[(LAST, 201)] == {0: 1, 1: 1}
    # A complete copy is installed even though its checksum fails.
    assert os.path.isdir(site.dest(LAST, '00000200'))
    assert site.smtp.wait(1, timeout=10)
    message = site.smtp.messages[0]
    assert message['Subject'] == 'Error reported by desi_transfer_daemon!'
    body = message.get_content()
    assert f'{LAST}/00000200' in body and name in body and 'installed' in body
    # The next pass tries again, still failing: logged, not emailed again.
    assert site.run() == 0
    assert not site.smtp.wait(2, timeout=0.5)
    assert 'try 1 of 2' in caplog.text
    # Fixed at the mountain: the retry installs the good file and records success.
    with open(os.path.join(directory, name), 'wb') as f:
        f.write(good[name])
    os.utime(os.path.join(directory, name), (time.time() + 5, time.time() + 5))
    assert site.run() == 0
    site.assert_verified(LAST, '00000200')
    assert 'is now transferred and verified' in caplog.text
    assert site.state()['retries'] == {}


def test_retries_are_bounded(site, caplog):
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000300', checksum=False)
    for _ in range(4):
        assert site.run() == 0
    assert site.status_rows()[(LAST, 300)] == {0: 1, 1: 0}
    assert caplog.text.count('Transferring exposure 20261119/00000300 again') == 2
    assert 'giving up' in caplog.text
    assert site.smtp.wait(2, timeout=10)
    assert not site.smtp.wait(3, timeout=0.5)  # the first failure, and giving up
    assert site.state()['given_up'] == [f'{LAST}/00000300']


def test_checksum_lock_waits(site, caplog):
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000400')
    lock = os.path.join(site.mountain, 'checksum-running')
    open(lock, 'w').close()
    assert site.run() == 0
    assert not os.path.exists(site.dest(LAST))
    assert 'Checksums are being computed' in caplog.text
    os.remove(lock)
    assert site.run() == 0
    site.assert_verified(LAST, '00000400')


def test_test_mode_changes_nothing(site, caplog):
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000500')
    site.exposure(EARLIER, '00000501')
    assert site.run('--no-backup') == 0
    site.exposure(LAST, '00000502')
    site.write_config(catchup='14', backup='20')
    before = snapshot(site.top, skip={str(site.hpss.log)})
    caplog.clear()
    assert site.run('--test') == 0
    assert snapshot(site.top, skip={str(site.hpss.log)}) == before
    assert 'Test mode, would run: /bin/rsync' in caplog.text
    assert f'Test mode, would move {site.staging}/{LAST}/00000502' in caplog.text
    assert 'Test mode, would record rsync success of 20261119/00000502' in caplog.text
    for night in (EARLIER, LAST):
        assert (f'Test mode, would run: {site.hpss.htar} -cvhf '
                f'desi/spectro/data/desi_spectro_data_{night}.tar') in caplog.text
        assert f'Test mode, would remove user write permission in {site.dest(night)}' \
            in caplog.text
    # Only questions that read reached HPSS, and nothing was emailed.
    calls = site.hpss.calls()
    assert calls and all(os.path.basename(c[0]) == 'hsi' and 'ls' in c for c in calls)
    assert site.smtp.messages == []
    assert f'Test mode, would take the lock {site.top}/' in caplog.text
    # A pass that cannot do its job exits 1 in test mode too, and still
    # changes nothing (no retry count, no alert).
    down = os.path.join(site.top, 'ssh-down')
    with open(down, 'w') as f:
        f.write('#!/bin/sh\necho "ssh: connect to host dts port 22: Connection refused" >&2\n'
                'exit 255\n')
    os.chmod(down, 0o755)
    site.write_config(ssh=down, catchup='14', backup='20')
    before = snapshot(site.top, skip={str(site.hpss.log), site.config})
    assert site.run('--test') == 1
    assert snapshot(site.top, skip={str(site.hpss.log), site.config}) == before
    assert site.smtp.messages == []


def test_late_file_catchup_and_backup(site, caplog):
    caplog.set_level(logging.INFO)
    for night in (EARLIER, LAST, TONIGHT):
        for j in range(2):
            site.exposure(night, f'{int(night[-2:]) * 10 + j:08d}')
    # Night 20261119 is still going on (before 12:00 MST on the 20th): everything is
    # transferred, and only the night before is due for its catch-up and tape archive.
    site.clock(2026, 11, 20, 10, 0, 0)
    site.write_config(catchup='14', backup='20')
    assert site.run() == 0
    assert [c[-1] for c in site.htar_calls()] == [EARLIER]
    calls = len(site.hpss.calls())
    # A late file appears in an exposure of last night.
    late_expid = '00000190'
    directory = os.path.join(site.data, LAST, late_expid)
    files = exposure_files(late_expid)
    files['late-00000190.json'] = b'{"late": true}\n'
    with open(os.path.join(directory, 'late-00000190.json'), 'wb') as f:
        f.write(files['late-00000190.json'])
    with open(os.path.join(directory, f'checksum-{late_expid}.sha256sum'), 'w') as f:
        f.write(checksum_text(files))
    # Morning: catch-up picks it up; no backup before 20 UTC.
    site.clock(2026, 11, 20, 15, 0, 0)
    assert site.run() == 0
    assert os.path.exists(site.dest(LAST, late_expid, 'late-00000190.json'))
    assert mode(site.dest(LAST, late_expid, 'late-00000190.json')) == 0o440
    assert len(site.hpss.calls()) == calls
    assert site.status_rows()[(LAST, 190)] == {0: 1, 1: 1}
    assert f'Night {LAST}: late or changed files in exposures 00000190' in caplog.text
    # Afternoon: archive both finished nights, not tonight.
    site.clock(*NOW)
    assert site.run() == 0
    assert [c[1:] for c in site.htar_calls()] == [
        ['-cvhf', f'desi/spectro/data/desi_spectro_data_{night}.tar', '-H',
         'crc:verify=all', night] for night in (EARLIER, LAST)]
    members = site.hpss.members(f'desi/spectro/data/desi_spectro_data_{LAST}.tar')
    assert f'{LAST}/{late_expid}/late-00000190.json' in members
    rows = site.status_rows()
    for night in (EARLIER, LAST):
        for j in range(2):
            assert rows[(night, int(night[-2:]) * 10 + j)] == {0: 1, 1: 1, 2: 1}
    for j in range(2):
        assert 2 not in rows[(TONIGHT, 200 + j)]
    assert mode(site.dest(LAST)) == 0o2550
    assert not mode(site.dest(LAST, late_expid)) & stat.S_IWUSR
    # Again: no second archive, no duplicate rows.
    n = len(site.htar_calls())
    assert site.run() == 0
    assert len(site.htar_calls()) == n
    assert site.status_rows() == rows
    assert site.smtp.messages == []


def test_hpss_status_not_active(site, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000600')
    site.write_config(backup='20')
    monkeypatch.setattr(tape, 'HPSS_STATUS_TIMEOUT', 1)
    troubles = {
        "says the archive is 'down'": lambda: site.hpss_status.set_status('down'),
        'did not answer (JSONDecodeError': lambda: site.hpss_status.set_raw(
            b'<html>maintenance</html>', content_type='text/html'),
        'did not answer (HTTP 500': lambda: site.hpss_status.set_raw(b'{"status": "active"}',
                                                                     code=500),
        'did not answer (no answer within 1 s)': lambda: site.hpss_status.set_delay(3),
    }
    for message, trouble in troubles.items():
        trouble()
        caplog.clear()
        assert site.run() == 0
        assert message in caplog.text, caplog.text
        assert 'archiving waits' in caplog.text
        assert 'Traceback' not in caplog.text
        assert site.hpss.calls() == []
        assert 2 not in site.status_rows()[(LAST, 600)]
        site.hpss_status.set_delay(0)
    site.hpss_status.set_status('active')
    assert site.run() == 0
    assert site.status_rows()[(LAST, 600)] == {0: 1, 1: 1, 2: 1}
    assert site.smtp.messages == []


def test_htar_failure_is_retried(site, caplog):
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000700')
    site.write_config(backup='20')
    site.hpss.fail('htar')
    assert site.run() == 1  # --once: the pass did not do its job
    assert 2 not in site.status_rows()[(LAST, 700)]
    assert site.smtp.wait(1, timeout=10)
    assert 'Archiving night 20261119' in site.smtp.messages[0].get_content()
    site.hpss.heal()
    assert site.run() == 0
    assert site.status_rows()[(LAST, 700)] == {0: 1, 1: 1, 2: 1}
    assert site.hpss.members(f'desi/spectro/data/desi_spectro_data_{LAST}.tar')


def test_kill_file_stops_loop(site):
    open(site.kill, 'w').close()
    command, env = site.command()
    p = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    assert 'exists; stopping' in p.stdout


def test_killed_mid_pass_converges(site):
    expids = [f'{900 + i:08d}' for i in range(40)]
    for e in expids:
        site.exposure(LAST, e, nfiles=3, size=500_000)
    command, env = site.command('--once')
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Kill it while the night's backlog is arriving in staging.
    staging = os.path.join(site.staging, LAST)
    deadline = time.monotonic() + 60
    while not (os.path.isdir(staging) and os.listdir(staging)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    installed = os.listdir(site.dest(LAST)) if os.path.isdir(site.dest(LAST)) else []
    assert len(installed) < len(expids)
    subprocess.run(command, env=env, capture_output=True, timeout=120, check=True)
    for e in expids:
        site.assert_verified(LAST, e, nfiles=3, size=500_000)
    assert os.listdir(os.path.join(site.staging, LAST)) == []


def test_bad_configuration(tmp_path, monkeypatch):
    for var in ('DESI_ROOT', 'DESI_SPECTRO_DATA', 'SCRATCH'):
        monkeypatch.setenv(var, f'/global/{var.lower()}')
    directories, conf, logging_ = read_configuration()  # the shipped default
    assert directories[0].staging == '/global/desi_root/spectro/staging/raw'
    assert directories[0].destination == '/global/desi_spectro_data'
    assert directories[0].data_root == ''
    assert (conf['catchup'], conf['backup'], conf['host']) == (14, 20, 'dts')
    assert (conf['sleep'], conf['recent'], conf['retries']) == (60, 30, 5)
    assert logging_['smtp'] == 'localhost:25'
    monkeypatch.delenv('NO_SUCH_VARIABLE', raising=False)
    cases = {
        'missing': (None, 'cannot be read'),
        'nokey': ('[D]\nsource = /a\nstaging = /b\ndestination = /c\nhpss = x\n',
                  'checksum_file is missing'),
        'badhour': ('[D]\nsource = /a\nstaging = /b\ndestination = /c\nhpss = x\n'
                    'checksum_file = c-{exposure}\n[common]\nhost =\nssh = ssh\n'
                    'temporary = /tmp\nchecksum_lock = /tmp/x\ncatchup = noon\n',
                    r"\[common\] catchup = 'noon' is not valid"),
        'env': ('[D]\nsource = ${NO_SUCH_VARIABLE}/a\n', 'NO_SUCH_VARIABLE is not set'),
        'syntax': ('no section header\n', 'configuration file'),
        'dataroot': ('[D]\nsource = /a\nstaging = /b\ndestination = /c\nhpss = x\n'
                     'checksum_file = c-{exposure}\ndata_root = data\n', 'data_root'),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f'{name}.ini'
        if text is not None:
            path.write_text(text)
        with pytest.raises(ConfigurationError, match=message):
            read_configuration(str(path))
        p = subprocess.run(['desi_transfer_daemon', '--once', '-c', str(path)],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert p.returncode == 1
        lines = [line for line in p.stdout.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith('CRITICAL') and str(path) in lines[0]
    assert sorted(os.listdir(tmp_path)) == sorted(f'{n}.ini' for n in cases if n != 'missing')


def test_bad_option():
    p = subprocess.run(['desi_transfer_daemon', '--no-such-option'], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2
    assert 'unrecognized arguments' in p.stderr


def test_lock_unlock(tmp_path):
    d = tmp_path / 'e'
    (d / 'sub').mkdir(parents=True)
    (d / 'f').write_text('x')
    (d / 'sub' / 'g').write_text('y')
    outside = tmp_path / 'outside'
    outside.write_text('z')
    os.chmod(outside, 0o600)
    (d / 'link').symlink_to(outside)
    (d / 'dangling').symlink_to(tmp_path / 'nothing')
    lock_directory(str(d))
    assert mode(d) == 0o2750 and mode(d / 'sub') == 0o2750
    assert mode(d / 'f') == 0o440 and mode(d / 'sub' / 'g') == 0o440
    assert mode(outside) == 0o600  # links are never followed
    unlock_directory(str(d))
    assert mode(d / 'f') == 0o640 and mode(d) & stat.S_IWUSR
    assert mode(outside) == 0o600
    lock_directory(str(d), test=True)
    assert mode(d / 'f') == 0o640


def test_lock_failure_locks_the_rest_then_raises(tmp_path, monkeypatch):
    """One path that cannot be locked: the others are, then its error is raised."""
    d = tmp_path / 'e'
    d.mkdir()
    for name in ('a', 'b', 'c'):
        (d / name).write_text(name)
    refuse_chmod(monkeypatch, '/b')
    with pytest.raises(PermissionError) as err:
        lock_directory(str(d))
    assert err.value.filename == str(d / 'b')
    assert (mode(d), mode(d / 'a'), mode(d / 'c')) == (0o2750, 0o440, 0o440)


def test_dry_run_changes_nothing(tmp_path, caplog):
    """The test mode of every command: each change said, none made."""
    path = tmp_path / 'f.txt'
    path.write_text('old\n')
    dry = for_mode(True, None)
    quiet = for_mode(True, None, ask=False)
    with caplog.at_level(logging.INFO):
        assert dry.write_file(str(path), 'new\n') is False
        dry.remove_file(str(path))
        lock, holder = dry.single_instance(str(tmp_path / 'x.lock'))
        with lock:
            assert holder is None
        with dry.open_append(str(tmp_path / 'log'), binary=True) as f:
            f.write(b'nothing')
        assert dry.lock_tree(str(tmp_path)) == []
        assert dry.wait('it happens', lambda: pytest.fail('waited')) is True
        assert dry.ask(['echo', 'asked']).stdout == 'asked\n'
        assert quiet.ask(['echo', 'asked']) is None
        assert dry.query('download it', lambda: 'answer') == 'answer'
        assert quiet.query('download it', lambda: pytest.fail('asked')) is None
        scratch = dry.scratch('desitransfer-dry-')
        assert not os.path.exists(scratch)
    assert path.read_text() == 'old\n' and sorted(os.listdir(tmp_path)) == ['f.txt']
    assert mode(tmp_path) != 0o2750
    said = caplog.text
    for line in (f'Test mode, would write {path}:\nnew', f'Test mode, would remove {path}.',
                 'Test mode, would take the lock ', 'Test mode, would lock ',
                 'Test mode, would wait until it happens.', 'Test mode, would run: echo asked',
                 'Test mode, would download it.', f'would create the private directory {scratch}'):
        assert line in said, line
    real = for_mode(False, None)
    assert real.write_file(str(path), 'new\n') is True and path.read_text() == 'new\n'
    real.remove_file(str(path))
    real.remove_file(str(path))
    assert not path.exists()
    scratch = real.scratch('desitransfer-real-')
    try:
        assert stat.S_IMODE(os.stat(scratch).st_mode) == 0o700
    finally:
        os.rmdir(scratch)


def test_verify_checksum_exported():
    from desitransfer import checksum
    assert daemon.verify_checksum is checksum.verify_checksum


def test_popen_is_the_runner(tmp_path):
    assert daemon._popen(['sh', '-c', 'echo out; echo err >&2; exit 3']) == ('3', 'out\n',
                                                                             'err\n')


def test_rsync_night_by_hand(site, monkeypatch, caplog):
    """rsync_night: unlock, copy the night's exposures from their physical
    directories at the mountain, lock again; a link to anywhere else (a key
    pair beside the data, say) is reported and never read."""
    site.exposure(LAST, '00000001')
    assert site.run() == 0
    extra = os.path.join(site.data, LAST, '00000001', 'late.txt')
    with open(extra, 'w') as f:
        f.write('late\n')
    private = os.path.join(site.top, 'private')
    os.makedirs(private)
    with open(os.path.join(private, 'id_ed25519'), 'w') as f:
        f.write('secret\n')
    os.symlink(private, os.path.join(site.source, LAST, '00000002'))
    monkeypatch.setenv('RSYNC_RSH', site.ssh)
    lock_directory(site.dest(LAST))
    result = rsync_night(site.source, site.destination, LAST)
    assert result.returncode == 0, result
    with open(site.dest(LAST, '00000001', 'late.txt')) as f:
        assert f.read() == 'late\n'
    assert mode(site.dest(LAST, '00000001', 'late.txt')) == 0o440
    assert mode(site.dest(LAST)) == 0o2750
    assert sorted(os.listdir(site.dest(LAST))) == ['00000001']
    assert f'{LAST}/00000002 at dts is not copied' in caplog.text
    # The mountain cannot be asked: nothing is done, status 1.
    monkeypatch.setenv('RSYNC_RSH', '/bin/false')
    assert rsync_night(site.source, site.destination, LAST).returncode == 1


def test_batches_and_outcome_times(site, caplog, monkeypatch):
    """A backlog is copied in batches; each status row carries the time of its outcome."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(transfer, 'BATCH', 2)
    for j in range(5):
        site.exposure(LAST, f'{1000 + j:08d}')
    assert site.run() == 0
    copies = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith('Running: /bin/rsync') and '--include' in
              r.getMessage()]
    assert len(copies) == 3
    with open(os.path.join(site.status_dir, 'desi_transfer_status_2026.json')) as f:
        night = json.load(f)[LAST]
    for j in range(5):
        site.assert_verified(LAST, f'{1000 + j:08d}')
        rows = {stage: (ok, ms) for stage, ok, ms in night[str(1000 + j)]}
        assert rows[0][1] <= rows[1][1]  # rsync finished before the verification


def test_corrupted_state_files_are_all_kept(site, caplog):
    caplog.set_level(logging.INFO)
    for n, junk in enumerate(('{not json', '[]')):
        with open(site.state_file, 'w') as f:
            f.write(junk)
        TransferDaemon(site.options())
        configure_log()
        kept = site.state_file + '.bad' + (f'.{n:d}' if n else '')
        with open(kept) as f:
            assert f.read() == junk
        assert f'kept as {kept}' in caplog.text


def test_night_unlinked_before_archive_is_archived(site):
    """A night removed from the mountain's transfer area is still archived."""
    site.exposure(LAST, '00001400')
    assert site.run('--no-backup') == 0
    os.remove(os.path.join(site.source, LAST, '00001400'))
    os.rmdir(os.path.join(site.source, LAST))
    site.write_config(catchup='14', backup='20')
    assert site.run() == 0
    assert site.status_rows()[(LAST, 1400)] == {0: 1, 1: 1, 2: 1}
    assert site.hpss.members(f'desi/spectro/data/desi_spectro_data_{LAST}.tar')


def test_documented_methods(site):
    """checksum_lock, exposure, checksum and hpss_status, as documented, on their own."""
    site.exposure(LAST, '00001500')
    d = TransferDaemon(site.options())
    try:
        assert d.checksum_lock() is False
        lock = os.path.join(site.mountain, 'checksum-running')
        open(lock, 'w').close()
        assert d.checksum_lock() is True
        os.remove(lock)
        assert d.hpss_status() is True
        status = d._status(d.directories[0])
        assert d.exposure(d.directories[0], f'{LAST}/00001500', status) is True
        assert status.records(LAST, '00001500', 'checksum')[0][1] == 1
        assert mode(site.dest(LAST, '00001500')) == 0o2750
        assert d.exposure(d.directories[0], f'{LAST}/00001599', status) is False
        target = site.dest(LAST, '00001500', sorted(exposure_files('00001500'))[0])
        os.chmod(target, 0o640)
        with open(target, 'ab') as f:
            f.write(b'more')
        assert d.checksum(site.dest(LAST, '00001500', 'checksum-00001500.sha256sum'),
                          status) is None
        assert status.records(LAST, '00001500', 'checksum')[0][1] == 0
    finally:
        d.mountain.close()
        configure_log()


def test_link_time_recorded_for_latency(site):
    """The time a link appeared at the mountain is recorded (stage linked), so
    that latency runs from it to the verification."""
    directory = site.exposure(LAST, '00001600')
    link = os.path.join(site.source, LAST, '00001600')
    os.utime(link, (1795000000.25, 1795000000.25), follow_symlinks=False)
    assert site.run() == 0
    assert site.status_rows(linked=True)[(LAST, 1600)] == {0: 1, 1: 1, 3: 1}
    with open(os.path.join(site.status_dir, 'desi_transfer_status_2026.json')) as f:
        rows = {stage: ms for stage, ok, ms in json.load(f)[LAST]['1600']}
    assert rows[3] == 1795000000250 and rows[0] <= rows[1]
    assert os.path.isdir(directory)
