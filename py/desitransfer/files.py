# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
==================
desitransfer.files
==================

Writing files safely, in a directory that other users may write: new files
created without following a link and with an explicit mode, written
atomically (a temporary file renamed over the target), the sweep of
temporary files left by killed writers, log files opened to append, and the
listing of a tree without following links.
"""
import errno
import json
import os
import re
import secrets
import stat

from .common import FILE_MODE, log
from .processes import alive


def write_json(path, data):
    """Write `data` to `path` as JSON atomically: a temporary file beside it,
    flushed and synced to disk, then renamed over `path`.

    Parameters
    ----------
    path : :class:`str`
        The file to write.
    data : :class:`dict` or :class:`list`
        What to write.
    """
    write_text(path, json.dumps(data, indent=1, sort_keys=True))


def fsync_directory(directory):
    """Flush `directory` to disk, so that a rename in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path):
    """An unpredictable name for a temporary file beside `path`:
    ``.NAME.RANDOM.PID.tmp`` in the same directory, RANDOM being 16
    hexadecimal digits, which :func:`sweep_temporary` recognises once this
    process is gone.  Create the file with :func:`create_file`."""
    directory, name = os.path.split(path)
    # A long name keeps its first 200 characters, so that the result is not too long.
    return os.path.join(directory, f'.{name[:200]}.{secrets.token_hex(8)}.{os.getpid():d}.tmp')


def _legacy_temporary_name(path):
    """The name :func:`temporary_name` gave before it was unpredictable,
    ``.NAME.PID.tmp``, which this process never makes."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f'.{name}.{os.getpid():d}.tmp')


_temporary = re.compile(r'\.(?P<name>.+)\.(?P<pid>[0-9]{1,10})\.tmp')


def create_file(target, mode=FILE_MODE, beside=True):
    """Create a new file for `target`, safely in a directory that other users
    may write (a planted symbolic link or file is never followed nor reused).

    The file is opened with ``O_CREAT|O_EXCL|O_NOFOLLOW``: it is a new file,
    made by this call; its mode is set with :func:`os.fchmod`, whatever the
    umask (which is never changed).  The helper by which this package
    creates its files.

    Parameters
    ----------
    target : :class:`str`
        The file to be written.
    mode : :class:`int`, optional
        Permission bits of the new file.
    beside : :class:`bool`, optional
        If ``True`` (the default), the new file is a temporary file with an
        unpredictable name (:func:`temporary_name`) in the directory of
        `target`, to be renamed over `target` with :func:`os.replace` once
        written; if ``False``, it is `target` itself, which must not exist.

    Returns
    -------
    :class:`tuple`
        The new file, open for writing bytes, and its name.

    Raises
    ------
    OSError
        If it cannot be created (:exc:`FileExistsError` if the name exists,
        whatever it is); nothing is left behind.
    """
    name = temporary_name(target) if beside else target
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchmod(fd, mode)
        return os.fdopen(fd, 'wb'), name
    except BaseException:
        os.close(fd)
        discard(name)
        raise


def discard(path):
    """Remove the file `path` if it exists (a symbolic link itself, never
    what it points to)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def mode_of(path, default=FILE_MODE):
    """Permission bits of the regular file `path` (not following a link), to
    give its replacement; `default` if it is not such a file."""
    try:
        st = os.lstat(path)
    except OSError:
        return default
    return stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else default


