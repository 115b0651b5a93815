# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""A mountain at the real absolute paths (``kpno``): ``/data``, ``/software``
and ``/exposures`` of KPNO are directories of a temporary tree, reached over
the loopback sshd through an ssh wrapper that maps those paths in the remote
command, so that the commands run with their shipped paths unchanged.  Also a
NERSC side: :envvar:`DESI_ROOT` and a stand-in for the site script
:command:`fix_permissions.sh`.  See doc/testing.rst.
"""
import os
import sys
from pathlib import Path

import pytest

#: Top-level directories of the mountain that the wrapper maps.
MAPPED = ('data', 'software', 'exposures')

_WRAPPER = '''#!{python}
# ssh to the simulated mountain; see tests/fixtures_kpno.py.
import os, re, subprocess, sys
word = re.compile(r'(?<!\\S)/({mapped})(?=/|\\s|$)')
args = [word.sub(lambda m: {root!r} + '/' + m.group(1), a) for a in sys.argv[1:]]
if {match!r} and {match!r} in ' '.join(args):
    code = subprocess.run(['/bin/sh', '-c', {before!r}], stdin=subprocess.DEVNULL).returncode
    if code:
        sys.exit(code)
    if '--server' in args:
        at = args.index('--server') + 1
        args[at:at] = {server_args!r}
os.execv({ssh!r}, [{ssh!r}] + args)
'''

_FIX_PERMISSIONS = '''#!/bin/sh
# Stand-in for the NERSC site script: records its arguments.
echo "$*" >> {calls}
echo "fix_permissions.sh: permissions of $* reset"
'''


class KPNO:
    """The simulated mountain and NERSC of one test; see the ``kpno`` fixture."""

    def __init__(self, top, dts, monkeypatch):
        self.top = top
        self.root = top / 'kpno'
        for name in MAPPED:
            (self.root / name).mkdir(parents=True)
        self.dts = dts
        self.ssh = self.wrapper('ssh-kpno')
        self.bin = top / 'bin'
        self.bin.mkdir()
        self.fix_calls_file = top / 'fix_permissions.calls'
        fix = self.bin / 'fix_permissions.sh'
        fix.write_text(_FIX_PERMISSIONS.format(calls=self.fix_calls_file))
        fix.chmod(0o755)
        self.desi_root = top / 'nersc' / 'desi'
        # $DESI_ROOT/engineering is a link, as at NERSC, to show that it is resolved.
        (top / 'nersc' / 'cfs' / 'engineering').mkdir(parents=True)
        self.desi_root.mkdir(parents=True)
        (self.desi_root / 'engineering').symlink_to(top / 'nersc' / 'cfs' / 'engineering')
        for d in ('spectro', 'survey'):
            (self.desi_root / d).mkdir()
        self.kill = top / 'stop_desi_transfer'
        monkeypatch.setenv('RSYNC_RSH', self.ssh)
        monkeypatch.setenv('DESI_ROOT', str(self.desi_root))
        monkeypatch.setenv('PATH', f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}")

    def path(self, mountain_path):
        """Local :class:`~pathlib.Path` of an absolute path at the mountain."""
        return self.root / mountain_path.lstrip('/')

    def write(self, mountain_path, text='x\n', mode=None):
        """Create a file at the mountain (and its directories)."""
        p = self.path(mountain_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        if mode is not None:
            p.chmod(mode)
        return p

    def link(self, mountain_path, target):
        """Create a symbolic link at the mountain; a relative `target` stays inside it."""
        p = self.path(mountain_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(target)
        return p

    def wrapper(self, name, before='', match='rsync --server', server_args=()):
        """Write an ssh program for :envvar:`RSYNC_RSH` that maps the paths of
        the mountain and, for a command containing `match`, first runs the
        shell line `before`: if that fails, the wrapper exits with its status
        (the mountain is down); ``sleep 30`` makes it hang; its standard output
        reaches rsync (garbage).  `server_args` are added after ``--server``
        in a matching remote rsync command (``--bwlimit=40`` slows the sender)."""
        path = self.top / name
        path.write_text(_WRAPPER.format(python=sys.executable, mapped='|'.join(MAPPED),
                                        root=str(self.root), match=match if before or
                                        server_args else '', before=before,
                                        server_args=list(server_args), ssh=self.dts.ssh))
        path.chmod(0o755)
        return str(path)

    def fix_calls(self):
        """Arguments of each :command:`fix_permissions.sh` call, oldest first."""
        if not self.fix_calls_file.exists():
            return []
        return [line.split() for line in self.fix_calls_file.read_text().splitlines()]

    def nersc(self, *parts):
        """A path under :envvar:`DESI_ROOT`."""
        return self.desi_root.joinpath(*parts)


@pytest.fixture
def kpno(tmp_path, dts, monkeypatch):
    """An empty mountain at the real absolute paths, and a NERSC side.

    Sets :envvar:`RSYNC_RSH` to the mapping ssh wrapper, :envvar:`DESI_ROOT`
    to ``tmp_path/nersc/desi`` (whose ``engineering`` is a symbolic link) and
    puts a stand-in :command:`fix_permissions.sh` first on :envvar:`PATH`.
    """
    return KPNO(Path(tmp_path), dts, monkeypatch)
