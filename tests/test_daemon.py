# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of desitransfer.daemon against a real sshd, rsync, SMTP and HTTP server
on 127.0.0.1 and the HPSS emulator."""
import datetime as dt
import json
import logging
import os
import signal
import stat
import subprocess
import time
from types import SimpleNamespace

import pytest

from desitransfer import common, daemon
from desitransfer.common import configure_log
from desitransfer.configuration import ConfigurationError, read_configuration
from desitransfer.daemon import TransferDaemon, _options, lock_directory, unlock_directory
from desitransfer.mountain import checksum_text, exposure_files, make_exposure

#: The fake present: tonight is 20261120 (in progress), 20261119 and 20261118 are finished.
NOW = (2026, 11, 20, 21, 0, 0)
TONIGHT, LAST, EARLIER = '20261120', '20261119', '20261118'


@pytest.fixture(autouse=True)
def reset_log():
    yield
    configure_log()


@pytest.fixture
def clock(monkeypatch):
    """Set the UTC time seen by the package."""
    def set_time(*args):
        t = dt.datetime(*args, tzinfo=dt.timezone.utc)
        monkeypatch.setattr(common, '_utcnow', lambda: t)
    set_time(*NOW)
    return set_time


class Site(SimpleNamespace):
    """A mountain, a NERSC tree and a configuration for one test."""

    def exposure(self, night, expid, files=None, checksum=True):
        return make_exposure(self.data, self.source, night, expid, files=files,
                             checksum=checksum)

    def terminate_when(self, ready, *args, poll=0.01, settle=0.0):
        """Start the daemon with `args`, send SIGTERM once ``ready()`` (and
        `settle` seconds more); return its exit status, its output and the
        seconds it took to stop."""
        command, env = self.command(*args)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while not ready():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(poll)
            time.sleep(settle)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
            return proc.returncode, out, time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()

    def ssh_wrapper(self, name, rsync_first):
        """Configure an ssh program that runs the shell line `rsync_first` before
        connecting for rsync, then the real ``dts`` wrapper."""
        wrapper = os.path.join(self.top, name)
        with open(wrapper, 'w') as f:
            f.write(f'#!/bin/sh\ncase "$*" in *"rsync --server"*) {rsync_first};; esac\n'
                    f'exec {self.ssh} "$@"\n')
        os.chmod(wrapper, 0o755)
        self.write_config(ssh=wrapper)

    def dest(self, *parts):
        return os.path.join(self.destination, *parts)

    def status_rows(self):
        rows = {}
        for name in sorted(os.listdir(self.status_dir)) if os.path.isdir(self.status_dir) else []:
            if name.startswith('desi_transfer_status_') and name.endswith('.json'):
                with open(os.path.join(self.status_dir, name)) as f:
                    for night, exposures in json.load(f).items():
                        for expid, r in exposures.items():
                            rows[(night, int(expid))] = {row[0]: row[1] for row in r}
                            assert len({row[0] for row in r}) == len(r), 'duplicate rows'
        return rows

    def options(self, *args):
        return _options(['--configuration', self.config, '--kill', self.kill, '--once']
                        + list(args))

    def run(self, *args):
        d = TransferDaemon(self.options(*args))
        code = d.run()
        configure_log()
        return code

    def command(self, *args, **kwargs):
        env = dict(os.environ, HPSS_EMULATOR_ROOT=self.hpss.root)
        env.update(kwargs.pop('env', {}))
        return (['desi_transfer_daemon', '--configuration', self.config, '--kill', self.kill]
                + list(args)), env


def write_config(site, **common_overrides):
    conf = {'host': 'dts', 'ssh': site.ssh, 'temporary': site.scratch,
            'checksum_lock': os.path.join(site.top, 'mountain', 'checksum-running'),
            'catchup': '30', 'backup': '30', 'sleep': '0.02', 'retries': '2',
            'hpss': site.hpss.bin, 'hpss_status': site.hpss_status.url}
    conf.update(common_overrides)
    with open(site.config, 'w') as f:
        f.write(f"""[DESI_SPECTRO_DATA]
