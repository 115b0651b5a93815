# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
====================
desitransfer.control
====================

Entry point for :command:`desi_transfer_init`: start, stop, restart and look
at the long-running commands, :command:`desi_transfer_daemon` and
:command:`desi_nightwatch_transfer`, from cron or by hand.

Whether a command runs, and as which process, is told by its single-instance
lock (:func:`desitransfer.processes.single_instance`): the kernel lock itself,
not a search of command lines, so a crash never leaves a stale answer and a
text editor showing the program is never taken for it.  A copy of the
program from another installation, such as the original package, holds no
such lock; :func:`desitransfer.processes.original_processes` finds it, and
the long-running commands call it at start-up too.
"""
import datetime as dt
import os
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from argparse import ArgumentError, ArgumentParser

from . import __version__ as dtVersion
from .files import open_append
from .configuration import ConfigurationError, read_configuration
from .processes import (alive, descendants, installed_scripts, lock_holder, original_processes,
                        started, stat_fields, user_of)

#: The long-running commands, by the name given on the command line.
PROGRAMS = {'daemon': 'desi_transfer_daemon', 'nightwatch': 'desi_nightwatch_transfer'}

#: Seconds to wait for a command to take its lock after it is started.
START_WAIT = 30.0

#: Seconds a command run in the foreground to report why it does not start
#: may take (one pass at most).
REFUSAL_TIMEOUT = 3600

#: Seconds to wait, by default, for a command to exit after SIGTERM.
STOP_WAIT = 60.0

#: Seconds to wait for the processes killed with SIGKILL to disappear.
KILL_WAIT = 5.0

#: Niceness of a started command, as ``nice -n 19``.
NICENESS = 19

# ----------------------------------------------------------------------
# The commands.
# ----------------------------------------------------------------------


class Command(object):
    """One long-running command as :command:`desi_transfer_init` sees it.

    Parameters
    ----------
    name : :class:`str`
        ``'daemon'`` or ``'nightwatch'``.
    extra : :class:`list`, optional
        Options given to the command after those chosen by :envvar:`NERSC_HOST`.

    Raises
    ------
    ConfigurationError
        If the command's configuration cannot be used.
    """

    def __init__(self, name, extra=()):
        self.name = name
        self.program = PROGRAMS[name]
        self.host = socket.gethostname().split('.')[0]
        self.arguments = self.default_options() + list(extra)
        configuration, self.kill = self._where(self.arguments)
        if name == 'daemon':
            directories, _, log_conf = read_configuration(configuration)
            top = os.path.dirname(directories[0].staging)
            self.log_file = log_conf['filename']
        else:
            if not os.environ.get('DESI_ROOT'):
                raise ConfigurationError("DESI_ROOT is not set; the lock and the log of "
                                         f"{self.program} are under "
                                         "$DESI_ROOT/spectro/nightwatch")
            top = os.path.join(os.environ['DESI_ROOT'], 'spectro', 'nightwatch')
            self.log_file = os.path.join(top, f'{self.program}.log')
        self.lock_file = os.path.join(top, f'{self.program}.lock')
        self.stderr_file = os.path.splitext(self.log_file)[0] + '.stderr'

    def default_options(self):
        """The options of the command chosen by :envvar:`NERSC_HOST`, as in
        the original scripts: away from NERSC, no tape backup (daemon) and
        no permission reset (nightwatch); nightwatch logs at DEBUG level."""
        nersc = bool(os.environ.get('NERSC_HOST'))
        if self.name == 'daemon':
            return [] if nersc else ['--no-backup']
        return ['--debug'] + ([] if nersc else ['--no-permission'])

    def _where(self, arguments):
        """The configuration file (daemon) and the kill file named in the
        command's `arguments`, or their defaults.  The command checks the
        rest of its options itself: a bad one makes it exit at once, which
        :func:`start` reports."""
        prsr = ArgumentParser(prog=f'{self.program} options', add_help=False,
                              exit_on_error=False)
        if self.name == 'daemon':
            prsr.add_argument('-c', '--configuration')
        prsr.add_argument('-k', '--kill', default=os.path.join(os.path.expanduser('~'),
                                                               'stop_desi_transfer'))
        try:
            known, _ = prsr.parse_known_args(arguments)
        except ArgumentError as err:
            raise ConfigurationError(f"options {shlex.join(arguments)}: {err}") from None
        return getattr(known, 'configuration', None), known.kill

    def script(self):
        """The program of this installation to start."""
        for path in installed_scripts(self.program):
            if os.access(path, os.X_OK):
                return path
        raise ConfigurationError(f"{self.program} of this installation is not found "
                                 f"beside {sys.executable} or in {sysconfig.get_path('scripts')}")

    def holder(self):
        """Pid of the running command (its lock holder), ``None`` if none;
        :exc:`OSError` if it cannot be told."""
        return lock_holder(self.lock_file)

    def originals(self, holder=None):
        """The copies of the program of another installation that run."""
        return original_processes(self.program, exclude=[holder] if holder else [])

    def original_script(self):
        """The original package's script that stops the command."""
        return 'desi_transfer_init.sh' if self.name == 'daemon' else 'desi_nightwatch_init.sh'


