# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of desitransfer.status: the status store, its recovery, concurrency and CLI."""
import datetime as dt
import json
import logging
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import threading
import time

import pytest

from desitransfer import __version__, status
from desitransfer import store as store_module
from desitransfer.alerts import configure_log
from desitransfer.common import log
from desitransfer.status import TransferStatus, _options, main

NIGHT = '20230101'


def clock(monkeypatch, *times):
    """Make the store see these times (ms), one per update that changes something."""
    values = iter(times)
    monkeypatch.setattr(store_module, "milliseconds", lambda: next(values))


def year_file(d, year=2023):
    return d / f'desi_transfer_status_{year:d}.json'


def on_disk(d, year=2023):
    return json.loads(year_file(d, year).read_text())


def snapshot(path):
    """Bytes and modification time of a file, to prove it was not touched."""
    st = os.stat(path)
    return path.read_bytes(), st.st_mtime_ns, st.st_ino


@pytest.fixture
def store(tmp_path):
    return TransferStatus(str(tmp_path / 'status'), year=2023)


def test_new_directory_and_year(tmp_path):
    s = TransferStatus(str(tmp_path / 'a' / 'status'))
    assert (tmp_path / 'a' / 'status').is_dir()
    assert s.year == dt.datetime.now().year
    assert s.json == str(tmp_path / 'a' / 'status' / f'desi_transfer_status_{s.year:d}.json')
    assert s.status == {}
    assert not os.path.exists(s.json)
    assert TransferStatus(str(tmp_path), year='2021').year == 2021


def test_update_and_find(store, tmp_path, monkeypatch):
    clock(monkeypatch, 1000, 2000, 3000, 4000, 5000)
    assert store.update(NIGHT, '00012345', 'rsync') == 1
    assert store.update(NIGHT, '00012345', 'checksum', failure=True) == 1
    assert store.update(NIGHT, 12346, 'rsync') == 1
    assert store.update('20230102', '00000007', 'rsync', failure=True) == 1
    assert store.update(NIGHT, '12345', 'backup') == 1
    expected = {NIGHT: {'12345': [[2, 1, 5000], [1, 0, 2000], [0, 1, 1000]],
                        '12346': [[0, 1, 3000]]},
                '20230102': {'7': [[0, 0, 4000]]}}
    d = tmp_path / 'status'
    assert on_disk(d) == expected
    assert year_file(d).read_bytes() == json.dumps(expected, separators=(',', ':')).encode()
    assert store.status == expected
    # The four documented shapes of find(): the night's rows, then indexes
    # into them, as the original's find() returns.
    assert store.find(NIGHT) == expected[NIGHT]
    assert store.find(NIGHT, stage='rsync') == {'12345': [2], '12346': [0]}
    assert store.find(NIGHT, stage='backup') == {'12345': [0], '12346': []}
    assert store.find(NIGHT, exposure='00012345') == [0, 1, 2]
    assert store.find(NIGHT, 12345, 'checksum') == [1]
    assert store.find(NIGHT, '12346', 'checksum') == []
    assert store.find(NIGHT, '99999') == []
    rows = store.find(NIGHT)['12345']
    assert [rows[k] for k in store.find(NIGHT, '12345', 'checksum')] == [[1, 0, 2000]]
    # records() returns the rows themselves.
    assert store.records(NIGHT) == expected[NIGHT]
    assert store.records(NIGHT, stage='rsync') == {'12345': [[0, 1, 1000]],
                                                   '12346': [[0, 1, 3000]]}
    assert store.records(NIGHT, exposure='00012345') == expected[NIGHT]['12345']
    assert store.records(NIGHT, 12345, 'checksum') == [[1, 0, 2000]]
    assert store.records(NIGHT, '99999') == []
    for method in (store.find, store.records):
        with pytest.raises(KeyError):
            method('20230103')
    # Results are copies: changing them changes nothing stored.
    store.records(NIGHT, '12345')[0][1] = 0
    store.find(NIGHT)['12345'][0][1] = 0
    assert store.records(NIGHT, '12345', 'backup') == [[2, 1, 5000]]


@pytest.mark.parametrize('args', [('20230230', '1', 'rsync'), ('2023011', '1', 'rsync'),
                                  (NIGHT, 'abc', 'rsync'), (NIGHT, -1, 'rsync'),
                                  (NIGHT, '-1', 'rsync'), (NIGHT, True, 'rsync'),
                                  (NIGHT, '1', 'foo'), (NIGHT, '1', None)])
def test_update_refuses_bad_input(store, tmp_path, args):
    store.update(NIGHT, '1', 'checksum')
    before = snapshot(year_file(tmp_path / 'status'))
    with pytest.raises(ValueError):
        store.update(*args)
    assert snapshot(year_file(tmp_path / 'status')) == before


def test_find_refuses_bad_input(store):
    store.update(NIGHT, '1', 'rsync')
    with pytest.raises(ValueError):
        store.find(NIGHT, stage='transfer')
    with pytest.raises(ValueError):
        store.find('20231301')


def test_idempotent(store, tmp_path, monkeypatch):
    clock(monkeypatch, 1000, 2000, 3000, 4000)
    assert store.update(NIGHT, '12345', 'rsync') == 1
    before = snapshot(year_file(tmp_path / 'status'))
    time.sleep(0.01)
    assert store.update(NIGHT, '12345', 'rsync') == 0
    assert snapshot(year_file(tmp_path / 'status')) == before
    assert store.records(NIGHT, '12345') == [[0, 1, 1000]]
    # A different outcome replaces the row: still one row per stage.
    assert store.update(NIGHT, '12345', 'rsync', failure=True) == 1
    assert store.records(NIGHT, '12345') == [[0, 0, 2000]]


