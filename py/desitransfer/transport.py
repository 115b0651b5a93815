# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
======================
desitransfer.transport
======================

ssh and rsync transport: the non-interactive ssh command, rsync over it,
rsync's exit codes, one ssh connection shared by the commands of a run, and
the network round trip to a host.
"""
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time

from .common import log
from .processes import alive
from .runner import command_environment, run
from .rsynccommand import rsync_command


#: Options that make every ssh connection non-interactive and quick to fail.
SSH_OPTIONS = ('-o', 'BatchMode=yes',
               '-o', 'ConnectTimeout=30',
               '-o', 'ServerAliveInterval=30',
               '-o', 'ServerAliveCountMax=4')


def environment_ssh(control=None):
    """The ssh command for rsync and remote commands, from :envvar:`RSYNC_RSH`
    (rsync's own convention: a program and its options) or else ``ssh``, with
    the non-interactive options of :func:`ssh_command`.
    """
    return ssh_command(shlex.split(os.environ.get('RSYNC_RSH', '').strip() or 'ssh'),
                       control=control)


def ssh_command(ssh='ssh', control=None):
    """The ssh client command, non-interactive, as an argument list.

    Parameters
    ----------
    ssh : :class:`str` or :class:`list`, optional
        The ssh program (a wrapper that adds ``-F CONFIG`` is fine), or a
        program and its own options as a list.
    control : :class:`str`, optional
        Path of an OpenSSH control socket to share one connection.

    Returns
    -------
    :class:`list`
        The ssh program and its options.
    """
    command = ([ssh] if isinstance(ssh, str) else list(ssh)) + list(SSH_OPTIONS)
    if control:
        command += ['-o', 'ControlMaster=auto', '-o', f'ControlPath={control}',
                    '-o', 'ControlPersist=120']
    return command


def rsync_ssh(command, ssh, io_timeout=None):
    """Make an rsync command use an ssh command as its transport.

    Parameters
    ----------
    command : :class:`list`
        An rsync command, such as returned by :func:`~desitransfer.common.rsync`.
    ssh : :class:`list`
        An ssh command, such as returned by :func:`ssh_command`.
    io_timeout : :class:`int`, optional
        If given, rsync gives up (exit status 30) when nothing is received for
        this many seconds (``--timeout``).

    Returns
    -------
    :class:`list`
        A copy of `command` with ``--rsh`` (and ``--timeout``) set.
    """
    return rsync_command(command[1:], [], ssh=ssh, io_timeout=io_timeout, program=command[0])


class SharedConnection(object):
    """One ssh connection to `host` shared by the commands of a run (OpenSSH
    connection multiplexing).

    Parameters
    ----------
    host : :class:`str`, optional
        ssh host alias of the mountain.
    program : :class:`str` or :class:`list`, optional
        The ssh program (and its options); by default that of
        :func:`environment_ssh` (:envvar:`RSYNC_RSH`, else ``ssh``).
    """

    def __init__(self, host='dts', program=None):
        self.host = host
        self.program = program
        self._directory = None
        self._lock = threading.Lock()

    def _command(self, control=None):
        if self.program:
            return ssh_command(self.program, control=control)
        return environment_ssh(control=control)

    def ssh(self, stream=0):
        """The ssh command (a list) that shares the connection; give it to
        :func:`rsync_ssh`.  The first command to use it opens the connection.
        A `stream` other than 0 is a connection of its own, shared the same way
        by the commands given the same `stream` (parallel rsyncs, each with its
        own TCP window)."""
        with self._lock:  # streams ask from several threads
            if self._directory is None:
                # Directories of processes that were killed before close().
                top = tempfile.gettempdir()
                for name in os.listdir(top):
                    m = re.fullmatch(r'desitransfer-ssh-([0-9]{1,10})-\w+', name)
                    if m is not None and not alive(int(m.group(1))):
                        path = os.path.join(top, name)
                        try:
                            st = os.lstat(path)
                        except OSError:
                            continue
                        # Only a directory of this user: never another's, never a link.
                        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
                            shutil.rmtree(path, ignore_errors=True)
                self._directory = tempfile.mkdtemp(prefix=f'desitransfer-ssh-{os.getpid():d}-')
        name = f'mux{stream:d}' if stream else 'mux'
        return self._command(control=os.path.join(self._directory, name))

    def is_open(self, stream=0):
        """``True`` if the connection of `stream` has a control socket (it is
        open, or was until it died without cleaning up)."""
        if self._directory is None:
            return False
        return os.path.exists(os.path.join(self._directory,
                                           f'mux{stream:d}' if stream else 'mux'))

    def close(self):
        """Stop the shared connections, if any is open, and remove their private directory."""
        if self._directory is None:
            return
        # All at once: one after the other, each ssh start adds to the stop.
        closing = [threading.Thread(target=run, name=f'close-{name}', daemon=True,
                                    args=(self._command() + ['-o', f'ControlPath={control}',
                                                             '-O', 'exit', self.host],),
                                    kwargs={'timeout': 30, 'quiet': True, 'ok': (0, 255)})
                   for name in sorted(os.listdir(self._directory))
                   for control in [os.path.join(self._directory, name)]]
        for thread in closing:
            thread.start()
        for thread in closing:
            thread.join(timeout=60)
        shutil.rmtree(self._directory, ignore_errors=True)
        self._directory = None


def round_trip(ssh, host, tries=2, timeout=30):
    """The network round trip to `host`, in seconds: the fastest of `tries`
    exchanges of one line with ``cat`` at `host`, within one ssh session (so
    that starting programs is not counted); ``None`` if it cannot be measured.

    This is the one exchange the runner :func:`~desitransfer.runner.run`, which collects the output
    at the end, cannot make; the command is logged and bounded the same way.

    Parameters
    ----------
    ssh : :class:`list`
        The ssh command, such as returned by :func:`ssh_command`.
    host : :class:`str`
        The ssh host alias.
    tries : :class:`int`, optional
        Exchanges to make.
    timeout : :class:`float`, optional
        Give up after this many seconds in all.
    """
    import select
    command = [str(c) for c in ssh] + [host, 'cat']
    log.debug("Running: %s", shlex.join(command))
    try:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=command_environment(),
                                start_new_session=True)
    except OSError as err:
        log.warning("Could not start %s: %s", command[0], err)
        return None
    deadline = time.monotonic() + timeout
    best = None
    try:
        for i in range(tries + 1):  # the first exchange also opens the session: not counted
            t0 = time.monotonic()
            proc.stdin.write(b'.\n')
            proc.stdin.flush()
            # Read the two bytes expected, never more, and never past the deadline.
            answer = b''
            while answer != b'.\n':
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                    return None
                data = os.read(proc.stdout.fileno(), 2 - len(answer))
                answer += data
                if not data or not b'.\n'.startswith(answer):
                    return None
            if i > 0:
                seconds = time.monotonic() - t0
                best = seconds if best is None else min(best, seconds)
        return best
    except OSError:
        return None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:  # a line that could not be written: nobody reads it
                pass
        proc.wait()
