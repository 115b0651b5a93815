# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Small helpers of the tests that are not fixtures."""
import os
import stat


def mode(path):
    """Permission bits of `path` itself (a link is not followed)."""
    return stat.S_IMODE(os.lstat(path).st_mode)


def refuse_chmod(monkeypatch, suffix):
    """Make :func:`os.chmod` refuse (``EPERM``, as for a file of another
    user) every path ending with `suffix`, for the rest of the test."""
    real = os.chmod

    def chmod(path, m, **kwargs):
        if str(path).endswith(suffix):
            raise PermissionError(1, 'Operation not permitted', str(path))
        return real(path, m, **kwargs)

    monkeypatch.setattr(os, 'chmod', chmod)
