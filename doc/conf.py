# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Sphinx configuration for desitransfer."""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', 'py')))
from desitransfer import __version__  # noqa: E402

project = 'desitransfer'
author = 'DESI Collaboration'
copyright = '2019-2026, DESI Collaboration'
version = release = __version__
extensions = ['sphinx.ext.autodoc', 'sphinx.ext.napoleon', 'sphinx.ext.intersphinx',
              'sphinx.ext.viewcode']
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
autodoc_default_options = {'members': True, 'undoc-members': False,
                           'private-members': True, 'show-inheritance': True}
intersphinx_mapping = {}
templates_path = []
exclude_patterns = ['_build']
master_doc = 'index'
html_theme = 'alabaster'
nitpicky = False
