# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
==================
desitransfer.dates
==================

Nights and their days: the dates of a period, and when a night is due for
a step of the morning after.
"""
import datetime as dt
import functools


def dates(first, last):
    """Every date from `first` to `last` (YYYYMMDD), in order."""
    day = dt.datetime.strptime(first, '%Y%m%d')
    end = dt.datetime.strptime(last, '%Y%m%d')
    out = []
    while day <= end:
        out.append(day.strftime('%Y%m%d'))
        day += dt.timedelta(days=1)
    return out


@functools.lru_cache(maxsize=4096)
def due_time(night, hour):
    """When `night` is due for a step at `hour` UTC: that hour the next day."""
    start = dt.datetime.strptime(night, '%Y%m%d').replace(tzinfo=dt.timezone.utc)
    return start + dt.timedelta(days=1, hours=hour)
