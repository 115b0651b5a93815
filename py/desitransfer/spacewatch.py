# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=======================
desitransfer.spacewatch
=======================

Entry point for :command:`desi_spacewatch_transfer`.

Download Spacewatch data from a server at KPNO.

Notes
-----
* Spacewatch data rolls over at 00:00 UTC = 17:00 MST.
* The data relevant to the previous night, say 20231030, would be downloaded
  on the morning of 20231031.
* Therefore to obtain all data of interest, just download the files that
  have already appeared in 2023/10/31/ (Spacewatch directory structure)
  the morning after DESI night 20231030.

The server is not trusted: only links named ``YYYYMMDD_HHMMSS.jpg`` are
followed, every request has a connect and a read timeout, a size limit and a
total time limit (headers included), a redirect to another server is refused,
and an image is written to a temporary file that is renamed only once it is
complete.  Nor are other users who can write in the destination: no link
below it is followed, and temporary files have names nobody can guess.  The
command holds a lock on its destination, so that runs started by cron never
pile up.
"""
import datetime as dt
import errno
import fcntl
import os
import re
import secrets
import stat
import sys
from argparse import ArgumentParser, ArgumentTypeError
from codecs import lookup
from collections import namedtuple
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from . import __version__ as dtVersion
from . import common, web
from .alerts import configure_log
from .common import MST, log
from .files import sweep_temporary
from .processes import lock_holder

#: Path of the day directories on the Spacewatch server.
ROOT = 'allsky-all/images/cropped'

#: Seconds to wait for a connection, and for each read, of an HTTP request.
TIMEOUT = (10, 60)

#: Seconds one request may take in all: connection, headers, redirects and body.
DEADLINE = 300

#: Most bytes read of an index page.
INDEX_LIMIT = 8 * 2**20

#: Most bytes read of an image.
JPEG_LIMIT = 64 * 2**20

#: Most redirects followed, within the same server.
MAX_REDIRECTS = 5

#: Mode of a downloaded image, whatever the umask: read by all, written by its owner.
IMAGE_MODE = 0o644

#: Names tried for a temporary file before giving up.
_TEMPORARY_TRIES = 10

#: Errors writing a file that would repeat for every later file.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)

#: The only link the index may offer: an image named after its UTC time.
_jpg = re.compile(r'[0-9]{8}_[0-9]{6}\.jpg')

#: Markers of the start (SOI and the next marker) and end (EOI) of a JPEG.
_SOI, _EOI = b'\xff\xd8\xff', b'\xff\xd9'

#: Bytes at the end of an image searched for the end marker (some writers pad).
_TAIL = 512

#: What became of the images of a day: downloaded, already here, failed.
Downloads = namedtuple('Downloads', ['downloaded', 'present', 'failed'])

#: A successful HTTP answer: the final URL, its headers and body (or its size).
_Answer = namedtuple('_Answer', ['url', 'headers', 'body'])


class FetchError(Exception):
    """An HTTP request did not give a usable answer."""


class SpacewatchHTMLParser(HTMLParser):
    """Extract JPG files from an HTML index.

    Only anchors whose whole ``href`` is a file name ``YYYYMMDD_HHMMSS.jpg``
    are kept (each once, in order of appearance); paths, URLs, queries and
    look-alikes are ignored.
    """
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.jpg_files = list()
        self._seen = set()

    def handle_starttag(self, tag, attrs):
        """Process HTML tags, in this case targeting anchor tags.
        """
        if tag != 'a':
            return
        href = next((value for name, value in attrs if name == 'href'), None)
        if href is not None and _jpg.fullmatch(href) and href not in self._seen:
            self._seen.add(href)
            self.jpg_files.append(href)


def _origin(url):
    """Scheme, host and port of `url`: a redirect may not leave them."""
    parts = urlsplit(url)
    port = parts.port or {'http': 80, 'https': 443}.get(parts.scheme.lower())
    return (parts.scheme.lower(), (parts.hostname or '').lower(), port)


def _get(session, url, limit, out=None):
    """GET `url` with timeouts, following redirects only on the same server.

    Parameters
    ----------
    session : :class:`requests.Session`
        The HTTP session, from :func:`desitransfer.web.session` (another
        one is given its transport).
    url : :class:`str`
        What to get.
    limit : :class:`int`
        Most bytes accepted in the body.
    out : file, optional
        Write the body there instead of returning it.

    Returns
    -------
    :class:`_Answer`
        The final URL, the headers, and the body (its size if `out` is set).

    Raises
    ------
    FetchError
        Anything but a complete 200 answer within the limits, :data:`DEADLINE`
        included.  An :exc:`OSError` writing `out` is raised as it is.
    """
    web.watch(session)
    deadline = web.Deadline(DEADLINE)
    try:
        with deadline:
            answer = _follow(session, url, limit, out)
    except (FetchError, requests.RequestException, ValueError) as err:
        if deadline.expired:
            raise FetchError(f"not complete after {DEADLINE} seconds; abandoned") from None
        if isinstance(err, FetchError):
            raise
        raise FetchError(str(err) or err.__class__.__name__) from None
    if deadline.expired:
        # The end of a connection may look like the end of a body sent without a length.
        raise FetchError(f"not complete after {DEADLINE} seconds; abandoned")
    return answer


def _follow(session, url, limit, out):
    """The requests of :func:`_get`, redirects included."""
    origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        with session.get(url, timeout=TIMEOUT, allow_redirects=False,
                         stream=True) as response:
            if not response.is_redirect:
                if response.status_code != 200:
                    raise FetchError(f"HTTP status {response.status_code:d} "
                                     f"{response.reason}")
                return _Answer(response.url, response.headers, _body(response, limit, out))
            target = urljoin(url, response.headers['Location'])
        if _origin(target) != origin:
            raise FetchError(f"redirected to another server ({target}); refused")
        url = target
    raise FetchError(f"more than {MAX_REDIRECTS:d} redirects")


def _body(response, limit, out):
    """Read the body of `response`, at most `limit` bytes."""
    length = response.headers.get('Content-Length', '')
    if length.isdigit() and int(length) > limit:
        raise FetchError(f"{length} bytes announced, more than the limit of {limit:d}")
    chunks, size = [], 0
    for chunk in _chunks(response):
        size += len(chunk)
        if size > limit:
            raise FetchError(f"more than {limit:d} bytes; abandoned")
        if out is None:
            chunks.append(chunk)
        else:
            out.write(chunk)
    # Without Content-Encoding, the bytes received must be the bytes announced
    # (urllib3 before version 2 does not check).
    if length.isdigit() and 'Content-Encoding' not in response.headers and int(length) != size:
        raise FetchError(f"truncated: {size:d} of {length} bytes received")
    return size if out is not None else b''.join(chunks)


def _chunks(response):
    """The body of `response` in pieces as they arrive."""
    raw = response.raw
    if not hasattr(raw, 'read1'):
        # urllib3 before version 2.
        yield from response.iter_content(chunk_size=1024)
        return
    while True:
        try:
            chunk = raw.read1(65536, decode_content=True)
        except (urllib3.exceptions.HTTPError, OSError) as err:
            # ProtocolError('Connection broken: IncompleteRead(...)', IncompleteRead(...))
            reason = err.args[0] if err.args and isinstance(err.args[0], str) else err
            raise FetchError(f"reading the answer failed: {reason}") from None
        if not chunk:
            return
        yield chunk


def _charset(headers):
    """The character set of an HTML answer, UTF-8 if missing or unknown."""
    charset = requests.utils.get_encoding_from_headers(headers) or 'utf-8'
    try:
        lookup(charset)
    except LookupError:
        return 'utf-8'
    return charset


def _jpg_list(index, session=None):
    """Like :func:`jpg_list`, also saying whether the index was read."""
    if session is None:
        with web.session() as session:
            return _jpg_list(index, session)
    try:
        answer = _get(session, index, INDEX_LIMIT)
        parser = SpacewatchHTMLParser()
        parser.feed(answer.body.decode(_charset(answer.headers), errors='replace'))
        parser.close()
    except FetchError as err:
        log.critical("Could not read the Spacewatch index %s: %s. No image listed there "
                     "is downloaded in this run.", index, err)
        return [], False
    except Exception as err:
        # html.parser raises on some malformed markup (an AssertionError for an
        # unknown marked section): a broken page is an unreadable index.
        log.critical("Could not parse the Spacewatch index %s (%s: %s). No image listed "
                     "there is downloaded in this run.", index, err.__class__.__name__, err)
        return [], False
    base = answer.url if answer.url.endswith('/') else answer.url + '/'
    return [base + j for j in parser.jpg_files], True


def jpg_list(index):
    """Obtain a list of JPEG files from an HTML index.

    Parameters
    ----------
    index : :class:`str`
        The URL of an HTML index.

    Returns
    -------
    :class:`list`
        A list of JPEG files found in `index`. The `index` URL is attached
        to the file names.  Empty, with a CRITICAL message, if the index
        cannot be read.
    """
    return _jpg_list(index)[0]


def _complete_jpeg(path, dir_fd=None):
    """``True`` if the file `path` (in the directory `dir_fd`, if set) is a
    regular file that starts and ends like a JPEG image; a link is not
    followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return False
    try:
        return _is_jpeg(fd)
    finally:
        os.close(fd)