def _say(message):
    print(message, flush=True)


def _describe(pid):
    when = started(pid)
    return f"pid {pid:d}" + (f", since {when:%Y-%m-%d %H:%M:%S} UTC" if when else "")


def _original_lines(command, originals):
    """One line per copy of the program of another installation."""
    return [f"{command.host} another version of {command.program} is running: pid "
            f"{p.pid:d} ({p.user}): {p.command}" for p in originals]


def status(command):
    """Say whether the command runs; always 0, as the original script.

    Returns
    -------
    :class:`int`
        0; 1 only if it cannot be told.
    """
    try:
        pid = command.holder()
    except OSError as err:
        _say(f"{command.host} cannot tell whether {command.program} is running: its lock "
             f"{command.lock_file} cannot be examined ({err.strerror or err}).")
        return 1
    if pid is None:
        _say(f"{command.host} {command.program} is not running.")
    else:
        who = _describe(pid) if pid else 'pid unknown'
        _say(f"{command.host} {command.program} is running ({who}; lock {command.lock_file}).")
    for line in _original_lines(command, command.originals(pid)):
        _say(line)
    if os.path.exists(command.kill):
        _say(f"{command.kill} exists: {command.program} will not start "
             f"{'and stops within seconds' if pid else 'while it is there'}.")
    return 0


def _detach():
    """In the child, before the program runs: nice, and deaf to SIGHUP (as nohup)."""
    os.setpriority(os.PRIO_PROCESS, 0, max(NICENESS, os.getpriority(os.PRIO_PROCESS, 0)))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _refuse_by_itself(command):
    """Run the command once in the foreground, where it is known to refuse
    at once (a kill file, a copy of another installation): it says why by
    its own alert email, which reaches people even when cron throws this
    command's output away.  With ``--once`` it ends after one pass at most,
    should the reason vanish meanwhile."""
    try:
        argv = [command.script()] + command.arguments + ['--once']
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=REFUSAL_TIMEOUT)
    except (OSError, ConfigurationError, subprocess.TimeoutExpired) as err:
        _say(f"Could not let {command.program} report it by email: {err}.")


