# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
============
desitransfer
============

DESI data transfer infrastructure.
"""
__version__ = '1.1.0.dev1'