def _is_jpeg(fd):
    """``True`` if the open file `fd` is a regular file that starts and ends
    like a JPEG image."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        head = os.pread(fd, len(_SOI), 0)
        tail = os.pread(fd, _TAIL, max(0, st.st_size - _TAIL))
    except OSError:
        return False
    return head == _SOI and _EOI in tail


def _last_modified(value):
    """Unix time of an HTTP date (any of the three formats), or ``None``."""
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        return when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _jpg_name(url):
    """The file name of an image URL, ``None`` unless it is ``YYYYMMDD_HHMMSS.jpg``."""
    parts = urlsplit(url)
    name = parts.path.rsplit('/', 1)[-1]
    if parts.query or parts.fragment or _jpg.fullmatch(name) is None:
        return None
    return name


def _create_temporary(directory, name):
    """Create the temporary file of image `name` in the open directory
    `directory`.

    Its name, ``.NAME.RANDOM.PID.tmp``, cannot be guessed (so nobody can put
    anything there beforehand) and is one that
    :func:`~desitransfer.files.sweep_temporary` removes once this process is
    gone.  It is created only if nothing has that name, and never through a
    link (``O_CREAT | O_EXCL | O_NOFOLLOW``), readable by this user only
    until it is complete.

    Returns
    -------
    :class:`tuple`
        The open file descriptor and the name of the file.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt in range(_TEMPORARY_TRIES):
        tmp = f'.{name}.{secrets.token_hex(8)}.{os.getpid():d}.tmp'
        try:
            return os.open(tmp, flags, 0o600, dir_fd=directory), tmp
        except FileExistsError:
            if attempt == _TEMPORARY_TRIES - 1:
                raise


