# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The transfer status web page, in a real headless Chromium.

The page files are copied from the package data into a directory of status
JSON files, which a real HTTP server on 127.0.0.1 serves like the web
directory at NERSC.
"""
import json
import os
import shutil
import sys
from datetime import datetime, timedelta, timezone
from importlib.resources import files

import pytest

from desitransfer import status
from desitransfer.status import _options

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - CI installs playwright with the test extras.
    expect = sync_playwright = None

CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update',
                 '--disable-sync']
PAGE_FILES = ('index.html', 'desi_transfer_status.js', 'desi_transfer_status.css')

#: The page probes for files starting from the current UTC year.
YEAR = datetime.now(timezone.utc).year

#: The years offered, as the original page offers them: this year back to 2018.
OFFERED = [str(y) for y in range(YEAR, 2017, -1)]

#: Rows written for an exposure in each state.
RSYNC, CHECKSUM, BACKUP = 0, 1, 2


def night_start(night):
    """Unix milliseconds of 03:00 UTC the day after `night` (evening at Kitt Peak)."""
    day = datetime.strptime(night, '%Y%m%d').replace(tzinfo=timezone.utc)
    return int((day + timedelta(days=1, hours=3)).timestamp() * 1000)


def exposure_rows(night, index, state):
    """Status rows, newest first, of exposure number `index` of `night`."""
    rsync = night_start(night) + index * 300_000
    checksum = rsync + 20_000 + index * 1000
    backup = night_start(night) + 17 * 3600_000
    if state == 'complete':
        return [[BACKUP, 1, backup], [CHECKSUM, 1, checksum], [RSYNC, 1, rsync]]
    if state == 'incomplete':
        return [[CHECKSUM, 1, checksum], [RSYNC, 1, rsync]]
    if state == 'failed':
        return [[CHECKSUM, 0, checksum], [RSYNC, 1, rsync]]
    raise ValueError(state)


def utc(ms):
    """What the page shows for a time."""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime('%Y-%m-%d %H:%M:%S')


def make_year(spec, first_expid):
    """Status of a year from ``{night: (night state, [exposure states])}``."""
    status, expid = {}, first_expid
    for night, (_, states) in spec.items():
        status[night] = {}
        for index, state in enumerate(states):
            status[night][str(expid)] = exposure_rows(night, index, state)
            expid += 1
    return status


C, I, F = 'complete', 'incomplete', 'failed'

#: This year: 13 nights, so that "last 10" and "all" differ, in both the
#: nights listed and the counts.
THIS_YEAR = {
    f'{YEAR}0113': (I, [C, C, I, I]),        # tonight: no backup yet
    f'{YEAR}0112': (F, [C, F, C]),           # one checksum failure
    f'{YEAR}0111': (C, [C, C, C, C, C]),
    f'{YEAR}0110': (C, [C, C]),
    f'{YEAR}0109': (C, [C]),
    f'{YEAR}0108': (C, [C, C, C]),
    f'{YEAR}0107': (C, [C, C]),
    f'{YEAR}0106': (I, [C, I]),
    f'{YEAR}0105': (C, [C]),
    f'{YEAR}0104': (C, [C, C]),
    f'{YEAR}0103': (F, [F, F, C]),           # older than the last 10
    f'{YEAR}0102': (C, [C]),
    f'{YEAR}0101': (I, [I]),
}
LAST_YEAR = {
    f'{YEAR - 1}1231': (C, [C, C]),
    f'{YEAR - 1}1230': (F, [C, F]),
}


def expected_summary(spec):
    """Counts of nights and exposures per state, as the summary shows them."""
    counts = {}
    for state in (C, I, F):
        counts[f'nights-{state}'] = sum(1 for s, _ in spec.values() if s == state)
        counts[f'exposures-{state}'] = sum(e.count(state) for _, e in spec.values())
    return counts


@pytest.fixture(scope='module')
def browser():
    """One headless Chromium for the module."""
    if sync_playwright is None:
        pytest.fail('the playwright Python package is not installed (pip install playwright)')
    if not os.path.exists(CHROMIUM):
        pytest.fail(f'{CHROMIUM} is missing (apt-get install chromium)')
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def watch(pg):
    """Record the requests and script errors of page `pg`."""
    pg.set_default_timeout(5000)
    pg.requested, pg.errors = [], []
    pg.on('request', lambda r: pg.requested.append(r.url))
    pg.on('pageerror', lambda e: pg.errors.append(str(e)))
    pg.on('console', lambda m: pg.errors.append(m.text)
          if 'Content Security Policy' in m.text else None)
    return pg


@pytest.fixture(scope='module')
def browser_page(browser):
    """One page for the module (each test navigates anew)."""
    pg = watch(browser.new_page(viewport={'width': 1200, 'height': 900}))
    yield pg
    pg.close()


@pytest.fixture
def page(browser_page):
    """The module's page, with its records of requests and script errors emptied."""
    browser_page.goto('about:blank')
    browser_page.requested.clear()
    browser_page.errors.clear()
    return browser_page


