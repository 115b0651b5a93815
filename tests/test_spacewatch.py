# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of desitransfer.spacewatch against a real HTTP server on 127.0.0.1
serving index pages, images and hostile answers."""
import datetime as dt
import logging
import os
import resource
import stat
import subprocess
import sys
import time

import pytest

from desitransfer import common, spacewatch
from desitransfer.alerts import configure_log
from desitransfer.spacewatch import (SpacewatchHTMLParser, _days, _options, download_jpg,
                                     jpg_list)
from fixtures_http import CROPPED, Answer, jpeg

DAY = '2023/10/31'
NAMES = ['20231031_000005.jpg', '20231031_000205.jpg', '20231031_000405.jpg']
#: Last-Modified of the served images, and its Unix time.
MODIFIED, MTIME = 'Mon, 30 Oct 2023 00:00:24 GMT', 1698624024


@pytest.fixture(autouse=True)
def reset_log():
    yield
    configure_log()


@pytest.fixture
def quick(monkeypatch):
    """Short timeouts and limits, so that slow and large answers are quick to test."""
    monkeypatch.setattr(spacewatch, 'TIMEOUT', (2, 0.5))
    monkeypatch.setattr(spacewatch, 'DEADLINE', 1.0)


def files_in(directory):
    """Every file under `directory`, relative to it, hidden ones included."""
    found = []
    for top, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(top, n), directory) for n in names]
    return sorted(found)


def command(*args, env=None, **kwargs):
    environ = {k: v for k, v in os.environ.items() if k != 'SPACEWATCH_SERVER'}
    environ.update(env or {})
    return subprocess.run(['desi_spacewatch_transfer'] + list(args), env=environ,
                          capture_output=True, text=True, timeout=120, **kwargs)


# ----------------------------------------------------------------------
# The index.
# ----------------------------------------------------------------------
def test_parser_keeps_only_image_names():
    hostile = ['../../etc/passwd.jpg', '/20231031_000001.jpg', '20231031_123456.jpg/../../x',
               'http://elsewhere/20231031_000002.jpg', '20231031_000003.jpg?x=1',
               '20231031_000004.jpgx', ' 20231031_000005.jpg', '20231031_000006.jpg\n',
               '20231031_000007.jpg%2F..%2Fx', '..%2F20231031_000008.jpg', 'x20231031_000009.jpg',
               '2023103_000010.jpg', '20231031_000011.JPG', '20231031-000012.jpg',
               '２0231031_000013.jpg']
    html = ''.join(f'<a href="{h}">x</a>' for h in hostile)
    html += ('<a href="20231031_000100.jpg">a</a><A HREF="20231031_000200.jpg">b</A>'
             '<a href>c</a><a name="20231031_000300.jpg">d</a><img src="20231031_000400.jpg">'
             '<a href="20231031_000100.jpg">again</a>'
             '<a href="20231031_000500.jpg" href="../x.jpg">first href counts</a>')
    parser = SpacewatchHTMLParser()
    parser.feed(html)
    assert parser.jpg_files == ['20231031_000100.jpg', '20231031_000200.jpg',
                                '20231031_000500.jpg']


def test_jpg_list(http_site):
    site = http_site()
    index = site.day(DAY, {n: jpeg(i) for i, n in enumerate(NAMES)},
                     extra='<a href="../../../x/20231031_000999.jpg">no</a>')
    assert jpg_list(index) == [index + n for n in NAMES]
    assert site.requests == [f'{CROPPED}/{DAY}/']


@pytest.mark.parametrize('content_type', ['text/html', 'text/html; charset=utf-8',
                                          'text/html;charset=bogus-charset', None,
                                          'application/octet-stream'])
def test_jpg_list_content_types(http_site, content_type):
    """A Content-Type without charset, with an unknown one, or none at all is fine."""
    site = http_site()
    index = site.day(DAY, {n: jpeg() for n in NAMES}, content_type=content_type)
    assert jpg_list(index) == [index + n for n in NAMES]


def test_jpg_list_empty_day(http_site, caplog):
    site = http_site()
    index = site.day(DAY, {})
    with caplog.at_level(logging.INFO):
        assert jpg_list(index) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize('answer, why', [
    (Answer(404, b'Not Found'), 'HTTP status 404'),
    (Answer(500, b'oops'), 'HTTP status 500'),
    (Answer(200, b'<a href="20231031_000005.jpg">' * 10), 'announced'),  # over the limit
    (Answer(200, b'<html>' + b' ' * 100, length=False, send=50, drip=0.05), 'abandoned'),
    (Answer(200, b'<a href="20231031_000005.jpg">', length=100),
     'Connection broken: IncompleteRead(30 bytes read, 70 more expected)'),
    (Answer(200, b'<html>', delay=5), 'timed out'),
    (Answer(200, b'<![foo <a href="20231031_000005.jpg">'), 'AssertionError'),
    (Answer(302, headers=(('Location', '/elsewhere/'),)), 'HTTP status 404'),
    (Answer(301), 'HTTP status 301'),
])
def test_jpg_list_unreadable(http_site, quick, monkeypatch, caplog, answer, why):
    """Every broken or hostile index gives [] and one CRITICAL line saying why."""
    monkeypatch.setattr(spacewatch, 'INDEX_LIMIT', 200)
    site = http_site()
    index = f'{site.url}{CROPPED}/{DAY}/'
    site.route(f'{CROPPED}/{DAY}/', answer)
    t0 = time.monotonic()
    assert jpg_list(index) == []
    assert time.monotonic() - t0 < 3
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1
    assert index in critical[0] and why in critical[0]


def test_jpg_list_server_down(caplog):
    from conftest import free_port
    index = f'http://127.0.0.1:{free_port()}{CROPPED}/{DAY}/'
    assert jpg_list(index) == []
    assert 'Could not read the Spacewatch index' in caplog.text


def test_jpg_list_redirects(http_site, caplog):
    """A redirect on the same server is followed; one to another server is refused."""
    site, other = http_site(), http_site()
    other.day(DAY, {n: jpeg() for n in NAMES})
    index = site.day(DAY, {n: jpeg() for n in NAMES})
    site.route(f'{CROPPED}/{DAY}', Answer(301, headers=(('Location', f'{CROPPED}/{DAY}/'),)))
    assert jpg_list(f'{site.url}{CROPPED}/{DAY}') == [index + n for n in NAMES]
    site.route(f'{CROPPED}/{DAY}/', Answer(302, headers=(('Location',
                                                          f'{other.url}{CROPPED}/{DAY}/'),)))
    assert jpg_list(index) == []
    assert 'redirected to another server' in caplog.text
    assert other.requests == []
    site.route(f'{CROPPED}/{DAY}/', Answer(302, headers=(('Location', index),)))
    assert jpg_list(index) == []
    assert 'more than 5 redirects' in caplog.text


# ----------------------------------------------------------------------
# Downloads.
# ----------------------------------------------------------------------
@pytest.mark.parametrize('modified, mtime', [
    (MODIFIED, MTIME),
    ('Monday, 30-Oct-23 00:00:24 GMT', MTIME),
    ('Mon Oct 30 00:00:24 2023', MTIME),
    ('Mon, 30 Oct 2023 02:00:24 +0200', MTIME),
    (None, None), ('yesterday', None), ('Mon, 31 Feb 2023 00:00:24 GMT', None)])
def test_download_last_modified(http_site, tmp_path, modified, mtime):
    """Each image gets the time of its Last-Modified in any HTTP date format;
    without a usable one, the time of the download."""
    site = http_site()
    images = {n: jpeg(i) for i, n in enumerate(NAMES)}
    index = site.day(DAY, images, modified=modified)
    destination = tmp_path / 'day'
    t0 = time.time()
    assert download_jpg(jpg_list(index), str(destination)) == 3
    assert files_in(destination) == NAMES
    for name, body in images.items():
        assert (destination / name).read_bytes() == body
        if mtime is None:
            assert (destination / name).stat().st_mtime >= t0 - 1
        else:
            assert (destination / name).stat().st_mtime == mtime


def test_download_skips_existing(http_site, tmp_path, caplog):
    site = http_site()
    images = {n: jpeg(i) for i, n in enumerate(NAMES)}
    index = site.day(DAY, images)
    destination = tmp_path / 'day'
    destination.mkdir()
    (destination / NAMES[0]).write_bytes(jpeg(99))
    # Left truncated by an earlier program: not a complete image, so fetched again.
    (destination / NAMES[1]).write_bytes(images[NAMES[1]][:500])
    files = jpg_list(index)
    site.requests.clear()
    assert download_jpg(files, str(destination)) == 2
    assert site.requests == [f'{CROPPED}/{DAY}/{n}' for n in NAMES[1:]]
    assert (destination / NAMES[0]).read_bytes() == jpeg(99)
    assert (destination / NAMES[1]).read_bytes() == images[NAMES[1]]
    assert 'not a complete JPEG image; downloading it again' in caplog.text
    assert download_jpg(files, str(destination)) == 0
    assert download_jpg(files, str(destination), overwrite=True) == 3
    assert (destination / NAMES[0]).read_bytes() == images[NAMES[0]]


def test_download_test_mode(http_site, tmp_path, caplog):
    site = http_site()
    index = site.day(DAY, {n: jpeg() for n in NAMES})
    files = jpg_list(index)
    site.requests.clear()
    with caplog.at_level(logging.INFO):
        assert download_jpg(files, str(tmp_path / 'day'), test=True) == 0
    assert not (tmp_path / 'day').exists()
    assert site.requests == []
    assert caplog.text.count('Test mode, would download') == 3


def test_download_hostile(http_site, tmp_path, quick, monkeypatch, caplog):
    """Every bad answer is skipped with a warning and leaves nothing behind;
    the good images around them are downloaded."""
    monkeypatch.setattr(spacewatch, 'JPEG_LIMIT', 5000)
    site, other = http_site(), http_site()
    other.day(DAY, {'20231031_000900.jpg': jpeg()})
    good = jpeg(1)
    images = {
        '20231031_000000.jpg': good,
        '20231031_000100.jpg': Answer(404, b'Not Found'),
        '20231031_000200.jpg': Answer(200, b'<html><body>Server busy</body></html>'),
        '20231031_000300.jpg': Answer(200, jpeg(3), send=1000),
        '20231031_000400.jpg': Answer(200, jpeg(4), length=False, send=1000),
        '20231031_000500.jpg': Answer(200, jpeg(5, size=6000)),
        '20231031_000600.jpg': Answer(200, jpeg(6, size=6000), length=False),
        '20231031_000700.jpg': Answer(200, jpeg(7), drip=0.01),
        '20231031_000800.jpg': Answer(200, jpeg(8), delay=5),
        '20231031_000900.jpg': Answer(302, headers=(
            ('Location', f'{other.url}{CROPPED}/{DAY}/20231031_000900.jpg'),)),
        '20231031_001000.jpg': Answer(302, headers=(('Location', '20231031_000000.jpg'),)),
        '20231031_001100.jpg': Answer(200, b'\xff\xd8\xff' + b'x' * 100),
    }
    index = site.day(DAY, images)
    files = jpg_list(index)
    assert len(files) == len(images)
    destination = tmp_path / 'day'
    t0 = time.monotonic()
    result = spacewatch._download(files + [f'{site.url}/x/../../etc/passwd',
                                           f'{site.url}{CROPPED}/{DAY}/x.jpg?20231031_000000.jpg'],
                                  str(destination))
    assert time.monotonic() - t0 < 10
    assert result == spacewatch.Downloads(2, 0, len(images) + 2 - 2)
    assert files_in(destination) == ['20231031_000000.jpg', '20231031_001000.jpg']
    assert (destination / '20231031_001000.jpg').read_bytes() == good
    assert other.requests == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(images) + 2 - 2
    for expected in ['HTTP status 404', 'not a complete JPEG', 'IncompleteRead(1000 bytes read',
                     'more than the limit of 5000', 'more than 5000 bytes',
                     'abandoned', 'timed out', 'redirected to another server',
                     'not an image named YYYYMMDD_HHMMSS.jpg']:
        assert any(expected in w for w in warnings), expected


def test_download_removes_stale_temporary_files(http_site, tmp_path):
    site = http_site()
    index = site.day(DAY, {NAMES[0]: jpeg()})
    destination = tmp_path / 'day'
    destination.mkdir()
    stale = destination / f'.{NAMES[0]}.999999999.tmp'
    stale.write_bytes(b'\xff\xd8\xff partial')
    assert download_jpg(jpg_list(index), str(destination)) == 1
    assert files_in(destination) == [NAMES[0]]


def test_download_unwritable_destination(http_site, tmp_path, caplog):
    site = http_site()
    index = site.day(DAY, {n: jpeg() for n in NAMES})
    (tmp_path / 'file').write_text('x')
    result = spacewatch._download(jpg_list(index), str(tmp_path / 'file' / 'day'))
    assert result == spacewatch.Downloads(0, 0, 3)
    assert 'Could not create' in caplog.text


# ----------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------
def test_days_follow_the_calendar_of_kitt_peak(monkeypatch):
    # 05:00 UTC on 1 November is still 31 October at Kitt Peak.
    monkeypatch.setattr(common, '_utcnow',
                        lambda: dt.datetime(2023, 11, 1, 5, 0, tzinfo=dt.timezone.utc))
    assert _days() == ['2023/10/31', '2023/10/30']
    monkeypatch.setattr(common, '_utcnow',
                        lambda: dt.datetime(2024, 3, 1, 8, 0, tzinfo=dt.timezone.utc))
    assert _days() == ['2024/03/01', '2024/02/29']
    assert _days('2023/01/02') == ['2023/01/02']


def test_options(tmp_path, monkeypatch):
    monkeypatch.setenv('SPACEWATCH_SERVER', 'www.example.com')
    options = _options(['--debug', str(tmp_path)])
    assert options.debug and not options.test and not options.overwrite
    assert options.server == 'www.example.com' and options.date is None
    options = _options(['-s', 'https://other.example.com:8443', '-D', '2024/02/29', '-o', '-t',
                        str(tmp_path)])
    assert options.server == 'https://other.example.com:8443'
    assert options.date == '2024/02/29' and options.overwrite and options.test
    monkeypatch.delenv('SPACEWATCH_SERVER')
    assert _options([str(tmp_path)]).server is None


@pytest.mark.parametrize('args, message', [
    (['-D', '2023/02/30'], 'is not a real date'),
    (['-D', '2023/10/31/../../..'], 'is not a date written YYYY/MM/DD'),
    (['-D', '../../../etc'], 'is not a date written YYYY/MM/DD'),
    (['-D', '2023-10-31'], 'is not a date written YYYY/MM/DD'),
    (['-D', '/2023/10/31'], 'is not a date written YYYY/MM/DD'),
    (['-s', 'host/path'], 'is not a server'),
    (['-s', 'ftp://host'], 'is not a server'),
    (['-s', 'user@host'], 'is not a server'),
    (['-s', 'host:99999'], 'is not a server'),
    (['-s', 'two words'], 'is not a server'),
])
def test_command_refuses_bad_input(tmp_path, args, message):
    top = tmp_path / 'spacewatch'
    top.mkdir()
    p = command(*args, str(top), env={'SPACEWATCH_SERVER': '127.0.0.1:9'})
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if 'error:' in line]
    assert len(errors) == 1 and message in errors[0], p.stderr
    assert files_in(top) == [] and os.listdir(top) == []


def test_command_refuses_file_as_directory_and_bad_environment(tmp_path):
    (tmp_path / 'file').write_text('x')
    p = command(str(tmp_path / 'file'), env={'SPACEWATCH_SERVER': '127.0.0.1:9'})
    assert p.returncode == 2 and 'exists and is not a directory' in p.stderr
    assert (tmp_path / 'file').read_text() == 'x'
    p = command(str(tmp_path / 'missing'), env={'SPACEWATCH_SERVER': 'http://host/path'})
    assert p.returncode == 2 and 'argument -s/--server' in p.stderr
    assert os.listdir(tmp_path) == ['file']


def test_command_creates_missing_directory(http_site, tmp_path):
    """DIR and its missing parents are created, as the original did: mode
    0o777 less the umask; not in test mode, nor without a server."""
    site = http_site()
    site.day(DAY, {NAMES[0]: jpeg()})
    top = tmp_path / 'external' / 'spacewatch'
    for args in (['-t', '-s', site.hostport], []):
        p = command(*args, '-D', DAY, str(top))
        assert p.returncode in (0, 1) and os.listdir(tmp_path) == [], p.stdout + p.stderr
    p = command('-s', site.hostport, '-D', DAY, str(top), preexec_fn=lambda: os.umask(0o027))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f'Created {top}.' in p.stdout
    assert files_in(tmp_path) == [f'external/spacewatch/2023/10/31/{NAMES[0]}']
    for directory in (tmp_path / 'external', top, top / '2023', top / '2023' / '10',
                      top / '2023' / '10' / '31'):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o750, directory
    # It cannot be created: one CRITICAL line, exit status 1, nothing asked of the server.
    (tmp_path / 'file').write_text('x')
    site.requests.clear()
    p = command('-s', site.hostport, '-D', DAY, str(tmp_path / 'file' / 'spacewatch'))
    assert p.returncode == 1
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('CRITICAL') and \
        f'Could not create {tmp_path / "file" / "spacewatch"}: Not a directory.' in lines[0]
    assert site.requests == []


def test_command_without_server(tmp_path):
    p = command(str(tmp_path))
    assert p.returncode == 1
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert len(lines) == 1 and 'CRITICAL' in lines[0] and 'SPACEWATCH_SERVER' in lines[0]
    assert os.listdir(tmp_path) == []


def test_command_downloads_a_day(http_site, tmp_path):
    """Started as cron would, with the server in the environment."""
    site = http_site()
    images = {n: jpeg(i) for i, n in enumerate(NAMES)}
    site.day(DAY, images, modified=MODIFIED)
    p = command('--date', DAY, str(tmp_path), env={'SPACEWATCH_SERVER': site.hostport})
    assert p.returncode == 0, p.stdout + p.stderr
    assert '3 files downloaded for 2023/10/31 (0 already here, 0 failed).' in p.stdout
    assert files_in(tmp_path) == [f'2023/10/31/{n}' for n in NAMES]
    for name, body in images.items():
        path = tmp_path / '2023' / '10' / '31' / name
        assert path.read_bytes() == body and path.stat().st_mtime == MTIME
    # A second run downloads nothing again.
    site.requests.clear()
    p = command('-s', site.url, '-D', DAY, str(tmp_path))
    assert p.returncode == 0
    assert '0 files downloaded for 2023/10/31 (3 already here, 0 failed).' in p.stdout
    assert site.requests == [f'{CROPPED}/{DAY}/']


def test_command_test_mode(http_site, tmp_path):
    site = http_site()
    site.day(DAY, {n: jpeg() for n in NAMES})
    p = command('-t', '-s', site.hostport, '-D', DAY, str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count('Test mode, would download') == 3
    assert os.listdir(tmp_path) == []


def test_command_exit_status_on_failures(http_site, tmp_path):
    site = http_site()
    site.day(DAY, {NAMES[0]: jpeg(), NAMES[1]: Answer(200, b'<html>error</html>')})
    p = command('-s', site.hostport, '-D', DAY, str(tmp_path))
    assert p.returncode == 1
    assert '1 files downloaded for 2023/10/31 (0 already here, 1 failed).' in p.stdout
    assert files_in(tmp_path) == [f'2023/10/31/{NAMES[0]}']
    # An unreadable index is a failure too.
    p = command('-s', site.hostport, '-D', '2023/11/01', str(tmp_path))
    assert p.returncode == 1
    assert 'CRITICAL' in p.stdout and 'HTTP status 404' in p.stdout
    assert not (tmp_path / '2023' / '11').exists()


def test_command_today_and_yesterday(http_site, tmp_path, monkeypatch):
    """Without --date, today's and yesterday's images, by the calendar of Kitt Peak."""
    site = http_site()
    site.day('2023/10/31', {'20231031_000005.jpg': jpeg(1)})
    site.day('2023/10/30', {'20231030_235805.jpg': jpeg(2)})
    site.day('2023/11/01', {'20231101_000005.jpg': jpeg(3)})
    monkeypatch.setattr(common, '_utcnow',
                        lambda: dt.datetime(2023, 11, 1, 5, 0, tzinfo=dt.timezone.utc))
    monkeypatch.setattr(sys, 'argv', ['desi_spacewatch_transfer', '-s', site.hostport,
                                      str(tmp_path)])
    assert spacewatch.main() == 0
    assert files_in(tmp_path) == ['2023/10/30/20231030_235805.jpg',
                                  '2023/10/31/20231031_000005.jpg']


def test_command_disk_full(http_site, tmp_path):
    """Writing fails (here: a file size limit): the command says so, stops,
    exits non-zero and leaves no partial file."""
    site = http_site()
    site.day(DAY, {n: jpeg(i, size=5000) for i, n in enumerate(NAMES)})

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    p = command('-s', site.hostport, '-D', DAY, str(tmp_path), preexec_fn=limit)
    assert p.returncode == 1, p.stdout + p.stderr
    assert 'Could not write' in p.stdout and 'The 3 remaining images' in p.stdout
    assert files_in(tmp_path) == []
    assert os.path.isdir(tmp_path / '2023' / '10' / '31')
