# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of desi_transfer_init (:mod:`desitransfer.control`): the real daemon
and the real nightwatch started, looked at and stopped as cron and operators
do, a stand-in for the original package's daemon, and an unprivileged user.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from desitransfer.processes import (alive, lock_holder, original_processes, script_of,
                                    single_instance)

#: The thin script of the command, run as an operator runs it.
INIT = [sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     'bin', 'desi_transfer_init')]

#: A stand-in for the original package's daemon: a script of the same name
#: elsewhere, run by python as its "#!/usr/bin/env python" line does.
ORIGINAL = f'''#!{sys.executable}
import time
time.sleep(120)
'''


def init(*args, env=None):
    """Run desi_transfer_init; its exit status and output."""
    environment = {k: v for k, v in os.environ.items() if k != 'NERSC_HOST'}
    environment.update(env or {})
    p = subprocess.run(INIT + list(args), capture_output=True, text=True, timeout=120,
                       env=environment)
    return p.returncode, p.stdout + p.stderr


def niceness(pid):
    with open(f'/proc/{pid:d}/stat') as f:
        return int(f.read().rsplit(')', 1)[1].split()[16])


def argv(pid):
    with open(f'/proc/{pid:d}/cmdline', 'rb') as f:
        return [a.decode() for a in f.read().split(b'\0')[:-1]]


def wait_gone(pid, seconds=10):
    deadline = time.monotonic() + seconds
    while alive(pid):
        assert time.monotonic() < deadline, pid
        time.sleep(0.05)