def start(command, wait=START_WAIT):
    """Start the command detached, unless the kill file exists or it (or
    another installation's copy) runs already.

    Returns
    -------
    :class:`int`
        0 if it was started, or not started because of the kill file (as the
        original script); 1 if it runs already or could not be started.
    """
    if os.path.exists(command.kill):
        _say(f"{command.kill} detected, will not attempt to start {command.program}.")
        if command.name == 'daemon':
            # The daemon emails once a day that a kill file keeps it from
            # working; a cron line whose output is thrown away would lose that.
            _refuse_by_itself(command)
        return 0
    try:
        pid = command.holder()
    except OSError as err:
        _say(f"{command.host} cannot tell whether {command.program} is running (lock "
             f"{command.lock_file}: {err.strerror or err}); not started.")
        return 1
    if pid is not None:
        _say(f"{command.host} {command.program} is already started "
             f"({_describe(pid) if pid else 'pid unknown'}).")
        return 1
    originals = command.originals()
    if originals:
        _say(f"{command.host} another version of {command.program} may already be running; "
             "not started.")
        for line in _original_lines(command, originals):
            _say(line)
        _say(f"Stop it first with the original's '{command.original_script()} stop' (or "
             f"touch {command.kill}, wait until it has exited, and remove {command.kill}); "
             "then start again.")
        # The command itself refuses too, with its CRITICAL alert by email.
        _refuse_by_itself(command)
        return 1
    try:
        argv = [command.script()] + command.arguments
        os.makedirs(os.path.dirname(command.stderr_file), exist_ok=True)
        with open_append(command.stderr_file, binary=True) as err:
            err.write(f"--- {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC "
                      f"desi_transfer_init starts: {shlex.join(argv)}\n".encode())
            err.flush()
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=err,
                                     start_new_session=True, preexec_fn=_detach)
    except (OSError, ConfigurationError) as err:
        _say(f"Failed to start {command.program}: {err}.")
        return 1
    shown = f"nice -n {NICENESS:d} {shlex.join(argv)}"
    deadline = time.monotonic() + wait
    while True:
        code = child.poll()
        try:
            holder = command.holder()
        except OSError:
            holder = None  # cannot be told yet: keep waiting, within the bound
        if holder == child.pid:
            _say(f"{command.program} started (pid {child.pid:d}): {shown}")
            _say(f"Its log: {command.log_file}; anything written to standard error: "
                 f"{command.stderr_file}.")
            return 0
        if code is not None:
            if holder:
                _say(f"{command.host} {command.program} is already started "
                     f"({_describe(holder)}).")
            elif code == 0:
                # Its whole job done at once (--once, or the kill file appeared).
                _say(f"{command.program} (pid {child.pid:d}) ran and exited with status 0 "
                     f"during start-up; see {command.log_file}.")
                return 0
            else:
                _say(f"Failed to start {command.program}: it exited with status {code:d} "
                     f"during start-up; see {command.log_file} and {command.stderr_file}.")
            return 1
        if time.monotonic() > deadline:
            _say(f"{command.program} started (pid {child.pid:d}) but has not taken its lock "
                 f"{command.lock_file} within {wait:g} s (test mode takes none): {shown}")
            return 0
        time.sleep(0.05)


def stop(command, wait=STOP_WAIT):
    """Stop the running command: SIGTERM, then, after `wait` seconds, SIGKILL
    to the process group it leads and the processes it started.

    Returns
    -------
    :class:`int`
        0 if it stopped, 1 if it was not running or could not be stopped.
    """
    try:
        pid = command.holder()
    except OSError as err:
        _say(f"{command.host} cannot tell whether {command.program} is running (lock "
             f"{command.lock_file}: {err.strerror or err}); nothing stopped.")
        return 1
    if not pid:
        _say(f"{command.host} {command.program} is not running." if pid is None else
             f"{command.host} {command.program} holds its lock {command.lock_file} but its "
             "pid is unknown (the lock is on a file system that does not tell); stop it "
             f"with touch {command.kill}.")
        for line in _original_lines(command, command.originals(pid)):
            _say(f"{line} (not stopped by this command: use the original's "
                 f"'{command.original_script()} stop')")
        return 1
    _say(f"Stopping {command.program} ({_describe(pid)}) with SIGTERM...")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError:
        _say(f"{command.host} cannot stop {command.program} (pid {pid:d}, user "
             f"{user_of(pid)}): operation not permitted.")
        return 1
    if _gone([pid], wait):
        _say(f"{command.program} stopped.")
        return 0
    try:
        group = os.getpgid(pid)
    except ProcessLookupError:
        group = 0  # it exited just now
    victims = descendants(pid)
    if group == pid:
        # Started by this command with its own session: the group is the command's.
        victims = sorted(set(victims) | {p for p in _members(group)})
        _kill(lambda: os.killpg(group, signal.SIGKILL))
        how = f"killed (SIGKILL) its process group {group:d}"
    else:
        _kill(lambda: os.kill(pid, signal.SIGKILL))
        how = (f"killed (SIGKILL) pid {pid:d} alone (its process group {group:d} is not its "
               "own and is left alone)")
    for p in victims:
        _kill(lambda p=p: os.kill(p, signal.SIGKILL))
    others = [p for p in victims if p != pid]
    _say(f"{command.program} did not stop within {wait:g} s of SIGTERM; {how}"
         + (f" and the processes it started ({', '.join(map(str, others))})." if others else "."))
    if _gone([pid] + victims, KILL_WAIT):
        _say(f"{command.program} stopped.")
        return 0
    _say(f"{command.host} could not stop {command.program} (pid {pid:d}).")
    return 1