def status_directory(path, years):
    """A status directory: the page files and ``{year: content}``, content
    being a dict (written as JSON) or a string (written as is)."""
    path.mkdir()
    data = files('desitransfer') / 'data'
    for name in PAGE_FILES:
        with (data / name).open('rb') as src, open(path / name, 'wb') as dst:
            shutil.copyfileobj(src, dst)
    for year, content in years.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (path / f'desi_transfer_status_{year}.json').write_text(text)
    return path


def assert_only_local(pg, server):
    """Every request went to the test server, and no script failed."""
    assert pg.requested, 'no request recorded'
    outside = [u for u in pg.requested if not u.startswith(server.url) and u != 'about:blank']
    assert outside == [], f'requests outside {server.url}: {outside}'
    assert pg.errors == []


def night_row(pg, night):
    return pg.locator(f'tr[data-night="{night}"]')


def test_page_files_are_package_data():
    """The three files that the store installs exist and carry the license line."""
    data = files('desitransfer') / 'data'
    for name in PAGE_FILES:
        text = (data / name).read_text()
        assert 'Licensed under a 3-clause BSD style license' in text.splitlines()[0], name
    html = (data / 'index.html').read_text()
    assert 'desi_transfer_status.js' in html and 'desi_transfer_status.css' in html
    # The exposure links go to the data server: a link, not something loaded.
    meta = f'<meta name="desi-data-url" content="{status.DATA_URL}">'
    assert html.count(meta) == 1
    assert '//' not in html.replace(meta, '').replace('http://www.w3.org', ''), \
        'index.html refers to another site'


def test_status_page(page, tmp_path, http_directory):
    """Nights, colours, counts, toggle, expansion, chart and year switching."""
    this_year = make_year(THIS_YEAR, 12000)
    # A stage this page does not know is ignored, failure or not.
    this_year[f'{YEAR}0111']['12007'].insert(0, [7, 0, night_start(f'{YEAR}0111')])
    last_year = make_year(LAST_YEAR, 11000)
    server = http_directory(status_directory(tmp_path / 'status',
                                             {YEAR: this_year, YEAR - 1: last_year}))
    page.goto(server.url)
    assert page.evaluate('document.compatMode') == 'CSS1Compat'

    # Last 10 nights, newest first, each with its state as data, colour and words.
    rows = page.locator('tr[data-night]')
    expect(rows).to_have_count(10)
    nights = sorted(THIS_YEAR, reverse=True)
    assert rows.evaluate_all('rs => rs.map(r => r.dataset.night)') == nights[:10]
    for night in nights[:10]:
        state, exposures = THIS_YEAR[night]
        row = night_row(page, night)
        expect(row).to_have_attribute('data-state', state)
        expect(row.locator('.badge .label')).to_have_text(state)
        expect(row.locator('[data-count="total"]')).to_have_text(str(len(exposures)))
        for s in (C, I, F):
            expect(row.locator(f'[data-count="{s}"]')).to_have_text(str(exposures.count(s)))
    colours = {s: night_row(page, n).evaluate('r => getComputedStyle(r).backgroundColor')
               for n, s in ((f'{YEAR}0111', C), (f'{YEAR}0113', I), (f'{YEAR}0112', F))}
    assert colours == {C: 'rgb(228, 244, 231)', I: 'rgb(255, 244, 209)', F: 'rgb(251, 226, 227)'}

    # Summary of the nights shown.
    last10 = {n: THIS_YEAR[n] for n in nights[:10]}
    for name, value in expected_summary(last10).items():
        expect(page.locator(f'[data-summary="{name}"]')).to_have_text(str(value))
    expect(page.locator('[data-summary="nights-shown"]')).to_have_text('10')
    expect(page.locator('[data-summary="nights-total"]')).to_have_text('13')

    # All nights.
    page.click('[data-show="all"]')
    expect(rows).to_have_count(13)
    expect(night_row(page, f'{YEAR}0103')).to_have_attribute('data-state', F)
    for name, value in expected_summary(THIS_YEAR).items():
        expect(page.locator(f'[data-summary="{name}"]')).to_have_text(str(value))
    expect(page.locator('[data-show="all"]')).to_have_attribute('aria-pressed', 'true')
    page.click('[data-show="last"]')
    expect(rows).to_have_count(10)
    expect(night_row(page, f'{YEAR}0103')).to_have_count(0)

    # Expand the night with a failure: one row per exposure, times, failure mark.
    # Expanded with the keyboard; folded with the mouse below.
    night = f'{YEAR}0112'
    button = night_row(page, night).locator('button.expand')
    expect(button).to_have_attribute('aria-expanded', 'false')
    button.press('Enter')
    expect(button).to_have_attribute('aria-expanded', 'true')
    detail = page.locator(f'tr[data-detail-for="{night}"]')
    exposures = detail.locator('tr[data-expid]')
    expect(exposures).to_have_count(3)
    expids = sorted(this_year[night], key=int)
    assert exposures.evaluate_all('rs => rs.map(r => r.dataset.expid)') == expids
    # Each exposure links to its directory on the DESI data server, as in the original.
    links = exposures.locator('th[data-column="expid"] a')
    assert links.evaluate_all('as => as.map(a => [a.textContent, a.getAttribute("href")])') \
        == [[e, f'https://data.desi.lbl.gov/desi/spectro/data/{night}/{int(e):08d}/']
            for e in expids]
    for index, (expid, state) in enumerate(zip(expids, THIS_YEAR[night][1])):
        row = detail.locator(f'tr[data-expid="{expid}"]')
        expect(row).to_have_attribute('data-state', state)
        rows_by_stage = {r[0]: r for r in this_year[night][expid]}
        rsync = row.locator('[data-stage="rsync"]')
        expect(rsync).to_have_attribute('data-ok', '1')
        expect(rsync).to_contain_text(utc(rows_by_stage[RSYNC][2]))
        checksum = row.locator('[data-stage="checksum"]')
        expect(checksum).to_contain_text(utc(rows_by_stage[CHECKSUM][2]))
        backup = row.locator('[data-stage="backup"]')
        if state == F:
            expect(checksum).to_have_attribute('data-ok', '0')
            expect(checksum).to_contain_text('FAILED')
            expect(checksum).to_have_class('stage fail')
            expect(backup).to_have_text('not yet')
        else:
            expect(checksum).to_have_attribute('data-ok', '1')
            expect(checksum).not_to_contain_text('FAILED')
            expect(backup).to_contain_text(utc(rows_by_stage[BACKUP][2]))
    # The chart: one bar per exposure with both times, height by duration.
    bars = detail.locator('svg[data-chart="rsync-checksum"] rect.chart-bar')
    expect(bars).to_have_count(3)
    heights = bars.evaluate_all('bs => bs.map(b => Number(b.getAttribute("height")))')
    assert heights[0] < heights[1] < heights[2]
    expect(detail.locator('figcaption')).to_contain_text('median 21 s')
    expect(night_row(page, night).locator('[data-median]')).to_have_text('21 s')
    page.screenshot(path=str(tmp_path / 'status.png'), full_page=True)
    # A second click folds the night again.
    night_row(page, night).locator('[data-count="total"]').click()
    expect(detail).to_have_count(0)
    expect(button).to_have_attribute('aria-expanded', 'false')

    # The unknown stage 7 with ok 0 did not make the night fail.
    expect(night_row(page, f'{YEAR}0111')).to_have_attribute('data-state', C)

    # Last year, through the selector, which offers every year from 2018.
    expect(page.locator('#year option')).to_have_count(len(OFFERED))
    assert page.locator('#year option').all_inner_texts() == OFFERED
    page.select_option('#year', str(YEAR - 1))
    expect(rows).to_have_count(2)
    expect(night_row(page, f'{YEAR - 1}1230')).to_have_attribute('data-state', F)
    expect(night_row(page, f'{YEAR - 1}1231')).to_have_attribute('data-state', C)
    expect(page.locator('[data-summary="year"]')).to_have_text(str(YEAR - 1))
    for name, value in expected_summary(LAST_YEAR).items():
        expect(page.locator(f'[data-summary="{name}"]')).to_have_text(str(value))
    expect(page.locator('#message')).to_be_hidden()

    assert_only_local(page, server)


