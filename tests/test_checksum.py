# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of desitransfer.checksum against exposures of the simulated mountain."""
import hashlib
import os
import subprocess
import sys
import threading

import pytest

from desitransfer import checksum
from desitransfer.checksum import sha256_file, verify_checksum
from desitransfer.simulator import exposure_files, make_exposure

NIGHT, EXPID = '20240315', '00012345'
CHECKSUM = f'checksum-{EXPID}.sha256sum'


class Exposure:
    """An exposure directory made by :func:`make_exposure` and its checksum file."""

    def __init__(self, root, files=None):
        self.files = files if files is not None else exposure_files(EXPID)
        self.directory = make_exposure(str(root / 'data'), str(root / 'dts'), NIGHT, EXPID,
                                       files=self.files)
        self.checksum = os.path.join(self.directory, CHECKSUM)

    def path(self, name):
        return os.path.join(self.directory, name)

    def lines(self, mode=' '):
        """Lines of a correct checksum file, without end of line."""
        return [f'{hashlib.sha256(data).hexdigest()} {mode}{name}'
                for name, data in sorted(self.files.items())]

    def write(self, text):
        with open(self.checksum, 'wb') as f:
            f.write(text.encode() if isinstance(text, str) else text)

    def verify(self):
        return verify_checksum(self.checksum)


@pytest.fixture
def exposure(tmp_path):
    return Exposure(tmp_path)


def digest_of(data):
    return hashlib.sha256(data).hexdigest()


def problems(message):
    """The lines of an error message, asserting there is at least one."""
    assert message, 'an error was expected'
    return message.split('\n')


def test_good_exposure(exposure):
    assert len(exposure.files) == 3
    assert exposure.verify() == ''


def test_good_exposure_through_link(exposure, tmp_path):
    """The transfer area links to the exposure; verifying through the link works."""
    link = tmp_path / 'dts' / NIGHT / EXPID
    assert link.is_symlink()
    assert verify_checksum(str(link / CHECKSUM)) == ''


def test_checksum_written_by_sha256sum(exposure):
    """Files written by sha256sum itself, text and binary mode, are accepted."""
    for option in ('--text', '--binary'):
        out = subprocess.run(['sha256sum', option] + sorted(exposure.files),
                             cwd=exposure.directory, capture_output=True, check=True)
        exposure.write(out.stdout)
        assert exposure.verify() == '', option


def test_escaped_name_written_by_sha256sum(tmp_path):
    files = {'back\\slash.fits': b'a' * 100, 'new\nline.fits': b'b' * 100}
    exposure = Exposure(tmp_path, files=files)
    out = subprocess.run(['sha256sum'] + sorted(files), cwd=exposure.directory,
                         capture_output=True, check=True)
    assert out.stdout.startswith(b'\\')
    exposure.write(out.stdout)
    assert exposure.verify() == ''
    os.remove(exposure.path('new\nline.fits'))
    assert problems(exposure.verify()) == ["'new\\nline.fits': missing (listed in the "
                                           "checksum file)."]


def test_mismatched_digest(exposure):
    name = f'guide-{EXPID}.fits.fz'
    with open(exposure.path(name), 'r+b') as f:
        f.write(b'X')
    [problem] = problems(exposure.verify())
    assert problem.startswith(f'{name}: checksum mismatch')
    assert digest_of(exposure.files[name]) in problem


def test_missing_file(exposure):
    name = f'request-{EXPID}.json'
    os.remove(exposure.path(name))
    assert problems(exposure.verify()) == [f'{name}: missing (listed in the checksum file).']


def test_extra_file(exposure):
    with open(exposure.path('stray.log'), 'w') as f:
        f.write('hello\n')
    assert problems(exposure.verify()) == ['stray.log: extra entry (a file), not listed '
                                           'in the checksum file.']


