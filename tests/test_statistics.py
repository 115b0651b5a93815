# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of ``desi_transfer_status --statistics`` and of the latencies
(:mod:`desitransfer.statistics`) on a known tree."""
import json
import os
import subprocess

import pytest

from desitransfer.statistics import (latencies, latency, parse_period, percentile,
                                     statistics)
from desitransfer.status import TransferStatus

LINKED, RSYNC, CHECKSUM, BACKUP = 3, 0, 1, 2

#: The known tree: night -> {exposure: (files, bytes per file)}.
TREE = {'20250930': {'00000001': (2, 100)},                      # FY2025
        '20251001': {'00000002': (3, 1000), '00000003': (1, 10)},
        '20251231': {'00000004': (4, 2500)},
        '20260101': {'00000005': (2, 7)},
        '20260930': {'00000006': (1, 1)},
        '20261001': {'00000007': (5, 5)}}                         # FY2027

#: Latency in seconds of each exposure (None: no linked row).
LATENCY = {'00000001': 3.0, '00000002': 10.0, '00000003': 30.0, '00000004': None,
           '00000005': 4.5, '00000006': 100.0, '00000007': 7.0}


def write_config(top):
    config = os.path.join(top, 'daemon.ini')
    with open(config, 'w') as f:
        f.write(f"""[DESI_SPECTRO_DATA]
source = /data/dts/exposures/raw
staging = {top}/staging/raw
destination = {top}/data
hpss = desi/spectro/data
checksum_file = checksum-{{exposure}}.sha256sum

[common]
host = dts
ssh = ssh
temporary = {top}
checksum_lock = /tmp/checksum-running
catchup = 14
backup = 20
sleep = 1
hpss =
hpss_status = http://127.0.0.1:9/status

