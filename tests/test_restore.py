# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of desi_transfer_restore (:mod:`desitransfer.restore`): nights
archived by the real daemon restored from the HPSS emulator, night tarballs,
the lost+found area; and extraction by the htar emulator.
"""
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import time

import pytest

from desitransfer import restore as restore_module
from desitransfer.simulator import checksum_text, exposure_files, make_exposure
from fixtures_daemon import EARLIER, LAST, copy_site, snapshot
from helpers import mode

#: The thin script of the command, run as an operator runs it.
RESTORE = [sys.executable, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'bin', 'desi_transfer_restore')]

ARCHIVE = 'desi/spectro/data/desi_spectro_data_{}.tar'.format


def expid(night, j):
    return f'{int(night[-2:]) * 10 + j:08d}'


def restore(site, *args):
    """Run desi_transfer_restore with the site's configuration; exit status, output."""
    command, env = site.command()
    p = subprocess.run(RESTORE + ['-c', site.config] + list(args), env=env,
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr


def table(out):
    """``{(night, expid): outcome}`` from the summary table."""
    rows = {}
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('NIGHT     EXPID'))
    for line in lines[start + 1:]:
        if line[:8].isdigit():
            rows[(line[:8], line[10:18].strip())] = re.split(r'\s{2,}', line[20:])[0]
    return rows


def unlock(path):
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o2750)


def remove(path):
    """Remove an installed (locked) exposure or night, as a disk loss would;
    the directory holding it keeps its mode."""
    parent = mode(os.path.dirname(path))
    os.chmod(os.path.dirname(path), 0o2750)
    unlock(path)
    shutil.rmtree(path)
    os.chmod(os.path.dirname(path), parent)


def assert_exposure(site, night, e, dir_mode):
    files = exposure_files(e)
    path = site.dest(night, e)
    assert sorted(os.listdir(path)) == sorted(list(files) + [f'checksum-{e}.sha256sum'])
    for name, data in files.items():
        with open(os.path.join(path, name), 'rb') as f:
            assert f.read() == data
        assert mode(os.path.join(path, name)) == 0o440
    assert mode(os.path.join(path, f'checksum-{e}.sha256sum')) == 0o440
    assert mode(path) == dir_mode


def work_directories(site):
    return [n for n in os.listdir(site.staging) if n.startswith('.desi_transfer_restore')]


def _archived(site):
    """Two finished nights of three exposures, transferred, verified and
    archived by the daemon."""
    for night in (EARLIER, LAST):
        for j in range(3):
            site.exposure(night, expid(night, j))
    site.write_config(catchup='14', backup='20')
    assert site.run() == 0
    assert len(site.htar_calls()) == 2
    assert mode(site.dest(LAST)) == 0o2550
    return site


@pytest.fixture
def archived(site, site_templates):
    """A copy of the site that :func:`_archived` built once for this module."""
    return copy_site(site_templates(_archived), site)


#
# From tape.
#
def test_lost_exposure_restored_from_tape(archived):
    """One exposure lost: only it is extracted (htar member selection),
    verified, locked as in an archived night and installed; nothing else moves."""
    site = archived
    lost = expid(LAST, 1)
    remove(site.dest(LAST, lost))
    rows = site.status_rows()
    before = snapshot(site.destination)
    code, out = restore(site, LAST)
    assert code == 0, out
    assert table(out) == {(LAST, expid(LAST, 0)): 'already there, not compared',
                          (LAST, lost): 'installed',
                          (LAST, expid(LAST, 2)): 'already there, not compared'}
    assert f'Night {LAST} from tape (desi/spectro/data) into {site.dest(LAST)}: ' in out
    assert_exposure(site, LAST, lost, 0o2550)
    assert mode(site.dest(LAST)) == 0o2550
    after = snapshot(site.destination)
    new = {p for p in after if p.startswith(site.dest(LAST, lost))}
    assert {p: v for p, v in after.items() if p not in new and p != site.dest(LAST)} == \
        {p: v for p, v in before.items() if p != site.dest(LAST)}
    assert site.hpss.calls()[-1] == ['htar', '-xvf', ARCHIVE(LAST), f'{LAST}/{lost}']
    assert work_directories(site) == []
    assert site.status_rows() == rows  # tape restores record nothing


def test_whole_night_restored_from_tape(archived):
    site = archived
    remove(site.dest(LAST))
    code, out = restore(site, LAST)
    assert code == 0, out
    assert set(table(out).values()) == {'installed'}
    for j in range(3):
        assert_exposure(site, LAST, expid(LAST, j), 0o2550)
    assert mode(site.dest(LAST)) == 0o2550
    assert site.hpss.calls()[-1] == ['htar', '-xvf', ARCHIVE(LAST)]  # the whole archive


