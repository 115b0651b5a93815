# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=====================
desitransfer.executor
=====================

Everything :command:`desi_transfer_daemon`, :command:`desi_daily_transfer`,
:command:`desi_tucson_transfer`, :command:`desi_utah_transfer` and the
restore change goes through one
:class:`Actions` object: copying, locking, installing, recording, saving
its state, archiving, emailing a report, taking the single-instance lock,
writing a log or the completion file.  Test mode is :class:`DryRun`, the same
interface logging ``Test mode, would ...`` for each change instead of making
it, so the flow itself has no test-mode branches (:func:`for_mode` chooses).
Questions that only read (the listing at the mountain, a dry-run rsync,
``hsi ls``) go through :meth:`Actions.ask` and run in both, except in the
test mode of the mirrors, which runs no command at all.
"""
import errno
import os
import shutil
import smtplib
import socket
import stat
import tempfile
from email.message import EmailMessage

from .checksum import verify_checksum
from .common import dir_perm, file_perm, log
from .files import open_append, sweep_temporary, write_text
from .processes import exclusively, single_instance
from .runner import run


def listdir(directory):
    """Sorted names in `directory`; none if it cannot be read."""
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def _add_user_write(directory):
    """Add user write to `directory`, its subdirectories and files, never
    following a symbolic link."""
    for root, dirnames, filenames in os.walk(directory):
        for path in [root] + [os.path.join(root, f) for f in filenames]:
            if not os.path.islink(path):
                os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | stat.S_IWUSR)


def _lock_one(path):
    """Set the locked mode of one directory or regular file, only if it differs
    (a chmod changes the ctime); leave anything else (links, fifos) alone."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        mode = dir_perm
    elif stat.S_ISREG(st.st_mode):
        mode = file_perm
    else:
        return
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def lock_tree(directory):
    """Lock everything in `directory` that can be locked: directories
    ``0o2750``, regular files ``0o440``; a symbolic link is never followed.

    Returns
    -------
    :class:`list`
        The :exc:`OSError` of each path that could not be listed or locked
        (the others are locked); empty if every mode is now set.
    """
    failed = []
    for dirpath, dirnames, filenames in os.walk(directory, onerror=failed.append):
        for path in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            try:
                _lock_one(path)
            except OSError as err:
                failed.append(err)
    return failed


def lock_directory(directory, test=False):
    """Set a directory and its contents read-only.

    Directories become ``0o2750``, files ``0o440``; symbolic links are
    never followed.

    Parameters
    ----------
    directory : :class:`str`
        Directory to lock.
    test : :class:`bool`, optional
        If ``True``, only print the commands.

    Raises
    ------
    OSError
        The first path that could not be locked, once every other one is.
    """
    if test:
        log.info("Test mode, would lock %s (directories %#o, files %#o).",
                 directory, dir_perm, file_perm)
    elif os.path.isdir(directory) and not os.path.islink(directory):
        failed = lock_tree(directory)
        if failed:
            raise failed[0]


def unlock_directory(directory, test=False):
    """Set a directory and its contents user-writeable.

    Parameters
    ----------
    directory : :class:`str`
        Directory to unlock.
    test : :class:`bool`, optional
        If ``True``, only print the commands.
    """
    if test:
        log.info("Test mode, would add user write permission in %s.", directory)
    elif os.path.isdir(directory) and not os.path.islink(directory):
        _add_user_write(directory)


#: Seconds before the SMTP server is given up.
SMTP_TIMEOUT = 30


def send_email(mailhost, recipients, subject, body, program='desi_transfer_daemon'):
    """Send a plain-text email through `mailhost` (``host:port``).

    Raises
    ------
    OSError
        If the server cannot be reached or refuses it (:exc:`smtplib.SMTPException`
        is an :exc:`OSError`).
    """
    host, _, port = mailhost.rpartition(':')
    if not host:
        host, port = port, '25'
    message = EmailMessage()
    message['From'] = f"{os.environ.get('USER', 'desi')}@{socket.getfqdn()}"
    message['To'] = ', '.join(recipients)
    message['Subject'] = subject
    message['X-Mailer'] = program
    message.set_content(body)
    with smtplib.SMTP(host, int(port), timeout=SMTP_TIMEOUT) as smtp:
        smtp.send_message(message)


