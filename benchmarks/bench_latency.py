#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Latency of desi_transfer_daemon, from link at the mountain to verified at NERSC.

The time from the moment an exposure is linked at the mountain to the
moment it is verified at NERSC, in several cases; and the cost of a pass
that finds nothing new.

The daemon runs as operators run it: its loop, with the shipped ``sleep``
(one minute; ``--sleep`` changes it), catch-up and archive not due.  The
latency of an exposure is its verification time minus its link time, both
from the status store (stage ``checksum``, successful, and stage
``linked``, the time of the link at the mountain).  Each case is reported as
median and 90th percentile against its floor: one rsync of one such
exposure over an open ssh connection, on the same path, measured in the
same run.  The cases (``--cases``):

quiet
    Over a real sshd on 127.0.0.1, exposures of FILES x SIZE bytes linked at
    random intervals (uniform up to GAP seconds), mostly to an idle daemon.
pass
    On the same loopback, pairs: a large exposure A (sized so that its rsync
    takes about PASS_COPY seconds, or PASS_BYTES), then a small one B linked
    0.3-1.1 s after A, while A is being copied; a few seconds between pairs.
    B shows what waits for a pass to end; A is reported too, against its own
    floor (its latency also holds the verification of its size, shown beside
    it).
burst
    On the same loopback, bursts of 4-5 exposures linked 0.2-1 s apart (as
    a calibration sequence links them), a few seconds between bursts.
backlog
    Over the wide-area proxy of ``bench_wan.py`` (one-way DELAY), a backlog
    of older nights already linked when the daemon starts; the daemon has
    run once before with nothing linked, so its round trip (for ``streams =
    auto``) is known.  Run twice: (a) nothing else: the drain time, from the
    daemon's start to the last backlog exposure verified; (b) the same with
    new exposures of tonight linked during the drain, at random 1-4 s apart
    from 1 s after the start: their latency against the floor over the
    proxy, and the drain time as a ratio to (a).
idle
    The CPU time (the daemon and the commands it runs) per pass with nothing
    new, with 10 and with 2,000 nights of history at the mountain and at
    NERSC (``sleep = 1s``, so that the passes follow each other).