def test_newest_row_first(store, monkeypatch):
    clock(monkeypatch, 1000, 2000, 3000, 4000)
    for stage in ('rsync', 'checksum', 'backup'):
        store.update(NIGHT, '5', stage)
    store.update(NIGHT, '5', 'rsync', failure=True)
    assert store.records(NIGHT, '5') == [[0, 0, 4000], [2, 1, 3000], [1, 1, 2000]]


def test_success_after_failure_with_clock_going_back(store, tmp_path, monkeypatch):
    clock(monkeypatch, 5000, 1000)
    assert store.update(NIGHT, '12345', 'checksum', failure=True) == 1
    assert store.update(NIGHT, '12345', 'checksum') == 1
    assert on_disk(tmp_path / 'status')[NIGHT]['12345'] == [[1, 1, 1000]]


def test_all(store, tmp_path, monkeypatch, caplog):
    clock(monkeypatch, 1, 2, 3, 4, 5, 6)
    for e in ('1', '2', '3'):
        store.update(NIGHT, e, 'rsync')
    store.update(NIGHT, '2', 'backup')
    assert store.update(NIGHT, 'all', 'backup') == 2
    assert store.records(NIGHT, stage='backup') == {'1': [[2, 1, 5]], '2': [[2, 1, 4]],
                                                    '3': [[2, 1, 5]]}
    before = snapshot(year_file(tmp_path / 'status'))
    assert store.update(NIGHT, 'all', 'backup') == 0
    caplog.set_level(logging.WARNING)
    assert store.update('20230105', 'all', 'backup') == 0
    assert 'No exposures of night 20230105' in caplog.text
    assert snapshot(year_file(tmp_path / 'status')) == before
    assert '20230105' not in store.status


def test_existing_file_loads_unchanged(tmp_path, monkeypatch):
    d = tmp_path / 'status'
    d.mkdir()
    (d / 'index.html').write_text('<html></html>')
    text = ('{"20210518":{"88013":[[2,1,1621450926371],[1,1,1621400526371],[0,1,1621400502118]],'
            '"88014":[[1,0,1621400626001],[0,1,1621400600001]]},'
            '"20210519":{"88100":[[0,1,1621487000000]]}}')
    year_file(d, 2021).write_text(text)
    s = TransferStatus(str(d), year=2021)
    assert s.status == json.loads(text)
    assert s.records('20210518', '00088014', 'checksum') == [[1, 0, 1621400626001]]
    assert s.update('20210518', '88013', 'backup') == 0
    assert year_file(d, 2021).read_text() == text
    clock(monkeypatch, 1621500000000)
    assert s.update('20210519', '88100', 'checksum') == 1
    expected = json.loads(text)
    expected['20210519']['88100'].insert(0, [1, 1, 1621500000000])
    assert year_file(d, 2021).read_text() == json.dumps(expected, separators=(',', ':'))
    assert (d / 'index.html').read_text() == '<html></html>'


def test_night_goes_to_its_own_year(store, tmp_path, monkeypatch):
    clock(monkeypatch, 1, 2)
    store.update(NIGHT, '1', 'rsync')
    assert store.update('20241231', '9', 'rsync') == 1
    d = tmp_path / 'status'
    assert on_disk(d, 2024) == {'20241231': {'9': [[0, 1, 2]]}}
    assert on_disk(d, 2023) == {NIGHT: {'1': [[0, 1, 1]]}}
    assert store.records('20241231', '9') == [[0, 1, 2]]
    assert '20241231' not in store.status


def names_of_year(d, year=2023):
    """Names of the files of `year` in `d`, temporary files included."""
    return sorted(p.name for p in d.iterdir() if f'desi_transfer_status_{year:d}' in p.name)


def test_files_after_updates(store, tmp_path):
    """After an update: the file, a copy on its own inode, the previous version."""
    d = tmp_path / 'status'
    store.update(NIGHT, '1', 'rsync')
    first = year_file(d).read_bytes()
    store.update(NIGHT, '2', 'rsync')
    current = year_file(d).read_bytes()
    assert (d / 'desi_transfer_status_2023.json.bak').read_bytes() == first
    assert (d / 'desi_transfer_status_2023.json.copy').read_bytes() == current
    assert os.stat(d / 'desi_transfer_status_2023.json.copy').st_ino != \
        os.stat(year_file(d)).st_ino
    assert os.stat(d / 'desi_transfer_status_2023.json.copy').st_mode == \
        os.stat(year_file(d)).st_mode
    assert names_of_year(d) == ['.desi_transfer_status_2023.lock',
                                'desi_transfer_status_2023.json',
                                'desi_transfer_status_2023.json.bak',
                                'desi_transfer_status_2023.json.copy']


def test_other_writers_are_seen(tmp_path):
    a = TransferStatus(str(tmp_path), year=2023)
    b = TransferStatus(str(tmp_path), year=2023)
    a.update(NIGHT, '1', 'rsync')
    b.update(NIGHT, '2', 'rsync')
    assert sorted(a.find(NIGHT)) == ['1', '2']
    a.update(NIGHT, '3', 'rsync')
    assert sorted(on_disk(tmp_path)[NIGHT]) == ['1', '2', '3']


