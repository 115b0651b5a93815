# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""desi_transfer_daemon copying a backlog in several rsync streams: batches
cut by size, each exposure verified, recorded and installed while others
are still being copied, and the rules of bad days with several streams at
once (connection lost, SIGTERM and the kill file, a full disk, sizes the
mountain cannot tell).

Each integration test runs against the real sshd, rsync and SMTP server
(fixtures in ``fixtures_daemon.py``)."""
import glob
import json
import logging
import os
import subprocess
import threading
import time

import pytest

from desitransfer.configuration import DEFAULT_STREAMS, ConfigurationError, read_configuration
from desitransfer.daemon import transfer
from desitransfer.mountain import Link, Mountain, parse_sizes
from desitransfer.streams import AUTO_MAX_STREAMS, StreamPlanner
from desitransfer.daemon.transfer import MIN_BATCH_BYTES, plan
from desitransfer.processes import Stop
from fixtures_daemon import LAST, snapshot
from loopback import wait_until

ROOT = os.geteuid() == 0

#: Bytes of each file of an exposure large enough for a batch of its own.
LARGE = MIN_BATCH_BYTES // 2 + 1


def ssh_doing(site, name, pattern, action, then=None):
    """An ssh program that runs the shell `action` first for the remote
    commands matching the shell `pattern`, then the ssh program `then` (by
    default the site's)."""
    wrapper = os.path.join(site.top, name)
    with open(wrapper, 'w') as f:
        f.write(f'#!/bin/sh\ncase "$*" in {pattern}) {action};; esac\n'
                f'exec {then or site.ssh} "$@"\n')
    os.chmod(wrapper, 0o755)
    return wrapper


def links(n, night=LAST, parent='/data', first=0):
    return [Link(night, f'{first + i:08d}', f'{parent}/{night}/{first + i:08d}', 0.0)
            for i in range(n)]


def expids(batches):
    return [[link.expid[-2:] for link in batch] for batch in batches]


# ----------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------
def test_plan_balances_by_size_large_first():
    """Batches hold at most the bytes left over twice the streams: large
    first, single exposures at the end; never mixed across nights or
    directories at the mountain."""
    mb = 1 << 20
    backlog = links(16)
    sizes = {link.target: 48 * mb for link in backlog}
    sizes[backlog[3].target] = 400 * mb  # one very large exposure
    batches = plan(backlog, sizes, 2)
    assert [link for batch in batches for link in batch] == backlog
    totals = [sum(sizes[link.target] for link in batch) for batch in batches]
    assert expids(batches)[:2] == [['00', '01', '02'], ['03']]
    # Smaller and smaller: the last batches are single exposures.
    assert totals[-3:] == [48 * mb] * 3
    assert totals[2] >= totals[-1] and max(totals) == 400 * mb
    # By count, balanced like sizes all equal.
    assert expids(plan(backlog, None, 2))[:3] == [['00', '01', '02', '03'],
                                                  ['04', '05', '06'], ['07', '08']]
    # Even one stream verifies a batch while it copies the next.
    assert expids(plan(backlog, sizes, 1)) == [
        ['00', '01', '02', '03'], ['04', '05', '06', '07', '08', '09'], ['10', '11', '12'],
        ['13'], ['14'], ['15']]
    # A long backlog: no batch larger than MAX_BATCH_BYTES.
    long = links(100)
    assert max(len(b) for b in plan(long, {link.target: 100 * mb for link in long}, 1)) == 10
    # One stream, sizes unknown: one rsync for the night, as many as BATCH allows.
    assert expids(plan(backlog, None, 1)) == [[f'{i:02d}' for i in range(16)]]
    two_nights = links(2) + links(2, night='20261118') + links(2, parent='/other', first=2)
    assert two_nights[4].target == '/other/20261119/00000002'
    assert [len(b) for b in plan(two_nights, None, 1)] == [2, 2, 2]


def test_plan_small_exposures_share_an_rsync(monkeypatch):
    """Exposures smaller than MIN_BATCH_BYTES in all are one rsync; BATCH
    still bounds an rsync."""
    backlog = links(7)
    sizes = {link.target: 10_000 for link in backlog}
    assert expids(plan(backlog, sizes, 8)) == [[f'{i:02d}' for i in range(7)]]
    monkeypatch.setattr(transfer, 'BATCH', 3)
    assert [len(b) for b in plan(backlog, sizes, 8)] == [3, 3, 1]


def test_parse_sizes():
    dirs = ['/d/20261119/00000001', '/d/20261119/00000002']
    good = f'100\t{dirs[0]}\n2048\t{dirs[1]}\n'
    assert parse_sizes(good, dirs) == {dirs[0]: 100, dirs[1]: 2048}
    for bad in ('', 'garbage', good[:-1], f'100\t{dirs[0]}\n', good + '5\t/etc\n',
                good.replace('2048', '-1'), good.replace('2048', '２'),
                good + f'1\t{dirs[0]}\n', good.replace('\t', ' ')):
        assert parse_sizes(bad, dirs) is None, bad


@pytest.mark.parametrize('value', ['0', '17', 'four', '-1'])
def test_streams_validated(site, value):
    site.write_config(streams=value)
    with pytest.raises(ConfigurationError, match=r'\[common\] streams'):
        read_configuration(site.config)
    site.write_config()
    assert read_configuration(site.config)[1]['streams'] == DEFAULT_STREAMS == 'auto'
    site.write_config(streams='3')
    assert read_configuration(site.config)[1]['streams'] == 3


def test_bad_streams_one_line_and_nothing_changed(site):
    """The real command refuses a bad number of streams with one CRITICAL
    line naming the file and key, exit status 1, and changes nothing."""
    site.exposure(LAST, '00002900')
    site.write_config(streams='100')
    before = snapshot(site.top)
    command, env = site.command('--once')
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('CRITICAL'), lines
    assert site.config in lines[0] and '[common] streams' in lines[0]
    assert snapshot(site.top) == before


def test_verification_yields_the_cpu():
    """The verification thread runs at a lower CPU priority than the copy."""
    seen = []

    def verifier():
        transfer._lower_priority()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    before = os.getpriority(os.PRIO_PROCESS, 0)
    t = threading.Thread(target=verifier)
    t.start()
    t.join()
    assert seen == [min(19, before + transfer.VERIFY_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


# ----------------------------------------------------------------------
# Several streams at work.
# ----------------------------------------------------------------------
def rsync_gate(site, name, line=''):
    """An ssh program that numbers rsync connections atomically (0, 1, ...),
    writes ``started.N``, then runs the shell `line` (``$n`` is the number)
    before connecting; its number of connections so far, its directory and
    the arguments of every ssh it ran."""
    directory = os.path.join(site.top, name + '.d')
    os.makedirs(directory)
    counter = os.path.join(directory, 'count')
    script = (f'exec 9>>{directory}/lock; flock 9; n=$(cat {counter} 2>/dev/null || echo 0); '
              f'echo $((n + 1)) > {counter}; flock -u 9; touch {directory}/started.$n; '
              + (line or 'true'))
    calls = site.ssh_wrapper(name, before_rsync=script)

    def count():
        return len([n for n in os.listdir(directory) if n.startswith('started.')])
    return count, directory, calls


def large_backlog(site, n, first=3000):
    expids = [f'{first + i:08d}' for i in range(n)]
    for e in expids:
        site.exposure(LAST, e, nfiles=2, size=LARGE)
    return expids


def test_exposures_installed_while_another_is_copied(site):
    """One rsync connection of a multi-stream copy is held back: the
    exposures of the other streams are verified, recorded and installed
    meanwhile; then the held one completes too."""
    expids = large_backlog(site, 4)
    count, _, calls = rsync_gate(site, 'held-ssh', line=(
        f'if [ "$n" = 0 ]; then i=0; while [ ! -e {site.top}/release ] && '
        f'[ $i -lt 600 ]; do sleep 0.05; i=$((i + 1)); done; fi'))
    site.write_config(ssh=os.path.join(site.top, 'held-ssh'), streams='4')
    proc = site.start('--once')
    try:
        deadline = time.monotonic() + 60
        while len(site.status_rows()) < 3:
            assert time.monotonic() < deadline and proc.poll() is None, proc.poll()
            time.sleep(0.05)
        # Three exposures are settled while the first connection is held.
        assert not os.path.exists(os.path.join(site.top, 'release'))
        assert count() == 4
        installed = sorted(os.listdir(site.dest(LAST)))
        assert len(installed) == 3
        for e in installed:
            site.assert_verified(LAST, e, nfiles=2, size=LARGE)
        assert {e for (_, e) in site.status_rows()} == {int(e) for e in installed}
        open(os.path.join(site.top, 'release'), 'w').close()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    for e in expids:
        site.assert_verified(LAST, e, nfiles=2, size=LARGE)
    assert os.listdir(os.path.join(site.staging, LAST)) == []
    assert site.smtp.messages == []
    # Each stream has a connection of its own; all are closed at the end.
    used = {os.path.basename(a.split('=', 1)[1]) for c in calls()
            for a in c if a.startswith('ControlPath=')}
    # Four streams, and the express stream's connection (mux4).
    assert used == {'mux', 'mux1', 'mux2', 'mux3', 'mux4'}, used
    assert glob.glob(f'/tmp/desitransfer-ssh-{proc.pid}-*') == []
    assert not [p for p in os.listdir('/proc') if p.isdigit() and
                f'/tmp/desitransfer-ssh-{proc.pid}-' in _cmdline(p)]


def test_connection_lost_in_one_stream_stops_the_others(site, caplog):
    """Two streams: one rsync connection hangs, the other is lost (ssh exit
    255).  The hanging one is stopped at once, nothing more is copied, and
    nothing is installed or recorded; one ERROR, and the next pass
    converges."""
    caplog.set_level(logging.INFO)
    expids = large_backlog(site, 4)
    gate = os.path.join(site.top, 'lossy-ssh.d')
    count, _, _ = rsync_gate(site, 'lossy-ssh', line=(
        f'if [ "$n" = 0 ]; then while [ ! -e {gate}/started.1 ]; do sleep 0.02; done; '
        'sleep 60; fi; '
        'if [ "$n" = 1 ]; then echo "Connection reset by peer" >&2; exit 255; fi'))
    site.write_config(ssh=os.path.join(site.top, 'lossy-ssh'), streams='2')
    t0 = time.monotonic()
    assert site.run() == 1
    assert time.monotonic() - t0 < 15
    assert count() == 2  # No batch was started after the loss.
    assert site.status_rows() == {}
    assert not os.path.exists(site.dest(LAST))
    errors = [r for r in caplog.records if r.getMessage().startswith('Could not copy')]
    assert len(errors) == 1 and '(1 pass in a row)' in errors[0].getMessage()
    assert 'Connection reset by peer' in errors[0].getMessage()
    assert 'copying each on its own' not in caplog.text and 'has errors' not in caplog.text
    assert not site.smtp.wait(1, timeout=0.3)
    site.write_config(streams='2')
    assert site.run() == 0
    for e in expids:
        site.assert_verified(LAST, e, nfiles=2, size=LARGE)
    assert os.listdir(os.path.join(site.staging, LAST)) == []


@pytest.mark.parametrize('how', ['SIGTERM', 'kill file'])
def test_stop_in_the_middle_of_a_multi_stream_copy(site, how):
    """Three streams are copying (their connections hang) when SIGTERM or
    the kill file comes: every stream stops within seconds, nothing is
    installed or recorded, no rsync or ssh is left; the next run converges."""
    expids = large_backlog(site, 6)
    count, gate, _ = rsync_gate(site, 'slow-ssh', line=(
        f'i=0; while [ ! -e {site.top}/release ] && [ $i -lt 1200 ]; do sleep 0.05; '
        'i=$((i + 1)); done'))
    site.write_config(ssh=os.path.join(site.top, 'slow-ssh'), streams='3')
    if how == 'SIGTERM':
        code, out, seconds = site.terminate_when(lambda: count() == 3)
    else:
        proc = site.start()
        try:
            deadline = time.monotonic() + 60
            while count() < 3:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
            t0 = time.monotonic()
            open(site.kill, 'w').close()
            out, _ = proc.communicate(timeout=60)
            code, seconds = proc.returncode, time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        os.remove(site.kill)
    assert code == 0 and seconds < 5, (seconds, out)
    assert 'Stopped; 6 exposures stay in staging' in out, out
    assert 'Traceback' not in out and count() == 3
    assert site.status_rows() == {}
    assert not os.path.exists(site.dest(LAST))
    assert not [p for p in os.listdir('/proc') if p.isdigit() and
                gate in _cmdline(p)]
    open(os.path.join(site.top, 'release'), 'w').close()
    assert site.run() == 0
    for e in expids:
        site.assert_verified(LAST, e, nfiles=2, size=LARGE)
    assert site.smtp.messages == []


def _cmdline(pid):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return ''


@pytest.mark.parametrize('answer', ['exit 1', 'echo "999 /etc"; exit 0', 'sleep 600'])
def test_sizes_unknown_means_by_count(site, caplog, answer):
    """If the mountain cannot tell the sizes of a backlog (du fails, answers
    garbage, or hangs until stopped), it is shared out by count, and every
    exposure is still copied in several streams and verified."""
    caplog.set_level(logging.INFO)
    expids = [f'{3100 + i:08d}' for i in range(6)]
    for e in expids:
        site.exposure(LAST, e)
    wrapper = ssh_doing(site, 'no-du', '*" du --summarize"*', answer)
    site.write_config(ssh=wrapper, streams='4')
    if answer.startswith('sleep'):
        # A hung question is given up after SIZES_TIMEOUT; here, a shorter one.
        from desitransfer import mountain as remote
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(remote, 'SIZES_TIMEOUT', 1)
            assert site.run() == 0
    else:
        assert site.run() == 0
    assert 'are unknown' in caplog.text and 'shared out among the streams by count' \
        in caplog.text
    copies = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith('Running: /bin/rsync')]
    assert len(copies) == 6, copies
    for e in expids:
        site.assert_verified(LAST, e)
    assert site.smtp.messages == []


def test_sizes_not_asked_for_few_exposures(site, caplog):
    """No more exposures than streams: each is copied by an rsync of its own,
    without asking the mountain for sizes (a round trip less), which opens
    its stream's connection itself: only the express stream's is opened
    ahead.  A backlog: the sizes are asked while the streams' connections
    open."""
    caplog.set_level(logging.INFO)
    expids = [f'{3200 + i:08d}' for i in range(3)]
    for e in expids:
        site.exposure(LAST, e)
    asked = os.path.join(site.top, 'asked')
    wrapper = ssh_doing(site, 'count-du', '*" du --summarize"*', f'echo du >> {asked}')
    opening = ssh_doing(site, 'count-opening', '*" true"', f'echo true >> {asked}',
                        then=wrapper)
    site.write_config(ssh=opening, streams='3')
    assert site.run() == 0
    with open(asked) as f:
        assert f.read() == 'true\n'  # The express stream's connection only.
    os.remove(asked)
    copies = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith('Running: /bin/rsync')]
    assert len(copies) == 3, copies
    for e in expids:
        site.assert_verified(LAST, e)
    site.exposure(LAST, f'{3300:08d}')
    for i in range(4):
        site.exposure(LAST, f'{3301 + i:08d}')
    assert site.run() == 0
    with open(asked) as f:
        lines = f.read().splitlines()
    assert sorted(lines) == ['du', 'true', 'true', 'true'], lines  # and streams 1 and 2


@pytest.mark.skipif(not ROOT, reason='mounting a small file system needs root (CI is root)')
def test_disk_full_in_several_streams(site, caplog):
    """The disk fills up while four streams copy: one alert, nothing partial
    installed or recorded, the other streams stop too; with space, the next
    pass completes everything."""
    caplog.set_level(logging.INFO)
    expids = large_backlog(site, 8)
    site.write_config(streams='4')
    nersc = os.path.join(site.top, 'nersc')
    subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={3 * MIN_BATCH_BYTES},mode=0755',
                    'tmpfs', nersc], check=True)
    try:
        for d in (site.staging, site.destination):
            os.makedirs(d)
        assert site.run() == 1
        assert site.smtp.wait(1, timeout=10)
        assert not site.smtp.wait(2, timeout=0.5)
        assert 'is full' in site.smtp.messages[0].get_content()
        installed = os.listdir(site.dest(LAST)) if os.path.isdir(site.dest(LAST)) else []
        assert len(installed) < len(expids)
        for e in installed:
            site.assert_verified(LAST, e, nfiles=2, size=LARGE)
        assert {e for (_, e) in site.status_rows()} <= {int(e) for e in installed}
        assert 'copying each on its own' not in caplog.text
        assert 'has errors' not in caplog.text and 'Transfer pass of' not in caplog.text
        staged = snapshot(site.staging)
        subprocess.run(['mount', '-o', f'remount,size={20 * MIN_BATCH_BYTES}', nersc],
                       check=True)
        assert staged  # the copies in staging were kept for the next pass
        assert site.run() == 0
        for e in expids:
            site.assert_verified(LAST, e, nfiles=2, size=LARGE)
        assert os.listdir(os.path.join(site.staging, LAST)) == []
    finally:
        subprocess.run(['umount', '-l', nersc])


