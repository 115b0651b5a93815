# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Shared fixtures: a real sshd on 127.0.0.1 reachable as host alias ``dts``
through an injectable ssh program (see ``loopback.py``).

Further fixtures live in the ``tests/fixtures_*.py`` plugins.
"""
from pathlib import Path

import pytest

from loopback import TEST_KEX, free_port, start_sshd, wait_for_port  # noqa: F401

# Every tests/fixtures_*.py is a plugin of fixtures (tests/ is on sys.path);
# fixtures_servers first, as others import it (a plugin imported before pytest
# loads it would not have its assertions rewritten).
pytest_plugins = sorted((p.stem for p in Path(__file__).parent.glob('fixtures_*.py')),
                        key=lambda stem: (stem != 'fixtures_servers', stem))


@pytest.fixture(scope='session')
def dts(tmp_path_factory):
    """A real sshd on 127.0.0.1 with its own host and user keys.

    ``dts.ssh`` is a wrapper program running ``ssh -F CONFIG``, under which
    host alias ``dts`` reaches this sshd as the current user.
    """
    mountain = start_sshd(tmp_path_factory.mktemp('sshd'), kex=TEST_KEX)
    try:
        yield mountain
    finally:
        mountain.process.terminate()
        mountain.process.wait(timeout=10)
