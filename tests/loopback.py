# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Loopback servers shared by the tests and the benchmarks: a real sshd on
127.0.0.1 reachable as host alias ``dts`` through an ssh wrapper program;
and stopping a command started against them as an operator would.
"""
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import namedtuple

SSHD = shutil.which('sshd') or '/usr/sbin/sshd'

#: The ssh wrapper program, its configuration file, the host alias, the port
#: and the sshd process.
Mountain = namedtuple('Mountain', ['ssh', 'config', 'host', 'port', 'process'])

#: The key exchange the tests' sshd offers.  OpenSSH's default since 9.0, a
#: post-quantum hybrid, costs the client about 0.12 s of CPU per handshake on
#: the 2-core test machine, where curve25519 costs 0.02 s; the suite makes
#: hundreds of handshakes.  The benchmarks keep OpenSSH's default (``None``),
#: as the mountain's sshd does.
TEST_KEX = 'curve25519-sha256,curve25519-sha256@libssh.org'


def free_port():
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_until(condition, seconds, proc=None, what=''):
    """Wait until ``condition()`` is true, at most `seconds` (an assertion
    error naming `what` after that), and while the process `proc`, if given,
    runs (an assertion error with the end of its output if it stopped);
    when, in :func:`time.monotonic` seconds."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f'not within {seconds} s: {what}'
        assert proc is None or proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    return time.monotonic()


def wait_for_port(port, timeout=10.0, process=None):
    """Wait until something listens on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f'server exited with {process.returncode}')
        try:
            with socket.create_connection(('127.0.0.1', port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f'nothing listens on 127.0.0.1:{port}')


def start_sshd(d, kex=None):
    """Start sshd on 127.0.0.1 with its own host and user keys in directory `d`,
    offering only the key exchange algorithms `kex` if given (see
    :data:`TEST_KEX`).

    Returns a :class:`Mountain`; ``Mountain.ssh`` is a wrapper running
    ``ssh -F CONFIG``, under which host alias ``dts`` reaches this sshd as
    the current user.  Stop it with ``process.terminate()``.

    Its sessions start with ``SHLVL=1``.  bash reads ``~/.bashrc`` for a
    command that sshd runs (SSH_CLIENT is set) only in a top-level shell;
    with SHLVL already 1 it does not, so the commands the tests send to the
    "mountain" do not run the tester's shell start-up (one ``pyenv init``
    there cost every ssh command 0.13 s and made the suite half again as
    long).
    """
    if not os.path.exists(SSHD):
        raise RuntimeError('sshd is not installed (apt-get install openssh-server)')
    d = str(d)
    os.chmod(d, 0o700)
    for key in ('host_key', 'user_key'):
        subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f',
                        os.path.join(d, key)], check=True)
    shutil.copy(os.path.join(d, 'user_key.pub'), os.path.join(d, 'authorized_keys'))
    os.chmod(os.path.join(d, 'authorized_keys'), 0o600)
    port = free_port()
    with open(os.path.join(d, 'sshd_config'), 'w') as f:
        f.write(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
AuthorizedKeysFile {d}/authorized_keys
PidFile {d}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
MaxStartups 100:30:200
MaxSessions 100
LogLevel ERROR
Subsystem sftp internal-sftp
SetEnv SHLVL=1
""")
        if kex:
            f.write(f'KexAlgorithms {kex}\n')
    with open(os.path.join(d, 'host_key.pub')) as f:
        host_pub = f.read().split()
    with open(os.path.join(d, 'known_hosts'), 'w') as f:
        f.write(f'[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n')
    with open(os.path.join(d, 'ssh_config'), 'w') as f:
        f.write(f"""Host dts
    HostName 127.0.0.1
    Port {port}
    User {getpass.getuser()}
    IdentityFile {d}/user_key
    IdentitiesOnly yes
    UserKnownHostsFile {d}/known_hosts
    StrictHostKeyChecking yes
    HostKeyAlias [127.0.0.1]:{port}
    BatchMode yes
    LogLevel ERROR
""")
    wrapper = os.path.join(d, 'ssh')
    with open(wrapper, 'w') as f:
        f.write(f'#!/bin/sh\nexec ssh -F {d}/ssh_config "$@"\n')
    os.chmod(wrapper, 0o755)
    if os.geteuid() == 0:
        os.makedirs('/run/sshd', mode=0o755, exist_ok=True)
    with open(os.path.join(d, 'sshd.log'), 'wb') as sshd_log:
        proc = subprocess.Popen([SSHD, '-D', '-e', '-f', os.path.join(d, 'sshd_config')],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=sshd_log)
    try:
        wait_for_port(port, process=proc)
        check = subprocess.run([wrapper, 'dts', 'true'], capture_output=True,
                               text=True, timeout=30)
        if check.returncode != 0:
            with open(os.path.join(d, 'sshd.log')) as f:
                raise RuntimeError('ssh to the loopback sshd failed: ' + check.stderr + f.read())
    except Exception:
        proc.terminate()
        raise
    return Mountain(wrapper, os.path.join(d, 'ssh_config'), 'dts', port, proc)


def terminate_when(proc, ready, poll=0.05, settle=0.0, timeout=30):
    """Send SIGTERM to the running `proc` once ``ready()`` (and `settle`
    seconds more), failing if it ends first or `timeout` seconds pass; its
    exit status, its output and the seconds it took to stop.  The process is
    killed if it is still there when this returns or fails."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert time.monotonic() < deadline and proc.poll() is None, proc.poll()
            time.sleep(poll)
        time.sleep(settle)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
