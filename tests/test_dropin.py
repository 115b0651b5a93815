# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""An installation of the original desitransfer switches over unchanged: its
configuration file, its status files (also written by it between two of ours),
its command-line options and its API, against the loopback mountain, the HPSS
emulator and the status store.  The fixtures are in ``fixtures_daemon.py``."""
import argparse
import json
import logging
import os
import shutil
import stat
import subprocess
import time

import pytest

from desitransfer.configuration import ConfigurationError, read_configuration
from desitransfer.daemon import TransferDaemon, _options
from desitransfer.simulator import checksum_text, exposure_files
from desitransfer.status import TransferStatus
from fixtures_daemon import EARLIER, LAST
from helpers import mode

NIGHT = '20231010'


# ----------------------------------------------------------------------
# The configuration file.
# ----------------------------------------------------------------------
def original_configuration(path, source, ssh, checksum_lock, hpss, hpss_status):
    """A configuration laid out as the original's shipped file: its sections and
    keys only (no host, smtp, retries, recent or streams), ``${VAR}`` for the
    environment; the values that name this machine are the test site's."""
    path.write_text(f"""#
# Raw data from the mountain.
#
[DESI_SPECTRO_DATA]
source = {source}
staging = ${{DESI_ROOT}}/spectro/staging/raw
destination = ${{DESI_SPECTRO_DATA}}
hpss = desi/spectro/data
checksum_file = checksum-{{exposure}}.sha256sum

[common]
temporary = ${{DESI_ROOT}}/spectro/staging/scratch,${{SCRATCH}},${{HOME}}/tmp,${{HOME}}/scratch
checksum_lock = {checksum_lock}
catchup = 14
backup = 20
# sleep = 10
sleep = 1
ssh = {ssh}
hpss = {hpss}
hpss_status = {hpss_status}

[logging]
filename = ${{DESI_ROOT}}/spectro/staging/logs/desi_transfer_daemon.log
size = 100000000
backups = 100
to = desi-alarms-transfer@desi.lbl.gov
""")
    return str(path)


def test_original_configuration_runs_unchanged(site, tmp_path):
    """The original's file has no [common] host: the source is the mountain
    ``dts``, reached over ssh; SCRATCH unset leaves out one candidate; the
    night is transferred, verified, recorded and archived."""
    desi_root = tmp_path / 'desi'
    data = desi_root / 'spectro' / 'data'
    for d in (data, desi_root / 'spectro' / 'staging' / 'scratch',
              desi_root / 'spectro' / 'staging' / 'logs'):
        d.mkdir(parents=True)
    ini = original_configuration(tmp_path / 'original.ini', site.source, site.ssh,
                                 os.path.join(site.mountain, 'checksum-running'),
                                 site.hpss.bin, site.hpss_status.url)
    for e in ('00000100', '00000101'):
        site.exposure(LAST, e)
    command, env = site.command('--once')
    command[command.index('--configuration') + 1] = ini
    env.update(DESI_ROOT=str(desi_root), DESI_SPECTRO_DATA=str(data))
    env.pop('SCRATCH', None)
    p = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    log = (desi_root / 'spectro' / 'staging' / 'logs' / 'desi_transfer_daemon.log').read_text()
    assert 'at dts' in log or 'dts:' in log or 'from dts' in log, log
    assert 'localhost' not in log
    for e in ('00000100', '00000101'):
        assert sorted(os.listdir(data / LAST / e)) == sorted(os.listdir(
            os.path.join(site.data, LAST, e)))
    status = TransferStatus(str(desi_root / 'spectro' / 'staging' / 'status'))
    rows = status.records(LAST)
    assert {e: sorted(r[0] for r in rows[e]) for e in rows} == {
        '100': [0, 1, 2, 3], '101': [0, 1, 2, 3]}
    assert site.hpss.members(f'desi/spectro/data/desi_spectro_data_{LAST}.tar')
    assert mode(data / LAST) == 0o2550


