#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Latency of desi_transfer_daemon: from the moment an exposure is linked at the
mountain to the moment it is verified at NERSC; and the cost of a pass that
finds nothing new.

Over a real sshd on 127.0.0.1, the daemon runs as operators run it (a loop,
``sleep = 10s``), while exposures are linked at random intervals.  Measured
in the same run:

* floor: one rsync of one exposure over an open ssh connection;
* latency: for each exposure, its verification time minus its link time, both
  from the status store (stages ``linked`` and ``checksum``): median, 95th
  percentile and longest;
* idle pass: the CPU time (the daemon and the commands it runs) per pass
  with nothing new, with 10 and with 2,000 nights of history at the mountain
  and at NERSC.

Exits non-zero unless the median latency is within the floor plus 5 s and an
idle pass costs at most 50 ms of CPU, the same (within 20%) with 2,000 nights
as with 10.
"""
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from argparse import ArgumentParser

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, 'tests'))
sys.path.insert(0, os.path.join(TOP, 'py'))

from bench_backlog import configuration as backlog_configuration  # noqa: E402
from loopback import start_sshd  # noqa: E402
from desitransfer.common import rsync_ssh, ssh_command  # noqa: E402
from desitransfer.mountain import exposure_files, make_exposure  # noqa: E402
from desitransfer.statistics import percentile  # noqa: E402

#: Tonight at the mountain (the night rolls over at 19:00 UTC).
TONIGHT = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=19)).strftime('%Y%m%d')


def configuration(work, mountain, dts, sleep):
    """The daemon's configuration for `mountain`, polling every `sleep`, with
    catch-up and archive disabled; the file and the NERSC tree."""
    return backlog_configuration(work, os.path.join(mountain, 'dts'), dts.ssh, catchup=30,
                                 backup=30, sleep=sleep, hpss='',
                                 hpss_status='http://127.0.0.1:9/',
                                 checksum_lock=os.path.join(mountain, 'checksum-running'))


def history(mountain, nersc, nights):
    """`nights` settled nights before tonight: linked at the mountain, installed at NERSC."""
    today = dt.datetime.strptime(TONIGHT, '%Y%m%d')
    for n in range(nights):
        night = (today - dt.timedelta(days=n + 1)).strftime('%Y%m%d')
        expid = f'{900000 + n:08d}'
        make_exposure(os.path.join(mountain, 'data'), os.path.join(mountain, 'dts'), night,
                      expid, files=exposure_files(expid, nfiles=1, size=64))
        os.makedirs(os.path.join(nersc, 'data', night, expid))


def daemon_command(config, work):
    daemon = shutil.which('desi_transfer_daemon',
                          path=os.path.dirname(sys.executable) + ':' + os.environ['PATH'])
    return [daemon, '-c', config, '-k', os.path.join(work, 'stop')]


def cpu_seconds(pid):
    """User and system CPU seconds of process `pid` and of its reaped children."""
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf('SC_CLK_TCK')


def idle_cost(dts, nights, seconds):
    """CPU seconds per pass of a daemon that finds nothing new, with `nights` of history."""
    work = tempfile.mkdtemp(prefix='bench_latency_idle.')
    try:
        mountain = os.path.join(work, 'mountain')
        config, nersc = configuration(work, mountain, dts, '1s')
        history(mountain, nersc, nights)
        os.makedirs(os.path.join(mountain, 'dts', TONIGHT), exist_ok=True)
        proc = subprocess.Popen(daemon_command(config, work) + ['--debug'],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = os.path.join(nersc, 'daemon.log')

        def passes():
            if not os.path.exists(log):
                return 0
            with open(log) as f:
                return f.read().count('Sleeping')
        try:
            while passes() < 3:  # settled: connection open, first start done
                time.sleep(0.1)
            n0, c0 = passes(), cpu_seconds(proc.pid)
            time.sleep(seconds)
            n1, c1 = passes(), cpu_seconds(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        return (c1 - c0) / (n1 - n0), n1 - n0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def latency(dts, exposures, nfiles, size, gap):
    """Floor, and the latency of each of `exposures` exposures linked at random
    intervals (uniform up to `gap` seconds) while the daemon runs."""
    work = tempfile.mkdtemp(prefix='bench_latency.')
    try:
        mountain = os.path.join(work, 'mountain')
        config, nersc = configuration(work, mountain, dts, '10s')
        data, source = os.path.join(mountain, 'data'), os.path.join(mountain, 'dts')
        # The floor: one exposure, rsync over an open connection.
        expid = '00090000'
        make_exposure(data, source, TONIGHT, expid, link=False,
                      files=exposure_files(expid, nfiles=nfiles, size=size))
        control = os.path.join(work, 'mux')
        ssh = ssh_command(dts.ssh, control=control)
        subprocess.run(ssh + ['dts', 'true'], check=True)
        floors = []
        for r in range(3):
            t0 = time.perf_counter()
            subprocess.run(rsync_ssh(['/bin/rsync', '--recursive', '--times',
                                      f'dts:{data}/{TONIGHT}/{expid}/', f'{work}/floor{r}/'],
                                     ssh), check=True, stdout=subprocess.DEVNULL)
            floors.append(time.perf_counter() - t0)
        subprocess.run(ssh_command(dts.ssh) + ['-o', f'ControlPath={control}', '-O', 'exit',
                                               'dts'], capture_output=True)
        os.makedirs(os.path.join(source, TONIGHT), exist_ok=True)
        proc = subprocess.Popen(daemon_command(config, work), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        expids = [f'{91000 + j:08d}' for j in range(exposures)]
        try:
            time.sleep(3)
            for e in expids:
                time.sleep(random.uniform(0, gap))
                make_exposure(data, source, TONIGHT, e,
                              files=exposure_files(e, nfiles=nfiles, size=size))
            status = os.path.join(nersc, 'staging', 'status', f'desi_transfer_status_{TONIGHT[:4]}.json')
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    with open(status) as f:
                        night = json.load(f).get(TONIGHT, {})
                except (OSError, ValueError):
                    night = {}
                if all(any(r[0] == 1 for r in night.get(str(int(e)), [])) for e in expids):
                    break
                time.sleep(0.5)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        found = []
        for e in expids:
            rows = {r[0]: r[2] for r in night.get(str(int(e)), [])}
            if 1 in rows and 3 in rows:
                found.append((rows[1] - rows[3]) / 1000)
        return min(floors), found
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    prsr = ArgumentParser(description=__doc__.split('\n')[0])
    prsr.add_argument('--exposures', type=int, default=12, help="exposures linked (default %(default)s)")
    prsr.add_argument('--gap', type=float, default=12.0,
                      help="longest random gap between two links, seconds (default %(default)s)")
    prsr.add_argument('--files', type=int, default=10, help="files per exposure (default %(default)s)")
    prsr.add_argument('--size', type=int, default=1 << 20, help="bytes per file (default %(default)s)")
    prsr.add_argument('--idle-seconds', type=float, default=20.0,
                      help="seconds of each idle measurement (default %(default)s)")
    prsr.add_argument('--seed', type=int, default=1)
    options = prsr.parse_args()
    random.seed(options.seed)
    sshd = tempfile.mkdtemp(prefix='bench_latency_sshd.')
    dts = start_sshd(sshd)
    try:
        floor, found = latency(dts, options.exposures, options.files, options.size, options.gap)
        small, n_small = idle_cost(dts, 10, options.idle_seconds)
        large, n_large = idle_cost(dts, 2000, options.idle_seconds)
    finally:
        dts.process.terminate()
        shutil.rmtree(sshd, ignore_errors=True)
    median, p95 = percentile(found, 50), percentile(found, 95)
    print(f"Latency: {len(found)} of {options.exposures} exposures of {options.files} x "
          f"{options.size} bytes, linked at random within {options.gap:g} s of each other; "
          "sleep = 10s")
    print(f"  floor (one rsync of an exposure, open connection): {floor:6.2f} s")
    if found:
        print(f"  link to verified: median {median:6.2f} s (floor + {median - floor:.2f} s), "
              f"95% {p95:6.2f} s, max {max(found):6.2f} s")
    print(f"Idle pass (CPU of the daemon and its commands): {1000 * small:5.1f} ms with 10 "
          f"nights ({n_small} passes), {1000 * large:5.1f} ms with 2000 nights "
          f"({n_large} passes)")
    ok = (len(found) == options.exposures and median <= floor + 5 and small <= 0.05 and
          large <= 0.05 and large <= 1.2 * small + 0.002)
    print('PASS' if ok else 'FAIL', '(targets: median latency <= floor + 5 s; idle pass '
          '<= 50 ms, the same with 2000 nights as with 10)')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
