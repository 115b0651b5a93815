# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of ``desi_transfer_status --audit`` (:mod:`desitransfer.audit`) on
sites built by the daemon itself, against the real sshd, rsync and the HPSS
emulator (see ``fixtures_daemon.py``)."""
import json
import os
import shutil
import subprocess
import time

import pytest

from desitransfer import audit as audit_module
from desitransfer import mountain as mountain_module
from desitransfer import tape as tape_module
from desitransfer.audit import Disagreement, audit, format_table
from desitransfer.configuration import DirectoryConfig, read_configuration
from desitransfer.status import TransferStatus
from fixtures_daemon import EARLIER, LAST, copy_site, snapshot

ARCHIVE = 'desi/spectro/data/desi_spectro_data_{}.tar'.format


def expid(night, j):
    return f'{int(night[-2:]) * 10 + j:08d}'


def _archived(site):
    """Two finished nights of three exposures, transferred, verified and
    archived by the daemon: every place agrees."""
    for night in (EARLIER, LAST):
        for j in range(3):
            site.exposure(night, expid(night, j))
    site.write_config(catchup='14', backup='20')
    assert site.run() == 0
    assert len(site.htar_calls()) == 2
    return site


@pytest.fixture
def archived(site, site_templates):
    """A copy of the site that :func:`_archived` built once for this module."""
    return copy_site(site_templates(_archived), site)


def status_command(site, *args, env=None):
    """Run the installed ``desi_transfer_status`` as an operator would."""
    command, environment = site.command()
    environment.update(env or {})
    return subprocess.run(['desi_transfer_status', '-c', site.config] + list(args),
                          env=environment, capture_output=True, text=True, timeout=120)


def kinds(found):
    """``{(night, expid, place)}`` of the disagreements."""
    return {(d.night, d.expid, d.place) for d in found}


def problem(found, night, expid, place):
    """The problems (and what to do) at one place of one exposure, as one string."""
    return ' | '.join(f'{d.problem} => {d.todo}' for d in found
                      if (d.night, d.expid, d.place) == (night, expid, place))


def writable(path):
    os.chmod(path, 0o640 if os.path.isfile(path) else 0o2750)


def test_clean_nights(archived):
    site = archived
    assert audit(site.config, [EARLIER, LAST]) == []
    assert audit(site.config, [EARLIER, LAST], deep=True) == []
    before = snapshot(site.top, skip={str(site.hpss.log)})
    p = status_command(site, '--audit', LAST)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f'[DESI_SPECTRO_DATA] 1 night with exposures in {LAST}: 3 '
                               f'exposures linked at dts, '
                               f'3 at NERSC ({site.destination}), 3 recorded '
                               f'({site.status_dir}), 3 in archives on tape')
    assert lines[-1] == 'No disagreement: the mountain, NERSC, the status and the tape agree.'
    assert p.stderr == ''
    # A year: every night of 2026 so far, one round trip to the mountain.
    calls = site.ssh_wrapper('counting-ssh')
    p = status_command(site, '--audit', '2026', '--deep')
    assert p.returncode == 0, p.stdout + p.stderr
    assert ' 2 nights with exposures from 20260101 to ' in p.stdout
    assert '6 exposures linked' in p.stdout
    assert 'every checksum verified' in p.stdout
    assert len([c for c in calls() if '-O' not in c]) == 1
    after = snapshot(site.top, skip={str(site.hpss.log), site.config, site.top + '/counting-ssh',
                                     site.top + '/counting-ssh.jsonl'})
    assert after == {p: s for p, s in before.items() if p != site.config}


def test_each_kind_of_disagreement(archived):
    site = archived
    status = TransferStatus(site.status_dir, year=2026)
    # A corrupted file: written over in place (bigger, and later than its checksum).
    corrupt = site.dest(EARLIER, expid(EARLIER, 0), f'desi-{expid(EARLIER, 0)}.fits.fz')
    writable(corrupt)
    with open(corrupt, 'ab') as f:
        f.write(b'garbage')
    os.chmod(corrupt, 0o440)
    later = time.time() + 60  # Well after the checksum was recorded.
    os.utime(corrupt, (later, later))
    # A link whose target vanished at the mountain (the copy at NERSC is safe).
    shutil.rmtree(os.path.join(site.data, EARLIER, expid(EARLIER, 1)))
    # A checksum failure recorded for an exposure that verifies.
    status.update(EARLIER, expid(EARLIER, 2), 'checksum', failure=True)
    # Wrong modes.
    os.chmod(site.dest(LAST, expid(LAST, 0)), 0o755)
    # An exposure installed after its night was archived: absent from the index.
    site.exposure(LAST, expid(LAST, 3))
    assert site.run() == 0
    # An exposure removed at NERSC: its rows remain, without data.
    gone = site.dest(LAST, expid(LAST, 1))
    os.chmod(site.dest(LAST), 0o2750)
    os.chmod(gone, 0o2750)
    shutil.rmtree(gone)
    os.chmod(site.dest(LAST), 0o2550)
    # A new exposure, linked at the mountain, not transferred (the daemon is stopped).
    site.exposure(LAST, expid(LAST, 5))
    # Status rows of an exposure that is nowhere.
    status.update_many([(LAST, expid(LAST, 9), 'rsync', False),
                        (LAST, expid(LAST, 9), 'checksum', False)])
    # Data without rows.
    with status._lock(2026):
        data = json.load(open(status._path(2026)))
        del data[LAST][str(int(expid(LAST, 2)))]
        status._write(2026, data)
    # An archive missing its index.
    os.remove(site.hpss.path(ARCHIVE(EARLIER) + '.idx'))

    found = audit(site.config, [EARLIER, LAST])
    print(format_table(found))
    assert all(isinstance(d, Disagreement) for d in found)
    assert kinds(found) == {
        (EARLIER, None, 'tape'), (EARLIER, None, 'status'),
        (EARLIER, expid(EARLIER, 0), 'nersc'),
        (EARLIER, expid(EARLIER, 1), 'mountain'),
        (EARLIER, expid(EARLIER, 2), 'status'),
        (LAST, expid(LAST, 0), 'nersc'),
        (LAST, expid(LAST, 1), 'status'), (LAST, expid(LAST, 1), 'nersc'),
        (LAST, expid(LAST, 2), 'status'),
        (LAST, expid(LAST, 3), 'tape'),
        (LAST, expid(LAST, 5), 'nersc'),
        (LAST, expid(LAST, 9), 'status')}
    archive = os.path.basename(ARCHIVE(EARLIER))
    assert problem(found, EARLIER, None, 'tape').startswith(
        f'{archive} is on tape without {archive}.idx: the archive is incomplete => re-archive: '
        f'move {archive} and its .idx aside on HPSS (hsi mv), then cd {site.destination} && '
        f'htar -cvhf {ARCHIVE(EARLIER)} -H crc:verify=all {EARLIER} && desi_transfer_status '
        f'-d {site.status_dir} {EARLIER} all backup')
    assert problem(found, EARLIER, None, 'status').startswith(
        f'backup recorded for 3 exposure(s) (00000180, 00000181, 00000182) but {archive} is '
        'not on tape => re-archive')
    assert problem(found, EARLIER, '00000180', 'nersc').startswith(
        'modified after its checksum was recorded at ')
    assert 'desi-00000180.fits.fz => re-verify: desi_transfer_status --audit 20261118 --deep' \
        in problem(found, EARLIER, '00000180', 'nersc')
    assert problem(found, EARLIER, '00000181', 'mountain') == (
        'its link is not transferred: its target is not a directory that can be read => '
        'nothing is lost (it is at NERSC); repair or remove the link at the mountain')
    assert problem(found, EARLIER, '00000182', 'status').startswith(
        'checksum recorded as failed at ')
    assert problem(found, EARLIER, '00000182', 'status').endswith(
        f'=> re-verify: desi_transfer_status --audit {EARLIER} --deep, then record by hand: '
        f'desi_transfer_status -d {site.status_dir} {EARLIER} 00000182 checksum; re-transfer if '
        'it does not verify')
    assert problem(found, LAST, '00000190', 'nersc').startswith(
        'modes: directory . not 0o2750 (0o2550 once archived) => fix them')
    assert problem(found, LAST, '00000191', 'status').startswith(
        'recorded (rsync ok at ')
    assert 'but not at NERSC => re-transfer: the daemon then copies it on its next pass' in \
        problem(found, LAST, '00000191', 'status')
    assert problem(found, LAST, '00000191', 'nersc') == (
        f'in the archive {os.path.basename(ARCHIVE(LAST))} but not at NERSC => restore it from '
        f'tape: cd {site.destination} && htar -xvf {ARCHIVE(LAST)} {LAST}/00000191')
    assert problem(found, LAST, '00000192', 'status') == (
        f'at NERSC but not recorded => re-verify: desi_transfer_status --audit {LAST} --deep, '
        f'then record by hand: desi_transfer_status -d {site.status_dir} {LAST} 00000192 rsync '
        f'&& desi_transfer_status -d {site.status_dir} {LAST} 00000192 checksum | in the '
        f'archive {os.path.basename(ARCHIVE(LAST))} but backup not recorded => record by hand: '
        f'desi_transfer_status -d {site.status_dir} {LAST} 00000192 backup')
    assert problem(found, LAST, '00000193', 'tape').startswith(
        f'not in the archive {os.path.basename(ARCHIVE(LAST))} => re-archive')
    assert problem(found, LAST, '00000195', 'nersc').startswith(
        'linked at the mountain since ')
    assert problem(found, LAST, '00000199', 'status').startswith('recorded (rsync ok at ')
    assert problem(found, LAST, '00000199', 'status').endswith(
        'but not at NERSC => find the data (the records say it arrived), or restore it '
        'from tape')

    # Deep: the corrupted file by its checksum; the failure row of a good exposure.
    deep = audit(site.config, [EARLIER, LAST], deep=True)
    assert kinds(deep) == kinds(found)
    assert problem(deep, EARLIER, '00000180', 'nersc').startswith(
        'desi-00000180.fits.fz: checksum mismatch, expected ')
    assert problem(deep, EARLIER, '00000182', 'status') == (
        'checksum recorded as failed at ' + problem(found, EARLIER, '00000182', 'status')
        .split(' at ', 1)[1].split(' => ')[0] + ', but the exposure verifies => record by '
        f'hand: desi_transfer_status -d {site.status_dir} {EARLIER} 00000182 checksum')

    # The command: the table, and exit status 1.
    p = status_command(site, '--audit', LAST)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1] == '8 disagreements.'
    assert f'{LAST}  00000199  status    recorded (rsync ok at ' in p.stdout
    assert 'to do: find the data' in p.stdout


def test_deep_finds_what_the_light_check_cannot(archived):
    """A file changed in place, with the same size and its old time: only
    reading it tells."""
    site = archived
    path = site.dest(LAST, expid(LAST, 1), f'guide-{expid(LAST, 1)}.fits.fz')
    st = os.stat(path)
    writable(path)
    with open(path, 'r+b') as f:
        f.write(b'X' * 10)
    os.chmod(path, 0o440)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert audit(site.config, [LAST]) == []
    found = audit(site.config, [LAST], deep=True)
    assert kinds(found) == {(LAST, expid(LAST, 1), 'nersc')}
    assert found[0].problem.startswith(f'guide-{expid(LAST, 1)}.fits.fz: checksum mismatch')
    assert found[0].todo.startswith('re-transfer: move the installed copy aside')
    assert status_command(site, '--audit', LAST).returncode == 0
    assert status_command(site, '--audit', LAST, '--deep').returncode == 1


def unreachable(site, line):
    """An ssh program that runs `line` instead of connecting."""
    path = os.path.join(site.top, 'broken-ssh')
    with open(path, 'w') as f:
        f.write(f'#!/bin/sh\n{line}\n')
    os.chmod(path, 0o755)
    site.write_config(ssh=path, catchup='14', backup='20')


@pytest.mark.parametrize('line, why', [
    ('echo "ssh: connect to host dts port 22: Connection refused" >&2; exit 255',
     'ssh: connect to host dts port 22: Connection refused'),
    ('printf "hello"; exit 0', 'ssh returned 0 and an unreadable answer'),
    ('printf "@/x\\0garbage\\0#end\\0"; exit 0', 'ssh returned 0 and an unreadable answer')])
def test_mountain_unreachable_or_garbled(archived, line, why):
    """The mountain unreachable, or answering garbage, is said and is not
    clean; the other places are still compared."""
    site = archived
    os.chmod(site.dest(LAST, expid(LAST, 2)), 0o700)
    unreachable(site, line)
    found = audit(site.config, [EARLIER, LAST])
    assert kinds(found) == {(EARLIER, None, 'mountain'), (LAST, None, 'mountain'),
                            (LAST, expid(LAST, 2), 'nersc')}
    assert problem(found, LAST, None, 'mountain') == (
        f'the links of the night could not be listed at dts: {why} => check ssh to dts '
        '(ssh -o BatchMode=yes dts true) and audit again')
    p = status_command(site, '--audit', LAST)
    assert p.returncode == 1
    assert 'the mountain (dts) could not be asked' in p.stdout


def test_mountain_hangs(archived, monkeypatch):
    site = archived
    unreachable(site, 'sleep 60')
    monkeypatch.setattr(mountain_module, 'REMOTE_TIMEOUT', 1)
    t0 = time.monotonic()
    found = audit(site.config, [LAST])
    assert time.monotonic() - t0 < 10
    assert kinds(found) == {(LAST, None, 'mountain')}
    assert 'Timed out after 1 seconds' in found[0].problem


@pytest.mark.parametrize('program, line, why', [
    ('hsi', 'echo "*** HSI: Unable to setup communication to HPSS" >&2; exit 72',
     'could not be listed on HPSS: hsi returned 72: *** HSI: Unable to setup communication'),
    ('hsi', 'echo garbage; exit 0', 'could not be listed on HPSS: hsi answered empty answer'),
    ('hsi', 'sleep 60', 'could not be listed on HPSS: hsi returned -9'),
    ('htar', 'echo "HTAR: HTAR FAILED" >&2; exit 72', 'could not be read: htar returned 72'),
    ('htar', 'echo "HTAR: HTAR SUCCESSFUL"; exit 7', 'could not be read: htar returned 7'),
    ('htar', 'sleep 60', 'could not be read: htar returned -9')])
def test_hpss_unreadable(archived, monkeypatch, program, line, why):
    """HPSS down, hanging or answering garbage is said and is not clean."""
    site = archived
    site.hpss_wrapper('broken-hpss', program, line)
    site.write_config(hpss=os.path.join(site.top, 'broken-hpss'), catchup='14', backup='20')
    monkeypatch.setattr(tape_module, 'HSI_TIMEOUT', 1)
    found = audit(site.config, [EARLIER, LAST])
    assert kinds(found) == {(EARLIER, None, 'tape'), (LAST, None, 'tape')}
    assert why in problem(found, LAST, None, 'tape')


def test_night_not_archived_yet(site, clock):
    """A night not archived is a disagreement once its backup hour passed."""
    site.exposure(LAST, expid(LAST, 0))
    site.write_config(catchup='14', backup='20')
    clock(2026, 11, 20, 10, 0, 0)
    assert site.run() == 0
    assert audit(site.config, [LAST]) == []
    clock(2026, 11, 20, 20, 0, 0)
    found = audit(site.config, [LAST])
    assert kinds(found) == {(LAST, None, 'tape')}
    assert found[0].problem == (f'{os.path.basename(ARCHIVE(LAST))} is not on tape '
                                '(desi/spectro/data)')
    assert found[0].todo.startswith(f're-archive: cd {site.destination} && htar -cvhf ')


def test_malformed_links_and_status_file(archived):
    site = archived
    os.symlink(os.path.join(site.data, LAST, expid(LAST, 0)),
               os.path.join(site.source, LAST, 'abc'))
    # A hostile link: the mountain's /etc, in the place of an exposure.
    os.remove(os.path.join(site.source, LAST, expid(LAST, 1)))
    os.symlink('/etc', os.path.join(site.source, LAST, expid(LAST, 1)))
    path = os.path.join(site.status_dir, 'desi_transfer_status_2026.json')
    with open(path, 'w') as f:
        f.write('{"truncated": ')
    before = snapshot(site.status_dir)
    found = audit(site.config, [LAST])
    assert kinds(found) == {(LAST, None, 'mountain'), (LAST, None, 'status'),
                            (LAST, expid(LAST, 1), 'mountain')}
    assert problem(found, LAST, expid(LAST, 1), 'mountain') == (
        f'its link is not transferred: its target /etc is not a directory {LAST}/'
        f'{expid(LAST, 1)} => nothing is lost (it is at NERSC); repair or remove the link at '
        'the mountain')
    assert problem(found, LAST, None, 'mountain') == (
        f'{site.source}/{LAST}/abc is not transferred: not NIGHT/EXPID => rename or remove it '
        'at the mountain')
    assert problem(found, LAST, None, 'status').startswith(
        f'{path} is malformed (not valid JSON (')
    assert f'; read {path}.copy instead => desi_transfer_status -d {site.status_dir} {LAST} ' \
        'restores it from its copy' in problem(found, LAST, None, 'status')
    assert snapshot(site.status_dir) == before


def test_hostile_checksum_file(archived):
    """A checksum file naming files outside the exposure is reported, and
    nothing outside is looked at."""
    site = archived
    path = site.dest(LAST, expid(LAST, 0), f'checksum-{expid(LAST, 0)}.sha256sum')
    writable(path)
    with open(path, 'a') as f:
        f.write(f'{"0" * 64}  ../../../../etc/passwd\n')
    os.chmod(path, 0o440)
    found = audit(site.config, [LAST])
    assert kinds(found) == {(LAST, expid(LAST, 0), 'nersc'), (LAST, expid(LAST, 0), 'tape')}
    assert "has a '..' component and could leave the exposure directory" in \
        problem(found, LAST, expid(LAST, 0), 'nersc')
    assert problem(found, LAST, expid(LAST, 0), 'tape').startswith(
        f'differs from the archive {os.path.basename(ARCHIVE(LAST))}: '
        'checksum-00000190.sha256sum: 354 bytes at NERSC, 265 on tape => re-verify')


#: Bad command lines of the audit, and the error each gets.
BAD_INPUT = [
    (['--audit', '2026111'], "--audit takes a night (YYYYMMDD, a real date) or a year (YYYY), "
                             "not '2026111'."),
    (['--audit', '20261131'], "--audit takes a night"),
    (['--audit', '2090'], "--audit 2090: no night of 2090 has begun yet."),
    (['--audit', LAST, LAST], "--audit takes no NIGHT EXPID STAGE arguments (found "
                              f"'{LAST}')."),
    (['--audit', LAST, '--replace'], "--replace does not go with --audit."),
    (['--audit', LAST, '--json'], "--json does not go with --audit."),
    (['--audit', LAST, '-f'], "-f/--failure does not go with --audit."),
    (['--audit', LAST, '--rebuild', '2026'], "argument --rebuild: not allowed with argument "
                                             "--audit"),
    (['--audit', LAST, '-d', '/nonexistent/status'], "status directory /nonexistent/status "
                                                     "does not exist; nothing to audit"),
    ([LAST, '--deep'], "--deep goes with --audit, --rebuild or --statistics only."),
    (['--audit', LAST, '-c', '/nonexistent.ini'], "configuration file /nonexistent.ini cannot "
                                                  "be read: No such file or directory")]


def test_bad_input(archived):
    """Each bad command line: one error line, exit status 2, nothing changed
    (all against one archived site, which none may change)."""
    site = archived
    before = snapshot(site.top, skip={str(site.hpss.log)})
    command, env = site.command()
    for args, message in BAD_INPUT:
        if '-c' not in args and args[0] != LAST:
            args = ['-c', site.config] + args
        p = subprocess.run(['desi_transfer_status'] + args, env=env, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 2, (args, p.stdout + p.stderr)
        errors = [line for line in p.stderr.splitlines() if 'error' in line]
        assert errors == [f'desi_transfer_status: error: {message}'] or \
            (len(errors) == 1 and
             errors[0].startswith(f'desi_transfer_status: error: {message}')), (args, errors)
        assert p.stdout == '', args
        assert snapshot(site.top, skip={str(site.hpss.log)}) == before, args


def test_audit_refuses_bad_nights(archived):
    with pytest.raises(ValueError):
        audit(archived.config, ['20261131'])
    with pytest.raises(ValueError):
        audit(archived.config, [])


def test_configuration_as_read(archived):
    """The daemon passes its configuration as it read it."""
    site = archived
    assert audit(read_configuration(site.config), [LAST], directory=site.status_dir) == []


def test_unreadable_night_at_nersc(unprivileged):
    """A night directory that cannot be listed is said; nothing is called
    missing at NERSC because of it."""
    top = unprivileged.directory()
    p = unprivileged.run(f"""import json, os