def test_auto_streams_from_the_round_trip(site, caplog):
    """``streams = auto`` (the default) measures the round trip to the
    mountain: on loopback one stream; the figure is kept in the state file,
    and after a start the one kept serves at once (there, a long round trip:
    an rsync per exposure), while it is measured again."""
    caplog.set_level(logging.INFO)
    site.write_config()
    for i in range(3):
        site.exposure(LAST, f'{3400 + i:08d}')
    assert site.run() == 0
    assert 'a backlog is copied in up to 1 stream.' in caplog.text
    kept = site.state()['round_trip']
    assert kept is not None and 0 < kept < 0.008
    copies = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith('Running: /bin/rsync')]
    assert len(copies) == 1, copies
    # A daemon that last measured 70 ms (KPNO to NERSC), where measuring
    # takes a while.
    site.write_config(ssh=ssh_doing(site, 'slow-cat', '*" cat"', 'sleep 3'))
    with open(site.state_file) as f:
        state = json.load(f)
    state['DESI_SPECTRO_DATA']['round_trip'] = 0.07
    with open(site.state_file, 'w') as f:
        json.dump(state, f)
    caplog.clear()
    for i in range(3):
        site.exposure(LAST, f'{3500 + i:08d}')
    assert site.run() == 0
    copies = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith('Running: /bin/rsync')]
    assert len(copies) == 3, copies
    for i in range(3):
        site.assert_verified(LAST, f'{3500 + i:08d}')


