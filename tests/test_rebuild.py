# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of ``desi_transfer_status --rebuild`` (:mod:`desitransfer.rebuild`):
status files rebuilt from sites built by the daemon, against the real sshd,
rsync and the HPSS emulator."""
import json
import os
import resource
import subprocess

import pytest

from desitransfer.rebuild import differences, rebuild
from desitransfer.status import TransferStatus
from fixtures_daemon import EARLIER, LAST, TONIGHT, copy_site, snapshot

#: Largest difference allowed here between a rebuilt time and the one the
#: daemon recorded, in milliseconds: rsync and checksum within the pass that
#: copied the exposure (a second here); backup to the minute of the listing.
RSYNC_CHECKSUM = 5_000
BACKUP = 120_000

#: Stage codes.
RSYNC, CHECKSUM, BACKUP_STAGE, LINKED = 0, 1, 2, 3


def expid(night, j):
    return f'{int(night[-2:]) * 10 + j:08d}'


def _recorded(site):
    """Two finished nights, archived, and tonight, one of whose exposures
    has a checksum mismatch (installed anyway and recorded as failed)."""
    for night in (EARLIER, LAST, TONIGHT):
        for j in range(3):
            directory = site.exposure(night, expid(night, j))
            if (night, j) == (TONIGHT, 1):
                with open(os.path.join(directory, f'guide-{expid(night, j)}.fits.fz'),
                          'r+b') as f:
                    f.write(b'corrupted at the mountain')
    site.write_config(catchup='14', backup='20')
    assert site.run() == 0
    assert len(site.htar_calls()) == 2
    assert site.status_rows()[(TONIGHT, int(expid(TONIGHT, 1)))] == {0: 1, 1: 0}
    return site


@pytest.fixture
def recorded(site, site_templates):
    """A copy of the site that :func:`_recorded` built once for this module."""
    return copy_site(site_templates(_recorded), site)


def year_file(site, suffix=''):
    return os.path.join(site.status_dir, 'desi_transfer_status_2026.json' + suffix)


def load(path):
    with open(path) as f:
        return json.load(f)


def by_stage(rows):
    return {row[0]: row for row in rows}


def status_command(site, *args):
    command, env = site.command()
    return subprocess.run(['desi_transfer_status', '-c', site.config] + list(args), env=env,
                          capture_output=True, text=True, timeout=120)


def test_rebuild_reproduces_the_daemon(site):
    """Same nights, exposures, stages and outcomes as the daemon recorded;
    times within the documented tolerance; linked from the mountain.  (The
    site is built here: a copy's files would have changed, later, when copied.)"""
    site = _recorded(site)
    original = load(year_file(site))
    [rebuilt] = rebuild(site.config, 2026, deep=True)
    assert rebuilt.unknown == [] and rebuilt.notes == []
    assert rebuilt.directory == site.status_dir
    assert sorted(rebuilt.records) == sorted(original) == [EARLIER, LAST, TONIGHT]
    for night, exposures in original.items():
        assert sorted(rebuilt.records[night]) == sorted(exposures)
        for e, rows in exposures.items():
            mine = by_stage(rebuilt.records[night][e])
            theirs = by_stage(rows)
            assert set(mine) == set(theirs) | {LINKED}, (night, e)
            for stage, row in theirs.items():
                assert mine[stage][1] == row[1], (night, e, stage)
                late = row[2] - mine[stage][2]
                assert 0 <= late <= (BACKUP if stage == BACKUP_STAGE else RSYNC_CHECKSUM), \
                    (night, e, stage, late)
            link = os.path.join(site.source, night, f'{int(e):08d}')
            assert mine[LINKED][1:] == [1, int(os.lstat(link).st_mtime * 1000)]
            assert [r[2] for r in rebuilt.records[night][e]] == \
                sorted((r[2] for r in rebuilt.records[night][e]), reverse=True)
    diff = differences(original, rebuilt.records)
    # The daemon records the link time too: the rebuilt file agrees in everything.
    assert diff == {'only current': [], 'only rebuilt': [], 'same': 9, 'stages': {}}
    # Without --deep, the checksum outcome comes from the names only: the
    # corrupted exposure seems right.
    [light] = rebuild(site.config, 2026)
    diff = differences(rebuilt.records, light.records)
    assert diff['stages'] == {'checksum outcome differs': [f'{TONIGHT}/{expid(TONIGHT, 1)}']}


def test_rebuild_command_changes_nothing_but_its_file(recorded):
    site = recorded
    before = snapshot(site.status_dir)
    p = status_command(site, '--rebuild', '2026', '--deep')
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stderr == ''
    lines = p.stdout.splitlines()
    assert lines[0] == (f'Rebuilt {year_file(site, ".rebuilt")}: 3 nights, 9 exposures, 9 '
                        'rsync, 9 checksum, 6 backup, 9 linked rows (1 failed).')
    assert lines[1].startswith(f'Compared with {year_file(site)} (3 nights, 9 exposures): '
                               '9 exposures agree (times within 1 s for linked, 3600 s for '
                               'rsync, 3600 s for checksum, 86400 s for backup).')
    assert lines[2] == (f'To replace {year_file(site)} by it (keeping the old file): '
                        f'desi_transfer_status -c {site.config} --rebuild 2026 --deep --replace')
    after = snapshot(site.status_dir)
    assert set(after) - set(before) == {year_file(site, '.rebuilt')}
    assert {p: s for p, s in after.items() if p in before} == before
    assert os.stat(year_file(site, '.rebuilt')).st_mode & 0o777 == 0o644


def test_replace_keeps_the_old_file(recorded):
    site = recorded
    old = open(year_file(site), 'rb').read()
    p = status_command(site, '--rebuild', '2026', '--deep', '--replace')
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1] == (f'Replaced {year_file(site)} by the rebuilt records; '
                                         f'the old file is kept as {year_file(site, ".replaced")}.')
    assert open(year_file(site, '.replaced'), 'rb').read() == old
    assert load(year_file(site)) == load(year_file(site, '.rebuilt'))
    assert load(year_file(site, '.copy')) == load(year_file(site))
    # Again: the first kept file is not replaced.
    p = status_command(site, '--rebuild', '2026', '--deep', '--replace')
    assert p.returncode == 0, p.stdout + p.stderr
    assert open(year_file(site, '.replaced'), 'rb').read() == old
    assert os.path.exists(year_file(site, '.replaced.1'))
    # The daemon carries on with the rebuilt file: nothing is transferred again.
    site.clock(2026, 11, 21, 21, 0, 0)
    rows = site.status_rows()
    assert site.run() == 0  # tonight's corrupted exposure is transferred again
    assert len(site.htar_calls()) == 2
    assert {k: v for k, v in site.status_rows().items() if k[0] != TONIGHT} == \
        {k: v for k, v in rows.items() if k[0] != TONIGHT}


