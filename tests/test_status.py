# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of desitransfer.status: the status store, its recovery, concurrency and CLI."""
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from desitransfer import __version__, status
from desitransfer.common import configure_log, log
from desitransfer.status import TransferStatus, _options, main

NIGHT = '20230101'


def clock(monkeypatch, *times):
    """Make the store see these times (ms), one per update that changes something."""
    values = iter(times)
    monkeypatch.setattr(status, '_milliseconds', lambda: next(values))


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
    # The four documented shapes of find().
    assert store.find(NIGHT) == expected[NIGHT]
    assert store.find(NIGHT, stage='rsync') == {'12345': [[0, 1, 1000]], '12346': [[0, 1, 3000]]}
    assert store.find(NIGHT, stage='backup') == {'12345': [[2, 1, 5000]], '12346': []}
    assert store.find(NIGHT, exposure='00012345') == expected[NIGHT]['12345']
    assert store.find(NIGHT, 12345, 'checksum') == [[1, 0, 2000]]
    assert store.find(NIGHT, '12346', 'checksum') == []
    assert store.find(NIGHT, '99999') == []
    with pytest.raises(KeyError):
        store.find('20230103')
    # Results are copies: changing them changes nothing stored.
    store.find(NIGHT, '12345')[0][1] = 0
    assert store.find(NIGHT, '12345', 'backup') == [[2, 1, 5000]]


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
    assert store.find(NIGHT, '12345') == [[0, 1, 1000]]
    # A different outcome replaces the row: still one row per stage.
    assert store.update(NIGHT, '12345', 'rsync', failure=True) == 1
    assert store.find(NIGHT, '12345') == [[0, 0, 2000]]