def test_several_problems_one_per_line(exposure):
    os.remove(exposure.path(f'desi-{EXPID}.fits.fz'))
    with open(exposure.path(f'guide-{EXPID}.fits.fz'), 'ab') as f:
        f.write(b'more')
    os.mkdir(exposure.path('spare'))
    found = problems(exposure.verify())
    assert len(found) == 3
    assert found[0].startswith(f'desi-{EXPID}.fits.fz: missing')
    assert found[1].startswith(f'guide-{EXPID}.fits.fz: checksum mismatch')
    assert found[2].startswith('spare: extra entry (a directory)')


def test_binary_mode(exposure):
    exposure.write('\n'.join(exposure.lines(mode='*')) + '\n')
    assert exposure.verify() == ''


def test_crlf_blank_lines_and_upper_case(exposure):
    lines = exposure.lines()
    lines[0] = lines[0].upper().replace(f'DESI-{EXPID}.FITS.FZ', f'desi-{EXPID}.fits.fz')
    exposure.write('\r\n' + '\r\n\r\n'.join(lines) + '\r\n  \r\n')
    assert exposure.verify() == ''


def test_no_final_newline(exposure):
    exposure.write('\n'.join(exposure.lines()))
    assert exposure.verify() == ''


def test_sets_of_names_not_line_counts(exposure):
    """A repeated identical line and a ./name spelling are the same file."""
    lines = exposure.lines()
    lines += [lines[0], lines[1].replace('  ', '  ./')]
    exposure.write('\n'.join(lines) + '\n')
    assert exposure.verify() == ''
    os.remove(exposure.path(f'desi-{EXPID}.fits.fz'))
    assert problems(exposure.verify()) == [f'desi-{EXPID}.fits.fz: missing (listed in '
                                           'the checksum file).']


@pytest.mark.parametrize('text', ['', '\n\n', ' \r\n'])
def test_empty_checksum_file(exposure, text):
    exposure.write(text)
    assert exposure.verify() == f'Checksum file {exposure.checksum} is empty.'


def test_missing_checksum_file(tmp_path):
    missing = str(tmp_path / CHECKSUM)
    assert verify_checksum(missing) == (f'Could not read checksum file {missing}: '
                                        'No such file or directory.')


def test_checksum_file_not_regular(exposure):
    assert verify_checksum(exposure.directory).endswith('not a regular file but a directory.')


def test_checksum_file_too_large(exposure, monkeypatch):
    monkeypatch.setattr(checksum, 'MAX_CHECKSUM_FILE_SIZE', 100)
    assert exposure.verify().endswith('larger than 100 bytes.')


def test_unreadable_file(unprivileged):
    """Run as an unprivileged user (root reads any file)."""
    import pathlib
    root = pathlib.Path(unprivileged.directory())
    exposure = Exposure(root)
    name = f'guide-{EXPID}.fits.fz'
    for top, dirs, files in os.walk(root):
        os.chmod(top, 0o755)
        for f in files:
            os.chmod(os.path.join(top, f), 0o644)
    os.chmod(exposure.path(name), 0)
    p = unprivileged.run('import sys; from desitransfer.checksum import verify_checksum; '
                         f'sys.stdout.write(verify_checksum({exposure.checksum!r}))')
    assert p.returncode == 0, p.stderr
    assert problems(p.stdout) == [f'{name}: could not be read: Permission denied.']


def test_absolute_path_never_read(exposure, tmp_path):
    """An absolute name is refused even when its digest is right."""
    outside = tmp_path / 'secret'
    outside.write_bytes(b'secret')
    exposure.write('\n'.join(exposure.lines() + [f'{digest_of(b"secret")}  {outside}']))
    assert problems(exposure.verify()) == [f'Line 4 of {CHECKSUM}: {outside} is an absolute '
                                           'path; not read.']


@pytest.mark.parametrize('name', ['../../secret', 'sub/../../../secret', '..'])
def test_dotdot_escape(exposure, tmp_path, name):
    (tmp_path / 'data' / 'secret').write_bytes(b'secret')
    exposure.write('\n'.join(exposure.lines() + [f'{digest_of(b"secret")}  {name}']))
    [problem] = problems(exposure.verify())
    assert problem.startswith(f'Line 4 of {CHECKSUM}: {name} has a \'..\' component')