def _fetch_jpg(session, url, directory, name, shown):
    """Download one image to `name` in the open directory `directory`
    through a temporary file.

    Everything is done on the open file and relative to `directory`: no
    link planted in the directory is ever followed.  The final rename
    replaces whatever has the name `name` (a link included), never the file
    a link points to.

    Parameters
    ----------
    session : :class:`requests.Session`
        The HTTP session.
    url : :class:`str`
        The image.
    directory : :class:`int`
        The open day directory.
    name : :class:`str`
        The name of the image there.
    shown : :class:`str`
        The path of the image, for messages.

    Returns
    -------
    :class:`bool`
        ``True`` if `name` now holds the complete image.

    Raises
    ------
    OSError
        If the disk is full or read-only: later images would fail as well.
    """
    tmp = None
    try:
        fd, tmp = _create_temporary(directory, name)
        with os.fdopen(fd, 'w+b') as f:
            answer = _get(session, url, JPEG_LIMIT, out=f)
            f.flush()
            if not _is_jpeg(f.fileno()):
                raise FetchError("the answer is not a complete JPEG image")
            os.fchmod(f.fileno(), IMAGE_MODE)
            mtime = _last_modified(answer.headers.get('Last-Modified'))
            if mtime is None:
                log.debug("No usable Last-Modified for %s (%r); its time is the download "
                          "time.", url, answer.headers.get('Last-Modified'))
            else:
                try:
                    os.utime(f.fileno(), (mtime, mtime))
                except (OverflowError, ValueError, OSError) as err:
                    log.debug("Could not set the time of %s to %s: %s.", shown, mtime, err)
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
        tmp = None
    except FetchError as err:
        log.warning("Skipping %s: %s.", url, err)
        return False
    except OSError as err:
        if err.errno in DISK_ERRORS:
            raise
        log.warning("Skipping %s: could not write %s: %s.", url, shown, err)
        return False
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp, dir_fd=directory)
            except OSError:
                pass  # gone already; else the next run sweeps it
    return True