Exits non-zero unless, in every case, the median latency is at most the
floor plus 1 s and the 90th percentile at most the floor plus 2 s, every
exposure was verified, the drain with new exposures takes at most 1.05x the
drain without, and an idle pass costs at most 50 ms of CPU, the same (within
20%) with 2,000 nights as with 10.
"""
import datetime as dt
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from argparse import ArgumentParser

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, 'benchmarks'))
sys.path.insert(0, os.path.join(TOP, 'tests'))
sys.path.insert(0, os.path.join(TOP, 'py'))

from bench_backlog import configuration as backlog_configuration  # noqa: E402
from bench_wan import WINDOW, DelayProxy, wan_ssh  # noqa: E402
from loopback import start_sshd  # noqa: E402
from desitransfer.transport import rsync_ssh, ssh_command  # noqa: E402
from desitransfer.configuration import (DEFAULTS, ConfigurationError,  # noqa: E402
                                        read_configuration)
from desitransfer.simulator import exposure_files, make_exposure  # noqa: E402
from desitransfer.store import latency as link_to_verified, percentile  # noqa: E402
from desitransfer.status import TransferStatus, read_status  # noqa: E402

#: Tonight at the mountain (the night rolls over at 19:00 UTC).
TONIGHT = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=19)).strftime('%Y%m%d')

#: The cases, in the order they run.
CASES = ('quiet', 'pass', 'burst', 'backlog', 'idle')

#: Targets: seconds over the floor of the median and of the 90th percentile.
MEDIAN_OVER, P90_OVER = 1.0, 2.0

#: Target: the drain of a backlog with new exposures, over the drain without.
DRAIN_RATIO = 1.05

#: Status stages.
CHECKSUM, RSYNC = TransferStatus.stages['checksum'], TransferStatus.stages['rsync']

MB = 1 << 20

#: Keep the temporary directories of the cases (``--keep``); those kept.
KEEP = False
KEPT = []


def configuration(work, mountain, ssh, sleep):
    """The daemon's configuration for `mountain` over the ssh wrapper `ssh`,
    polling every `sleep`, with catch-up and archive disabled; the file and
    the NERSC tree."""
    return backlog_configuration(work, os.path.join(mountain, 'dts'), ssh, catchup=-1,
                                 backup=-1, sleep=sleep, hpss='',
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


def stop(proc):
    """Stop the daemon `proc` as operators do (SIGTERM) and wait for it."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def idle_cost(dts, nights, seconds):
    """CPU seconds per pass of a daemon that finds nothing new, with `nights` of history."""
    work = tempfile.mkdtemp(prefix='bench_latency_idle.')
    try:
        mountain = os.path.join(work, 'mountain')
        config, nersc = configuration(work, mountain, dts.ssh, '1s')
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
                if proc.poll() is not None:
                    raise RuntimeError(f'the daemon stopped (exit code {proc.returncode})')
                time.sleep(0.1)
            n0, c0 = passes(), cpu_seconds(proc.pid)
            time.sleep(seconds)
            n1, c1 = passes(), cpu_seconds(proc.pid)
        finally:
            stop(proc)
        return (c1 - c0) / (n1 - n0), n1 - n0
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------
# Measuring.
# ----------------------------------------------------------------------
def floor(ssh, directory, work, runs=3):
    """Seconds of the fastest of `runs` rsyncs of the exposure `directory` at
    the mountain over one open connection of the ssh wrapper `ssh`."""
    control = os.path.join(work, 'floor.mux')
    shared = ssh_command(ssh, control=control)
    subprocess.run(shared + ['dts', 'true'], check=True)
    try:
        times = []
        for r in range(runs):
            target = os.path.join(work, f'floor{r}')
            t0 = time.perf_counter()
            subprocess.run(rsync_ssh(['/bin/rsync', '--recursive', '--times',
                                      f'dts:{directory}/', f'{target}/'], shared),
                           check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t0)
            shutil.rmtree(target)
        return min(times)
    finally:
        subprocess.run(shared + ['-O', 'exit', 'dts'], capture_output=True)


def records(nersc):
    """Every status record at NERSC, ``{NIGHT: {EXPID: rows}}``, all years."""
    directory = os.path.join(nersc, 'staging', 'status')
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return {}
    found = {}
    for name in names:
        year = name[len('desi_transfer_status_'):-len('.json')]
        if name.startswith('desi_transfer_status_') and name.endswith('.json') and \
                year.isdigit():
            for night, exposures in read_status(directory, int(year))[0].items():
                found.setdefault(night, {}).update(exposures)
    return found


def rows_of(found, night, expid):
    return found.get(night, {}).get(str(int(expid)), [])


def stage_ms(rows, stage):
    """Milliseconds of the successful row of `stage` in `rows`, or ``None``."""
    for row in rows:
        if row[0] == stage and row[1] == 1:
            return row[2]
    return None


def wait_verified(nersc, exposures, timeout, proc=None):
    """Wait (at most `timeout` seconds) until every ``(night, expid)`` of
    `exposures` has a checksum record at NERSC; the records."""
    deadline = time.monotonic() + timeout
    while True:
        found = records(nersc)
        if all(any(r[0] == CHECKSUM for r in rows_of(found, n, e)) for n, e in exposures):
            return found
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            return found
        time.sleep(0.2)


def latencies(found, exposures):
    """Seconds from link to verified of each of `exposures` that has both."""
    seconds = [link_to_verified(rows_of(found, n, e)) for n, e in exposures]
    return [s for s in seconds if s is not None]


