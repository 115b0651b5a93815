# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=====================
desitransfer.checksum
=====================

Verify the ``checksum-EXPID.sha256sum`` file of a raw exposure: every file
it lists is present with the right sha256 digest, and nothing else is in the
exposure directory (the directory holding the checksum file).

The checksum file is never trusted: a name that is absolute, has a ``..``
component or resolves (through symbolic links) outside the exposure directory
is reported and never opened; only regular files are read, and opening one
never blocks.  Files are hashed in a few threads, in chunks of
:data:`CHUNK_SIZE` bytes, so that memory use does not depend on their size.

Nor does it depend on what the checksum file or the directory hold: the
checksum file is read only if it has at most :data:`MAX_CHECKSUM_FILE_SIZE`
bytes and :data:`MAX_CHECKSUM_LINES` lines, problems are counted and only the
first :data:`MAX_PROBLEMS_SHOWN` are described, and a name is quoted in a
message with at most :data:`MAX_NAME_SHOWN` characters.

The rules are described in full in the "Checksum verification" page of the
documentation.
"""
import bisect
import hashlib
import os
import posixpath
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor

from .common import log


#: Bytes read at a time by each hashing thread.
CHUNK_SIZE = 1 << 20

#: Largest checksum file accepted, in bytes (a real one lists a few dozen
#: files in a few kB).
MAX_CHECKSUM_FILE_SIZE = 1 << 20

#: Most lines in a checksum file accepted.
MAX_CHECKSUM_LINES = 10000

#: Problems described one by one; the others are only counted.
MAX_PROBLEMS_SHOWN = 10

#: Characters of a name (or a line) quoted in a message at most.
MAX_NAME_SHOWN = 200

#: Most files hashed at the same time (also limited by the number of CPUs).
MAX_WORKERS = 4

#: Exposures with at most this many bytes in all are hashed in the calling thread.
SMALL_EXPOSURE = 8 << 20

#: One line of a checksum file: optional escape mark, digest, mode, name.
_checksum_line = re.compile(r'(\\?)(\S+) ([ *])(.+)', re.DOTALL)

#: Escape sequences of ``sha256sum`` in names that follow a leading backslash.
_escapes = {'\\': '\\', 'n': '\n', 'r': '\r'}


class _NotRegularFile(OSError):
    """Raised when a file opened to be read turns out not to be a regular file.
    """


class _Problems(list):
    """Problems found: every one counted, the first `limit` kept (a list of
    messages), in the order of the keys they were added with.

    Memory does not depend on how many problems there are: a hostile checksum
    file or directory yields a short message whatever it holds.

    Attributes
    ----------
    total : :class:`int`
        Problems added, kept or not.
    """

    def __init__(self, limit=MAX_PROBLEMS_SHOWN):
        super().__init__()
        self.limit = limit
        self.total = 0
        self._keys = []

    def add(self, key, message):
        """Count the problem `message`; keep it if it is among the first `limit`
        in the order of `key`."""
        self.total += 1
        i = bisect.bisect_right(self._keys, key)
        if i < self.limit:
            self._keys.insert(i, key)
            self.insert(i, message)
            if len(self) > self.limit:
                del self._keys[-1], self[-1]

    def merge(self, other):
        """Add the problems of `other`, a :class:`_Problems` (kept and counted)."""
        for key, message in zip(other._keys, other):
            self.add(key, message)
        self.total += other.total - len(other)

    def text(self):
        """Every kept problem, one per line, after a line counting them all if
        some are not kept."""
        head = ([f"{self.total:d} problems (the first {len(self):d} follow)"]
                if self.total > len(self) else [])
        return '\n'.join(head + list(self))


def verify_checksum(checksum_file):
    """Verify checksums supplied with the raw data.

    Parameters
    ----------
    checksum_file : :class:`str`
        The checksum file.

    Returns
    -------
    :class:`str`
        A string that describes the errors encountered while verifying the
        checksum.  In addition to mismatches, there can be missing files,
        extraneous files, etc.  An empty string indicates no errors.
        Otherwise there is one problem per line, each naming the file or the
        line of the checksum file concerned; if there are more than
        :data:`MAX_PROBLEMS_SHOWN`, a first line counts them, and only the
        first :data:`MAX_PROBLEMS_SHOWN` follow.
    """
    checksum_file = os.fspath(checksum_file)
    label = os.path.basename(checksum_file)
    try:
        data = read_checksum_file(checksum_file)
    except OSError as err:
        return f"Could not read checksum file {checksum_file}: {_reason(err)}."
    if not data.strip():
        return f"Checksum file {checksum_file} is empty."
    digests, unverified, problems = parse_checksums(data, label)
    del data
    directory = os.path.realpath(os.path.dirname(os.path.abspath(checksum_file)))
    t0 = time.monotonic()
    problems.merge(_verify_files(directory, {n: d for n, d in digests.items()
                                             if n not in unverified}))
    problems.merge(_extra_entries(directory, set(digests) | unverified | {label}))
    log.debug("Checked the %d names listed in %s in %.1f s: %d problem(s).",
              len(digests), checksum_file, time.monotonic() - t0, problems.total)
    return problems.text()


def _reason(err):
    """The explanation of an :exc:`OSError`, without the file name.
    """
    return err.strerror or str(err)


def _show(name):
    """`name` as written in messages: quoted, Python style, if it holds odd
    characters (so that it is always one line), and cut after
    :data:`MAX_NAME_SHOWN` characters.
    """
    if len(name) > MAX_NAME_SHOWN:
        return f"{name[:MAX_NAME_SHOWN]!r}... ({len(name):d} characters)"
    return name if name.isprintable() and name.strip() == name else repr(name)


def _open_nonblocking(path):
    """Open `path` for reading without blocking, and check it is a regular file.

    A FIFO opened without ``O_NONBLOCK`` would wait for a writer forever.

    Parameters
    ----------
    path : :class:`str`
        The file, not a symbolic link.

    Returns
    -------
    :class:`io.FileIO`
        The open, unbuffered file.

    Raises
    ------
    OSError
        If the file cannot be opened or is not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _NotRegularFile(0, f"not a regular file but {_kind(mode)}")
        return open(fd, 'rb', buffering=0)
    except BaseException:
        os.close(fd)
        raise