def _mine(st):
    """``True`` if `st` is the status of a regular file of this user."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def remove_leftover(target):
    """Remove the temporary file of `target` that an earlier process with
    this process's id left under the predictable name of earlier versions,
    ``.NAME.PID.tmp`` (never made now), if it is a regular file of this user:
    never another user's file, never through a link.

    Returns
    -------
    :class:`bool`
        ``True`` if one was removed.
    """
    path = _legacy_temporary_name(target)
    try:
        if _mine(os.lstat(path)):
            os.unlink(path)
            return True
    except FileNotFoundError:
        pass
    return False


def sweep_temporary(directory):
    """Remove temporary files left in `directory` by writers that were killed.

    Only names made by :func:`temporary_name` (or by earlier versions,
    ``.NAME.PID.tmp``) are considered, and only those of processes that no
    longer exist (a live writer's file is left alone).  Only regular files of
    this user are removed: never a link, never another user's file.

    Parameters
    ----------
    directory : :class:`str`
        The directory to sweep; nothing happens if it does not exist.

    Returns
    -------
    :class:`list`
        The files removed.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return []
    removed = []
    try:
        for name in sorted(os.listdir(fd)):
            m = _temporary.fullmatch(name)
            if m is None:
                continue
            if alive(int(m.group('pid'))):
                continue
            path = os.path.join(directory, name)
            try:
                # Looked at and removed in the directory opened, never through a link.
                if _mine(os.lstat(name, dir_fd=fd)):
                    os.unlink(name, dir_fd=fd)
                    removed.append(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                log.warning("Could not remove stale temporary file %s: %s.", path, err)
    except OSError as err:
        log.warning("Could not sweep temporary files of %s: %s.", directory, err)
    finally:
        os.close(fd)
    if removed:
        log.info("Removed %d temporary file(s) left by killed writers in %s: %s.",
                 len(removed), directory, ', '.join(os.path.basename(r) for r in removed))
    return removed


def aside_name(path, suffix):
    """A name to keep `path` aside for analysis: ``path + suffix``, or
    ``path + suffix + '.N'`` with the first N that does not exist yet, so that
    an earlier copy is never replaced.
    """
    name, n = path + suffix, 0
    while os.path.lexists(name):
        n += 1
        name = f'{path}{suffix}.{n:d}'
    return name


def open_append(path, binary=False, mode=FILE_MODE, encoding=None, errors=None):
    """Open the log file `path` to append to it, without following a link.

    A new file is created with `mode` whatever the umask; an existing one
    must be a regular file (a link, a FIFO or a device planted in its place
    is refused with :exc:`OSError`).

    Parameters
    ----------
    path : :class:`str`
        The file.
    binary : :class:`bool`, optional
        Open it for bytes (for example for the ``output`` of :func:`~desitransfer.runner.run`).
    mode : :class:`int`, optional
        Mode of a new file.
    encoding, errors : :class:`str`, optional
        Of a text file, as for :func:`open`.

    Returns
    -------
    file
        The file object, open for appending.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, mode)
    except FileExistsError:
        fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file: refusing to write into it", path)
    if binary:
        return os.fdopen(fd, 'ab')
    return os.fdopen(fd, 'a', encoding=encoding, errors=errors)


def write_text(path, text, mode=None):
    """Write `text` to `path` atomically: a new temporary file beside it
    (:func:`create_file`), flushed and synced to disk, then renamed over
    `path`, so that a reader sees the old contents or the new, never a part.

    Safe in a directory that other users may write: nothing is written
    through a link planted there, and a link at `path` is replaced, not followed.

    Parameters
    ----------
    path : :class:`str`
        The file to write.
    text : :class:`str` or :class:`bytes`
        What to write (text in UTF-8).
    mode : :class:`int`, optional
        Permission bits of the new `path`; by default those of the file it
        replaces, or :data:`~desitransfer.common.FILE_MODE` for a new one (never from the umask).

    Raises
    ------
    OSError
        If it cannot be written (the temporary file is removed, `path` is unchanged).
    """
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    f, tmp = create_file(path, mode_of(path) if mode is None else mode)
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        discard(tmp)
        raise
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def lstat_tree(directory):
    """Everything under `directory`, never following a symbolic link.

    Parameters
    ----------
    directory : :class:`str`
        The top directory.

    Returns
    -------
    :class:`tuple`
        ``{relative name: os.stat_result}`` of every entry below `directory`
        (``sub/name`` in subdirectories, which are entries too), and the
        problems met (a directory that cannot be listed), one sentence each.
    """
    entries, problems = {}, []
    pending = ['']
    while pending:
        prefix = pending.pop()
        try:
            with os.scandir(os.path.join(directory, prefix)) as listing:
                for entry in listing:
                    st = entry.stat(follow_symlinks=False)
                    entries[prefix + entry.name] = st
                    if stat.S_ISDIR(st.st_mode):
                        pending.append(prefix + entry.name + '/')
        except OSError as err:
            problems.append(f"{os.path.join(directory, prefix).rstrip('/')} cannot be listed: "
                            f"{err.strerror or err}")
    return entries, problems