def test_compare_never_overwrites(archived):
    """--compare extracts what is there too: a difference is reported, the
    destination kept, the tape's copy left for inspection."""
    site = archived
    changed = site.dest(LAST, expid(LAST, 2), f'desi-{expid(LAST, 2)}.fits.fz')
    os.chmod(changed, 0o640)
    with open(changed, 'r+b') as f:
        f.write(b'changed on disk')
    os.chmod(changed, 0o440)
    before = snapshot(site.destination)
    code, out = restore(site, '--compare', LAST)
    assert code == 1
    outcomes = table(out)
    assert outcomes[(LAST, expid(LAST, 0))] == 'already there'
    assert outcomes[(LAST, expid(LAST, 2))] == 'differs'
    assert f'desi-{expid(LAST, 2)}.fits.fz: other contents (sha256)' in out
    assert snapshot(site.destination) == before
    [work] = work_directories(site)
    assert os.listdir(os.path.join(site.staging, work, LAST)) == [expid(LAST, 2)]
    assert 'Kept for inspection in' in out


def test_test_mode_changes_nothing(archived):
    site = archived
    remove(site.dest(LAST, expid(LAST, 1)))
    before = snapshot(site.top, skip={str(site.hpss.log)})
    code, out = restore(site, '-t', LAST)
    assert code == 0, out
    assert table(out)[(LAST, expid(LAST, 1))] == 'would install'
    assert f"Test mode, would run: {site.hpss.bin}/htar -xvf {ARCHIVE(LAST)} " \
           f"{LAST}/{expid(LAST, 1)}" in out
    assert out.splitlines()[-1] == 'Test mode: nothing was changed.'
    assert snapshot(site.top, skip={str(site.hpss.log)}) == before
    assert not [c for c in site.hpss.calls() if c[1].startswith('-x')]


def test_one_exposure_asked(archived):
    site = archived
    remove(site.dest(LAST))
    code, out = restore(site, LAST, '-e', expid(LAST, 2), '-e', '00009999')
    assert code == 1  # 00009999 is not in the archive
    assert table(out) == {(LAST, expid(LAST, 2)): 'installed', (LAST, '00009999'): 'failed'}
    assert os.listdir(site.dest(LAST)) == [expid(LAST, 2)]


def test_not_on_tape_or_unknown(archived):
    """A night not archived, and hsi failing: nothing is extracted, and an
    unknown answer is not taken for "not on tape"."""
    site = archived
    code, out = restore(site, '20261117')
    assert code == 1
    assert 'desi_spectro_data_20261117.tar and desi_spectro_data_20261117.tar.idx not in the ' \
           'HPSS directory desi/spectro/data: the night is not on tape' in out
    site.hpss.fail('hsi')
    code, out = restore(site, LAST)
    assert code == 1
    assert 'the HPSS directory desi/spectro/data could not be listed; nothing restored: try ' \
           'again later' in out
    assert not [c for c in site.hpss.calls() if c[0] == 'htar' and c[1].startswith('-x')]


def test_failed_extraction_installs_nothing(archived):
    """htar fails half way through: what it wrote is removed, nothing installed."""
    site = archived
    site.hpss_wrapper('flaky', 'htar', 'case "$1" in -x*) export HPSS_EMULATOR_FAIL=htar;; '
                      f'esac; exec {site.hpss.bin}/htar "$@"')
    remove(site.dest(LAST))
    code, out = restore(site, LAST)
    assert code == 1
    assert f'htar could not extract {ARCHIVE(LAST)} (exit status 72); nothing installed' in out
    assert not os.path.exists(site.dest(LAST))
    assert work_directories(site) == []


#
# From tarballs.
#
def make_tarball(directory, night, exposures, corrupt=None, extra=()):
    """NIGHT.tar of `exposures` and NIGHT.sha256sum beside it; a file of
    `corrupt` is changed after its checksum file is written."""
    tree = os.path.join(directory, 'tree')
    for e in exposures:
        path = make_exposure(tree, None, night, e, link=False)
        if e == corrupt:
            with open(os.path.join(path, f'desi-{e}.fits.fz'), 'r+b') as f:
                f.write(b'bit rot')
    tarball = os.path.join(directory, f'{night}.tar')
    with tarfile.open(tarball, 'w') as tar:
        tar.add(os.path.join(tree, night), arcname=night)
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shutil.rmtree(tree)
    with open(tarball, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(directory, f'{night}.sha256sum'), 'w') as f:
        f.write(f'{digest}  {night}.tar\n')
    return tarball


