# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""How soon an exposure linked at the mountain is at NERSC, however it is
linked: during a pass, in a burst; and a stop that leaves nothing running at
the mountain and no ERROR in the log.  The real daemon, against the loopback
sshd; the fixtures are in ``fixtures_daemon.py``."""
import os
import signal
import time

from desitransfer.mountain import make_exposure
from fixtures_daemon import LAST


def _wait_for(condition, seconds, proc=None, what=''):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f'not within {seconds} s: {what}'
        assert proc is None or proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    return time.monotonic()


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
        if b'stat -c %y' in b' '.join(argv) and b'echo quiet' in b' '.join(argv) and \
                os.fsencode(site.source) in argv:
            found.append(int(name))
    return found


def test_link_made_during_a_pass_starts_the_next_at_once(site):
    """An exposure linked after the survey of a pass, while another is being
    copied, is copied as soon as that pass ends, not a whole sleep later; so
    is each link of a burst."""
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
    site.ssh_wrapper('linking-ssh', before_rsync=f'( {line} ); sleep 0.3')
    site.write_config(ssh=os.path.join(site.top, 'linking-ssh'), sleep='60s')
    proc = site.start('--debug')
    try:
        t0 = time.monotonic()
        for expid in ['00003000'] + later:
            done = _wait_for(lambda: os.path.isdir(site.dest(LAST, expid)), 20, proc, expid)
        # Three passes in a row, none waiting for the 60 s sleep.
        assert done - t0 < 20
        for expid in ['00003000'] + later:
            site.assert_verified(LAST, expid)
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
    proc = site.start('--debug')
    try:
        _wait_for(lambda: 'Sleeping 60 seconds' in site.log_text(), 60, proc, 'a pass')
        _wait_for(lambda: _watches(site), 20, proc, 'the watch at the mountain')
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
        _wait_for(lambda: not _watches(site), 5, None, 'the watch to end')
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = site.log_text()
    assert 'desi_transfer_daemon stops.' in text
    assert 'ERROR' not in text, [line for line in text.splitlines() if 'ERROR' in line]
    site.assert_verified(LAST, '00003100')
