// Licensed under a 3-clause BSD style license - see LICENSE.rst
/*
 * DESI transfer status page.
 *
 * Renders desi_transfer_status_YYYY.json files found next to index.html:
 *
 *     {"NIGHT": {"EXPID": [[stage, ok, ms], ...]}}
 *
 * stage 0 = rsync, 1 = checksum, 2 = backup, 3 = linked (when the exposure's
 * link appeared at Kitt Peak); ok 1 = success, 0 = failure; ms = Unix time in
 * milliseconds.  Unknown stages are ignored.
 *
 * The latency of an exposure is its checksum time (successful) minus its
 * linked time.  Files written before the linked stage existed have no linked
 * rows: then no latency is shown, and a night is complete without them.
 *
 * The year selector offers every year from FIRST_YEAR to the current UTC
 * year.  A static web server cannot list a directory, so the year shown first
 * is found by probing with HEAD requests: the current year, then earlier
 * years one by one, down to the first file that exists.  A year without a
 * file says that it has no records.
 *
 * Each exposure links to its directory on the DESI data server,
 * DATA_URL/NIGHT/EXPID/ (EXPID in 8 digits), where DATA_URL is the content of
 * <meta name="desi-data-url"> in index.html, written when the page is
 * installed.  Only a night of 8 digits and an exposure number of at most 8
 * digits are linked, and only to an http(s) URL.
 *
 * A night that is not complete shows how long ago its last record was; one
 * that is still not complete a day after it ended (the night YYYYMMDD ends at
 * noon at Kitt Peak, 19:00 UTC, on the next day) is marked stale.  Ages are
 * computed from Date.now() and brought up to date every minute.
 *
 * Every string that comes from the data is inserted with textContent or
 * setAttribute, never parsed as HTML.
 */