def test_tarballs(site, tmp_path):
    """Every night found beside its .sha256sum: verified, unpacked, exposures
    verified and installed (new night 0o2750), rsync and checksum recorded; an
    exposure already there is compared; the tarballs are kept."""
    tarballs = tmp_path / 'tarballs'
    tarballs.mkdir()
    exposures = [expid(LAST, j) for j in range(3)]
    make_tarball(str(tarballs), LAST, exposures)
    make_tarball(str(tarballs), EARLIER, [expid(EARLIER, 0)])
    os.makedirs(site.dest(LAST))
    make_exposure(site.destination, None, LAST, exposures[0], link=False)
    os.makedirs(site.status_dir)
    before = snapshot(site.top)
    code, out = restore(site, '-t', '--tarball', str(tarballs))
    assert code == 0, out
    assert table(out) == {(EARLIER, expid(EARLIER, 0)): 'would install',
                          (LAST, exposures[0]): 'already there, not compared',
                          (LAST, exposures[1]): 'would install',
                          (LAST, exposures[2]): 'would install'}
    assert snapshot(site.top) == before
    code, out = restore(site, '--tarball', str(tarballs))
    assert code == 0, out
    assert table(out) == {(EARLIER, expid(EARLIER, 0)): 'installed',
                          (LAST, exposures[0]): 'already there',
                          (LAST, exposures[1]): 'installed', (LAST, exposures[2]): 'installed'}
    for e in exposures[1:]:
        assert_exposure(site, LAST, e, 0o2750)
    assert mode(site.dest(EARLIER)) == 0o2750
    rows = site.status_rows()
    assert rows[(LAST, int(exposures[1]))] == {0: 1, 1: 1}
    assert (LAST, int(exposures[0])) not in rows
    assert sorted(os.listdir(tarballs)) == sorted([f'{n}.{x}' for n in (EARLIER, LAST)
                                                   for x in ('tar', 'sha256sum')])
    assert work_directories(site) == []


def test_tarball_checksum_and_corrupt_exposure(site, tmp_path):
    tarballs = tmp_path / 'tarballs'
    tarballs.mkdir()
    exposures = [expid(LAST, j) for j in range(2)]
    tarball = make_tarball(str(tarballs), LAST, exposures, corrupt=exposures[1])
    with open(tarball, 'ab') as f:
        f.write(b'\0' * 512)
    code, out = restore(site, '--no-status', '--tarball', str(tarballs), LAST)
    assert code == 1
    assert f'checksum failure when verifying {tarball}' in out and 'not unpacked' in out
    assert os.listdir(site.destination) == []
    code, out = restore(site, '--no-status', '--tarball', str(tarballs), '-I', LAST)
    assert code == 1
    assert table(out) == {(LAST, exposures[0]): 'installed', (LAST, exposures[1]): 'not verified'}
    assert f'desi-{exposures[1]}.fits.fz: checksum mismatch' in out
    assert os.listdir(site.dest(LAST)) == [exposures[0]]
    [work] = work_directories(site)
    shutil.rmtree(os.path.join(site.staging, work))
    code, out = restore(site, '--no-status', '--tarball', str(tarballs), '-I',
                        '--install-unverified', LAST)
    assert code == 1
    assert table(out) == {(LAST, exposures[0]): 'already there',
                          (LAST, exposures[1]): 'installed, not verified'}
    assert sorted(os.listdir(site.dest(LAST))) == exposures


def test_hostile_tarball(site, tmp_path):
    """Members outside NIGHT/, escaping with .., or links are refused."""
    tarballs = tmp_path / 'tarballs'
    tarballs.mkdir()
    make_tarball(str(tarballs), LAST, [expid(LAST, 0)],
                 extra=[('../escaped', b'x'), ('20991231/other', b'x')])
    code, out = restore(site, '--no-status', '--tarball', str(tarballs))
    assert code == 1
    assert "member '../escaped' would leave the directory it is unpacked in" in out
    assert "member '20991231/other' is not under" in out
    assert not (tmp_path / 'escaped').exists()
    assert not os.path.exists(os.path.join(site.staging, 'escaped'))
    assert table(out)[(LAST, expid(LAST, 0))] == 'installed'