def test_malformed_json(page, tmp_path, http_directory):
    """A broken file gives a clear message, and other years still work."""
    server = http_directory(status_directory(tmp_path / 'status', {
        YEAR: '{"' + f'{YEAR}0105": {{"12000": [[0, 1, 17',
        YEAR - 1: make_year(LAST_YEAR, 11000)}))
    page.goto(server.url)
    message = page.locator('#message')
    expect(message).to_be_visible()
    expect(message).to_contain_text(f'desi_transfer_status_{YEAR}.json is not valid JSON')
    expect(message).to_have_attribute('data-kind', 'error')
    expect(page.locator('tr[data-night]')).to_have_count(0)
    expect(page.locator('#year option')).to_have_count(len(OFFERED))
    page.select_option('#year', str(YEAR - 1))
    expect(page.locator('tr[data-night]')).to_have_count(2)
    expect(message).to_be_hidden()
    assert_only_local(page, server)


@pytest.mark.parametrize('content', ['{}', '[]'])
def test_empty_year(page, tmp_path, http_directory, content):
    """A year without nights (``[]`` is what a reset store holds) says so."""
    server = http_directory(status_directory(tmp_path / 'status', {YEAR: content}))
    page.goto(server.url)
    expect(page.locator('#message')).to_contain_text(f'No data for {YEAR}')
    expect(page.locator('#nights')).to_be_hidden()
    assert_only_local(page, server)