(function () {
    'use strict';

    var STAGES = ['rsync', 'checksum', 'backup'];
    var LINKED = 3;
    var STATES = ['complete', 'incomplete', 'failed'];
    var SYMBOLS = {complete: '✓', incomplete: '…', failed: '✗'};
    var FIRST_YEAR = 2018;
    var LAST_NIGHTS = 10;
    var HOUR = 3600 * 1000;
    var DAY = 24 * HOUR;
    var SVG = 'http://www.w3.org/2000/svg';

    var page = {
        years: [],          // years offered, newest first
        year: null,         // year shown
        showAll: false,     // "all nights" rather than "last 10 nights"
        nights: [],         // parsed nights of the year shown, newest first
        expanded: new Set(), // night keys whose exposures are shown
        generation: 0       // guards against a slow response for an earlier choice
    };

    // ------------------------------------------------------------------
    // Small helpers.
    // ------------------------------------------------------------------

    function $(id) {
        return document.getElementById(id);
    }

    /** Create an element with optional class and text (text, never HTML). */
    function el(tag, className, text) {
        var e = document.createElement(tag);
        if (className) {
            e.className = className;
        }
        if (text !== undefined && text !== null) {
            e.textContent = String(text);
        }
        return e;
    }

    function svg(tag, attributes) {
        var e = document.createElementNS(SVG, tag);
        Object.keys(attributes || {}).forEach(function (name) {
            e.setAttribute(name, String(attributes[name]));
        });
        return e;
    }

    function fileName(year) {
        return 'desi_transfer_status_' + year + '.json';
    }

    /** The base URL of the exposure links, from index.html; null if unusable. */
    var DATA_URL = (function () {
        var meta = document.querySelector('meta[name="desi-data-url"]');
        var url = meta === null ? '' : meta.getAttribute('content') || '';
        return /^https?:\/\/[A-Za-z0-9._~:\/@!$&()*+,;=%-]+\/$/.test(url) ? url : null;
    }());

    /** The URL of the directory of exposure `expid` of `night`; null if none. */
    function exposureUrl(night, expid) {
        if (DATA_URL === null || !/^\d{8}$/.test(night) || !/^\d{1,8}$/.test(expid)) {
            return null;
        }
        return DATA_URL + night + '/' + String(Number(expid)).padStart(8, '0') + '/';
    }

    /** Unix milliseconds to "YYYY-MM-DD HH:MM:SS" (UTC). */
    function utc(ms) {
        return new Date(ms).toISOString().slice(0, 19).replace('T', ' ');
    }

    /** Unix milliseconds to "MM-DD HH:MM" (UTC), for narrow screens. */
    function shortUtc(ms) {
        return new Date(ms).toISOString().slice(5, 16).replace('T', ' ');
    }

    /** Both forms of a time; the style sheet shows one, depending on the width. */
    function times(parent, ms) {
        parent.appendChild(el('span', 'time time-full', utc(ms)));
        parent.appendChild(el('span', 'time time-short', shortUtc(ms)));
    }

    /** Unix milliseconds when `night` (YYYYMMDD) ends: 19:00 UTC the next day; null if not a date. */
    function nightEnd(night) {
        var m = /^(\d{4})(\d{2})(\d{2})$/.exec(night);
        if (m === null) {
            return null;
        }
        var end = Date.UTC(Number(m[1]), Number(m[2]) - 1, Number(m[3]) + 1, 19);
        var day = new Date(end - DAY);
        return day.getUTCDate() === Number(m[3]) && day.getUTCMonth() === Number(m[2]) - 1 ? end : null;
    }

    /** True if `n` is not complete a day after its night ended. */
    function isStale(n, now) {
        var end = nightEnd(n.night);
        return n.state !== 'complete' && end !== null && now - end > DAY;
    }

    /** How long ago `ms` was, for people: two units at most, short enough for a phone. */
    function ago(ms, now) {
        var m = Math.floor((now - ms) / 60000);
        if (m < -1) {
            return 'in the future';  // A clock is wrong, here or where it was recorded.
        }
        if (m < 1) {
            return 'just now';
        }
        if (m < 60) {
            return m + ' min ago';
        }
        var h = Math.floor(m / 60);
        if (h < 24) {
            return h + ' h ' + (m % 60) + ' min ago';
        }
        return Math.floor(h / 24) + ' d ' + (h % 24) + ' h ago';
    }

    /** A duration in milliseconds, for people. */
    function duration(ms) {
        var s = Math.round(ms / 1000);
        if (s < 60) {
            return s + ' s';
        }
        var m = Math.floor(s / 60);
        if (m < 60) {
            return m + ' min ' + String(s % 60).padStart(2, '0') + ' s';
        }
        var h = Math.floor(m / 60);
        if (h < 48) {
            return h + ' h ' + String(m % 60).padStart(2, '0') + ' min';
        }
        return Math.floor(h / 24) + ' d ' + (h % 24) + ' h';
    }

    /** The top of a chart axis: a round duration, in milliseconds, at least `ms`. */
    function niceMax(ms) {
        var steps = [10, 20, 30, 60, 120, 240, 300, 600, 1200, 1800, 3600, 7200, 14400,
                     21600, 43200, 86400];
        var s = ms / 1000;
        for (var i = 0; i < steps.length; i++) {
            if (s <= steps[i]) {
                return steps[i] * 1000;
            }
        }
        return Math.ceil(s / 86400) * 86400 * 1000;
    }

    /** A round duration for an axis label. */
    function shortDuration(ms) {
        var s = ms / 1000;
        if (s < 120) {
            return Math.round(s) + ' s';
        }
        if (s < 7200) {
            return +(s / 60).toFixed(1) + ' min';
        }
        if (s < 172800) {
            return +(s / 3600).toFixed(1) + ' h';
        }
        return +(s / 86400).toFixed(1) + ' d';
    }

    function median(values) {
        if (values.length === 0) {
            return null;
        }
        var v = values.slice().sort(function (a, b) { return a - b; });
        var mid = Math.floor(v.length / 2);
        return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
    }

    function isPlainObject(x) {
        return x !== null && typeof x === 'object' && !Array.isArray(x);
    }

    /** Exposure keys sort by number; anything that is not a number goes last. */
    function compareExpid(a, b) {
        var na = /^\d+$/.test(a) ? Number(a) : NaN;
        var nb = /^\d+$/.test(b) ? Number(b) : NaN;
        if (!isNaN(na) && !isNaN(nb) && na !== nb) {
            return na - nb;
        }
        if (isNaN(na) !== isNaN(nb)) {
            return isNaN(na) ? 1 : -1;
        }
        return a < b ? -1 : (a > b ? 1 : 0);
    }

    // ------------------------------------------------------------------
    // Data: parse and classify one year.
    // ------------------------------------------------------------------

    /**
     * Validate one status row.  Returns {stage, ok, ms}, 'unknown' for a
     * stage this page does not know, or null for a malformed row.
     */
    function parseRow(row) {
        if (!Array.isArray(row) || row.length < 3) {
            return null;
        }
        var stage = row[0], ok = row[1], ms = row[2];
        if (!(stage === 0 || stage === 1 || stage === 2 || stage === LINKED)) {
            return 'unknown';
        }
        if (!(ok === 0 || ok === 1 || ok === true || ok === false)) {
            return null;
        }
        if (typeof ms !== 'number' || !isFinite(ms) || Math.abs(ms) > 8.64e15) {
            return null;
        }
        return {stage: stage, ok: ok === 1 || ok === true, ms: ms};
    }

    function parseExposure(expid, rows, counter) {
        // One row per stage is expected; if there are more, the newest counts.
        // The linked stage is not needed for an exposure to be complete.
        var stages = [null, null, null];
        var linked = null;
        rows.forEach(function (raw) {
            var row = parseRow(raw);
            if (row === null) {
                counter.rows += 1;
            } else if (row !== 'unknown' && row.stage === LINKED) {
                if (row.ok && (linked === null || row.ms > linked.ms)) {
                    linked = row;
                }
            } else if (row !== 'unknown') {
                var old = stages[row.stage];
                if (old === null || row.ms > old.ms) {
                    stages[row.stage] = row;
                }
            }
        });
        var state;
        if (stages.some(function (s) { return s !== null && !s.ok; })) {
            state = 'failed';
        } else if (stages.every(function (s) { return s !== null; })) {
            state = 'complete';
        } else {
            state = 'incomplete';
        }
        var rsyncToChecksum = null;
        if (stages[0] !== null && stages[1] !== null && stages[1].ms >= stages[0].ms) {
            rsyncToChecksum = stages[1].ms - stages[0].ms;
        }
        var last = null;
        stages.forEach(function (s) {
            if (s !== null && (last === null || s.ms > last)) {
                last = s.ms;
            }
        });
        var latency = null;
        if (linked !== null && stages[1] !== null && stages[1].ok) {
            latency = stages[1].ms - linked.ms;
        }
        return {expid: expid, stages: stages, state: state, linked: linked, latency: latency,
                rsyncToChecksum: rsyncToChecksum, last: last};
    }

    function parseNight(night, exposures, counter) {
        var list = [];
        Object.keys(exposures).forEach(function (expid) {
            var rows = exposures[expid];
            if (!Array.isArray(rows)) {
                counter.exposures += 1;
                return;
            }
            list.push(parseExposure(expid, rows, counter));
        });
        list.sort(function (a, b) { return compareExpid(a.expid, b.expid); });
        var counts = {complete: 0, incomplete: 0, failed: 0};
        var durations = [];
        var latencies = [];
        var last = null;
        list.forEach(function (e) {
            counts[e.state] += 1;
            if (e.rsyncToChecksum !== null) {
                durations.push(e.rsyncToChecksum);
            }
            if (e.latency !== null) {
                latencies.push(e.latency);
            }
            if (e.last !== null && (last === null || e.last > last)) {
                last = e.last;
            }
        });
        var state;
        if (counts.failed > 0) {
            state = 'failed';
        } else if (list.length > 0 && counts.complete === list.length) {
            state = 'complete';
        } else {
            state = 'incomplete';
        }
        return {night: night, exposures: list, counts: counts, state: state,
                medianRsyncToChecksum: median(durations), medianLatency: median(latencies),
                hasLinked: list.some(function (e) { return e.linked !== null; }), last: last};
    }

    /**
     * Turn the decoded JSON of one year into nights, newest first.
     * Throws an Error with a readable message if the shape is wrong.
     */
    function parseYear(data) {
        var counter = {rows: 0, exposures: 0, nights: 0};
        if (Array.isArray(data) && data.length === 0) {
            // An empty list is what the store writes after setting a bad file aside.
            return {nights: [], ignored: counter};
        }
        if (!isPlainObject(data)) {
            throw new Error('expected an object keyed by night, found ' +
                            (Array.isArray(data) ? 'a list' : (data === null ? 'null' : typeof data)));
        }
        var nights = [];
        Object.keys(data).forEach(function (night) {
            if (!isPlainObject(data[night])) {
                counter.nights += 1;
                return;
            }
            nights.push(parseNight(night, data[night], counter));
        });
        nights.sort(function (a, b) { return a.night < b.night ? 1 : (a.night > b.night ? -1 : 0); });
        return {nights: nights, ignored: counter};
    }

    // ------------------------------------------------------------------
    // Fetching and year discovery.
    // ------------------------------------------------------------------

    /** HTTP status of a year's file, without downloading it where possible. */
    function probe(year) {
        return fetch(fileName(year), {method: 'HEAD', cache: 'no-store'}).then(function (r) {
            if (r.status === 405 || r.status === 501) {
                // A server without HEAD: ask for the file itself.
                return fetch(fileName(year), {cache: 'no-store'}).then(function (g) {
                    return g.status;
                });
            }
            return r.status;
        });
    }

    /**
     * Fetch and parse one year: resolves to {nights, ignored}, or to null if
     * the year has no file; rejects with a message.
     */
    function loadYear(year) {
        var name = fileName(year);
        return fetch(name, {cache: 'no-store'}).then(function (r) {
            if (missing(r.status)) {
                return null;
            }
            if (!r.ok) {
                throw new Error(name + ' could not be read: HTTP ' + r.status + ' ' + r.statusText + '.');
            }
            return r.text();
        }, function (err) {
            throw networkError(name, err);
        }).then(function (text) {
            if (text === null) {
                return null;
            }
            var data;
            try {
                data = JSON.parse(text);
            } catch (err) {
                throw new Error(name + ' is not valid JSON (' + err.message + '). ' +
                                'The status of ' + year + ' cannot be shown until the file is repaired.');
            }
            try {
                return parseYear(data);
            } catch (err) {
                throw new Error(name + ' does not hold transfer status: ' + err.message + '.');
            }
        });
    }

    function networkError(name, err) {
        return new Error('Could not reach the web server for ' + name + ' (' +
                         (err && err.message ? err.message : err) + '). ' +
                         'This page must be served by a web server from the status directory; ' +
                         'it cannot read files when opened from disk.');
    }

    /** True if an HTTP status says that a year has no file. */
    function missing(status) {
        return status === 404 || status === 410;
    }

    /**
     * Offer every year from FIRST_YEAR to this one; show the newest year that
     * has a status file (this year, unless it has none yet).
     */
    function discover() {
        var current = Math.max(new Date().getUTCFullYear(), FIRST_YEAR);

        function findNewest(year) {
            if (year < FIRST_YEAR) {
                return Promise.resolve(null);
            }
            return probe(year).then(function (status) {
                return missing(status) ? findNewest(year - 1) : year;
            });
        }

        function done() {
            $('year').setAttribute('data-search', 'done');
            $('year').disabled = false;
        }

        $('year').replaceChildren();
        for (var year = current; year >= FIRST_YEAR; year--) {
            addYear(year);
        }
        $('year').value = String(current);
        return findNewest(current).then(function (newest) {
            done();
            if (newest === null) {
                page.year = current;
                showMessage('No transfer status files found here (looked for ' + fileName(current) +
                            ' back to ' + fileName(FIRST_YEAR) + ').', 'info');
                return;
            }
            selectYear(newest);
        }, function (err) {
            done();
            showMessage(networkError(fileName(current), err).message, 'error');
        });
    }

    function addYear(year) {
        page.years.push(year);
        var option = el('option', null, year);
        option.value = String(year);
        $('year').appendChild(option);
    }

    function selectYear(year) {
        page.year = year;
        page.expanded.clear();
        $('year').value = String(year);
        var generation = ++page.generation;
        setLoaded('loading ' + fileName(year) + '…');
        loadYear(year).then(function (parsed) {
            if (generation !== page.generation) {
                return;
            }
            if (parsed === null) {
                page.nights = [];
                clearTable();
                $('notes').hidden = true;
                showMessage('No records for ' + year + ': there is no ' + fileName(year) +
                            ' here.', 'info');
                setLoaded('');
                return;
            }
            page.nights = parsed.nights;
            hideMessage();
            render();
            showIgnored(parsed.ignored);
            setLoaded('loaded ' + utc(Date.now()) + ' UTC');
        }).catch(function (err) {
            if (generation !== page.generation) {
                return;
            }
            page.nights = [];
            clearTable();
            $('notes').hidden = true;
            showMessage(err.message, 'error');
            setLoaded('');
        });
    }

    // ------------------------------------------------------------------
    // Rendering.
    // ------------------------------------------------------------------

    function showMessage(text, kind) {
        var m = $('message');
        m.textContent = text;
        m.className = 'message ' + kind;
        m.setAttribute('data-kind', kind);
        m.hidden = false;
    }

    function hideMessage() {
        $('message').hidden = true;
        $('message').textContent = '';
    }

    function setLoaded(text) {
        $('loaded').textContent = text;
    }

    function showIgnored(ignored) {
        var parts = [];
        if (ignored.nights) {
            parts.push(ignored.nights + ' night entr' + (ignored.nights === 1 ? 'y' : 'ies'));
        }
        if (ignored.exposures) {
            parts.push(ignored.exposures + ' exposure entr' + (ignored.exposures === 1 ? 'y' : 'ies'));
        }
        if (ignored.rows) {
            parts.push(ignored.rows + ' status row' + (ignored.rows === 1 ? '' : 's'));
        }
        var notes = $('notes');
        notes.textContent = parts.length ?
            'Ignored because malformed in ' + fileName(page.year) + ': ' + parts.join(', ') + '.' : '';
        notes.hidden = parts.length === 0;
    }

    function clearTable() {
        $('night-rows').replaceChildren();
        $('nights').hidden = true;
        $('summary').hidden = true;
    }

    function shownNights() {
        return page.showAll ? page.nights : page.nights.slice(0, LAST_NIGHTS);
    }

    function render() {
        var nights = shownNights();
        if (page.nights.length === 0) {
            clearTable();
            showMessage('No data for ' + page.year + ': ' + fileName(page.year) + ' holds no nights.', 'info');
            return;
        }
        renderSummary(nights);
        // Latency only where the year has link times (older files have none).
        $('nights').classList.toggle('with-latency', page.nights.some(function (n) {
            return n.hasLinked;
        }));
        var body = $('night-rows');
        body.replaceChildren();
        nights.forEach(function (n, index) {
            body.appendChild(nightRow(n, 'detail-' + index));
            if (page.expanded.has(n.night)) {
                body.appendChild(detailRow(n, 'detail-' + index));
            }
        });
        $('nights').hidden = false;
        updateAges();
    }

    function renderSummary(nights) {
        var totals = {complete: 0, incomplete: 0, failed: 0};
        var exposures = {complete: 0, incomplete: 0, failed: 0};
        nights.forEach(function (n) {
            totals[n.state] += 1;
            STATES.forEach(function (s) {
                exposures[s] += n.counts[s];
            });
        });
        function set(name, value) {
            document.querySelector('[data-summary="' + name + '"]').textContent = String(value);
            var unit = document.querySelector('[data-unit-for="' + name + '"]');
            if (unit) {
                unit.textContent = unit.getAttribute(value === 1 ? 'data-one' : 'data-many');
            }
        }
        set('nights-shown', nights.length);
        set('nights-total', page.nights.length);
        set('year', page.year);
        STATES.forEach(function (s) {
            set('nights-' + s, totals[s]);
            set('exposures-' + s, exposures[s]);
        });
        $('summary').hidden = false;
    }

    function stateBadge(state) {
        var badge = el('span', 'badge ' + state);
        badge.appendChild(el('span', 'symbol', SYMBOLS[state])).setAttribute('aria-hidden', 'true');
        badge.appendChild(el('span', 'label', state));
        return badge;
    }

    /** A stacked bar of exposure states; the numbers are in the next cells. */
    function countsBar(counts, total) {
        var bar = el('span', 'states-bar');
        bar.setAttribute('aria-hidden', 'true');
        STATES.forEach(function (s) {
            if (counts[s] > 0) {
                var part = el('span', 'part ' + s);
                part.style.width = (100 * counts[s] / total) + '%';
                bar.appendChild(part);
            }
        });
        return bar;
    }

    /** A cell of column `column` (the data-column of its header). */
    function cell(tag, column, className, text) {
        var c = el(tag, className, text);
        c.setAttribute('data-column', column);
        return c;
    }

    function nightRow(n, detailId) {
        var tr = el('tr', 'night ' + n.state);
        tr.setAttribute('data-night', n.night);
        tr.setAttribute('data-state', n.state);
        var expanded = page.expanded.has(n.night);

        var nightCell = cell('th', 'night');
        nightCell.setAttribute('scope', 'row');
        var button = el('button', 'expand');
        button.type = 'button';
        button.setAttribute('aria-expanded', expanded ? 'true' : 'false');
        button.setAttribute('aria-controls', detailId);
        button.appendChild(el('span', 'arrow', expanded ? '▾' : '▸')).setAttribute('aria-hidden', 'true');
        button.appendChild(el('span', 'night-key', n.night));
        nightCell.appendChild(button);
        tr.appendChild(nightCell);

        var state = cell('td', 'state');
        state.appendChild(stateBadge(n.state));
        tr.appendChild(state);

        var total = n.exposures.length;
        var bar = cell('td', 'bar', 'bar-cell');
        if (total > 0) {
            bar.appendChild(countsBar(n.counts, total));
        }
        tr.appendChild(bar);

        var t = cell('td', 'total', 'num', total);
        t.setAttribute('data-count', 'total');
        tr.appendChild(t);
        STATES.forEach(function (s) {
            var c = cell('td', s, 'num count-' + s + (n.counts[s] ? '' : ' zero'), n.counts[s]);
            c.setAttribute('data-count', s);
            tr.appendChild(c);
        });
        var med = cell('td', 'median', 'num', n.medianRsyncToChecksum === null ? '—' : duration(n.medianRsyncToChecksum));
        med.setAttribute('data-median', n.medianRsyncToChecksum === null ? '' : String(n.medianRsyncToChecksum));
        tr.appendChild(med);
        var lat = cell('td', 'latency', 'num', n.medianLatency === null ? '—' : duration(n.medianLatency));
        lat.setAttribute('data-latency', n.medianLatency === null ? '' : String(n.medianLatency));
        tr.appendChild(lat);
        tr.appendChild(lastCell(n));

        tr.addEventListener('click', function (event) {
            // The button handles keyboard activation; a click anywhere on the row toggles.
            event.preventDefault();
            toggle(n, tr);
        });
        return tr;
    }

    /**
     * The time of the newest record; for a night that is not complete, also
     * how long ago it was (filled in by markAge) and the stale mark.
     */
    function lastCell(n) {
        var td = cell('td', 'last', 'last');
        if (n.last === null) {
            td.textContent = '—';
            return td;
        }
        times(td, n.last);
        if (n.state !== 'complete') {
            td.appendChild(el('span', 'age'));
            td.appendChild(el('span', 'stale-mark', '⚠ stale'));
        }
        return td;
    }

    /** Bring the age and the stale mark of a night row up to date with `now`. */
    function markAge(tr, n, now) {
        var stale = isStale(n, now);
        tr.setAttribute('data-stale', stale ? 'true' : 'false');
        tr.classList.toggle('stale', stale);
        var age = tr.querySelector('.age');
        if (age !== null) {
            age.textContent = ago(n.last, now);
            age.setAttribute('data-ago', String(now - n.last));
        }
        var mark = tr.querySelector('.stale-mark');
        if (mark !== null) {
            mark.hidden = !stale;
            mark.title = 'Not complete a day after the night ended (' +
                (nightEnd(n.night) === null ? '?' : utc(nightEnd(n.night))) + ' UTC).';
        }
    }

    /** Ages of the nights shown, and the count of stale nights, as of now. */
    function updateAges() {
        var now = Date.now();
        var byNight = new Map(page.nights.map(function (n) { return [n.night, n]; }));
        document.querySelectorAll('#night-rows > tr[data-night]').forEach(function (tr) {
            var n = byNight.get(tr.getAttribute('data-night'));
            if (n !== undefined) {
                markAge(tr, n, now);
            }
        });
        var stale = shownNights().filter(function (n) { return isStale(n, now); }).length;
        document.querySelector('[data-summary="nights-stale"]').textContent = String(stale);
        var unit = document.querySelector('[data-unit-for="nights-stale"]');
        unit.textContent = unit.getAttribute(stale === 1 ? 'data-one' : 'data-many');
        $('stale-note').hidden = stale === 0;
    }

    /** Show or hide the exposures of one night, in place, so focus stays put. */
    function toggle(n, row) {
        var button = row.querySelector('button.expand');
        var detail = document.getElementById(button.getAttribute('aria-controls'));
        if (page.expanded.has(n.night)) {
            page.expanded.delete(n.night);
            if (detail) {
                detail.remove();
            }
        } else {
            page.expanded.add(n.night);
            row.after(detailRow(n, button.getAttribute('aria-controls')));
        }
        var expanded = page.expanded.has(n.night);
        button.setAttribute('aria-expanded', expanded ? 'true' : 'false');
        button.querySelector('.arrow').textContent = expanded ? '▾' : '▸';
    }

    function stageCell(stage, row) {
        var td = cell('td', STAGES[stage], 'stage');
        td.setAttribute('data-stage', STAGES[stage]);
        if (row === null) {
            td.classList.add('missing');
            td.setAttribute('data-ok', '');
            td.textContent = 'not yet';
        } else if (row.ok) {
            td.classList.add('ok');
            td.setAttribute('data-ok', '1');
            td.appendChild(el('span', 'mark', '✓ ')).setAttribute('aria-hidden', 'true');
            times(td, row.ms);
        } else {
            td.classList.add('fail');
            td.setAttribute('data-ok', '0');
            td.appendChild(el('span', 'mark', '✗ FAILED '));
            times(td, row.ms);
        }
        return td;
    }

    /** The time the exposure's link appeared at Kitt Peak, or a dash. */
    function linkedCell(row) {
        var td = cell('td', 'linked', 'stage linked');
        td.setAttribute('data-stage', 'linked');
        if (row === null) {
            td.classList.add('missing');
            td.textContent = '—';
        } else {
            times(td, row.ms);
        }
        return td;
    }

    function detailRow(n, detailId) {
        var tr = el('tr', 'detail');
        tr.id = detailId;
        tr.setAttribute('data-detail-for', n.night);
        var td = el('td');
        td.colSpan = 10;
        tr.appendChild(td);
        if (n.exposures.length === 0) {
            td.appendChild(el('p', 'empty', 'No exposures recorded for this night.'));
            return tr;
        }
        td.appendChild(chart(n));

        var table = el('table', n.hasLinked ? 'exposures with-latency' : 'exposures');
        table.appendChild(el('caption', null, 'Exposures of night ' + n.night + ' (times UTC)'));
        var head = el('tr');
        // Nights with link times show the link time and the latency, from the
        // link to the checksum, instead of the time from rsync to checksum
        // (which the chart still shows).
        var columns = n.hasLinked ?
            [['expid', 'Exposure'], ['state', 'State'], ['linked', 'linked'], ['rsync', 'rsync'],
             ['checksum', 'checksum'], ['backup', 'backup'], ['latency', 'latency']] :
            [['expid', 'Exposure'], ['state', 'State'], ['rsync', 'rsync'], ['checksum', 'checksum'],
             ['backup', 'backup'], ['duration', 'rsync→checksum']];
        columns.forEach(function (h) {
            var th = cell('th', h[0], null, h[1]);
            th.setAttribute('scope', 'col');
            head.appendChild(th);
        });
        table.appendChild(el('thead')).appendChild(head);
        var body = table.appendChild(el('tbody'));
        n.exposures.forEach(function (e) {
            var row = el('tr', 'exposure ' + e.state);
            row.setAttribute('data-expid', e.expid);
            row.setAttribute('data-state', e.state);
            var th = cell('th', 'expid', 'expid');
            var url = exposureUrl(n.night, e.expid);
            if (url === null) {
                th.textContent = e.expid;
            } else {
                var link = th.appendChild(el('a', 'data-link', e.expid));
                link.href = url;
                link.title = 'Files of exposure ' + e.expid + ' of night ' + n.night +
                    ' on the DESI data server';
            }
            th.setAttribute('scope', 'row');
            row.appendChild(th);
            var state = cell('td', 'state');
            state.appendChild(stateBadge(e.state));
            row.appendChild(state);
            if (n.hasLinked) {
                row.appendChild(linkedCell(e.linked));
            }
            e.stages.forEach(function (s, stage) {
                row.appendChild(stageCell(stage, s));
            });
            if (n.hasLinked) {
                var lat = cell('td', 'latency', 'num', e.latency === null ? '—' : duration(e.latency));
                lat.setAttribute('data-latency', e.latency === null ? '' : String(e.latency));
                row.appendChild(lat);
            } else {
                row.appendChild(cell('td', 'duration', 'num', e.rsyncToChecksum === null ? '—' : duration(e.rsyncToChecksum)));
            }
            body.appendChild(row);
        });
        td.appendChild(table);
        // Clicks inside the details must not collapse the night.
        tr.addEventListener('click', function (event) {
            event.stopPropagation();
        });
        return tr;
    }

    /** Bar chart (inline SVG) of the time from rsync to checksum of each exposure. */
    function chart(n) {
        var figure = el('figure', 'chart');
        var points = n.exposures.filter(function (e) { return e.rsyncToChecksum !== null; });
        var caption = el('figcaption');
        figure.appendChild(caption);
        if (points.length === 0) {
            caption.textContent = 'No exposure of this night has both an rsync and a checksum time.';
            return figure;
        }
        var med = n.medianRsyncToChecksum;
        caption.textContent = 'Time from rsync to checksum, per exposure: median ' + duration(med) +
            ', longest ' + duration(Math.max.apply(null, points.map(function (e) { return e.rsyncToChecksum; }))) +
            ' (' + points.length + ' of ' + n.exposures.length + ' exposures have both times).';

        // As wide as the screen allows, so that the labels stay legible on a phone.
        var width = Math.max(300, Math.min(760, document.documentElement.clientWidth - 30));
        var height = 170;
        var left = 56, right = 10, top = 10, bottom = 24;
        var plotW = width - left - right, plotH = height - top - bottom;
        var max = niceMax(Math.max.apply(null, points.map(function (e) { return e.rsyncToChecksum; })));
        var root = svg('svg', {viewBox: '0 0 ' + width + ' ' + height, role: 'img',
                               'data-chart': 'rsync-checksum', preserveAspectRatio: 'xMinYMin meet'});
        var label = svg('title');
        label.textContent = caption.textContent;
        root.appendChild(label);

        // Axes and three horizontal guide lines: 0, half, max.
        [0, 0.5, 1].forEach(function (f) {
            var y = top + plotH * (1 - f);
            root.appendChild(svg('line', {x1: left, x2: width - right, y1: y, y2: y,
                                          'class': f === 0 ? 'axis' : 'guide'}));
            var tick = svg('text', {x: left - 6, y: y + 4, 'text-anchor': 'end', 'class': 'tick'});
            tick.textContent = shortDuration(max * f);
            root.appendChild(tick);
        });

        var step = plotW / points.length;
        var barW = Math.max(1, step * 0.8);
        points.forEach(function (e, i) {
            var h = plotH * e.rsyncToChecksum / max;
            var bar = svg('rect', {x: left + i * step + (step - barW) / 2, y: top + plotH - h,
                                   width: barW, height: Math.max(h, 0.5), 'class': 'chart-bar ' + e.state,
                                   'data-expid': e.expid});
            var tip = svg('title');
            tip.textContent = 'exposure ' + e.expid + ': ' + duration(e.rsyncToChecksum) + ' (' + e.state + ')';
            bar.appendChild(tip);
            root.appendChild(bar);
        });

        var y = top + plotH * (1 - med / max);
        root.appendChild(svg('line', {x1: left, x2: width - right, y1: y, y2: y, 'class': 'median'}));

        var first = svg('text', {x: left, y: height - 6, 'class': 'tick'});
        first.textContent = 'exposure ' + points[0].expid;
        root.appendChild(first);
        if (points.length > 1) {
            var last = svg('text', {x: width - right, y: height - 6, 'text-anchor': 'end', 'class': 'tick'});
            last.textContent = 'exposure ' + points[points.length - 1].expid;
            root.appendChild(last);
        }
        figure.appendChild(root);
        return figure;
    }

    // ------------------------------------------------------------------
    // Start.
    // ------------------------------------------------------------------

    function setShowAll(all) {
        page.showAll = all;
        $('show-all').setAttribute('aria-pressed', all ? 'true' : 'false');
        $('show-last').setAttribute('aria-pressed', all ? 'false' : 'true');
        if (page.nights.length > 0) {
            render();
        }
    }

    function start() {
        $('show-last').addEventListener('click', function () { setShowAll(false); });
        $('show-all').addEventListener('click', function () { setShowAll(true); });
        $('year').addEventListener('change', function () {
            var year = Number($('year').value);
            if (year) {
                selectYear(year);
            }
        });
        $('controls').addEventListener('submit', function (event) { event.preventDefault(); });
        discover();
        setInterval(updateAges, 60 * 1000);
    }

    start();
}());