class Actions(object):
    """Make the changes of the daemon.

    Parameters
    ----------
    stop : :class:`desitransfer.processes.Stop`
        Every command is interrupted when this is set.
    """

    #: ``True`` for :class:`DryRun`.
    test = False

    def __init__(self, stop):
        self.stop = stop

    def start(self):
        """Say, at the start of a run, whether it changes anything (it does)."""

    def ask(self, command, **kwargs):
        """Run a command that only reads; in test mode too."""
        return run(command, stop=self.stop, **kwargs)

    def run(self, command, stop=None, **kwargs):
        """Run a command that changes something; `stop` (by default the
        daemon's) interrupts it."""
        return run(command, stop=self.stop if stop is None else stop, **kwargs)

    def copied(self, directory):
        """``True`` if a copy arrived as `directory`."""
        return os.path.isdir(directory) and not os.path.islink(directory)

    def makedirs(self, directory, mode=None):
        """Create `directory` (and its parents); give a new `directory` `mode`."""
        if os.path.isdir(directory):
            return
        # exist_ok: the mirrors create nested copies from several threads.
        os.makedirs(directory, exist_ok=True)
        if mode is not None:
            os.chmod(directory, mode)

    def lock(self, directory):
        lock_directory(directory)

    def unlock(self, directory):
        unlock_directory(directory)

    def lock_tree(self, directory):
        """Lock what can be locked in `directory`; the failures, see :func:`lock_tree`."""
        return lock_tree(directory)

    def single_instance(self, path):
        """The kernel lock `path` and its holder, see
        :func:`desitransfer.processes.single_instance`."""
        return single_instance(path)

    def remove_file(self, path):
        """Remove the file `path` if it exists."""
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    def open_append(self, path, binary=False, rotate=None):
        """`path` open for appending (a log), see :func:`desitransfer.files.open_append`;
        first renamed ``path.1`` if it holds more than `rotate` bytes."""
        if rotate is not None and os.path.exists(path) and os.path.getsize(path) > rotate:
            os.replace(path, path + '.1')
        return open_append(path, binary=binary)

    def wait(self, what, until):
        """Wait until `what`: call `until`, which waits and says if it happened."""
        return until()

    def query(self, what, ask):
        """What the question `ask` (a callable that only reads, such as a
        download) answers; `what` it is, as said by a test mode that asks nothing."""
        return ask()

    def scratch(self, prefix):
        """A new private directory (mode 0700) for this run's own files."""
        return tempfile.mkdtemp(prefix=prefix)

    def write_file(self, path, text):
        """Write `text` to `path` whole (:func:`desitransfer.files.write_text`);
        ``True`` once written."""
        write_text(path, text)
        return True

    def writable(self, directory, on=True):
        """Add (`on`) or remove user write permission of `directory` alone."""
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        new = mode | stat.S_IWUSR if on else mode & ~stat.S_IWUSR
        if new != mode:
            os.chmod(directory, new)

    def remove_user_write(self, directory):
        """Remove user write permission from `directory` and every directory in it."""
        for root, _, _ in os.walk(directory):
            self.writable(root, on=False)

    def verify(self, checksum_file):
        """Errors found verifying `checksum_file` (``''`` if none), see
        :func:`desitransfer.checksum.verify_checksum`."""
        return verify_checksum(checksum_file)

    def install(self, staging, destination):
        """Move a verified copy from `staging` to `destination`.

        An exposure already at `destination` is replaced: it is moved aside,
        the new copy renamed in, and the old one removed, so `destination`
        never holds a mixture.  On another file system the copy is made
        beside `destination` and renamed in.
        """
        night = os.path.dirname(destination)
        self.makedirs(night, dir_perm)
        archived = not os.stat(night).st_mode & stat.S_IWUSR
        if archived:
            self.writable(night)
        old = None
        if os.path.lexists(destination):
            old = os.path.join(night, f'.{os.path.basename(destination)}.replaced')
            self.remove_tree(old)
            os.rename(destination, old)
        self.move_in(staging, destination)
        if old is not None:
            self.remove_tree(old)
        if archived:
            self.writable(night, on=False)

    def move_in(self, source, destination):
        """Rename the directory `source` to `destination` (which must not
        exist); on another file system, copy it beside `destination`, rename
        the copy in and remove `source`, so `destination` is never partial."""
        try:
            os.rename(source, destination)
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
            partial = os.path.join(os.path.dirname(destination),
                                   f'.{os.path.basename(destination)}.partial')
            self.remove_tree(partial)
            shutil.copytree(source, partial, symlinks=True)
            os.rename(partial, destination)
            self.remove_tree(source)

    def remove_tree(self, path):
        """Remove `path` and everything in it, locked or not."""
        if not os.path.lexists(path):
            return
        if os.path.isdir(path) and not os.path.islink(path):
            # Only directories need user write to be emptied; files may be
            # hard links shared with an installed copy, whose mode must stay.
            for root, _, _ in os.walk(path):
                self.writable(root)
            shutil.rmtree(path)
        else:
            os.remove(path)

    def record(self, status, records):
        """Record ``(night, expid, stage, failure, ms)`` tuples in `status`."""
        if records:
            status.update_many([tuple(r[:4]) + tuple(t for t in r[4:5] if t is not None)
                                for r in records])

    def save(self, state):
        """Write the state file."""
        state.save()

    def exclusively(self, program, lock_file, work):
        """Run `work` as the one running copy of `program`, see
        :func:`desitransfer.processes.exclusively`."""
        return exclusively(program, lock_file, work)

    def sweep_temporary(self, directory):
        """Remove the temporary files of killed writers in `directory`, see
        :func:`desitransfer.files.sweep_temporary`."""
        sweep_temporary(directory)

    def status(self, directory, open_store):
        """The status store in `directory`, opened by `open_store` (which
        creates it if it is missing)."""
        return open_store()

    def logging(self, filename, recipients):
        """The log file and the recipients of alert emails of a run, as
        configured."""
        return filename, recipients

    def email(self, mailhost, recipients, subject, body, what='an email'):
        """Email `body` (see :func:`send_email`), `what` it is, as said in test
        mode; ``True`` if sent, :exc:`OSError` if it fails."""
        send_email(mailhost, recipients, subject, body)
        return True


