# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""What the tests of the mirrors of NERSC (``test_tucson.py``,
``test_utah.py``) share: their present, files written for the rsync daemon,
the listing of a tree, and the site a mirror command runs in (NERSC, an HTTP
server, a mail server, the copy and the logs), with the command run as cron
would and stopped as an operator would.

A plain module, not a plugin of fixtures: ``fixtures_daemon.py`` already
names its fixtures ``clock`` and ``reset_log``.
"""
import datetime as dt
import os
import subprocess
import threading
import time

from desitransfer import runner
from loopback import terminate_when

#: The present of most tests: 11:00 on 15 June 2026 at Kitt Peak.
NOW = dt.datetime(2026, 6, 15, 18, 0, tzinfo=dt.timezone.utc)


def write(path, text='data'):
    """Write a file readable by everyone (the rsync daemon reads as nobody)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path, 'w') as f:
        f.write(f'{text} {path}\n')
    os.chmod(path, 0o644)


def tree(top):
    """Every file and link under `top`, relative to it (links as ``NAME -> TARGET``)."""
    found = []
    for root, dirs, names in os.walk(top):
        for n in dirs + names:
            path = os.path.join(root, n)
            if os.path.islink(path):
                found.append(f'{os.path.relpath(path, top)} -> {os.readlink(path)}')
            elif n in names:
                found.append(os.path.relpath(path, top))
    return sorted(found)


def slow_ssh(tmp_path, ssh):
    """An ssh program that touches a marker file, then waits 30 s before
    running `ssh`: the marker and the program."""
    marker = tmp_path / 'connecting'
    slow = tmp_path / 'slow-ssh'
    slow.write_text(f'#!/bin/sh\ntouch {marker}\nsleep 30\nexec {ssh} "$@"\n')
    slow.chmod(0o755)
    return marker, slow


def still_running(program):
    """The processes whose command line holds `program`, as :command:`pgrep` lists them."""
    return subprocess.run(['pgrep', '-f', str(program)], capture_output=True,
                          text=True).stdout.strip()


class Recorder(object):
    """A runner for :mod:`desitransfer.mirror` that runs nothing: a listing
    shows one file; each rsync command is recorded (``started``), takes
    `seconds` and transfers 1,234 files, 5,678,901 bytes.  ``most`` is the
    most commands that ran at once."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.started = []
        self.most = 0
        self._running = 0
        self._lock = threading.Lock()

    def __call__(self, command, **kwargs):
        if '--list-only' in command:
            return runner.Result(0, 'drwxr-xr-x 4,096 2026/06/15 12:00:00 .\n'
                                    '-rw-r--r-- 4 2026/06/15 12:00:00 file\n', '')
        with self._lock:
            self.started.append(command)
            self._running += 1
            self.most = max(self.most, self._running)
        time.sleep(self.seconds)
        with self._lock:
            self._running -= 1
        return runner.Result(0, 'Number of regular files transferred: 1,234\n'
                                'Total transferred file size: 5,678,901 bytes\n', '')


class MirrorSite(object):
    """The copy (``mirror``), the logs (``logs``), an HTTP server (``web``), a
    mail server (``smtp``) and the environment of the command (``env``: that
    of the tests but for the variables starting with `unset`).

    ``argv`` is the command as cron runs it, set by each test file, to
    which :meth:`command` and :meth:`terminate_when` add their arguments.
    """

    def __init__(self, tmp_path, http_site, smtp_server, copy, unset):
        self.mirror = str(tmp_path / copy)
        os.mkdir(self.mirror)
        self.logs = str(tmp_path / 'logs')
        self.web = http_site()
        self.smtp = smtp_server
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(unset)}
        self.argv = []

    def command(self, *args, env=None):
        """Run the command as cron would, with `env` added: exit status and output."""
        p = subprocess.run(self.argv + list(args), env=dict(self.env, **(env or {})),
                           capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout + p.stderr

    def terminate_when(self, ready, *args, settle=0.0, env=None):
        """Start the command with `args`, send SIGTERM once ``ready()`` (and
        `settle` seconds more): its exit status, output and seconds to stop."""
        proc = subprocess.Popen(self.argv + list(args), env=dict(self.env, **(env or {})),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return terminate_when(proc, ready, settle=settle)

    def use_environment(self, monkeypatch, **env):
        """Give this process the environment of the command, with `env` added."""
        for k in [k for k in os.environ if k not in self.env]:
            monkeypatch.delenv(k)
        for k, v in dict(self.env, **env).items():
            monkeypatch.setenv(k, v)

    def subjects(self):
        return [m['Subject'] for m in self.smtp.messages]

    def bodies(self):
        return '\n'.join(m.get_content() for m in self.smtp.messages)
