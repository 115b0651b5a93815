# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===========================
desitransfer.daemon.report
===========================

The morning report of :command:`desi_transfer_daemon`: once the backup hour
of a night has passed, one email (to the alert list, but not an alarm) says
how the night went: exposures transferred and verified, failures and retries,
late files caught up, the archive, the latency from link to verified, and
what the audit of the night disagrees on (:class:`MorningReport`).
"""
import datetime as dt
import os
import socket

from .. import common
from ..audit import audit
from ..common import log
from ..dates import due_time
from ..store import latencies, latency_summary
from ..text import duration
from ..executor import listdir
from ..tape import archive_name

#: A night is reported during this time after its backup hour (a daemon
#: stopped for longer does not send old reports).
REPORT_WINDOW = dt.timedelta(days=1)


class MorningReport(object):
    """The morning report of each night, a collaborator of
    :class:`~desitransfer.daemon.core.TransferDaemon` given only what it reads.

    Parameters
    ----------
    directories : :class:`list`
        The daemon's destinations (:class:`~desitransfer.configuration.Directory`).
    conf, log_conf : :class:`dict`
        The ``[common]`` and ``[logging]`` sections of the configuration.
    state : :class:`~desitransfer.daemon.state.State`
        The daemon's state (the reports already sent are kept there).
    actions : :class:`~desitransfer.executor.Actions`
        Emails and saves the state (logs instead in test mode).
    stop : :class:`~desitransfer.common.Stop`
        No report is started once it is set.
    tape : :class:`bool`
        Whether archiving is enabled.
    status : callable
        The status store of a destination, or ``None`` (see
        :meth:`~desitransfer.daemon.core.TransferDaemon._status`).
    recent_nights : callable
        The recent nights of a destination.
    """

    def __init__(self, directories, conf, log_conf, state, actions, stop, tape, status,
                 recent_nights):
        self.directories = directories
        self.conf = conf
        self.log_conf = log_conf
        self.state = state
        self.actions = actions
        self.stop = stop
        self.tape = tape
        self._status = status
        self._recent_nights = recent_nights

    def send(self):
        """Send the report of every night whose backup hour passed within
        :data:`REPORT_WINDOW` and that was not reported yet."""
        if not self.log_conf['report'] or not self.log_conf['to']:
            return
        hour = self.conf['backup'] if 0 <= self.conf['backup'] <= 23 else 20
        now = common._utcnow()
        reported = self.state[self.directories[0].name]['reported']
        nights = set()
        for d in self.directories:
            nights |= set(self._recent_nights(d))
        for night in sorted(nights):
            due = due_time(night, hour)
            key = f'{night} report'
            if not due <= now < due + REPORT_WINDOW or key in reported:
                continue
            if self.stop.is_set():
                return
            subject, body = self.report(night)
            try:
                sent = self.actions.email(self.log_conf['smtp'], self.log_conf['to'], subject,
                                          body, what=f'the report of night {night}')
            except OSError as err:
                log.error("Could not email the report of night %s through %s (%s); will try "
                          "again next pass.", night, self.log_conf['smtp'], err)
                continue
            if sent:
                log.info("Emailed the report of night %s to %s.", night,
                         ', '.join(self.log_conf['to']))
            reported.append(key)
            self.actions.save(self.state)

    def report(self, night):
        """The subject and body of the report of `night`.

        Parameters
        ----------
        night : :class:`str`
            The night, YYYYMMDD.

        Returns
        -------
        :class:`tuple`
            The subject and the text of the email.
        """
        lines = [f"Night {night}, as desi_transfer_daemon on {socket.getfqdn()} saw it at "
                 f"{common._utcnow():%Y-%m-%d %H:%M} UTC.", ""]
        problems = 0
        for d in self.directories:
            text, n = self._report_directory(d, night)
            lines += text
            problems += n
        try:
            found = audit((self.directories, self.conf, self.log_conf), [night],
                          stop=self.stop)
        except Exception as err:
            found = None
            lines += [f"Audit: could not be made ({type(err).__name__}: {err})."]
        if found is not None:
            if found:
                lines.append(f"Audit: {len(found):d} disagreement"
                             f"{'' if len(found) == 1 else 's'}:")
                lines += [f"  {a.expid or '-'} {a.place}: {a.problem.rstrip('.')}; to do: "
                          f"{a.todo}" for a in found]
            else:
                lines.append("Audit: the mountain, NERSC, the status and the tape agree.")
        problems += len(found or []) + (found is None)
        subject = (f"desi_transfer_daemon: night {night} "
                   + (f"({problems:d} problem{'' if problems == 1 else 's'})" if problems
                      else "complete"))
        return subject, '\n'.join(lines) + '\n'

    def _report_directory(self, d, night):
        """Lines of the report for the destination `d`, and how many problems."""
        state = self.state[d.name]
        records = {}
        status = self._status(d)
        if status is not None:
            try:
                records = status.records(night)
            except (KeyError, OSError, ValueError):
                records = {}
        stages = {'rsync': 0, 'checksum': 1, 'backup': 2}

        def count(stage, ok):
            return sorted(f'{int(e):08d}' for e, rows in records.items()
                          if any(r[0] == stages[stage] and r[1] == ok for r in rows))

        installed = [e for e in listdir(os.path.join(d.destination, night)) if e.isdigit()]
        verified, bad = count('checksum', 1), count('checksum', 0)
        copy_failed, backed_up = count('rsync', 0), count('backup', 1)
        retrying = sorted(n for n in state['retries'] if n.startswith(night + '/'))
        given_up = sorted(n for n in state['given_up'] if n.startswith(night + '/'))
        staged = listdir(os.path.join(d.staging, night))
        late = state['late'].get(night, [])
        lines = [f"{d.name} ({d.destination}/{night}):",
                 f"  {len(installed):d} exposures installed, {len(verified):d} verified"
                 + (f", {len(bad):d} with checksum errors ({_names(bad)})" if bad else "")
                 + (f", {len(copy_failed):d} whose copy failed ({_names(copy_failed)})"
                    if copy_failed else "")
                 + (f", {len(staged):d} still in staging ({_names(staged)})" if staged else "")
                 + "."]
        if retrying or given_up:
            lines.append(f"  Being transferred again: {', '.join(retrying) or 'none'}; "
                         f"given up: {', '.join(given_up) or 'none'}.")
        lines.append(f"  Late files caught up in: {', '.join(late)}." if late else
                     "  No late files were caught up.")
        if night in state['backed_up']:
            lines.append(f"  On tape as {d.hpss}/{archive_name(d.hpss, night)}, "
                         f"{len(backed_up):d} exposures recorded as archived.")
        elif not self.tape:
            lines.append("  Not archived: archiving is disabled (-B).")
        else:
            failures = state['archive_failures'].get(night, 0)
            lines.append("  Not on tape yet" +
                         (f" ({failures:d} failed attempts)" if failures else "") + ".")
        summary = latency_summary(latencies({night: records}, night))
        if summary['count']:
            lines.append(f"  Latency from link to verified ({summary['count']:d} exposures): "
                         f"median {duration(summary['p50'])}, 95% {duration(summary['p95'])}, "
                         f"max {duration(summary['max'])}.")
        problems = (len(bad) + len(copy_failed) + len(staged) + len(given_up) +
                    (self.tape and night not in state['backed_up']))
        return lines + [""], problems


def _names(expids, most=5):
    shown = ', '.join(sorted(expids)[:most])
    return shown + (f' and {len(expids) - most:d} more' if len(expids) > most else '')