@pytest.mark.parametrize('value', ['"fast"', '-1', '1e9', '[0.07]'])
def test_round_trip_in_state_validated(site, value):
    """A round trip in the state file that is not a number of seconds makes
    the state file unreadable (kept aside), like any other bad field."""
    site.write_config()
    assert site.run() == 0
    with open(site.state_file) as f:
        text = f.read()
    state = json.loads(text)
    state['DESI_SPECTRO_DATA']['round_trip'] = json.loads(value)
    with open(site.state_file, 'w') as f:
        json.dump(state, f)
    assert site.run() == 0
    assert os.path.exists(site.state_file + '.bad')


def test_idle_pass_asks_the_mountain_once(site):
    """A ``--once`` pass that finds nothing new opens one connection to the
    mountain, for the survey; the round trip is measured after it, over the
    same connection (``streams = auto``): no connection is opened for
    streams, yet a backlog found by the next run knows its streams at once."""
    site.exposure(LAST, '00003900')
    site.exposure(LAST, '00003901')
    calls = site.ssh_wrapper('counting-ssh')
    assert site.run() == 0
    assert site.state()['round_trip'] is not None
    with open(site.state_file) as f:
        state = json.load(f)
    state['DESI_SPECTRO_DATA']['round_trip'] = None  # never measured
    with open(site.state_file, 'w') as f:
        json.dump(state, f)
    before = len(calls())
    assert site.run() == 0
    ran = [c for c in calls()[before:] if '-O' not in c]
    assert [c[-1] for c in ran][1:] == ['cat'] and 'find' in ran[0][-1], ran
    paths = {a for c in ran for a in c if a.startswith('ControlPath=')}
    assert len(paths) == 1, ran
    # The survey went first; the measurement, after it, is kept.
    assert site.state()['round_trip'] is not None