def test_symlink_outside(exposure, tmp_path):
    """A link leading out of the exposure is refused even when its digest is right."""
    outside = tmp_path / 'secret'
    outside.write_bytes(b'secret')
    os.symlink(outside, exposure.path('link.fits'))
    exposure.write('\n'.join(exposure.lines() + [f'{digest_of(b"secret")}  link.fits']))
    assert problems(exposure.verify()) == [f'link.fits: resolves to {outside}, outside the '
                                           'exposure directory; not read.']


def test_symlink_directory_outside(exposure, tmp_path):
    (tmp_path / 'elsewhere').mkdir()
    (tmp_path / 'elsewhere' / 'secret').write_bytes(b'secret')
    os.symlink(tmp_path / 'elsewhere', exposure.path('sub'))
    exposure.write('\n'.join(exposure.lines() + [f'{digest_of(b"secret")}  sub/secret']))
    [problem] = problems(exposure.verify())
    assert problem.startswith('sub/secret: resolves to ')
    assert 'outside the exposure directory' in problem


def test_symlink_inside_and_unlisted_link(exposure):
    """A listed link to a file of the exposure is read; an unlisted link is extra."""
    name = f'request-{EXPID}.json'
    os.symlink(name, exposure.path('alias.json'))
    os.symlink(name, exposure.path('unlisted.json'))
    exposure.write('\n'.join(exposure.lines() +
                             [f'{digest_of(exposure.files[name])}  alias.json']))
    assert problems(exposure.verify()) == ['unlisted.json: extra entry (a symbolic link), '
                                           'not listed in the checksum file.']


def run_with_timeout(function, *args, timeout=10):
    """Run `function` in a thread; fail instead of hanging, re-raise its exception."""
    outcome = {}

    def target():
        try:
            outcome['result'] = function(*args)
        except Exception as err:
            outcome['error'] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f'{function.__name__} blocked for {timeout} s'
    if 'error' in outcome:
        raise outcome['error']
    return outcome['result']


def test_fifo_listed_does_not_block(exposure):
    os.mkfifo(exposure.path('pipe.fits'))
    exposure.write('\n'.join(exposure.lines() + ['0' * 64 + '  pipe.fits']))
    message = run_with_timeout(exposure.verify)
    assert problems(message) == ['pipe.fits: not a regular file but a FIFO; not read.']


def test_fifo_unlisted_and_fifo_checksum_file(exposure):
    os.mkfifo(exposure.path('pipe'))
    assert problems(run_with_timeout(exposure.verify)) == [
        'pipe: extra entry (a FIFO), not listed in the checksum file.']
    message = run_with_timeout(verify_checksum, exposure.path('pipe'))
    assert message.endswith('pipe: not a regular file but a FIFO.')


def test_sha256_file_refuses_fifo(tmp_path):
    """The file is checked again once open, in case it was replaced: a FIFO is never read."""
    os.mkfifo(tmp_path / 'pipe')
    with pytest.raises(OSError, match='not a regular file but a FIFO'):
        run_with_timeout(sha256_file, str(tmp_path / 'pipe'))


def test_directory_listed(exposure):
    os.mkdir(exposure.path('calib'))
    exposure.write('\n'.join(exposure.lines() + ['0' * 64 + '  calib']))
    assert problems(exposure.verify()) == ['calib: not a regular file but a directory; '
                                           'not read.']


def test_subdirectories(exposure):
    """Names in subdirectories are allowed; unlisted subdirectories and files are extra."""
    os.makedirs(exposure.path('sub/deeper'))
    os.makedirs(exposure.path('sub/unlisted'))
    os.makedirs(exposure.path('empty'))
    for name in ('sub/deeper/a.fits', 'sub/unlisted/b.fits', 'sub/c.fits'):
        with open(exposure.path(name), 'wb') as f:
            f.write(name.encode())
    exposure.write('\n'.join(exposure.lines() +
                             [f'{digest_of(b"sub/deeper/a.fits")}  sub/deeper/a.fits']))
    assert problems(exposure.verify()) == [
        'empty: extra entry (a directory), not listed in the checksum file.',
        'sub/c.fits: extra entry (a file), not listed in the checksum file.',
        'sub/unlisted: extra entry (a directory), not listed in the checksum file.']


