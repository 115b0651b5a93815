# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Fault tests of desi_transfer_daemon: a dying ssh master, an unreachable
mountain, SIGTERM with a backlog, hostile links, a partial exposure, test
mode and bad configuration values, all against the real sshd, rsync, SMTP
server and HPSS emulator of ``test_daemon.py``."""
import glob
import json
import logging
import os
import shlex
import subprocess
import sys

import pytest

from desitransfer.alerts import configure_log
from desitransfer.daemon import TransferDaemon
from desitransfer.simulator import exposure_files
from fixtures_daemon import EARLIER, LAST, snapshot


def make_ssh_wrapper(site, name='ssh_logged', kill_master=False):
    """An ssh program that logs its argv (one JSON list per line) and then runs
    the real wrapper ``site.ssh``.

    With `kill_master`, before every connection (not ``-O`` control commands)
    the running control master of the ControlPath it is given is killed with
    SIGKILL, leaving a stale socket behind: the shared connection dies
    between any two operations of a pass.
    """
    wrapper = os.path.join(site.top, name)
    calls = os.path.join(site.top, name + '.jsonl')
    kills = os.path.join(site.top, name + '.kills')
    with open(wrapper, 'w') as f:
        f.write(f"""#!{sys.executable}
import json, os, re, signal, subprocess, sys
args = sys.argv[1:]
with open({calls!r}, 'a') as f:
    f.write(json.dumps(args) + '\\n')
if {kill_master!r} and '-O' not in args:
    paths = [a.split('=', 1)[1] for a in args if a.startswith('ControlPath=')]
    if paths and os.path.exists(paths[0]):
        check = subprocess.run([{site.ssh!r}, '-o', 'ControlPath=' + paths[0], '-O', 'check',
                                'dts'], capture_output=True, text=True)
        m = re.search(r'pid=([0-9]+)', check.stderr)
        if m:
            os.kill(int(m.group(1)), signal.SIGKILL)
            with open({kills!r}, 'a') as f:
                f.write(m.group(1) + '\\n')