class _Mountain(object):
    """A mountain that answers the round trip after `delay` seconds."""

    name = 'dts'

    def __init__(self, rtt, delay=0.0):
        self.rtt, self.delay, self.opened, self.asked = rtt, delay, [], 0

    def round_trip(self):
        self.asked += 1
        time.sleep(self.delay)
        return self.rtt

    def open_streams(self, n, first=1):
        self.opened.append((first, n))


def test_stream_planner_on_its_own():
    """The planner needs only its mountain, the setting, the round trip known
    from the last run and whom to tell of a new one: a number is taken as it
    is; ``auto`` uses the round trip known at once while it is measured
    again, tells of the new one as soon as it is measured, and says at the
    end that there is one to keep."""
    kept = []
    fixed = StreamPlanner(_Mountain(0.05), 3, remember=kept.append)
    assert fixed.streams() == 3 and fixed.mountain.opened == [(3, 4)]  # the express stream's
    fixed.measure()
    assert not fixed.settle()
    assert fixed.mountain.asked == 0 and not kept
    mountain = _Mountain(0.2, delay=0.3)
    auto = StreamPlanner(mountain, 'auto', known=0.02, remember=kept.append)
    assert auto.streams() == 3  # 20 ms known from the last run, not waited for
    assert auto.round_trip() == 0.02 and not kept
    wait_until(lambda: kept == [0.2], 10, what='the measurement in the background')
    assert auto.round_trip() == 0.2
    assert auto.settle() and not auto.settle()  # one new round trip to keep, once
    assert auto.streams() == AUTO_MAX_STREAMS  # 200 ms: capped
    assert mountain.asked == 1  # measured again only after AUTO_REFRESH
    # Never measured: the first copy waits for the measurement, and the end
    # of a run (--once) for the measurement under way, to keep it; not when
    # stopping.
    first = StreamPlanner(_Mountain(0.01, delay=0.2), 'auto', remember=kept.append)
    assert first.streams() == 2 and kept == [0.2, 0.01]
    other = StreamPlanner(_Mountain(0.03, delay=0.2), 'auto', remember=kept.append)
    other.measure()
    assert other.settle() and kept == [0.2, 0.01, 0.03]
    stopped = StreamPlanner(_Mountain(0.04, delay=0.5), 'auto')
    stopped.measure()
    assert not stopped.settle(stopping=True) and stopped.round_trip() is None
    # A measurement that fails keeps the last one and tells nobody.
    failing = StreamPlanner(_Mountain(None), 'auto', known=0.05, remember=kept.append)
    failing.measure()
    assert not failing.settle() and failing.round_trip() == 0.05
    assert kept == [0.2, 0.01, 0.03]


