# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Shared fixtures: a real sshd on 127.0.0.1 reachable as host alias ``dts``
through an injectable ssh program, and free-port helpers.

Further fixtures live in ``tests/fixtures_*.py`` plugins listed below.
"""
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections import namedtuple
from pathlib import Path

import pytest

# Every tests/fixtures_*.py is a plugin of fixtures (tests/ is on sys.path).
pytest_plugins = sorted(p.stem for p in Path(__file__).parent.glob('fixtures_*.py'))

SSHD = shutil.which('sshd') or '/usr/sbin/sshd'

#: What the ``dts`` fixture provides: the ssh wrapper program, its
#: configuration file, the host alias and the sshd process.
Mountain = namedtuple('Mountain', ['ssh', 'config', 'host', 'port', 'process'])


def free_port():
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope='session')
def dts(tmp_path_factory):
    """A real sshd on 127.0.0.1 with its own host and user keys.

    ``dts.ssh`` is a wrapper program running ``ssh -F CONFIG``, under which
    host alias ``dts`` reaches this sshd as the current user.
    """
    if not os.path.exists(SSHD):
        pytest.fail('sshd is not installed (apt-get install openssh-server)')
    d = tmp_path_factory.mktemp('sshd')
    os.chmod(d, 0o700)
    for key in ('host_key', 'user_key'):
        subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', str(d / key)],
                       check=True)
    shutil.copy(d / 'user_key.pub', d / 'authorized_keys')
    os.chmod(d / 'authorized_keys', 0o600)
    port = free_port()
    (d / 'sshd_config').write_text(f"""Port {port}
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
""")
    host_pub = (d / 'host_key.pub').read_text().split()
    (d / 'known_hosts').write_text(f'[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n')
    (d / 'ssh_config').write_text(f"""Host dts
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
    wrapper = d / 'ssh'
    wrapper.write_text(f'#!/bin/sh\nexec ssh -F {d}/ssh_config "$@"\n')
    wrapper.chmod(0o755)
    if os.geteuid() == 0:
        os.makedirs('/run/sshd', mode=0o755, exist_ok=True)
    proc = subprocess.Popen([SSHD, '-D', '-e', '-f', str(d / 'sshd_config')],
                            stderr=open(d / 'sshd.log', 'wb'))
    try:
        wait_for_port(port, process=proc)
        check = subprocess.run([str(wrapper), 'dts', 'true'], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stderr + (d / 'sshd.log').read_text()
        yield Mountain(str(wrapper), str(d / 'ssh_config'), 'dts', port, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
