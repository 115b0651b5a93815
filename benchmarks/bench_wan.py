#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Backlog speed of desi_transfer_daemon over a wide-area link.

The link from Kitt Peak to NERSC has a round trip of about 70 ms; there one
ssh stream is held back by ssh's own flow-control window, not by the
network.  This benchmark puts a small TCP proxy on 127.0.0.1 between ssh and
a real sshd, delaying every chunk by DELAY seconds each way (and the opening
of each connection by a round trip), and measures in one run, on a backlog
of EXPOSURES exposures of FILES files of SIZE bytes:

* one stream: one bulk rsync of the night over one ssh connection;
* parallel floor: one rsync per exposure, all at once, each over an ssh
  connection of its own (the floor the link allows);
* shared: the same, every rsync a channel of one shared ssh connection (an
  OpenSSH control master), to compare;
* one ``desi_transfer_daemon --once`` pass for each number of streams asked
  for (catch-up and archive are not due), and the moment each exposure was
  verified, from its status record.  The daemon has run once before, with
  nothing linked yet, as a daemon that meets a backlog after an outage has
  (``--cold``: its first pass ever, which for ``streams = auto`` also waits
  for the round trip to be measured).
* a pass of the same daemon running (not ``--once``): it has made a pass
  with nothing linked and watches the mountain over its connection when the
  backlog appears at once (the transfer area renamed into place); timed from
  then until the last exposure is verified.  A daemon runs for months: this
  is how it meets a backlog that appears while it runs.

With ``--delay 0`` there is no proxy: the same on loopback.

Prints the times and ratios; exits non-zero unless the last ``--once`` pass
is within 1.3x the parallel floor and at most half the one-stream time and
the last running daemon's pass within 1.15x the floor (with a delay), or the
``--once`` pass within 1.2x the one-stream time (loopback).
"""
import asyncio
import datetime as dt
import json
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
sys.path.insert(0, os.path.join(TOP, 'py'))

from bench_backlog import configuration  # noqa: E402
from loopback import start_sshd  # noqa: E402
from desitransfer.common import rsync  # noqa: E402
from desitransfer.transport import rsync_ssh, ssh_command  # noqa: E402
from desitransfer.configuration import DEFAULT_STREAMS  # noqa: E402
from desitransfer.mountain import WATCH_SURVEY_SCRIPT  # noqa: E402
from desitransfer.simulator import make_mountain  # noqa: E402

#: Two days ago: a finished night in the recent window.
NIGHT = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)).strftime('%Y%m%d')

#: Most bytes a proxied connection has in flight in each direction, by
#: default: a TCP window much larger than ssh's (2 MiB per channel).
WINDOW = 64 << 20


class DelayProxy(object):
    """A TCP proxy on 127.0.0.1 to `port`, delaying every chunk by `delay`
    seconds in each direction, and each new connection by a round trip; each
    connection has at most `window` bytes in flight in each direction, a
    byte counting from when it is read until a round trip later, when its
    acknowledgement would be back (a TCP window).

    It runs its own event loop in a thread; :meth:`close` stops it.
    """

    def __init__(self, port, delay, window=WINDOW):
        self.target = port
        self.delay = delay
        self.window = window
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait()

    def _serve(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._connection, '127.0.0.1', 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def close(self):
        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(timeout=10)

    async def _connection(self, client_reader, client_writer):
        try:
            await asyncio.sleep(2 * self.delay)  # SYN, SYN-ACK
            server_reader, server_writer = await asyncio.open_connection('127.0.0.1',
                                                                         self.target)
        except (OSError, asyncio.CancelledError):
            client_writer.close()
            return
        try:
            await asyncio.gather(self._forward(client_reader, server_writer),
                                 self._forward(server_reader, client_writer),
                                 return_exceptions=True)
        except asyncio.CancelledError:
            pass  # The proxy is closing.
        finally:
            for writer in (client_writer, server_writer):
                writer.close()

    async def _forward(self, reader, writer):
        """Copy `reader` to `writer`, each chunk `delay` seconds later."""
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        state = {'bytes': 0}
        room = asyncio.Event()
        room.set()

        async def deliver():
            while True:
                due, data = await queue.get()
                pause = due - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
                try:
                    if not data:
                        if writer.can_write_eof():
                            writer.write_eof()
                        return
                    writer.write(data)
                    await writer.drain()
                except OSError:
                    return  # The other side is gone: so is this connection.
                # The window opens again when the acknowledgement is back.
                loop.call_later(self.delay, release, len(data))

        def release(size):
            state['bytes'] -= size
            if state['bytes'] < self.window:
                room.set()

        delivery = asyncio.create_task(deliver())
        try:
            while True:
                await room.wait()
                data = await reader.read(1 << 16)
                queue.put_nowait((loop.time() + self.delay, data))
                state['bytes'] += len(data)
                if state['bytes'] >= self.window:
                    room.clear()
                if not data:
                    break
            await delivery
        except OSError:
            pass  # A side closed or reset the connection: it ends.
        finally:
            delivery.cancel()


def wan_ssh(dts, work, port):
    """An ssh wrapper whose host alias ``dts`` goes through 127.0.0.1:`port`."""
    with open(dts.config) as f:
        config = f.read().replace(f'    Port {dts.port}\n', f'    Port {port}\n')
    path = os.path.join(work, 'ssh_config_wan')
    with open(path, 'w') as f:
        f.write(config)
    wrapper = os.path.join(work, 'ssh_wan')
    with open(wrapper, 'w') as f:
        f.write(f'#!/bin/sh\nexec ssh -F {path} "$@"\n')
    os.chmod(wrapper, 0o755)
    return wrapper


def timed(commands):
    """Seconds to run every command of `commands` at once."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL) for c in commands]
    codes = [p.wait() for p in procs]
    assert codes == [0] * len(codes), codes
    return time.perf_counter() - t0