def test_original_configuration_keys(tmp_path, monkeypatch):
    """Keys left out mean what the original's file says; ``${section:key}`` and
    ``${key}`` as in the original's interpolation; a local source only when
    written ``host =``."""
    for var in ('DESI_ROOT', 'DESI_SPECTRO_DATA', 'HOME'):
        monkeypatch.setenv(var, f'/g/{var.lower()}')
    monkeypatch.delenv('SCRATCH', raising=False)
    ini = original_configuration(tmp_path / 'o.ini', '/data/dts/exposures/raw', '/bin/ssh',
                                 '/tmp/checksum-running', '/usr/local/bin',
                                 'https://api.nersc.gov/api/v1.2/status/archive')
    directories, common, logging_ = read_configuration(ini)
    assert common['host'] == 'dts'
    assert common['temporary'] == ['/g/desi_root/spectro/staging/scratch', '/g/home/tmp',
                                   '/g/home/scratch']
    assert (common['hpss'], common['ssh'], common['sleep']) == ('/usr/local/bin', '/bin/ssh', 60)
    assert (common['retries'], common['recent'], common['streams']) == (5, 30, 'auto')
    assert (logging_['smtp'], logging_['report']) == ('localhost:25', True)
    assert directories[0].staging == '/g/desi_root/spectro/staging/raw'
    # The shortest file: one destination, everything else the original's values.
    short = tmp_path / 'short.ini'
    short.write_text("[DESI_SPECTRO_DATA]\nsource = /s\nstaging = /x/raw\n"
                     "destination = ${staging}/../data\nhpss = desi/spectro/data\n"
                     "checksum_file = checksum-{exposure}.sha256sum\n"
                     "[logging]\nfilename = ${DESI_SPECTRO_DATA:staging}/../logs/d.log\n")
    directories, common, logging_ = read_configuration(str(short))
    assert directories[0].destination == '/x/data'
    assert logging_['filename'] == '/x/logs/d.log'
    assert (common['host'], common['catchup'], common['backup']) == ('dts', 14, 20)
    assert common['checksum_lock'] == '/tmp/checksum-running'
    assert common['hpss_status'] == 'https://api.nersc.gov/api/v1.2/status/archive'
    assert logging_['to'] == ['desi-alarms-transfer@desi.lbl.gov']
    local = tmp_path / 'local.ini'
    local.write_text(short.read_text() + "[common]\nhost =\ntemporary = $$HOME,/tmp\n")
    assert read_configuration(str(local))[1]['host'] == ''
    assert read_configuration(str(local))[1]['temporary'] == ['$HOME', '/tmp']
    # Errors name the key.
    for text, message in [
            ("[common]\nhost = ${nosuch:key}\n", r"\[common\] host: \$\{nosuch:key\} names no key"),
            ("[common]\nhost = ${a}\na = ${host}\n", r"nested more than 10 deep"),
            ("[common]\nhost = $x\n", r"\[common\] host: a '\$' must be"),
            ("[common]\ntemporary = ${NO_SUCH_VARIABLE}\n",
             r"\[common\] temporary lists no directory \(not set: NO_SUCH_VARIABLE\)")]:
        bad = tmp_path / 'bad.ini'
        bad.write_text(short.read_text() + text)
        with pytest.raises(ConfigurationError, match=message):
            read_configuration(str(bad))
    monkeypatch.delenv('DESI_ROOT')
    with pytest.raises(ConfigurationError,
                       match=r"\[logging\] filename \(its default\): environment variable "
                             r"DESI_ROOT is not set"):
        nolog = tmp_path / 'nolog.ini'
        nolog.write_text(short.read_text().split('[logging]')[0])
        read_configuration(str(nolog))


# ----------------------------------------------------------------------
# Options and -B.
# ----------------------------------------------------------------------
def test_original_options(site):
    """TransferDaemon takes the original's namespace (``backup``, no ``once``)."""
    original = argparse.Namespace(backup=False, configuration=site.config, debug=False,
                                  kill=site.kill, test=False)
    d = TransferDaemon(original)
    assert d.tape is False and d.options.once is False
    assert TransferDaemon(argparse.Namespace(no_backup=True, configuration=site.config,
                                             debug=False, kill=site.kill, test=False,
                                             once=True)).tape is False
    assert _options(['-B']).backup is False and _options([]).backup is True
    d = TransferDaemon(argparse.Namespace(backup=True, configuration=site.config, debug=False,
                                          kill=site.kill, test=False, once=True))
    assert d.tape is True and d.run() == 0