def read_checksum_file(checksum_file):
    """Contents of `checksum_file`, refusing anything that is not a small regular
    file of at most :data:`MAX_CHECKSUM_LINES` lines.
    """
    real = os.path.realpath(checksum_file)
    with _open_nonblocking(real) as f:
        data = f.read(MAX_CHECKSUM_FILE_SIZE + 1)
    if len(data) > MAX_CHECKSUM_FILE_SIZE:
        raise OSError(0, f"larger than {MAX_CHECKSUM_FILE_SIZE:d} bytes")
    if data.count(b'\n') + (not data.endswith(b'\n')) > MAX_CHECKSUM_LINES:
        raise OSError(0, f"more than {MAX_CHECKSUM_LINES:d} lines")
    return data


def parse_checksums(data, label):
    """Parse the contents of a checksum file.

    Parameters
    ----------
    data : :class:`bytes`
        Contents of the checksum file.
    label : :class:`str`
        Name of the checksum file, for messages.

    Returns
    -------
    :class:`tuple`
        A :class:`dict` mapping each normalized name to its digest; the
        :class:`set` of names that cannot be verified (invalid or conflicting
        digests), but are listed all the same; and the problems, one message
        per bad line (a :class:`list` of the first :data:`MAX_PROBLEMS_SHOWN`,
        in line order, whose ``total`` attribute counts them all).
    """
    digests, lines, unverified, problems = {}, {}, set(), _Problems()
    for number, raw in enumerate(data.split(b'\n'), start=1):
        if raw.endswith(b'\r'):
            raw = raw[:-1]
        if not raw.strip():
            continue
        where, key = f"Line {number:d} of {_show(label)}", (0, number)
        try:
            digest, name = _split_line(os.fsdecode(raw))
        except ValueError as err:
            problems.add(key, f"{where}: {err}.")
            continue
        problem = _digest_problem(digest)
        if problem:
            unverified.add(name)
            problems.add(key, f"{where}: invalid digest for {_show(name)}, {problem}; "
                         "not verified.")
            continue
        digest = digest.lower()
        if name in digests and digests[name] != digest:
            unverified.add(name)
            problems.add(key, f"{where}: {_show(name)} is listed again with a different "
                         f"digest (first on line {lines[name]:d}); not verified.")
        elif name not in digests:
            digests[name], lines[name] = digest, number
    return digests, unverified, problems