def test_year_discovery(page, tmp_path, http_directory):
    """Every year from 2018 to this one is offered, as in the original page;
    the newest year with a file is shown; a year without one says so."""
    server = http_directory(status_directory(tmp_path / 'status', {
        YEAR - 1: make_year(LAST_YEAR, 11000),
        YEAR - 3: make_year({f'{YEAR - 3}0601': (C, [C])}, 100)}))
    page.goto(server.url)
    expect(page.locator('tr[data-night]')).to_have_count(2)
    expect(page.locator('#year')).to_have_value(str(YEAR - 1))
    expect(page.locator('#year')).to_have_attribute('data-search', 'done')
    assert page.locator('#year option').all_inner_texts() == OFFERED
    name = 'desi_transfer_status_{0}.json'.format
    probed = sorted((m, p.lstrip('/'), s) for m, p, s in server.requests if p.endswith('.json'))
    assert probed == sorted([('HEAD', name(YEAR), 404), ('HEAD', name(YEAR - 1), 200),
                             ('GET', name(YEAR - 1), 200)])
    # The gap does not hide the years before it.
    page.select_option('#year', str(YEAR - 3))
    expect(night_row(page, f'{YEAR - 3}0601')).to_have_attribute('data-state', C)
    # A year without a file: no records, said as a fact, not as an error.
    for year in (YEAR - 2, 2018):
        page.select_option('#year', str(year))
        message = page.locator('#message')
        expect(message).to_have_text(f'No records for {year}: there is no {name(year)} here.')
        expect(message).to_have_attribute('data-kind', 'info')
        expect(page.locator('#nights')).to_be_hidden()
        expect(page.locator('#summary')).to_be_hidden()
    page.select_option('#year', str(YEAR - 1))
    expect(page.locator('tr[data-night]')).to_have_count(2)
    expect(page.locator('#message')).to_be_hidden()
    assert_only_local(page, server)


def test_no_status_files(page, tmp_path, http_directory):
    """An empty directory says that no file was found, after a bounded search,
    and still offers every year."""
    server = http_directory(status_directory(tmp_path / 'status', {}))
    page.goto(server.url)
    expect(page.locator('#message')).to_contain_text('No transfer status files found')
    expect(page.locator('#year')).to_have_attribute('data-search', 'done')
    assert len([p for _, p, _ in server.requests if p.endswith('.json')]) == len(OFFERED)
    assert page.locator('#year option').all_inner_texts() == OFFERED
    expect(page.locator('#year')).to_be_enabled()
    assert_only_local(page, server)


def test_hostile_data(page, tmp_path, http_directory):
    """Keys are shown as text, never run; malformed rows are counted and ignored."""
    night = '<img src=x onerror="window.pwned=1">'
    expid = '<b id="bold">1</b>'
    server = http_directory(status_directory(tmp_path / 'status', {YEAR: {
        night: {expid: exposure_rows(f'{YEAR}0102', 0, C) + ['garbage', [0, 2, 'x']],
                '12': 'not a list'},
        f'{YEAR}0101': {'12': [[9, 1, 0], [0, 1, 'soon'], [1, 1, 1e300]],
                        '123456789': exposure_rows(f'{YEAR}0101', 0, C)},
        f'{YEAR}0100': 'not an object'}}))
    page.goto(server.url)
    rows = page.locator('tr[data-night]')
    expect(rows).to_have_count(2)
    assert rows.evaluate_all('rs => rs.map(r => r.dataset.night)') == [night, f'{YEAR}0101']
    expect(rows.first.locator('.night-key')).to_have_text(night)
    expect(rows.first).to_have_attribute('data-state', C)
    rows.first.click()
    expect(page.locator('tr[data-expid] .expid')).to_have_text(expid)
    assert page.locator('img, #bold').count() == 0
    assert page.evaluate('window.pwned') is None
    # Links only for a night of 8 digits and an exposure number of at most 8.
    expect(page.locator('tr[data-expid] a')).to_have_count(0)
    night_row(page, f'{YEAR}0101').click()
    detail = page.locator(f'tr[data-detail-for="{YEAR}0101"]')
    expect(detail.locator('tr[data-expid]')).to_have_count(2)
    expect(detail.locator('a')).to_have_count(1)
    expect(detail.locator('tr[data-expid="12"] a')).to_have_attribute(
        'href', f'{status.DATA_URL}{YEAR}0101/00000012/')
    expect(detail.locator('tr[data-expid="123456789"] .expid')).to_have_text('123456789')
    # Only unknown-stage rows (silently) and malformed rows (counted) are dropped.
    expect(night_row(page, f'{YEAR}0101')).to_have_attribute('data-state', I)
    expect(page.locator('#notes')).to_have_text(
        f'Ignored because malformed in desi_transfer_status_{YEAR}.json: '
        '1 night entry, 1 exposure entry, 4 status rows.')
    assert_only_local(page, server)


def run_status(monkeypatch, *args):
    """:command:`desi_transfer_status` in this process; its exit status."""
    monkeypatch.setattr(sys, 'argv', ['desi_transfer_status'] + list(args))
    return status.main()


def test_installed_data_url(page, tmp_path, http_directory, monkeypatch):
    """``desi_transfer_status -i --data-url URL`` writes the base of the
    exposure links into the installed page; a re-install without it keeps it."""
    d, night, mirror = tmp_path / 'status', f'{YEAR}0102', 'https://mirror.example.org/desi/raw'
    assert run_status(monkeypatch, '-d', str(d), '-i', '--data-url', mirror,
                      night, '12345', 'rsync') == 0
    assert run_status(monkeypatch, '-d', str(d), '-i', night) == 0
    assert (d / 'index.html').read_text().count(f'content="{mirror}/"') == 1
    server = http_directory(d)
    page.goto(server.url)
    night_row(page, night).click()
    expect(page.locator('tr[data-expid="12345"] a')).to_have_attribute(
        'href', f'{mirror}/{night}/00012345/')
    assert_only_local(page, server)


