# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""A hostile mountain: what it answers never reaches a command line
unchecked, and no link there leads the copies out of the tree they copy.

Each test plays one attack against the real sshd (``dts``), rsync and the
HPSS emulator: exposure targets whose parent directories hold wildcards or a
command (the daemon and the audit), and links out of the tree in nightwatch
and in the daily directories (a private key, a password file, a page of the
web-served directory swapped for a link under the permission change).
"""
import logging
import os
import stat
import subprocess
import sys

import pytest
from fixtures_daemon import LAST
from helpers import mode

from desitransfer.audit import audit, format_table
from desitransfer.processes import Stop
from desitransfer.runner import Result
from desitransfer.mountain import (Mountain, link_copies, parse_links, parse_survey,
                                   safe_path)
from desitransfer.simulator import exposure_files, make_exposure
from desitransfer.nightwatch import NightwatchTransfer
from desitransfer.nightwatch import _options as nightwatch_options

#: What a leaked private key looks like.
KEY = 'BEGIN OPENSSH PRIVATE KEY'

NIGHT = '20240101'
NIGHTWATCH = '/exposures/nightwatch'


def every_file(*tops):
    for top in tops:
        for root, dirs, files in os.walk(top):
            for name in files:
                yield os.path.join(root, name)


def holds(top, text):
    """Files under `top` (not following links) whose contents hold `text`."""
    found = []
    for path in every_file(top):
        if not os.path.islink(path):
            with open(path, errors='replace') as f:
                if text in f.read():
                    found.append(path)
    return found


def tree(top):
    """Everything under `top`: files, ``dir/``, ``link -> target``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, top)
            found.append(f'{rel} -> {os.readlink(path)}' if os.path.islink(path) else
                         rel + '/' if os.path.isdir(path) else rel)
    return sorted(found)


def daily_cli(kpno, *args):
    """Run desi_daily_transfer as cron would, without alerts."""
    return subprocess.run(['desi_daily_transfer', '--kill', str(kpno.kill), '--alert-to', '']
                          + list(args), capture_output=True, text=True, timeout=120)


def home(top):
    """A home directory at the mountain, with a private key."""
    ssh = top / 'home' / '.ssh'
    ssh.mkdir(parents=True)
    (ssh / 'id_ed25519').write_text(f'-----{KEY}-----\nsecret\n')
    (ssh / 'id_ed25519').chmod(0o600)
    return ssh


def old_args_ssh(site, directory):
    """An ssh program that runs every remote command in `directory`, so that
    what a remote shell would create lands there, and hands rsync's
    arguments to the remote shell as an rsync client older than 3.2.4 does
    (or any client with :envvar:`RSYNC_OLD_ARGS`): without the backslashes
    that protect them."""
    wrapper = os.path.join(site.top, 'old-args-ssh')
    with open(wrapper, 'w') as f:
        f.write(f'''#!{sys.executable}
import os, shlex, sys
args = sys.argv[1:]
if 'dts' in args:
    i = args.index('dts')
    remote = ' '.join(args[i + 1:])
    if remote.startswith('rsync --server'):
        remote = remote.replace('\\\\', '')
    args = args[:i + 1] + ['cd ' + shlex.quote({directory!r}) + ' && ' + remote]
os.execv({site.ssh!r}, [{site.ssh!r}] + args)
''')
    os.chmod(wrapper, 0o755)
    site.write_config(ssh=wrapper)


# ----------------------------------------------------------------------
# Row 1: the target of an exposure link is put on rsync's command line.
# ----------------------------------------------------------------------
def test_wildcards_in_the_target_are_refused(site, caplog):
    """A target under ``inst[AB]`` or ``g*`` would make rsync read its
    siblings at the mountain (another instrument's files, installed and
    verified as the exposure): refused and reported, never copied."""
    caplog.set_level(logging.INFO)
    raw = os.path.join(site.data, 'raw')
    site.exposure(LAST, '00000110')
    for parent, foreign, expid in (('inst[AB]', 'instA', '00000120'),
                                   ('g*', 'guider', '00000121')):
        make_exposure(os.path.join(raw, parent), site.source, LAST, expid)
        make_exposure(os.path.join(raw, foreign), site.source, LAST, expid,
                      files=exposure_files(expid, seed=7), link=False)
    assert site.run() == 0
    site.assert_verified(LAST, '00000110')
    assert sorted(os.listdir(site.dest(LAST))) == ['00000110']
    assert not os.path.exists(os.path.join(site.staging, LAST, '00000120'))
    for expid, parent in (('00000120', 'inst[AB]'), ('00000121', 'g*')):
        assert (f"its target {os.path.join(raw, parent, LAST, expid)!r} is not a path of "
                "letters, digits and ._+-") in caplog.text