def test_newest_row_first(store, monkeypatch):
    clock(monkeypatch, 1000, 2000, 3000, 4000)
    for stage in ('rsync', 'checksum', 'backup'):
        store.update(NIGHT, '5', stage)
    store.update(NIGHT, '5', 'rsync', failure=True)
    assert store.find(NIGHT, '5') == [[0, 0, 4000], [2, 1, 3000], [1, 1, 2000]]


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
    assert store.find(NIGHT, stage='backup') == {'1': [[2, 1, 5]], '2': [[2, 1, 4]],
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
    assert s.find('20210518', '00088014', 'checksum') == [[1, 0, 1621400626001]]
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
    assert store.find('20241231', '9') == [[0, 1, 2]]
    assert '20241231' not in store.status


def test_backup_is_previous_version(store, tmp_path):
    d = tmp_path / 'status'
    store.update(NIGHT, '1', 'rsync')
    first = year_file(d).read_bytes()
    store.update(NIGHT, '2', 'rsync')
    assert (d / 'desi_transfer_status_2023.json.bak').read_bytes() == first
    assert sorted(p.name for p in d.iterdir() if 'desi_transfer_status_2023' in p.name) == \
        ['.desi_transfer_status_2023.lock', 'desi_transfer_status_2023.json',
         'desi_transfer_status_2023.json.bak']


def test_other_writers_are_seen(tmp_path):
    a = TransferStatus(str(tmp_path), year=2023)
    b = TransferStatus(str(tmp_path), year=2023)
    a.update(NIGHT, '1', 'rsync')
    b.update(NIGHT, '2', 'rsync')
    assert sorted(a.find(NIGHT)) == ['1', '2']
    a.update(NIGHT, '3', 'rsync')
    assert sorted(on_disk(tmp_path)[NIGHT]) == ['1', '2', '3']


def test_truncated_file_restored_from_backup(tmp_path, caplog, monkeypatch):
    d = tmp_path / 'status'
    s = TransferStatus(str(d), year=2023)
    clock(monkeypatch, 1, 2, 3, 4, 5)
    for e in ('1', '2', '3'):
        s.update(NIGHT, e, 'rsync')
    good = on_disk(d)
    bak = (d / 'desi_transfer_status_2023.json.bak').read_bytes()
    truncated = year_file(d).read_bytes()[:40]
    year_file(d).write_bytes(truncated)
    caplog.set_level(logging.INFO)
    r = TransferStatus(str(d), year=2023)
    assert (d / 'desi_transfer_status_2023.json.bad').read_bytes() == truncated
    assert year_file(d).read_bytes() == bak
    assert (d / 'desi_transfer_status_2023.json.bak').read_bytes() == bak
    assert r.status == {NIGHT: {'1': good[NIGHT]['1'], '2': good[NIGHT]['2']}}
    errors = [m for m in caplog.records if m.levelno == logging.ERROR]
    assert errors and str(year_file(d)) in errors[-1].getMessage()
    assert 'restored 1 nights' in errors[-1].getMessage()
    assert not [m for m in caplog.records if m.levelno == logging.CRITICAL]
    # The store carries on, and the old object re-reads the repaired file.
    assert s.update(NIGHT, '3', 'rsync') == 1
    assert r.update(NIGHT, '4', 'rsync') == 1
    assert sorted(on_disk(d)[NIGHT]) == ['1', '2', '3', '4']


def test_malformed_file_found_during_update(store, tmp_path, caplog):
    d = tmp_path / 'status'
    store.update(NIGHT, '1', 'rsync')
    store.update(NIGHT, '2', 'rsync')
    year_file(d).write_text('["not", "the status format"]')
    caplog.set_level(logging.ERROR)
    assert store.update(NIGHT, '3', 'rsync') == 1
    assert sorted(on_disk(d)[NIGHT]) == ['1', '3']
    assert (d / 'desi_transfer_status_2023.json.bad').read_text() == '["not", "the status format"]'
    assert 'top level is list' in caplog.text


def test_missing_file_restored_from_backup(store, tmp_path, caplog):
    d = tmp_path / 'status'
    store.update(NIGHT, '1', 'rsync')
    store.update(NIGHT, '2', 'rsync')
    year_file(d).unlink()
    caplog.set_level(logging.ERROR)
    assert TransferStatus(str(d), year=2023).status == {NIGHT: {'1': [[0, 1, pytest.approx(
        time.time() * 1000, abs=60000)]]}}
    assert 'is missing but' in caplog.text


def test_no_good_copy_starts_empty(tmp_path, caplog):
    d = tmp_path / 'status'
    d.mkdir()
    year_file(d).write_text('{"20230101": {"1": [[0, 1, 16')
    caplog.set_level(logging.INFO)
    s = TransferStatus(str(d), year=2023)
    assert s.status == {}
    assert year_file(d).read_text() == '{}'
    assert (d / 'desi_transfer_status_2023.json.bad').read_text() == '{"20230101": {"1": [[0, 1, 16'
    critical = [m.getMessage() for m in caplog.records if m.levelno == logging.CRITICAL]
    assert len(critical) == 1 and str(year_file(d)) in critical[0]
    assert 'EMPTY' in critical[0]
    # A second incident keeps the first .bad and keeps the malformed backup too.
    s.update(NIGHT, '1', 'rsync')
    (d / 'desi_transfer_status_2023.json.bak').write_text('garbage')
    year_file(d).write_text('more garbage')
    assert TransferStatus(str(d), year=2023).status == {}
    assert (d / 'desi_transfer_status_2023.json.bad').read_text() == '{"20230101": {"1": [[0, 1, 16'
    assert (d / 'desi_transfer_status_2023.json.bad.1').read_text() == 'more garbage'
    assert (d / 'desi_transfer_status_2023.json.bak.bad').read_text() == 'garbage'


def test_handle_malformed_directly(store, tmp_path):
    store.update(NIGHT, '1', 'rsync')
    store.update(NIGHT, '2', 'rsync')
    assert store._handle_malformed() == {NIGHT: {'1': store.find(NIGHT, '1')}}
    assert (tmp_path / 'status' / 'desi_transfer_status_2023.json.bad').exists()


CHILD = """
import os, sys, time
from desitransfer.status import TransferStatus
directory, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = TransferStatus(directory, year=2023)
while not os.path.exists(os.path.join(directory, 'go')):
    time.sleep(0.001)
for i in range(n):
    s.update('20230101', worker * 1000 + i, 'rsync')
    s.update('20230102', worker * 1000 + i, 'checksum', failure=bool(i % 2))
"""


def test_concurrent_processes(tmp_path):
    workers, n = 5, 30
    d = tmp_path / 'status'
    TransferStatus(str(d), year=2023)
    procs = [subprocess.Popen([sys.executable, '-c', CHILD, str(d), str(w), str(n)],
                              stderr=subprocess.PIPE, text=True) for w in range(workers)]
    time.sleep(1)
    (d / 'go').touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    data = on_disk(d)
    ids = {str(w * 1000 + i) for w in range(workers) for i in range(n)}
    assert set(data['20230101']) == ids
    assert set(data['20230102']) == ids
    assert all(rows[0][:2] == [0, 1] for rows in data['20230101'].values())
    assert all(rows[0][:2] == [1, int(e) % 1000 % 2 == 0]
               for e, rows in data['20230102'].items())
    json.loads((d / 'desi_transfer_status_2023.json.bak').read_text())
    assert not [p.name for p in d.iterdir() if p.name.endswith('.tmp')]


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
    monkeypatch.setattr(status, '_page_source', lambda: source)
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
    source = status._page_source()
    shipped = [name for name in status.PAGE_FILES if (source / name).is_file()]
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
    o = _options([NIGHT, '00012345', 'checksum', '-f'])
    assert (o.night, o.expid, o.stage, o.failure, o.install, o.verbose) == \
        (NIGHT, '00012345', 'checksum', True, False, False)
    assert o.directory == os.path.join(str(tmp_path), 'spectro', 'staging', 'status')
    assert _options(['-d', '/x', NIGHT, 'all', 'backup']).expid == 'all'
    monkeypatch.delenv('DESI_ROOT')
    with pytest.raises(SystemExit):
        _options([NIGHT, '1', 'rsync'])
    assert 'DESI_ROOT is not set' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _options(['-V'])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f'{os.path.basename(sys.argv[0])} {__version__}'


def test_cli_record_and_show(tmp_path, monkeypatch, capsys):
    d = str(tmp_path / 'status')
    assert run_main(monkeypatch, '-d', d, NIGHT, '00012345', 'rsync') == 0
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
    assert lines[0].split() == ['EXPID', 'rsync', 'checksum', 'backup']
    when = dt.datetime.fromtimestamp(data['12345'][1][2] / 1000, dt.timezone.utc)
    assert lines[1].startswith('00012345')
    assert f"FAILED {when:%Y-%m-%d %H:%M:%S} UTC" in lines[1]
    assert lines[2].startswith('00012346') and 'FAILED' not in lines[2]
    assert lines[2].split()[5] == '-'  # no checksum recorded
    assert len(lines) == 3
    assert run_main(monkeypatch, '-d', d, NIGHT, '12346') == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith('00012346')
    assert run_main(monkeypatch, '-d', d, '20230105') == 1
    assert 'error: night 20230105 is not in' in capsys.readouterr().err
    assert run_main(monkeypatch, '-d', d, '20230105', 'all', 'backup') == 1
    assert snapshot(year_file(tmp_path / 'status')) == before


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


def test_cli_unwritable_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / 'file').write_text('not a directory')
    assert run_main(monkeypatch, '-d', str(tmp_path / 'file' / 'status'), NIGHT, '1', 'rsync') == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('desi_transfer_status: error: ') and '\n' not in err
    assert (tmp_path / 'file').read_text() == 'not a directory'


