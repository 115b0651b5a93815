# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Security tests of desitransfer.spacewatch (issue 16, rows 6 and 7): a
hostile HTTP server on 127.0.0.1 sending its headers a byte at a time, runs
started by cron piling up, and another local user planting links in a
directory the images are written to (CI runs as root: the links are planted
by ``nobody``)."""
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time

import pytest

from desitransfer import spacewatch
from desitransfer.alerts import configure_log
from desitransfer.spacewatch import download_jpg, jpg_list
from fixtures_http import CROPPED, Answer, jpeg
from unprivileged import NOBODY

DAY = '2023/10/31'
NAMES = ['20231031_000005.jpg', '20231031_000205.jpg']

#: Headers sent a byte every 50 ms: each read is quick, the whole takes minutes.
SLOW_HEADERS = dict(header_drip=0.05, headers=(('X-Padding', 'x' * 4000),))


@pytest.fixture(autouse=True)
def reset_log():
    yield
    configure_log()


@pytest.fixture
def quick(monkeypatch):
    """A read timeout longer than the pause between bytes, a short deadline."""
    monkeypatch.setattr(spacewatch, 'TIMEOUT', (2, 0.5))
    monkeypatch.setattr(spacewatch, 'DEADLINE', 1.0)


def command(*args, **kwargs):
    environ = {k: v for k, v in os.environ.items() if k != 'SPACEWATCH_SERVER'}
    return subprocess.run(['desi_spacewatch_transfer'] + list(args), env=environ,
                          capture_output=True, text=True, timeout=60, **kwargs)


def in_thread(function, *args, wait=5.0):
    """Run `function` in a thread; its result, or fail if it is still running
    after `wait` seconds (the end of the test then cuts the server short)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function(*args)), daemon=True)
    thread.start()
    thread.join(wait)
    assert not thread.is_alive(), f"still running after {wait} seconds"
    return result[0]


# ----------------------------------------------------------------------
# Row 7: the deadline covers the headers.
# ----------------------------------------------------------------------
def test_index_headers_one_byte_at_a_time(http_site, quick, caplog):
    site = http_site()
    index = f'{site.url}{CROPPED}/{DAY}/'
    site.route(f'{CROPPED}/{DAY}/', Answer(200, b'<html></html>', **SLOW_HEADERS))
    t0 = time.monotonic()
    assert in_thread(jpg_list, index) == []
    assert time.monotonic() - t0 < 3
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and 'not complete after 1.0 seconds' in critical[0], critical


def test_image_headers_one_byte_at_a_time(http_site, quick, tmp_path, caplog):
    site = http_site()
    index = site.day(DAY, {NAMES[0]: Answer(200, jpeg(), **SLOW_HEADERS), NAMES[1]: jpeg(1)})
    files = jpg_list(index)
    t0 = time.monotonic()
    assert in_thread(download_jpg, files, str(tmp_path)) == 1
    assert time.monotonic() - t0 < 4
    assert sorted(os.listdir(tmp_path)) == [NAMES[1]]
    assert f'Skipping {files[0]}: not complete after 1.0 seconds' in caplog.text


