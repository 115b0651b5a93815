# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=================
desitransfer.text
=================

Short text for messages: names and command output from the mountain shown
on one line, escaped, and cut; and times written ``30s``, ``15m``, ``1h``.
"""
import re


def interval(value, bare=1):
    """Seconds of a time written ``30s``, ``1.5m``, ``1h``, ``2d``, or a bare
    number counted in units of `bare` seconds; :exc:`ValueError` unless it is
    positive and finite."""
    m = re.fullmatch(r'([0-9]*\.?[0-9]+)\s*([smhd]?)', value.strip())
    seconds = (float(m.group(1)) * {'s': 1, 'm': 60, 'h': 3600, 'd': 86400, '': bare}[m.group(2)]
               if m else 0)
    if not 0 < seconds < float('inf'):
        raise ValueError(f"{value!r} is not a positive time such as 30s, 15m, 1h, 2d or a "
                         f"number of {'seconds' if bare == 1 else 'minutes'}")
    return seconds


def shown(name):
    """`name` (from the mountain) as written in a message: as it is if it is
    plain printable text, otherwise quoted and escaped as :func:`repr` does,
    so that it is one line, and two names never look the same (an
    undecodable byte, kept as a surrogate, is shown as ``\\udcXX``)."""
    plain = name.isprintable() and name.strip() == name and name[:1] not in ('"', "'")
    return name if plain else repr(name)


def one_line(text):
    """`text` (from the mountain) with every character that is not printable
    escaped as :func:`repr` does: a message that cannot span lines."""
    if text.isprintable():
        return text
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def some(names, most=3):
    """The first `most` of `names`, shown, and how many more."""
    text = ', '.join(shown(n) for n in names[:most])
    return text + (f' and {len(names) - most:d} more' if len(names) > most else '')


def tail(text, size=300):
    """The end of `text` (what a command said) on one line: its non-blank
    lines joined by semicolons, control characters escaped, the last `size`
    characters."""
    return one_line('; '.join(line.strip() for line in text.splitlines() if line.strip()))[-size:]


def duration(seconds):
    """A latency for people: ``'8.2 s'``, ``'3.5 min'``, ``'2.1 h'``; ``'-'`` if ``None``."""
    if seconds is None:
        return '-'
    if abs(seconds) < 120:
        return f'{seconds:.1f} s'
    if abs(seconds) < 7200:
        return f'{seconds / 60:.1f} min'
    return f'{seconds / 3600:.1f} h'
