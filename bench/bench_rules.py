"""Micro-benchmark for walle.platform.rules: compile time per rule, evaluation cost of 50 compiled rules
(2-7 clauses each) per device over 1,000 distinct devices, and rollout bucket throughput.

Run: .venv/bin/python bench/bench_rules.py  (the scale notes, section 4, measured 23 us/device for
compiled closures and 48 us/device for interpreted condition dicts on this machine)."""
import random
import statistics
import time

from walle.platform.rules import compile_rule, in_rollout, rollout_bucket

OSES = ["android", "ios", "harmony"]
REGIONS = ["cn", "sg", "us", "de", "jp", "br", "in"]
NETWORKS = ["wifi", "4g", "5g", "3g"]
MODELS = ["SM-G991", "SM-A515", "Pixel 7", "iPhone14,2", "MI 11", "HUAWEI P50", "OPPO A9"]
TAGS = ["beta", "vip", "new", "churn-risk", "tester", "heavy"]


def random_clause(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind == 0:
        return f'os == "{rng.choice(OSES)}"'
    if kind == 1:
        return f'app_version >= "{rng.randint(1, 3)}.{rng.randint(0, 12)}.0"'
    if kind == 2:
        regions = ", ".join(f'"{r}"' for r in rng.sample(REGIONS, rng.randint(1, 4)))
        return f"region in [{regions}]"
    if kind == 3:
        return f'network == "{rng.choice(NETWORKS)}"'
    if kind == 4:
        return f'not (device_model startswith "{rng.choice(MODELS)[:3]}")'
    if kind == 5:
        return f'"{rng.choice(TAGS)}" in tags'
    if kind == 6:
        return f'user_id not in ["u{rng.randrange(1000)}", "u{rng.randrange(1000)}"]'
    if kind == 7:
        return f'os_version < "{rng.randint(10, 17)}"'
    if kind == 8:
        return f'app_version satisfies "^{rng.randint(1, 3)}.{rng.randint(0, 9)}"'
    return f'(channel == "store" or channel == "beta{rng.randint(1, 3)}")'


def random_rule(rng: random.Random) -> str:
    return " and ".join(random_clause(rng) for _ in range(rng.randint(2, 7)))


def random_device(rng: random.Random, i: int) -> dict:
    return {
        "user_id": f"u{i}", "device_id": f"d{i:08d}", "os": rng.choice(OSES),
        "app_version": f"{rng.randint(1, 3)}.{rng.randint(0, 12)}.{rng.randint(0, 5)}",
        "os_version": f"{rng.randint(9, 17)}.{rng.randint(0, 3)}", "device_model": rng.choice(MODELS),
        "region": rng.choice(REGIONS), "network": rng.choice(NETWORKS),
        "host_version": f"1.{rng.randint(0, 9)}.0", "channel": rng.choice(["store", "beta1", "beta2", ""]),
        "tags": rng.sample(TAGS, rng.randint(0, 3)),
    }


def main() -> None:
    rng = random.Random(7)
    sources = [random_rule(rng) for _ in range(50)]
    devices = [random_device(rng, i) for i in range(1000)]

    rounds = 200
    t0 = time.perf_counter()
    for _ in range(rounds):
        rules = [compile_rule(s) for s in sources]
    compile_us = (time.perf_counter() - t0) / (rounds * len(sources)) * 1e6
    clauses = sum(len(r._leaves) for r in rules)
    print(f"compile: {compile_us:.1f} us/rule  (50 rules, {clauses} clauses, avg {clauses / 50:.1f}/rule)")

    matchers = [r.matches for r in rules]
    hits = sum(m(d) for d in devices for m in matchers)
    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        for d in devices:
            for m in matchers:
                m(d)
        samples.append((time.perf_counter() - t0) / len(devices) * 1e6)
    print(f"evaluate: {statistics.median(samples):.1f} us/device for 50 rules "
          f"(best {min(samples):.1f}, {len(devices)} distinct devices, avg {hits / len(devices):.2f} hits/device)")

    n = 200_000
    t0 = time.perf_counter()
    for i in range(n):
        rollout_bucket("task-a", "salt-1", f"u{i}")
    dt = time.perf_counter() - t0
    print(f"rollout_bucket: {n / dt / 1e3:.0f}k buckets/s ({dt / n * 1e6:.2f} us each)")
    t0 = time.perf_counter()
    inside = sum(in_rollout(10.0, "task-a", "salt-1", f"u{i}") for i in range(n))
    dt = time.perf_counter() - t0
    print(f"in_rollout(10%): {dt / n * 1e6:.2f} us each, {inside / n:.2%} of {n} ids in")


if __name__ == "__main__":
    main()
