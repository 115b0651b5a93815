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
from collections import namedtuple
from importlib.resources import files

from .text import interval


class DirectoryConfig(namedtuple('DirectoryConfig', ['name', 'source', 'staging',
                                                     'destination', 'hpss', 'checksum_file',
                                                     'data_root'])):
    """Configuration of one destination directory (a section of the file)."""

    __slots__ = ()

    @property
    def checksum(self):
        """The checksum file name pattern (``checksum_file``), under the name
        the original's directory tuple gave it."""
        return self.checksum_file

    def checksum_name(self, night, exposure):
        """The name of the checksum file of `exposure` of `night`."""
        return self.checksum_file.format(night=night, exposure=exposure)


#: Most rsync streams copying from the mountain at once (``[common] streams``).
MAX_STREAMS = 16

#: Streams when ``[common] streams`` is not set: ``'auto'``, from the round
#: trip to the mountain (see :class:`desitransfer.streams.StreamPlanner`).
DEFAULT_STREAMS = 'auto'


class ConfigurationError(Exception):
    """A fatal problem with the configuration: one line naming the file and key."""


#: What a key missing from ``[common]`` or ``[logging]`` means: the value of the
#: original package's shipped file, so that a configuration written for it
#: (which lists every key) and a shorter one both run unchanged.  ``host``,
#: absent from the original's file, is the mountain's ssh alias ``dts``; the
#: source is on this machine only when a file says so with ``host =``.
DEFAULTS = {'common': {'host': 'dts',
                       'ssh': '/bin/ssh',
                       'temporary': '${DESI_ROOT}/spectro/staging/scratch,${SCRATCH},'
                                    '${HOME}/tmp,${HOME}/scratch',
                       'checksum_lock': '/tmp/checksum-running',
                       'catchup': '14',
                       'backup': '20',
                       'sleep': '1',
                       'retries': '5',
                       'recent': '30',
                       'streams': DEFAULT_STREAMS,
                       'hpss': '/usr/local/bin',
                       'hpss_status': 'https://api.nersc.gov/api/v1.2/status/archive'},
            'logging': {'filename': '${DESI_ROOT}/spectro/staging/logs/desi_transfer_daemon.log',
                        'size': '100000000',
                        'backups': '100',
                        'to': 'desi-alarms-transfer@desi.lbl.gov',
                        'smtp': 'localhost:25',
                        'report': 'yes'}}

#: ``$$``, ``${NAME}`` or ``${SECTION:KEY}``, or a ``$`` that is none of them.
_reference = re.compile(r'\$(?:(\$)|\{([^{}$]*)\}|)')


class _Unset(KeyError):
    """A ``${VAR}`` names an environment variable that is not set."""


class _Extended(configparser.Interpolation):
    """The interpolation of the original's files, plus the environment.

    ``${KEY}`` is another key of the same section (or of ``[DEFAULT]``),
    ``${SECTION:KEY}`` a key of another section, and otherwise ``${VAR}`` is
    the environment variable VAR; ``$$`` is a literal ``$``.  An unset VAR, a
    missing key, a lone ``$`` or a loop is a :exc:`ConfigurationError`
    naming the key.
    """

    #: References followed within one value before it is called a loop.
    DEPTH = 10

    def before_get(self, parser, section, option, value, defaults):
        try:
            return self.expand(parser, section, option, value)
        except _Unset as err:
            where = '' if parser.has_option(section, option) else ' (its default)'
            raise ConfigurationError(f"[{section}] {option}{where}: environment variable "
                                     f"{err.args[0]} is not set") from None

    def expand(self, parser, section, option, value, depth=0):
        """`value` of `option` in `section` with its references replaced."""
        if depth > self.DEPTH:
            raise ConfigurationError(f"[{section}] {option}: references nested more than "
                                     f"{self.DEPTH:d} deep (a loop?)")

        def replace(match):
            if match.group(1):
                return '$'
            name = match.group(2)
            if name is None or not name.strip():
                raise ConfigurationError(f"[{section}] {option}: a '$' must be '$$', "
                                         f"'${{VAR}}' or '${{section:key}}'")
            if ':' in name:
                other, key = name.split(':', 1)
                if not parser.has_option(other, key):
                    raise ConfigurationError(f"[{section}] {option}: ${{{name}}} names no "
                                             f"key of the configuration")
                return self.expand(parser, other, key, parser.get(other, key, raw=True),
                                   depth + 1)
            if name != option and parser.has_option(section, name):
                return self.expand(parser, section, name,
                                   parser.get(section, name, raw=True), depth + 1)
            if name in os.environ:
                return os.environ[name]
            raise _Unset(name)

        return _reference.sub(replace, value)


_INTERPOLATION = _Extended()


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
    parser = configparser.ConfigParser(interpolation=_INTERPOLATION)
    parser.optionxform = str
    try:
        parser.read_string(text, source=filename)
        return _validate(parser)
    except ConfigurationError as err:
        raise ConfigurationError(f"configuration file {filename}: {err}") from None
    except configparser.Error as err:
        message = ' '.join(str(err).split())
        raise ConfigurationError(f"configuration file {filename}: {message}") from None