def test_first_command_of_a_stream_waits_for_its_opening(dts, tmp_path):
    """A connection opened ahead of its stream (an ssh handshake, slow over a
    wide-area link) is waited for by the stream's first command, which then
    shares it; started meanwhile, that command would find the control socket
    half made and open a connection of its own."""
    record = tmp_path / 'record'
    wrapper = tmp_path / 'slow-ssh'
    wrapper.write_text(f'''#!/bin/sh
for arg; do case $arg in ControlPath=*) mux=${{arg##*/}};; esac; last=$arg; done
if [ "$last" = true ]; then
    [ "$mux" = mux3 ] && exec sleep 60  # A handshake that never ends.
    echo "open-start $mux" >> {record}; sleep 0.5; {dts.ssh} "$@"; rc=$?
    echo "open-end $mux" >> {record}; exit $rc
fi
echo "use $mux $last" >> {record}
exec {dts.ssh} "$@"
''')
    wrapper.chmod(0o755)
    mountain = Mountain('dts', str(wrapper), Stop())
    try:
        mountain.open_streams(4)
        assert mountain.remote(['echo', 'zero']).stdout == 'zero\n'
        assert mountain.remote(['echo', 'two'], stream=2).stdout == 'two\n'
        lines = record.read_text().splitlines()
        assert lines.count('open-start mux1') == lines.count('open-start mux2') == 1, lines
        assert lines.index('use mux2 echo two') > lines.index('open-end mux2'), lines
        # Stream 0 has no opening: its command does not wait for the others.
        assert 'open-end mux1' not in lines[:lines.index('use mux echo zero')], lines
        assert mountain.connection.is_open(1) and mountain.connection.is_open(2)
        # A command stopped does not wait for a handshake that never ends.
        stopped = Stop()
        threading.Timer(0.3, stopped.set, ('stopped',)).start()
        t0 = time.monotonic()
        mountain.remote(['echo', 'three'], stream=3, stop=stopped)
        assert time.monotonic() - t0 < 5
    finally:
        mountain.stop.set('end of the test')  # Ends the hung opening.
        mountain.close()


def test_end_of_a_copy_wakes_its_watch_at_once():
    """The watch during a copy waits on the copy's end, a fatal outcome in a
    stream or a stop, and is woken by each at once, not at its next look."""
    for wake in ('done', 'abort', 'stop'):
        stop = Stop()
        abort = transfer._Abort(stop)
        done = transfer._Done(abort)
        assert done.wait(0.01) is False
        action = {'done': done.set, 'abort': lambda: abort.set(transfer.CONNECTION_LOST),
                  'stop': lambda: stop.set('SIGTERM received')}[wake]
        threading.Timer(0.05, action).start()
        t0 = time.monotonic()
        assert done.wait(30) is True, wake
        assert time.monotonic() - t0 < 0.3, wake