def _open_directory(destination, parts=(), create=True):
    """Open the directory `destination`/`parts`, creating what is missing
    (mode 0o777 less the umask, as :func:`os.makedirs`).

    `destination` is followed as it is given; below it, each of `parts` must
    be a real directory: a link there is never followed (someone who can
    write in `destination` could otherwise send the images anywhere).

    Returns
    -------
    :class:`int` or ``None``
        The open directory; ``None`` if it does not exist and `create` is
        ``False``.

    Raises
    ------
    OSError
        If it cannot be created or opened, a link being in the way.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        if create:
            os.makedirs(destination, exist_ok=True)
        fd = os.open(destination, flags)
    except FileNotFoundError:
        if create:
            raise
        return None
    try:
        for part in parts:
            if create:
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                below = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if create:
                    raise
                os.close(fd)
                return None
            except OSError as err:
                if _is_link(part, fd):
                    raise OSError(err.errno, f"{part} is a symbolic link, not followed") \
                        from None
                raise
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def _download(files, destination, overwrite=False, test=False, parts=()):
    """Like :func:`download_jpg`, returning :class:`Downloads`; the images go
    to `destination`/`parts`, no link being followed below `destination`
    (see :func:`_open_directory`)."""
    downloaded = present = failed = 0
    if not files:
        return Downloads(0, 0, 0)
    where = os.path.join(destination, *parts)
    try:
        directory = _open_directory(destination, parts, create=not test)
    except OSError as err:
        log.error("Could not create %s: %s; none of its %d images is downloaded.",
                  where, err.strerror or err, len(files))
        return Downloads(0, 0, len(files))
    try:
        if not test:
            try:
                same = os.path.samestat(os.stat(where), os.fstat(directory))
            except OSError:
                same = False
            if same:
                sweep_temporary(where)
        with web.session() as session:
            for n, url in enumerate(files):
                name = _jpg_name(url)
                if name is None:
                    log.warning("Skipping %s: not an image named YYYYMMDD_HHMMSS.jpg.", url)
                    failed += 1
                    continue
                path = os.path.join(where, name)
                if directory is not None and _exists(name, directory) and not overwrite:
                    if _complete_jpeg(name, dir_fd=directory):
                        log.debug("Skipping existing file: %s.", path)
                        present += 1
                        continue
                    log.warning("%s is not a complete JPEG image; downloading it again.", path)
                if test:
                    log.info("Test mode, would download %s to %s.", url, path)
                    continue
                try:
                    if _fetch_jpg(session, url, directory, name, path):
                        downloaded += 1
                    else:
                        failed += 1
                except OSError as err:
                    log.error("Could not write %s: %s. The %d remaining images for %s are "
                              "not downloaded.", path, err, len(files) - n, where)
                    failed += len(files) - n
                    break
    finally:
        if directory is not None:
            os.close(directory)
    return Downloads(downloaded, present, failed)


def _is_link(name, directory):
    """``True`` if `name` is a symbolic link in the open `directory`."""
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _exists(name, directory):
    """``True`` if something (a link included) has the name `name` in the open `directory`."""
    try:
        os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def download_jpg(files, destination, overwrite=False, test=False):
    """Download `files` to `destination`.

    Each image is written to a temporary file in `destination`, checked to be
    a complete JPEG, given the time of its ``Last-Modified`` header (if any)
    and only then renamed; a failed download leaves nothing behind.

    Parameters
    ----------
    files : :class:`list`
        A list of URLs to download.
    destination : :class:`str`
        A local directory to hold the files.
    overwrite : :class:`str`, optional
        If ``True``, overwrite any existing files.
    test : :class:`bool`, optional
        If ``True``, do not download any files.

    Returns
    -------
    :class:`int`
        The number of files downloaded.
    """
    return _download(files, destination, overwrite=overwrite, test=test).downloaded


def _days(date=None):
    """The days to download, ``YYYY/MM/DD``: `date`, or today and yesterday on
    the calendar of Kitt Peak (MST)."""
    if date is not None:
        return [date]
    today = common._utcnow().astimezone(MST).date()
    return [d.strftime('%Y/%m/%d') for d in (today, today - dt.timedelta(days=1))]


def _date(value):
    """A real date written ``YYYY/MM/DD`` (argument type)."""
    if re.fullmatch(r'[0-9]{4}/[0-9]{2}/[0-9]{2}', value) is None:
        raise ArgumentTypeError(f"{value!r} is not a date written YYYY/MM/DD")
    try:
        dt.datetime.strptime(value, '%Y/%m/%d')
    except ValueError:
        raise ArgumentTypeError(f"{value!r} is not a real date") from None
    return value


def _server(value):
    """A server, ``HOST[:PORT]`` or ``http[s]://HOST[:PORT]`` (argument type)."""
    url = value if '://' in value else 'http://' + value
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if (re.search(r'\s', value) or parts.scheme not in ('http', 'https') or not parts.hostname
            or parts.path not in ('', '/') or parts.query or parts.fragment
            or parts.username is not None or not port_ok):
        raise ArgumentTypeError(f"{value!r} is not a server: use HOST, HOST:PORT "
                                "or http(s)://HOST[:PORT]")
    return value