def test_command_in_the_target_never_runs(site, caplog, monkeypatch):
    """A target under ``$(id>F)``, with rsync's old argument handling (an
    old client, or :envvar:`RSYNC_OLD_ARGS` in the environment): the remote
    shell would run the command."""
    caplog.set_level(logging.INFO)
    monkeypatch.setenv('RSYNC_OLD_ARGS', '1')
    shell = os.path.join(site.top, 'remote-cwd')
    os.makedirs(shell)
    old_args_ssh(site, shell)
    make_exposure(os.path.join(site.data, '$(id>F)'), site.source, LAST, '00000130')
    site.exposure(LAST, '00000131')
    assert site.run() == 0
    assert os.listdir(shell) == []
    site.assert_verified(LAST, '00000131')
    assert not os.path.exists(site.dest(LAST, '00000130'))
    assert f"{LAST}/00000130 at dts is not transferred" in caplog.text
    assert "$(id>F)" in caplog.text and "is not a path of letters" in caplog.text


def test_audit_refuses_and_escapes_what_the_mountain_says(site):
    """The audit reads the same survey: a target with wildcards is refused
    there too (not said to wait at the mountain for the daemon to copy it),
    and a name with a newline is one line of the table."""
    make_exposure(os.path.join(site.data, 'raw', 'inst[AB]'), site.source, LAST, '00000140')
    os.symlink('/etc', os.path.join(site.source, LAST, 'bad\nname'))
    found = audit(site.config, [LAST])
    told = {(d.expid, d.place): d for d in found}
    refused = told[('00000140', 'mountain')]
    assert 'is not a path of letters, digits and ._+-' in refused.problem
    assert ('00000140', 'nersc') not in told  # not "linked ... but not at NERSC"
    table = format_table(found)
    assert "'bad\\nname' is not transferred" in table
    assert len(table.splitlines()) == 2 * len(found) + 2


def test_safe_path_and_the_rsync_source():
    assert safe_path('/data/dts/exposures/lost+found/20240101/00001234')
    for bad in ('/', '', 'data/x', '/data//x', '/data/x/', '/data/../x', '/data/./x',
                '/data/-x', '/data/in[AB]', '/data/g*', '/data/a?', '/data/$(id)', '/data/a b',
                '/data/a\nb', '/data/~x', "/data/'x", '/data/é', '/' + 'x' * 4096):
        assert not safe_path(bad), bad
    assert safe_path('a/b', relative=True) and not safe_path('/a', relative=True)
    mountain = Mountain('dts', 'ssh', Stop())
    with pytest.raises(ValueError):
        mountain.rsync('/data/in[AB]/20240101', '/staging')


@pytest.mark.parametrize('answer', [
    '',                                                      # nothing
    '^/t\n\0=./a\0/t/b\n\0',                                 # no end marker
    '^/t\0#end\0',                                           # tree not terminated
    '^/t\n\0=./a\0/t/b\0#end\0',                             # target not terminated
    '^/t\n\0junk\0#end\0',                                   # unknown token
    '^/t[x]\n\0#end\0',                                      # tree with a wildcard
])
def test_unreadable_list_of_links_follows_nothing(answer):
    links = parse_links(Result(0, answer, ''), '/t')
    assert links.why and links.follow == []


def test_which_links_are_followed():
    """Inside the tree (or under a root of the configuration), not holding
    the link itself, names and targets of the allowed characters only."""
    found = {'in': '/t/sub', 'loop': '/t', 'sub/up': '/t/sub', 'out': '/etc', 'root': '/r/x',
             'sib': '/tx/y', 'we[ir]d': '/t/sub', 'odd': '/t/a b', '-x': '/t/sub'}
    answer = '^/t\n\0^/r\n\0' + ''.join(f'=./{link}\0{target}\n\0'
                                        for link, target in found.items()) + '#find 0\0#end\0'
    links = parse_links(Result(0, answer, ''), '/nw/n', roots=['/data'])
    assert links.tree == '/t' and links.why == ''
    assert links.follow == [('in', '/t/sub'), ('root', '/r/x')]
    assert sorted(links.refused) == ['-x', 'loop', 'odd', 'out', 'sib', 'sub/up', 'we[ir]d']
    assert links.refused['out'] == 'it resolves to /etc, outside /nw/n or /data'
    assert links.refused['sub/up'] == 'it resolves to /t/sub, a directory that holds it'
    assert links.refused['odd'].startswith("it resolves to '/t/a b', not a path")
    assert link_copies([('in', '/t/sub'), ('n/e1', '/d/n/e1'), ('n/e2', '/d/n/e2')]) == [
        ('/d/n', 'n', ['--include=/e1/***', '--include=/e2/***', '--exclude=*']),
        ('/t/sub', 'in', [])]