#
# From the lost+found area.
#
@pytest.fixture
def lost_found(site):
    """lost+found beside the staging directory, holding a complete exposure,
    one without its checksum file, one without a desi- file, and one already
    in the destination."""
    site.lost_found = os.path.join(os.path.dirname(site.staging), 'lost+found')
    e = [expid(LAST, j) for j in range(4)]
    for j in range(4):
        files = {f'guide-{e[j]}.fits.fz': b'guide'} if j == 2 else None
        make_exposure(site.lost_found, None, LAST, e[j], link=False, checksum=j != 1,
                      files=files)
    with open(os.path.join(site.lost_found, 'README.html'), 'w') as f:
        f.write('lost+found\n')
    make_exposure(site.destination, None, LAST, e[3], link=False)
    os.chmod(site.dest(LAST), 0o2750)
    os.makedirs(site.status_dir)
    site.e = e
    return site


def test_lost_found(lost_found):
    site, e = lost_found, lost_found.e
    before = snapshot(site.top)
    code, out = restore(site, '-t', '--lost-found', '--create-checksum')
    assert code == 0, out
    assert table(out) == {(LAST, e[0]): 'would install', (LAST, e[1]): 'would install',
                          (LAST, e[3]): 'already there'}
    assert snapshot(site.top) == before
    code, out = restore(site, '--lost-found')
    assert code == 1  # one exposure has no checksum file
    assert table(out) == {(LAST, e[0]): 'installed', (LAST, e[1]): 'no checksum file',
                          (LAST, e[3]): 'already there'}
    assert_exposure(site, LAST, e[0], 0o2750)
    assert mode(site.dest(LAST)) == 0o2750
    assert not os.path.exists(os.path.join(site.lost_found, LAST, e[0]))  # moved
    assert os.path.isdir(os.path.join(site.lost_found, LAST, e[2]))  # not an exposure to recover
    assert site.status_rows()[(LAST, int(e[0]))] == {0: 1, 1: 1}
    code, out = restore(site, '--lost-found', '--create-checksum', LAST)
    assert code == 0, out
    assert table(out)[(LAST, e[1])] == 'installed'
    assert_exposure(site, LAST, e[1], 0o2750)
    with open(site.dest(LAST, e[1], f'checksum-{e[1]}.sha256sum')) as f:
        assert f.read() == checksum_text(exposure_files(e[1]))


def test_lost_found_archived_again(lost_found):
    """--archive: the night is archived again with the exposures recovered,
    and their backup recorded; never when that would lose an archived exposure."""
    site, e = lost_found, lost_found.e
    code, out = restore(site, '--lost-found', '--create-checksum', '--archive')
    assert code == 0, out
    assert site.htar_calls()[-1] == ['htar', '-cvhf', ARCHIVE(LAST), '-H', 'crc:verify=all', LAST]
    members = site.hpss.members(ARCHIVE(LAST))
    assert {f'{LAST}/{x}' for x in (e[0], e[1], e[3])} <= set(members)
    rows = site.status_rows()
    assert rows[(LAST, int(e[0]))] == rows[(LAST, int(e[1]))] == {0: 1, 1: 1, 2: 1}
    assert mode(site.dest(LAST)) == mode(site.dest(LAST, e[0])) == 0o2550
    # An exposure archived but lost from disk: archiving again would lose it.
    remove(site.dest(LAST, e[3]))
    shutil.rmtree(os.path.join(site.lost_found, LAST, e[3]))
    make_exposure(site.lost_found, None, LAST, '00000999', link=False)
    calls = len(site.htar_calls())
    code, out = restore(site, '--lost-found', '--archive')
    assert code == 1, out
    assert f'holds exposures not in {site.dest(LAST)} ({LAST}/{e[3]}): archiving the night ' \
           'again would lose them' in out
    assert len(site.htar_calls()) == calls
    assert_exposure(site, LAST, '00000999', 0o2550)  # installed in the archived night


@pytest.mark.parametrize('args,message', [
    ([], 'restoring from tape needs at least one NIGHT'),
    (['20261332'], "'20261332' is not a night"),
    (['--tarball', '/x', '--lost-found'], '--tarball and --lost-found are two sources'),
    ([LAST, EARLIER, '-e', '00000191'], '--exposure needs exactly one NIGHT'),
    ([LAST, '-e', '191'], "'191' is not an exposure number"),
    ([LAST, '--archive'], '--archive is for tarballs and lost+found'),
    (['--lost-found', '--file-type', '../x'], "'../x' is not a file type"),
    ([LAST, '--create-checksum'], '--create-checksum, --file-type and --extension go with'),
    ([LAST, '--destination', '/nonexistent'], 'the destination directory /nonexistent does '
                                              'not exist'),
    (['--tarball', '/nonexistent'], 'the tarball directory /nonexistent does not exist'),
])
def test_bad_input(site, args, message):
    before = snapshot(site.top)
    code, out = restore(site, *args)
    assert code == 2
    assert message in out and out.count('error:') == 1
    assert snapshot(site.top) == before


