# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The test servers follow the conventions the daemon relies on: the HPSS
emulator (hsi, htar), the NERSC status API imitation and the SMTP server;
and desitransfer's alert emails work against the real SMTP server.
"""
import json
import logging
import os
import re
import smtplib
import socket
import stat
import subprocess
import tarfile
from email.message import EmailMessage

import pytest
import requests

from conftest import free_port
from desitransfer import alerts, common, runner

ARCHIVE = 'desi/spectro/data/desi_spectro_data_20201231.tar'
LISTING = re.compile(r'^-r[-w][-x]r[-w][-x][-r][-w][-x]\s+1 desi\s+desi\s+(\d+) '
                     r'[A-Z][a-z]{2} [ 0-9]\d (?:\d\d:\d\d| \d{4}) (\S+)$')


def call(hpss, program, *args, cwd=None, env=None):
    """Run an emulator program, capturing its output."""
    return subprocess.run([getattr(hpss, program)] + [str(a) for a in args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=30)


@pytest.fixture
def night(tmp_path):
    """A DESTINATION directory with night 20201231: two exposures, one file a symlink."""
    destination = tmp_path / 'destination'
    exposure = destination / '20201231' / '00012345'
    exposure.mkdir(parents=True)
    (exposure / 'desi-00012345.fits.fz').write_bytes(b'\x00' * 3000)
    (exposure / 'checksum-00012345.sha256sum').write_text('abc  desi-00012345.fits.fz\n')
    elsewhere = tmp_path / 'elsewhere.json'
    elsewhere.write_text('{"linked": true}\n')
    (exposure / 'request-00012345.json').symlink_to(elsewhere)
    (destination / '20201231' / '00012346').mkdir()
    (destination / '20201231' / '00012346' / 'desi-00012346.fits.fz').write_bytes(b'1' * 10)
    return destination


MEMBERS = ['20201231', '20201231/00012345',
           '20201231/00012345/checksum-00012345.sha256sum',
           '20201231/00012345/desi-00012345.fits.fz',
           '20201231/00012345/request-00012345.json',
           '20201231/00012346', '20201231/00012346/desi-00012346.fits.fz']


def backup(hpss, night, *extra):
    """The daemon's archive call."""
    return call(hpss, 'htar', '-cvhf', ARCHIVE, '-H', 'crc:verify=all', *extra, '20201231',
                cwd=night)


#
# hsi
#
def test_hsi_ls_listing_goes_to_stderr(hpss):
    data = hpss.path('desi/spectro/data')
    data.mkdir(parents=True)
    (data / 'desi_spectro_data_20201230.tar').write_bytes(b'x' * 123456)
    os.chmod(data / 'desi_spectro_data_20201230.tar', 0o640)
    p = call(hpss, 'hsi', 'ls', '-l', 'desi/spectro/data')
    assert p.returncode == 0, p.stderr
    assert p.stdout == ''
    lines = p.stderr.splitlines()
    assert lines[0] == '/home/d/desi/desi/spectro/data:'
    m = LISTING.match(lines[1])
    assert m is not None, lines[1]
    assert m.groups() == ('123456', 'desi_spectro_data_20201230.tar')
    assert len(lines) == 2
    # Without -l: names only.  With -P: to stdout.
    p = call(hpss, 'hsi', '-P', 'ls', 'desi/spectro/data')
    assert p.stdout.splitlines() == ['/home/d/desi/desi/spectro/data:',
                                     'desi_spectro_data_20201230.tar']


def test_hsi_ls_outfile_appends(hpss, tmp_path):
    hpss.path('desi/spectro/data').mkdir(parents=True)
    hpss.path('desi/spectro/data/a.tar').write_text('a')
    out = tmp_path / 'ls.txt'
    p = call(hpss, 'hsi', '-O', out, 'ls', '-l', 'desi/spectro/data')
    assert (p.returncode, p.stdout, p.stderr) == (0, '', '')
    first = out.read_text().splitlines()
    assert first[0] == '/home/d/desi/desi/spectro/data:'
    assert [line.split()[-1] for line in first] == ['/home/d/desi/desi/spectro/data:',
                                                    'a.tar']
    # -O appends, so a caller must remove a stale listing first.
    call(hpss, 'hsi', '-O', out, 'ls', '-l', 'desi/spectro/data')
    assert out.read_text().splitlines() == first + first