from desitransfer.nersc import nersc_night
top = {top!r}
os.makedirs(top + '/{LAST}/00000190')
os.makedirs(top + '/{EARLIER}/00000180')
os.chmod(top + '/{LAST}', 0o300)
found = [nersc_night(top, n) for n in ('{LAST}', '{EARLIER}', '20261117')]
print(json.dumps([[st is not None, sorted(e), why] for st, e, why in found]))
""")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == [
        [True, [], f'{top}/{LAST} cannot be listed: Permission denied'],
        [True, ['00000180'], ''], [False, [], '']]
    d = DirectoryConfig('DESI_SPECTRO_DATA', '/src', top + '/staging', top,
                        'desi/spectro/data', 'checksum-{exposure}.sha256sum', '')
    auditor = audit_module.Auditor(([d], {'recent': 30, 'backup': 20, 'host': 'dts'}))
    view = audit_module.Night(auditor, d, LAST, '/status', 'dts', mountain_why='',
                              links={'00000190': object()}, refused={},
                              night_st=None, exposures={},
                              nersc_why=f'{top}/{LAST} cannot be listed: Permission denied',
                              rows={'00000190': {0: (True, 1000), 1: (True, 2000)}},
                              tape={}, tape_why='', index=None, index_why='')
    found = view.compare()
    assert [(f.expid, f.place, f.problem) for f in found if f.place == 'nersc'] == [
        (None, 'nersc', f'{top}/{LAST} cannot be listed: Permission denied')]
    assert not [f for f in found if f.expid is not None]