def test_unusable_data_url_in_page(page, tmp_path, http_directory):
    """A page whose data URL was edited by hand into anything but http(s) links nothing."""
    d = status_directory(tmp_path / 'status', {YEAR: make_year({f'{YEAR}0102': (C, [C])}, 12)})
    index = d / 'index.html'
    index.write_text(index.read_text().replace(status.DATA_URL, 'javascript:alert(1)//'))
    server = http_directory(d)
    page.goto(server.url)
    night_row(page, f'{YEAR}0102').click()
    expect(page.locator('tr[data-expid="12"] .expid')).to_have_text('12')
    expect(page.locator('tr[data-expid] a')).to_have_count(0)
    assert_only_local(page, server)


#: Bad values of --data-url, and what the error says.
BAD_DATA_URLS = {
    'javascript:alert(1)//': 'it is not an http:// or https:// URL',
    'https://x.org/"><script>alert(1)</script>': 'it may hold only',
    "https://x.org/a'onmouseover='alert(1)": 'it may hold only',
    'https://x.org/a b': 'it may hold only',
    'https://x.org/raw?q=1': 'it may hold only',
    'https://x.org/raw#top': 'it may hold only',
    'https://x.org/\u00fc': 'it may hold only',
    '': 'it may hold only',
    'https://x.org/%zz': 'a % is not followed by two hexadecimal digits',
    'ftp://x.org/raw': 'it is not an http:// or https:// URL',
    '//x.org/raw': 'it is not an http:// or https:// URL',
    'https://desi:secret@x.org/raw': 'it holds a user name or password',
    'https:///raw': 'its host or port is not valid',
    'https://x.org:99999/raw': 'its host or port is not valid',
}


def test_data_url_checked(tmp_path, monkeypatch, capsys, caplog):
    """A bad ``--data-url`` is one error line and exit status 2, and changes
    nothing; ``--data-url`` goes with ``-i`` only."""
    d = tmp_path / 'status'
    d.mkdir()
    status.install_page(str(d), 'https://mirror.example.org/raw')
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    night = f'{YEAR}0102'
    for url, why in BAD_DATA_URLS.items():
        for directory in (d, tmp_path / 'new'):
            with pytest.raises(SystemExit) as exit:
                run_status(monkeypatch, '-d', str(directory), '-i', '--data-url', url,
                           night, '1', 'rsync')
            assert exit.value.code == 2
            errors = [line for line in capsys.readouterr().err.splitlines() if 'error:' in line]
            assert len(errors) == 1 and errors[0].startswith(
                'desi_transfer_status: error: argument --data-url: '), errors
            assert f'is not a base URL for the exposure links: {why}' in errors[0], errors
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert not (tmp_path / 'new').exists()
    for args, message in (([night], '--data-url goes with -i/--install'),
                          (['--audit', str(YEAR)], '--data-url does not go with --audit')):
        with pytest.raises(SystemExit):
            run_status(monkeypatch, '-d', str(d), '--data-url', 'https://x.org/', *args)
        assert message in capsys.readouterr().err
    assert _options(['-d', str(d), '-i', '--data-url', 'HTTPS://x.org:8443/a%20b',
                     night]).data_url == 'https://x.org:8443/a%20b/'
    # A page whose data URL was spoilt by hand gets the default again.
    index = d / 'index.html'
    index.write_text(index.read_text().replace('https://mirror.example.org/raw/',
                                               'javascript:alert(1)//'))
    status.install_page(str(d))
    assert f'content="{status.DATA_URL}"' in index.read_text()
    assert 'it gets the default' in caplog.text


#
# Phone and desktop widths, with the page's clock set.
#
#: A phone (390 px wide, as an iPhone 12 to 15) and a desktop.
WIDTHS = {'phone': dict(viewport={'width': 390, 'height': 844}, is_mobile=True,
                        has_touch=True, device_scale_factor=2),
          'desktop': dict(viewport={'width': 1280, 'height': 900})}


@pytest.fixture
def screen(browser):
    """``screen(width, now)``: a new page of that width (a key of
    :data:`WIDTHS`) whose clock is fixed at `now`, an aware datetime."""
    contexts = []

    def open_page(width, now):
        context = browser.new_context(**WIDTHS[width])
        contexts.append(context)
        pg = watch(context.new_page())
        # The installed clock runs until paused: installed a little before
        # `now`, it is never past it when paused there, however slow the machine.
        pg.clock.install(time=now - timedelta(seconds=30))
        pg.clock.pause_at(now)
        return pg

    yield open_page
    for context in contexts:
        context.close()