def test_hsi_ls_missing_path(hpss, tmp_path):
    out = tmp_path / 'ls.txt'
    p = call(hpss, 'hsi', '-O', out, 'ls', '-l', 'desi/spectro/data')
    assert p.returncode == 64
    assert p.stderr.splitlines() == [
        '*** hpss_Lstat: No such file or directory [-2: HPSS_ENOENT]',
        '    /home/d/desi/desi/spectro/data']
    assert not out.exists() or out.read_text() == ''


def test_hsi_mkdir_chmod_and_paths(hpss):
    p = call(hpss, 'hsi', 'mkdir', '-p', 'desi/spectro/data')
    assert p.returncode == 0, p.stderr
    assert hpss.path('desi/spectro/data').is_dir()
    assert call(hpss, 'hsi', 'mkdir', '-p', 'desi/spectro/data').returncode == 0
    # Without -p: the parent must exist and the directory must not.
    assert call(hpss, 'hsi', 'mkdir', 'desi/spectro/data').returncode == 64
    assert call(hpss, 'hsi', 'mkdir', 'a/b').returncode == 64
    # Absolute paths under the home directory are the same place.
    tar = hpss.path('desi/spectro/data/x.tar')
    tar.write_text('x')
    p = call(hpss, 'hsi', 'chmod', '440', '/home/d/desi/desi/spectro/data/x.tar')
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(tar.stat().st_mode) == 0o440
    assert call(hpss, 'hsi', 'chmod', 'u+w,g-r', 'desi/spectro/data/x.tar').returncode == 0
    assert stat.S_IMODE(tar.stat().st_mode) == 0o600
    assert call(hpss, 'hsi', 'chmod', '750', 'desi/nothere').returncode == 64
    assert call(hpss, 'hsi', 'chmod', 'rwx', 'desi/spectro/data/x.tar').returncode == 64
    # Directory listing without -l, several commands in one argument.
    p = call(hpss, 'hsi', 'mkdir -p desi/spectro/nightwatch; ls desi/spectro')
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == ['/home/d/desi/desi/spectro:', 'data', 'nightwatch']
    # No path escapes the emulated tape.
    assert call(hpss, 'hsi', 'mkdir', '-p', '../../../../escape').returncode == 0
    assert not (hpss.root.parent / 'escape').exists()
    assert (hpss.root / 'escape').is_dir()


def test_hsi_needs_root(hpss):
    env = {k: v for k, v in os.environ.items() if k != 'HPSS_EMULATOR_ROOT'}
    p = call(hpss, 'hsi', 'ls', env=env)
    assert p.returncode != 0
    assert 'HPSS_EMULATOR_ROOT is not set' in p.stderr
    p = call(hpss, 'htar', '-tvf', ARCHIVE, env=env)
    assert p.returncode != 0
    assert 'HPSS_EMULATOR_ROOT is not set' in p.stderr


def test_hsi_rejects_unknown_commands(hpss):
    assert call(hpss, 'hsi', 'rm', 'x').returncode == 64
    assert call(hpss, 'hsi', '-Z', 'ls').returncode == 64
    assert call(hpss, 'hsi', 'ls', '-Q').returncode == 64


def test_hsi_fault(hpss):
    hpss.fail('hsi')
    p = call(hpss, 'hsi', 'ls', '-l')
    assert p.returncode == 72
    assert 'HPSS_EMULATOR_FAIL=hsi' in p.stderr
    assert call(hpss, 'hsi', 'mkdir', '-p', 'desi').returncode == 72
    assert not hpss.path('desi').exists()
    hpss.heal()
    assert call(hpss, 'hsi', 'ls', '-l').returncode == 0