def get_value(parser, section, key, convert=str, default=None):
    """Get and convert one key; missing or bad values raise :class:`ConfigurationError`.

    A key missing from ``[common]`` or ``[logging]`` (or the whole section)
    has its value in :data:`DEFAULTS`.
    """
    if default is None:
        default = DEFAULTS.get(section, {}).get(key)
    if not parser.has_section(section) and section not in DEFAULTS:
        raise ConfigurationError(f"section [{section}] is missing")
    if parser.has_section(section) and parser.has_option(section, key):
        value = parser.get(section, key)
    elif default is not None:
        value = _INTERPOLATION.before_get(parser, section, key, default, {})
    else:
        raise ConfigurationError(f"[{section}] {key} is missing")
    value = value.strip()
    try:
        return convert(value)
    except ValueError as err:
        raise ConfigurationError(f"[{section}] {key} = {value!r} is not valid: {err}") from None


def _candidates(parser, section, key):
    """The comma-separated candidates of `key` (``[common] temporary``): a
    candidate naming an environment variable that is not set is left out, as
    it can name no directory; an empty list is an error."""
    if parser.has_section(section) and parser.has_option(section, key):
        raw = parser.get(section, key, raw=True)
    else:
        raw = DEFAULTS[section][key]
    found, unset = [], []
    for item in raw.split(','):
        try:
            value = _INTERPOLATION.expand(parser, section, key, item).strip()
        except _Unset as err:
            unset.append(err.args[0])
            continue
        if value:
            found.append(value)
    if not found:
        why = f" (not set: {', '.join(unset)})" if unset else ""
        raise ConfigurationError(f"[{section}] {key} lists no directory{why}")
    return found


def absolute(value):
    if not os.path.isabs(value):
        raise ValueError('an absolute path is required')
    return os.path.normpath(value)


def _optional_absolute(value):
    return absolute(value) if value else ''


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
        name = value.format(exposure='00000000', night='20000101')
    except (KeyError, IndexError, ValueError, AttributeError):
        name = None  # another {field}, or a bad format: it would fail on every exposure
    if '{exposure}' not in value or not name or '/' in name or name in ('.', '..'):
        raise ValueError("a file name containing '{exposure}' (and '{night}' if wanted) "
                         "and no other {field} is required")
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
        source = get_value(parser, section, 'source', absolute)
        staging = get_value(parser, section, 'staging', absolute)
        destination = get_value(parser, section, 'destination', absolute)
        # As written (the archive's name is made of it), without a trailing /.
        hpss = get_value(parser, section, 'hpss').rstrip('/')
        if not hpss:
            raise ConfigurationError(f"[{section}] hpss is empty")
        checksum_file = get_value(parser, section, 'checksum_file', _checksum_name)
        data_root = get_value(parser, section, 'data_root', _optional_absolute, default='')
        directories.append(DirectoryConfig(section, source, staging, destination,
                                           hpss, checksum_file, data_root))
    if not directories:
        raise ConfigurationError("no destination section (such as [DESI_SPECTRO_DATA])")
    common = {'host': get_value(parser, 'common', 'host'),
              'ssh': get_value(parser, 'common', 'ssh'),
              'temporary': _candidates(parser, 'common', 'temporary'),
              'checksum_lock': get_value(parser, 'common', 'checksum_lock', absolute),
              'catchup': get_value(parser, 'common', 'catchup', int),
              'backup': get_value(parser, 'common', 'backup', int),
              'sleep': get_value(parser, 'common', 'sleep', _interval),
              'retries': get_value(parser, 'common', 'retries', _count),
              'recent': get_value(parser, 'common', 'recent', _days),
              'streams': get_value(parser, 'common', 'streams', _streams),
              'hpss': get_value(parser, 'common', 'hpss'),
              'hpss_status': get_value(parser, 'common', 'hpss_status')}
    if common['host'] and not common['ssh']:
        raise ConfigurationError("[common] ssh is empty but host is set")
    logging_ = {'filename': get_value(parser, 'logging', 'filename', absolute),
                'size': get_value(parser, 'logging', 'size', _count),
                'backups': get_value(parser, 'logging', 'backups', _count),
                'to': get_value(parser, 'logging', 'to', _list),
                'smtp': get_value(parser, 'logging', 'smtp'),
                'report': get_value(parser, 'logging', 'report', _boolean)}
    if not re.fullmatch(r'[^:\s]+(:[0-9]+)?', logging_['smtp']):
        raise ConfigurationError(f"[logging] smtp = {logging_['smtp']!r} is not host:port")
    return directories, common, logging_


def configured(configuration=None):
    """The destination sections and the ``[common]`` settings of the daemon.

    Parameters
    ----------
    configuration : :class:`str` or :class:`tuple`, optional
        The daemon's configuration file (the shipped one if not set), or what
        :func:`~desitransfer.configuration.read_configuration` returned (or
        its first two items).

    Returns
    -------
    :class:`tuple`
        The list of :class:`~desitransfer.configuration.DirectoryConfig` and
        the ``[common]`` settings.

    Raises
    ------
    desitransfer.configuration.ConfigurationError
        If the file cannot be used.
    """
    if configuration is None or isinstance(configuration, str):
        configuration = read_configuration(configuration)
    return list(configuration[0]), configuration[1]
