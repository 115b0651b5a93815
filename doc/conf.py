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
                           'private-members': False, 'show-inheritance': True}


def _skip_field_aliases(app, what, name, obj, skip, options):
    """Leave out the generated 'Alias for field number N' of named tuples."""
    doc = getattr(obj, '__doc__', None) or ''
    if doc.startswith('Alias for field number'):
        return True
    return None


def setup(app):
    app.connect('autodoc-skip-member', _skip_field_aliases)

intersphinx_mapping = {}
templates_path = []
exclude_patterns = ['_build']
master_doc = 'index'
html_theme = 'alabaster'
nitpicky = False
