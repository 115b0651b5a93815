# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=====================
desitransfer.executor
=====================

Everything :command:`desi_transfer_daemon` changes goes through one
:class:`Actions` object: copying, locking, installing, recording, saving
its state, archiving, emailing a report.  Test mode is :class:`DryRun`, the same interface
logging ``Test mode, would ...`` for each change instead of making it, so
the flow itself has no test-mode branches.  Questions that only read (the
listing at the mountain, a dry-run rsync, ``hsi ls``) go through
:meth:`Actions.ask` and run in both.
"""
import errno
import os
import shutil
import smtplib
import socket
import stat
from email.message import EmailMessage

from .checksum import verify_checksum
from .common import dir_perm, file_perm, log
from .runner import run


def listdir(directory):
    """Sorted names in `directory`; none if it cannot be read."""
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def _chmod_tree(directory, dirs, files_):
    """Set the mode of `directory`, its subdirectories and files, never
    following a symbolic link.  A mode is a number or a function of the old one.
    """
    def mode(path, value):
        return value(stat.S_IMODE(os.lstat(path).st_mode)) if callable(value) else value

    for root, dirnames, filenames in os.walk(directory):
        os.chmod(root, mode(root, dirs))
        for name in filenames:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode(path, files_))


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
    """
    if test:
        log.info("Test mode, would lock %s (directories %#o, files %#o).",
                 directory, dir_perm, file_perm)
    elif os.path.isdir(directory) and not os.path.islink(directory):
        _chmod_tree(directory, dir_perm, file_perm)


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
        _chmod_tree(directory, lambda m: m | stat.S_IWUSR, lambda m: m | stat.S_IWUSR)


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
        os.makedirs(directory)
        if mode is not None:
            os.chmod(directory, mode)

    def lock(self, directory):
        lock_directory(directory)

    def unlock(self, directory):
        unlock_directory(directory)

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

    def email(self, mailhost, recipients, subject, body, what='an email'):
        """Email `body` (see :func:`send_email`), `what` it is, as said in test
        mode; ``True`` if sent, :exc:`OSError` if it fails."""
        send_email(mailhost, recipients, subject, body)
        return True


class DryRun(Actions):
    """Test mode: log each change instead of making it."""

    test = True

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

    def email(self, mailhost, recipients, subject, body, what='an email'):
        log.info("Test mode, would email %s to %s: %s", what, ', '.join(recipients), subject)
        return False