#: Reads a table as a person does: the visible headers, and under each, the
#: visible cells of the rows (innerText: what is shown, not hidden text).
READ_TABLE = """(table, rowSelector) => {
    const shown = e => { const r = e.getBoundingClientRect();
                         return r.width > 0 && r.height > 0; };
    const span = e => { const r = e.getBoundingClientRect(); return [r.left, r.right]; };
    return {
        headers: Array.from(table.tHead.rows[0].cells).filter(shown)
            .map(h => ({text: h.innerText.trim(), span: span(h)})),
        rows: Array.from(table.tBodies[0].rows).filter(r => r.matches(rowSelector))
            .map(r => ({key: r.dataset.night || r.dataset.expid,
                        cells: Array.from(r.cells).filter(shown)
                            .map(c => ({text: c.innerText.trim(), span: span(c)}))}))
    };
}"""


def read_table(table, row_selector):
    """``({row key: {header text: cell text}}, [header texts])``; every cell
    must lie under exactly one header, and every header over one cell per row."""
    found = table.evaluate(READ_TABLE, row_selector)
    headers = [h['text'] for h in found['headers']]
    assert len(set(headers)) == len(headers), headers
    rows = {}
    for row in found['rows']:
        cells = {}
        for c in row['cells']:
            centre = (c['span'][0] + c['span'][1]) / 2
            over = [h['text'] for h in found['headers'] if h['span'][0] <= centre <= h['span'][1]]
            assert len(over) == 1, (row['key'], c['text'], over)
            assert over[0] not in cells, (row['key'], over[0])
            cells[over[0]] = c['text']
        assert list(cells) == headers, (row['key'], list(cells), headers)
        rows[row['key']] = cells
    return rows, headers


def last_record(night):
    """Unix milliseconds of the newest record of a night of THIS_YEAR."""
    state, exposures = THIS_YEAR[night]
    return max(row[2] for i, e in enumerate(exposures) for row in exposure_rows(night, i, e))


def utc_short(ms):
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime('%m-%d %H:%M')


def age(ms, now):
    """What the page says of how long ago `ms` was, at `now` (ms)."""
    minutes = (now - ms) // 60000
    if minutes < -1:
        return 'in the future'
    if minutes < 1:
        return 'just now'
    if minutes < 60:
        return f'{minutes} min ago'
    if minutes < 24 * 60:
        return f'{minutes // 60} h {minutes % 60} min ago'
    return f'{minutes // 1440} d {minutes // 60 % 24} h ago'


def night_ends(night):
    """Unix milliseconds when `night` ends: 19:00 UTC (noon at Kitt Peak) the next day."""
    return night_start(night) + 16 * 3600_000


#: The page's clock in the tests of widths: mid-day after the night of the 13th.
NOW = datetime(YEAR, 1, 15, 12, 0, 30, tzinfo=timezone.utc)


@pytest.mark.parametrize('width', ['phone', 'desktop'])
def test_cells_under_their_headers(screen, tmp_path, http_directory, width):
    """Each cell of both tables, as shown, lies under the header it belongs to."""
    phone = width == 'phone'
    this_year = make_year(THIS_YEAR, 12000)
    server = http_directory(status_directory(tmp_path / 'status', {YEAR: this_year}))
    pg = screen(width, NOW)
    pg.goto(server.url)
    expect(pg.locator('tr[data-night]')).to_have_count(10)
    now = int(NOW.timestamp() * 1000)

    rows, headers = read_table(pg.locator('#nights'), 'tr.night')
    if phone:
        assert headers == ['Night', 'State', 'Exp.', 'Last record']
    else:
        assert headers == ['Night', 'State', 'Exposures', 'Total', 'Complete', 'Incomplete',
                           'Failed', 'Median rsync→checksum', 'Last record (UTC)']
    assert list(rows) == sorted(THIS_YEAR, reverse=True)[:10]
    for night, cells in rows.items():
        state, exposures = THIS_YEAR[night]
        assert cells['Night'].endswith(night)
        assert cells['State'].split()[-1] == state
        assert cells['Exp.' if phone else 'Total'] == str(len(exposures))
        last = cells['Last record' if phone else 'Last record (UTC)'].splitlines()
        assert last[0] == (utc_short if phone else utc)(last_record(night))
        stale = state != C and now - night_ends(night) > 86400_000
        assert last[1:] == ([] if state == C else
                            [age(last_record(night), now)] + (['⚠ stale'] if stale else []))
        if not phone:
            assert cells['Exposures'] == ''
            for s, label in ((C, 'Complete'), (I, 'Incomplete'), (F, 'Failed')):
                assert cells[label] == str(exposures.count(s))
            assert cells['Median rsync→checksum'] in ('20 s', '21 s', '22 s', '23 s')

    night = f'{YEAR}0112'
    night_row(pg, night).locator('button.expand').click()
    rows, headers = read_table(pg.locator(f'tr[data-detail-for="{night}"] table.exposures'),
                               'tr[data-expid]')
    if phone:
        assert headers == ['Exposure', 'rsync', 'checksum', 'backup']
    else:
        assert headers == ['Exposure', 'State', 'rsync', 'checksum', 'backup', 'rsync→checksum']
    when = utc_short if phone else utc
    assert list(rows) == sorted(this_year[night], key=int)
    for (expid, cells), state in zip(rows.items(), THIS_YEAR[night][1]):
        stages = {row[0]: row for row in this_year[night][expid]}
        assert cells['Exposure'] == expid
        assert cells['rsync'] == f'✓ {when(stages[RSYNC][2])}'
        if state == F:
            failed = ['✗', 'FAILED', *when(stages[CHECKSUM][2]).split()]
            assert cells['checksum'].split() == failed
            assert cells['backup'] == 'not yet'
        else:
            assert cells['checksum'] == f'✓ {when(stages[CHECKSUM][2])}'
            assert cells['backup'] == f'✓ {when(stages[BACKUP][2])}'
        if not phone:
            assert cells['State'].split()[-1] == state
            seconds = (stages[CHECKSUM][2] - stages[RSYNC][2]) // 1000
            assert cells['rsync→checksum'] == f'{seconds} s'
    pg.screenshot(path=str(tmp_path / f'{width}.png'), full_page=True)
    assert_only_local(pg, server)