def _split_line(line):
    """Digest and normalized name of one line of a checksum file.

    Parameters
    ----------
    line : :class:`str`
        ``DIGEST  NAME`` (text mode) or ``DIGEST *NAME`` (binary mode), without
        the end of line; a leading backslash means `NAME` has ``\\\\``,
        ``\\n`` or ``\\r`` escapes, as written by :command:`sha256sum`.

    Returns
    -------
    :class:`tuple`
        The digest, as written, and the name.

    Raises
    ------
    ValueError
        If the line is malformed or the name unsafe.
    """
    m = _checksum_line.fullmatch(line)
    if m is None:
        raise ValueError(f"malformed line {line[:100]!r}, expected 'DIGEST  NAME' "
                         "or 'DIGEST *NAME'")
    escaped, digest, _, name = m.groups()
    if escaped:
        name = _unescape(name)
    return digest, _safe_name(name)


def _digest_problem(digest):
    """What is wrong with `digest`, or an empty string if it is a sha256 digest.
    """
    if re.fullmatch(r'[0-9a-fA-F]*', digest) is None:
        return f"{digest[:100]!r} is not hexadecimal"
    if len(digest) != 64:
        return f"{len(digest):d} hexadecimal digits instead of 64"
    return ''


def _unescape(name):
    """Undo the escapes of :command:`sha256sum` in `name`.
    """
    if re.fullmatch(r'(?:[^\\]|\\[\\nr])*', name, re.DOTALL) is None:
        raise ValueError(f"invalid escape sequence in name {_show(name)}")
    return re.sub(r'\\(.)', lambda m: _escapes[m.group(1)], name)


def _safe_name(name):
    """Normalize `name`, refusing any name that could leave the exposure directory.

    Names in subdirectories (``sub/file``) are accepted; symbolic links are
    checked later, when the directory is known.

    Raises
    ------
    ValueError
        If `name` is absolute, has a ``..`` component, a NUL character,
        or names the exposure directory itself.
    """
    if '\0' in name:
        raise ValueError(f"name {_show(name)} contains a NUL character; not read")
    if name.startswith('/'):
        raise ValueError(f"{_show(name)} is an absolute path; not read")
    if '..' in name.split('/'):
        raise ValueError(f"{_show(name)} has a '..' component and could leave the "
                         "exposure directory; not read")
    normalized = posixpath.normpath(name)
    if normalized == '.':
        raise ValueError(f"{_show(name)} names the exposure directory itself; not read")
    return normalized


def _kind(mode):
    """What kind of file `mode` (from :func:`os.stat`) describes, for messages.
    """
    kinds = ((stat.S_ISREG, 'a file'), (stat.S_ISDIR, 'a directory'),
             (stat.S_ISLNK, 'a symbolic link'), (stat.S_ISFIFO, 'a FIFO'),
             (stat.S_ISSOCK, 'a socket'), (stat.S_ISCHR, 'a character device'),
             (stat.S_ISBLK, 'a block device'))
    return next((kind for test, kind in kinds if test(mode)), 'a special file')


def _verify_files(directory, digests):
    """Check that every listed file is a regular file with the right digest.

    Parameters
    ----------
    directory : :class:`str`
        The exposure directory, symbolic links resolved.
    digests : :class:`dict`
        Names relative to `directory` mapped to their expected digest.

    Returns
    -------
    :class:`_Problems`
        Problems found, one message each, in the order of the names.
    """
    problems, jobs = _Problems(), []
    for name in sorted(digests):
        path, size, problem = _locate(directory, name)
        if problem:
            problems.add((1, name), problem)
        else:
            jobs.append((size, name, path))
    # Largest files first keeps every thread busy until the end.
    jobs.sort(key=lambda job: job[0], reverse=True)
    work = [(name, path, digests[name]) for _, name, path in jobs]
    if sum(size for size, _, _ in jobs) <= SMALL_EXPOSURE:
        # Starting threads costs more than hashing a few small files.
        results = map(_compare, work)
    else:
        with ThreadPoolExecutor(_workers(len(jobs))) as pool:
            results = list(pool.map(_compare, work))
    for (name, _, _), problem in zip(work, results):
        if problem:
            problems.add((1, name), problem)
    return problems


