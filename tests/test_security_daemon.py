# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""desi_transfer_daemon against a hostile mountain: what it says about junk
is bounded and cannot forge anything.

* a checksum file of junk lines gives a short alert, a short log record and
  a small alert memory, whatever it holds (problems are counted, the first
  few described; a checksum file too large or too long is refused whole);
* junk links are remembered as reported in a bounded set, forgotten when the
  mountain no longer has them or their night leaves the window, and the
  state file is written only when it changes;
* a name holding a newline is logged on one line, escaped.

Each test runs against the real sshd, rsync and SMTP server (fixtures in
``fixtures_daemon.py``).
"""
import json
import logging
import os

from desitransfer import checksum
from desitransfer.daemon import settle
from fixtures_daemon import LAST, TONIGHT

#: Bounds of what one junk-laden pass may write, in bytes.
SMALL_MESSAGE = 8 << 10
SMALL_FILE = 16 << 10


def junk_checksum(site, expid, text):
    """An exposure at the mountain whose checksum file holds `text`."""
    directory = site.exposure(LAST, expid)
    with open(os.path.join(directory, f'checksum-{expid}.sha256sum'), 'w') as f:
        f.write(text)


def log_lines(site):
    return site.log_text().splitlines()


def state_stamp(site):
    st = os.stat(site.state_file)
    return st.st_ino, st.st_mtime_ns


def test_junk_checksum_file_gives_short_alerts(site):
    """Row 2: junk checksum files. The alert, the log record, the alert memory
    and the state stay small; the problems are counted."""
    junk_checksum(site, '00000501', 'x\n' * checksum.MAX_CHECKSUM_LINES)
    junk_checksum(site, '00000502', 'x\n' * (checksum.MAX_CHECKSUM_LINES + 1))
    junk_checksum(site, '00000503', ('y' * 199 + '\n') * 5300)  # 1.06 MB
    assert site.run() == 0
    assert site.smtp.wait(3, timeout=10)
    bodies = {m['Subject'] + m.get_content() for m in site.smtp.messages}
    assert all(len(b) < SMALL_MESSAGE for b in bodies), sorted(len(b) for b in bodies)
    text = site.log_text()
    assert max(len(line) for line in text.splitlines()) < SMALL_MESSAGE
    first = ("Line 1 of checksum-00000501.sha256sum: malformed line 'x', expected "
             "'DIGEST  NAME' or 'DIGEST *NAME'")
    # 10000 bad lines, and the 3 files of the exposure that they do not list.
    assert (f"Exposure {LAST}/00000501 has errors: 10003 problems (the first 10 follow); "
            f"{first}; ") in text
    assert "Line 10 of checksum-00000501.sha256sum" in text
    assert "Line 11 of checksum-00000501.sha256sum" not in text
    assert (f"Exposure {LAST}/00000502 has errors: Could not read checksum file "
            f"{site.staging}/{LAST}/00000502/checksum-00000502.sha256sum: more than "
            "10000 lines. It is installed") in text
    assert "checksum-00000503.sha256sum: larger than 1048576 bytes. It is installed" in text
    memory = os.path.join(os.path.dirname(site.staging), 'desi_transfer_daemon_alerts.json')
    assert os.path.getsize(memory) < SMALL_FILE
    assert os.path.getsize(site.state_file) < SMALL_FILE
    # Installed anyway, recorded as failing the checksum, retried.
    for expid in ('00000501', '00000502', '00000503'):
        assert site.status_rows()[(LAST, int(expid))][1] == 0
        assert f'{LAST}/{expid}' in site.state()['retries']


def test_junk_links_remembered_in_a_bounded_set(site, caplog, monkeypatch):
    """Row 4: junk links. Reported once each (the first few one by one), kept
    as a set of at most MAX_REPORTED, forgotten when gone or out of the
    window, and the state file is not rewritten when nothing changed."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(settle, 'MAX_REPORTED', 30)
    site.write_config(streams='1')  # no round trip measured and kept
    night = os.path.join(site.source, LAST)
    os.makedirs(night)
    junk = [f'junk{i:03d}' for i in range(40)]
    for name in junk:
        os.symlink('/nonexistent', os.path.join(night, name))
    os.symlink('/nonexistent', os.path.join(site.source, 'stray'))
    assert site.run() == 0
    told = [r for r in caplog.records if 'is not transferred: ' in r.getMessage()]
    assert len(told) == settle.MAX_TOLD
    assert (f"10 more entries of {site.source} at dts are not transferred "
            f"({LAST}/junk020, {LAST}/junk021, {LAST}/junk022 and 7 more); each is reported "
            "once.") in caplog.text
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1
    assert critical[0].startswith(f"11 more entries of {site.source} at dts are not "
                                  f"transferred ({LAST}/junk030, {LAST}/junk031, "
                                  f"{LAST}/junk032 and 8 more), but are not remembered: "
                                  "30 refused links are remembered already")
    assert site.smtp.wait(1, timeout=10)
    reported = site.state()['reported']
    assert reported == sorted(reported)  # a sorted list of strings on disk
    assert [k for k in reported if k.startswith('link ')] == [f'link {LAST}/{name}'
                                                              for name in junk[:30]]
    stamp = state_stamp(site)
    # Nothing new: nothing said again but the ERROR, and the file is not rewritten.
    caplog.clear()
    assert site.run() == 0
    assert 'is not transferred: ' not in caplog.text
    again = [r for r in caplog.records if 'but are not remembered' in r.getMessage()]
    assert [r.levelno for r in again] == [logging.ERROR]
    assert not site.smtp.wait(2, timeout=0.5)
    assert state_stamp(site) == stamp
    # Junk removed at the mountain is forgotten, which makes room for the rest.
    for name in junk[:15] + ['../stray']:
        os.remove(os.path.join(night, name))
    caplog.clear()
    assert site.run() == 0
    assert 'but are not remembered' not in caplog.text
    assert f"{site.source}/{LAST}/junk039 at dts is not transferred" in caplog.text
    reported = site.state()['reported']
    assert reported == [f'link {LAST}/{name}' for name in junk[15:]]
    # A night that leaves the recent window is settled history: forgotten.
    site.clock(2026, 12, 20, 21, 0, 0)
    assert site.run() == 0
    assert site.state()['reported'] == []