os.execv({site.ssh!r}, [{site.ssh!r}] + args)
""")
    os.chmod(wrapper, 0o755)

    def read(path):
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    return wrapper, lambda: read(calls), lambda: read(kills)


def processes_mentioning(text):
    """Command lines of live processes that contain `text`."""
    found = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmdline = f.read().replace(b'\0', b' ').decode(errors='replace')
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def expected_tree(night, expids, nfiles=3):
    out = {night}
    for e in expids:
        out.add(f'{night}/{e}')
        out.add(f'{night}/{e}/checksum-{e}.sha256sum')
        out.update(f'{night}/{e}/{name}' for name in exposure_files(e, nfiles=nfiles))
    return out


def test_master_connection_dies_mid_pass(site):
    """The shared ssh connection is killed before every operation: the pass
    still transfers everything, and no control directory or mux process is
    left behind."""
    wrapper, calls, kills = make_ssh_wrapper(site, kill_master=True)
    # One command at a time: with streams = auto the round trip is measured
    # while the sizes are asked, and with a backlog of more than one batch
    # the mountain is watched while it is copied; a master killed under a
    # running command fails that command (the pass ends; tests of
    # test_daemon_streams).  So one stream, and one batch per pass.
    site.write_config(ssh=wrapper, streams='1')
    expids = [f'{100 + i:08d}' for i in range(4)]
    for e in expids:
        site.exposure(LAST, e)
    command, env = site.command('--once', '--debug')
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    first = len(calls())
    site.exposure(EARLIER, '00000090')
    command, env = site.command('--once', '--debug')
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert 'Traceback' not in out
    # The master really died under the daemon, more than once.
    assert len(kills()) >= 2, calls()
    for e in expids:
        site.assert_verified(LAST, e)
    site.assert_verified(EARLIER, '00000090')
    assert site.installed() == (expected_tree(LAST, expids) |
                                expected_tree(EARLIER, ['00000090']))
    # Ours, not a leftover of the test: the daemon's pid named its control directory.
    used = {a.split('=', 1)[1] for c in calls()[first:] for a in c
            if a.startswith('ControlPath=')}
    assert used and all(p.startswith(f'/tmp/desitransfer-ssh-{proc.pid}-') for p in used), used
    assert glob.glob(f'/tmp/desitransfer-ssh-{proc.pid}-*') == []
    assert processes_mentioning(f'/tmp/desitransfer-ssh-{proc.pid}-') == []


def test_master_closed_and_directory_removed_after_once(site):
    """Without faults, the master of a pass is stopped when ``--once`` exits."""
    wrapper, calls, _ = make_ssh_wrapper(site)
    site.write_config(ssh=wrapper)
    site.exposure(LAST, '00000150')
    command, env = site.command('--once')
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    site.assert_verified(LAST, '00000150')
    assert glob.glob(f'/tmp/desitransfer-ssh-{proc.pid}-*') == []
    assert processes_mentioning(f'/tmp/desitransfer-ssh-{proc.pid}-') == []
    # The connection was shared: one master, reused by the later commands.
    assert any('-O' in c and 'exit' in c for c in calls())


def test_every_connection_uses_configured_ssh(site):
    wrapper, calls, _ = make_ssh_wrapper(site)
    for e in ('00000160', '00000161'):
        site.exposure(LAST, e)
    # A pass that copies, then one that catches up and archives.
    for catchup in ('30', '14'):
        site.write_config(ssh=wrapper, catchup=catchup, backup='20' if catchup == '14' else '30')
        command, env = site.command('--once', '--debug')
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    site.assert_verified(LAST, '00000160', dir_mode=0o2550)  # archived: no user write
    assert site.status_rows()[(LAST, 160)][2] == 1
    # Every command the daemon ran, from its own log.
    ran = [shlex.split(line.split('Running: ', 1)[1])
           for line in site.log_text().splitlines() if 'Running: ' in line]
    rsyncs = [r for r in ran if r[0] == '/bin/rsync']
    # New exposures, then the catch-up's dry run (no final catch-up in the same pass).
    assert len(rsyncs) == 2, ran
    assert '--dry-run' in rsyncs[1] and '--dry-run' not in rsyncs[0]
    for r in rsyncs:
        rsh = shlex.split(r[1].split('=', 1)[1])
        assert r[1].startswith('--rsh=') and rsh[0] == wrapper, r
        assert {'BatchMode=yes', 'ConnectTimeout=30', 'ServerAliveInterval=30'} <= set(rsh), r
        assert '--copy-dirlinks' not in r, r
        # From the physical directory found by the survey, not through the link.
        assert r[-2] == f'dts:{site.data}/{LAST}/', r
    for r in ran:
        assert r[0] in ('/bin/rsync', wrapper) or r[0].endswith(('hsi', 'htar')), r
    # Every ssh started (by the daemon or as rsync's transport) went through the
    # wrapper and was non-interactive with timeouts.
    seen = calls()
    remote = [' '.join(c) for c in seen]
    assert any('rsync --server --sender' in c for c in remote), remote
    # The surveys, not counting the watches that survey after a change.
    assert len([c for c in remote if 'sh -c' in c and 'find' in c and
                'echo quiet' not in c]) == 2, remote
    for c in seen:
        options = [c[i + 1] for i, a in enumerate(c[:-1]) if a == '-o']
        assert 'BatchMode=yes' in options, c
        assert any(o.startswith('ConnectTimeout=') for o in options), c
        assert any(o.startswith('ServerAliveInterval=') for o in options), c


def unreachable_ssh(site):
    path = os.path.join(site.top, 'ssh_down')
    with open(path, 'w') as f:
        f.write('#!/bin/sh\necho "ssh: connect to host dts port 22: Connection refused" >&2\n'
                'exit 255\n')
    os.chmod(path, 0o755)
    return path


def alerts(site, text):
    return [m for m in site.smtp.messages if text in m.get_content()]


def test_unreachable_mountain_once_per_run(site, caplog):
    """With ``--once`` (cron), the count of unreachable passes survives the
    process: the third run in a row alerts, once; reaching the mountain again
    resets it.  Each such run exits 1, so cron can tell."""
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000170')
    site.write_config(ssh=unreachable_ssh(site), catchup='14', backup='20')
    before = snapshot(site.destination) | snapshot(site.staging)
    for n in range(1, 6):
        caplog.clear()
        assert site.run() == 1
        assert 'Traceback' not in caplog.text and 'Transfer pass of' not in caplog.text
        assert 'Checksums are being computed' not in caplog.text
        plural = 'pass' if n == 1 else 'passes'
        assert f'({n} {plural} in a row)' in caplog.text, caplog.text
        assert snapshot(site.destination) | snapshot(site.staging) == before
        if n < 3:
            assert not site.smtp.wait(1, timeout=0.3)
    assert site.smtp.wait(1, timeout=10)
    assert not site.smtp.wait(2, timeout=0.5)
    assert len(alerts(site, 'passes in a row')) == 1
    assert '(3 passes in a row)' in alerts(site, 'passes in a row')[0].get_content()
    assert site.hpss.calls() == []
    # Back: the exposure arrives, the count starts again from zero.
    site.write_config()
    caplog.clear()
    assert site.run() == 0
    assert 'dts is reachable again after 5 passes' in caplog.text
    site.assert_verified(LAST, '00000170')
    site.write_config(ssh=unreachable_ssh(site))
    caplog.clear()
    assert site.run() == 1
    assert '(1 pass in a row)' in caplog.text


def test_unreachable_mountain_long_running(site):
    """One long-running daemon: every pass fails to reach the mountain; the
    third alerts by email, once; SIGTERM still stops it cleanly."""
    site.exposure(LAST, '00000180')
    site.write_config(ssh=unreachable_ssh(site), sleep='0.005')
    code, out, _ = site.terminate_when(lambda: '(6 passes in a row)' in site.log_text(),
                                       poll=0.1)
    assert code == 0, out
    assert 'Traceback' not in out and 'Checksums are being computed' not in out
    assert site.smtp.wait(1, timeout=10)
    assert not site.smtp.wait(2, timeout=0.5)
    assert '(3 passes in a row)' in site.smtp.messages[0].get_content()
    assert os.listdir(site.destination) == [] and os.listdir(site.staging) == []


def test_sigterm_with_backlog_converges(site):
    expids = [f'{1000 + i:08d}' for i in range(30)]
    size = 400_000
    for e in expids:
        site.exposure(LAST, e, nfiles=3, size=size)
    staging = os.path.join(site.staging, LAST)
    # A long-running daemon, not --once.
    code, out, seconds = site.terminate_when(lambda: os.path.isdir(staging) and
                                             os.listdir(staging))
    assert code == 0, out
    assert seconds < 5
    assert 'desi_transfer_daemon stops' in out and 'Traceback' not in out
    installed = sorted(os.listdir(site.dest(LAST))) if os.path.isdir(site.dest(LAST)) else []
    assert len(installed) < len(expids), 'SIGTERM did not stop the pass early'
    for e in installed:
        site.assert_verified(LAST, e, nfiles=3, size=size)
    # Nothing was recorded that is not installed.
    assert {e for (night, e) in site.status_rows()} == {int(e) for e in installed}
    assert site.run() == 0
    for e in expids:
        site.assert_verified(LAST, e, nfiles=3, size=size)
    assert os.listdir(os.path.join(site.staging, LAST)) == []
    assert site.smtp.messages == []


def test_dangling_link_waits(site, caplog):
    """The target of one link is gone at the mountain: the others of the night
    are installed and verified; the dangling one is reported once, neither
    copied nor recorded, and transferred once its target is back."""
    caplog.set_level(logging.INFO)
    expids = [f'{200 + i:08d}' for i in range(5)]
    for e in expids:
        site.exposure(LAST, e)
    bad = expids[1]
    target = os.readlink(os.path.join(site.source, LAST, bad))
    os.rename(target, target + '.moved')
    assert site.run() == 0
    for e in expids:
        if e != bad:
            site.assert_verified(LAST, e)
    assert (LAST, int(bad)) not in site.status_rows()
    assert not os.path.exists(site.dest(LAST, bad))
    assert f'{LAST}/{bad} at dts is not transferred: its target is not a directory' \
        in caplog.text
    caplog.clear()
    assert site.run() == 0
    assert 'not transferred' not in caplog.text
    os.rename(target + '.moved', target)
    assert site.run() == 0
    for e in expids:
        site.assert_verified(LAST, e)
    assert os.listdir(os.path.join(site.staging, LAST)) == []
    assert site.smtp.messages == []


def test_bulk_rsync_failure_is_isolated(site, caplog):
    """The bulk rsync of a night fails because of one exposure (a stale
    directory in staging where the mountain now has a file): the others are
    still installed and verified; the bad one is incomplete, so it is
    recorded as failed, kept in staging, never installed, emailed once and
    transferred again until it succeeds."""
    caplog.set_level(logging.INFO)
    expids = [f'{250 + i:08d}' for i in range(4)]
    for e in expids:
        site.exposure(LAST, e)
    bad = expids[2]
    obstacle = os.path.join(site.staging, LAST, bad, f'desi-{bad}.fits.fz', 'x')
    os.makedirs(obstacle)
    open(os.path.join(obstacle, 'y'), 'w').close()
    assert site.run() == 0
    for e in expids:
        if e != bad:
            site.assert_verified(LAST, e)
    assert site.status_rows()[(LAST, int(bad))] == {0: 0}
    assert not os.path.exists(site.dest(LAST, bad))
    assert site.smtp.wait(1, timeout=10)
    body = site.smtp.messages[0].get_content()
    assert f'{LAST}/{bad}' in body and 'not installed' in body
    assert site.run() == 0  # still failing: tried again, not emailed again
    assert f'Transferring exposure {LAST}/{bad} again (try 1 of 2)' in caplog.text
    assert not os.path.exists(site.dest(LAST, bad))
    assert not site.smtp.wait(2, timeout=0.5)
    os.remove(os.path.join(obstacle, 'y'))
    os.removedirs(obstacle)
    assert site.run() == 0
    site.assert_verified(LAST, bad)
    assert site.state()['retries'] == {}


def test_test_mode_with_catchup_backup_and_retries(site, caplog):
    caplog.set_level(logging.INFO)
    for e in ('00000500', '00000501'):
        site.exposure(LAST, e)
    site.exposure(EARLIER, '00000490')
    broken = site.exposure(LAST, '00000502', checksum=False)
    assert site.run() == 0  # catch-up and archive not due yet (hour 30)
    assert site.state()['retries'] == {f'{LAST}/00000502': 0}
    # A late file for the catch-up to find, a new exposure, everything due.
    with open(os.path.join(broken, 'late-00000502.json'), 'w') as f:
        f.write('{}\n')
    site.exposure(LAST, '00000503')
    site.write_config(catchup='14', backup='20')
    hpss_log = str(site.hpss.log)
    before = snapshot(site.top, skip={hpss_log})
    caplog.clear()
    assert site.run('--test') == 0
    assert snapshot(site.top, skip={hpss_log}) == before
    text = caplog.text
    assert 'Transfer pass of' not in text and 'Traceback' not in text
    # The new exposure with the retry, the catch-up, the archive: each logged.
    copies = [line for line in text.splitlines() if 'Test mode, would run: /bin/rsync' in line]
    assert any("'--include=/00000502/***' '--include=/00000503/***'" in c for c in copies)
    assert 'Transferring exposure 20261119/00000502 again (try 1 of 2)' in text
    assert f'Test mode, would move {site.staging}/{LAST}/00000503' in text
    assert f'-cvhf desi/spectro/data/desi_spectro_data_{EARLIER}.tar' in text
    assert f'Test mode, would remove user write permission in {site.dest(EARLIER)}' in text
    # Only read-only questions reached HPSS; test mode sends no email.
    calls = site.hpss.calls()
    assert calls and all(os.path.basename(c[0]) == 'hsi' and 'ls' in c for c in calls)
    assert len(site.smtp.messages) == 1 and '00000502' in site.smtp.messages[0].get_content()


#: (key named in the message, line in the good configuration, its bad replacement).
BAD_VALUES = [
    ('checksum_file', 'checksum_file = checksum-{exposure}.sha256sum',
     'checksum_file = checksum.sha256sum'),
    ('checksum_file', 'checksum_file = checksum-{exposure}.sha256sum',
     'checksum_file = checksum-{exposure}-{expid}.sha256sum'),
    ('sleep', 'sleep = 0.02', 'sleep = 0'),
    ('sleep', 'sleep = 0.02', 'sleep = 0s'),
    ('sleep', 'sleep = 0.02', 'sleep = 10 seconds'),
    ('recent', 'sleep = 0.02', 'sleep = 0.02\nrecent = 0'),
    ('size', 'size = 1000000', 'size = -1'),
    ('staging', 'staging = {staging}', 'staging = nersc/staging/raw'),
    ('smtp', 'smtp = {smtp}', 'smtp = a:b:c'),
    ('[logging]', None, None),
]


@pytest.mark.parametrize('key,old,new', BAD_VALUES)
def test_bad_configuration_value(site, key, old, new):
    with open(site.config) as f:
        text = f.read()
    if old is None:
        text = text[:text.index('[logging]')]
    else:
        old = old.replace('{staging}', site.staging).replace('{smtp}', site.smtp.hostport)
        assert old in text
        text = text.replace(old, new)
    config = os.path.join(site.top, 'bad.ini')
    with open(config, 'w') as f:
        f.write(text)
    site.exposure(LAST, '00000600')
    before = snapshot(site.top)
    proc = subprocess.run(['desi_transfer_daemon', '--once', '-c', config, '-k', site.kill],
                          capture_output=True, text=True, timeout=60, cwd=site.top)
    assert proc.returncode == 1
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith('CRITICAL') and config in lines[0]
    assert key in lines[0], lines[0]
    assert snapshot(site.top) == before


def test_corrupted_state_file(site, caplog):
    """A state file that is not JSON, or JSON of the wrong shape, is kept as
    ``.bad``; the daemon starts afresh and never follows a name in it out of
    the destination."""
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000700')
    victim = os.path.join(os.path.dirname(site.destination), 'x')
    os.makedirs(victim)
    with open(os.path.join(victim, 'keep'), 'w') as f:
        f.write('keep\n')
    os.chmod(victim, 0o700)
    for n, content in enumerate(('{"DESI_SPECTRO_DATA": {"ret',
                                 '{"DESI_SPECTRO_DATA": []}',
                                 '{"DESI_SPECTRO_DATA": {"retries": {"../x": 0}}}',
                                 '{"DESI_SPECTRO_DATA": {"pending": {"../x": []}}}',
                                 '{"DESI_SPECTRO_DATA": {"retries": {"20261119/00000700": "x"}}}',
                                 '{"DESI_SPECTRO_DATA": {"caught_up": 3}}')):
        with open(site.state_file, 'w') as f:
            f.write(content)
        caplog.clear()
        assert site.run() == 0, content
        assert 'Transfer pass of' not in caplog.text, content
        assert 'unreadable' in caplog.text, content
        # Each unreadable state file is kept: .bad, then .bad.1, .bad.2, ...
        kept = site.state_file + '.bad' + (f'.{n:d}' if n else '')
        assert f'kept as {kept}' in caplog.text, content
        with open(kept) as f:
            assert f.read() == content
        assert site.state()['retries'] == {} and site.state()['pending'] == {}
        assert os.stat(victim).st_mode & 0o7777 == 0o700 and os.listdir(victim) == ['keep']
        site.assert_verified(LAST, '00000700')


def test_archive_failure_alerts_once_across_runs(site, caplog):
    """htar keeps failing on run after run of ``--once`` (each a new process
    for the alerts): one email, not one per run; success clears the count."""
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000800')
    site.write_config(backup='20')
    site.hpss.fail('htar')
    for n in range(1, 4):
        assert site.run() == 1
        assert 2 not in site.status_rows()[(LAST, 800)]
    assert site.smtp.wait(1, timeout=10)
    assert not site.smtp.wait(2, timeout=0.5)
    assert 'Archiving night 20261119' in site.smtp.messages[0].get_content()
    assert '3 attempts failed' in caplog.text
    site.hpss.heal()
    assert site.run() == 0
    assert site.status_rows()[(LAST, 800)] == {0: 1, 1: 1, 2: 1}
    assert site.state()['archive_failures'] == {}


def test_no_retries_when_retries_is_zero(site, caplog):
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000810', checksum=False)
    site.write_config(retries='0')
    assert site.run() == 0
    assert site.run() == 0
    assert site.status_rows()[(LAST, 810)] == {0: 1, 1: 0}
    assert 'is not transferred again ([common] retries = 0)' in caplog.text
    assert 'Transferring exposure 20261119/00000810 again' not in caplog.text
    assert caplog.text.count('rsync --server') == 0  # the log names rsync by path
    assert site.state()['retries'] == {}
    assert site.state()['given_up'] == [f'{LAST}/00000810']


def test_truncated_state_file_loses_nothing(site, caplog):
    """A state file cut short (a full disk, a crash of the file system) is
    read from its copy: the retry count and the reports already sent stay;
    the damaged file is kept aside."""
    caplog.set_level(logging.INFO)
    site.exposure(LAST, '00000790')
    assert site.run() == 0
    d = TransferDaemon(site.options())
    d.state['DESI_SPECTRO_DATA']['retries']['20261119/00000791'] = 1
    d.state['DESI_SPECTRO_DATA']['reported'].append('20261119 report')
    d.state.save()
    configure_log()
    with open(site.state_file) as f:
        text = f.read()
    with open(site.state_file, 'w') as f:
        f.write(text[:len(text) // 2])
    d = TransferDaemon(site.options())
    configure_log()
    assert d.state['DESI_SPECTRO_DATA']['retries'] == {'20261119/00000791': 1}
    assert '20261119 report' in d.state['DESI_SPECTRO_DATA']['reported']
    assert 'read from its copy' in caplog.text and 'starts afresh' not in caplog.text
    with open(site.state_file + '.bad') as f:
        assert f.read() == text[:len(text) // 2]
