# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The Sphinx documentation builds cleanly, warnings being errors."""
import os
import subprocess
import sys

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sphinx_build(tmp_path):
    p = subprocess.run([sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q',
                        '-b', 'html', os.path.join(TOP, 'doc'), str(tmp_path / 'html')],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / 'html' / 'api.html').exists()
