# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""How soon an exposure linked at the mountain is at NERSC, however it is
linked: during a pass, in a burst, while a backlog is copied; and a stop
that leaves nothing running at the mountain and no ERROR in the log.  The
real daemon, against the loopback sshd; the fixtures are in
``fixtures_daemon.py``."""
import os
import signal
import time

import threading

from desitransfer.mountain import Mountain
from desitransfer.processes import Stop
from desitransfer.runner import Result
from desitransfer.simulator import make_exposure
from fixtures_daemon import EARLIER, LAST, TONIGHT
from loopback import wait_until


def _verified(site, night, expid):
    """Whether the exposure is installed and recorded as verified (see
    ``Site.assert_verified``)."""
    try:
        site.assert_verified(night, expid)
    except (AssertionError, KeyError, OSError):
        return False
    return True


def _watches(site):
    """Pids of the watch shells running at the mountain (this machine) for `site`."""
    found = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open(f'/proc/{name}/cmdline', 'rb') as f:
                argv = f.read().split(b'\0')
        except OSError:
            continue
        if b'stat --printf=%y/' in b' '.join(argv) and b'echo quiet' in b' '.join(argv) and \
                os.fsencode(site.source) in argv:
            found.append(int(name))
    return found


def _stop_while_watching(site, ready, what):
    """Start the daemon, send SIGTERM once ``ready()`` and the watch runs at
    the mountain (`what`); the watch ends there within seconds, the daemon
    exits 0, and its log says it stopped and has no ERROR."""
    proc = site.start('--debug')
    try:
        wait_until(ready, 60, proc, 'the daemon to be ready')
        wait_until(lambda: _watches(site), 20, proc, what)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
        wait_until(lambda: not _watches(site), 5, None, 'the watch to end')
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = site.log_text()
    assert 'desi_transfer_daemon stops.' in text
    assert 'ERROR' not in text, [line for line in text.splitlines() if 'ERROR' in line]


def test_link_made_during_a_pass_starts_the_next_at_once(site):
    """An exposure linked after the survey of a pass, while another is being
    copied, and not seen during the copy, is copied as soon as that pass
    ends, not a whole sleep later; so is each link of a burst."""
    site.exposure(LAST, '00003000')
    # The next two exposures are written but not linked yet: the rsync of the
    # first links the second (after the survey), the second the third.
    later = ['00003001', '00003002']
    for expid in later:
        make_exposure(site.data, site.source, LAST, expid, link=False)
    links = [os.path.join(site.source, LAST, e) for e in later]
    targets = [os.path.join(site.data, LAST, e) for e in later]
    line = '; '.join(f'if [ ! -e {link} ]; then ln -s {target} {link}; exit 0; fi'
                     for link, target in zip(links, targets))
    # The watch during the copy (on the express stream's connection, mux1)
    # cannot be run: only the watch between passes can see these links.
    site.ssh_wrapper('linking-ssh', before_rsync=f'( {line} ); sleep 0.3',
                     before_command="case \"$*\" in *'/mux1 '*'w=$(('*) exit 255;; esac")
    site.write_config(ssh=os.path.join(site.top, 'linking-ssh'), sleep='60s')
    proc = site.start('--debug')
    try:
        t0 = time.monotonic()
        for expid in ['00003000'] + later:
            # Installed, then recorded: wait for both.
            done = wait_until(lambda: _verified(site, LAST, expid), 20, proc, expid)
        # Three passes in a row, none waiting for the 60 s sleep.
        assert done - t0 < 20
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert 'the next pass starts now' in site.log_text()


def test_stop_ends_the_watch_at_the_mountain_and_logs_no_error(site):
    """SIGTERM while the daemon watches the mountain: the watch shell there
    ends within seconds, and a clean stop writes no ERROR to the log."""
    site.write_config(sleep='60s')
    site.exposure(LAST, '00003100')
    _stop_while_watching(site, lambda: 'Sleeping 60 seconds' in site.log_text(),
                         'the watch between passes')
    site.assert_verified(LAST, '00003100')


def test_exposure_linked_during_a_backlog_goes_ahead_of_it(site):
    """While a backlog of two nights is copied (one stream, each rsync of it
    slowed by 2 s), an exposure of tonight linked during the copy of the
    first night is copied, verified and installed before the second night's
    copy starts; tonight's exposures known at the survey go first."""
    backlog = [(night, f'{first + i:08d}') for night, first in ((EARLIER, 3200), (LAST, 3300))
               for i in range(2)]
    for night, expid in backlog:
        site.exposure(night, expid)
    site.exposure(TONIGHT, '00003400')
    new = '00003401'
    make_exposure(site.data, site.source, TONIGHT, new, link=False)
    link = os.path.join(site.source, TONIGHT, new)
    target = os.path.join(site.data, TONIGHT, new)
    order = os.path.join(site.top, 'order')
    # Each rsync of a night says which (and whether the new exposure is
    # installed by then); one of the backlog links the new exposure and
    # takes 2 s.
    line = (f'for n in {TONIGHT} {LAST} {EARLIER}; do case "$*" in *$n/*) '
            f'[ -d {site.dest(TONIGHT, new)} ] && i=+; echo $n$i >> {order};; esac; done; '
            f'case "$*" in *{TONIGHT}/*) ;; *) [ -L {link} ] || ln -s {target} {link}; '
            'sleep 2;; esac')
    site.ssh_wrapper('slow-backlog-ssh', before_rsync=line)
    site.write_config(ssh=os.path.join(site.top, 'slow-backlog-ssh'), streams='1')
    assert site.run('--debug') == 0
    with open(order) as f:
        nights = f.read().split()
    # Tonight first, then the backlog newest first, the exposure linked
    # meanwhile copied while the first night of the backlog was, and
    # installed before the second night started.
    assert nights[0] == TONIGHT and nights[1:3] == [LAST, TONIGHT], nights
    assert nights[3] == EARLIER + '+', nights
    for night, expid in backlog + [(TONIGHT, '00003400'), (TONIGHT, new)]:
        site.assert_verified(night, expid)
    assert 'copied at once, ahead of them' in site.log_text()