def damage(path, how):
    """Damage `path` in place (same inode), as a full disk or a stray write would."""
    size = os.path.getsize(path)
    if how == 'truncated':
        os.truncate(path, size // 2)
    elif how == 'emptied':
        os.truncate(path, 0)
    elif how == 'overwritten':
        with open(path, 'r+b') as f:
            f.seek(size // 3)
            f.write(b'\0garbage\0' * 4)
    elif how == 'reshaped':
        with open(path, 'r+b') as f:
            f.truncate(0)
            f.write(b'["not", "the status format"]')
    elif how == 'removed':
        os.remove(path)
    else:
        raise ValueError(how)


@pytest.mark.parametrize('how', ['truncated', 'emptied', 'overwritten', 'reshaped', 'removed'])
def test_damaged_file_loses_nothing(tmp_path, caplog, monkeypatch, how):
    """Every update survives a damage of the status file: it is in the copy."""
    d = tmp_path / 'status'
    s = TransferStatus(str(d), year=2023)
    clock(monkeypatch, 1, 2, 3, 4, 5)
    for e in ('1', '2', '3'):
        s.update(NIGHT, e, 'rsync')
    good = year_file(d).read_bytes()
    inode = os.stat(year_file(d)).st_ino
    damage(year_file(d), how)
    damaged = None if how == 'removed' else year_file(d).read_bytes()
    caplog.set_level(logging.INFO)
    r = TransferStatus(str(d), year=2023)
    assert r.status == json.loads(good)
    assert year_file(d).read_bytes() == good
    if damaged is not None:
        assert os.stat(year_file(d)).st_ino != inode
        assert (d / 'desi_transfer_status_2023.json.bad').read_bytes() == damaged
    errors = [m.getMessage() for m in caplog.records if m.levelno == logging.ERROR]
    assert errors and 'desi_transfer_status_2023.json.copy' in errors[-1]
    assert 'restored 1 night from' in errors[-1] and 'no record is lost' in errors[-1]
    assert not [m for m in caplog.records if m.levelno == logging.CRITICAL]
    # The store carries on, and the old object re-reads the repaired file.
    assert s.update(NIGHT, '4', 'rsync') == 1
    assert r.update(NIGHT, '5', 'rsync') == 1
    assert sorted(on_disk(d)[NIGHT]) == ['1', '2', '3', '4', '5']


def test_damage_found_during_update(store, tmp_path, caplog):
    d = tmp_path / 'status'
    store.update(NIGHT, '1', 'rsync')
    store.update(NIGHT, '2', 'rsync')
    damage(year_file(d), 'reshaped')
    caplog.set_level(logging.ERROR)
    assert store.update(NIGHT, '3', 'rsync') == 1
    assert sorted(on_disk(d)[NIGHT]) == ['1', '2', '3']
    assert (d / 'desi_transfer_status_2023.json.bad').read_text() == '["not", "the status format"]'
    assert 'top level is list' in caplog.text


@pytest.mark.parametrize('how', ['truncated', 'overwritten', 'removed'])
def test_damaged_copy(store, tmp_path, caplog, how):
    """A damaged copy is rewritten by the next reading of the file, and serves again."""
    d = tmp_path / 'status'
    copy = d / 'desi_transfer_status_2023.json.copy'
    store.update(NIGHT, '1', 'rsync')
    store.update(NIGHT, '2', 'rsync')
    damage(copy, how)
    caplog.set_level(logging.WARNING)
    assert TransferStatus(str(d), year=2023).find(NIGHT, '2')  # The file itself is good.
    assert copy.read_bytes() == year_file(d).read_bytes()
    if how == 'removed':
        assert caplog.records == []
    else:
        assert [r.levelname for r in caplog.records] == ['WARNING']
        assert 'does not match its copy' in caplog.text
    caplog.clear()
    assert store.update(NIGHT, '3', 'rsync') == 1
    assert copy.read_bytes() == year_file(d).read_bytes()
    assert caplog.records == []
    damage(year_file(d), 'truncated')
    assert sorted(TransferStatus(str(d), year=2023).find(NIGHT)) == ['1', '2', '3']


def test_file_and_copy_damaged(store, tmp_path, caplog):
    """Two damaged files: the previous version serves, with a CRITICAL message."""
    d = tmp_path / 'status'
    store.update(NIGHT, '1', 'rsync')
    store.update(NIGHT, '2', 'rsync')
    damage(d / 'desi_transfer_status_2023.json.copy', 'overwritten')
    copy = (d / 'desi_transfer_status_2023.json.copy').read_bytes()
    damage(year_file(d), 'truncated')
    caplog.set_level(logging.INFO)
    assert sorted(TransferStatus(str(d), year=2023).status[NIGHT]) == ['1']
    critical = [m.getMessage() for m in caplog.records if m.levelno == logging.CRITICAL]
    assert len(critical) == 1 and 'THE LAST UPDATE MAY BE LOST' in critical[0]
    assert 'desi_transfer_status_2023.json.bak' in critical[0]
    assert (d / 'desi_transfer_status_2023.json.copy.bad').read_bytes() == copy
    assert (d / 'desi_transfer_status_2023.json.bad').exists()
    # The copy is good again.
    assert json.loads((d / 'desi_transfer_status_2023.json.copy').read_text()) == on_disk(d)


def test_no_good_copy_starts_empty(tmp_path, caplog):
    d = tmp_path / 'status'
    d.mkdir()
    truncated = '{"20230101": {"1": [[0, 1, 16'
    year_file(d).write_text(truncated)
    caplog.set_level(logging.INFO)
    s = TransferStatus(str(d), year=2023)
    assert s.status == {}
    assert year_file(d).read_text() == '{}'
    assert (d / 'desi_transfer_status_2023.json.bad').read_text() == truncated
    critical = [m.getMessage() for m in caplog.records if m.levelno == logging.CRITICAL]
    assert len(critical) == 1 and str(year_file(d)) in critical[0]
    assert 'EMPTY' in critical[0]
    # A second incident keeps the first .bad and every malformed spare too.
    s.update(NIGHT, '1', 'rsync')
    (d / 'desi_transfer_status_2023.json.bak').write_text('garbage')
    (d / 'desi_transfer_status_2023.json.copy').write_text('rubbish')
    year_file(d).write_text('more garbage')
    assert TransferStatus(str(d), year=2023).status == {}
    assert (d / 'desi_transfer_status_2023.json.bad').read_text() == truncated
    assert (d / 'desi_transfer_status_2023.json.bad.1').read_text() == 'more garbage'
    assert (d / 'desi_transfer_status_2023.json.bak.bad').read_text() == 'garbage'
    assert (d / 'desi_transfer_status_2023.json.copy.bad').read_text() == 'rubbish'


def test_handle_malformed_directly(store, tmp_path):
    store.update(NIGHT, '1', 'rsync')
    store.update(NIGHT, '2', 'rsync')
    assert store._handle_malformed() == {NIGHT: {'1': store.records(NIGHT, '1'),
                                                 '2': store.records(NIGHT, '2')}}
    assert (tmp_path / 'status' / 'desi_transfer_status_2023.json.bad').exists()


def test_full_disk_changes_nothing(store, tmp_path, monkeypatch):
    """A write that fails (disk full) leaves every file as it was, and no temporary file."""
    d = tmp_path / 'status'
    store.update(NIGHT, '1', 'rsync')
    store.update(NIGHT, '2', 'rsync')
    before = {name: snapshot(d / name) for name in names_of_year(d)}
    write_file = TransferStatus._write_file
    for failing in (1, 2):
        calls = []

        def full(path, text, mode):
            calls.append(path)
            if len(calls) == failing:
                with open(path, 'xb') as f:
                    f.write(text[:100])
                raise OSError(28, 'No space left on device')
            return write_file(path, text, mode)

        monkeypatch.setattr(TransferStatus, '_write_file', staticmethod(full))
        with pytest.raises(OSError):
            store.update(NIGHT, '3', 'rsync')
        assert len(calls) == failing
        assert {name: snapshot(d / name) for name in names_of_year(d)} == before
    monkeypatch.setattr(TransferStatus, '_write_file', staticmethod(write_file))
    assert store.update(NIGHT, '3', 'rsync') == 1


def dead_pid():
    """The process id of a process that has ended."""
    p = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                       capture_output=True, text=True, check=True)
    return int(p.stdout)


def test_stale_temporary_files_swept(tmp_path, caplog):
    """Temporary files of killed writers go at the first write, not at a read."""
    d = tmp_path / 'status'
    TransferStatus(str(d), year=2023).update(NIGHT, '1', 'rsync')
    dead = dead_pid()
    stale = [d / f'.desi_transfer_status_2023.json.{dead:d}.tmp',
             d / f'.desi_transfer_status_2023.json.copy.{dead:d}.tmp',
             d / f'.desi_transfer_status_2022.json.bak.{dead:d}.tmp']
    live = d / f'.desi_transfer_status_2023.json.{os.getppid():d}.tmp'
    for path in stale + [live]:
        path.write_text('{"20230101": {"1": [[0, 1,')
    s = TransferStatus(str(d), year=2023)
    assert s.find(NIGHT, '1') and all(p.exists() for p in stale)
    caplog.set_level(logging.INFO)
    assert s.update(NIGHT, '2', 'rsync') == 1
    assert not any(p.exists() for p in stale) and live.exists()
    assert 'Removed 3 temporary file(s) left by killed writers' in caplog.text
    assert sorted(on_disk(d)[NIGHT]) == ['1', '2']


def test_temporary_file_of_an_earlier_process_with_our_pid(store, tmp_path):
    """Process ids are reused: a file left under ours does not block a write."""
    d = tmp_path / 'status'
    store.update(NIGHT, '1', 'rsync')
    for name in ('json', 'json.copy', 'json.bak'):
        (d / f'.desi_transfer_status_2023.{name}.{os.getpid():d}.tmp').write_text('left')
    (d / f'.desi_transfer_status_2023.json.copy.{os.getpid():d}.tmp').chmod(0o400)
    assert store.update(NIGHT, '2', 'rsync') == 1
    assert sorted(on_disk(d)[NIGHT]) == ['1', '2']
    assert not [p.name for p in d.iterdir() if p.name.endswith('.tmp')]


CHILD = """
import os, sys, time
from desitransfer.status import TransferStatus
directory, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = TransferStatus(directory, year=2023)
while not os.path.exists(os.path.join(directory, 'go')):
    time.sleep(0.001)
for i in range(n):
    assert s.update('20230101', worker * 1000 + i, 'rsync') == 1
    assert s.update('20230102', worker * 1000 + i, 'checksum', failure=bool(i % 2)) == 1
"""


def test_concurrent_processes_then_damage(tmp_path, caplog):
    """650 updates by 5 processes at once, the file damaged: not one record lost."""
    workers, n = 5, 65
    d = tmp_path / 'status'
    TransferStatus(str(d), year=2023)
    procs = [subprocess.Popen([sys.executable, '-c', CHILD, str(d), str(w), str(n)],
                              stderr=subprocess.PIPE, text=True) for w in range(workers)]
    time.sleep(0.5)
    (d / 'go').touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    ids = {str(w * 1000 + i) for w in range(workers) for i in range(n)}

    def check(data, extra=()):
        assert set(data['20230101']) == ids | set(extra)
        assert set(data['20230102']) == ids
        assert sum(len(rows) for night in data.values() for rows in night.values()) == \
            2 * workers * n + len(extra)
        assert all(rows[0][:2] == [0, 1] for rows in data['20230101'].values())
        assert all(rows[0][:2] == [1, int(e) % 1000 % 2 == 0]
                   for e, rows in data['20230102'].items())

    check(on_disk(d))
    assert not [p.name for p in d.iterdir() if p.name.endswith('.tmp')]
    caplog.set_level(logging.ERROR)
    damage(year_file(d), 'truncated')
    assert TransferStatus(str(d), year=2023).update('20230101', 99999, 'rsync') == 1
    check(on_disk(d), ['99999'])
    damage(year_file(d), 'overwritten')
    check(TransferStatus(str(d), year=2023).status, ['99999'])
    assert not [m for m in caplog.records if m.levelno > logging.ERROR]


CRASH = """
import os, signal, sys
from desitransfer.status import TransferStatus
directory, k = sys.argv[1], int(sys.argv[2])
s = TransferStatus(directory, year=2023)
print(os.getpid(), flush=True)
steps = []
def crashing(name, function):
    def step(*args, **kwargs):
        steps.append(name)
        if len(steps) == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return step
for name in ('fsync', 'link', 'replace'):
    setattr(os, name, crashing(name, getattr(os, name)))
s.update('20230101', 99, 'rsync')
print(' '.join(steps))
"""

#: The steps of an update of an existing file, where a crash may happen.
STEPS = 'fsync fsync replace link replace replace fsync'


@pytest.mark.parametrize('crash', range(1, len(STEPS.split()) + 2))
def test_crash_between_steps(tmp_path, crash):
    """A writer killed at any step: earlier updates are all there, the next
    writer sweeps its temporary files, and a damage afterwards loses nothing."""
    d = tmp_path / 'status'
    s = TransferStatus(str(d), year=2023)
    for e in ('1', '2', '3'):
        s.update(NIGHT, e, 'rsync')
    p = subprocess.run([sys.executable, '-c', CRASH, str(d), str(crash)],
                       capture_output=True, text=True, timeout=60)
    if crash > len(STEPS.split()):
        assert p.returncode == 0 and p.stdout.splitlines()[1] == STEPS, p.stderr
    else:
        assert p.returncode == -9, p.stderr
    acknowledged = {'1', '2', '3'} | ({'99'} if p.returncode == 0 else set())
    recorded = set(TransferStatus(str(d), year=2023).find(NIGHT))
    assert acknowledged <= recorded <= acknowledged | {'99'}
    pid = int(p.stdout.split()[0])
    leftovers = [name for name in os.listdir(d) if name.endswith('.tmp')]
    assert all(name.startswith('.desi_transfer_status_2023.json') and
               name.endswith(f'.{pid:d}.tmp') for name in leftovers)
    # The next object to write sweeps them.
    assert TransferStatus(str(d), year=2023).update(NIGHT, '4', 'rsync') == 1
    assert not [name for name in os.listdir(d) if name.endswith('.tmp')]
    damage(year_file(d), 'truncated')
    assert set(TransferStatus(str(d), year=2023).find(NIGHT)) == recorded | {'4'}


def test_concurrent_threads_sharing_one_store(store, tmp_path):
    workers, n = 4, 25

    def work(worker):
        for i in range(n):
            store.update(NIGHT, worker * 1000 + i, 'rsync')

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(on_disk(tmp_path / 'status')[NIGHT]) == \
        {str(w * 1000 + i) for w in range(workers) for i in range(n)}


@pytest.fixture
def fake_page(tmp_path, monkeypatch):
    source = tmp_path / 'data'
    source.mkdir()
    (source / 'index.html').write_text('<html>page</html>')
    monkeypatch.setattr(store_module, "_page_source", lambda: source)
    return source


def test_install_page(tmp_path, fake_page, caplog):
    caplog.set_level(logging.INFO)
    d = tmp_path / 'status'
    TransferStatus(str(d), year=2023)
    assert (d / 'index.html').read_text() == '<html>page</html>'
    assert 'desi_transfer_status.js' in caplog.text  # missing: said so
    (d / 'index.html').write_text('local')
    TransferStatus(str(d), year=2023)
    assert (d / 'index.html').read_text() == 'local'
    TransferStatus(str(d), install=True, year=2023)
    assert (d / 'index.html').read_text() == '<html>page</html>'
    (d / 'index.html').unlink()
    TransferStatus(str(d), year=2023)
    assert (d / 'index.html').exists()


def test_install_packaged_page(tmp_path):
    source = store_module._page_source()
    shipped = [name for name in store_module.PAGE_FILES if (source / name).is_file()]
    d = tmp_path / 'status'
    TransferStatus(str(d))
    for name in shipped:
        assert (d / name).read_bytes() == (source / name).read_bytes()


#
# Command line.
#
def run_main(monkeypatch, *args):
    monkeypatch.setattr(sys, 'argv', ['desi_transfer_status'] + list(args))
    return main()


def test_options(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv('DESI_ROOT', str(tmp_path))
    o = _options([NIGHT, '00012345', 'checksum', '-f', '--create'])
    assert (o.night, o.expid, o.stage, o.failure, o.install, o.create, o.verbose) == \
        (NIGHT, '00012345', 'checksum', True, False, True, False)
    assert o.directory == os.path.join(str(tmp_path), 'spectro', 'staging', 'status')
    assert _options(['-d', str(tmp_path), NIGHT, 'all', 'backup']).expid == 'all'
    monkeypatch.delenv('DESI_ROOT')
    with pytest.raises(SystemExit):
        _options([NIGHT, '1', 'rsync'])
    assert 'DESI_ROOT is not set' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _options(['-V'])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f'{os.path.basename(sys.argv[0])} {__version__}'
    assert not os.listdir(tmp_path)


def help_of_directory(capsys):
    with pytest.raises(SystemExit) as e:
        _options(['--help'])
    assert e.value.code == 0
    text = ' '.join(capsys.readouterr().out.split())
    return text[text.index('-d DIR, --directory DIR'):text.index('-f, --failure')]


def test_help_says_the_default_directory(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv('DESI_ROOT', '/global/cfs/cdirs/desi')
    assert help_of_directory(capsys) == (
        '-d DIR, --directory DIR Status directory (default '
        '/global/cfs/cdirs/desi/spectro/staging/status, that is '
        '$DESI_ROOT/spectro/staging/status; with --audit, --rebuild or --statistics, the '
        'status directory of the configuration). ')
    monkeypatch.delenv('DESI_ROOT')
    assert help_of_directory(capsys) == (
        '-d DIR, --directory DIR Status directory (default '
        '$DESI_ROOT/spectro/staging/status, but DESI_ROOT is not set; with --audit, --rebuild '
        'or --statistics, the status directory of the configuration). ')


def test_cli_record_and_show(tmp_path, monkeypatch, capsys):
    d = str(tmp_path / 'status')
    assert run_main(monkeypatch, '-d', d, '--create', NIGHT, '00012345', 'rsync') == 0
    assert run_main(monkeypatch, '-d', d, NIGHT, '12345', 'checksum', '-f') == 0
    assert run_main(monkeypatch, '-d', d, NIGHT, '12346', 'rsync') == 0
    assert run_main(monkeypatch, '-d', d, NIGHT, 'all', 'backup') == 0
    data = on_disk(tmp_path / 'status')[NIGHT]
    assert [r[:2] for r in data['12345']] == [[2, 1], [1, 0], [0, 1]]
    assert [r[:2] for r in data['12346']] == [[2, 1], [0, 1]]
    capsys.readouterr()
    before = snapshot(year_file(tmp_path / 'status'))
    assert run_main(monkeypatch, '-d', d, NIGHT) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ['EXPID', 'rsync', 'checksum', 'backup', 'linked']
    when = dt.datetime.fromtimestamp(data['12345'][1][2] / 1000, dt.timezone.utc)
    assert lines[1].startswith('00012345')
    assert f"FAILED {when:%Y-%m-%d %H:%M:%S} UTC" in lines[1]
    assert lines[2].startswith('00012346') and 'FAILED' not in lines[2]
    assert lines[2].split()[5] == '-'  # no checksum recorded
    assert lines[2].split()[-1] == '-'  # no link time recorded
    assert len(lines) == 3
    assert run_main(monkeypatch, '-d', d, NIGHT, '12346') == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith('00012346')
    assert run_main(monkeypatch, '-d', d, '20230105') == 1
    assert capsys.readouterr().err == (f'desi_transfer_status: error: night 20230105 is not '
                                       f'in {year_file(tmp_path / "status")}.\n')
    assert run_main(monkeypatch, '-d', d, '20230105', 'all', 'backup') == 1
    assert snapshot(year_file(tmp_path / 'status')) == before


def test_cli_unknown_exposure(tmp_path, monkeypatch, capsys):
    """An exposure without records, of a known night, is said to be unknown."""
    d = tmp_path / 'status'
    TransferStatus(str(d), year=2023).update(NIGHT, '12345', 'rsync')
    capsys.readouterr()
    assert run_main(monkeypatch, '-d', str(d), NIGHT, '00012399') == 1
    out, err = capsys.readouterr()
    assert out == ''
    assert err == (f'desi_transfer_status: error: exposure 00012399 of night {NIGHT} '
                   f'is not recorded in {year_file(d)}.\n')
    assert run_main(monkeypatch, '-d', str(d), NIGHT, '12345') == 0
    assert capsys.readouterr().out.splitlines()[1].startswith('00012345  ok ')


def listing(top):
    """Every path under `top`, to prove that nothing was created."""
    return sorted(str(p.relative_to(top)) for p in top.rglob('*'))


@pytest.mark.parametrize('args', [[NIGHT, '1', 'rsync'], [NIGHT, '1', 'rsync', '-f'],
                                  [NIGHT, 'all', 'backup'], [NIGHT], [NIGHT, '1'],
                                  [NIGHT, '--create'], [NIGHT, '-i']])
def test_cli_refuses_missing_directory(tmp_path, monkeypatch, capsys, args):
    """A typo in -d creates nothing: one error line, exit status 2."""
    (tmp_path / 'status').mkdir()
    before = listing(tmp_path)
    typo = tmp_path / 'statsu' / 'status'
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, '-d', str(typo), *args)
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f'desi_transfer_status: error: status directory {typo} '
                              'does not exist')
    assert len([line for line in err if 'error' in line]) == 1
    assert listing(tmp_path) == before


@pytest.mark.parametrize('option', ['--create', '-i', '--install'])
def test_cli_creates_directory_on_request(tmp_path, monkeypatch, option):
    d = tmp_path / 'new' / 'status'
    assert run_main(monkeypatch, '-d', str(d), option, NIGHT, '1', 'rsync') == 0
    assert list(on_disk(d)[NIGHT]) == ['1']
    assert (d / 'index.html').exists()


def test_cli_verbose(tmp_path, monkeypatch):
    try:
        assert run_main(monkeypatch, '-v', '-d', str(tmp_path), NIGHT, '1', 'rsync') == 0
        assert log.level == logging.DEBUG
    finally:
        configure_log(debug=False)


@pytest.mark.parametrize('args', [['20230230', '1', 'rsync'], ['2023-01-01', '1', 'rsync'],
                                  ['202301011', '1', 'rsync'], [NIGHT, 'x12', 'rsync'],
                                  [NIGHT, '-5', 'rsync'], [NIGHT, '1.5', 'rsync'],
                                  [NIGHT, '1', 'transfer'], [NIGHT, '1', '-f'],
                                  [NIGHT, '1', 'rsync', 'extra']])
def test_cli_refuses_bad_input(tmp_path, monkeypatch, capsys, args):
    d = tmp_path / 'status'
    TransferStatus(str(d), year=2023).update(NIGHT, '1', 'checksum')
    before = snapshot(year_file(d))
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, '-d', str(d), *args)
    assert e.value.code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if 'error' in line]
    assert len(errors) == 1 and errors[0].startswith('desi_transfer_status: error: ')
    assert snapshot(year_file(d)) == before


