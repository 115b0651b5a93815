# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
======================
desitransfer.simulator
======================

Build a simulated mountain: raw exposures laid out as at KPNO, for the
quick-start demonstration, the tests and the benchmarks; and a stand-in for
the NERSC status API of the archive.

At KPNO each exposure is a directory ``DATA/NIGHT/EXPID`` holding its files
and a checksum file ``checksum-EXPID.sha256sum``; the transfer area
``SOURCE/NIGHT/EXPID`` holds symbolic links to those directories.
"""
import hashlib
import http.server
import json
import os
import threading


def exposure_files(expid, nfiles=3, size=2048, seed=0):
    """Contents of a simulated exposure, deterministic in its arguments.

    Parameters
    ----------
    expid : :class:`str`
        Exposure number, 8 digits.
    nfiles : :class:`int`, optional
        Number of data files.
    size : :class:`int`, optional
        Size of each data file in bytes.
    seed : :class:`int`, optional
        Change the bytes of the files.

    Returns
    -------
    :class:`dict`
        File name mapped to contents (:class:`bytes`).
    """
    files = {}
    names = [f'desi-{expid}.fits.fz', f'guide-{expid}.fits.fz', f'request-{expid}.json']
    names += [f'fvc-{expid}-{i:02d}.fits.fz' for i in range(max(0, nfiles - len(names)))]
    for i, name in enumerate(names[:nfiles]):
        block = hashlib.sha256(f'{expid}:{name}:{seed}'.encode()).digest()
        files[name] = (block * (size // len(block) + 1))[:size]
    return files


def checksum_text(files):
    """Contents of a ``sha256sum`` file for `files` (name -> bytes).
    """
    return ''.join(f'{hashlib.sha256(data).hexdigest()}  {name}\n'
                   for name, data in sorted(files.items()))


def make_exposure(data, source, night, expid, files=None, checksum=True, link=True):
    """Create one exposure at the simulated mountain.

    Parameters
    ----------
    data : :class:`str`
        Root of the real exposure directories.
    source : :class:`str`
        Root of the transfer area holding ``NIGHT/EXPID`` links.
    night : :class:`str`
        Night, YYYYMMDD.
    expid : :class:`str`
        Exposure, 8 digits.
    files : :class:`dict`, optional
        File name mapped to contents; by default :func:`exposure_files`.
    checksum : :class:`bool`, optional
        If ``True``, write ``checksum-EXPID.sha256sum`` listing `files`.
    link : :class:`bool`, optional
        If ``True``, link the exposure into the transfer area.

    Returns
    -------
    :class:`str`
        The real exposure directory.
    """
    if files is None:
        files = exposure_files(expid)
    directory = os.path.join(data, night, expid)
    os.makedirs(directory, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(directory, name), 'wb') as f:
            f.write(content)
    if checksum:
        with open(os.path.join(directory, f'checksum-{expid}.sha256sum'), 'w') as f:
            f.write(checksum_text(files))
    if link:
        os.makedirs(os.path.join(source, night), exist_ok=True)
        target = os.path.join(source, night, expid)
        if not os.path.islink(target):
            os.symlink(directory, target)
    return directory


def make_mountain(root, nights, exposures, nfiles=3, size=2048, first=1000):
    """Create several nights of exposures under `root`.

    Parameters
    ----------
    root : :class:`str`
        Top directory; exposures go to ``root/data``, links to ``root/dts``.
    nights : :class:`list`
        Nights, YYYYMMDD.
    exposures : :class:`int`
        Exposures per night.
    nfiles, size : :class:`int`, optional
        Files per exposure and their size.
    first : :class:`int`, optional
        First exposure number.

    Returns
    -------
    :class:`list`
        ``(night, expid)`` of every exposure created.
    """
    created = []
    expid = first
    for night in nights:
        for _ in range(exposures):
            e = f'{expid:08d}'
            make_exposure(os.path.join(root, 'data'), os.path.join(root, 'dts'), night, e,
                          files=exposure_files(e, nfiles=nfiles, size=size))
            created.append((night, e))
            expid += 1
    return created


class _ArchiveActive(http.server.BaseHTTPRequestHandler):
    """Answer every GET like the NERSC status API: the archive is active."""

    def do_GET(self):
        body = json.dumps({'name': 'archive', 'status': 'active'}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve_archive_status():
    """Start, on 127.0.0.1 only, an HTTP server saying the HPSS archive is active.

    Returns
    -------
    :class:`tuple`
        The server (stop it with ``shutdown()``) and the URL of the status.
    """
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _ArchiveActive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f'http://127.0.0.1:{server.server_address[1]}/api/v1.2/status/archive'