@pytest.mark.skipif(os.geteuid() == 0, reason='permission bits do not stop root')
def test_cli_read_only_directory(tmp_path, monkeypatch, capsys):
    d = tmp_path / 'status'
    TransferStatus(str(d), year=2023).update(NIGHT, '1', 'rsync')
    before = snapshot(year_file(d))
    d.chmod(0o555)
    try:
        assert run_main(monkeypatch, '-d', str(d), NIGHT, '2', 'rsync') == 1
    finally:
        d.chmod(0o755)
    assert capsys.readouterr().err.startswith('desi_transfer_status: error: ')
    assert snapshot(year_file(d)) == before


def test_installed_command(tmp_path):
    command = shutil.which('desi_transfer_status',
                           path=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    assert command, 'desi_transfer_status is not installed'
    d = str(tmp_path / 'status')

    def run(*args):
        return subprocess.run([command, '-d', d] + list(args), capture_output=True,
                              text=True, timeout=60)

    p = run(NIGHT, '00012345', 'rsync')
    assert p.returncode == 0, p.stderr
    assert 'Recorded rsync success of 20230101/00012345' in p.stdout
    p = run(NIGHT, '12345', 'checksum', '--failure')
    assert p.returncode == 0, p.stderr
    assert on_disk(tmp_path / 'status')[NIGHT]['12345'][0][:2] == [1, 0]
    before = snapshot(year_file(tmp_path / 'status'))
    p = run(NIGHT)
    assert p.returncode == 0 and p.stdout.splitlines()[1].startswith('00012345  ok ')
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
    assert store.find(NIGHT, '7') == [[1, 1, 2500], [0, 1, 1500]]
    assert store.find(NIGHT, '8') == [[0, 0, 9000]]
    for bad in ('soon', -1, 1.5, True):
        with pytest.raises(ValueError):
            store.update_many([(NIGHT, '9', 'rsync', False, bad)])
    assert '9' not in store.find(NIGHT)
