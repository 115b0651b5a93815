# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
=====================================
Benchmark of checksum verification
=====================================

Compare :func:`desitransfer.checksum.verify_checksum` with a reference (as
many threads as it uses, each streaming whole files through :mod:`hashlib`) and with
``sha256sum -c``, on a simulated exposure of four large files and a few small
ones, and measure the peak memory of a verification.

Usage::

    python benchmarks/bench_checksum.py                # 4 x 256 MiB
    python benchmarks/bench_checksum.py --size-mb 16   # quick run

The exit status is non-zero if the verification is more than 1.25 times
slower than the reference, uses more than 96 MiB, or finds an error.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from desitransfer.checksum import _workers, verify_checksum
from desitransfer.simulator import checksum_text, exposure_files

EXPID = '00012345'
MIB = 1 << 20


def options(args=None):
    parser = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]),
                                     description=__doc__.split('\n\n')[1])
    parser.add_argument('--size-mb', type=int, default=256, metavar='N',
                        help='Size of each large file in MiB (default %(default)s).')
    parser.add_argument('--large', type=int, default=4, metavar='N',
                        help='Number of large files (default %(default)s).')
    parser.add_argument('--repeat', type=int, default=5, metavar='N',
                        help='Keep the best of N timed runs (default %(default)s).')
    parser.add_argument('--max-ratio', type=float, default=1.25, metavar='R',
                        help='Fail above this time ratio to the reference '
                             '(default %(default)s).')
    parser.add_argument('--max-mib', type=float, default=96, metavar='M',
                        help='Fail above this peak memory in MiB (default %(default)s).')
    parser.add_argument('--tmpdir', metavar='DIR',
                        help='Create the exposure under DIR (default: the system default).')
    return parser.parse_args(args)


def make_exposure(directory, large, size_mb):
    """Write `large` random files of `size_mb` MiB, small files and the checksum file.

    Returns the path of the checksum file and the names of the data files.
    """
    small = exposure_files(EXPID, nfiles=3, size=4096)
    for name, data in small.items():
        with open(os.path.join(directory, name), 'wb') as f:
            f.write(data)
    lines = [checksum_text(small)]
    for i in range(large):
        name = f'desi-{EXPID}-{i:02d}.fits.fz'
        digest = hashlib.sha256()
        with open(os.path.join(directory, name), 'wb') as f:
            for _ in range(size_mb):
                block = os.urandom(MIB)
                digest.update(block)
                f.write(block)
        lines.append(f'{digest.hexdigest()}  {name}\n')
    checksum_file = os.path.join(directory, f'checksum-{EXPID}.sha256sum')
    with open(checksum_file, 'w') as f:
        f.write(''.join(lines))
    names = sorted(small) + [line.split('  ')[1].strip() for line in lines[1:]]
    return checksum_file, names


def reference_digest(path):
    """The reference: hashlib.sha256 updated with 1 MiB reads."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(MIB), b''):
            digest.update(block)
    return digest.hexdigest()


def reference(directory, names):
    """Hash every file with as many threads as verify_checksum uses."""
    with ThreadPoolExecutor(_workers(len(names))) as pool:
        return list(pool.map(reference_digest, [os.path.join(directory, n) for n in names]))


def sha256sum(directory, checksum_file):
    p = subprocess.run(['sha256sum', '--check', '--quiet', os.path.basename(checksum_file)],
                       cwd=directory, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f'sha256sum -c failed: {p.stdout}{p.stderr}')


def verify(checksum_file):
    errors = verify_checksum(checksum_file)
    if errors:
        raise RuntimeError(f'verify_checksum found errors:\n{errors}')


#: Run a command and print the ru_maxrss (kB) of its process, as RUSAGE_CHILDREN sees it.
LAUNCHER = """import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def child_maxrss_mib(code, *args):
    """Max RSS in MiB of a child running Python `code`.

    On Linux a child's ru_maxrss starts at the RSS of the process it was
    forked from, before exec.  The child is therefore started by a small
    launcher process, not by this one, whose RSS is larger than the quantity
    measured.
    """
    out = subprocess.run([sys.executable, '-c', LAUNCHER, sys.executable, '-c', code] +
                         list(args), check=True, capture_output=True, text=True).stdout
    return int(out) / 1024


def peak_memory(checksum_file):
    """Max RSS of a child that only imports the module, and of one that verifies."""
    baseline = child_maxrss_mib('import desitransfer.checksum')
    peak = child_maxrss_mib('import sys; from desitransfer.checksum import verify_checksum;'
                            'sys.exit(1 if verify_checksum(sys.argv[1]) else 0)',
                            checksum_file)
    return baseline, peak


def warm_up(directory, names):
    """Read every file once so that every method finds it in the page cache."""
    for name in names:
        with open(os.path.join(directory, name), 'rb') as f:
            while f.read(8 * MIB):
                pass


def best_times(methods, repeat):
    """Best wall time of each method; the methods alternate within each round."""
    best = {name: float('inf') for name in methods}
    for _ in range(repeat):
        for name, run in methods.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main():
    opts = options()
    directory = tempfile.mkdtemp(prefix='bench_checksum_', dir=opts.tmpdir)
    try:
        checksum_file, names = make_exposure(directory, opts.large, opts.size_mb)
        total = sum(os.path.getsize(os.path.join(directory, n)) for n in names) / MIB
        print(f'Exposure: {len(names):d} files, {total:.1f} MiB in {directory}; '
              f'{os.cpu_count()} CPUs; Python {sys.version.split()[0]}')
        warm_up(directory, names)
        baseline, peak = peak_memory(checksum_file)
        times = best_times({'verify_checksum': lambda: verify(checksum_file),
                            'reference': lambda: reference(directory, names),
                            'sha256sum -c': lambda: sha256sum(directory, checksum_file)},
                           opts.repeat)
    finally:
        shutil.rmtree(directory)
    ref = times['reference']
    print(f'Threads: {_workers(len(names)):d} for verify_checksum and the reference')
    print(f'Best of {opts.repeat:d} runs, warm page cache:')
    for name, t in times.items():
        print(f'  {name:<22s} {t:8.3f} s  {total / t:8.0f} MiB/s  ratio {t / ref:5.2f}')
    print(f'Peak memory (max RSS): verify_checksum child {peak:.1f} MiB, '
          f'import-only child {baseline:.1f} MiB, difference {peak - baseline:.1f} MiB')
    ratio = times['verify_checksum'] / ref
    failed = []
    if ratio > opts.max_ratio:
        failed.append(f'time ratio {ratio:.2f} > {opts.max_ratio}')
    if peak > opts.max_mib:
        failed.append(f'peak memory {peak:.1f} MiB > {opts.max_mib} MiB')
    print('FAIL: ' + '; '.join(failed) if failed else 'OK')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