source = {site.source}
staging = {site.staging}
destination = {site.destination}
hpss = desi/spectro/data
checksum_file = checksum-{{exposure}}.sha256sum

[common]
""" + ''.join(f'{k} = {v}\n' for k, v in conf.items()) + f"""
[logging]
filename = {site.top}/nersc/logs/desi_transfer_daemon.log
size = 1000000
backups = 2
to = desi-alarms@example.org
smtp = {site.smtp.hostport}
""")


@pytest.fixture
def site(tmp_path, dts, hpss, hpss_status_server, smtp_server, clock):
    top = str(tmp_path)
    s = Site(top=top, data=f'{top}/mountain/data', source=f'{top}/mountain/dts',
             staging=f'{top}/nersc/staging/raw', destination=f'{top}/nersc/spectro/data',
             status_dir=f'{top}/nersc/staging/status', scratch=f'{top}/scratch',
             config=f'{top}/daemon.ini', kill=f'{top}/stop', ssh=dts.ssh, hpss=hpss,
             hpss_status=hpss_status_server, smtp=smtp_server, clock=clock)
    for d in (s.source, s.staging, s.destination, s.scratch):
        os.makedirs(d)
    write_config(s)
    s.write_config = lambda **kw: write_config(s, **kw)
    return s


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


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
    rows = site.status_rows()
    for i, night in enumerate((EARLIER, LAST)):
        for j in range(3):
            expid = f'{100 + 10 * i + j:08d}'
            dest = site.dest(night, expid)
            for name, data in exposure_files(expid).items():
                with open(os.path.join(dest, name), 'rb') as f:
                    assert f.read() == data
                assert mode(os.path.join(dest, name)) == 0o440
            assert mode(dest) == 0o2750
            assert rows[(night, int(expid))] == {0: 1, 1: 1}
            assert not os.path.exists(os.path.join(site.staging, night, expid))
    assert sorted(os.listdir(site.dest(LAST))) == ['00000110', '00000111', '00000112']
    assert not os.path.exists(site.dest('20261399'))
    assert not os.path.exists(site.dest('stray'))
    assert 'Malformed link' in caplog.text and f'{LAST}/abc' in caplog.text
    assert site.smtp.messages == []
    # A second pass changes nothing.
    before = open(os.path.join(site.status_dir, 'desi_transfer_status_2026.json'), 'rb').read()
    caplog.clear()
    assert site.run() == 0
    assert 'Transferring exposure' not in caplog.text
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
    assert os.path.isdir(site.dest(LAST, '00000200'))  # installed regardless
    site.smtp.wait(1, timeout=10)
    assert len(site.smtp.messages) == 1
    message = site.smtp.messages[0]
    assert 'desi_transfer_daemon' in message['Subject']
    body = message.get_content() if hasattr(message, 'get_content') else str(message)
    assert f'{LAST}/00000200' in body and name in body
    # The next pass tries again, still failing: logged, not emailed again.
    assert site.run() == 0
    time.sleep(0.5)
    assert len(site.smtp.messages) == 1
    assert 'try 1 of 2' in caplog.text
    # Fixed at the mountain: the retry installs the good file and records success.
    with open(os.path.join(directory, name), 'wb') as f:
        f.write(good[name])
    os.utime(os.path.join(directory, name), (time.time() + 5, time.time() + 5))
    assert site.run() == 0
    assert site.status_rows()[(LAST, 200)] == {0: 1, 1: 1}
    with open(site.dest(LAST, '00000200', name), 'rb') as f:
        assert f.read() == good[name]
    assert mode(site.dest(LAST, '00000200', name)) == 0o440
    assert 'is now transferred and verified' in caplog.text


def test_retries_are_bounded(site, caplog):
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000300', checksum=False)
    for _ in range(4):
        assert site.run() == 0
    assert site.status_rows()[(LAST, 300)] == {0: 1, 1: 0}
    assert caplog.text.count('Transferring exposure 20261119/00000300 again') == 2
    assert 'giving up' in caplog.text
    site.smtp.wait(2, timeout=10)
    subjects = [m['Subject'] for m in site.smtp.messages]
    assert len(subjects) == 2  # the first failure, and giving up


def test_checksum_lock_waits(site, caplog):
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000400')
    lock = os.path.join(site.top, 'mountain', 'checksum-running')
    open(lock, 'w').close()
    assert site.run() == 0
    assert not os.path.exists(site.dest(LAST))
    assert 'Checksums are being computed' in caplog.text
    os.remove(lock)
    assert site.run() == 0
    assert os.path.isdir(site.dest(LAST, '00000400'))


def test_test_mode_changes_nothing(site, caplog):
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000500')
    site.exposure(EARLIER, '00000501')
    site.write_config(catchup='14', backup='20')

    def snapshot():
        out = {}
        for root, dirs, files in os.walk(site.top):
            for name in dirs + files:
                p = os.path.join(root, name)
                st = os.lstat(p)
                out[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
        return out

    before = snapshot()
    assert site.run('--test') == 0
    assert snapshot() == before
    assert 'Test mode, would run: /bin/rsync' in caplog.text
    assert site.hpss.calls() == [] or all(c[0].endswith('hsi') for c in site.hpss.calls())


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
    htar = [c for c in site.hpss.calls() if os.path.basename(c[0]) == 'htar']
    assert [c[-1] for c in htar] == [EARLIER]
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
    assert len(site.hpss.calls()) == calls
    assert site.status_rows()[(LAST, 190)] == {0: 1, 1: 1}
    # Afternoon: archive both finished nights, not tonight.
    site.clock(*NOW)
    assert site.run() == 0
    htar = [c for c in site.hpss.calls() if os.path.basename(c[0]) == 'htar']
    assert [c[1:] for c in htar] == [
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
    assert not mode(site.dest(LAST)) & stat.S_IWUSR
    assert not mode(site.dest(LAST, late_expid)) & stat.S_IWUSR
    # Again: no second archive, no duplicate rows.
    n = len(site.hpss.calls())
    assert site.run() == 0
    assert not [c for c in site.hpss.calls()[n:] if os.path.basename(c[0]) == 'htar']
    assert site.status_rows() == rows
    assert site.smtp.messages == []


def test_hpss_down_then_back(site, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000600')
    site.write_config(backup='20')
    monkeypatch.setattr(daemon, 'HPSS_STATUS_TIMEOUT', 1)
    for trouble in (lambda: site.hpss_status.set_status('down'),
                    lambda: site.hpss_status.set_raw(b'<html>maintenance</html>',
                                                     content_type='text/html'),
                    lambda: site.hpss_status.set_raw(b'{"status": "active"}', code=500),
                    lambda: site.hpss_status.set_delay(3)):
        trouble()
        assert site.run() == 0
        assert site.hpss.calls() == []
        assert 2 not in site.status_rows()[(LAST, 600)]
        site.hpss_status.set_delay(0)
    site.hpss_status.set_status('active')
    assert site.run() == 0
    assert 2 in site.status_rows()[(LAST, 600)]


def test_htar_failure_is_retried(site, caplog):
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000700')
    site.write_config(backup='20')
    site.hpss.fail('htar')
    assert site.run() == 0
    assert 2 not in site.status_rows()[(LAST, 700)]
    site.smtp.wait(1, timeout=10)
    assert 'Archiving night 20261119' in site.smtp.messages[0].get_content()
    site.hpss.heal()
    assert site.run() == 0
    assert site.status_rows()[(LAST, 700)] == {0: 1, 1: 1, 2: 1}
    assert site.hpss.members(f'desi/spectro/data/desi_spectro_data_{LAST}.tar')


def test_second_instance_refused_and_sigterm(site):
    site.exposure(LAST, '00000800')
    command, env = site.command('--debug')
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.isdir(site.dest(LAST, '00000800')):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        second = subprocess.run(command + ['--once'], env=env, capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 1
        assert 'Another desi_transfer_daemon' in second.stdout
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert 'desi_transfer_daemon stops' in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_kill_file_stops_loop(site):
    open(site.kill, 'w').close()
    command, env = site.command()
    p = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    assert 'exists; stopping' in p.stdout


def test_killed_mid_pass_converges(site):
    expids = [f'{900 + i:08d}' for i in range(40)]
    for e in expids:
        site.exposure(LAST, e, files=exposure_files(e, nfiles=3, size=500_000))
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
    rows = site.status_rows()
    for e in expids:
        assert rows[(LAST, int(e))] == {0: 1, 1: 1}
        assert sorted(os.listdir(site.dest(LAST, e))) == sorted(
            list(exposure_files(e, nfiles=3)) + [f'checksum-{e}.sha256sum'])
    assert os.listdir(os.path.join(site.staging, LAST)) == []


def test_bad_configuration(tmp_path, monkeypatch):
    for var in ('DESI_ROOT', 'DESI_SPECTRO_DATA', 'SCRATCH'):
        monkeypatch.setenv(var, f'/global/{var.lower()}')
    directories, conf, logging_ = read_configuration()  # the shipped default
    assert directories[0].staging == '/global/desi_root/spectro/staging/raw'
    assert directories[0].destination == '/global/desi_spectro_data'
    assert (conf['catchup'], conf['backup'], conf['host']) == (14, 20, 'dts')
    assert logging_['smtp'] == 'localhost:25'
    monkeypatch.delenv('NO_SUCH_VARIABLE', raising=False)
    cases = {
        'missing': (None, 'cannot be read'),
        'nokey': ('[D]\nsource = /a\nstaging = /b\ndestination = /c\nhpss = x\n', 'checksum_file is missing'),
        'badhour': ('[D]\nsource = /a\nstaging = /b\ndestination = /c\nhpss = x\n'
                    'checksum_file = c-{exposure}\n[common]\nhost =\nssh = ssh\n'
                    'temporary = /tmp\nchecksum_lock = /tmp/x\ncatchup = noon\n',
                    r"\[common\] catchup = 'noon' is not valid"),
        'env': ('[D]\nsource = ${NO_SUCH_VARIABLE}/a\n', 'NO_SUCH_VARIABLE is not set'),
        'syntax': ('no section header\n', 'configuration file'),
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
        lines = [l for l in p.stdout.splitlines() if l.strip()]
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
    lock_directory(str(d))
    assert mode(d) == 0o2750 and mode(d / 'sub') == 0o2750
    assert mode(d / 'f') == 0o440 and mode(d / 'sub' / 'g') == 0o440
    unlock_directory(str(d))
    assert mode(d / 'f') == 0o640 and mode(d) & stat.S_IWUSR
    lock_directory(str(d), test=True)
    assert mode(d / 'f') == 0o640


def test_verify_checksum_exported():
    from desitransfer import checksum
    assert daemon.verify_checksum is checksum.verify_checksum


def test_batches_and_outcome_times(site, caplog, monkeypatch):
    """A backlog is copied in batches; each status row carries the time of its outcome."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(daemon, 'BATCH', 2)
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
        rows = {stage: (ok, ms) for stage, ok, ms in night[str(1000 + j)]}
        assert rows[0][0] == rows[1][0] == 1
        assert rows[0][1] <= rows[1][1]  # rsync finished before the verification


