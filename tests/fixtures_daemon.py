# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Fixtures of the daemon tests: a simulated mountain behind the real sshd,
a NERSC tree and a configuration (``site``), a fake clock (``clock``),
ssh wrappers that misbehave on purpose (``Site.ssh_wrapper``), and sites
built once per module that each test gets a copy of (``site_templates``).
"""
import datetime as dt
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from desitransfer import common
from desitransfer.alerts import configure_log
from desitransfer.daemon import TransferDaemon, _options
from desitransfer.simulator import exposure_files, make_exposure
from fixtures_servers import HPSS, HPSS_BIN
from helpers import mode
from loopback import terminate_when

#: The fake present: tonight is 20261120 (in progress), 20261119 and 20261118 are finished.
NOW = (2026, 11, 20, 21, 0, 0)
TONIGHT, LAST, EARLIER = '20261120', '20261119', '20261118'

STATE = 'desi_transfer_daemon_state.json'


@pytest.fixture(autouse=True)
def reset_log():
    yield
    configure_log()


@pytest.fixture
def clock(monkeypatch):
    """Set the UTC time seen by the package."""
    def set_time(*args):
        t = dt.datetime(*args, tzinfo=dt.timezone.utc)
        monkeypatch.setattr(common, '_utcnow', lambda: t)
    set_time(*NOW)
    return set_time


def snapshot(top, skip=()):
    """Mode, size and modification time of everything under `top`."""
    out = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            p = os.path.join(root, name)
            if p in skip:
                continue
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


class Site(SimpleNamespace):
    """A mountain, a NERSC tree and a configuration for one test."""

    def exposure(self, night, expid, files=None, checksum=True, **kwargs):
        if files is None and kwargs:
            files = exposure_files(expid, **kwargs)
        return make_exposure(self.data, self.source, night, expid, files=files,
                             checksum=checksum)

    def dest(self, *parts):
        return os.path.join(self.destination, *parts)

    @property
    def state_file(self):
        return os.path.join(os.path.dirname(self.staging), STATE)

    def state(self):
        with open(self.state_file) as f:
            return json.load(f)['DESI_SPECTRO_DATA']

    def log_text(self):
        path = os.path.join(self.top, 'nersc', 'logs', 'desi_transfer_daemon.log')
        if not os.path.exists(path):
            return ''
        with open(path) as f:
            return f.read()

    def status_rows(self, linked=False):
        """``{(night, expid): {stage: ok}}`` from the status files; stage 3
        (``linked``) only if `linked`."""
        rows = {}
        for name in sorted(os.listdir(self.status_dir)) if os.path.isdir(self.status_dir) else []:
            if name.startswith('desi_transfer_status_') and name.endswith('.json'):
                with open(os.path.join(self.status_dir, name)) as f:
                    for night, exposures in json.load(f).items():
                        for expid, r in exposures.items():
                            rows[(night, int(expid))] = {row[0]: row[1] for row in r
                                                         if linked or row[0] != 3}
                            assert len({row[0] for row in r}) == len(r), 'duplicate rows'
        return rows

    def installed(self):
        """Every path under the destination, relative to it."""
        out = set()
        for root, dirs, files in os.walk(self.destination):
            for name in dirs + files:
                out.add(os.path.relpath(os.path.join(root, name), self.destination))
        return out

    def assert_verified(self, night, expid, dir_mode=0o2750, **kwargs):
        """The exposure is installed, complete, locked and recorded as verified."""
        destination = self.dest(night, expid)
        files = exposure_files(expid, **kwargs)
        assert sorted(os.listdir(destination)) == sorted(list(files) +
                                                         [f'checksum-{expid}.sha256sum'])
        for name, data in files.items():
            with open(os.path.join(destination, name), 'rb') as f:
                assert f.read() == data, (night, expid, name)
            assert mode(os.path.join(destination, name)) == 0o440
        assert mode(destination) == dir_mode
        rows = self.status_rows()[(night, int(expid))]
        assert (rows[0], rows[1]) == (1, 1), rows

    def htar_calls(self, action='-c'):
        return [c for c in self.hpss.calls()
                if os.path.basename(c[0]) == 'htar' and c[1].startswith(action)]

    def options(self, *args):
        return _options(['--configuration', self.config, '--kill', self.kill, '--once']
                        + list(args))

    def run(self, *args):
        """One pass in this process (``--once``); its exit status."""
        d = TransferDaemon(self.options(*args))
        try:
            return d.run()
        finally:
            configure_log()

    def command(self, *args, **kwargs):
        env = dict(os.environ, HPSS_EMULATOR_ROOT=str(self.hpss.root))
        env.update(kwargs.pop('env', {}))
        return (['desi_transfer_daemon', '--configuration', self.config, '--kill', self.kill]
                + list(args)), env

    def start(self, *args):
        """Start the real command in the background."""
        command, env = self.command(*args)
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def terminate_when(self, ready, *args, poll=0.01, settle=0.0):
        """Start the daemon with `args`, send SIGTERM once ``ready()`` (and
        `settle` seconds more); return its exit status, its output and the
        seconds it took to stop."""
        return terminate_when(self.start(*args), ready, poll=poll, settle=settle, timeout=60)

    def ssh_wrapper(self, name, before_rsync='', before_command='', prefix=''):
        """Configure an ssh program that runs the shell line `before_rsync`
        (``$@``: the arguments of ssh) before connecting for rsync
        (``rsync --server`` on the command line),
        `before_command` before any other connection, then the real ``dts``
        wrapper, with `prefix` (for example ``setpriv ...``) put before the
        remote command of connections that are not rsync's."""
        wrapper = os.path.join(self.top, name)
        calls = wrapper + '.jsonl'
        with open(wrapper, 'w') as f:
            f.write(f'''#!{sys.executable}
import json, os, shlex, subprocess, sys
args = sys.argv[1:]
with open({calls!r}, 'a') as f:
    f.write(json.dumps(args) + '\\n')
rsync = 'rsync --server' in ' '.join(args)
control = '-O' in args
line = {before_rsync!r} if rsync else {before_command!r}
if line and not control:
    code = subprocess.run(['/bin/sh', '-c', line, 'sh'] + args).returncode
    if code:
        sys.exit(code)
prefix = {prefix!r}
if prefix and not rsync and not control and 'dts' in args:
    i = args.index('dts')
    args = args[:i + 1] + [prefix + ' ' + ' '.join(args[i + 1:])]
os.execv({self.ssh!r}, [{self.ssh!r}] + args)
''')
        os.chmod(wrapper, 0o755)
        self.write_config(ssh=wrapper)

        def read():
            if not os.path.exists(calls):
                return []
            with open(calls) as f:
                return [json.loads(line) for line in f if line.strip()]
        return read

    def hpss_wrapper(self, name, program, line):
        """A directory whose `program` (``hsi`` or ``htar``) runs the shell
        `line` (``$@`` are its arguments) and the other the emulator;
        configured as ``[common] hpss``."""
        directory = os.path.join(self.top, name)
        os.makedirs(directory)
        for p in ('hsi', 'htar'):
            with open(os.path.join(directory, p), 'w') as f:
                f.write(f'#!/bin/sh\n{line}\n' if p == program else
                        f'#!/bin/sh\nexec {self.hpss.bin}/{p} "$@"\n')
            os.chmod(os.path.join(directory, p), 0o755)
        self.write_config(hpss=directory)
        return directory