def test_runs_do_not_pile_up(http_site, tmp_path):
    """A run held by a server sending its headers a byte at a time keeps the
    lock: the next run says so in one line and exits 0 without asking the
    server anything; once the first is gone, runs go on."""
    site = http_site()
    site.day(DAY, {NAMES[0]: jpeg()})
    path = f'{CROPPED}/{DAY}/'
    normal = site.routes[path][0]
    site.route(path, Answer(200, normal.body, **SLOW_HEADERS), normal)
    first = subprocess.Popen(['desi_spacewatch_transfer', '-s', site.hostport, '-D', DAY,
                              str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        limit = time.monotonic() + 30
        while path not in site.requests:
            assert first.poll() is None and time.monotonic() < limit
            time.sleep(0.02)
        second = command('-s', site.hostport, '-D', DAY, str(tmp_path))
        lines = (second.stdout + second.stderr).strip().splitlines()
        assert second.returncode == 0, lines
        assert len(lines) == 1 and 'INFO' in lines[0], lines
        assert (f'desi_spacewatch_transfer is already running (pid {first.pid:d}, '
                f'lock on {tmp_path}); nothing to do.') in lines[0]
        assert site.requests == [path]
        assert os.listdir(tmp_path) == []
    finally:
        first.terminate()
        first.communicate(timeout=30)
    third = command('-s', site.hostport, '-D', DAY, str(tmp_path))
    assert third.returncode == 0, third.stdout + third.stderr
    assert os.listdir(tmp_path / '2023' / '10' / '31') == [NAMES[0]]


# ----------------------------------------------------------------------
# Row 6: links planted by another user are never followed.
# ----------------------------------------------------------------------
@pytest.fixture
def shared(unprivileged):
    """A directory that everybody can write (not sticky, as a directory
    shared by a group), reachable by the unprivileged user."""
    d = tempfile.mkdtemp(dir=unprivileged.top)
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def plant(unprivileged, target, links):
    """As the unprivileged user, make each of `links` a symbolic link to `target`."""
    p = unprivileged.run(f"import os\nfor link in {links!r}:\n    os.symlink({target!r}, link)\n")
    assert p.returncode == 0, p.stderr
    for link in links:
        st = os.lstat(link)
        assert stat.S_ISLNK(st.st_mode)
        assert st.st_uid == (NOBODY if os.geteuid() == 0 else os.geteuid())


def test_planted_links_to_a_victim_file(http_site, unprivileged, shared, tmp_path):
    """The temporary image and the image itself have a link to the victim in
    their place: the victim is unchanged, the links are replaced by images."""
    victim = tmp_path / 'victim'
    victim.write_bytes(b'precious\n')
    victim.chmod(0o600)
    before = victim.stat()
    site = http_site()
    images = {n: jpeg(i) for i, n in enumerate(NAMES)}
    index = site.day(DAY, images)
    # The temporary names of the writers of a few pids around this one, and the images.
    pids = range(os.getpid() - 5, os.getpid() + 6)
    plant(unprivileged, str(victim), [os.path.join(shared, f'.{n}.{pid:d}.tmp')
                                      for n in NAMES for pid in pids]
          + [os.path.join(shared, NAMES[0])])
    assert download_jpg(jpg_list(index), shared) == 2
    after = victim.stat()
    assert victim.read_bytes() == b'precious\n'
    assert (after.st_mode, after.st_size, after.st_mtime_ns, after.st_nlink) == \
        (before.st_mode, before.st_size, before.st_mtime_ns, before.st_nlink)
    for name, body in images.items():
        path = os.path.join(shared, name)
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
        with open(path, 'rb') as f:
            assert f.read() == body
    # Nothing is left behind but what was planted.
    left = sorted(n for n in os.listdir(shared) if n not in NAMES)
    assert all(os.path.islink(os.path.join(shared, n)) for n in left)


def test_planted_link_to_a_victim_directory(http_site, unprivileged, shared, tmp_path):
    """A link in place of a day directory sends no image elsewhere: that day
    fails with one error line, the victim directory stays as it was."""
    victim = tmp_path / 'victim'
    victim.mkdir()
    (victim / 'precious').write_text('precious\n')
    site = http_site()
    site.day(DAY, {n: jpeg(i) for i, n in enumerate(NAMES)})
    plant(unprivileged, str(victim), [os.path.join(shared, '2023')])
    p = command('-s', site.hostport, '-D', DAY, shared)
    assert p.returncode == 1
    errors = [line for line in p.stdout.splitlines() if line.startswith('ERROR')]
    assert len(errors) == 1, p.stdout + p.stderr
    assert f'Could not create {shared}/2023/10/31: 2023 is a symbolic link, not followed' \
        in errors[0]
    assert os.listdir(victim) == ['precious']
    assert os.path.islink(os.path.join(shared, '2023'))
    assert site.requests == [f'{CROPPED}/{DAY}/']


def test_unguessable_temporary_files_are_swept(http_site, tmp_path):
    """The temporary file of a killed run, whose name cannot be guessed, is
    still recognised and removed by the next run; a live run's is left alone."""
    dead = subprocess.Popen(['true'])
    dead.wait()
    site = http_site()
    index = site.day(DAY, {NAMES[0]: jpeg()})
    stale = tmp_path / f'.{NAMES[0]}.0123456789abcdef.{dead.pid:d}.tmp'
    live = tmp_path / f'.{NAMES[1]}.0123456789abcdef.{os.getpid():d}.tmp'
    for path in (stale, live):
        path.write_bytes(b'\xff\xd8\xff partial')
    assert download_jpg(jpg_list(index), str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted([NAMES[0], live.name])