def test_exposure_linked_during_a_long_copy_is_copied_beside_it(site):
    """An exposure linked while another, alone, takes seconds to copy (a
    large exposure over the wide-area link) is copied, verified and
    installed beside it, not after it."""
    site.exposure(LAST, '00003500')
    new = '00003501'
    make_exposure(site.data, site.source, LAST, new, link=False)
    link = os.path.join(site.source, LAST, new)
    target = os.path.join(site.data, LAST, new)
    first, beside = os.path.join(site.top, 'first'), os.path.join(site.top, 'beside')
    # The first rsync links the new exposure and takes 3 s; at its end, is
    # the new one installed?
    line = (f'if [ ! -e {first} ]; then touch {first}; ln -s {target} {link}; sleep 3; '
            f'[ -d {site.dest(LAST, new)} ] && touch {beside}; fi; true')
    site.ssh_wrapper('slow-first-ssh', before_rsync=line)
    site.write_config(ssh=os.path.join(site.top, 'slow-first-ssh'), streams='1')
    assert site.run('--debug') == 0
    assert os.path.exists(beside)
    for expid in ('00003500', new):
        site.assert_verified(LAST, expid)
    assert 'copied at once, ahead of them' in site.log_text()


def test_watch_and_survey_in_one_command(tmp_path):
    """The watch during a copy surveys as soon as it sees a change, in the
    same command: quiet is ``False``; a link made since the last survey
    (even before the watch starts) comes back as a survey that lists it,
    with the stamp the next watch compares with; a lost answer is ``None``."""
    data, source = str(tmp_path / 'data'), str(tmp_path / 'dts')
    lock = str(tmp_path / 'checksum-running')
    make_exposure(data, source, TONIGHT, '00003500')
    mountain = Mountain('', 'ssh', Stop())
    first = mountain.survey(source, lock, [TONIGHT])
    assert first.answer == 'links' and first.stamp
    assert mountain.watch_survey(1, first.stamp, source, lock, [TONIGHT]) is False
    # Linked before the watch starts: seen at its first look.
    make_exposure(data, source, TONIGHT, '00003501')
    t0 = time.monotonic()
    again = mountain.watch_survey(60, first.stamp, source, lock, [TONIGHT])
    assert time.monotonic() - t0 < 5
    assert again.answer == 'links', again
    assert sorted(again.links) == [f'{TONIGHT}/00003500', f'{TONIGHT}/00003501']
    assert again.stamp != first.stamp
    # Linked while it watches: seen within a look or two.
    timer = threading.Timer(0.5, make_exposure, (data, source, TONIGHT, '00003502'))
    timer.start()
    try:
        third = mountain.watch_survey(60, again.stamp, source, lock, [TONIGHT])
    finally:
        timer.join()
    assert f'{TONIGHT}/00003502' in third.links
    # The checksum lock, seen after the change, is the survey's answer.
    with open(lock, 'w'):
        pass
    make_exposure(data, source, TONIGHT, '00003503')
    assert mountain.watch_survey(60, third.stamp, source, lock, [TONIGHT]).answer == 'locked'
    os.remove(lock)
    # An answer cut short is not a survey.
    broken = Mountain('', 'ssh', Stop())
    broken.remote = lambda words, **kw: Result(0, '..changed\0%x\0@' + source, '')
    assert broken.watch_survey(1, 'x', source, lock, [TONIGHT]).answer == 'unknown'
    broken.remote = lambda words, **kw: Result(0, '..garbage', '')
    assert broken.watch_survey(1, 'x', source, lock, [TONIGHT]) is None
    broken.remote = lambda words, **kw: Result(255, '', 'ssh: lost')
    assert broken.watch_survey(1, 'x', source, lock, [TONIGHT]) is None


def test_stop_during_a_copy_ends_the_watch_at_the_mountain(site):
    """SIGTERM while a backlog is copied and the mountain is watched for
    links made meanwhile (over the express stream's connection): nothing of
    the daemon runs on at the mountain, and the stop logs no ERROR."""
    for expid in ('00003600', '00003601'):
        site.exposure(EARLIER, expid)
    marker = os.path.join(site.top, 'copying')
    site.ssh_wrapper('slow-ssh', before_rsync=f'touch {marker}; sleep 30')
    site.write_config(ssh=os.path.join(site.top, 'slow-ssh'), streams='1', sleep='60s')
    _stop_while_watching(site, lambda: os.path.exists(marker), 'the watch during the copy')
