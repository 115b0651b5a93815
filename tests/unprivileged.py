# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Run Python code as an unprivileged user, for tests of permission
problems that root would never see (CI runs as root).

As root, the code runs as ``nobody`` through :command:`setpriv`, with the
system's ``/usr/bin/python3`` and a world-readable copy of the package and
its pure-Python dependencies (the virtual environment may live where
``nobody`` cannot read, such as ``/root``).  As any other user it simply runs
as that user.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

#: Top-level packages copied for the unprivileged interpreter.
PACKAGES = ('desitransfer', 'desiutil', 'pytz', 'requests', 'urllib3', 'idna', 'certifi',
            'charset_normalizer')

NOBODY = 65534


def _world_readable(top):
    for root, dirs, files in os.walk(top):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


class Unprivileged:
    """A way to run ``python -c CODE`` without privileges; see :func:`unprivileged`."""

    def __init__(self):
        self.root = os.geteuid() == 0
        self.top = tempfile.mkdtemp(prefix='desitransfer-unprivileged.')
        os.chmod(self.top, 0o755)
        self.lib = os.path.join(self.top, 'lib')
        os.mkdir(self.lib)
        for name in PACKAGES:
            spec = importlib.util.find_spec(name)
            if spec is None:
                continue
            if spec.submodule_search_locations:
                shutil.copytree(list(spec.submodule_search_locations)[0],
                                os.path.join(self.lib, name),
                                ignore=shutil.ignore_patterns('__pycache__'))
            else:
                shutil.copy(spec.origin, self.lib)
        _world_readable(self.top)
        self.python = '/usr/bin/python3' if self.root else sys.executable

    def directory(self):
        """A new directory that the unprivileged user owns."""
        d = tempfile.mkdtemp(dir=self.top)
        if self.root:
            os.chown(d, NOBODY, NOBODY)
        return d

    def command(self, *args):
        """The argument list running ``python ARGS`` as the unprivileged user."""
        prefix = (['setpriv', f'--reuid={NOBODY:d}', f'--regid={NOBODY:d}', '--clear-groups']
                  if self.root else [])
        return prefix + [self.python, '-B'] + list(args)

    def env(self, **extra):
        env = {'PATH': '/usr/bin:/bin', 'HOME': self.top, 'LANG': 'C.UTF-8',
               'PYTHONPATH': self.lib}
        env.update(extra)
        return env

    def run(self, code, **kwargs):
        """Run Python `code` as the unprivileged user; a :class:`subprocess.CompletedProcess`."""
        return subprocess.run(self.command('-c', code), env=self.env(), capture_output=True,
                              text=True, timeout=120, **kwargs)

    def cleanup(self):
        shutil.rmtree(self.top, ignore_errors=True)
