#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Speed of ``desi_transfer_status --audit YEAR``.

A year of NIGHTS nights of EXPOSURES exposures each, in all four places: the
links at a mountain reached over a real sshd on 127.0.0.1, the exposures at
NERSC (FILES small files and a checksum file each, locked), the status
file (linked, rsync, checksum and backup rows) and one archive per night on
the HPSS emulator of the tests (a real tar file and its index).  The audit of
the year runs as an operator would start it, without ``--deep`` (and with it,
if asked); every run must find the places in agreement.

Prints the best and the median time; exits non-zero if the best is above
``--max`` seconds.
"""
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import ArgumentParser

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, 'tests'))
sys.path.insert(0, os.path.join(TOP, 'py'))

from loopback import start_sshd  # noqa: E402

YEAR = 2025


def nights_of(n):
    """The first `n` nights of :data:`YEAR`."""
    t = time.mktime((YEAR, 1, 1, 12, 0, 0, 0, 0, -1))
    return [time.strftime('%Y%m%d', time.localtime(t + 86400 * i)) for i in range(n)]


def build(work, nights, exposures, files, size, ssh):
    """The four places of a year that agree; the configuration file."""
    mountain, nersc = os.path.join(work, 'mountain'), os.path.join(work, 'nersc')
    data, source = os.path.join(mountain, 'data'), os.path.join(mountain, 'dts')
    destination = os.path.join(nersc, 'data')
    tape = os.path.join(work, 'hpss', 'desi', 'spectro', 'data')
    for d in (source, destination, tape, os.path.join(nersc, 'staging', 'raw'),
              os.path.join(nersc, 'staging', 'status'), os.path.join(nersc, 'scratch')):
        os.makedirs(d)
    records = {}
    expid = 1000
    for night in nights:
        os.makedirs(os.path.join(source, night))
        records[night] = {}
        for _ in range(exposures):
            e = f'{expid:08d}'
            target = os.path.join(data, night, e)
            os.makedirs(target)
            os.symlink(target, os.path.join(source, night, e))
            here = os.path.join(destination, night, e)
            os.makedirs(here)
            lines = []
            for i in range(files):
                name = f'desi-{e}-{i}.fits.fz'
                content = f'{e}:{i}'.encode() * (size // 10 + 1)
                with open(os.path.join(here, name), 'wb') as f:
                    f.write(content[:size])
                lines.append(f'{hashlib.sha256(content[:size]).hexdigest()}  {name}\n')
            with open(os.path.join(here, f'checksum-{e}.sha256sum'), 'w') as f:
                f.write(''.join(lines))
            records[night][str(expid)] = []
            expid += 1
    subprocess.run(['chmod', '-R', 'u=rX,g=rX,o=', destination], check=True)
    subprocess.run(['find', destination, '-type', 'd', '-exec', 'chmod', '2550', '{}', '+'],
                   check=True)
    for night in nights:
        archive = os.path.join(tape, f'desi_spectro_data_{night}.tar')
        subprocess.run(['tar', '-cf', archive, '-C', destination, night], check=True)
        with open(archive + '.idx', 'w') as f:
            json.dump({'archive': archive, 'members': []}, f)
    now = int(time.time() * 1000) + 1000
    for night, exposures_ in records.items():
        for e in exposures_:
            exposures_[e] = [[2, 1, now], [1, 1, now], [0, 1, now], [3, 1, now - 30_000]]
    with open(os.path.join(nersc, 'staging', 'status', f'desi_transfer_status_{YEAR}.json'),
              'w') as f:
        json.dump(records, f, separators=(',', ':'))
    config = os.path.join(work, 'daemon.ini')
    with open(config, 'w') as f:
        f.write(f"""[DESI_SPECTRO_DATA]
source = {source}
staging = {nersc}/staging/raw
destination = {destination}
hpss = desi/spectro/data
checksum_file = checksum-{{exposure}}.sha256sum
[common]
host = dts
ssh = {ssh}
temporary = {nersc}/scratch
checksum_lock = {mountain}/checksum-running
catchup = 14
backup = 20
sleep = 1
hpss = {os.path.join(TOP, 'tests', 'hpss')}
hpss_status = http://127.0.0.1:9/status
[logging]
filename = {nersc}/daemon.log
size = 100000000
backups = 1
to =
""")
    return config


def main():
    prsr = ArgumentParser(description=__doc__.split('\n')[1])
    prsr.add_argument('--nights', type=int, default=300)
    prsr.add_argument('--exposures', type=int, default=100, help="per night")
    prsr.add_argument('--files', type=int, default=3, help="data files per exposure")
    prsr.add_argument('--size', type=int, default=64, help="bytes per file")
    prsr.add_argument('--repeat', type=int, default=3, help="runs of the audit")
    prsr.add_argument('--deep', action='store_true', help="also time --deep once")
    prsr.add_argument('--max', type=float, default=30.0,
                      help="fail if the best audit takes longer (default %(default)s s)")
    options = prsr.parse_args()
    work = tempfile.mkdtemp(prefix='bench_audit.')
    dts = None
    try:
        os.makedirs(os.path.join(work, 'sshd'))
        dts = start_sshd(os.path.join(work, 'sshd'))
        t0 = time.perf_counter()
        config = build(work, nights_of(options.nights), options.exposures, options.files,
                       options.size, dts.ssh)
        print(f"Built {options.nights} nights x {options.exposures} exposures x "
              f"{options.files + 1} files in {time.perf_counter() - t0:.1f} s.")
        command = [shutil.which('desi_transfer_status', path=os.path.dirname(sys.executable)
                                + ':' + os.environ['PATH']), '-c', config,
                   '--audit', str(YEAR)]
        env = dict(os.environ, HPSS_EMULATOR_ROOT=os.path.join(work, 'hpss'))
        times = []
        for _ in range(options.repeat):
            t0 = time.perf_counter()
            p = subprocess.run(command, env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if p.returncode != 0:
                print(p.stdout[-3000:], p.stderr[-3000:])
                return 2
        print(p.stdout.splitlines()[0])
        print(f"desi_transfer_status --audit {YEAR}: best {min(times):.1f} s, median "
              f"{statistics.median(times):.1f} s of {options.repeat}")
        if options.deep:
            t0 = time.perf_counter()
            p = subprocess.run(command + ['--deep'], env=env, capture_output=True, text=True)
            print(f"desi_transfer_status --audit {YEAR} --deep: {time.perf_counter() - t0:.1f} "
                  f"s (exit status {p.returncode:d})")
        ok = min(times) <= options.max
        print('PASS' if ok else 'FAIL', f'(target: under {options.max:g} s)')
        return 0 if ok else 1
    finally:
        if dts is not None:
            dts.process.terminate()
        subprocess.run(['chmod', '-R', 'u+rwX', work])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
