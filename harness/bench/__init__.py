"""Benchmarks: scripts that print figures (``python -m harness.bench.<name> --help``). Each first prints the
machine it ran on (``machine_line``), since a figure holds only for that machine.

- ``trainer``: samples/s of the 3DGAN trainer by rank count, batch and precision, against the CPU's peak;
- ``scaling``: measured vs predicted scaling efficiency on lab hosts behind links of different rates;
- ``provision``: seconds to provision and tear down a fleet on a provider;
- ``report``: seconds to aggregate and report a million sample rows;
- ``signals``: the Ctrl-C / kill -9 / dying-worker campaign (provider x phase -> exit code, seconds, leftovers);
- ``uncertainty``: the default sweep's 95 % intervals at 3 and 5 repetitions;
- ``step_parts``: where a multi-rank CPU step's time goes, against the scaling model;
- ``profile``: where one training step's time goes, by oneDNN primitive class (convolutions, reorders, ...)
  and by convolution shape with its GFLOP/s;
- ``sidebyside``: this checkout's trainer against another commit's, interleaved in one run, with intervals;
- ``precision``: whether bf16 trains the same physics (the validation metric against fp32's seed spread).
"""
from __future__ import annotations


def machine() -> dict:
    from gan import sysinfo as fingerprint

    return fingerprint.collect(with_frameworks=False)


def machine_line(fp=None) -> str:
    from gan import sysinfo as fingerprint

    return "# machine: " + fingerprint.summary(fp or machine())