def test_no_backup_still_catches_up_and_protects(site, caplog):
    """-B skips only the tape: a due night still gets its final catch-up and
    write protection, and is archived by the first run without -B."""
    caplog.set_level(logging.INFO)
    site.exposure(EARLIER, '00000300')
    assert site.run() == 0  # backup hour disabled: copied and verified only
    files = exposure_files('00000300')
    files['late.json'] = b'{}\n'
    directory = os.path.join(site.data, EARLIER, '00000300')
    for name in ('late.json', 'checksum-00000300.sha256sum'):
        with open(os.path.join(directory, name), 'wb') as f:
            f.write(files[name] if name in files else checksum_text(files).encode())
    site.write_config(backup='20')
    assert site.run('--no-backup') == 0
    assert site.hpss.calls() == []
    assert os.path.exists(site.dest(EARLIER, '00000300', 'late.json'))
    assert mode(site.dest(EARLIER)) == 0o2550
    assert not mode(site.dest(EARLIER, '00000300')) & stat.S_IWUSR
    assert 2 not in site.status_rows()[(EARLIER, 300)]
    assert f'Night {EARLIER} is caught up and write-protected' in caplog.text
    assert site.state()['protected'] == [EARLIER]
    calls = len(site.htar_calls())
    assert site.run('--no-backup') == 0  # said and done once
    assert caplog.text.count('is caught up and write-protected') == 1
    assert site.run() == 0
    assert len(site.htar_calls()) == calls + 1
    assert site.status_rows()[(EARLIER, 300)][2] == 1


# ----------------------------------------------------------------------
# Status files written by the original too.
# ----------------------------------------------------------------------
def original_update(path, night, expid, stage, now):
    """Record as the original does: the file copied to ``.bak`` keeping its
    times, then written again in place, compact."""
    with open(path) as f:
        data = json.load(f)
    data.setdefault(night, {}).setdefault(expid, []).insert(0, [stage, 1, now])
    shutil.copy2(path, path + '.bak')
    with open(path, 'w') as f:
        json.dump(data, f, indent=None, separators=(',', ':'))
    time.sleep(0.01)  # distinct modification times, as between two real updates


@pytest.fixture
def mixed(tmp_path):
    d = tmp_path / 'status'
    store = TransferStatus(str(d), year=2023)
    store.update(NIGHT, '1', 'rsync')
    store.update(NIGHT, '2', 'rsync')
    time.sleep(0.01)
    return store, d, str(d / 'desi_transfer_status_2023.json')