[logging]
filename = {top}/logs/desi_transfer_daemon.log
size = 1000
backups = 1
to =
""")
    return config


@pytest.fixture
def tree(tmp_path):
    """The known tree at NERSC, its status records and a configuration."""
    top = str(tmp_path)
    status = TransferStatus(os.path.join(top, 'staging', 'status'))
    records = []
    for night, exposures in TREE.items():
        for expid, (files, size) in exposures.items():
            directory = os.path.join(top, 'data', night, expid)
            os.makedirs(os.path.join(directory, 'sub'))
            for i in range(files):
                name = f'file{i}.fits' if i else 'sub/in-a-subdirectory.fits'
                with open(os.path.join(directory, name), 'wb') as f:
                    f.write(b'x' * size)
            os.symlink('/etc/passwd', os.path.join(directory, 'link'))  # not counted
            t = int(night) * 10 ** 3
            records += [(night, expid, 'rsync', False, t), (night, expid, 'checksum', False,
                                                            t + 20_000)]
            if LATENCY[expid] is not None:
                records.append((night, expid, 'linked', False,
                                int(t + 20_000 - LATENCY[expid] * 1000)))
    os.makedirs(os.path.join(top, 'data', '20251001', 'not-an-exposure'))
    os.makedirs(os.path.join(top, 'data', 'not-a-night'))
    status.update_many(records)
    return top


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([7], 95) == 7
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)
    assert percentile(list(range(101)), 95) == 95


def test_latencies(tmp_path):
    status = TransferStatus(str(tmp_path / 'status'), year=2026)
    night = '20260105'
    status.update_many([(night, '12', 'linked', False, 1_000), (night, '12', 'checksum', False,
                                                                13_500),
                        (night, '3', 'linked', False, 5_000), (night, '3', 'checksum', False,
                                                               7_000),
                        (night, '4', 'checksum', False, 9_000),            # no link time
                        (night, '5', 'linked', False, 1_000), (night, '5', 'checksum', True,
                                                               2_000)])   # not verified
    assert latencies(status, night) == [2.0, 12.5]
    assert latencies(status.status, night) == [2.0, 12.5]
    assert latencies(status, '20260106') == []
    assert latency([[1, 1, 3000], [3, 1, 1000], [0, 1, 2000]]) == 2.0
    assert latency([[1, 1, 3000], [0, 1, 2000]]) is None
    assert latency('garbage') is None and latency([['x'], [3, 1, 'soon'], [1, 1, 5]]) is None


def test_periods():
    assert parse_period('2026') == ('2026', '20260101', '20261231')
    assert parse_period('FY2026') == ('FY2026', '20251001', '20260930')
    assert parse_period('fy2026') == ('FY2026', '20251001', '20260930')
    for bad in ('26', 'FY26', '2026x', 'FY', 'CY2026', '1969'):
        with pytest.raises(ValueError):
            parse_period(bad)


def expected(nights):
    exposures = [(e, TREE[n][e]) for n in nights for e in TREE[n]]
    values = [LATENCY[e] for e, _ in exposures if LATENCY[e] is not None]
    return {'nights': len(nights), 'exposures': len(exposures),
            'files': sum(f for _, (f, _) in exposures),
            'bytes': sum(f * s for _, (f, s) in exposures),
            'latency': {'count': len(values), 'p50': percentile(values, 50),
                        'p95': percentile(values, 95), 'max': max(values) if values else None}}


def test_fiscal_year(tree):
    config = write_config(tree)
    found = statistics(config, 'FY2026')
    assert (found['period'], found['first'], found['last']) == ('FY2026', '20251001',
                                                                '20260930')
    section = found['sections']['DESI_SPECTRO_DATA']
    assert section['destination'] == os.path.join(tree, 'data')
    assert section['status'] == os.path.join(tree, 'staging', 'status')
    assert section['notes'] == []
    assert list(section['months']) == ['2025-10', '2025-11', '2025-12'] + \
        [f'2026-{m:02d}' for m in range(1, 10)]
    assert section['months']['2025-10'] == expected(['20251001'])
    assert section['months']['2025-11'] == expected([])
    assert section['months']['2025-12'] == expected(['20251231'])
    assert section['months']['2026-01'] == expected(['20260101'])
    assert section['months']['2026-09'] == expected(['20260930'])
    assert section['total'] == expected(['20251001', '20251231', '20260101', '20260930'])
    assert section['total']['latency'] == {'count': 4, 'p50': 20.0, 'p95': 89.5, 'max': 100.0}
    calendar = statistics(config, '2026')['sections']['DESI_SPECTRO_DATA']
    assert calendar['total'] == expected(['20260101', '20260930', '20261001'])


def run_command(tree, *args):
    return subprocess.run(['desi_transfer_status', '-c', write_config(tree)] + list(args),
                          capture_output=True, text=True, timeout=60)


def test_statistics_command(tree):
    p = run_command(tree, '--statistics', 'FY2026')
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == ('Statistics of FY2026 (nights 20251001 to 20260930); latency from the '
                        'link at the mountain to the verified checksum at NERSC.')
    assert lines[2] == (f"[DESI_SPECTRO_DATA] exposures in {tree}/data, status in "
                        f"{tree}/staging/status")
    assert lines[3].split() == ['MONTH', 'NIGHTS', 'EXPOSURES', 'FILES', 'BYTES', 'LATENCY',
                                'N', 'p50', 'p95', 'max']
    assert lines[4].split() == ['2025-10', '1', '2', '4', '3,010', '2', '20.0', 's', '29.0',
                                's', '30.0', 's']
    assert lines[5].split() == ['2025-11', '0', '0', '0', '0', '0', '-', '-', '-']
    assert lines[-1].split() == ['total', '4', '5', '11', '13,025', '4', '20.0', 's', '89.5',
                                 's', '100.0', 's']
    p = run_command(tree, '--statistics', 'FY2026', '--json')
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == json.loads(json.dumps(statistics(write_config(tree),
                                                                    'FY2026')))


def test_unreadable_directories_are_noted(unprivileged):
    """What cannot be read is said, not silently left out of the counts."""
    top = unprivileged.directory()
    p = unprivileged.run(f"""import json, os
from desitransfer.statistics import destination_counts
top = {top!r}
for d in ('20260101/00000001/sub', '20260102/00000002'):
    os.makedirs(os.path.join(top, d))
    open(os.path.join(top, d, 'f'), 'w').close()
os.chmod(top + '/20260101/00000001/sub', 0o300)
os.chmod(top + '/20260102', 0o300)
print(json.dumps(destination_counts(top, '20260101', '20261231')))
""")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == [
        {'20260101': [1, 0, 0]},
        [f'{top}/20260101/00000001/sub cannot be listed: Permission denied',
         f'{top}/20260102 cannot be listed: Permission denied']]


@pytest.mark.parametrize('args, message', [
    (['--statistics', 'FY26'], "--statistics takes a year (YYYY) or a DOE fiscal year "
                               "(FYYYYY, such as FY2026), not 'FY26'."),
    (['--statistics', '2026', '--deep'], "--deep does not go with --statistics."),
    (['--statistics', '2026', '20260101'], "--statistics takes no NIGHT EXPID STAGE "
                                           "arguments (found '20260101')."),
    (['--statistics', '2026', '-i'], "-i/--install does not go with --statistics.")])
def test_bad_input(tree, args, message):
    p = run_command(tree, *args)
    assert p.returncode == 2
    assert p.stdout == ''
    assert p.stderr.splitlines()[-1] == f'desi_transfer_status: error: {message}'