def test_rows_recorded_during_a_rebuild_are_kept(recorded):
    site = recorded
    [rebuilt] = rebuild(site.config, 2026)
    status = TransferStatus(site.status_dir, year=2026)
    status.update(TONIGHT, expid(TONIGHT, 1), 'checksum')       # after the rebuild started
    status.update_many([(TONIGHT, '00000999', 'rsync', False, rebuilt.started - 10_000)])
    assert rebuilt.replace() == year_file(site, '.replaced')
    now = load(year_file(site))
    assert by_stage(now[TONIGHT][str(int(expid(TONIGHT, 1)))])[CHECKSUM][1] == 1
    assert '999' not in now[TONIGHT]  # older than the rebuild: replaced
    # Everything else is as rebuilt.
    del now[TONIGHT][str(int(expid(TONIGHT, 1)))]
    del rebuilt.records[TONIGHT][str(int(expid(TONIGHT, 1)))]
    assert now == rebuilt.records


def test_lost_status_file(recorded):
    """After losing the status file and both its copies, the rebuild restores it."""
    site = recorded
    rows = site.status_rows()
    for suffix in ('', '.copy', '.bak'):
        os.remove(year_file(site, suffix))
    p = status_command(site, '--rebuild', '2026', '--deep', '--replace')
    assert p.returncode == 0, p.stdout + p.stderr
    assert 'Compared with' in p.stdout and '(0 nights, 0 exposures)' in p.stdout
    assert p.stdout.splitlines()[-1] == f'Replaced {year_file(site)} by the rebuilt records.'
    assert {k: {s: ok for s, ok in v.items() if s != LINKED}
            for k, v in site.status_rows().items()} == rows