#
# htar
#
def test_htar_creates_archive_and_index(hpss, night):
    p = backup(hpss, night)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[-1] == 'HTAR: HTAR SUCCESSFUL'
    assert 'HTAR: a   20201231/00012345/desi-00012345.fits.fz' in lines
    assert 'HTAR: a   20201231/00012346/' in lines
    assert hpss.path(ARCHIVE).is_file()
    assert hpss.path(ARCHIVE + '.idx').is_file()
    assert hpss.members(ARCHIVE) == MEMBERS
    index = json.loads(hpss.path(ARCHIVE + '.idx').read_text())
    assert [m['name'] for m in index['members']] == MEMBERS
    # -h: the symlink is archived as the file it points to.
    with tarfile.open(hpss.path(ARCHIVE)) as tar:
        member = tar.getmember('20201231/00012345/request-00012345.json')
        assert member.isfile()
        assert tar.extractfile(member).read() == b'{"linked": true}\n'
        assert tar.extractfile('20201231/00012345/desi-00012345.fits.fz').read() == b'\0' * 3000
    # The daemon's check: both files are listed by hsi.
    p = call(hpss, 'hsi', 'ls', '-l', 'desi/spectro/data')
    names = [line.split()[-1] for line in p.stderr.splitlines()]
    assert names[1:] == ['desi_spectro_data_20201231.tar', 'desi_spectro_data_20201231.tar.idx']
    size = hpss.path(ARCHIVE).stat().st_size
    assert int(LISTING.match(p.stderr.splitlines()[1]).group(1)) == size


def test_htar_without_h_keeps_symlinks(hpss, night):
    p = call(hpss, 'htar', '-cf', 'plain.tar', '20201231', cwd=night)
    assert p.returncode == 0, p.stderr
    assert 'HTAR: a' not in p.stdout
    with tarfile.open(hpss.path('plain.tar')) as tar:
        assert tar.getmember('20201231/00012345/request-00012345.json').issym()


def test_htar_lists_members(hpss, night):
    assert backup(hpss, night).returncode == 0
    p = call(hpss, 'htar', '-tvf', ARCHIVE)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[-1] == 'HTAR: HTAR SUCCESSFUL'
    listed = [line.split()[-1].rstrip('/') for line in lines if line.startswith('HTAR: -')
              or line.startswith('HTAR: d')]
    assert listed == MEMBERS
    p = call(hpss, 'htar', '-tf', '/home/d/desi/' + ARCHIVE, '20201231/00012346')
    assert p.stdout.splitlines()[:2] == ['HTAR: 20201231/00012346/',
                                         'HTAR: 20201231/00012346/desi-00012346.fits.fz']
    p = call(hpss, 'htar', '-tvf', 'desi/spectro/data/nothere.tar')
    assert p.returncode == 72
    assert 'HTAR: HTAR FAILED' in p.stderr


def test_htar_missing_member(hpss, night):
    p = call(hpss, 'htar', '-cvhf', ARCHIVE, '20201231', '20210101', cwd=night)
    assert p.returncode == 72
    assert 'File not found: 20210101' in p.stderr
    assert p.stderr.splitlines()[-1] == 'HTAR: HTAR FAILED'
    assert not hpss.path(ARCHIVE).exists()
    assert not hpss.path(ARCHIVE + '.idx').exists()


def test_htar_usage_errors(hpss, night):
    assert call(hpss, 'htar', '-cv', '20201231', cwd=night).returncode == 72  # no -f
    assert call(hpss, 'htar', '-f', ARCHIVE, '20201231', cwd=night).returncode == 72
    assert call(hpss, 'htar', '-cvhf', ARCHIVE, '-Q', '20201231', cwd=night).returncode == 72
    assert call(hpss, 'htar', '-cvhf', ARCHIVE, cwd=night).returncode == 72
    assert not hpss.path(ARCHIVE).exists()