def test_connection_lost_during_copy(site, caplog):
    """If rsync loses the mountain, nothing is installed or recorded; the next pass converges."""
    caplog.set_level(logging.INFO)
    flag = os.path.join(site.top, 'break-rsync')
    site.ssh_wrapper('flaky-ssh', f'[ -e {flag} ] && exit 255')
    for j in range(3):
        site.exposure(LAST, f'{1100 + j:08d}')
    open(flag, 'w').close()
    assert site.run() == 0
    assert not os.path.exists(site.dest(LAST))
    assert site.status_rows() == {}
    assert 'Could not copy exposures of night 20261119' in caplog.text
    assert site.smtp.messages == []
    os.remove(flag)
    assert site.run() == 0
    assert sorted(os.listdir(site.dest(LAST))) == ['00001100', '00001101', '00001102']
    assert all(rows == {0: 1, 1: 1} for rows in site.status_rows().values())


def test_sigterm_interrupts_copy(site):
    """SIGTERM stops a long copy at once; the next run converges."""
    site.ssh_wrapper('slow-ssh', 'sleep 20')
    for j in range(3):
        site.exposure(LAST, f'{1200 + j:08d}')
    code, out, seconds = site.terminate_when(
        lambda: os.path.isdir(os.path.join(site.staging, LAST)), '--once', settle=0.5)
    assert seconds < 5
    assert code == 0, out
    assert 'stay in staging' in out
    assert not os.path.exists(site.dest(LAST))
    assert site.status_rows() == {}
    site.write_config()
    assert site.run() == 0
    assert all(rows == {0: 1, 1: 1} for rows in site.status_rows().values())
    assert len(site.status_rows()) == 3