def verified_moments(nersc, start_ms):
    """Seconds after `start_ms` at which each exposure was verified."""
    status = os.path.join(nersc, 'staging', 'status')
    moments = []
    for name in os.listdir(status):
        if name.startswith('desi_transfer_status_') and name.endswith('.json'):
            with open(os.path.join(status, name)) as f:
                for expid, rows in json.load(f).get(NIGHT, {}).items():
                    moments += [(ms - start_ms) / 1000 for stage, ok, ms in rows
                                if stage == 1 and ok == 1]
    return sorted(moments)


def watching(pid):
    """True if process `pid` has a child running the watch at the mountain
    (an ssh whose command is :data:`~desitransfer.mountain.WATCH_SURVEY_SCRIPT`)."""
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                parent = int(f.read().rsplit(')', 1)[1].split()[1])
            if parent != pid:
                continue
            with open(f'/proc/{entry}/cmdline', 'rb') as f:
                if WATCH_SURVEY_SCRIPT.encode() in f.read().replace(b"'\"'\"'", b"'"):
                    return True
        except (OSError, IndexError, ValueError):
            continue  # Ended meanwhile.
    return False


def running_pass(command, source, nersc, exposures):
    """Start the daemon `command` (not ``--once``) while `source` is empty
    (the backlog waits in `source`.away), wait until its idle pass is done and
    it watches the mountain over its connection, then move the backlog into
    place at once; the seconds from then until each exposure was verified."""
    os.rename(source, source + '.away')
    os.mkdir(source)
    daemon = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not watching(daemon.pid):
            assert daemon.poll() is None and time.monotonic() < deadline, 'no watch'
            time.sleep(0.05)
        time.sleep(0.5)  # The watch's command reaches the mountain, which looks.
        start_ms = time.time() * 1000
        os.rename(source + '.away', source)  # Onto the empty directory: at once.
        while True:
            seen = verified_moments(nersc, start_ms) if os.path.isdir(
                os.path.join(nersc, 'staging', 'status')) else []
            if len(seen) == exposures:
                return seen
            assert daemon.poll() is None and time.monotonic() < deadline + 60, seen
            time.sleep(0.05)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


