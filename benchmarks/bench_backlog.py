#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Backlog speed of desi_transfer_daemon.

A backlog of EXPOSURES exposures of FILES small files each waits at a mountain
reached over a real sshd on 127.0.0.1.  Measured in the same run:

* floor: one bulk rsync of the whole night over the same ssh;
* daemon: one ``desi_transfer_daemon --once`` pass, as cron would start it,
  with catch-up and archive due: transfer, lock, verify, install and record
  every exposure, catch up the night and archive it to HPSS (the emulator of
  the tests, with an HTTP status service on 127.0.0.1 saying "active");
* idle: a second ``--once`` pass with nothing new;
* naive (optional): one rsync per exposure, each over a fresh ssh connection.

Prints the times and the ratios to the floor; exits non-zero if the daemon
takes more than 2x the floor.
"""
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from argparse import ArgumentParser

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, 'tests'))
sys.path.insert(0, os.path.join(TOP, 'py'))

from loopback import start_sshd  # noqa: E402
from desitransfer.common import rsync  # noqa: E402
from desitransfer.transport import rsync_ssh, ssh_command  # noqa: E402
from desitransfer.simulator import make_mountain, serve_archive_status  # noqa: E402

#: Two days ago: finished, due for catch-up and archive, in the recent window.
NIGHT = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)).strftime('%Y%m%d')


def timed(command, **kwargs):
    t0 = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - t0


def configuration(run_dir, source, ssh, logging=None, **common):
    """Write the configuration of a daemon copying from `source` (over `ssh`)
    into a new NERSC tree in `run_dir`, with the ``[common]`` keys `common`
    and the ``[logging]`` keys of the dict `logging` (no alert email unless
    it says so); the file and the tree."""
    nersc = os.path.join(run_dir, 'nersc')
    for d in ('staging/raw', 'data', 'scratch'):
        os.makedirs(os.path.join(nersc, d))
    common = dict({'host': 'dts', 'ssh': ssh, 'temporary': f'{nersc}/scratch',
                   'checksum_lock': f'{run_dir}/checksum-running', 'sleep': 1}, **common)
    logging = dict({'filename': f'{nersc}/daemon.log', 'size': 100000000, 'backups': 1,
                    'to': ''}, **(logging or {}))
    config = os.path.join(run_dir, 'daemon.ini')
    with open(config, 'w') as f:
        f.write(f"""[DESI_SPECTRO_DATA]
source = {source}
staging = {nersc}/staging/raw
destination = {nersc}/data
hpss = desi/spectro/data
checksum_file = checksum-{{exposure}}.sha256sum
[common]
""" + ''.join(f'{key} = {value}\n' for key, value in common.items()) + "[logging]\n" +
                ''.join(f'{key} = {value}\n' for key, value in logging.items()))
    return config, nersc


def main():
    prsr = ArgumentParser(description=__doc__.split('\n')[1])
    prsr.add_argument('--exposures', type=int, default=100)
    prsr.add_argument('--files', type=int, default=10)
    prsr.add_argument('--size', type=int, default=4096, help="bytes per file")
    prsr.add_argument('--repeat', type=int, default=3, help="runs of each measurement")
    prsr.add_argument('--no-naive', action='store_true', help="skip the naive reference")
    prsr.add_argument('--streams', default='auto',
                      help="[common] streams of the daemon (default: the shipped default, auto)")
    options = prsr.parse_args()
    work = tempfile.mkdtemp(prefix='bench_backlog.')
    dts = None
    status, status_url = serve_archive_status()
    try:
        os.makedirs(os.path.join(work, 'sshd'))
        dts = start_sshd(os.path.join(work, 'sshd'))
        mountain = os.path.join(work, 'mountain')
        make_mountain(mountain, [NIGHT], options.exposures, nfiles=options.files,
                      size=options.size)
        source = os.path.join(mountain, 'dts')
        daemon = shutil.which('desi_transfer_daemon',
                              path=os.path.dirname(sys.executable) + ':' + os.environ['PATH'])
        floors, passes, idles, naives = [], [], [], []
        for r in range(options.repeat):
            run_dir = os.path.join(work, f'run{r}')
            floor_dir = os.path.join(run_dir, 'floor')
            os.makedirs(run_dir)
            floors.append(timed(rsync_ssh(rsync(os.path.join(source, NIGHT), floor_dir),
                                          ssh_command(dts.ssh))))
            config, nersc = configuration(run_dir, source, dts.ssh, catchup=0, backup=0,
                                          hpss=os.path.join(TOP, 'tests', 'hpss'),
                                          hpss_status=status_url, streams=options.streams)
            command = [daemon, '--once', '-c', config, '-k', os.path.join(run_dir, 'stop')]
            tape = os.path.join(run_dir, 'hpss')
            os.makedirs(tape)
            env = dict(os.environ, HPSS_EMULATOR_ROOT=tape)
            passes.append(timed(command, env=env))
            installed = os.listdir(os.path.join(nersc, 'data', NIGHT))
            assert len(installed) == options.exposures, installed
            archive = os.path.join(tape, 'desi', 'spectro', 'data',
                                   f'desi_spectro_data_{NIGHT}.tar.idx')
            assert os.path.exists(archive), 'the night was not archived'
            idles.append(timed(command, env=env))
            if not options.no_naive and r == 0:
                naive_dir = os.path.join(run_dir, 'naive')
                os.makedirs(naive_dir)
                t0 = time.perf_counter()
                for expid in sorted(os.listdir(os.path.join(source, NIGHT))):
                    subprocess.run(rsync_ssh(rsync(os.path.join(source, NIGHT, expid),
                                                   os.path.join(naive_dir, expid)),
                                             ssh_command(dts.ssh)),
                                   check=True, stdout=subprocess.DEVNULL)
                naives.append(time.perf_counter() - t0)
        floor, one_pass, idle = min(floors), min(passes), min(idles)
        print(f"Backlog: {options.exposures} exposures x {options.files} files of "
              f"{options.size} bytes, best of {options.repeat}")
        print(f"  floor (one bulk rsync over ssh): {floor:7.3f} s   1.00x")
        print(f"  desi_transfer_daemon --once:     {one_pass:7.3f} s  {one_pass / floor:5.2f}x"
              "   (with catch-up and archive)")
        print(f"  idle pass (nothing new):         {idle:7.3f} s  {idle / floor:5.2f}x")
        if naives:
            print(f"  naive (rsync per exposure):      {naives[0]:7.3f} s  "
                  f"{naives[0] / floor:5.2f}x")
        ok = one_pass <= 2 * floor
        print('PASS' if ok else 'FAIL', '(target: daemon pass within 2x the floor)')
        return 0 if ok else 1
    finally:
        status.shutdown()
        if dts is not None:
            dts.process.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