def test_final_catchup_errors_delay_archive(site, caplog):
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000750')
    site.clock(2026, 11, 20, 10, 0, 0)
    site.write_config(backup='20')
    assert site.run() == 0
    assert site.status_rows()[(LAST, 750)] == {0: 1, 1: 1}
    # A file appears at the mountain that the checksum file does not list: the
    # final catch-up copies it and verification fails, so the night must not be
    # archived with the bad exposure while it is being transferred again.
    with open(os.path.join(site.data, LAST, '00000750', 'stray.txt'), 'w') as f:
        f.write('not listed\n')
    site.clock(*NOW)
    assert site.run() == 0
    assert not [c for c in site.hpss.calls() if os.path.basename(c[0]) == 'htar']
    assert site.status_rows()[(LAST, 750)] == {0: 1, 1: 0}
    assert 'exposures 20261119/00000750' in caplog.text


def test_corrupted_state_files_are_all_kept(site, caplog):
    caplog.set_level(logging.INFO)
    state = os.path.join(os.path.dirname(site.staging), 'desi_transfer_daemon_state.json')
    for n, junk in enumerate(('{not json', '[]')):
        with open(state, 'w') as f:
            f.write(junk)
        TransferDaemon(site.options())
        configure_log()
        kept = state + '.bad' + (f'.{n:d}' if n else '')
        with open(kept) as f:
            assert f.read() == junk
        assert f'kept as {kept}' in caplog.text