def _server_url(server):
    """The base URL of `server`, as given to ``--server``."""
    return (server if '://' in server else 'http://' + server).rstrip('/')


def _directory(value):
    """A directory, existing or to be created (argument type)."""
    if not value:
        raise ArgumentTypeError("the directory is empty")
    if os.path.lexists(value) and not os.path.isdir(value):
        raise ArgumentTypeError(f"{value!r} exists and is not a directory")
    return value


def _make_destination(destination, test=False):
    """Create `destination` and its missing parents, as the original did
    (mode 0o777 less the umask); ``False``, with a CRITICAL line, if it
    cannot be.  Test mode creates nothing."""
    if os.path.isdir(destination):
        return True
    if test:
        log.info("Test mode, would create %s.", destination)
        return True
    try:
        os.makedirs(destination, exist_ok=True)
    except OSError as err:
        log.critical("Could not create %s: %s. Nothing was downloaded.", destination,
                     err.strerror or err)
        return False
    log.info("Created %s.", destination)
    return True


def _options(args=None):
    """Parse command-line options for :command:`desi_spacewatch_transfer`.

    Parameters
    ----------
    args : :class:`list`, optional
        Command-line arguments; ``sys.argv[1:]`` if not set.

    Returns
    -------
    :class:`argparse.Namespace`
        The parsed command-line options.
    """
    desc = "Download the all-sky Spacewatch camera images of Kitt Peak over HTTP."
    prsr = ArgumentParser(prog=os.path.basename(sys.argv[0]), description=desc)
    prsr.add_argument('-d', '--debug', action='store_true',
                      help="Set log level to DEBUG.")
    prsr.add_argument('-D', '--date', metavar='YYYY/MM/DD', type=_date,
                      help="Download the images of this day only (default: today's "
                           "and yesterday's, on the calendar of Kitt Peak, MST).")
    prsr.add_argument('-o', '--overwrite', action='store_true',
                      help="Download again images that are already here.")
    prsr.add_argument('-s', '--server', metavar='SERVER', type=_server,
                      default=os.environ.get('SPACEWATCH_SERVER') or None,
                      help="Spacewatch server, HOST[:PORT] or http(s)://HOST[:PORT] "
                           "(default $SPACEWATCH_SERVER, here %(default)s).")
    prsr.add_argument('-t', '--test', action='store_true',
                      help="Test mode: list what would be downloaded and write nothing; "
                           "implies --debug.")
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    prsr.add_argument('destination', metavar='DIR', type=_directory,
                      help="Download files to DIR/YYYY/MM/DD/; DIR and its parents are "
                           "created if they do not exist.")
    return prsr.parse_args(args)


