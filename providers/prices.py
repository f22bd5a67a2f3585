"""Price catalogs: one CSV per provider (``providers/<provider>/prices*.csv``), read on first use.

Columns: provider, region, instance_type, gpu_model, gpu_count, price_per_hour, currency, source, date.
An empty price is unknown and stays unknown (None), never 0. A provider looks its offering up when it
launches and the fleet records the price with its source and date, so a report on an old run uses the
price in force then, not the catalog of the day. Where each catalog comes from: providers/PRICES.md.
"""
from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent
COLUMNS = ("provider", "region", "instance_type", "gpu_model", "gpu_count", "price_per_hour", "currency", "source",
           "date")


@dataclass(frozen=True)
class Price:
    price_per_hour: Optional[float]
    currency: Optional[str]
    source: str
    date: str

    def record(self):
        """What a fleet keeps: ((key, value), ...) for Fleet.extra."""
        return (("price_source", self.source), ("price_date", self.date))


@functools.lru_cache(maxsize=None)
def catalog(provider, path=None):
    """{(region, instance_type): row} of a provider's catalog files (empty when it has none)."""
    files = [Path(path)] if path else sorted((ROOT / provider).glob("prices*.csv"))
    rows = {}
    for f in files:
        with open(f, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = set(COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{f}: price catalog without column(s) {', '.join(sorted(missing))} "
                                 f"(expected {', '.join(COLUMNS)})")
            for i, row in enumerate(reader, start=2):
                price = (row["price_per_hour"] or "").strip()
                try:
                    value = float(price) if price else None
                except ValueError:
                    raise ValueError(f"{f} line {i}: price_per_hour {price!r} is not a number "
                                     "(leave it empty when unknown)") from None
                if value is not None and value <= 0:
                    raise ValueError(f"{f} line {i}: price_per_hour {price} (unknown is empty, never 0)")
                rows[(row["region"], row["instance_type"])] = {**row, "price_per_hour": value}
    return rows


def lookup(provider, region, instance_type, path=None) -> Optional[Price]:
    """The catalog's price of one instance type in one region, or None when the catalog has no such row."""
    row = catalog(provider, path).get((region or "", instance_type))
    if row is None:
        return None
    return Price(row["price_per_hour"], row["currency"] or None if row["price_per_hour"] is not None else None,
                 row["source"], row["date"])
