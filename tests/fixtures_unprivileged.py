# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Fixture ``unprivileged``: run Python code as an unprivileged user (see
``unprivileged.py``), so that permission problems are tested for real even
when the tests run as root."""
import pytest

from unprivileged import Unprivileged


@pytest.fixture(scope='session')
def unprivileged():
    u = Unprivileged()
    yield u
    u.cleanup()