def main():
    prsr = ArgumentParser(description=__doc__.split('\n')[1])
    prsr.add_argument('--exposures', type=int, default=8)
    prsr.add_argument('--files', type=int, default=4)
    prsr.add_argument('--size', type=int, default=12 << 20, help="bytes per file")
    prsr.add_argument('--delay', type=float, default=0.035,
                      help="one-way delay in seconds; 0: loopback without proxy")
    prsr.add_argument('--window', type=float, default=WINDOW / (1 << 20),
                      help="MiB in flight per connection and direction, like a TCP window")
    prsr.add_argument('--streams', default='auto',
                      help="comma-separated numbers of streams of the daemon passes, or "
                      "auto (the shipped default: from the round trip)")
    prsr.add_argument('--repeat', type=int, default=1, help="runs of each measurement")
    prsr.add_argument('--cold', action='store_true',
                      help="time the first pass ever of each daemon (no state file), "
                      "instead of a pass after one with nothing to do")
    options = prsr.parse_args()
    work = tempfile.mkdtemp(prefix='bench_wan.')
    dts = proxy = None
    try:
        os.makedirs(os.path.join(work, 'sshd'))
        dts = start_sshd(os.path.join(work, 'sshd'))
        ssh = dts.ssh
        if options.delay > 0:
            proxy = DelayProxy(dts.port, options.delay, int(options.window * (1 << 20)))
            ssh = wan_ssh(dts, work, proxy.port)
        mountain = os.path.join(work, 'mountain')
        make_mountain(mountain, [NIGHT], options.exposures, nfiles=options.files,
                      size=options.size)
        source = os.path.join(mountain, 'dts')
        data = os.path.join(mountain, 'data', NIGHT)
        expids = sorted(os.listdir(data))
        daemon = shutil.which('desi_transfer_daemon',
                              path=os.path.dirname(sys.executable) + ':' + os.environ['PATH'])
        streams = [s if s == 'auto' else int(s) or DEFAULT_STREAMS
                   for s in options.streams.split(',')]

        def name(s):
            return f'daemon, {s} stream{"" if s == 1 else "s"}'
        times = {'one stream': [], 'parallel floor': [], 'shared': []}
        times.update({name(s): [] for s in streams})
        times.update({name(s) + ', running': [] for s in streams})
        moments = {}
        for r in range(options.repeat):
            run_dir = os.path.join(work, f'run{r}')
            os.makedirs(run_dir)
            own = ssh_command(ssh)
            for d in ('floor', 'shared'):
                os.makedirs(os.path.join(run_dir, d))
            times['one stream'].append(timed([rsync_ssh(rsync(data, f'{run_dir}/one'), own)]))
            times['parallel floor'].append(timed([
                rsync_ssh(rsync(f'{data}/{e}', f'{run_dir}/floor/{e}'), own) for e in expids]))
            control = os.path.join(run_dir, 'mux')
            shared = ssh_command(ssh, control=control)
            subprocess.run(shared + ['dts', 'true'], check=True)
            times['shared'].append(timed([
                rsync_ssh(rsync(f'{data}/{e}', f'{run_dir}/shared/{e}'), shared)
                for e in expids]))
            subprocess.run(shared + ['-O', 'exit', 'dts'], stderr=subprocess.DEVNULL)
            for d in ('one', 'floor', 'shared'):
                shutil.rmtree(os.path.join(run_dir, d))

            def daemon_site(pass_dir, s):
                """A new NERSC tree in `pass_dir` for a daemon of `s`
                streams: its command (without --once) and the tree."""
                os.makedirs(pass_dir)
                config, nersc = configuration(pass_dir, source, ssh, catchup=-1, backup=-1,
                                              streams=s, hpss='',
                                              hpss_status='http://127.0.0.1:9/')
                return [daemon, '-c', config, '-k', os.path.join(pass_dir, 'stop')], nersc

            def keep(pass_dir, key, seconds, seen):
                """Keep the time of a pass (and when each exposure was
                verified, if it is the best yet); remove its tree."""
                times[key].append(seconds)
                if seconds == min(times[key]):
                    moments[key] = seen
                shutil.rmtree(pass_dir)

            for s in streams:
                key = name(s)
                pass_dir = os.path.join(run_dir, f'streams{s}')
                command, nersc = daemon_site(pass_dir, s)
                command.insert(1, '--once')
                if not options.cold:
                    # A daemon that has run before the backlog: one pass
                    # with nothing linked yet (for auto, the round trip it
                    # measures is in its state file).
                    os.rename(source, source + '.away')
                    os.mkdir(source)
                    subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
                    os.rmdir(source)
                    os.rename(source + '.away', source)
                start_ms = time.time() * 1000
                seconds = timed([command])
                installed = os.listdir(os.path.join(nersc, 'data', NIGHT))
                assert len(installed) == options.exposures, installed
                seen = verified_moments(nersc, start_ms)
                assert len(seen) == options.exposures, seen
                keep(pass_dir, key, seconds, seen)
                # The same backlog met by a daemon that is running.
                command, nersc = daemon_site(pass_dir, s)
                seen = running_pass(command, source, nersc, options.exposures)
                keep(pass_dir, key + ', running', seen[-1], seen)
        megabytes = options.exposures * options.files * options.size / 1e6
        where = (f'one-way delay {options.delay * 1000:g} ms, window {options.window:g} MiB'
                 if options.delay > 0 else 'loopback, no delay')
        print(f"Backlog: {options.exposures} exposures x {options.files} files of "
              f"{options.size / 1e6:g} MB ({megabytes:g} MB), {where}, best of "
              f"{options.repeat} (spread in brackets)")
        one = min(times['one stream'])
        floor = min(times['parallel floor'])
        for key, values in times.items():
            best = min(values)
            print(f"  {key + ':':34s} {best:7.2f} s [{best:.2f}-{max(values):.2f}]"
                  f"  {best / one:5.2f}x one stream  {best / floor:5.2f}x floor"
                  f"  {megabytes / best:6.1f} MB/s")
        for key, seen in moments.items():
            print(f"  {key}: verified at " + ' '.join(f'{t:.1f}' for t in seen) + ' s')
        last = min(times[name(streams[-1])])
        running = min(times[name(streams[-1]) + ', running'])
        if options.delay > 0:
            ok = last <= 1.3 * floor and last <= 0.5 * one and running <= 1.15 * floor
            target = ('daemon pass within 1.3x the parallel floor and at most 0.5x one '
                      'stream; a running daemon\'s within 1.15x the floor')
        else:
            ok = last <= 1.2 * one
            target = 'daemon pass within 1.2x one stream'
        print('PASS' if ok else 'FAIL', f'(target: {target})')
        return 0 if ok else 1
    finally:
        if proxy is not None:
            proxy.close()
        if dts is not None:
            dts.process.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
