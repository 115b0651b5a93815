#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Run desi_transfer_daemon once against a simulated mountain on this machine.

Builds, under DIRECTORY (default /tmp/desitransfer-demo), afresh on every run
unless ``--keep`` is given:

* ``mountain/``: three finished nights of raw exposures laid out as at KPNO
  (``data/NIGHT/EXPID`` directories, ``dts/NIGHT/EXPID`` links), plus one
  malformed link that must not be copied;
* ``nersc/``: the staging area, destination, status store and log;
* ``hpss/``: the tape, written by the HPSS emulator of the test suite;

then runs ``desi_transfer_daemon --once`` with a configuration whose empty
``host`` means "the source is local", with catch-up and backup enabled at any
hour, and an HPSS status service answering "active" on 127.0.0.1, and says
what arrived.  With ``--keep`` the same site is used again: the second pass
finds nothing new.
"""
import datetime as dt
import os
import shutil
import subprocess
import sys
from argparse import ArgumentParser

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, 'py'))

from desitransfer.common import today  # noqa: E402
from desitransfer.simulator import make_mountain, serve_archive_status  # noqa: E402


def inventory(nersc, tape):
    """``{night: (installed exposures, archived)}`` of the demonstration site."""
    data = os.path.join(nersc, 'spectro', 'data')
    found = {}
    for night in sorted(os.listdir(data)) if os.path.isdir(data) else []:
        archive = os.path.join(tape, 'desi', 'spectro', 'data',
                               f'desi_spectro_data_{night}.tar.idx')
        found[night] = (len(os.listdir(os.path.join(data, night))), os.path.exists(archive))
    return found


def main():
    prsr = ArgumentParser(description=__doc__.split('\n')[0])
    prsr.add_argument('directory', nargs='?', default='/tmp/desitransfer-demo',
                      help="Work in this directory (default %(default)s).")
    prsr.add_argument('--keep', action='store_true',
                      help="Keep the site of an earlier run instead of building it afresh "
                           "(a second pass then finds nothing new).")
    options = prsr.parse_args()
    root = os.path.abspath(options.directory)
    if not options.keep and os.path.isdir(root):
        subprocess.run(['chmod', '-R', 'u+w', root], check=False)
        shutil.rmtree(root)
    mountain = os.path.join(root, 'mountain')
    nersc = os.path.join(root, 'nersc')
    tape = os.path.join(root, 'hpss')
    if not os.path.isdir(mountain):
        last = dt.datetime.strptime(today(), '%Y%m%d')
        nights = [(last - dt.timedelta(days=n)).strftime('%Y%m%d') for n in (3, 2, 1)]
        created = make_mountain(mountain, nights, exposures=4, nfiles=4, size=64 * 1024)
        os.symlink(os.path.join(mountain, 'data', nights[0]),
                   os.path.join(mountain, 'dts', nights[0], 'not-an-exposure'))
        print(f"Simulated mountain: {len(created)} exposures of nights "
              f"{', '.join(nights)} in {mountain}")
    for d in ('staging', 'spectro/data', 'scratch', 'logs'):
        os.makedirs(os.path.join(nersc, d), exist_ok=True)
    os.makedirs(tape, exist_ok=True)
    server, status_url = serve_archive_status()
    configuration = os.path.join(root, 'desi_transfer_daemon.ini')
    with open(configuration, 'w') as f:
        f.write(f"""[DESI_SPECTRO_DATA]
source = {mountain}/dts
staging = {nersc}/staging/raw
destination = {nersc}/spectro/data
hpss = desi/spectro/data
checksum_file = checksum-{{exposure}}.sha256sum

[common]
host =
ssh = ssh
temporary = {nersc}/scratch
checksum_lock = {mountain}/checksum-running
catchup = 0
backup = 0
sleep = 1
retries = 3
hpss = {TOP}/tests/hpss
hpss_status = {status_url}

[logging]
filename = {nersc}/logs/desi_transfer_daemon.log
size = 10000000
backups = 3
to =
smtp = localhost:25
""")
    env = dict(os.environ, HPSS_EMULATOR_ROOT=tape)
    daemon = shutil.which('desi_transfer_daemon', path=os.path.dirname(sys.executable))
    command = [daemon or os.path.join(TOP, 'bin', 'desi_transfer_daemon'),
               '--once', '--configuration', configuration, '--kill', os.path.join(root, 'stop')]
    before = inventory(nersc, tape)
    print('Running:', ' '.join(command), flush=True)
    code = subprocess.call(command, env=env)
    server.shutdown()
    after = inventory(nersc, tape)
    status = os.path.join(nersc, 'staging', 'status')
    print(f"\ndesi_transfer_daemon exited with status {code}.")
    if after == before:
        print("Nothing new: every exposure is already at NERSC and every night on tape.")
    for night, (exposures, archived) in after.items():
        print(f"  Night {night}: {exposures} exposures in {nersc}/spectro/data/{night}, "
              + ('archived as ' + os.path.join(tape, 'desi', 'spectro', 'data',
                                               f'desi_spectro_data_{night}.tar')
                 if archived else 'not archived'))
    print(f"""  Status JSON:    {status}/desi_transfer_status_YYYY.json
  Status page:    {status}/index.html
                  serve it on this machine only:
                  python3 -m http.server --bind 127.0.0.1 --directory {status} 8000
                  then open http://127.0.0.1:8000/
  Log:            {nersc}/logs/desi_transfer_daemon.log
  Configuration:  {configuration}
See a night:      {os.path.join(os.path.dirname(sys.executable), 'desi_transfer_status')} -d {status} {max(after, default='NIGHT')}
Run again on the same site:  bash quickstart.sh demo --keep""")
    return code


if __name__ == '__main__':
    sys.exit(main())