# ----------------------------------------------------------------------
# Row 5: links out of the tree (nightwatch, daily).
# ----------------------------------------------------------------------
def nightwatch_mountain(kpno):
    """A night whose links lead inside it, to its parent, and to a private
    key; top-level pages, one a link to a private file."""
    ssh = home(kpno.top)
    shadow = kpno.top / 'shadow'
    shadow.write_text('root:$6$secret:19000:0:99999:7:::\n')
    shadow.chmod(0o600)
    kpno.write(f'{NIGHTWATCH}/{NIGHT}/qa.html')
    kpno.write(f'{NIGHTWATCH}/{NIGHT}/sub/inner.html', 'inner\n')
    kpno.write(f'{NIGHTWATCH}/other/secret.html', 'another tree\n')
    kpno.link(f'{NIGHTWATCH}/{NIGHT}/inside', 'sub')
    kpno.link(f'{NIGHTWATCH}/{NIGHT}/leak', str(ssh))
    kpno.link(f'{NIGHTWATCH}/{NIGHT}/up', '../other')
    kpno.link(f'{NIGHTWATCH}/20240102', str(ssh.parent))
    kpno.link(f'{NIGHTWATCH}/nights.html', str(shadow))
    kpno.write(f'{NIGHTWATCH}/nightlinks.js')
    kpno.write(f'{NIGHTWATCH}/qa-lastexp.html')
    return shadow


def nightwatch(kpno, night):
    """One iteration of desi_nightwatch_transfer for `night`, in this process."""
    transfer = NightwatchTransfer(nightwatch_options(['--kill', str(kpno.kill), '--alert-to',
                                                      '', '--once', '--night', night]))
    try:
        return transfer.run_once()[0]
    finally:
        transfer.connection.close()


def test_nightwatch_follows_only_links_inside_the_night(kpno, caplog):
    caplog.set_level(logging.INFO)
    shadow = nightwatch_mountain(kpno)
    kpno_dir = kpno.nersc('spectro', 'nightwatch', 'kpno')
    assert nightwatch(kpno, NIGHT) > 0
    night = kpno_dir / NIGHT
    assert (night / 'inside' / 'inner.html').read_text() == 'inner\n'
    assert (night / 'sub' / 'inner.html').exists()
    for name in ('leak', 'up'):
        assert not os.path.lexists(night / name), name
    assert holds(kpno.nersc(), KEY) == [] and holds(kpno.nersc(), '$6$secret') == []
    assert holds(kpno.nersc(), 'another tree') == []
    # The page that is a link to a private file is neither copied nor followed.
    assert not os.path.lexists(kpno_dir / 'nights.html')
    assert mode(shadow) == 0o600
    assert [mode(kpno_dir / n) for n in ('nightlinks.js', 'qa-lastexp.html')] == [0o644] * 2
    for name in ('leak', 'up'):
        assert f'Link {NIGHTWATCH}/{NIGHT}/{name} is not followed: it resolves to' in caplog.text
    assert f'{NIGHTWATCH}/nights.html is a link out of' in caplog.text
    # A night that is a link out of the nightwatch directory is not synced.
    assert nightwatch(kpno, '20240102') > 0
    assert not os.path.lexists(kpno_dir / '20240102')
    assert f'Night 20240102 is not synced: {NIGHTWATCH}/20240102 resolves to' in caplog.text
    assert holds(kpno.nersc(), KEY) == []