def damaged(path):
    os.truncate(path, os.path.getsize(path) // 2)


def test_original_file_read_and_kept(tmp_path):
    """A file of the original (duplicate ``backup`` rows of its ``update('all')``)
    is read as it is, and an update keeps every row."""
    d = tmp_path / 'status'
    d.mkdir()
    original = {NIGHT: {'5': [[2, 1, 300], [2, 1, 200], [1, 1, 100], [0, 1, 50]],
                        '6': [[0, 0, 60]]}}
    (d / 'desi_transfer_status_2023.json').write_text(
        json.dumps(original, separators=(',', ':')))
    store = TransferStatus(str(d), year=2023)
    assert store.find(NIGHT) == original[NIGHT]
    assert store.find(NIGHT, '5', 'backup') == [0, 1]
    assert store.find('20231011', '5', 'backup') == []  # an unknown night, as the original
    with pytest.raises(KeyError):
        store.find('20231011', '5')
    assert (store.current_year, store.first_year, store._stages['backup']) == ('2023', '2018', 2)
    assert store.update(NIGHT, '6', 'rsync') == 1
    data = json.loads((d / 'desi_transfer_status_2023.json').read_text())
    assert data[NIGHT]['5'] == original[NIGHT]['5'] and data[NIGHT]['6'][0][:2] == [0, 1]


def test_copy_refreshed_after_original_writes(mixed, caplog):
    """The original writes; the next reading makes the copy mirror the file
    again, so a later damage loses nothing."""
    store, d, path = mixed
    original_update(path, NIGHT, '3', 0, 3000)
    caplog.set_level(logging.WARNING)
    assert sorted(TransferStatus(str(d), year=2023).find(NIGHT)) == ['1', '2', '3']
    assert 'does not match its copy' in caplog.text
    with open(path, 'rb') as f, open(path + '.copy', 'rb') as c:
        assert f.read() == c.read()
    caplog.clear()
    damaged(path)
    assert sorted(TransferStatus(str(d), year=2023).find(NIGHT)) == ['1', '2', '3']
    assert {r.levelname for r in caplog.records} == {'ERROR'}
    assert 'no record is lost' in caplog.text


@pytest.mark.parametrize('writes', [1, 2])
def test_stale_copy_never_used_silently(mixed, caplog, writes):
    """The original writes (once or twice) and the file is damaged before this
    package reads it: the stale copy is not taken for the last version; the
    newest version there is (the .bak) is restored, with a CRITICAL alarm."""
    store, d, path = mixed
    for k in range(writes):
        original_update(path, NIGHT, str(3 + k), 0, 3000 + k)
    damaged(path)
    caplog.set_level(logging.WARNING)
    found = sorted(TransferStatus(str(d), year=2023).find(NIGHT))
    # The .bak: the version before the original's last update.
    assert found == ['1', '2', '3'][:writes + 1]
    critical = [r for r in caplog.records if r.levelname == 'CRITICAL']
    assert len(critical) == 1 and 'no record is lost' not in caplog.text
    assert 'older than the last update of another program' in critical[0].getMessage()
    assert 'MAY BE LOST' in critical[0].getMessage()
    assert os.path.exists(path + '.bad')


def test_documented_methods_on_their_own(site):
    """As the original's: exposure() takes the link's path at the mountain and
    leaves an installed exposure alone; catchup() and backup() work outside a
    pass; transfer() is one pass and returns."""
    site.exposure(EARLIER, '00001600')
    site.write_config(backup='20', catchup='14')
    d = TransferDaemon(site.options())
    try:
        directory = d.directories[0]
        status = d._status(directory)
        link = os.path.join(site.source, EARLIER, '00001600')
        assert d.exposure(directory, link, status) is True
        site.assert_verified(EARLIER, '00001600')
        assert d.exposure(directory, link, status) is False  # installed already
        assert d.exposure(directory, 'junk', status) is False
        # A late file: caught up on its own.
        files = exposure_files('00001600')
        files['late.json'] = b'{}\n'
        source = os.path.join(site.data, EARLIER, '00001600')
        for name in ('late.json', 'checksum-00001600.sha256sum'):
            with open(os.path.join(source, name), 'wb') as f:
                f.write(files[name] if name in files else checksum_text(files).encode())
        d.mountain.close()
        d = TransferDaemon(site.options())  # by hand, in another run
        assert d.catchup(directory, EARLIER, status) is True
        assert os.path.exists(site.dest(EARLIER, '00001600', 'late.json'))
        assert d.backup(directory, EARLIER, status) is True
        assert [c[-1] for c in site.htar_calls()] == [EARLIER]
        assert d.backup(directory, EARLIER, status) is False  # on tape already
        assert d.backup(directory, LAST, status) is False  # no data
        assert len(site.htar_calls()) == 1
        assert site.status_rows()[(EARLIER, 1600)] == {0: 1, 1: 1, 2: 1}
        # One pass, then it returns.
        site.exposure(LAST, '00001601')
        d.options.once = False
        assert d.transfer() is None
        site.assert_verified(LAST, '00001601', dir_mode=0o2550)  # and archived: due
    finally:
        d.mountain.close()


def test_version_above_the_original():
    from desitransfer import __version__
    release = tuple(int(p) for p in __version__.split('.')[:3])
    assert release > (1, 0, 6)  # the original's line is 1.0.x