def test_htar_fault_leaves_partial_archive(hpss, night):
    hpss.fail('htar')
    p = backup(hpss, night)
    assert p.returncode == 72
    assert 'HPSS_EMULATOR_FAIL=htar' in p.stderr
    assert p.stderr.splitlines()[-1] == 'HTAR: HTAR FAILED'
    assert 'HTAR: HTAR SUCCESSFUL' not in p.stdout
    partial = hpss.path(ARCHIVE).stat().st_size
    assert not hpss.path(ARCHIVE + '.idx').exists()
    assert call(hpss, 'htar', '-tvf', ARCHIVE).returncode == 72
    # hsi still works: the truncated .tar is visible, as after an interrupted htar.
    p = call(hpss, 'hsi', 'ls', '-l', 'desi/spectro/data')
    assert p.returncode == 0
    assert [line.split()[-1] for line in p.stderr.splitlines()[1:]] == [
        'desi_spectro_data_20201231.tar']
    hpss.heal()
    assert backup(hpss, night).returncode == 0
    assert hpss.path(ARCHIVE).stat().st_size > partial
    assert hpss.path(ARCHIVE + '.idx').exists()
    assert hpss.members(ARCHIVE) == MEMBERS


def test_calls_are_logged(hpss, night, tmp_path):
    assert hpss.calls() == []
    call(hpss, 'hsi', '-O', tmp_path / 'ls.txt', 'ls', '-l', 'desi/spectro/data')
    hpss.fail('hsi', 'htar')
    backup(hpss, night)
    assert hpss.calls() == [
        ['hsi', '-O', str(tmp_path / 'ls.txt'), 'ls', '-l', 'desi/spectro/data'],
        ['htar', '-cvhf', ARCHIVE, '-H', 'crc:verify=all', '20201231']]


def test_emulator_through_the_runner(hpss, night, tmp_path):
    """The package's runner finds the emulators on PATH and reports failures."""
    result = runner.run(['hsi', 'mkdir', '-p', 'desi/spectro/data'])
    assert result.returncode == 0
    result = runner.run(['htar', '-cvhf', ARCHIVE, '-H', 'crc:verify=all', '20201231'],
                        cwd=night)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith('HTAR: HTAR SUCCESSFUL\n')
    result = runner.run(['hsi', 'ls', '-l', 'nothere'])
    assert result.returncode == 64
    assert 'HPSS_ENOENT' in result.stderr


#
# NERSC status API
#
def test_status_server_active(hpss_status_server):
    assert hpss_status_server.requests == 0
    r = requests.get(hpss_status_server.url, timeout=5)
    assert r.status_code == 200
    assert r.headers['Content-Type'] == 'application/json'
    answer = r.json()
    assert answer['name'] == 'archive'
    assert answer['full_name'] == 'HPSS Archive (User)'
    assert answer['status'] == 'active'
    assert hpss_status_server.requests == 1
    assert hpss_status_server.url.startswith('http://127.0.0.1:')
    assert hpss_status_server.url.endswith('/api/v1.2/status/archive')


@pytest.mark.parametrize('status', ['degraded', 'down'])
def test_status_server_set_status(hpss_status_server, status):
    hpss_status_server.set_status(status, notes=['Scheduled maintenance'])
    answer = requests.get(hpss_status_server.url, timeout=5).json()
    assert answer['status'] == status
    assert answer['notes'] == ['Scheduled maintenance']


def test_status_server_state_is_reset(hpss_status_server):
    """Runs after the tests above changed the status."""
    assert hpss_status_server.requests == 0
    assert requests.get(hpss_status_server.url, timeout=5).json()['status'] == 'active'


