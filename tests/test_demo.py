# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The quick-start demonstration, etc/demo.py, as an operator runs it."""
import os
import subprocess
import sys

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'etc',
                    'demo.py')


def demo(*args):
    p = subprocess.run([sys.executable, DEMO] + list(args), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_demo_fresh_then_keep(tmp_path):
    root = tmp_path / 'demo'
    out = demo(str(root))
    nights = sorted(os.listdir(root / 'nersc' / 'spectro' / 'data'))
    assert len(nights) == 3
    for night in nights:
        assert f'Night {night}: 4 exposures in' in out
        assert f'archived as {root}/hpss/desi/spectro/data/desi_spectro_data_{night}.tar' in out
    assert 'Nothing new' not in out
    assert '--bind 127.0.0.1' in out
    # The same site again: nothing new.
    out = demo(str(root), '--keep')
    assert 'Nothing new: every exposure is already at NERSC and every night on tape.' in out
    # Without --keep the site is built afresh.
    (root / 'leftover').write_text('x')
    out = demo(str(root))
    assert not (root / 'leftover').exists() and 'Nothing new' not in out