@pytest.mark.parametrize('width', ['phone', 'desktop'])
def test_important_columns_fit(screen, tmp_path, http_directory, width):
    """No sideways scrolling: every header and cell lies within the screen."""
    data = make_year(THIS_YEAR, 12000)
    # The widest contents: a night of hundreds of exposures, incomplete, a long age.
    night = f'{YEAR}0113'
    data[night] = {str(20000 + i): exposure_rows(night, i % 12, I) for i in range(345)}
    server = http_directory(status_directory(tmp_path / 'status', {YEAR: data}))
    pg = screen(width, datetime(YEAR, 1, 15, 0, 55, 0, tzinfo=timezone.utc))
    pg.goto(server.url)
    expect(pg.locator('tr[data-night]')).to_have_count(10)
    night_row(pg, f'{YEAR}0112').locator('button.expand').click()
    expect(pg.locator('table.exposures')).to_be_visible()
    expect(night_row(pg, f'{YEAR}0113').locator('.age')).to_have_text('20 h 59 min ago')
    viewport = WIDTHS[width]['viewport']['width']
    assert pg.evaluate('document.documentElement.clientWidth') == viewport
    assert pg.evaluate('document.documentElement.scrollWidth') == viewport
    scroll = pg.locator('.table-scroll')
    assert scroll.evaluate('e => e.scrollWidth') <= scroll.evaluate('e => e.clientWidth')
    right = pg.evaluate("""Math.max(...Array.from(
        document.querySelectorAll('#nights th, #nights td'))
        .map(e => e.getBoundingClientRect().right))""")
    assert 0 < right <= viewport
    pg.screenshot(path=str(tmp_path / f'{width}.png'), full_page=True)


def test_ages_and_stale_nights(screen, tmp_path, http_directory):
    """Nights not complete show how long ago their last record was; those not
    complete a day after they ended are marked stale, and the marks follow
    the clock."""
    now = datetime(YEAR, 3, 10, 12, 0, 30, tzinfo=timezone.utc)
    ms = int(now.timestamp() * 1000)
    tonight, last_night, older = f'{YEAR}0309', f'{YEAR}0308', f'{YEAR}0307'
    spec = {tonight: (I, [C, I, I]),      # last records at 03:05 and 03:10 UTC today
            last_night: (F, [C, F]),      # ended 17 h ago
            older: (I, [C, I]),           # ended 41 h ago: stale
            f'{YEAR}0306': (C, [C])}      # complete: no age
    data = make_year(spec, 100)
    # A record ahead of the page's clock is not "just now".
    future = f'{YEAR}0310'
    data[future] = {'200': [[RSYNC, 1, ms + 2 * 3600_000]]}
    # Tonight's first exposure is complete; its backup is old news, not the newest record.
    data[tonight]['100'] = [row if row[0] != BACKUP else [BACKUP, 1, ms - 20 * 3600_000]
                            for row in data[tonight]['100']]
    server = http_directory(status_directory(tmp_path / 'status', {YEAR: data}))
    pg = screen('desktop', now)
    pg.goto(server.url)
    expect(pg.locator('tr[data-night]')).to_have_count(5)

    def newest(night):
        return max(row[2] for rows in data[night].values() for row in rows)

    def marks():
        return {night: (night_row(pg, night).get_attribute('data-stale'),
                        night_row(pg, night).locator('.age').all_inner_texts(),
                        night_row(pg, night).locator('.stale-mark').is_visible())
                for night in spec}

    expect(night_row(pg, older)).to_have_attribute('data-stale', 'true')
    assert marks() == {tonight: ('false', [age(newest(tonight), ms)], False),
                       last_night: ('false', [age(newest(last_night), ms)], False),
                       older: ('true', [age(newest(older), ms)], True),
                       f'{YEAR}0306': ('false', [], False)}
    assert age(newest(tonight), ms) == '8 h 50 min ago'
    expect(night_row(pg, future).locator('.age')).to_have_text('in the future')
    expect(pg.locator('[data-summary="nights-stale"]')).to_have_text('1')
    expect(pg.locator('#stale-note')).to_have_text(
        '⚠ 1 night is stale: not complete a day after the night ended.')
    assert night_row(pg, older).evaluate('r => getComputedStyle(r.querySelector(".age")).color') \
        == 'rgb(176, 31, 42)'
    # A day later, without reloading: last night is stale too, tonight not yet.
    pg.clock.run_for(24 * 3600_000)
    later = ms + 24 * 3600_000
    expect(night_row(pg, last_night)).to_have_attribute('data-stale', 'true')
    assert marks() == {tonight: ('false', [age(newest(tonight), later)], False),
                       last_night: ('true', [age(newest(last_night), later)], True),
                       older: ('true', [age(newest(older), later)], True),
                       f'{YEAR}0306': ('false', [], False)}
    expect(pg.locator('#stale-note')).to_have_text(
        '⚠ 2 nights are stale: not complete a day after the night ended.')
    assert_only_local(pg, server)


