# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
==========================
desitransfer.configuration
==========================

Read and validate the configuration of :command:`desi_transfer_daemon`: an
INI file in which ``${VAR}`` is an environment variable.  Any problem is one
:exc:`ConfigurationError` naming the file, the section and the key.
"""
import configparser
import os
import re
import string
from collections import namedtuple
from importlib.resources import files

from .common import interval

#: Configuration of one destination directory.
DirectoryConfig = namedtuple('DirectoryConfig', ['name', 'source', 'staging',
                                                 'destination', 'hpss', 'checksum_file',
                                                 'data_root'])

#: Most rsync streams copying from the mountain at once (``[common] streams``).
MAX_STREAMS = 16

#: Streams when ``[common] streams`` is not set: ``'auto'``, from the round
#: trip to the mountain (see :meth:`desitransfer.daemon.core.TransferDaemon`).
DEFAULT_STREAMS = 'auto'


class ConfigurationError(Exception):
    """A fatal problem with the configuration: one line naming the file and key."""


class _Environment(configparser.Interpolation):
    """Replace ``${VAR}`` by the environment variable VAR; unset VAR is an error."""

    def before_get(self, parser, section, option, value, defaults):
        try:
            return string.Template(value).substitute(os.environ)
        except KeyError as err:
            raise ConfigurationError(f"[{section}] {option}: environment variable "
                                     f"{err.args[0]} is not set") from None
        except ValueError as err:
            raise ConfigurationError(f"[{section}] {option}: {err}") from None


def read_configuration(filename=None):
    """Read and validate the daemon configuration.

    Parameters
    ----------
    filename : :class:`str`, optional
        Configuration file; the shipped default if not set.

    Returns
    -------
    :class:`tuple`
        The list of :class:`DirectoryConfig`, the ``[common]`` and ``[logging]``
        settings as :class:`dict`.

    Raises
    ------
    ConfigurationError
        One line naming the file, the section and the key.
    """
    if filename is None:
        resource = files('desitransfer') / 'data' / 'desi_transfer_daemon.ini'
        filename, text = str(resource), resource.read_text()
    else:
        try:
            with open(filename) as f:
                text = f.read()
        except OSError as err:
            raise ConfigurationError(f"configuration file {filename} cannot be read: "
                                     f"{err.strerror}") from None
    parser = configparser.ConfigParser(interpolation=_Environment())
    parser.optionxform = str
    try:
        parser.read_string(text, source=filename)
        return _validate(parser)
    except ConfigurationError as err:
        raise ConfigurationError(f"configuration file {filename}: {err}") from None
    except configparser.Error as err:
        message = ' '.join(str(err).split())
        raise ConfigurationError(f"configuration file {filename}: {message}") from None


def _get(parser, section, key, convert=str, default=None):
    """Get and convert one key; missing or bad values raise :class:`ConfigurationError`."""
    if not parser.has_section(section):
        raise ConfigurationError(f"section [{section}] is missing")
    if not parser.has_option(section, key):
        if default is not None:
            return default
        raise ConfigurationError(f"[{section}] {key} is missing")
    value = parser.get(section, key).strip()
    try:
        return convert(value)
    except ValueError as err:
        raise ConfigurationError(f"[{section}] {key} = {value!r} is not valid: {err}") from None


def _absolute(value):
    if not os.path.isabs(value):
        raise ValueError('an absolute path is required')
    return os.path.normpath(value)


def _optional_absolute(value):
    return _absolute(value) if value else ''


def _interval(value):
    """Seconds of an interval written ``10s``, ``1.5m``, ``1h``, or a number of minutes."""
    return interval(value, bare=60)


def _count(value):
    v = int(value)
    if v < 0:
        raise ValueError('a non-negative integer is required')
    return v


def _checksum_name(value):
    try:
        name = value.format(exposure='00000000')
    except (KeyError, IndexError, ValueError, AttributeError):
        name = None  # another {field}, or a bad format: it would fail on every exposure
    if '{exposure}' not in value or not name or '/' in name or name in ('.', '..'):
        raise ValueError("a file name containing '{exposure}' and no other {field} is required")
    return value


def _days(value):
    v = int(value)
    if not 1 <= v <= 3660:
        raise ValueError('a number of days from 1 to 3660 is required')
    return v


def _streams(value):
    if value == 'auto':
        return value
    try:
        v = int(value)
    except ValueError:
        v = 0
    if not 1 <= v <= MAX_STREAMS:
        raise ValueError(f"'auto' or a number of streams from 1 to {MAX_STREAMS:d} is required")
    return v


def _boolean(value):
    words = {'yes': True, 'true': True, 'on': True, '1': True,
             'no': False, 'false': False, 'off': False, '0': False}
    if value.lower() not in words:
        raise ValueError('yes or no is required')
    return words[value.lower()]


def _list(value):
    return [v.strip() for v in value.split(',') if v.strip()]


def _validate(parser):
    directories = []
    for section in parser.sections():
        if section in ('common', 'logging'):
            continue
        source = _get(parser, section, 'source', _absolute)
        staging = _get(parser, section, 'staging', _absolute)
        destination = _get(parser, section, 'destination', _absolute)
        hpss = _get(parser, section, 'hpss').strip('/')
        if not hpss:
            raise ConfigurationError(f"[{section}] hpss is empty")
        checksum_file = _get(parser, section, 'checksum_file', _checksum_name)
        data_root = _get(parser, section, 'data_root', _optional_absolute, default='')
        directories.append(DirectoryConfig(section, source, staging, destination,
                                           hpss, checksum_file, data_root))
    if not directories:
        raise ConfigurationError("no destination section (such as [DESI_SPECTRO_DATA])")
    common = {'host': _get(parser, 'common', 'host', default=''),
              'ssh': _get(parser, 'common', 'ssh'),
              'temporary': _get(parser, 'common', 'temporary', _list),
              'checksum_lock': _get(parser, 'common', 'checksum_lock', _absolute),
              'catchup': _get(parser, 'common', 'catchup', int),
              'backup': _get(parser, 'common', 'backup', int),
              'sleep': _get(parser, 'common', 'sleep', _interval),
              'retries': _get(parser, 'common', 'retries', _count, default=5),
              'recent': _get(parser, 'common', 'recent', _days, default=30),
              'streams': _get(parser, 'common', 'streams', _streams,
                              default=DEFAULT_STREAMS),
              'hpss': _get(parser, 'common', 'hpss'),
              'hpss_status': _get(parser, 'common', 'hpss_status')}
    if common['host'] and not common['ssh']:
        raise ConfigurationError("[common] ssh is empty but host is set")
    if not common['temporary']:
        raise ConfigurationError("[common] temporary lists no directory")
    logging_ = {'filename': _get(parser, 'logging', 'filename', _absolute),
                'size': _get(parser, 'logging', 'size', _count),
                'backups': _get(parser, 'logging', 'backups', _count),
                'to': _get(parser, 'logging', 'to', _list),
                'smtp': _get(parser, 'logging', 'smtp', default='localhost:25'),
                'report': _get(parser, 'logging', 'report', _boolean, default='yes')}
    if not re.fullmatch(r'[^:\s]+(:[0-9]+)?', logging_['smtp']):
        raise ConfigurationError(f"[logging] smtp = {logging_['smtp']!r} is not host:port")
    return directories, common, logging_