def _members(group):
    found = []
    for name in os.listdir('/proc'):
        fields = stat_fields(int(name)) if name.isdigit() else []
        if len(fields) > 2 and fields[2] == str(group):
            found.append(int(name))
    return found


def _kill(how):
    try:
        how()
    except (ProcessLookupError, PermissionError):
        pass


def _gone(pids, wait):
    """Wait up to `wait` seconds for every process of `pids` to end; ``True`` if they did."""
    deadline = time.monotonic() + wait
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def restart(command, wait=STOP_WAIT):
    """Stop the command if it runs, then start it; the exit status of the start."""
    try:
        running = command.holder() is not None
    except OSError:
        running = True  # let stop say why it cannot tell
    if running and stop(command, wait) != 0:
        _say(f"{command.program} not started again: it could not be stopped.")
        return 1
    return start(command)


def _seconds(value):
    seconds = float(value)
    if not 0 < seconds < 86400:
        raise ValueError(value)
    return seconds


def _options(args=None):
    """Parse command-line options for :command:`desi_transfer_init`.

    Parameters
    ----------
    args : :class:`list`, optional
        Command-line arguments; ``sys.argv[1:]`` if not set.  Those after
        ``--`` are options of the command started.

    Returns
    -------
    :class:`argparse.Namespace`
        The parsed command-line options; ``extra`` holds the command's options.
    """
    args = list(sys.argv[1:] if args is None else args)
    extra = []
    if '--' in args:
        at = args.index('--')
        args, extra = args[:at], args[at + 1:]
    desc = ("Start, stop, restart desi_transfer_daemon or desi_nightwatch_transfer "
            "(detached, nice 19), or say whether it runs.")
    prsr = ArgumentParser(prog=os.path.basename(sys.argv[0]), description=desc,
                          epilog="Options after -- are given to the command, after those "
                                 "chosen by NERSC_HOST (away from NERSC: daemon --no-backup; "
                                 "nightwatch --debug --no-permission; at NERSC: nightwatch "
                                 "--debug).")
    prsr.add_argument('action', choices=('start', 'stop', 'status', 'restart'),
                      help="What to do.")
    prsr.add_argument('command', nargs='?', choices=tuple(PROGRAMS), default='daemon',
                      help="The command (default %(default)s).")
    prsr.add_argument('-w', '--wait', metavar='SECONDS', type=_seconds, default=STOP_WAIT,
                      help="Wait SECONDS for the command to exit after SIGTERM before "
                           "killing it (default %(default)g).")
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    options = prsr.parse_args(args)
    options.extra = extra
    return options


def main():
    """Entry point for :command:`desi_transfer_init`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`: for ``start``,
        ``stop`` and ``restart`` 0 or 1 as the original script; ``status`` 0;
        2 for bad usage.
    """
    options = _options()
    try:
        command = Command(options.command, options.extra)
    except ConfigurationError as err:
        print(f"{os.path.basename(sys.argv[0])}: cannot {options.action} "
              f"{PROGRAMS[options.command]}: {err}", file=sys.stderr)
        return 1
    if options.action == 'status':
        return status(command)
    if options.action == 'start':
        return start(command)
    if options.action == 'stop':
        return stop(command, options.wait)
    return restart(command, options.wait)
