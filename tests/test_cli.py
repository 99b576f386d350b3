"""``python -m pidbox bench`` runs end to end and prints its table."""

import re
import subprocess
import sys


def test_bench_prints_three_rows_with_numbers(tmp_path):
    # cwd elsewhere: `python -m` puts the cwd first on sys.path, and the
    # source tree's pidbox/ has no compiled core in a fresh clone
    proc = subprocess.run(
        [sys.executable, '-m', 'pidbox', 'bench', '--nodes', '2',
         '--messages', '40', '--calls', '5', '--no-progress'],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r'^(compiled|pure|kombu)\s+(\d+)\s+([\d.]+)x\s+'
                     r'([\d.]+)\s+([\d.]+)$', line)
        if m:
            rows[m.group(1)] = [float(v) for v in m.groups()[1:]]
    import pidbox
    expected = {'pure', 'kombu'}
    if pidbox.IMPLEMENTATION == 'cython':
        expected.add('compiled')
    assert set(rows) == expected, proc.stdout
    assert all(value > 0 for row in rows.values() for value in row)


def test_bench_plot_without_matplotlib_says_what_to_install(tmp_path):
    code = ('import sys; sys.modules["matplotlib"] = None; '
            'from pidbox.cli import main; '
            f'sys.exit(main(["bench", "--plot", r"{tmp_path / "b.png"}"]))')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert "pip install 'pidbox[plot]'" in proc.stderr