@pytest.fixture
def daemon_site(site):
    """The daemon's site, with the lock file the daemon takes there."""
    site.lock = os.path.join(os.path.dirname(site.staging), 'desi_transfer_daemon.lock')
    site.extra = ['--', '--configuration', site.config, '--kill', site.kill]
    yield site
    pid = lock_holder(site.lock)
    if pid:
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def original(tmp_path):
    """A process of "another installation" running desi_transfer_daemon."""
    directory = tmp_path / 'original' / 'bin'
    directory.mkdir(parents=True)
    script = directory / 'desi_transfer_daemon'
    script.write_text(ORIGINAL)
    script.chmod(0o755)
    proc = subprocess.Popen([str(script), '--no-backup'], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not argv(proc.pid)[1:2] == [str(script)]:  # python has replaced the loader
            assert time.monotonic() < deadline
            time.sleep(0.02)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_start_status_stop_the_daemon(daemon_site):
    """The real daemon: started detached, niced and with the options chosen
    by NERSC_HOST; a second start is refused; status names it; stop ends it."""
    site = daemon_site
    code, out = init('status', 'daemon', *site.extra)
    assert (code, out) == (0, f"{os.uname().nodename.split('.')[0]} desi_transfer_daemon is "
                              "not running.\n")
    code, out = init('start', *site.extra)
    assert code == 0, out
    pid = lock_holder(site.lock)
    assert out.startswith(f'desi_transfer_daemon started (pid {pid:d}): nice -n 19 ')
    assert niceness(pid) == 19
    assert os.getsid(pid) == os.getpgid(pid) == pid  # its own session, no terminal
    assert argv(pid)[-5:] == ['--no-backup', '--configuration', site.config, '--kill', site.kill]
    assert os.readlink(f'/proc/{pid:d}/fd/0') == '/dev/null'
    assert os.readlink(f'/proc/{pid:d}/fd/1') == '/dev/null'
    stderr_file = os.path.join(site.top, 'nersc', 'logs', 'desi_transfer_daemon.stderr')
    assert os.readlink(f'/proc/{pid:d}/fd/2') == stderr_file
    # Ours, not another installation's.
    assert original_processes('desi_transfer_daemon') == []
    code, out = init('start', *site.extra)
    assert code == 1 and 'desi_transfer_daemon is already started (pid' in out
    assert lock_holder(site.lock) == pid
    code, out = init('status', *site.extra)
    assert code == 0 and f'desi_transfer_daemon is running (pid {pid:d}, since ' in out
    code, out = init('stop', *site.extra)
    assert code == 0, out
    assert out.splitlines()[0].startswith(f'Stopping desi_transfer_daemon (pid {pid:d}')
    assert out.splitlines()[-1] == 'desi_transfer_daemon stopped.'
    assert not alive(pid) and lock_holder(site.lock) is None
    assert 'desi_transfer_daemon stops.' in site.log_text()
    code, out = init('stop', *site.extra)
    assert code == 1 and out.endswith('desi_transfer_daemon is not running.\n')


def test_restart(daemon_site):
    site = daemon_site
    assert init('restart', *site.extra)[0] == 0  # not running: just started
    first = lock_holder(site.lock)
    code, out = init('restart', *site.extra)
    assert code == 0, out
    second = lock_holder(site.lock)
    assert second and second != first and not alive(first)
    assert 'desi_transfer_daemon stopped.' in out and 'desi_transfer_daemon started' in out
    assert init('stop', *site.extra)[0] == 0


def test_kill_file_keeps_it_from_starting(daemon_site):
    site = daemon_site
    open(site.kill, 'w').close()
    code, out = init('start', *site.extra)
    assert (code, out) == (0, f'{site.kill} detected, will not attempt to start '
                              'desi_transfer_daemon.\n')
    assert lock_holder(site.lock) is None
    # The daemon itself said so by email (once a day), though cron discards the output.
    assert site.smtp.wait(1, timeout=30)
    assert f'{site.kill} exists, so desi_transfer_daemon stops as soon as it starts' in \
        site.smtp.messages[0].get_content()
    assert init('start', *site.extra)[0] == 0
    assert not site.smtp.wait(2, timeout=0.5)
    code, out = init('status', *site.extra)
    assert code == 0 and f'{site.kill} exists: desi_transfer_daemon will not start' in out


@pytest.mark.alone
def test_original_is_detected_and_start_refused(daemon_site, original, tmp_path,
                                                unprivileged, caplog):
    """A desi_transfer_daemon of another installation: reported by status,
    start refused with how to stop it; a file of that name open in another
    program is nothing; another user's copy counts only if asked."""
    site = daemon_site
    if unprivileged.root:
        p = unprivileged.run('from desitransfer.processes import original_processes as o; '
                             'print([p.pid for p in o("desi_transfer_daemon")], '
                             '[p.pid for p in o("desi_transfer_daemon", all_users=True)])')
        # Other users' daemons (another test's, run at the same time) count too.
        mine, everyone = p.stdout.split('\n')[0].split('] [')
        assert mine == '[' and str(original.pid) in everyone[:-1].split(', '), p.stdout + p.stderr
    bystander = subprocess.Popen(['tail', '-f', os.path.join(tmp_path, 'original', 'bin',
                                                             'desi_transfer_daemon')],
                                 stdout=subprocess.DEVNULL)
    try:
        found = original_processes('desi_transfer_daemon')
        assert [p.pid for p in found] == [original.pid]
        assert found[0].command.endswith('original/bin/desi_transfer_daemon --no-backup')
        assert original_processes('desi_transfer_daemon', exclude=[original.pid]) == []
        assert original_processes('desi_nightwatch_transfer') == []
        code, out = init('status', *site.extra)
        assert code == 0
        assert f'another version of desi_transfer_daemon is running: pid {original.pid:d}' in out
        code, out = init('start', *site.extra)
        assert code == 1
        assert 'another version of desi_transfer_daemon may already be running; not started.' \
            in out
        assert "the original's 'desi_transfer_init.sh stop'" in out
        assert f'touch {site.kill}' in out
        assert lock_holder(site.lock) is None
        # The daemon, run once to say it by email, refused as well.
        assert site.smtp.wait(1, timeout=30)
        assert f'pid {original.pid:d}' in site.smtp.messages[0].get_content()
        code, out = init('stop', *site.extra)
        assert code == 1 and "not stopped by this command" in out
        assert alive(original.pid)
        # The daemon started otherwise (by an old crontab line) refuses too.
        assert site.run() == 1
        assert f'desi_transfer_daemon of another installation (such as the original ' \
            f'desitransfer) is running: pid {original.pid:d}' in caplog.text
        assert f'kill {original.pid:d}' in caplog.text
        assert site.installed() == set() and not os.path.exists(site.state_file)
    finally:
        bystander.kill()
        bystander.wait()


STUBBORN = '''
import signal, subprocess, sys, time
from desitransfer.processes import single_instance
signal.signal(signal.SIGTERM, signal.SIG_IGN)
lock, _ = single_instance(sys.argv[1])
child = subprocess.Popen(['sleep', '120'])
print(child.pid, flush=True)
time.sleep(120)
'''


def test_stop_kills_only_the_group_started(tmp_path, monkeypatch):
    """A command that ignores SIGTERM: after the wait, SIGKILL to its process
    group (it and what it started), nothing else."""
    monkeypatch.setenv('DESI_ROOT', str(tmp_path))
    lock = tmp_path / 'spectro' / 'nightwatch' / 'desi_nightwatch_transfer.lock'
    stubborn = subprocess.Popen([sys.executable, '-c', STUBBORN, str(lock)],
                                start_new_session=True, stdout=subprocess.PIPE, text=True)
    outsider = subprocess.Popen(['sleep', '120'], start_new_session=True)
    child = None
    try:
        child = int(stubborn.stdout.readline())
        assert lock_holder(str(lock)) == stubborn.pid
        code, out = init('stop', 'nightwatch', '--wait', '0.5')
        assert code == 0, out
        assert (f'desi_nightwatch_transfer did not stop within 0.5 s of SIGTERM; killed '
                f'(SIGKILL) its process group {stubborn.pid:d} and the processes it started '
                f'({child:d}).') in out
        assert stubborn.wait(timeout=10) == -signal.SIGKILL
        wait_gone(child)
        assert alive(outsider.pid)
    finally:
        for p in (stubborn, outsider):
            p.kill()
            p.wait()
        if child and alive(child):
            os.kill(child, signal.SIGKILL)


def test_lock_holder(tmp_path):
    path = str(tmp_path / 'x.lock')
    assert lock_holder(path) is None
    lock, _ = single_instance(path)
    assert lock_holder(path) == os.getpid()
    lock.close()
    assert lock_holder(path) is None


def test_script_of_a_command_line():
    assert script_of(['/usr/bin/python3', '-u', '/o/bin/desi_transfer_daemon', '-B'],
                     'desi_transfer_daemon') == '/o/bin/desi_transfer_daemon'
    assert script_of(['/o/bin/desi_transfer_daemon'], 'desi_transfer_daemon')
    assert script_of(['/bin/bash', 'desi_transfer_daemon'], 'desi_transfer_daemon')
    for line in (['vi', 'desi_transfer_daemon'], ['python', '-c', 'desi_transfer_daemon'],
                 ['python', 'desi_transfer_status', 'desi_transfer_daemon'], []):
        assert script_of(line, 'desi_transfer_daemon') is None


@pytest.mark.parametrize('args', [[], ['begin'], ['start', 'tucson'], ['stop', '-w', '0']])
def test_usage(args):
    code, out = init(*args)
    assert code == 2 and 'usage: desi_transfer_init' in out


def test_bad_configuration(tmp_path):
    code, out = init('start', '--', '-c', str(tmp_path / 'none.ini'))
    assert code == 1
    assert out.strip().splitlines() == [
        f'desi_transfer_init: cannot start desi_transfer_daemon: configuration file '
        f'{tmp_path}/none.ini cannot be read: No such file or directory']


def test_nightwatch_and_an_unprivileged_user(kpno, unprivileged, monkeypatch):
    """The real nightwatch started as its operator; another (unprivileged)
    user sees it run but cannot stop it; its operator can."""
    desi_root = tempfile.mkdtemp(dir=unprivileged.top)
    os.chmod(desi_root, 0o755)
    monkeypatch.setenv('DESI_ROOT', desi_root)
    kpno.path('/exposures/nightwatch').mkdir()
    extra = ['--', '--kill', str(kpno.kill), '--alert-to', '', '-s', '60']
    code, out = init('start', 'nightwatch', *extra)
    assert code == 0, out
    lock = os.path.join(desi_root, 'spectro', 'nightwatch', 'desi_nightwatch_transfer.lock')
    pid = lock_holder(lock)
    assert argv(pid)[-8:-6] == ['--debug', '--no-permission']
    code = ('import sys; from desitransfer.control import main; '
            'sys.argv = ["desi_transfer_init"] + sys.argv[1:]; sys.exit(main())')

    def as_other_user(*args):
        p = subprocess.run(unprivileged.command('-c', code, *args), capture_output=True,
                           text=True, timeout=60, env=unprivileged.env(DESI_ROOT=desi_root))
        return p.returncode, p.stdout + p.stderr

    try:
        status, out = as_other_user('status', 'nightwatch')
        assert status == 0 and f'desi_nightwatch_transfer is running (pid {pid:d}' in out, out
        assert 'another version' not in out
        if unprivileged.root:
            status, out = as_other_user('stop', 'nightwatch')
            assert status == 1
            assert (f'cannot stop desi_nightwatch_transfer (pid {pid:d}, user root): '
                    'operation not permitted.') in out
            assert alive(pid)
        code, out = init('stop', 'nightwatch', *extra)
        assert code == 0, out
        assert not alive(pid)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_failure_at_start_up_is_reported(daemon_site):
    """A command that exits at once (here a bad option): exit 1, and its
    standard error is kept beside its log."""
    site = daemon_site
    code, out = init('start', *site.extra, '--no-such-option')
    stderr_file = os.path.join(site.top, 'nersc', 'logs', 'desi_transfer_daemon.stderr')
    assert code == 1
    assert out.strip() == ('Failed to start desi_transfer_daemon: it exited with status 2 '
                           f'during start-up; see {site.top}/nersc/logs/desi_transfer_daemon.log '
                           f'and {stderr_file}.')
    with open(stderr_file) as f:
        text = f.read()
    assert 'desi_transfer_init starts: ' in text
    assert 'unrecognized arguments: --no-such-option' in text