def test_top_level_page_swapped_for_a_link(kpno, monkeypatch):
    """A top-level page replaced by a link just after it was examined: the
    change of mode never reaches what the link points to."""
    nightwatch_mountain(kpno)
    kpno.path(f'{NIGHTWATCH}/nights.html').unlink()
    kpno.write(f'{NIGHTWATCH}/nights.html', mode=0o600)  # Its mode is to be changed.
    victim = kpno.top / 'victim'
    victim.write_text('not for the web\n')
    victim.chmod(0o600)
    page = str(kpno.nersc('spectro', 'nightwatch', 'kpno', 'nights.html'))
    swapped = []

    def swap():
        if not swapped:
            swapped.append(True)
            os.unlink(page)
            os.symlink(victim, page)

    def examined(name):
        real = getattr(os, name)

        def hook(path, *args, **kwargs):
            result = real(path, *args, **kwargs)
            if isinstance(path, (str, os.PathLike)) and os.fspath(path) == page:
                swap()
            return result
        return hook

    real_chmod = os.chmod

    def chmod(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path) == page:
            swap()
        return real_chmod(path, *args, **kwargs)
    for name in ('lstat', 'stat', 'open'):
        monkeypatch.setattr(os, name, examined(name))
    monkeypatch.setattr(os, 'chmod', chmod)
    nightwatch(kpno, NIGHT)
    monkeypatch.undo()
    assert swapped and stat.S_IMODE(os.stat(victim).st_mode) == 0o600


def test_daily_follows_only_links_inside_the_tree(kpno):
    """lost+found (dirlinks): its links to exposures are followed, a link
    to a private key is not; calibration (links kept as links): links out of
    the tree are not recreated at NERSC."""
    ssh = home(kpno.top)
    kpno.write('/data/dts/exposures/raw/20240101/00001234/desi-00001234.fits.fz', 'fits\n')
    kpno.link('/data/dts/exposures/lost+found/20240101/00001234', '../../raw/20240101/00001234')
    kpno.link('/data/dts/exposures/lost+found/20240101/leak', str(ssh))
    kpno.write('/data/focalplane/calibration/fp_calib.json', '{}\n')
    kpno.link('/data/focalplane/calibration/latest.json', 'fp_calib.json')
    kpno.link('/data/focalplane/calibration/shadow', str(ssh / 'id_ed25519'))
    kpno.link('/data/focalplane/calibration/home', str(ssh.parent))
    kpno.link('/data/focalplane/calibration/up', '../../..')
    kpno.nersc('engineering', 'focalplane').mkdir(parents=True)
    p = daily_cli(kpno, 'noon', '--only', 'lost+found')
    assert p.returncode == 1, p.stdout + p.stderr
    lost = kpno.nersc('spectro', 'staging', 'lost+found')
    assert tree(lost) == ['20240101/', '20240101/00001234/',
                          '20240101/00001234/desi-00001234.fits.fz']
    log = kpno.nersc('spectro', 'staging', 'lost+found.log').read_text()
    assert 'ERROR: Link 20240101/leak not followed: it resolves to' in log
    assert 'lost+found (failed: 1 link(s) not followed, the first 20240101/leak' in p.stdout
    p = daily_cli(kpno, 'noon', '--only', 'calibration')
    assert p.returncode == 0, p.stdout + p.stderr
    calibration = kpno.nersc('engineering', 'focalplane', 'calibration')
    assert tree(calibration) == ['fp_calib.json', 'latest.json -> fp_calib.json']
    assert holds(kpno.nersc(), KEY) == []


@pytest.mark.parametrize('stamp', ['$(touch /tmp/owned)/', '-rf/', 'x' * 40000,
                                   '2026-12-05 01:02:03.1 +0000/' * 2000])
def test_survey_stamp_that_is_not_one_is_not_passed_on(stamp):
    """The survey's stamp goes on the next watch's command line: only what
    ``stat --printf=%y/`` prints, bounded, is kept; anything else is
    dropped (the watch then compares with what it sees when it starts)."""
    good = '2026-12-05 01:02:03.123456789 +0000/2026-12-04 23:59:59.000000001 -0700/'
    for given, kept in ((good, good), (stamp, '')):
        answer = f'%{given}\0@/dts/{LAST}/00000001\0' + '1.5\0=/dts/' + \
            f'{LAST}/00000001\0/data/{LAST}/00000001\n\0#find 0\0#end\0'
        survey = parse_survey(Result(0, answer, ''), '/dts', '/data')
        assert survey.answer == 'links' and survey.stamp == kept
        assert list(survey.links) == [f'{LAST}/00000001']