def _locate(directory, name):
    """Find the listed file `name` in `directory`, without reading it.

    Returns
    -------
    :class:`tuple`
        The resolved path, the size and ``None``; or ``None``, ``None`` and
        the problem if the file is missing, outside `directory` or not a
        regular file.
    """
    path = os.path.realpath(os.path.join(directory, name))
    if os.path.commonpath([directory, path]) != directory:
        return None, None, (f"{_show(name)}: resolves to {_show(path)}, outside the "
                            "exposure directory; not read.")
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None, None, f"{_show(name)}: missing (listed in the checksum file)."
    except OSError as err:
        return None, None, f"{_show(name)}: could not be examined: {_reason(err)}."
    if not stat.S_ISREG(st.st_mode):
        return None, None, (f"{_show(name)}: not a regular file but "
                            f"{_kind(st.st_mode)}; not read.")
    return path, st.st_size, None


def _workers(jobs):
    """Number of hashing threads for `jobs` files.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(jobs, cpus, MAX_WORKERS))


def _compare(job):
    """Hash one file and compare its digest to the expected one.

    Parameters
    ----------
    job : :class:`tuple`
        Name (for messages), resolved path and expected digest.

    Returns
    -------
    :class:`str`
        The problem, or an empty string if the digest is right.
    """
    name, path, expected = job
    try:
        digest = sha256_file(path)
    except OSError as err:
        return f"{_show(name)}: could not be read: {_reason(err)}."
    if digest != expected:
        return f"{_show(name)}: checksum mismatch, expected {expected}, computed {digest}."
    return ''


def sha256_file(path, chunk_size=CHUNK_SIZE):
    """The sha256 digest of a regular file, read in chunks.

    :mod:`hashlib` releases the GIL while it hashes a large chunk, so several
    threads can run this at full speed.  One reusable buffer is read into,
    so memory use is `chunk_size` whatever the size of the file.

    Parameters
    ----------
    path : :class:`str`
        The file; opening it never blocks, even on a FIFO.
    chunk_size : :class:`int`, optional
        Bytes read at a time.

    Returns
    -------
    :class:`str`
        The hexadecimal digest, lower case.

    Raises
    ------
    OSError
        If the file cannot be read or is not a regular file.
    """
    digest = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with _open_nonblocking(path) as f:
        if hasattr(os, 'posix_fadvise'):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def _extra_entries(directory, listed):
    """Entries of `directory` that the checksum file does not account for.

    A subdirectory is looked into only if a listed name lies inside it;
    otherwise it is reported as one extra entry.  Symbolic links are never
    followed here: an unlisted link is an extra entry.

    Parameters
    ----------
    directory : :class:`str`
        The exposure directory.
    listed : :class:`set`
        Names relative to `directory`, including the checksum file itself.

    Returns
    -------
    :class:`_Problems`
        Problems found, one message each, in the order of the names.
    """
    parents = {posixpath.dirname(n) for n in listed}
    parents |= {p for n in parents for p in _ancestors(n)}
    problems = _Problems()
    pending = ['']
    while pending:
        prefix = pending.pop()
        try:
            # One entry at a time: a directory of millions of entries costs no memory.
            with os.scandir(os.path.join(directory, prefix)) as entries:
                for entry in entries:
                    name = prefix + entry.name
                    mode = entry.stat(follow_symlinks=False).st_mode
                    if stat.S_ISDIR(mode) and name in parents:
                        pending.append(name + '/')
                    elif name not in listed and name not in parents:
                        problems.add((2, name), f"{_show(name)}: extra entry ({_kind(mode)}), "
                                     "not listed in the checksum file.")
        except OSError as err:
            problems.add((2, prefix), f"{_show(prefix or '.')}: could not be listed: "
                         f"{_reason(err)}.")
    return problems


def _ancestors(name):
    """Every directory above `name` (``a/b/c`` gives ``a/b`` and ``a``).
    """
    while name:
        name = posixpath.dirname(name)
        if name:
            yield name