def parts(found, exposures):
    """Of each latency of `exposures`: seconds from link to the end of its
    rsync, and from there to verified."""
    found_parts = []
    for n, e in exposures:
        rows = rows_of(found, n, e)
        linked = stage_ms(rows, TransferStatus.stages['linked'])
        copied, verified = stage_ms(rows, RSYNC), stage_ms(rows, CHECKSUM)
        if None not in (linked, copied, verified):
            found_parts.append(((copied - linked) / 1000, (verified - copied) / 1000))
    return found_parts


def hashing(directory):
    """Seconds to compute the SHA-256 of every file of `directory` here, as
    the verification of an exposure at NERSC does."""
    t0 = time.perf_counter()
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), 'rb') as f:
            digest = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b''):
                digest.update(block)
    return time.perf_counter() - t0


def remove(work):
    """Remove the directory `work`, unless ``--keep`` keeps it."""
    if KEEP:
        KEPT.append(work)
    else:
        shutil.rmtree(work, ignore_errors=True)


class Summit(object):
    """A simulated mountain in `work`: exposures made ahead, linked when asked."""

    def __init__(self, work):
        self.root = os.path.join(work, 'mountain')
        self.data = os.path.join(self.root, 'data')
        self.source = os.path.join(self.root, 'dts')
        os.makedirs(os.path.join(self.source, TONIGHT))

    def make(self, night, expid, nfiles, size, linked=False):
        """The directory of a new exposure (linked now if `linked`)."""
        return make_exposure(self.data, self.source, night, expid, link=linked,
                             files=exposure_files(expid, nfiles=nfiles, size=size))

    def link(self, night, expid):
        """Link an exposure made ahead: now is its link time."""
        os.makedirs(os.path.join(self.source, night), exist_ok=True)
        os.symlink(os.path.join(self.data, night, expid),
                   os.path.join(self.source, night, expid))


class Daemon(object):
    """desi_transfer_daemon in its loop, with `config` (NERSC tree `nersc`)."""

    def __init__(self, config, nersc, work, debug=True):
        self.log = os.path.join(nersc, 'daemon.log')
        self.output = os.path.join(work, 'daemon.out')
        self.started = time.time()
        with open(self.output, 'ab') as output:
            self.process = subprocess.Popen(daemon_command(config, work) +
                                            (['--debug'] if debug else []),
                                            stdout=output, stderr=subprocess.STDOUT)

    def watching(self, timeout=120):
        """Wait until the daemon watches the mountain between passes (``--debug``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.running()
            try:
                with open(self.log) as f:
                    if 'Sleeping' in f.read():
                        time.sleep(0.2)  # The watch command starts.
                        return
            except FileNotFoundError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f'the daemon did not start its loop in {timeout:g} s')

    def running(self):
        """Raise :exc:`RuntimeError`, with the end of its output, if the
        daemon stopped by itself."""
        if self.process.poll() is not None:
            with open(self.output, errors='replace') as f:
                tail = f.read().splitlines()[-5:]
            raise RuntimeError(f"the daemon stopped (exit code {self.process.returncode})"
                               + ''.join(f'\n  {line}' for line in tail))

    def stop(self):
        stop(self.process)


def summary(name, runs, base, note=''):
    """A case's result: its name; the latencies and their parts of the
    exposures of `runs`, a list of ``(records, exposures)``, and how many;
    the floor."""
    return {'name': name, 'values': sum((latencies(f, e) for f, e in runs), []),
            'parts': sum((parts(f, e) for f, e in runs), []),
            'expected': sum(len(e) for f, e in runs), 'floor': base, 'note': note}


def passed(result):
    """Every exposure verified, the median and the 90th percentile within the targets?"""
    values, base = result['values'], result['floor']
    return (len(values) == result['expected'] and
            percentile(values, 50) <= base + MEDIAN_OVER and
            percentile(values, 90) <= base + P90_OVER)


def show(result):
    """Print a case's result; the targets met?"""
    values, base = result['values'], result['floor']
    print(f"  {result['name']}: floor (one rsync of one exposure, open connection) "
          f"{base:5.2f} s")
    line = f"    {len(values)} of {result['expected']} verified"
    if values:
        p50, p90 = percentile(values, 50), percentile(values, 90)
        line += (f": median {p50:5.2f} s (floor + {p50 - base:4.2f} s), p90 {p90:5.2f} s "
                 f"(floor + {p90 - base:4.2f} s), max {max(values):5.2f} s")
    ok = passed(result)
    print(line + '   ' + ('PASS' if ok else 'FAIL'))
    if result['parts']:
        copy, verify = zip(*result['parts'])
        print(f"    link to copied (end of its rsync): median {percentile(copy, 50):5.2f} s, "
              f"p90 {percentile(copy, 90):5.2f} s; copied to verified: median "
              f"{percentile(verify, 50):5.2f} s, p90 {percentile(verify, 90):5.2f} s")
    if result['note']:
        print(f"    {result['note']}")
    return ok


