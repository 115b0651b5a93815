# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The code keeps one style: :command:`flake8` (settings in ``setup.cfg``)
finds nothing in the package, the tests and the benchmarks."""
import os
import subprocess
import sys

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flake8():
    p = subprocess.run([sys.executable, '-m', 'flake8', 'py', 'tests', 'benchmarks'],
                       cwd=TOP, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
