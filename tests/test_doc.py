# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The Sphinx documentation builds cleanly, warnings being errors, and its
API page documents the public API."""
import os
import re
import subprocess
import sys

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Private names that the documented interface of the original package includes.
SEED_PRIVATE = {'desitransfer.daemon._options', 'desitransfer.daemon._popen',
                'desitransfer.daemon.TransferDaemon._configure_log',
                'desitransfer.status._options',
                'desitransfer.status.TransferStatus._handle_malformed',
                'desitransfer.daily._config', 'desitransfer.daily._options',
                'desitransfer.nightwatch._configure_log', 'desitransfer.nightwatch._options',
                'desitransfer.spacewatch._options', 'desitransfer.tucson._configure_log',
                'desitransfer.tucson._options', 'desitransfer.tucson._rsync'}


def test_sphinx_build(tmp_path):
    p = subprocess.run([sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q',
                        '-b', 'html', os.path.join(TOP, 'doc'), str(tmp_path / 'html')],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    api = (tmp_path / 'html' / 'api.html').read_text()
    names = re.findall(r'<dt class="sig sig-object py" id="([^"]+)"', api)
    assert len(names) == len(set(names)), 'a name is documented twice'
    private = {n for n in names if re.search(r'\._[a-z]', n)}
    assert private == SEED_PRIVATE
    assert 'Alias for field number' not in api
    # The index lists the pages, not every section of every page.
    index = (tmp_path / 'html' / 'index.html').read_text()
    toc = index[index.index('toctree-wrapper'):]
    toc = toc[:toc.index('</div>')]
    assert len(re.findall(r'<li class="toctree-l', toc)) < 20