def describe(nfiles, size):
    return f"{nfiles} x {size / MB:g} MiB"


# ----------------------------------------------------------------------
# The cases.
# ----------------------------------------------------------------------
def quiet(dts, options):
    """Exposures linked at random intervals, the daemon idle in between."""
    work = tempfile.mkdtemp(prefix='bench_latency_quiet.')
    daemon = None
    try:
        mountain = Summit(work)
        config, nersc = configuration(work, mountain.root, dts.ssh, options.sleep)
        one = mountain.make(TONIGHT, '00090000', options.files, options.size)
        exposures = [(TONIGHT, f'{91000 + j:08d}') for j in range(options.exposures)]
        for n, e in exposures:
            mountain.make(n, e, options.files, options.size)
        os.sync()  # Measured on a quiet disk.
        base = floor(dts.ssh, one, work)
        daemon = Daemon(config, nersc, work)
        daemon.watching()
        for n, e in exposures:
            time.sleep(random.uniform(0, options.gap))
            mountain.link(n, e)
        found = wait_verified(nersc, exposures, 120, daemon.process)
        daemon.running()
        print(f"quiet: {options.exposures} exposures of {describe(options.files, options.size)}"
              f" linked at random within {options.gap:g} s of each other (loopback)")
        return [summary('quiet', [(found, exposures)], base)]
    finally:
        if daemon is not None:
            daemon.stop()
        remove(work)


