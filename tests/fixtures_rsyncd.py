# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Fixture ``rsyncd``: a real :command:`rsync --daemon` on 127.0.0.1 serving
module ``desi`` with password authentication, standing for NERSC's.

Run by root, the daemon reads files as ``nobody``, like a daemon serving
files it does not own: a file without read permission for others cannot be
sent.  See doc/testing.rst.
"""
import os
import shutil
import subprocess
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port

#: ``hostname`` is what :envvar:`DESISYNC_HOSTNAME` takes (user, host and
#: port); ``module`` the directory served as module ``desi``; ``home`` a
#: home directory holding the password file ``.desi``; ``log`` the daemon's log.
Rsyncd = namedtuple('Rsyncd', ['hostname', 'module', 'home', 'password', 'port', 'log',
                               'process'])

#: The user and password of the module.
USER, PASSWORD = 'desi', 'not-a-real-secret'


@pytest.fixture
def rsyncd(tmp_path):
    """Start an rsync daemon on 127.0.0.1 with an empty module ``desi``.

    The module lives in a directory that ``nobody`` can read (under the
    system temporary directory, removed at the end); the password file is
    ``home/.desi`` (mode 0600).
    """
    top = Path(tempfile.mkdtemp(prefix='desi-rsyncd-'))
    os.chmod(top, 0o755)
    module = top / 'desi'
    module.mkdir(mode=0o755)
    conf = tmp_path / 'rsyncd'
    conf.mkdir()
    secrets = conf / 'rsyncd.secrets'
    secrets.write_text(f'{USER}:{PASSWORD}\n')
    os.chmod(secrets, 0o600)
    home = tmp_path / 'home'
    home.mkdir()
    (home / '.desi').write_text(PASSWORD + '\n')
    os.chmod(home / '.desi', 0o600)
    owner = 'uid = nobody\n    gid = 65534\n' if os.geteuid() == 0 else ''
    port = free_port()
    (conf / 'rsyncd.conf').write_text(f"""pid file = {conf}/rsyncd.pid
log file = {conf}/rsyncd.log
use chroot = no
[desi]
    path = {module}
    comment = DESI data at NERSC
    read only = yes
    auth users = {USER}
    secrets file = {secrets}
    strict modes = yes
    {owner}""")
    process = subprocess.Popen(['rsync', '--daemon', '--no-detach', f'--config={conf}/rsyncd.conf',
                                f'--port={port:d}', '--address=127.0.0.1'],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process=process)
        yield Rsyncd(f'{USER}@127.0.0.1:{port:d}', module, home, PASSWORD, port,
                     conf / 'rsyncd.log', process)
    finally:
        # Killed: on SIGTERM the daemon takes 0.4 s to end, and the test is over.
        process.kill()
        process.wait(timeout=10)
        shutil.rmtree(top, ignore_errors=True)