#
# Latency: from the link at Kitt Peak to the verified checksum.
#
LINKED = 3


def linked(rows, seconds):
    """`rows` with a linked row `seconds` before the checksum."""
    checksum = next(row[2] for row in rows if row[0] == CHECKSUM)
    return rows + [[LINKED, 1, checksum - seconds * 1000]]


@pytest.mark.parametrize('width', ['phone', 'desktop'])
def test_latency(screen, tmp_path, http_directory, width):
    """The latency of each exposure and the median of each night are shown
    where link times exist; nights of older files show none."""
    phone = width == 'phone'
    data = make_year(THIS_YEAR, 12000)
    tonight, failed, older = f'{YEAR}0113', f'{YEAR}0112', f'{YEAR}0111'
    # Tonight: three exposures with link times, one without (recorded before).
    for expid, seconds in zip(sorted(data[tonight], key=int), (12, 75, 30, None)):
        if seconds is not None:
            data[tonight][expid] = linked(data[tonight][expid], seconds)
    # A failed checksum has no latency, and the night stays failed.
    for expid, seconds in zip(sorted(data[failed], key=int), (8, 9, 10)):
        data[failed][expid] = linked(data[failed][expid], seconds)
    server = http_directory(status_directory(tmp_path / 'status', {YEAR: data}))
    pg = screen(width, NOW)
    pg.goto(server.url)
    expect(pg.locator('tr[data-night]')).to_have_count(10)

    rows, headers = read_table(pg.locator('#nights'), 'tr.night')
    column = 'Lat.' if phone else 'Median latency'
    if phone:
        # The median latency takes the place of the number of exposures.
        assert headers == ['Night', 'State', 'Lat.', 'Last record']
    else:
        assert headers == ['Night', 'State', 'Exposures', 'Total', 'Complete', 'Incomplete',
                           'Failed', 'Median rsync→checksum', 'Median latency',
                           'Last record (UTC)']
    assert rows[tonight][column] == '30 s'
    assert rows[failed][column] == '9 s'
    assert rows[older][column] == '—'
    assert rows[tonight]['State'].split()[-1] == I and rows[failed]['State'].split()[-1] == F
    assert rows[older]['State'].split()[-1] == C

    night_row(pg, tonight).locator('button.expand').click()
    table = pg.locator(f'tr[data-detail-for="{tonight}"] table.exposures')
    rows, headers = read_table(table, 'tr[data-expid]')
    if phone:
        # The latency takes the place of the backup time.
        assert headers == ['Exposure', 'rsync', 'checksum', 'latency']
    else:
        # The latency takes the place of the time from rsync to checksum.
        assert headers == ['Exposure', 'State', 'linked', 'rsync', 'checksum', 'backup',
                           'latency']
    expids = sorted(data[tonight], key=int)
    assert [rows[e]['latency'] for e in expids] == ['12 s', '1 min 15 s', '30 s', '—']
    if not phone:
        link = {row[0]: row for row in data[tonight][expids[0]]}[LINKED][2]
        assert rows[expids[0]]['linked'] == utc(link)
        assert rows[expids[3]]['linked'] == '—'
    night_row(pg, failed).locator('button.expand').click()
    rows, _ = read_table(pg.locator(f'tr[data-detail-for="{failed}"] table.exposures'),
                         'tr[data-expid]')
    assert [r['latency'] for r in rows.values()] == ['8 s', '—', '10 s']
    # A night without link times: no such columns.
    night_row(pg, older).locator('button.expand').click()
    _, headers = read_table(pg.locator(f'tr[data-detail-for="{older}"] table.exposures'),
                            'tr[data-expid]')
    assert 'latency' not in headers and 'linked' not in headers
    # Everything fits the screen.
    viewport = WIDTHS[width]['viewport']['width']
    assert pg.evaluate('document.documentElement.scrollWidth') == viewport
    scroll = pg.locator('.table-scroll')
    assert scroll.evaluate('e => e.scrollWidth') <= scroll.evaluate('e => e.clientWidth')
    right = pg.evaluate("""Math.max(...Array.from(
        document.querySelectorAll('#nights th, #nights td'))
        .filter(e => e.getBoundingClientRect().width > 0)
        .map(e => e.getBoundingClientRect().right))""")
    assert 0 < right <= viewport
    pg.screenshot(path=str(tmp_path / f'latency-{width}.png'), full_page=True)
    assert_only_local(pg, server)