def test_forged_log_lines(site, caplog):
    """Row 8: names and targets holding newlines are logged escaped, on one
    line each."""
    forged = '2026-11-20T21:00:00 CRITICAL forged'
    os.makedirs(os.path.join(site.source, LAST))
    os.symlink('/nonexistent', os.path.join(site.source, LAST, f'x\n{forged} 1'))
    with open(os.path.join(site.source, f'stray\n{forged} 2'), 'w'):
        pass
    target = os.path.join(site.data, f'evil\n{forged} 3')
    os.makedirs(target)
    os.symlink(target, os.path.join(site.source, LAST, '00000701'))
    assert site.run() == 0
    lines = log_lines(site)
    assert not [line for line in lines if line.startswith(forged)], lines
    text = site.log_text()
    assert (f"{site.source}/'{LAST}/x\\n{forged} 1' at dts is not transferred: "
            "not NIGHT/EXPID.") in text
    assert (f"{site.source}/'stray\\n{forged} 2' at dts is not transferred: "
            "not a night directory.") in text
    why = [line for line in lines if f"{site.source}/{LAST}/00000701 at dts is not "
           "transferred: its target " in line]
    assert len(why) == 1 and f"evil\\n{forged} 3" in why[0]


def test_undecodable_names_stay_distinct(site, caplog):
    """Row 8: two names that differ only in a byte that is not UTF-8 are two
    problems, reported and remembered separately."""
    caplog.set_level(logging.INFO)
    os.makedirs(os.path.join(site.source, TONIGHT))
    for byte in (b'\xfe', b'\xff'):
        with open(os.path.join(os.fsencode(site.source), b'stray' + byte), 'w'):
            pass
    assert site.run() == 0
    told = [r.getMessage() for r in caplog.records if 'is not transferred' in r.getMessage()]
    assert len(told) == 2, told
    assert "'stray\\udcfe'" in told[0] and "'stray\\udcff'" in told[1]
    with open(site.state_file) as f:
        reported = json.load(f)['DESI_SPECTRO_DATA']['reported']
    assert reported == ['link stray\udcfe', 'link stray\udcff']