#
# The htar emulator's extraction.
#
@pytest.fixture
def archive(hpss, tmp_path):
    """An archive made by the htar emulator of one night with two exposures."""
    top = tmp_path / 'disk'
    for e in ('00000001', '00000002'):
        make_exposure(str(top), None, LAST, e, link=False)
        os.chmod(top / LAST / e, 0o2550)
        for f in (top / LAST / e).iterdir():
            f.chmod(0o440)
    past = time.time() - 86400
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (past, past))
    p = subprocess.run([hpss.htar, '-cvhf', 'a.tar', '-H', 'crc:verify=all', LAST], cwd=top,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = tmp_path / 'out'
    out.mkdir()
    return out, past


def htar(hpss, *args, cwd):
    p = subprocess.run([hpss.htar] + list(args), cwd=cwd, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def test_htar_extracts(hpss, archive):
    out, past = archive
    code, stdout, _ = htar(hpss, '-xvf', 'a.tar', f'{LAST}/00000002', cwd=out)
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0] == f'HTAR: x {LAST}/00000002/, 0 bytes, 1 media blocks'
    assert f'HTAR: x {LAST}/00000002/desi-00000002.fits.fz, 2048 bytes, 5 media blocks' in lines
    assert lines[-2].startswith('HTAR: Extract complete for /home/d/desi/a.tar, 5 files.')
    assert lines[-1] == 'HTAR: HTAR SUCCESSFUL'
    assert os.listdir(out / LAST) == ['00000002']
    got = out / LAST / '00000002' / 'desi-00000002.fits.fz'
    assert got.read_bytes() == exposure_files('00000002')['desi-00000002.fits.fz']
    assert abs(got.stat().st_mtime - past) < 1 and mode(got) == 0o440 & ~current_umask()
    assert stat.S_IMODE(os.stat(out / LAST / '00000002').st_mode) == 0o2550 & ~current_umask()
    # -m: the time of extraction; -p: the modes of the archive.
    code, _, _ = htar(hpss, '-x', '-m', '-p', '-f', 'a.tar', cwd=out)
    assert code == 0
    got = out / LAST / '00000001' / 'desi-00000001.fits.fz'
    assert abs(got.stat().st_mtime - time.time()) < 60 and mode(got) == 0o440


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_htar_extraction_errors(hpss, archive):
    out, _ = archive
    code, _, stderr = htar(hpss, '-xvf', 'a.tar', f'{LAST}/00000009', cwd=out)
    assert code == 72 and stderr.splitlines()[-1] == 'HTAR: HTAR FAILED'
    assert f'No match for file or directory {LAST}/00000009' in stderr
    assert os.listdir(out) == []
    code, _, stderr = htar(hpss, '-xf', 'missing.tar', cwd=out)
    assert code == 72 and 'Unable to open archive or index file' in stderr
    # A member whose data changed on tape fails its CRC.
    index = json.loads(hpss.path('a.tar.idx').read_text())
    member = next(m for m in index['members'] if m['name'].endswith('desi-00000001.fits.fz'))
    with open(hpss.path('a.tar'), 'r+b') as f:
        f.seek(member['offset'] + 512)
        f.write(b'X')
    code, _, stderr = htar(hpss, '-xf', 'a.tar', f'{LAST}/00000001', cwd=out)
    assert code == 72
    assert f'CRC mismatch for {LAST}/00000001/desi-00000001.fits.fz' in stderr


def test_install_across_file_systems(site, monkeypatch):
    """A rename refused across file systems: the copy is made beside its
    final name and renamed in, the source removed."""
    e = expid(LAST, 0)
    lost_found = os.path.join(os.path.dirname(site.staging), 'lost+found')
    source = make_exposure(lost_found, None, LAST, e, link=False)
    options = restore_module._options(['-c', site.config, '--no-status', '--lost-found'])
    restorer = restore_module.Restore(options)
    rename = os.rename
    seen = []

    def cross_device(src, dst):
        seen.append((src, dst))
        if src == source:
            raise OSError(18, 'Invalid cross-device link')
        rename(src, dst)

    monkeypatch.setattr(restore_module.os, 'rename', cross_device)
    restorer.install(source, site.dest(LAST), e)
    assert seen[1] == (site.dest(LAST, f'.{e}.partial'), site.dest(LAST, e))
    monkeypatch.undo()
    assert_exposure(site, LAST, e, 0o2750)
    assert not os.path.exists(source)
    assert os.listdir(site.dest(LAST)) == [e]
