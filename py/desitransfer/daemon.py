# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
===================
desitransfer.daemon
===================

Entry point for :command:`desi_transfer_daemon`.

Raw exposures linked at KPNO as ``SOURCE/NIGHT/EXPID`` are copied into a
staging area, locked, verified against their sha256 checksum file and moved
into the destination; the outcome of each stage is recorded in the status
store.  In the morning whole nights are synced again to pick up late files,
and after noon each finished night is archived to HPSS with :command:`htar`.
"""
import datetime as dt
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import stat
import sys
import tempfile
import threading
from argparse import ArgumentParser

from . import __version__ as dtVersion
from .checksum import verify_checksum
from . import common
from .common import (aside_name, configure_log, dir_perm, empty_rsync, ensure_scratch,
                     file_perm, log, new_exposures, rsync, rsync_ssh, run, ssh_command,
                     valid_night, write_json)
from .configuration import ConfigurationError, read_configuration
from .status import TransferStatus, _milliseconds

#: Seconds before an rsync, htar or hsi command is killed.
RSYNC_TIMEOUT = 2 * 3600
HTAR_TIMEOUT = 12 * 3600
HSI_TIMEOUT = 600
REMOTE_TIMEOUT = 300
HPSS_STATUS_TIMEOUT = 30

#: Nights in the destination from this many days back are archived even if no
#: longer linked at the mountain.
RECENT = 30

#: A night not archived this long after its backup hour is alerted (once).
OVERDUE = dt.timedelta(days=1)

#: Most new exposures copied by one rsync (a bound on its argument list).
BATCH = 200

#: rsync return codes meaning the connection to the mountain failed: ssh (255),
#: protocol stream (12), socket I/O (10), timeouts (30, 35) and our own kill (-9).
LOST_CONNECTION = (255, 12, 10, 30, 35, -9)

_expid = re.compile(r'[0-9]{8}')

#: What the mountain answers instead of the links while checksums are being computed.
_LOCKED = 'desi_transfer_daemon: checksum lock present'



class TransferDaemon(object):
    """Manage data transfer configuration, options, and operations.

    Parameters
    ----------
    options : :class:`argparse.Namespace`
        The parsed command-line options.

    Raises
    ------
    ConfigurationError
        If the configuration cannot be used.
    """

    def __init__(self, options):
        self.options = options
        self.test = options.test
        self.tape = not options.no_backup
        self.directories, self.conf, self.log_conf = read_configuration(options.configuration)
        try:
            self.scratch = ensure_scratch(self.conf['temporary'])
        except FileNotFoundError as err:
            raise ConfigurationError(f"[common] temporary: {err}") from None
        self._configure_log(options.debug)
        self.stop = threading.Event()
        self._control = None
        self._warned = set()
        self._linked = set()
        self._hpss_active = None
        self._hpss_listing = {}
        top = os.path.dirname(self.directories[0].staging)
        self.state_file = os.path.join(top, 'desi_transfer_daemon_state.json')
        self.lock_file = os.path.join(top, 'desi_transfer_daemon.lock')
        self.state = self._load_state()

    def _configure_log(self, debug):
        """Re-configure the default logger returned by ``desiutil.log``.

        Parameters
        ----------
        debug : :class:`bool`
            If ``True`` set the log level to DEBUG.
        """
        c = self.log_conf
        # Test mode changes nothing: no log file, no alert email.
        memory = os.path.join(os.path.dirname(self.directories[0].staging),
                              'desi_transfer_daemon_alerts.json')
        configure_log(debug=debug, filename=None if self.test else c['filename'],
                      size=c['size'], backups=c['backups'], to=[] if self.test else c['to'],
                      mailhost=c['smtp'], program='desi_transfer_daemon', memory=memory)

    # ------------------------------------------------------------------
    # State kept between passes and between runs.
    # ------------------------------------------------------------------
    def _load_state(self):
        try:
            with open(self.state_file) as f:
                state = json.load(f)
            self._check_state(state)
        except FileNotFoundError:
            state = {}
        except (OSError, ValueError) as err:
            # Never replace an earlier .bad: each one is kept for analysis.
            bad = aside_name(self.state_file, '.bad')
            log.error("State file %s is unreadable (%s); it is kept as %s and the daemon "
                      "starts afresh: nights are checked on tape again, and exposures "
                      "waiting to be transferred again are not retried.",
                      self.state_file, err, bad)
            if not self.test:
                os.replace(self.state_file, bad)
            state = {}
        for d in self.directories:
            s = state.setdefault(d.name, {})
            s.setdefault('retries', {})
            s.setdefault('caught_up', [])
            s.setdefault('backed_up', [])
            s.setdefault('unreachable', 0)
            s.setdefault('archive_failures', {})
            s.setdefault('overdue', [])
        return state

    def _check_state(self, state):
        """Raise :exc:`ValueError` unless `state` has the shape :meth:`_save_state` writes.

        Names in it become paths: an exposure that is not ``NIGHT/EXPID`` or a
        night that is not a date could lead out of the destination.
        """
        if not isinstance(state, dict):
            raise ValueError('not a JSON object')
        for d in self.directories:
            s = state.get(d.name, {})
            if not isinstance(s, dict):
                raise ValueError(f'{d.name} is not a JSON object')
            retries = s.get('retries', {})
            if not (isinstance(retries, dict) and
                    all(_valid_link(k) and type(v) is int for k, v in retries.items())):
                raise ValueError(f'{d.name}: retries is not NIGHT/EXPID: count')
            for key in ('caught_up', 'backed_up', 'overdue'):
                nights = s.get(key, [])
                if not (isinstance(nights, list) and all(valid_night(n) for n in nights)):
                    raise ValueError(f'{d.name}: {key} is not a list of nights')
            if type(s.get('unreachable', 0)) is not int:
                raise ValueError(f'{d.name}: unreachable is not a count')
            failures = s.get('archive_failures', {})
            if not (isinstance(failures, dict) and
                    all(valid_night(k) and type(v) is int for k, v in failures.items())):
                raise ValueError(f'{d.name}: archive_failures is not NIGHT: count')

    def _save_state(self):
        if self.test:
            return
        os.makedirs(os.path.dirname(self.state_file), exist_ok=True)
        write_json(self.state_file, self.state)

    # ------------------------------------------------------------------
    # Talking to the mountain.
    # ------------------------------------------------------------------
    @property
    def host(self):
        return self.conf['host']

    def _ssh(self):
        """The ssh command, sharing one connection per pass where possible."""
        if self._control is None:
            _remove_stale_control_directories()
            self._control = tempfile.mkdtemp(prefix=f'dtd-{os.getpid()}-')
        return ssh_command(self.conf['ssh'], control=os.path.join(self._control, 'mux'))

    def _close_ssh(self):
        """Stop the shared ssh connection and remove its private directory."""
        if self._control is None:
            return
        socket = os.path.join(self._control, 'mux')
        if os.path.exists(socket):
            run(ssh_command(self.conf['ssh']) + ['-o', f'ControlPath={socket}', '-O', 'exit',
                                                 self.host],
                timeout=30, quiet=True, ok=(0, 255))
        shutil.rmtree(self._control, ignore_errors=True)
        self._control = None

    def _remote(self, command, ok=(0,)):
        """Run `command` at the mountain (or locally if no host is configured).

        `command` is an argument list; at the mountain, a :class:`str` is a
        command for the remote shell (ssh always runs one), quoted by the caller.
        """
        if not self.host:
            return run(command, timeout=REMOTE_TIMEOUT, ok=ok, quiet=True)
        if not isinstance(command, str):
            command = shlex.join(command)
        result = run(self._ssh() + [self.host, command],
                     timeout=REMOTE_TIMEOUT, ok=ok + (255,), quiet=True)
        if result.returncode == 255:
            # The shared connection may have died: try once on a plain connection.
            log.warning("ssh to %s failed (%s); trying again without connection sharing.",
                        self.host, result.stderr.strip()[-300:])
            result = run(ssh_command(self.conf['ssh']) + [self.host, command],
                         timeout=REMOTE_TIMEOUT, ok=ok, quiet=True)
        return result

    def _rsync(self, source, destination, test=False, extra=()):
        """rsync command from the mountain, through the configured ssh."""
        command = rsync(source, destination, test=test, config=self.host or None)
        command[1:1] = ['--timeout=600'] + list(extra)
        return rsync_ssh(command, self._ssh()) if self.host else command

    def checksum_lock(self):
        """See if checksums are being computed at KPNO.

        Returns
        -------
        :class:`bool`
            ``True`` if checksums are being computed, or if the mountain
            cannot be asked (then nothing is transferred in this pass either).
        """
        return self._checksum_lock()[0] is not False

    def _checksum_lock(self):
        """``(True or False, result)``, or ``(None, result)`` if the mountain cannot be asked."""
        result = self._remote(['test', '-f', self.conf['checksum_lock']], ok=(0, 1))
        if result.returncode in (0, 1):
            return result.returncode == 0, result
        return None, result

    def _mountain_unreachable(self, d, what, result):
        """Count passes in a row that could not reach the mountain; alert on the third.

        The count is kept in the state file, so that it also counts runs of
        ``--once`` started by cron.
        """
        state = self.state[d.name]
        state['unreachable'] += 1
        level = log.critical if state['unreachable'] == 3 else log.error
        level("Could not %s at %s (%d passes in a row): %s; nothing is transferred in this "
              "pass, will try again next pass.", what, self.host or 'localhost',
              state['unreachable'], result.stderr.strip()[-300:])
        self._save_state()

    def _survey(self, d):
        """Ask the mountain, in one round trip, for the checksum lock and the links.

        Returns
        -------
        :class:`tuple`
            ``(True, result)`` if checksums are being computed, ``(None,
            result)`` if the mountain cannot be asked, else ``(False, result)``
            where ``result.stdout`` lists the links.
        """
        find = ['find', d.source, '-mindepth', '1', '-maxdepth', '2', '-type', 'l']
        if not self.host:
            locked, result = self._checksum_lock()
            return (locked, result) if locked is not False else (False, self._remote(find))
        result = self._remote(f"if test -f {shlex.quote(self.conf['checksum_lock'])}; "
                              f"then echo {_LOCKED}; else {shlex.join(find)}; fi")
        if result.returncode != 0:
            return None, result
        return result.stdout.startswith(_LOCKED + '\n'), result

    def _links(self, d, result):
        """Valid ``NIGHT/EXPID`` links at the mountain, or ``None`` on failure.

        `result` is the outcome of the ``find`` run at the mountain by :meth:`_survey`.
        """
        if result.returncode != 0:
            self._mountain_unreachable(d, f'list exposures in {d.source}', result)
            return None
        if self.state[d.name]['unreachable']:
            log.info("%s is reachable again after %d passes.", self.host or 'localhost',
                     self.state[d.name]['unreachable'])
            self.state[d.name]['unreachable'] = 0
            self._save_state()
        links = []
        prefix = d.source.rstrip('/') + '/'
        for line in result.stdout.splitlines():
            link = line[len(prefix):] if line.startswith(prefix) else line
            if _valid_link(link):
                links.append(link)
            elif line and line not in self._warned:
                self._warned.add(line)
                log.warning("Malformed link %s at %s is not NIGHT/EXPID; it is not "
                            "transferred.", line, self.host or 'localhost')
        return sorted(links)

    # ------------------------------------------------------------------
    # The main loop.
    # ------------------------------------------------------------------
    def _stopping(self):
        if self.stop.is_set():
            return True
        if os.path.exists(self.options.kill):
            log.info("%s exists; stopping.", self.options.kill)
            self.stop.set()
            return True
        return False

    def transfer(self):
        """Loop over and transfer all configured directories.

        With ``--once``, make one pass and return; otherwise pass, sleep and
        pass again until SIGTERM or the kill file stops the loop.  A pass that
        fails is logged with its traceback and the next pass still runs.
        """
        while not self._stopping():
            try:
                self._pass()
            except Exception as err:
                log.critical("Transfer pass failed: %s: %s; the next pass will try again.",
                             type(err).__name__, err, exc_info=True)
            finally:
                self._close_ssh()
            if self.options.once or self._stopping():
                break
            log.debug("Sleeping %g minutes.", self.conf['sleep'])
            self.stop.wait(self.conf['sleep'] * 60)
        log.info("desi_transfer_daemon stops.")

    def _pass(self):
        self._hpss_active = None
        self._hpss_listing = {}
        for d in self.directories:
            if self._stopping():
                return
            self.directory(d)

    def _status(self, d):
        return TransferStatus(os.path.join(os.path.dirname(d.staging), 'status'))

    @staticmethod
    def _due(night, hour):
        """``True`` once it is `hour` UTC on the morning after `night` (or later).

        An hour outside 0-23 disables the step.
        """
        if not 0 <= hour <= 23:
            return False
        start = dt.datetime.strptime(night, '%Y%m%d').replace(tzinfo=dt.timezone.utc)
        return common._utcnow() >= start + dt.timedelta(days=1, hours=hour)

    def directory(self, d):
        """Data transfer operations for a single destination directory.

        Parameters
        ----------
        d : :func:`collections.namedtuple`
            Configuration for the destination directory.
        """
        log.debug("Looking for new exposures in %s.", d.source)
        locked, result = self._survey(d)
        if locked is None:
            self._mountain_unreachable(
                d, f"check {self.conf['checksum_lock']} and list exposures in {d.source}",
                result)
            return
        if locked:
            log.info("Checksums are being computed at %s (%s exists); waiting for "
                     "the next pass.", self.host or 'localhost', self.conf['checksum_lock'])
            return
        links = self._links(d, result)
        if links is None:
            return
        status = None if self.test else self._status(d)
        state = self.state[d.name]
        earlier_errors = sorted(state['retries'])
        new = [link for link in links if not os.path.isdir(os.path.join(d.destination, link))]
        if new:
            log.info("%d new exposures in %s.", len(new), d.source)
        for night in sorted({link.split('/')[0] for link in new}):
            self._new_night(d, night, [link.split('/')[1] for link in new
                                       if link.startswith(night + '/')], status)
            if self.stop.is_set():
                return
        self._retry(d, status, earlier_errors)
        linked = self._linked = {link.split('/')[0] for link in links}
        # Nights no longer linked at the mountain are still archived.
        pending = sorted(n for n in linked | self._recent_nights(d)
                         if n not in state['backed_up'] and
                         os.path.isdir(os.path.join(d.destination, n)))
        for night in pending:
            if (night in linked and self._due(night, self.conf['catchup'])
                    and night not in state['caught_up'] and not self._stopping()):
                if self.catchup(d, night, status):
                    state['caught_up'].append(night)
                    self._save_state()
        if self.tape:
            due = [night for night in pending if self._due(night, self.conf['backup'])]
            for night in due:
                self._overdue(d, night)
            for night in due:
                if self._stopping() or not self._hpss_available():
                    break
                if self._retrying(d, night):
                    continue
                if self.backup(d, night, status):
                    if status is not None:
                        status.update(night, 'all', 'backup')
                    state['backed_up'].append(night)
                    state['caught_up'] = [n for n in state['caught_up'] if n != night]
                    state['overdue'] = [n for n in state['overdue'] if n != night]
                    self._save_state()

    def _recent_nights(self, d):
        """Nights in the destination from the last :data:`RECENT` days."""
        oldest = (common._utcnow() - dt.timedelta(days=RECENT)).strftime('%Y%m%d')
        try:
            names = os.listdir(d.destination)
        except OSError:
            return set()
        return {n for n in names if valid_night(n) and n >= oldest}

    def _overdue(self, d, night):
        """Alert once if `night` is still not on tape a day after it was due."""
        state = self.state[d.name]
        due = (dt.datetime.strptime(night, '%Y%m%d').replace(tzinfo=dt.timezone.utc) +
               dt.timedelta(days=1, hours=self.conf['backup']))
        late = common._utcnow() - due
        if late < OVERDUE or night in state['overdue'] or self.test:
            return
        log.critical("Night %s is still not archived to HPSS %d hours after it was due "
                     "(see the log for HPSS status, hsi, htar or catch-up problems); the "
                     "daemon keeps trying on every pass.", night,
                     late.total_seconds() // 3600)
        state['overdue'].append(night)
        self._save_state()

    def _new_night(self, d, night, expids, status):
        """Transfer the new exposures of one night.

        One rsync copies all of them into staging; then each exposure is
        locked and verified on its own, the outcomes are recorded together,
        and each exposure is installed.  An exposure is installed only after
        its status is recorded, so a daemon killed at any point finds the
        rest in staging on its next pass.
        """
        log.info("Transferring %d exposures of night %s from %s.", len(expids), night,
                 d.source)
        for first in range(0, len(expids), BATCH):
            if self._stopping() or not self._new_batch(d, night, expids[first:first + BATCH],
                                                       status):
                return

    def _new_batch(self, d, night, expids, status):
        """Transfer `expids` of `night` with one rsync; ``False`` if the mountain was lost."""
        staging = os.path.join(d.staging, night)
        if not self.test:
            os.makedirs(staging, exist_ok=True)
            for expid in expids:
                unlock_directory(os.path.join(staging, expid))
        extra = [f'--include=/{e}/***' for e in expids] + ['--exclude=*']
        bulk = run(self._rsync(os.path.join(d.source, night), staging, extra=extra),
                   timeout=RSYNC_TIMEOUT, test=self.test, ok=(0, 24), stop=self.stop)
        if self.stop.is_set() and bulk.returncode not in (0, 24):
            log.info("Stopped while copying night %s; its new exposures stay in staging "
                     "for the next run.", night)
            return False
        if bulk.returncode in LOST_CONNECTION:
            # Nothing is installed: the exposures stay in staging for the next pass,
            # rather than being installed empty and counted as failures one by one.
            self._mountain_unreachable(d, f'copy exposures of night {night}', bulk)
            return False
        if bulk.returncode not in (0, 24):
            log.warning("rsync of %d exposures of night %s failed; each is transferred on "
                        "its own.", len(expids), night)
            bulk = None
        bulk_time = _milliseconds()
        staged = []
        for expid in expids:
            if self._stopping():
                break
            staged.append((expid,) + self._stage(d, night, expid, bulk, bulk_time))
        self._record_many(status, [r for expid, code, errors, times in staged
                                   for r in self._records(night, expid, code, errors, times)])
        for expid, code, errors, _ in staged:
            self._conclude(d, night, expid, code, errors)
            if night in self.state[d.name]['backed_up']:
                log.critical("Exposure %s/%s arrived after night %s was archived to HPSS; "
                             "the night must be archived again by hand.", night, expid, night)
        return True

    def _stage(self, d, night, expid, bulk=None, bulk_time=None):
        """rsync (unless `bulk` did, at `bulk_time`), lock and verify one exposure in staging.

        Returns the rsync return code, the checksum errors and the times (Unix
        milliseconds) at which rsync and the verification finished.
        """
        staging = os.path.join(d.staging, night, expid)
        result = bulk
        if result is not None and not self.test and not os.path.isdir(staging):
            # For example a dangling link at the mountain, which rsync skips.
            log.warning("Exposure %s/%s was not copied by the rsync of its night; "
                        "copying it on its own.", night, expid)
            result = None
        if result is None:
            if not self.test:
                os.makedirs(staging, exist_ok=True)
                unlock_directory(staging)
            result = run(self._rsync(os.path.join(d.source, night, expid), staging),
                         timeout=RSYNC_TIMEOUT, test=self.test, ok=(0, 24))
            bulk_time = _milliseconds()
        lock_directory(staging, self.test)
        errors = self._verify(os.path.join(staging, d.checksum_file.format(exposure=expid)),
                              alert=False)
        return result.returncode, errors, (bulk_time, _milliseconds())

    @staticmethod
    def _records(night, expid, code, errors, times=(None, None)):
        """Status records of an exposure after rsync returned `code` and verification
        `errors`, with the times (Unix milliseconds) of both outcomes if known."""
        rsync_time, checksum_time = times
        return [(night, expid, 'rsync', code not in (0, 24))
                + ((rsync_time,) if rsync_time else ()),
                (night, expid, 'checksum', bool(errors))
                + ((checksum_time,) if checksum_time else ())]

    def _conclude(self, d, night, expid, code, errors):
        """Install a staged exposure; alert and schedule retries if it had errors."""
        link = f'{night}/{expid}'
        destination = os.path.join(d.destination, night, expid)
        failed = not self.test and (code not in (0, 24) or bool(errors))
        if failed and self.conf['retries'] > 0:
            # Scheduled before the install: once installed, an exposure is no longer
            # new, so a daemon killed in between would otherwise never retry it.
            self.state[d.name]['retries'][link] = 0
            self._save_state()
        self._install(os.path.join(d.staging, night, expid), destination)
        if self.test:
            return
        if not failed:
            log.info("Exposure %s is installed in %s and verified.", link, destination)
            return
        problems = ([] if code in (0, 24) else [f'rsync failed with return code {code}']
                    ) + (errors.splitlines() if errors else [])
        retries = self.conf['retries']
        log.critical("Exposure %s has errors: %s. It is installed in %s anyway and %s.",
                     link, '; '.join(p.rstrip('.') for p in problems), destination,
                     f'will be transferred and verified again on the next {retries} passes'
                     if retries else 'is not transferred again ([common] retries = 0)')

    def exposure(self, d, link, status):
        """Data transfer operations for a single exposure.

        This method will unconditionally install an exposure directory in the
        destination, regardless of any transfer or checksum errors.  Errors are
        recorded, alerted once, and the exposure is transferred and verified
        again on later passes, up to ``[common] retries`` times.

        Parameters
        ----------
        d : :func:`collections.namedtuple`
            Configuration for the destination directory.
        link : :class:`str`
            The exposure, ``NIGHT/EXPID``.
        status : :class:`desitransfer.status.TransferStatus`
            The status store (``None`` in test mode).
        """
        night, expid = link.split('/')
        log.info("Transferring exposure %s from %s.", link, d.source)
        code, errors, times = self._stage(d, night, expid)
        self._record_many(status, self._records(night, expid, code, errors, times))
        self._conclude(d, night, expid, code, errors)

    def _install(self, staging, destination):
        """Move an exposure from staging to its destination."""
        if self.test:
            log.info("Test mode, would move %s to %s.", staging, destination)
            return
        night_dir = os.path.dirname(destination)
        os.makedirs(night_dir, exist_ok=True)
        mode = stat.S_IMODE(os.stat(night_dir).st_mode)
        if not mode & stat.S_IWUSR:
            # The night was archived already (user write removed); see directory().
            os.chmod(night_dir, mode | stat.S_IWUSR)
        try:
            os.rename(staging, destination)
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
            # Staging on another file system: copy beside the target, then rename.
            log.warning("%s and %s are on different file systems; copying.",
                        staging, destination)
            partial = os.path.join(os.path.dirname(destination),
                                   '.' + os.path.basename(destination) + '.partial')
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(staging, partial, symlinks=True)
            os.rename(partial, destination)
            unlock_directory(staging)
            shutil.rmtree(staging)

    def _record_many(self, status, records):
        """Record ``(night, expid, stage, failure[, ms])`` tuples (only log them in test mode)."""
        if status is None:
            for night, expid, stage, failure, *_ in records:
                log.info("Test mode, would record %s %s %s %s.", night, expid, stage,
                         'failure' if failure else 'success')
        elif records:
            status.update_many(records)

    def _retry(self, d, status, links):
        """Transfer and verify again `links`, exposures that had errors in earlier passes."""
        retries = self.state[d.name]['retries']
        for link in links:
            if self._stopping():
                return
            night, expid = link.split('/')
            destination = os.path.join(d.destination, night, expid)
            if self.test:
                log.info("Test mode, would transfer and verify %s again.", link)
                run(self._rsync(os.path.join(d.source, night, expid), destination), test=True)
                continue
            retries[link] += 1
            log.info("Transferring exposure %s again (try %d of %d).", link, retries[link],
                     self.conf['retries'])
            unlock_directory(destination)
            result = run(self._rsync(os.path.join(d.source, night, expid), destination),
                         timeout=RSYNC_TIMEOUT, ok=(0, 24))
            lock_directory(destination)
            errors = self._verify(os.path.join(destination,
                                               d.checksum_file.format(exposure=expid)),
                                  alert=False)
            self._record_many(status, self._records(night, expid, result.returncode, errors))
            if result.returncode in (0, 24) and not errors:
                log.info("Exposure %s is now transferred and verified.", link)
                del retries[link]
            elif retries[link] >= self.conf['retries']:
                log.critical("Exposure %s still has errors after %d more transfers; giving "
                             "up. Fix it by hand, then record it with desi_transfer_status.",
                             link, retries[link])
                del retries[link]
            self._save_state()

    def checksum(self, checksum_file, status):
        """Verify checksum associated with `checksum_file` and report status.

        The status is reported via log messages and messages passed to the
        status object, not via a return value.

        Parameters
        ----------
        checksum_file : :class:`str`
            The checksum file, ``.../NIGHT/EXPID/checksum-EXPID.sha256sum``.
        status : :class:`desitransfer.status.TransferStatus`
            The status store (``None`` in test mode).
        """
        exposure_dir = os.path.dirname(checksum_file)
        errors = self._verify(checksum_file)
        self._record_many(status, [(os.path.basename(os.path.dirname(exposure_dir)),
                                    os.path.basename(exposure_dir), 'checksum', bool(errors))])

    def _verify(self, checksum_file, alert=True):
        """Verify an exposure and log the outcome (CRITICAL if `alert`, else ERROR).

        Returns the errors found, ``''`` if none (always ``''`` in test mode).
        """
        exposure_dir = os.path.dirname(checksum_file)
        link = '/'.join(exposure_dir.split(os.sep)[-2:])
        if self.test:
            log.info("Test mode, would verify %s.", checksum_file)
            return ''
        errors = verify_checksum(checksum_file)
        if errors:
            (log.critical if alert else log.error)(
                "Checksum verification of exposure %s failed (%s): %s",
                link, checksum_file, '; '.join(errors.splitlines()))
        else:
            log.debug("Checksums of %s verified.", link)
        return errors

    def catchup(self, d, night, status, backup=False):
        """Do a "catch-up" transfer to catch delayed files in the morning, rather than at noon.

        Parameters
        ----------
        d : :func:`collections.namedtuple`
            Configuration for the destination directory.
        night : :class:`str`
            Night to check.
        status : :class:`desitransfer.status.TransferStatus`
            The status store (``None`` in test mode).
        backup : :class:`bool`, optional
            This is the final catch-up before the night is archived.

        Returns
        -------
        :class:`bool`
            ``True`` if the night is up to date.

        Notes
        -----
        * 07:00 MST = 14:00 UTC.
        * This script can do nothing about exposures that were never linked
          into the DTS area at KPNO in the first place.
        """
        destination = os.path.join(d.destination, night)
        exposures = sorted(e for e in os.listdir(destination) if _expid.fullmatch(e))
        extra = [f'--include=/{e}/***' for e in exposures] + ['--exclude=*']
        source = os.path.join(d.source, night)
        log.info("%s of night %s: looking for late or changed files.",
                 'Final catch-up' if backup else 'Catch-up', night)
        dry = run(self._rsync(source, destination, test=True, extra=extra),
                  timeout=RSYNC_TIMEOUT, ok=(0, 24))
        if dry.returncode not in (0, 24):
            log.error("Catch-up of night %s could not ask %s; will try again next pass.",
                      night, self.host or 'localhost')
            return False
        if empty_rsync(dry.stdout):
            log.info("Night %s is up to date.", night)
            return True
        changed = sorted(new_exposures(dry.stdout))
        log.info("Night %s: late or changed files in exposures %s.", night, ', '.join(changed))
        result = rsync_night(d.source, d.destination, night, test=self.test,
                             command=self._rsync(source, destination, extra=extra))
        if result.returncode not in (0, 24):
            log.error("Catch-up rsync of night %s failed; will try again next pass.", night)
            return False
        records = []
        for expid in changed:
            errors = self._verify(os.path.join(destination, expid,
                                               d.checksum_file.format(exposure=expid)))
            records += self._records(night, expid, result.returncode, errors)
            if errors and self.conf['retries'] > 0:
                self.state[d.name]['retries'][f'{night}/{expid}'] = 0
        self._record_many(status, records)
        self._save_state()
        return True

    def hpss_status(self):
        """Check HPSS availability.

        Returns
        -------
        :class:`bool`
            ``True`` if HPSS is available.
        """
        import requests  # Only needed after noon: keep start-up quick.
        url = self.conf['hpss_status']
        try:
            response = requests.get(url, timeout=HPSS_STATUS_TIMEOUT)
            response.raise_for_status()
            answer = response.json()
            state = answer.get('status') if isinstance(answer, dict) else None
        except (requests.RequestException, ValueError) as err:
            log.warning("HPSS status unknown (%s: %s); archiving waits for a later pass.",
                        url, err)
            return False
        if state != 'active':
            log.info("HPSS status is %r, not 'active'; archiving waits for a later pass.",
                     state)
            return False
        return True

    def _hpss_available(self):
        if self._hpss_active is None:
            self._hpss_active = self.hpss_status()
        return self._hpss_active

    def _hpss_program(self, name):
        return os.path.join(self.conf['hpss'], name) if self.conf['hpss'] else name

    def _on_tape(self, d, archive):
        """``True`` if `archive` and its index are in the HPSS directory of `d`."""
        if d.hpss not in self._hpss_listing:
            # hsi -O appends: a fresh private directory for each listing.  In test
            # mode it is in the system temporary directory, so scratch is untouched.
            with tempfile.TemporaryDirectory(prefix='desi_transfer_hsi.',
                                             dir=None if self.test else self.scratch) as tmp:
                listing = os.path.join(tmp, 'listing.txt')
                result = run([self._hpss_program('hsi'), '-O', listing, 'ls', '-l', d.hpss],
                             timeout=HSI_TIMEOUT, ok=(0, 64, 72))
                names = set()
                try:
                    with open(listing) as f:
                        names = {line.split()[-1] for line in f if line.split()}
                except OSError:
                    pass
            if result.returncode not in (0, 64, 72) or not names and result.returncode == 0:
                log.error("Could not list %s on HPSS; archiving waits for a later pass.",
                          d.hpss)
                return None
            self._hpss_listing[d.hpss] = names
        names = self._hpss_listing[d.hpss]
        return archive in names and archive + '.idx' in names

    def _retrying(self, d, night):
        """``True`` (and say so) if exposures of `night` have errors and are retried."""
        waiting = sorted(link for link in self.state[d.name]['retries']
                         if link.startswith(night + '/'))
        if waiting:
            log.info("Night %s is not archived yet: exposures %s have errors and are being "
                     "transferred again.", night, ', '.join(waiting))
        return bool(waiting)

    def backup(self, d, night, status):
        """Final sync and backup for a specific night.

        Parameters
        ----------
        d : :func:`collections.namedtuple`
            Configuration for the destination directory.
        night : :class:`str`
            Night to back up.
        status : :class:`desitransfer.status.TransferStatus`
            The status store (``None`` in test mode).

        Returns
        -------
        :class:`bool`
            ``True`` indicates the backup ran to completion and the the transfer
            status should be updated to reflect that.

        Notes
        -----
        * 12:00 MST = 19:00 UTC, plus one hour just to be safe, so after 20:00 UTC.
        """
        archive = f"{d.hpss.replace('/', '_')}_{night}.tar"
        on_tape = self._on_tape(d, archive)
        if on_tape is None:
            return False
        if on_tape:
            log.info("Night %s is already archived as %s/%s.", night, d.hpss, archive)
            return True
        if night not in self._linked:
            log.info("Night %s is no longer linked at %s; archiving it without a final "
                     "catch-up.", night, self.host or 'localhost')
        elif not self.catchup(d, night, status, backup=True):
            return False
        # The final catch-up may have found errors: archive only once they are resolved.
        if self._retrying(d, night):
            return False
        night_dir = os.path.join(d.destination, night)
        if self.test:
            log.info("Test mode, would remove user write permission in %s.", night_dir)
        else:
            for root, _, _ in os.walk(night_dir):
                os.chmod(root, stat.S_IMODE(os.lstat(root).st_mode) & ~stat.S_IWUSR)
        result = run([self._hpss_program('htar'), '-cvhf', f'{d.hpss}/{archive}',
                      '-H', 'crc:verify=all', night], cwd=d.destination,
                     timeout=HTAR_TIMEOUT, test=self.test)
        if self.test:
            return False
        self._hpss_listing.pop(d.hpss, None)
        failures = self.state[d.name]['archive_failures']
        if result.returncode == 0 and self._on_tape(d, archive):
            log.info("Night %s is archived as %s/%s.", night, d.hpss, archive)
            failures.pop(night, None)
            return True
        # Counted in the state file: emailed once per night, also when cron starts
        # each pass with --once (the de-duplication of alerts lasts one process).
        failures[night] = failures.get(night, 0) + 1
        (log.critical if failures[night] == 1 else log.error)(
            "Archiving night %s to HPSS as %s/%s failed (htar returned %d; %d attempts "
            "failed); will try again on a later pass.", night, d.hpss, archive,
            result.returncode, failures[night])
        self._save_state()
        return False

    def run(self):
        """Run the daemon: refuse a second copy, then :meth:`transfer`.

        Returns
        -------
        :class:`int`
            An exit status.
        """
        if self.test:
            log.info("Test mode: nothing is changed; commands are logged, not run.")
            self.transfer()
            return 0
        os.makedirs(os.path.dirname(self.lock_file), exist_ok=True)
        with open(self.lock_file, 'a+') as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.seek(0)
                log.critical("Another desi_transfer_daemon (pid %s) is running with this "
                             "configuration (lock %s); exiting.",
                             lock.read().strip() or 'unknown', self.lock_file)
                return 1
            lock.truncate(0)
            lock.write(f'{os.getpid()}\n')
            lock.flush()
            self.transfer()
        return 0


def _valid_link(link):
    """``True`` if `link` is ``NIGHT/EXPID`` with a real date and an 8-digit exposure."""
    parts = link.split('/') if isinstance(link, str) else []
    return (len(parts) == 2 and valid_night(parts[0]) and
            _expid.fullmatch(parts[1]) is not None)


def _remove_stale_control_directories():
    """Remove ssh control directories left by daemons that were killed."""
    top = tempfile.gettempdir()
    for name in os.listdir(top):
        m = re.fullmatch(r'dtd-([0-9]+)-\w+', name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(top, name), ignore_errors=True)
        except PermissionError:
            pass


def _options(args=None):
    """Parse command-line options for :command:`desi_transfer_daemon`.

    Parameters
    ----------
    args : :class:`list`, optional
        Command-line arguments; ``sys.argv[1:]`` if not set.

    Returns
    -------
    :class:`argparse.Namespace`
        The parsed command-line options.
    """
    desc = "Transfer DESI raw data files."
    prsr = ArgumentParser(prog=os.path.basename(sys.argv[0]), description=desc)
    prsr.add_argument('-B', '--no-backup', action='store_true', dest='no_backup',
                      help="Skip NERSC HPSS backups.")
    prsr.add_argument('-c', '--configuration', metavar='FILE',
                      help="Read configuration from FILE (default: the shipped "
                           "desi_transfer_daemon.ini).")
    prsr.add_argument('-d', '--debug', action='store_true',
                      help="Set log level to DEBUG.")
    prsr.add_argument('-k', '--kill', metavar='FILE',
                      default=os.path.join(os.environ.get('HOME', '~'), 'stop_desi_transfer'),
                      help="Exit the script when FILE is detected (default %(default)s).")
    prsr.add_argument('--once', action='store_true',
                      help="Make one full pass, then exit (for cron and tests).")
    prsr.add_argument('-t', '--test', action='store_true',
                      help="Test mode: log exactly what would run and change nothing.")
    prsr.add_argument('-V', '--version', action='version',
                      version='%(prog)s {0}'.format(dtVersion))
    return prsr.parse_args(args)


def _popen(command):
    """Simple wrapper for :class:`subprocess.Popen` to avoid repeated code.

    Parameters
    ----------
    command : :class:`list`
        Command to pass to :class:`subprocess.Popen`.

    Returns
    -------
    :func:`tuple`
        The returncode (as a :class:`str`), standard output and standard error.
    """
    result = run(command)
    return (str(result.returncode), result.stdout, result.stderr)


def _chmod_tree(directory, dirs, files_, test, what):
    """Set the mode of `directory`, its subdirectories (`dirs`) and files (`files_`).

    A mode is a number, or a function of the path returning it; `what` says
    what is done, for test mode.
    """
    if test:
        log.info("Test mode, would %s %s.", what, directory)
        return
    if not os.path.isdir(directory):
        return
    for root, dirnames, filenames in os.walk(directory):
        os.chmod(root, dirs(root) if callable(dirs) else dirs)
        for name in filenames:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, files_(p) if callable(files_) else files_)


def lock_directory(directory, test=False):
    """Set a directory and its contents read-only.

    Directories become ``0o2750``, files ``0o440``.

    Parameters
    ----------
    directory : :class:`str`
        Directory to lock.
    test : :class:`bool`, optional
        If ``True``, only print the commands.
    """
    _chmod_tree(directory, dir_perm, file_perm, test,
                f'lock (directories {dir_perm:#o}, files {file_perm:#o})')


def unlock_directory(directory, test=False):
    """Set a directory and its contents user-writeable.

    Parameters
    ----------
    directory : :class:`str`
        Directory to unlock.
    test : :class:`bool`, optional
        If ``True``, only print the commands.
    """
    def writable(p):
        return stat.S_IMODE(os.lstat(p).st_mode) | stat.S_IWUSR
    _chmod_tree(directory, writable, writable, test, 'add user write permission in')


def rsync_night(source, destination, night, test=False, command=None):
    """Run an rsync command on an entire night, for example, to pick up delayed files.

    The night is unlocked, synced and locked again.

    Parameters
    ----------
    source : :class:`str`
        Source directory.
    destination : :class:`str`
        Destination directory.
    night : :class:`str`
        Night directory.
    test : :class:`bool`, optional
        If ``True``, only print the commands.
    command : :class:`list`, optional
        The rsync command to run; by default
        :func:`desitransfer.common.rsync` from ``dts:source/night``.

    Returns
    -------
    :class:`desitransfer.common.Result`
        The outcome of rsync.
    """
    night_dir = os.path.join(destination, night)
    if command is None:
        command = rsync(os.path.join(source, night), night_dir)
    unlock_directory(night_dir, test)
    result = run(command, timeout=RSYNC_TIMEOUT, test=test, ok=(0, 24))
    lock_directory(night_dir, test)
    return result


def main():
    """Entry point for :command:`desi_transfer_daemon`.

    Returns
    -------
    :class:`int`
        An integer suitable for passing to :func:`sys.exit`.
    """
    options = _options()
    try:
        daemon = TransferDaemon(options)
    except ConfigurationError as err:
        log.critical("desi_transfer_daemon cannot start: %s", err)
        return 1
    signal.signal(signal.SIGTERM, lambda signum, frame: daemon.stop.set())
    return daemon.run()
