# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===============================
Benchmark of the status store
===============================

Time :meth:`desitransfer.status.TransferStatus.update` of one new record in a
year file of 40,000 exposures x 3 rows, against the fastest bare round trip
the standard library offers for the same file: :func:`json.loads` + compact
:func:`json.dumps` + one write.  The update includes everything it does for
real: the lock, reading and parsing the file, writing and fsync'ing the copy
and the new file, keeping the ``.bak``, the atomic renames and the fsync of
the directory.

For information, it also times :func:`json.load` + :func:`json.dump` (which
streams through the pure-Python encoder), and the two ways of keeping every
update safe from a damaged status file: writing a second complete copy (what
the store does) and appending the update to a journal, each with its fsync.

Usage::

    python benchmarks/bench_status.py
    python benchmarks/bench_status.py --tmpdir /path/on/the/real/filesystem

The exit status is non-zero if the update is more than 1.5 times slower than
``json.loads`` + compact ``json.dumps``.
"""
import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time

from desitransfer.status import TransferStatus

YEAR = 2023


def options(args=None):
    parser = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]),
                                     description=__doc__.split('\n\n')[1])
    parser.add_argument('--exposures', type=int, default=40000, metavar='N',
                        help='Exposures in the year file (default %(default)s).')
    parser.add_argument('--repeat', type=int, default=7, metavar='N',
                        help='Keep the best of N timed runs (default %(default)s).')
    parser.add_argument('--max-ratio', type=float, default=1.5, metavar='R',
                        help='Fail above this time ratio to json.loads + compact '
                             'json.dumps (default %(default)s).')
    parser.add_argument('--tmpdir', metavar='DIR',
                        help='Write the year file under DIR (default: the system default).')
    return parser.parse_args(args)


def year_of_records(exposures):
    """A year of records: `exposures` exposures, 3 rows each, over 365 nights."""
    data = {}
    start = dt.datetime(YEAR, 1, 1, 19, tzinfo=dt.timezone.utc)
    for i in range(exposures):
        day = i * 365 // exposures
        night = (start + dt.timedelta(days=day)).strftime('%Y%m%d')
        ms = int((start + dt.timedelta(days=day)).timestamp() * 1000) + 600_000 * (i % 100)
        data.setdefault(night, {})[str(100000 + i)] = [[2, 1, ms + 60_000_000],
                                                       [1, 1, ms + 40_000],
                                                       [0, 1, ms + 20_000]]
    return data


def best(functions, repeat):
    """Best time of each function; runs are interleaved so that they share the load."""
    times = [[] for _ in functions]
    for _ in range(repeat):
        for function, t in zip(functions, times):
            t0 = time.perf_counter()
            function()
            t.append(time.perf_counter() - t0)
    return [min(t) for t in times]


def main():
    o = options()
    directory = tempfile.mkdtemp(prefix='bench_status_', dir=o.tmpdir)
    try:
        status_dir = os.path.join(directory, 'status')
        os.makedirs(status_dir)
        path = os.path.join(status_dir, f'desi_transfer_status_{YEAR:d}.json')
        with open(path, 'w') as f:
            json.dump(year_of_records(o.exposures), f, separators=(',', ':'))
        copy = os.path.join(directory, 'copy.json')

        def bare():
            with open(path) as f:
                data = json.load(f)
            with open(copy, 'w') as f:
                json.dump(data, f)

        def fastest():
            with open(path, 'rb') as f:
                data = json.loads(f.read())
            with open(copy, 'w') as f:
                f.write(json.dumps(data, separators=(',', ':')))

        status = TransferStatus(status_dir, year=YEAR)
        expids = iter(range(10_000_000, 20_000_000))

        def update():
            assert status.update(f'{YEAR:d}0704', next(expids), 'rsync') == 1

        with open(path, 'rb') as f:
            text = f.read()

        def second_copy():
            with open(copy + '.tmp', 'wb') as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(copy + '.tmp', copy)

        def journal():
            with open(os.path.join(directory, 'journal'), 'ab') as f:
                f.write(f'["{YEAR:d}0704","{next(expids):d}",0,1,1688500000000]\n'.encode())
                f.flush()
                os.fsync(f.fileno())

        t_bare, t_fastest, t_update, t_copy, t_journal = best(
            [bare, fastest, update, second_copy, journal], o.repeat)
        ratio = t_update / t_fastest
        size = os.path.getsize(path) / 1e6
        print(f"year file: {o.exposures:d} exposures x 3 rows, {size:.1f} MB, in {directory}")
        print(f"json.loads + compact json.dumps:       {t_fastest * 1000:8.1f} ms")
        print(f"json.load + json.dump:                 {t_bare * 1000:8.1f} ms")
        print(f"TransferStatus.update (one record):    {t_update * 1000:8.1f} ms")
        print(f"  its second complete copy alone:      {t_copy * 1000:8.1f} ms "
              "(write, fsync, rename)")
        print(f"  a journal line instead would cost:   {t_journal * 1000:8.1f} ms "
              "(append, fsync)")
        print(f"ratio update / loads+compact dumps:    {ratio:8.2f} (limit {o.max_ratio:g})")
        print(f"ratio update / load+dump:              {t_update / t_bare:8.2f}")
    finally:
        shutil.rmtree(directory)
    return 0 if ratio <= o.max_ratio else 1


if __name__ == '__main__':
    sys.exit(main())