@pytest.mark.parametrize('place', ['hpss', 'mountain'])
def test_replace_refused_when_a_place_is_unknown(recorded, place):
    site = recorded
    if place == 'hpss':
        site.hpss.fail('hsi')
        why = 'Could not be read: desi/spectro/data could not be listed on HPSS (hsi returned 72: '
        stage = BACKUP_STAGE
    else:
        site.ssh_wrapper('down', before_command='echo "ssh: connect to host dts: No route" >&2;'
                                                ' exit 255')
        why = ('Could not be read: the mountain could not be asked (ssh: connect to host dts: '
               'No route): no linked rows.')
        stage = LINKED
    before = snapshot(site.status_dir)
    p = status_command(site, '--rebuild', '2026', '--replace')
    assert p.returncode == 1
    assert why in p.stdout
    assert p.stderr.splitlines() == [
        f'desi_transfer_status: error: {year_file(site)} was not replaced: a place could not '
        'be read (see above); rebuild again when it can be.']
    after = snapshot(site.status_dir)
    assert set(after) - set(before) == {year_file(site, '.rebuilt')}
    assert {p: s for p, s in after.items() if p in before} == before
    # What was rebuilt lacks those rows: replacing would have lost them.
    rows = [row for n in load(year_file(site, '.rebuilt')).values() for r in n.values()
            for row in r]
    assert rows and all(row[0] != stage for row in rows)


def test_rebuild_full_disk(recorded):
    """A write that fails (here: file size limit) changes nothing."""
    site = recorded
    before = snapshot(site.status_dir)
    command, env = site.command()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    p = subprocess.run(['desi_transfer_status', '-c', site.config, '--rebuild', '2026'],
                       env=env, capture_output=True, text=True, timeout=120,
                       preexec_fn=small_files)
    assert p.returncode == 1
    assert p.stderr.startswith('desi_transfer_status: error: [Errno 27] File too large')
    assert p.stderr.endswith('; nothing was changed.\n') and p.stderr.count('\n') == 1
    assert snapshot(site.status_dir) == before


#: Bad command lines of the rebuild, and the error each gets.
BAD_INPUT = [
    (['--rebuild', LAST], f"--rebuild takes a year (YYYY), not '{LAST}'."),
    (['--rebuild', '2026', '--json'], "--json does not go with --rebuild."),
    (['--replace', LAST], "--replace goes with --audit, --rebuild or --statistics only."),
    (['--rebuild', '2026', '--statistics', '2026'], "argument --statistics: not allowed with "
                                                    "argument --rebuild")]


def test_bad_input(recorded):
    """Each bad command line (against one site, which none may change)."""
    site = recorded
    before = snapshot(site.status_dir)
    command, env = site.command()
    for args, message in BAD_INPUT:
        config = ['-c', site.config] if args[0] != '--replace' else ['-d', site.status_dir]
        p = subprocess.run(['desi_transfer_status'] + config + args, env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, args
        assert p.stderr.splitlines()[-1] == f'desi_transfer_status: error: {message}'
        assert snapshot(site.status_dir) == before, args


def test_differences():
    current = {'20260101': {'1': [[1, 1, 5000], [0, 1, 1000]], '2': [[0, 1, 1000]]},
               '20260102': {'3': [[0, 1, 1000]]}}
    rebuilt = {'20260101': {'1': [[1, 0, 5000], [0, 1, 3_602_000]], '2': [[0, 1, 1500]]},
               '20260103': {'4': [[2, 1, 1000]]}}
    assert differences(current, rebuilt) == {
        'only current': ['20260102/00000003'], 'only rebuilt': ['20260103/00000004'],
        'same': 1, 'stages': {'checksum outcome differs': ['20260101/00000001'],
                              'rsync time differs by more than 3600 s': ['20260101/00000001']}}