@pytest.mark.parametrize('digest, expected', [
    ('z' * 64, "is not hexadecimal"),
    ('0' * 63, '63 hexadecimal digits instead of 64'),
    ('0' * 65, '65 hexadecimal digits instead of 64')])
def test_invalid_digest(exposure, digest, expected):
    """The file is reported for its digest only, not also as an extra file."""
    lines = exposure.lines()
    name = lines[1].split('  ')[1]
    lines[1] = f'{digest}  {name}'
    exposure.write('\n'.join(lines))
    [problem] = problems(exposure.verify())
    assert problem.startswith(f'Line 2 of {CHECKSUM}: invalid digest for {name}, ')
    assert expected in problem


@pytest.mark.parametrize('line', ['garbage', '0' * 64 + ' one-space.fits',
                                  '0' * 64 + '  ', 'SHA256 (a.fits) = ' + '0' * 64,
                                  '\\' + '0' * 64 + '  bad\\escape'])
def test_malformed_line(exposure, line):
    exposure.write('\n'.join(exposure.lines() + [line]))
    [problem] = problems(exposure.verify())
    assert problem.startswith(f'Line 4 of {CHECKSUM}: ')
    assert 'malformed line' in problem or 'invalid escape' in problem


def test_duplicate_names_conflicting(exposure):
    lines = exposure.lines()
    name = f'desi-{EXPID}.fits.fz'
    exposure.write('\n'.join(lines + ['f' * 64 + f'  {name}']))
    assert problems(exposure.verify()) == [
        f'Line 4 of {CHECKSUM}: {name} is listed again with a different digest '
        '(first on line 1); not verified.']


def test_chunked_hashing(tmp_path):
    """A file of a few MB, not a multiple of the chunk size, read in many chunks."""
    data = os.urandom(3 * checksum.CHUNK_SIZE + 12345)
    exposure = Exposure(tmp_path, files={'big.fits': data, 'small.json': b'{}'})
    assert exposure.verify() == ''
    assert sha256_file(exposure.path('big.fits'), chunk_size=4096) == digest_of(data)
    with open(exposure.path('big.fits'), 'r+b') as f:
        f.seek(len(data) - 1)
        f.write(bytes([data[-1] ^ 1]))
    [problem] = problems(exposure.verify())
    assert problem.startswith('big.fits: checksum mismatch')


def test_fresh_interpreter_without_logging_setup(exposure):
    code = ('import sys; from desitransfer.checksum import verify_checksum; '
            'print(repr(verify_checksum(sys.argv[1])))')
    good = subprocess.run([sys.executable, '-c', code, exposure.checksum],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert good.stdout == "''\n"
    os.remove(exposure.path(f'guide-{EXPID}.fits.fz'))
    bad = subprocess.run([sys.executable, '-c', code, exposure.checksum],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 0, bad.stderr
    assert f'guide-{EXPID}.fits.fz: missing' in bad.stdout
    assert bad.stderr == ''


def test_threaded_and_inline_hashing_agree(tmp_path, monkeypatch):
    """Exposures above SMALL_EXPOSURE are hashed by several threads; same verdicts."""
    from desitransfer import checksum
    files = exposure_files('00000042', nfiles=6, size=300_000)
    directory = make_exposure(str(tmp_path / 'data'), str(tmp_path / 'dts'), '20201231',
                              '00000042', files=files)
    with open(os.path.join(directory, sorted(files)[2]), 'r+b') as f:
        f.write(b'changed')
    cfile = os.path.join(directory, 'checksum-00000042.sha256sum')
    inline = checksum.verify_checksum(cfile)
    monkeypatch.setattr(checksum, 'SMALL_EXPOSURE', 0)
    assert checksum.verify_checksum(cfile) == inline
    assert sorted(files)[2] in inline and inline.count('\n') == 0