def test_cli_directory_is_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / 'file').write_text('not a directory')
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, '-d', str(tmp_path / 'file'), '--create', NIGHT, '1', 'rsync')
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f'desi_transfer_status: error: status directory {tmp_path / "file"} is not a '
        'directory; nothing was recorded (check -d, or give --create to start a new '
        'status directory).')
    # Below a file, --create cannot create the directory: one error line.
    assert run_main(monkeypatch, '-d', str(tmp_path / 'file' / 'status'), '--create',
                    NIGHT, '1', 'rsync') == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('desi_transfer_status: error: ') and '\n' not in err
    assert err.endswith('nothing was recorded.')
    assert (tmp_path / 'file').read_text() == 'not a directory'


def installed_command():
    command = shutil.which('desi_transfer_status',
                           path=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    assert command, 'desi_transfer_status is not installed'
    return command


#: Runs desi_transfer_status's main() with the arguments given after ``-c CODE``.
RUN_MAIN = ("import sys; sys.argv[0] = 'desi_transfer_status'; "
            "from desitransfer.status import main; sys.exit(main())")


def test_cli_read_only_directory(unprivileged):
    """A user who may not write the status directory gets one error line."""
    top = pathlib.Path(unprivileged.directory())
    d = top / 'status'
    TransferStatus(str(d), year=2023).update(NIGHT, '1', 'rsync')
    for path in [top, d] + list(d.iterdir()):
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
    before = {name: snapshot(d / name) for name in names_of_year(d)}
    try:
        p = subprocess.run(unprivileged.command('-c', RUN_MAIN, '-d', str(d), NIGHT, '2', 'rsync'),
                           env=unprivileged.env(), capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(top, 0o755)
        os.chmod(d, 0o755)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith('desi_transfer_status: error: [Errno 13] Permission denied')
    assert p.stderr.count('\n') == 1 and p.stderr.endswith('; nothing was recorded.\n')
    assert {name: snapshot(d / name) for name in names_of_year(d)} == before


def test_cli_full_disk(tmp_path):
    """A write that fails half-way (here: file size limit) changes nothing."""
    d = tmp_path / 'status'
    s = TransferStatus(str(d), year=2023)
    s.update_many([(NIGHT, e, 'rsync', False) for e in range(20)])
    before = {name: snapshot(d / name) for name in names_of_year(d)}
    limit = os.path.getsize(year_file(d)) + 10

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run([installed_command(), '-d', str(d), NIGHT, '12345', 'checksum'],
                       capture_output=True, text=True, timeout=60, preexec_fn=small_files)
    assert p.returncode == 1
    assert p.stderr.startswith('desi_transfer_status: error: [Errno 27] File too large')
    assert p.stderr.count('\n') == 1
    assert {name: snapshot(d / name) for name in names_of_year(d)} == before


def test_installed_command(tmp_path):
    command = installed_command()
    d = str(tmp_path / 'status')

    def run(*args):
        return subprocess.run([command, '-d', d] + list(args), capture_output=True,
                              text=True, timeout=60)

    p = run(NIGHT, '00012345', 'rsync')
    assert p.returncode == 2 and 'does not exist' in p.stderr
    assert not os.path.exists(d)
    p = run('--create', NIGHT, '00012345', 'rsync')
    assert p.returncode == 0, p.stderr
    assert 'Recorded rsync success of 20230101/00012345' in p.stdout
    assert '(1 record changed)' in p.stdout
    p = run(NIGHT, '12345', 'checksum', '--failure')
    assert p.returncode == 0, p.stderr
    assert on_disk(tmp_path / 'status')[NIGHT]['12345'][0][:2] == [1, 0]
    before = snapshot(year_file(tmp_path / 'status'))
    p = run(NIGHT)
    assert p.returncode == 0 and p.stdout.splitlines()[1].startswith('00012345  ok ')
    p = run(NIGHT, '12399')
    assert p.returncode == 1 and p.stdout == '' and 'is not recorded' in p.stderr
    p = run('20230132', '12345', 'rsync')
    assert p.returncode == 2
    assert p.stderr.splitlines()[-1].startswith('desi_transfer_status: error: NIGHT')
    p = run('--version')
    assert p.returncode == 0 and p.stdout.strip() == f'desi_transfer_status {__version__}'
    assert snapshot(year_file(tmp_path / 'status')) == before


def test_update_many(store, tmp_path, monkeypatch):
    """A batch is applied as the same updates one by one, in one write."""
    clock(monkeypatch, 7000, 8000)
    records = [(NIGHT, f'{e:08d}', stage, e == 3 and stage == 'checksum')
               for e in range(1, 5) for stage in ('rsync', 'checksum')]
    assert store.update_many(records) == 8
    found = store.find(NIGHT)
    assert found['3'] == [[1, 0, 7000], [0, 1, 7000]]
    assert found['4'] == [[1, 1, 7000], [0, 1, 7000]]
    assert store.update_many(records) == 0
    with pytest.raises(ValueError):
        store.update_many([(NIGHT, '5', 'rsync', False), (NIGHT, '6', 'nonsense', False)])
    assert '5' not in store.find(NIGHT)
    assert store.update_many([(NIGHT, 'all', 'backup', False)]) == 4
    assert on_disk(tmp_path / 'status')[NIGHT]['1'][0] == [2, 1, 8000]


def test_update_many_with_times(store, monkeypatch):
    """Each record may carry the time of its outcome."""
    clock(monkeypatch, 9000)
    assert store.update_many([(NIGHT, '7', 'rsync', False, 1500),
                              (NIGHT, '7', 'checksum', False, 2500),
                              (NIGHT, '8', 'rsync', True)]) == 3
    assert store.records(NIGHT, '7') == [[1, 1, 2500], [0, 1, 1500]]
    assert store.records(NIGHT, '8') == [[0, 0, 9000]]
    for bad in ('soon', -1, 1.5, True):
        with pytest.raises(ValueError):
            store.update_many([(NIGHT, '9', 'rsync', False, bad)])
    assert '9' not in store.find(NIGHT)


def test_linked_stage(store, tmp_path, monkeypatch, capsys):
    """Stage linked (3) is when the link appeared at the mountain: recorded
    by the daemon with the link's time, shown last, not recorded by hand."""
    assert store.stages['linked'] == 3
    assert store.update_many([(NIGHT, '12345', 'linked', False, 1_672_628_300_000),
                              (NIGHT, '12345', 'rsync', False, 1_672_628_400_000)]) == 2
    assert store.records(NIGHT, '12345', 'linked') == [[3, 1, 1_672_628_300_000]]
    capsys.readouterr()
    assert run_main(monkeypatch, '-d', str(tmp_path / 'status'), NIGHT) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ['EXPID', 'rsync', 'checksum', 'backup', 'linked']
    assert lines[1].split() == ['00012345', 'ok', '2023-01-02', '03:00:00', 'UTC', '-', '-',
                                'ok', '2023-01-02', '02:58:20', 'UTC']
    before = snapshot(year_file(tmp_path / 'status'))
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, '-d', str(tmp_path / 'status'), NIGHT, '12345', 'linked')
    assert e.value.code == 2
    assert "invalid choice: 'linked'" in capsys.readouterr().err
    assert snapshot(year_file(tmp_path / 'status')) == before


def test_read_status_changes_nothing(store, tmp_path):
    """read_status reads a damaged file from its copy, and repairs nothing."""
    d = tmp_path / 'status'
    assert status.read_status(str(d), 2023) == ({}, '')
    store.update(NIGHT, '1', 'rsync')
    store.update(NIGHT, '2', 'rsync')
    assert list(status.read_status(str(d), 2023)[0][NIGHT]) == ['1', '2']
    year_file(d).write_text('{"broken')
    before = {name: snapshot(d / name) for name in names_of_year(d)}
    data, problem = status.read_status(str(d), 2023)
    assert list(data[NIGHT]) == ['1', '2']
    assert problem.startswith(f'{year_file(d)} is malformed (not valid JSON (')
    assert problem.endswith(f'; read {year_file(d)}.copy instead')
    assert {name: snapshot(d / name) for name in names_of_year(d)} == before
    (d / 'desi_transfer_status_2023.json.copy').write_text('[]')
    data, problem = status.read_status(str(d), 2023)
    assert list(data[NIGHT]) == ['1'] and problem.endswith('.json.bak instead')
    (d / 'desi_transfer_status_2023.json.bak').unlink()
    assert status.read_status(str(d), 2023) == ({}, problem.split(';')[0] + ', and neither '
                                                'its copy nor its .bak can be read; read '
                                                'nothing')
