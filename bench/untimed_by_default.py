"""pytest plugin (pyproject.toml: `-p untimed_by_default`): benchmarks run untimed unless asked.

Plain `pytest` (and `pytest bench/`) runs every benchmark once, untimed, as a
smoke test (what `--benchmark-disable` does), so that the one test command also
checks that the benchmarks still run.  `pytest bench/ --benchmark-only` times
them, and so does `--benchmark-enable` (or saving or writing the timings) in a
full run.  A plugin named in addopts rather than a conftest.py: it must set the
option before pytest-benchmark reads it, however pytest is started, and a
root conftest.py would put the checkout first on sys.path.
"""

TIMED = ("benchmark_only", "benchmark_enable", "benchmark_save", "benchmark_autosave", "benchmark_json")


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        return
    if not any(config.getoption(name) for name in TIMED):
        config.option.benchmark_disable = True