def calibrate(ssh, mountain, work, seconds):
    """Bytes per file of an exposure of 4 files whose rsync takes about
    `seconds` (the start of an rsync is not negligible: a few tries)."""
    size = 8 * MB
    for k in range(4):
        directory = mountain.make(TONIGHT, f'{80000 + k:08d}', 4, size)
        os.sync()
        took = floor(ssh, directory, work)
        shutil.rmtree(directory)
        better = min(max(int(size * seconds / took) // MB, 5), 128) * MB
        if better == size or 0.8 <= took / seconds <= 1.25:
            break
        size = better
    return size


def during_pass(dts, options):
    """Pairs: A large, B small linked 0.3-1.1 s after A, while A is copied."""
    work = tempfile.mkdtemp(prefix='bench_latency_pass.')
    daemon = None
    try:
        mountain = Summit(work)
        config, nersc = configuration(work, mountain.root, dts.ssh, options.sleep)
        a_size = (max(options.pass_bytes // 4 // MB, 1) * MB if options.pass_bytes else
                  calibrate(dts.ssh, mountain, work, options.pass_copy))
        floor_a = mountain.make(TONIGHT, '00080009', 4, a_size)
        floor_b = mountain.make(TONIGHT, '00080010', options.files, options.size)
        pairs = [((TONIGHT, f'{81000 + 2 * j:08d}'), (TONIGHT, f'{81001 + 2 * j:08d}'))
                 for j in range(options.pairs)]
        for a, b in pairs:
            mountain.make(*a, 4, a_size)
            mountain.make(*b, options.files, options.size)
        os.sync()
        base_a, base_b = floor(dts.ssh, floor_a, work), floor(dts.ssh, floor_b, work)
        daemon = Daemon(config, nersc, work)
        daemon.watching()
        found = {}
        for a, b in pairs:
            mountain.link(*a)
            time.sleep(random.uniform(0.3, 1.1))
            mountain.link(*b)
            found = wait_verified(nersc, [a, b], 60, daemon.process)
            daemon.running()
            time.sleep(random.uniform(2, 4))
        # Was B linked while A was copied (before A's rsync ended), or at
        # least before A was verified?
        copying = verifying = 0
        for a, b in pairs:
            rows_a, rows_b = rows_of(found, *a), rows_of(found, *b)
            linked_b = stage_ms(rows_b, TransferStatus.stages['linked'])
            end_a, verified_a = stage_ms(rows_a, RSYNC), stage_ms(rows_a, CHECKSUM)
            if linked_b is not None and end_a is not None and linked_b < end_a:
                copying += 1
            if linked_b is not None and verified_a is not None and linked_b < verified_a:
                verifying += 1
        verify_a = min(hashing(os.path.join(mountain.data, *pairs[0][0])) for _ in range(2))
        print(f"pass: {options.pairs} pairs: A of {describe(4, a_size)}, then B of "
              f"{describe(options.files, options.size)} linked 0.3-1.1 s after A (loopback)")
        note = (f"B linked before A's rsync ended: {copying} of {len(pairs)}; "
                f"before A was verified: {verifying} of {len(pairs)}")
        return [summary('pass B', [(found, [b for a, b in pairs])], base_b, note),
                summary('pass A', [(found, [a for a, b in pairs])], base_a,
                        f"A's checksums (SHA-256 of its files, here): {verify_a:.2f} s")]
    finally:
        if daemon is not None:
            daemon.stop()
        remove(work)


def burst(dts, options):
    """Bursts of 4-5 exposures linked 0.2-1 s apart."""
    work = tempfile.mkdtemp(prefix='bench_latency_burst.')
    daemon = None
    try:
        mountain = Summit(work)
        config, nersc = configuration(work, mountain.root, dts.ssh, options.sleep)
        one = mountain.make(TONIGHT, '00070000', options.files, options.size)
        bursts, expid = [], 71000
        for _ in range(options.bursts):
            bursts.append([(TONIGHT, f'{expid + j:08d}') for j in range(random.randint(4, 5))])
            expid += 10
        for n, e in sum(bursts, []):
            mountain.make(n, e, options.files, options.size)
        os.sync()
        base = floor(dts.ssh, one, work)
        daemon = Daemon(config, nersc, work)
        daemon.watching()
        found = {}
        for exposures in bursts:
            for i, (n, e) in enumerate(exposures):
                if i:
                    time.sleep(random.uniform(0.2, 1.0))
                mountain.link(n, e)
            found = wait_verified(nersc, exposures, 60, daemon.process)
            daemon.running()
            time.sleep(random.uniform(2, 4))
        everyone = sum(bursts, [])
        print(f"burst: {options.bursts} bursts of 4-5 exposures of "
              f"{describe(options.files, options.size)} linked 0.2-1 s apart (loopback)")
        return [summary('burst', [(found, everyone)], base)]
    finally:
        if daemon is not None:
            daemon.stop()
        remove(work)


def drain(ssh, mountain, run_dir, options, backlog, new=()):
    """One run of the backlog case in `run_dir`: a daemon that has run once
    before with nothing linked meets `backlog`; the exposures `new` are
    linked from 1 s after its start, 1-4 s apart.  The drain time (seconds
    from the start to the last of `backlog` verified), the records and the
    moments (seconds after the start) the exposures `new` were linked."""
    config, nersc = configuration(run_dir, mountain.root, ssh, options.sleep)
    os.sync()  # Nothing left to write of the run before.
    # As a daemon that meets a backlog after an outage: one pass before, with
    # nothing linked (for streams = auto, it measures the round trip).
    os.rename(mountain.source, mountain.source + '.away')
    try:
        os.makedirs(os.path.join(mountain.source, TONIGHT))
        before = subprocess.run(daemon_command(config, run_dir) + ['--once'],
                                capture_output=True, text=True, errors='replace')
        if before.returncode != 0:
            raise RuntimeError(f"the daemon's pass before the backlog failed (exit code "
                               f"{before.returncode})" + ''.join(
                                   f'\n  {line}' for line in
                                   (before.stdout + before.stderr).splitlines()[-5:]))
    finally:
        shutil.rmtree(mountain.source, ignore_errors=True)
        os.rename(mountain.source + '.away', mountain.source)
    daemon = Daemon(config, nersc, run_dir, debug=False)
    try:
        linked = []
        when = daemon.started + 1
        for n, e in new:
            time.sleep(max(0.0, when - time.time()))
            mountain.link(n, e)
            linked.append(time.time() - daemon.started)
            when += random.uniform(1, 4)
        found = wait_verified(nersc, list(backlog) + list(new), options.timeout,
                              daemon.process)
        daemon.running()
    finally:
        daemon.stop()
    moments = [stage_ms(rows_of(found, n, e), CHECKSUM) for n, e in backlog]
    last = (max(moments) / 1000 - daemon.started) if None not in moments else None
    return last, found, linked


def backlog(dts, options):
    """A multi-night backlog over the wide-area proxy, without and with new
    exposures linked while it drains."""
    work = tempfile.mkdtemp(prefix='bench_latency_backlog.')
    proxy = None
    try:
        proxy = DelayProxy(dts.port, options.delay, int(options.window * MB))
        ssh = wan_ssh(dts, work, proxy.port)
        mountain = Summit(work)
        today = dt.datetime.strptime(TONIGHT, '%Y%m%d')
        old, expid = [], 100000
        for k in range(options.backlog_nights):
            night = (today - dt.timedelta(days=k + 1)).strftime('%Y%m%d')
            for _ in range(options.backlog_exposures):
                old.append((night, f'{expid:08d}'))
                mountain.make(night, old[-1][1], options.backlog_files, options.backlog_size,
                              linked=True)
                expid += 1
        new = [(TONIGHT, f'{200000 + j:08d}') for j in range(options.new)]
        for n, e in new:
            mountain.make(n, e, options.files, options.size)
        one = mountain.make(TONIGHT, '00199999', options.files, options.size)
        os.sync()
        base = floor(ssh, one, work)
        drains, runs, linked, during = {'a': [], 'b': []}, [], [], 0
        for r in range(options.backlog_repeat):
            # (a) and (b) in turn, (b) first every other time.
            for name in ('a', 'b') if r % 2 == 0 else ('b', 'a'):
                run_dir = os.path.join(work, f'{name}{r}')
                os.makedirs(run_dir)
                last, found, moments = drain(ssh, mountain, run_dir, options, old,
                                             new if name == 'b' else ())
                drains[name].append(last)
                if name == 'b':
                    runs.append((found, new))
                    linked.append(moments)
                    during += sum(1 for t in moments if last is not None and t < last)
                    for n, e in new:
                        os.unlink(os.path.join(mountain.source, n, e))
                if not KEEP:
                    shutil.rmtree(run_dir, ignore_errors=True)
        mebibytes = len(old) * options.backlog_files * options.backlog_size / MB
        print(f"backlog: {options.backlog_nights} nights x {options.backlog_exposures} exposures"
              f" x {describe(options.backlog_files, options.backlog_size)} ({mebibytes:g} MiB) "
              f"linked before the start; one-way delay {options.delay * 1000:g} ms, window "
              f"{options.window:g} MiB" + (f"; {options.backlog_repeat} runs of each"
                                           if options.backlog_repeat > 1 else ''))
        note = (f"{options.new} new exposures of {describe(options.files, options.size)} "
                f"linked at " + '; '.join(' '.join(f'{t:.1f}' for t in moments)
                                          for moments in linked) + " s after the start; "
                f"{during} of {len(new) * options.backlog_repeat} before the backlog was drained")
        each = [(link_to_verified(rows_of(found, n, e)), moment)
                for (found, exposures), moments in zip(runs, linked)
                for (n, e), moment in zip(exposures, moments)]
        slowest = max(((s, t) for s, t in each if s is not None), default=None)
        if slowest is not None:
            note += (f"; the slowest, linked {slowest[1]:.1f} s after the start, took "
                     f"{slowest[0]:.2f} s")
        return [summary('backlog new', runs, base, note),
                {'name': 'backlog drain', 'drain': (drains['a'], drains['b'])}]
    finally:
        if proxy is not None:
            proxy.close()
        remove(work)


def show_drain(result):
    """Print the drain times (best of the runs, each run in brackets); the target met?"""
    runs = result['drain']
    if None in runs[0] or None in runs[1]:
        print(f"  drain: not every backlog exposure was verified "
              f"(without new exposures: {'no' if None in runs[0] else 'yes'}, "
              f"with: {'no' if None in runs[1] else 'yes'})   FAIL")
        return False
    a, b = min(runs[0]), min(runs[1])

    def each(values):
        return f" [{' '.join(f'{v:.2f}' for v in values)}]" if len(values) > 1 else ''
    ok = b <= DRAIN_RATIO * a
    print(f"  drain (start to the last backlog exposure verified): {a:6.2f} s{each(runs[0])} "
          f"without new exposures, {b:6.2f} s{each(runs[1])} with them ({b / a:4.2f}x)   "
          f"{'PASS' if ok else 'FAIL'}")
    return ok


def idle(dts, options):
    small, n_small = idle_cost(dts, 10, options.idle_seconds)
    large, n_large = idle_cost(dts, 2000, options.idle_seconds)
    ok = small <= 0.05 and large <= 0.05 and large <= 1.2 * small + 0.002
    print(f"idle pass (CPU of the daemon and its commands): {1000 * small:5.1f} ms with 10 "
          f"nights ({n_small} passes), {1000 * large:5.1f} ms with 2000 nights "
          f"({n_large} passes)   {'PASS' if ok else 'FAIL'}")
    return ok


def parse():
    """The options, checked; the sleep in seconds, as the daemon reads it."""
    prsr = ArgumentParser(description=__doc__.split('\n')[0])
    prsr.add_argument('--cases', default=','.join(CASES),
                      help="comma-separated cases among %(default)s (default: all)")
    prsr.add_argument('--sleep', default=DEFAULTS['common']['sleep'],
                      help="[common] sleep of the daemon (default: the shipped %(default)s)")
    prsr.add_argument('--files', type=int, default=10,
                      help="files per exposure, except A and the backlog (default %(default)s)")
    prsr.add_argument('--size', type=int, default=MB,
                      help="bytes per file, except A and the backlog (default %(default)s)")
    prsr.add_argument('--exposures', type=int, default=12,
                      help="quiet: exposures linked (default %(default)s)")
    prsr.add_argument('--gap', type=float, default=12.0,
                      help="quiet: longest random gap between two links, seconds "
                      "(default %(default)s)")
    prsr.add_argument('--pairs', type=int, default=6, help="pass: pairs (default %(default)s)")
    prsr.add_argument('--pass-copy', type=float, default=1.0,
                      help="pass: seconds one rsync of A takes, to size it (default "
                      "%(default)s; A between 20 and 512 MiB)")
    prsr.add_argument('--pass-bytes', type=int, default=0,
                      help="pass: bytes of A (4 files), instead of --pass-copy")
    prsr.add_argument('--bursts', type=int, default=3, help="burst: bursts (default %(default)s)")
    prsr.add_argument('--backlog-nights', type=int, default=3,
                      help="backlog: older nights (default %(default)s)")
    prsr.add_argument('--backlog-exposures', type=int, default=8,
                      help="backlog: exposures per night (default %(default)s)")
    prsr.add_argument('--backlog-files', type=int, default=4,
                      help="backlog: files per exposure (default %(default)s)")
    prsr.add_argument('--backlog-size', type=int, default=12 * MB,
                      help="backlog: bytes per file (default %(default)s)")
    prsr.add_argument('--new', type=int, default=6,
                      help="backlog: new exposures linked during the drain (default %(default)s)")
    prsr.add_argument('--delay', type=float, default=0.035,
                      help="backlog: one-way delay of the proxy, seconds (default %(default)s)")
    prsr.add_argument('--window', type=float, default=WINDOW / MB,
                      help="backlog: MiB in flight per proxied connection and direction "
                      "(default %(default)s)")
    prsr.add_argument('--backlog-repeat', type=int, default=3,
                      help="backlog: runs of (a) and of (b), in turn; the best drain of each "
                      "is compared, the latencies of every run counted (default %(default)s)")
    prsr.add_argument('--timeout', type=float, default=600,
                      help="backlog: longest wait for a drain, seconds (default %(default)s)")
    prsr.add_argument('--idle-seconds', type=float, default=20.0,
                      help="idle: seconds of each measurement (default %(default)s)")
    prsr.add_argument('--seed', type=int, default=1)
    prsr.add_argument('--keep', action='store_true',
                      help="keep the temporary directories of the cases (logs, status)")
    options = prsr.parse_args()
    options.cases = [c.strip() for c in options.cases.split(',') if c.strip()]
    unknown = [c for c in options.cases if c not in CASES]
    if unknown or not options.cases:
        prsr.error(f"unknown case {', '.join(unknown) or '(none)'}; the cases are "
                   f"{', '.join(CASES)}")
    counts = ('files', 'size', 'exposures', 'pairs', 'bursts', 'backlog_nights',
              'backlog_exposures', 'backlog_files', 'backlog_size', 'new', 'backlog_repeat')
    for name in counts:
        if getattr(options, name) < 1:
            prsr.error(f"--{name.replace('_', '-')} must be at least 1")
    if options.delay <= 0 or options.gap < 0 or options.pass_copy <= 0:
        prsr.error("--delay and --pass-copy must be positive, --gap not negative")
    probe = tempfile.mkdtemp(prefix='bench_latency_conf.')
    try:
        sleep = read_configuration(configuration(probe, probe, 'ssh', options.sleep)[0])[1]
    except ConfigurationError as err:
        prsr.error(f"--sleep {options.sleep}: {err}")
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return options, sleep['sleep']


def main():
    global KEEP
    options, sleep = parse()
    KEEP = options.keep
    random.seed(options.seed)
    print(f"Latency of desi_transfer_daemon, link at the mountain to verified at NERSC; "
          f"sleep = {options.sleep} ({sleep:g} s)")
    sshd = tempfile.mkdtemp(prefix='bench_latency_sshd.')
    dts, ok = None, True
    try:
        dts = start_sshd(sshd)
        run = {'quiet': quiet, 'pass': during_pass, 'burst': burst, 'backlog': backlog}
        for case in (c for c in CASES if c in options.cases):
            try:
                if case == 'idle':
                    ok = idle(dts, options) and ok
                    continue
                for result in run[case](dts, options):
                    ok = (show_drain(result) if 'drain' in result else show(result)) and ok
            except RuntimeError as err:
                print(f"{case}: FAIL: {err}")
                ok = False
            sys.stdout.flush()
    finally:
        if dts is not None:
            dts.process.terminate()
            dts.process.wait()
        shutil.rmtree(sshd, ignore_errors=True)
    if KEPT:
        print('Kept: ' + ' '.join(KEPT))
    print('PASS' if ok else 'FAIL', f'(targets: median <= floor + {MEDIAN_OVER:g} s and p90 '
          f'<= floor + {P90_OVER:g} s in every case, every exposure verified; backlog drain '
          f'with new exposures <= {DRAIN_RATIO:g}x without; idle pass <= 50 ms, the same '
          'with 2000 nights as with 10)')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