def write_config(site, **common_overrides):
    conf = {'host': 'dts', 'ssh': site.ssh, 'temporary': site.scratch,
            'checksum_lock': os.path.join(site.mountain, 'checksum-running'),
            'catchup': '30', 'backup': '30', 'sleep': '0.02', 'retries': '2',
            'hpss': site.hpss.bin, 'hpss_status': site.hpss_status.url}
    conf.update(common_overrides)
    data_root = conf.pop('data_root', '')
    report = conf.pop('report', 'no')
    with open(site.config, 'w') as f:
        f.write(f"""[DESI_SPECTRO_DATA]
source = {site.source}
staging = {site.staging}
destination = {site.destination}
hpss = desi/spectro/data
checksum_file = checksum-{{exposure}}.sha256sum
data_root = {data_root}

[common]
""" + ''.join(f'{k} = {v}\n' for k, v in conf.items()) + f"""
[logging]
filename = {site.top}/nersc/logs/desi_transfer_daemon.log
size = 1000000
backups = 2
to = desi-alarms@example.org
smtp = {site.smtp.hostport}
report = {report}
""")


def make_site(top, mountain, dts, hpss, hpss_status_server, smtp_server, clock):
    s = Site(top=top, mountain=mountain, data=f'{mountain}/data', source=f'{mountain}/dts',
             staging=f'{top}/nersc/staging/raw', destination=f'{top}/nersc/spectro/data',
             status_dir=f'{top}/nersc/staging/status', scratch=f'{top}/scratch',
             config=f'{top}/daemon.ini', kill=f'{top}/stop', ssh=dts.ssh, hpss=hpss,
             hpss_status=hpss_status_server, smtp=smtp_server, clock=clock)
    for d in (s.source, s.staging, s.destination, s.scratch):
        os.makedirs(d)
    s.write_config = lambda **kw: write_config(s, **kw)
    s.write_config()
    return s


