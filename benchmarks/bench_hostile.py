#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""What a hostile mountain costs desi_transfer_daemon.

Two attacks, each against a mountain reached over a real sshd on 127.0.0.1,
with the daemon run as cron runs it (``desi_transfer_daemon --once``, in a
child process) and its alerts sent to an SMTP server on 127.0.0.1:

* junk checksum file: one exposure whose checksum file holds JUNK_MB MB of
  junk lines (``x``); measured: peak memory of the pass, the largest alert
  email, the alert memory file, the longest log line and the state file;
* junk links: one night holding LINKS symbolic links that are not
  ``NIGHT/EXPID``; measured: the time and peak memory of each of PASSES
  passes, and the state file after each.

Peak memory is the maximum resident set size (``ru_maxrss``) of the daemon,
as seen by a small launcher process.  The code measured is the one
imported (set ``PYTHONPATH`` to measure another copy of the package).

Usage::

    python benchmarks/bench_hostile.py
    python benchmarks/bench_hostile.py --links 10000 --junk-mb 1

Exits non-zero if a pass takes more than --max-seconds, uses more than
--max-mib, or writes an alert, alert memory, log line or state file larger
than --max-kib.
"""
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from argparse import ArgumentParser

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, 'tests'))

from bench_backlog import configuration as backlog_configuration  # noqa: E402
from loopback import free_port, start_sshd  # noqa: E402
from desitransfer.simulator import make_exposure  # noqa: E402

#: Yesterday: in the recent window, never due for catch-up or archive here.
NIGHT = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)).strftime('%Y%m%d')

#: Run the daemon, then print its ru_maxrss (kB) as RUSAGE_CHILDREN sees it.
LAUNCHER = """import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


class Mail(object):
    """An SMTP server on 127.0.0.1 keeping the size of every message."""

    def __init__(self):
        from aiosmtpd.controller import Controller
        self.sizes = []
        self.lock = threading.Lock()
        self.port = free_port()
        self.controller = Controller(self, hostname='127.0.0.1', port=self.port,
                                     data_size_limit=0)
        self.controller.start()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.sizes.append(len(envelope.original_content or envelope.content))
        return '250 OK'

    def stop(self):
        self.controller.stop()


def configuration(run_dir, source, ssh, smtp):
    """The daemon's configuration (the backlog benchmark's writer), its
    alerts sent to the SMTP server on port `smtp`."""
    return backlog_configuration(run_dir, source, ssh, catchup=30, backup=30, streams=1,
                                 logging={'size': 1000000000, 'to': 'desi-alarms@example.org',
                                          'smtp': f'127.0.0.1:{smtp}'})


def one_pass(config, run_dir):
    """Seconds and peak MiB of one ``--once`` pass."""
    daemon = [sys.executable, '-c', 'import sys; from desitransfer.daemon import main; '
              'sys.exit(main())', '--once', '-c', config, '-k', os.path.join(run_dir, 'stop')]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, '-c', LAUNCHER] + daemon, check=True,
                         capture_output=True, text=True).stdout.split()
    return time.perf_counter() - t0, int(out[1]) / 1024


def kib(path):
    return os.path.getsize(path) / 1024 if os.path.exists(path) else 0.0


def longest_line(path):
    longest = 0
    with open(path, 'rb') as f:
        for line in f:
            longest = max(longest, len(line))
    return longest / 1024


def junk_checksum(work, ssh, mail, megabytes):
    run_dir = os.path.join(work, 'junk-checksum')
    mountain = os.path.join(run_dir, 'mountain')
    directory = make_exposure(os.path.join(mountain, 'data'), os.path.join(mountain, 'dts'),
                              NIGHT, '00001000')
    with open(os.path.join(directory, 'checksum-00001000.sha256sum'), 'w') as f:
        f.write('x\n' * (megabytes * 500000))
    config, nersc = configuration(run_dir, os.path.join(mountain, 'dts'), ssh, mail.port)
    mail.sizes.clear()
    seconds, peak = one_pass(config, run_dir)
    top = os.path.dirname(os.path.join(nersc, 'staging/raw'))
    return {'pass (s)': seconds, 'peak (MiB)': peak,
            'largest alert (KiB)': max(mail.sizes, default=0) / 1024,
            'alert memory (KiB)': kib(os.path.join(top, 'desi_transfer_daemon_alerts.json')),
            'longest log line (KiB)': longest_line(os.path.join(nersc, 'daemon.log')),
            'state (KiB)': kib(os.path.join(top, 'desi_transfer_daemon_state.json'))}


def junk_links(work, ssh, mail, links, passes):
    run_dir = os.path.join(work, 'junk-links')
    source = os.path.join(run_dir, 'mountain', 'dts')
    night = os.path.join(source, NIGHT)
    os.makedirs(night)
    for i in range(links):
        os.symlink('/nonexistent', os.path.join(night, f'junk{i:07d}'))
    config, nersc = configuration(run_dir, source, ssh, mail.port)
    state = os.path.join(nersc, 'staging', 'desi_transfer_daemon_state.json')
    rows = []
    for _ in range(passes):
        seconds, peak = one_pass(config, run_dir)
        rows.append((seconds, peak, kib(state), os.stat(state).st_mtime_ns))
    return rows


def main():
    prsr = ArgumentParser(description=__doc__.split('\n')[1])
    prsr.add_argument('--junk-mb', type=int, default=4, help="MB of junk checksum lines")
    prsr.add_argument('--links', type=int, default=100000, help="junk links in one night")
    prsr.add_argument('--passes', type=int, default=3, help="passes over the junk links")
    prsr.add_argument('--max-seconds', type=float, default=30.0)
    prsr.add_argument('--max-mib', type=float, default=256.0)
    prsr.add_argument('--max-kib', type=float, default=1024.0)
    options = prsr.parse_args()
    work = tempfile.mkdtemp(prefix='bench_hostile.')
    dts, mail = None, Mail()
    failed = []
    try:
        os.makedirs(os.path.join(work, 'sshd'))
        dts = start_sshd(os.path.join(work, 'sshd'))
        found = junk_checksum(work, dts.ssh, mail, options.junk_mb)
        print(f"Junk checksum file ({options.junk_mb:d} MB of junk lines), one pass:")
        for what, value in found.items():
            print(f"  {what:<24s} {value:10.1f}")
        limits = {'pass (s)': options.max_seconds, 'peak (MiB)': options.max_mib}
        for what, value in found.items():
            if value > limits.get(what, options.max_kib):
                failed.append(f'junk checksum: {what} {value:.1f}')
        rows = junk_links(work, dts.ssh, mail, options.links, options.passes)
        print(f"Junk links ({options.links:d} in night {NIGHT}):")
        print("  pass   time (s)   peak (MiB)   state (KiB)   state rewritten")
        for i, (seconds, peak, size, mtime) in enumerate(rows, start=1):
            rewritten = 'yes' if i == 1 or mtime != rows[i - 2][3] else 'no'
            print(f"  {i:4d} {seconds:10.2f} {peak:12.1f} {size:13.1f}   {rewritten}")
            if seconds > options.max_seconds or peak > options.max_mib or size > options.max_kib:
                failed.append(f'junk links: pass {i:d}')
    finally:
        mail.stop()
        if dts is not None:
            dts.process.terminate()
        shutil.rmtree(work, ignore_errors=True)
    print('FAIL: ' + '; '.join(failed) if failed else 'OK')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
