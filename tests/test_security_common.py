# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Security of the shared helpers (issue 16): what a hostile mountain, a
hostile command or another local user can do through them.

* Row 3: the output of every command is bounded (:func:`desitransfer.runner.run`),
  even an endless answer over ssh; ``RSYNC_OLD_ARGS`` never reaches rsync.
* Row 2: alert emails and the alert memory are bounded.
* Row 6: nothing is created through a link planted, by another user, in a
  directory this package writes (temporary files, locks, the status page).
* Row 9: the umask is never changed, and new files get explicit modes.

Each test reproduces the attack for real: the loopback sshd (``dts``), real
rsync, the SMTP server, and a world-writable directory used by ``nobody``.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from desitransfer import alerts, common, files, processes, runner, status
from desitransfer.runner import OUTPUT_TOO_LARGE, run

ROOT = os.geteuid() == 0


# ----------------------------------------------------------------------
# Row 3: command output is bounded.
# ----------------------------------------------------------------------
ENDLESS = """
import json, resource, sys, time
# A gigabyte of address space: an unbounded reader fails instead of eating the host.
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from desitransfer.runner import run
t0 = time.monotonic()
r = run([sys.argv[1], 'dts', 'cat /dev/zero'], timeout=30, quiet=True)
print(json.dumps({'code': r.returncode, 'too_large': r.too_large, 'out': len(r.stdout),
                  'err': r.stderr.strip().splitlines()[-1:], 'seconds': time.monotonic() - t0,
                  'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_endless_answer_over_ssh_is_cut(dts):
    """The mountain answers /dev/zero: the answer is cut at the limit, the
    command stopped at once, and the result says it is unknown."""
    p = subprocess.run([sys.executable, '-c', ENDLESS, dts.ssh], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    found = json.loads(p.stdout.splitlines()[-1])
    assert found['code'] == OUTPUT_TOO_LARGE and found['too_large']
    assert found['out'] == runner.OUTPUT_LIMIT
    assert 'passed the limit' in found['err'][0]
    assert found['seconds'] < 15
    assert found['rss'] < 6 * runner.OUTPUT_LIMIT


def test_output_limits_and_streaming(tmp_path):
    """Either stream past the limit stops the command; a legitimate long
    output streams to a file, keeping its end (rsync's summary)."""
    t0 = time.monotonic()
    r = run(['sh', '-c', 'echo started; exec cat /dev/zero >&2'], limit=4096)
    assert r.too_large and r.returncode == OUTPUT_TOO_LARGE
    assert r.stdout == 'started\n' and len(r.stderr) < 4096 + 200
    r = run(['sh', '-c', 'while :; do echo junk; done'], limit=1000)
    assert r.too_large and len(r.stdout) == 1000 and time.monotonic() - t0 < 10
    # Within the limit, nothing changes: the output is whole and the code is the command's.
    r = run(['sh', '-c', 'seq 1 100000; echo done >&2; exit 3'], ok=(3,))
    assert r.returncode == 3 and not r.too_large and r.stderr == 'done\n'
    assert r.stdout.splitlines()[-1] == '100000' and len(r.stdout.splitlines()) == 100000
    with open(tmp_path / 'listing', 'wb') as f:
        r = run(['seq', '1', '100000'], limit=100, output=f)
    assert r.returncode == 0 and r.stdout.endswith('99999\n100000\n') and len(r.stdout) <= 100
    assert (tmp_path / 'listing').read_text().splitlines() == [str(i) for i in range(1, 100001)]


def test_rsync_verbose_of_a_large_tree_under_the_default_limit(dts, tmp_path):
    """rsync --verbose of a tree of thousands of files, over ssh: whole."""
    source = tmp_path / 'source'
    for d in range(20):
        sub = source / f'{d:08d}'
        sub.mkdir(parents=True)
        for i in range(150):
            (sub / f'desi-{d:08d}-{i:04d}.fits.fz').touch()
    r = run(['rsync', '--verbose', '--recursive', f'--rsh={dts.ssh}', f'dts:{source}/',
             f'{tmp_path}/copy/'], quiet=True)
    assert r.returncode == 0 and not r.too_large
    assert len([line for line in r.stdout.splitlines() if line.endswith('.fits.fz')]) == 3000


def test_rsync_old_args_never_passed(dts, tmp_path, monkeypatch):
    """With RSYNC_OLD_ARGS=1 in the environment, rsync would hand a path to
    the remote shell unprotected: a directory named ``$(...)`` at the
    mountain would run a command there.  run() never passes it on."""
    evil = tmp_path / 'mountain' / '$(echo${IFS}INJECTED>&2)' / '00012345'
    evil.mkdir(parents=True)
    (evil / 'desi-00012345.fits.fz').write_text('data')
    monkeypatch.setenv('RSYNC_OLD_ARGS', '1')
    for env in (None, dict(os.environ)):
        copy = tmp_path / f'copy-{env is None}'
        r = run(['rsync', '--recursive', f'--rsh={dts.ssh}', f'dts:{evil}/', f'{copy}/'],
                env=env, quiet=True)
        assert 'INJECTED' not in r.stderr
        assert r.returncode == 0 and (copy / 'desi-00012345.fits.fz').read_text() == 'data'
    assert 'RSYNC_OLD_ARGS' not in runner.command_environment()
    assert run(['sh', '-c', 'echo ${RSYNC_OLD_ARGS-unset}']).stdout == 'unset\n'


# ----------------------------------------------------------------------
# Row 2: alert emails and the alert memory are bounded.
# ----------------------------------------------------------------------
@pytest.fixture
def alert_log():
    """Reset the shared logger after the test."""
    yield common.log
    alerts.configure_log()


def test_huge_alert_is_cut(alert_log, smtp_server, tmp_path):
    """A megabyte of junk in a CRITICAL message (a hostile checksum file):
    the email is cut at 64 KiB and says so; the memory keeps a short key."""
    memory = tmp_path / 'alerts.json'
    log = alerts.configure_log(to=['a@example.org'], mailhost=smtp_server.hostport,
                               program='desi_transfer_daemon', memory=str(memory))
    junk = ''.join(f'{i:08d} junk line of a hostile checksum file\n' for i in range(25000))
    log.critical("Checksum errors in 20260101/00012345: %s", junk)
    assert smtp_server.wait(1)
    body = smtp_server.messages[0].get_content()
    assert len(body.encode()) <= alerts.ALERT_BODY_LIMIT
    assert body.rstrip().endswith(f'bytes cut: the limit is {alerts.ALERT_BODY_LIMIT:d} bytes.]')
    assert 'Checksum errors in 20260101/00012345: 00000000 junk' in body
    assert memory.stat().st_size < 1000
    # The same message again is remembered: no second email.
    log.critical("Checksum errors in 20260101/00012345: %s", junk)
    assert not smtp_server.wait(2, timeout=0.3)


def test_alert_memory_bounded(alert_log, smtp_server, tmp_path, caplog):
    """A memory file too large, corrupt or planted as a link is set aside with
    one error, never loaded whole; the memory keeps at most ALERT_KEYS keys."""
    memory = tmp_path / 'alerts.json'
    now = time.time()
    # Valid, but far more alerts than are kept.
    memory.write_text(json.dumps({f'alert {i:05d} ' + 'x' * 300: now - 5000 + i / 10
                                  for i in range(5000)}))
    log = alerts.configure_log(to=['a@example.org'], mailhost=smtp_server.hostport,
                               program='p', memory=str(memory))
    log.critical("One more alert.")
    assert smtp_server.wait(1)
    kept = json.loads(memory.read_text())
    assert len(kept) == alerts.ALERT_KEYS and 'One more alert.' in kept
    assert 'alert 04999 ' + 'x' * 300 in kept and 'alert 00000 ' + 'x' * 300 not in kept
    assert all(len(k) <= alerts.ALERT_KEY_SIZE for k in kept)
    # Too large, corrupt, a link: each set aside with one error.
    victim = tmp_path / 'victim'
    victim.write_text('{"secret": 1}')
    for what, make in (('too large', lambda: memory.write_text(
                           '{"a": 1, "b": "' + 'x' * alerts.ALERT_MEMORY_LIMIT + '"}')),
                       ('corrupt', lambda: memory.write_text('{"a": ')),
                       ('link', lambda: memory.symlink_to(victim))):
        for p in tmp_path.glob('alerts.json*'):
            p.unlink()
        make()
        caplog.clear()
        handler = alerts.AlertHandler(smtp_server.hostport, ['a@example.org'], 'p',
                                      memory=str(memory))
        assert handler._sent == {}, what
        errors = [r for r in caplog.records if 'Alert memory' in r.getMessage()]
        assert len(errors) == 1 and errors[0].levelname == 'ERROR', what
        assert os.path.lexists(str(memory) + '.bad') and not os.path.lexists(memory), what
    assert victim.read_text() == '{"secret": 1}'


# ----------------------------------------------------------------------
# Row 6: files are never created through a planted link.
# ----------------------------------------------------------------------
PLANT = """
import os, sys
shared, victims, pid, dead = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
def plant(name, victim):
    os.symlink(os.path.join(victims, victim), os.path.join(shared, name))
plant(f'.state.json.{pid}.tmp', 'state')                    # write_text
plant('daemon.lock', 'lock')                                # single_instance
plant('daemon.log', 'log')                                  # configure_log
for name in ('index.html', 'desi_transfer_status.js', 'desi_transfer_status.css'):
    plant(f'.{name}.{pid}.tmp', 'page')                     # the status page
plant('status/.desi_transfer_status_2026.lock', 'created')  # the status lock (dangling)
plant(f'.swept.{dead}.tmp', 'state')                        # sweep_temporary
with open(os.path.join(shared, f'.nobody.{dead}.tmp'), 'w') as f:
    f.write('not yours')
"""


#: The files of root that links planted by nobody point to.
VICTIMS = ('state', 'lock', 'log', 'page')


def test_no_file_created_through_planted_links(unprivileged, tmp_path):
    """In a sticky world-writable directory (as /tmp), ``nobody`` plants links
    to files of root under the names this process would use; root writes
    there; every victim is unchanged, and no link was followed."""
    shared = tempfile.mkdtemp(dir=unprivileged.top)
    os.mkdir(os.path.join(shared, 'status'))
    for d in (shared, os.path.join(shared, 'status')):
        os.chmod(d, 0o1777)
    victims = tmp_path / 'victims'
    victims.mkdir()
    for name in VICTIMS:
        (victims / name).write_text(f'precious {name}\n')
    dead = _dead_pid()
    p = subprocess.run(unprivileged.command('-c', PLANT, shared, str(victims),
                                            str(os.getpid()), str(dead)),
                       env=unprivileged.env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    # write_text: the state file is written beside the planted link.
    files.write_text(os.path.join(shared, 'state.json'), '{"state": 1}')
    assert open(os.path.join(shared, 'state.json')).read() == '{"state": 1}'
    assert not os.path.islink(os.path.join(shared, 'state.json'))
    # The single-instance lock is refused, not followed nor truncated.
    with pytest.raises(OSError, match='symbolic link'):
        processes.single_instance(os.path.join(shared, 'daemon.lock'))
    # The log file is refused, not appended to through the link.
    try:
        with pytest.raises(OSError, match='symbolic link'):
            alerts.configure_log(filename=os.path.join(shared, 'daemon.log'))
    finally:
        alerts.configure_log()
    # The status page is installed beside the planted links.
    status.install_page(shared)
    assert '<html' in open(os.path.join(shared, 'index.html')).read().lower()
    # The status lock is not created through the dangling link: the update is refused.
    store = status.TransferStatus(os.path.join(shared, 'status'), year=2026)
    with pytest.raises(OSError, match='symbolic link'):
        store.update('20260101', 12345, 'rsync')
    assert not (victims / 'created').exists()
    # A sweep removes neither a link nor another user's file.
    assert files.sweep_temporary(shared) == []
    assert os.path.islink(os.path.join(shared, f'.swept.{dead}.tmp'))
    assert os.path.exists(os.path.join(shared, f'.nobody.{dead}.tmp')) or not ROOT
    for name in VICTIMS:
        assert (victims / name).read_text() == f'precious {name}\n', name


def _dead_pid():
    p = subprocess.Popen(['true'])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------
# Row 9: the umask is never changed; modes are explicit.
# ----------------------------------------------------------------------
MODES = """
import json, os, stat, sys
calls = []
umask = os.umask
os.umask = lambda mask: calls.append(mask) or umask(mask)
from desitransfer import status
from desitransfer.files import write_text
from desitransfer.processes import single_instance
d = sys.argv[1]
store = status.TransferStatus(os.path.join(d, 'status'), year=2026)
store.update('20260101', 12345, 'rsync')
write_text(os.path.join(d, 'state.json'), '{}')
lock, _ = single_instance(os.path.join(d, 'daemon.lock'))
modes = {os.path.relpath(os.path.join(r, f), d): stat.S_IMODE(os.lstat(os.path.join(r, f)).st_mode)
         for r, _, files in os.walk(d) for f in files}
print(json.dumps({'umask': calls, 'modes': modes}))
"""


@pytest.mark.parametrize('umask', [0o000, 0o077])
def test_modes_explicit_umask_never_changed(tmp_path, umask):
    """Whatever the umask of the process (0: world-writable files; 077:
    a page the web server cannot read), new files get their explicit
    modes, and the umask is never changed (threads may be starting programs)."""
    p = subprocess.run([sys.executable, '-c', MODES, str(tmp_path)], capture_output=True,
                       text=True, timeout=60, umask=umask)
    assert p.returncode == 0, p.stderr
    found = json.loads(p.stdout.splitlines()[-1])
    assert found['umask'] == []
    assert found['modes'] and set(found['modes'].values()) == {0o644}, found['modes']