def test_status_server_raw_and_errors(hpss_status_server):
    hpss_status_server.set_raw('<html><body>Service Unavailable</body></html>', code=503)
    r = requests.get(hpss_status_server.url, timeout=5)
    assert r.status_code == 503
    with pytest.raises(ValueError):
        r.json()
    hpss_status_server.set_raw('not json', code=200, content_type='application/json')
    with pytest.raises(ValueError):
        requests.get(hpss_status_server.url, timeout=5).json()
    r = requests.get(hpss_status_server.url.replace('archive', 'cori'), timeout=5)
    assert r.status_code == 404
    assert hpss_status_server.requests == 3
    assert hpss_status_server.request_paths[-1] == '/api/v1.2/status/cori'


def test_status_server_delay(hpss_status_server):
    hpss_status_server.set_delay(30)
    with pytest.raises(requests.Timeout):
        requests.get(hpss_status_server.url, timeout=0.2)
    hpss_status_server.set_delay(0)
    assert requests.get(hpss_status_server.url, timeout=5).json()['status'] == 'active'


#
# SMTP
#
def test_smtp_server_collects_messages(smtp_server):
    assert smtp_server.messages == []
    assert smtp_server.hostport == f'{smtp_server.host}:{smtp_server.port}'
    message = EmailMessage()
    message['From'] = 'desi@example.org'
    message['To'] = 'a@example.org, b@example.org'
    message['Subject'] = 'hello'
    message.set_content('Body text.\n')
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=5) as s:
        s.send_message(message)
    assert smtp_server.wait(1)
    received = smtp_server.messages[0]
    assert received['Subject'] == 'hello'
    assert received['From'] == 'desi@example.org'
    assert received.get_content() == 'Body text.\n'
    assert smtp_server.envelopes == [('desi@example.org', ['a@example.org', 'b@example.org'])]
    assert not smtp_server.wait(2, timeout=0.1)


#
# Alert emails from desitransfer.alerts
#
@pytest.fixture
def alert_log():
    """Reset the shared logger after the test."""
    yield common.log
    alerts.configure_log()


def alert_handlers():
    return [h for h in common.log.handlers if isinstance(h, alerts.AlertHandler)]


def test_critical_is_emailed_once(alert_log, smtp_server):
    log = alerts.configure_log(to=['desi-alarms@example.org'], mailhost=smtp_server.hostport,
                               program='desi_transfer_daemon')
    assert log is common.log
    log.critical("Checksum error in %s: %s", '20201231/00012345', 'digest mismatch')
    assert smtp_server.wait(1)
    message = smtp_server.messages[0]
    assert 'desi_transfer_daemon' in message['Subject']
    assert message['Subject'] == 'Error reported by desi_transfer_daemon!'
    assert socket.getfqdn() in message.get_content()
    assert message['To'] == 'desi-alarms@example.org'
    assert message['From'].endswith('@' + socket.getfqdn())
    body = message.get_content()
    assert 'CRITICAL' in body
    assert 'Checksum error in 20201231/00012345: digest mismatch' in body
    # The same message within the repeat window: nothing more.
    log.critical("Checksum error in %s: %s", '20201231/00012345', 'digest mismatch')
    assert not smtp_server.wait(2, timeout=0.2)
    # A different message: one more.
    log.critical("Checksum error in %s: %s", '20201231/00012346', 'file missing')
    assert smtp_server.wait(2)
    assert '20201231/00012346: file missing' in smtp_server.messages[1].get_content()
    # ERROR and below are not emailed.
    log.error("rsync failed for 20201231/00012347")
    log.warning("Skipping malformed link")
    assert not smtp_server.wait(3, timeout=0.2)
    assert len(smtp_server.messages) == 2


def test_critical_repeated_after_window(alert_log, smtp_server):
    log = alerts.configure_log(to=['a@example.org'], mailhost=smtp_server.hostport,
                               program='desi_transfer_daemon')
    log.critical("HPSS backup of 20201231 failed.")
    assert smtp_server.wait(1)
    alert_handlers()[0].repeat = 0
    log.critical("HPSS backup of 20201231 failed.")
    assert smtp_server.wait(2)