@pytest.fixture
def site(tmp_path, dts, hpss, hpss_status_server, smtp_server, clock):
    top = str(tmp_path)
    return make_site(top, f'{top}/mountain', dts, hpss, hpss_status_server, smtp_server,
                     clock)


@pytest.fixture(scope='module')
def site_templates(tmp_path_factory, dts, _status_server_session, _smtp_server_session):
    """``site_templates(build)``: the top directory of a site that
    ``build(site)`` made (daemon passes, archives on the emulated tape), at
    the fake present, once per module and test process; see :func:`copy_site`
    for a test's own copy of it."""
    built = {}

    def template(build):
        if build not in built:
            top = tmp_path_factory.mktemp(f'template-{build.__name__.strip("_")}')
            with pytest.MonkeyPatch.context() as mp:
                root, calls = top / 'hpss_home', top / 'hpss_calls.jsonl'
                root.mkdir()
                mp.setenv('HPSS_EMULATOR_ROOT', str(root))
                mp.setenv('HPSS_EMULATOR_LOG', str(calls))
                mp.delenv('HPSS_EMULATOR_FAIL', raising=False)
                mp.setenv('PATH', str(HPSS_BIN) + os.pathsep + os.environ.get('PATH', ''))
                now = dt.datetime(*NOW, tzinfo=dt.timezone.utc)
                mp.setattr(common, '_utcnow', lambda: now)
                made = make_site(str(top), f'{top}/mountain', dts, HPSS(root, calls, mp),
                                 _status_server_session, _smtp_server_session, None)
                try:
                    build(made)
                finally:
                    configure_log()
                    _status_server_session.reset()
                    _smtp_server_session.clear()
            built[build] = str(top)
        return built[build]
    return template


def copy_site(template, site):
    """Make the new `site` of a test a copy of the site built in `template`
    (see ``site_templates``), at the test's own paths: its files (modes and
    times kept), links at the mountain pointing into the copy (with their
    times, which are the link times), and the configuration, the daemon's
    log and the record of HPSS calls naming the copy; the same as if the
    test had built it."""
    subprocess.run(['cp', '-a', '--', f'{template}/.', site.top], check=True)
    for root, dirs, files in os.walk(site.top):
        for name in dirs + files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                target = os.readlink(path)
                if target == template or target.startswith(template + '/'):
                    st = os.lstat(path)
                    os.unlink(path)
                    os.symlink(site.top + target[len(template):], path)
                    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            elif name.endswith(('.ini', '.log', '.jsonl')):
                with open(path, errors='surrogateescape') as f:
                    text = f.read()
                if template in text:
                    with open(path, 'w', errors='surrogateescape') as f:
                        f.write(text.replace(template, site.top))
    # Nothing of the copy leads back into the site every test shares.
    for root, dirs, files in os.walk(site.top):
        for name in dirs + files:
            path = os.path.join(root, name)
            assert not (os.path.islink(path) and
                        os.path.realpath(path).startswith(template + '/')), path
    return site


@pytest.fixture
def open_site(tmp_path, dts, hpss, hpss_status_server, smtp_server, clock, unprivileged):
    """A site whose mountain an unprivileged user can read (see ``unprivileged``)."""
    mountain = os.path.join(unprivileged.top, f'mountain-{os.path.basename(tmp_path)}')
    os.makedirs(mountain)
    s = make_site(str(tmp_path), mountain, dts, hpss, hpss_status_server, smtp_server, clock)
    s.unprivileged = unprivileged
    yield s
    subprocess.run(['chmod', '-R', 'u+rwX', mountain])