def _lock(destination):
    """Take the single-instance lock of `destination`: an exclusive kernel
    lock (:func:`fcntl.flock`) on the directory itself, which dies with its
    process.  No file is created for it, so nothing can be planted in its
    place.

    Returns
    -------
    :class:`tuple`
        ``(fd, None)`` with the open directory (keep it open to keep the
        lock), or ``(None, pid)`` if another process holds it (``'unknown'``
        if its pid cannot be told).

    Raises
    ------
    OSError
        If the directory cannot be opened or locked.
    """
    fd = os.open(destination, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        try:
            holder = lock_holder(destination)
        except OSError:
            holder = None
        return None, holder or 'unknown'
    return fd, None


def _transfer_day(options, day):
    """Download the images of `day` (``YYYY/MM/DD``); return the number of failures."""
    index = f"{_server_url(options.server)}/{ROOT}/{day}/"
    files, listed = _jpg_list(index)
    result = _download(files, options.destination, overwrite=options.overwrite,
                       test=options.test, parts=day.split('/'))
    log.info("%d files downloaded for %s (%d already here, %d failed).",
             result.downloaded, day, result.present, result.failed)
    return result.failed + (0 if listed else 1)


def main():
    """Entry point for :command:`desi_spacewatch_transfer`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`: 1 if an index
        could not be read or an image could not be downloaded.
    """
    options = _options()
    configure_log(debug=options.debug or options.test, program='desi_spacewatch_transfer')
    if options.server is None:
        log.critical("No Spacewatch server: set SPACEWATCH_SERVER or use --server. "
                     "Nothing was downloaded.")
        return 1
    if not _make_destination(options.destination, options.test):
        return 1
    if options.test:
        return _transfer(options)
    try:
        lock, holder = _lock(options.destination)
    except OSError as err:
        log.critical("Could not lock %s: %s. Nothing was downloaded.", options.destination,
                     err.strerror or err)
        return 1
    if lock is None:
        log.info("desi_spacewatch_transfer is already running (pid %s, lock on %s); "
                 "nothing to do.", holder, options.destination)
        return 0
    try:
        return _transfer(options)
    finally:
        os.close(lock)


def _transfer(options):
    """Download the images of the days of `options`; the exit status."""
    failures = sum(_transfer_day(options, day) for day in _days(options.date))
    return 1 if failures else 0