def test_dead_smtp_server_does_not_raise(alert_log, smtp_server, capsys):
    dead = f'127.0.0.1:{free_port()}'
    log = alerts.configure_log(to=['a@example.org'], mailhost=dead,
                               program='desi_transfer_daemon')
    log.critical("Checksum error in 20201231/00012345.")
    err = capsys.readouterr().err
    complaints = [line for line in err.splitlines() if 'could not email alert' in line]
    assert len(complaints) == 1
    assert 'a@example.org' in complaints[0] and dead in complaints[0]
    # The failed alert was not counted as sent: it goes out once the server is back.
    alert_handlers()[0].mailport = smtp_server.port
    log.critical("Checksum error in 20201231/00012345.")
    assert smtp_server.wait(1)
    assert len(smtp_server.messages) == 1


def test_bad_critical_call_does_not_raise(alert_log, smtp_server, monkeypatch):
    log = alerts.configure_log(to=['a@example.org'], mailhost=smtp_server.hostport,
                               program='desi_transfer_daemon')
    # Only the alert handler: pytest's own log capture rightly fails on bad arguments.
    monkeypatch.setattr(log, 'propagate', False)
    log.critical("Exposure %d failed", '00012345')  # the caller's bug, not fatal
    assert smtp_server.wait(1)
    body = smtp_server.messages[0].get_content()
    assert 'Exposure %d failed' in body and "bad log arguments ('00012345',)" in body


def test_log_file(alert_log, tmp_path):
    filename = tmp_path / 'logs' / 'desi_transfer_daemon.log'
    log = alerts.configure_log(filename=str(filename))
    log.debug("Not shown at INFO level.")
    log.info("Transferring %s.", '20201231/00012345')
    text = filename.read_text()
    assert 'Not shown' not in text
    assert re.search(r'^INFO:test_servers\.py:\d+:test_log_file:\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d: '
                     r'Transferring 20201231/00012345\.$', text, re.M), text
    log = alerts.configure_log(debug=True, filename=str(filename))
    log.debug("Shown at DEBUG level.")
    assert 'DEBUG:' in filename.read_text()
    alerts.configure_log()
    log.info("After the reset.")
    assert 'After the reset' not in filename.read_text()


def test_configure_log_twice(alert_log, smtp_server, tmp_path):
    filename = tmp_path / 'transfer.log'
    before = list(common.log.handlers)
    for _ in range(2):
        log = alerts.configure_log(filename=str(filename), to=['a@example.org'],
                                   mailhost=smtp_server.hostport, program='desi_transfer_daemon')
    added = [h for h in log.handlers if h not in before]
    assert len(added) == 2
    assert len(alert_handlers()) == 1
    assert sum(isinstance(h, logging.FileHandler) for h in log.handlers) == 1
    log.critical("Disk full on staging.")
    assert smtp_server.wait(1)
    assert not smtp_server.wait(2, timeout=0.2)
    assert filename.read_text().count('Disk full on staging.') == 1
    alerts.configure_log()
    assert common.log.handlers == [h for h in before if not getattr(h, '_desitransfer', False)]
    assert common.log.level == logging.INFO


def test_alert_memory_spans_runs(alert_log, smtp_server, tmp_path):
    """With a memory file, a new process (a new handler) does not repeat an alert."""
    memory = tmp_path / 'alerts.json'
    for run in range(3):
        log = alerts.configure_log(to=['a@example.org'], mailhost=smtp_server.hostport,
                                   program='desi_transfer_daemon', memory=str(memory))
        log.critical("HPSS archive of night %s failed.", '20201231')
    assert smtp_server.wait(1)
    assert not smtp_server.wait(2, timeout=0.3)
    log.critical("Another problem.")
    assert smtp_server.wait(2)
    assert set(json.loads(memory.read_text())) == {"HPSS archive of night 20201231 failed.",
                                                   "Another problem."}
    memory.write_text('not json')
    log = alerts.configure_log(to=['a@example.org'], mailhost=smtp_server.hostport,
                               program='desi_transfer_daemon', memory=str(memory))
    log.critical("Another problem.")
    assert smtp_server.wait(3)
