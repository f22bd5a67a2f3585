"""Write providers/aws/prices.csv from the offline data of the installed apache-libcloud and moto.

    python -m providers.aws.make_prices > providers/aws/prices.csv

Prices: libcloud/data/pricing.json, compute.ec2_linux[instance_type][region] (USD per instance-hour, Linux,
on demand, scraped by libcloud's contrib/scrape-ec2-prices.py from the AWS price list). Its scraper does not
filter on tenancy or capacity status, so a 0.0 there is the $0 "allocated capacity reservation" SKU, not a
price: it is written as empty (unknown). Keys without a size ("p3", "g5", ...) are Dedicated Host prices: skipped.
GPU model/count: moto's describe_instance_types data (GpuInfo), else DOCUMENTED below (AWS instance-type docs).
See providers/PRICES.md.
"""
import csv
import gzip
import json
import re
import sys
import time
from pathlib import Path

GPU_FAMILIES = ("p2", "p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en", "p6-b200", "p6-b300", "g2", "g3", "g3s",
                "g4dn", "g4ad", "g5", "g5g", "g6", "g6e", "g6f", "gr6", "gr6f", "g7", "g7e")
CPU_TYPES = ("c5.large", "c5.xlarge", "c5.2xlarge", "m5.large", "m5.xlarge", "t3.medium")
# Types moto 5.2.5 does not describe (previous generations, AMD): AWS "Accelerated computing instances" docs
# (docs.aws.amazon.com/ec2/latest/instancetypes/ac.html) and the p2/p3/g2/g3/g4ad product pages.
DOCUMENTED = {
    "p2.xlarge": ("K80", 1), "p2.8xlarge": ("K80", 8), "p2.16xlarge": ("K80", 16),
    "p3.2xlarge": ("V100", 1), "p3.8xlarge": ("V100", 4), "p3.16xlarge": ("V100", 8),
    "g2.2xlarge": ("K520", 1), "g2.8xlarge": ("K520", 4),
    "g3s.xlarge": ("M60", 1), "g3.4xlarge": ("M60", 1), "g3.8xlarge": ("M60", 2), "g3.16xlarge": ("M60", 4),
    "g4ad.xlarge": ("V520", 1), "g4ad.2xlarge": ("V520", 1), "g4ad.4xlarge": ("V520", 1),
    "g4ad.8xlarge": ("V520", 2), "g4ad.16xlarge": ("V520", 4),
}
# AWS prices these regions alike; a figure above the lowest of them is another SKU (Dedicated tenancy, +10%).
SAME_PRICE = ("us-east-1", "us-east-2", "us-west-2")
HEADER = ["provider", "region", "instance_type", "gpu_model", "gpu_count", "price_per_hour", "currency", "source",
          "date"]


def site_packages():
    import libcloud  # only to locate the installed data files

    return Path(libcloud.__file__).resolve().parent.parent


def short_gpu_name(gpu):
    name = gpu["Name"].replace(" ", "-")
    if name == "T4g":
        return "T4G"
    if name == "A100" and gpu.get("MemoryInfo", {}).get("SizeInMiB", 0) >= 80 * 1024:
        return "A100-80GB"
    return name


def gpu_of(itype, moto_types):
    info = (moto_types.get(itype) or {}).get("GpuInfo")
    if info and info.get("Gpus"):
        gpus = info["Gpus"]
        return short_gpu_name(gpus[0]), sum(g["Count"] for g in gpus)
    if itype in DOCUMENTED:
        return DOCUMENTED[itype]
    raise SystemExit(f"no GPU model/count for {itype}: add it to DOCUMENTED")


def type_key(itype):
    fam, size = itype.split(".", 1)
    m = re.match(r"(\d*)(.*)", size)
    return fam, m.group(2) != "metal", int(m.group(1) or 1) * (2 if "xlarge" in size else 1)


def rows():
    import libcloud

    sp = site_packages()
    data = json.loads((sp / "libcloud/data/pricing.json").read_text())
    moto_types = json.load(gzip.open(sp / "moto/ec2/resources/instance_types.json.gz"))
    date = time.strftime("%Y-%m-%d", time.gmtime(data["updated"]))
    src = f"apache-libcloud {libcloud.__version__} libcloud/data/pricing.json ec2_linux (AWS price list)"
    linux = data["compute"]["ec2_linux"]
    gpu_types = [t for t in linux if "." in t and t.split(".")[0] in GPU_FAMILIES]
    for itype in sorted(gpu_types, key=type_key) + [t for t in CPU_TYPES if t in linux]:
        model, count = gpu_of(itype, moto_types) if itype in gpu_types else ("", 0)
        prices = {r: p for r, p in linux[itype].items() if isinstance(p, (int, float)) and p > 0}
        low = min([prices[r] for r in SAME_PRICE if r in prices] or [0])
        for region, price in sorted(linux[itype].items()):
            if region not in prices:
                note = f": {price} there (scraper artifact), unknown"
            elif region in SAME_PRICE and prices[region] > 1.02 * low:
                note = f": {price} there, {price / low:.2f}x {min(SAME_PRICE, key=lambda r: prices.get(r, 1e9))} " \
                       "(Dedicated-tenancy SKU?), unknown"
            else:
                note = ""
            yield ["aws", region, itype, model, count, "" if note else repr(float(price)), "USD", src + note, date]


def main():
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(HEADER)
    out.writerows(rows())


if __name__ == "__main__":
    main()