def test_overdue_archive_alerts_once(site, caplog):
    """A night still not on tape a day after it was due is emailed once."""
    caplog.set_level(logging.INFO)
    site.exposure(EARLIER, '00001300')  # due 20261119 20:00 UTC, now 20261120 21:00
    site.exposure(LAST, '00001301')     # due 20261120 20:00 UTC: only one hour late
    site.write_config(backup='20')
    site.hpss_status.set_status('down')
    for _ in range(2):
        assert site.run() == 0
    assert site.smtp.wait(1)
    assert not site.smtp.wait(2, timeout=0.3)
    body = site.smtp.messages[0].get_content()
    assert f'Night {EARLIER} is still not archived to HPSS 25 hours after it was due' in body
    assert LAST not in body
    site.hpss_status.set_status('active')
    assert site.run() == 0
    rows = site.status_rows()
    assert rows[(EARLIER, 1300)][2] == 1 and rows[(LAST, 1301)][2] == 1
    with open(os.path.join(os.path.dirname(site.staging),
                           'desi_transfer_daemon_state.json')) as f:
        assert json.load(f)['DESI_SPECTRO_DATA']['overdue'] == []


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
    """checksum_lock, exposure and checksum, as documented, on their own."""
    site.exposure(LAST, '00001500')
    d = TransferDaemon(site.options())
    try:
        assert d.checksum_lock() is False
        open(os.path.join(site.top, 'mountain', 'checksum-running'), 'w').close()
        assert d.checksum_lock() is True
        status = d._status(d.directories[0])
        d.exposure(d.directories[0], f'{LAST}/00001500', status)
        assert status.find(LAST, '00001500', 'checksum')[0][1] == 1
        assert mode(site.dest(LAST, '00001500')) == 0o2750
        target = site.dest(LAST, '00001500', sorted(exposure_files('00001500'))[0])
        os.chmod(target, 0o640)
        with open(target, 'ab') as f:
            f.write(b'more')
        assert d.checksum(site.dest(LAST, '00001500', 'checksum-00001500.sha256sum'),
                          status) is None
        assert status.find(LAST, '00001500', 'checksum')[0][1] == 0
    finally:
        d._close_ssh()
        configure_log()