def for_mode(test, stop, ask=True):
    """The :class:`DryRun` (if `test`, asking questions if `ask`) or the
    :class:`Actions` of a run stopped by `stop`."""
    return DryRun(stop, ask=ask) if test else Actions(stop)


class DryRun(Actions):
    """Test mode: log each change instead of making it.

    Parameters
    ----------
    stop : :class:`desitransfer.processes.Stop`
        Every command is interrupted when this is set.
    ask : :class:`bool`, optional
        If ``False``, questions are not asked either: :meth:`ask` logs the
        command and answers ``None`` (the test mode of the mirrors runs no command).
    """

    test = True

    def __init__(self, stop, ask=True):
        super().__init__(stop)
        self.asks = ask

    def ask(self, command, **kwargs):
        if self.asks:
            return super().ask(command, **kwargs)
        run(command, test=True)
        return None

    def start(self):
        log.info("Test mode: commands are logged, not run; nothing is changed.")

    def run(self, command, stop=None, **kwargs):
        return run(command, test=True, **kwargs)

    def copied(self, directory):
        return True

    def makedirs(self, directory, mode=None):
        if not os.path.isdir(directory):
            log.info("Test mode, would create %s%s.", directory,
                     '' if mode is None else f' with mode {mode:#o}')

    def lock(self, directory):
        lock_directory(directory, test=True)

    def unlock(self, directory):
        unlock_directory(directory, test=True)

    def lock_tree(self, directory):
        lock_directory(directory, test=True)
        return []

    def single_instance(self, path):
        log.info("Test mode, would take the lock %s.", path)
        # Held by nobody: a file like the lock, to close.
        return open(os.devnull), None

    def remove_file(self, path):
        if os.path.lexists(path):
            log.info("Test mode, would remove %s.", path)

    def open_append(self, path, binary=False, rotate=None):
        return open(os.devnull, 'ab' if binary else 'a')

    def wait(self, what, until):
        log.info("Test mode, would wait until %s.", what)
        return True

    def query(self, what, ask):
        if self.asks:
            return ask()
        log.info("Test mode, would %s.", what)
        return None

    def scratch(self, prefix):
        path = os.path.join(tempfile.gettempdir(), f'{prefix}test')
        log.info("Test mode, would create the private directory %s.", path)
        return path

    def write_file(self, path, text):
        log.info("Test mode, would write %s:\n%s", path, text.rstrip('\n'))
        return False

    def writable(self, directory, on=True):
        log.info("Test mode, would %s user write permission of %s.",
                 'add' if on else 'remove', directory)

    def remove_user_write(self, directory):
        log.info("Test mode, would remove user write permission in %s.", directory)

    def verify(self, checksum_file):
        log.info("Test mode, would verify %s.", checksum_file)
        return None

    def install(self, staging, destination):
        log.info("Test mode, would move %s to %s.", staging, destination)

    def remove_tree(self, path):
        if os.path.lexists(path):
            log.info("Test mode, would remove %s.", path)

    def record(self, status, records):
        for night, expid, stage, failure, *_ in records:
            log.info("Test mode, would record %s %s of %s/%s.", stage,
                     'failure' if failure else 'success', night, expid)

    def save(self, state):
        log.debug("Test mode, would write %s.", state.path)

    def exclusively(self, program, lock_file, work):
        """Test mode runs beside anything: no lock, no look for another
        installation."""
        log.info("Test mode, would take the lock %s.", lock_file)
        return work()

    def sweep_temporary(self, directory):
        """Nothing is removed in test mode (not even said: most runs find nothing)."""

    def status(self, directory, open_store):
        """``None`` if the status store does not exist yet: test mode
        creates nothing."""
        return open_store() if os.path.isdir(directory) else None

    def logging(self, filename, recipients):
        """No log file, no alert email in test mode: the log goes to the
        terminal."""
        return None, []

    def email(self, mailhost, recipients, subject, body, what='an email'):
        log.info("Test mode, would email %s to %s: %s", what, ', '.join(recipients), subject)
        return False
