"""The benchmark's code path, with tiny sizes, so it cannot rot.

The harness is benchmarks/callcp_bench.py, outside the package; these tests
import it from there.  No timing is asserted anywhere: the numbers only have
to exist, be finite and be where the JSON says.  The smoke test runs
``python benchmarks/run.py --sizes tiny`` for real (servers and clients in
their own processes), with HOME pointed at a temporary directory, which must
stay free of callcp files (the clients pin the server key: no known-hosts
file is touched).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest

import callcp
from callcp import aio, sync

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as benchmarks/run.py has it
import callcp_bench as bench  # noqa: E402

IMPLEMENTATIONS = ("callcp", "ssl", "raw")
#: Scenarios that compare callcp with itself (no ssl or raw TCP), and their
#: two variants: baseline, variant.
CALLCP_ONLY = {"workers": ("workers=1", "workers=2"), "pool": ("bare", "pool")}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_metric(name: str, metric: Dict[str, Any], impls: Sequence[str]) -> None:
    assert metric["unit"] and metric["label"], name
    assert metric["better"] in ("higher", "lower"), name
    for impl in impls:
        samples = metric["samples"][impl]
        assert samples and all(_finite(v) for v in samples), (name, impl, samples)
        assert _finite(metric["median"][impl]), (name, impl)
        assert metric["min"][impl] <= metric["median"][impl] <= metric["max"][impl], (name, impl)
    assert metric["ratios"], name
    for key, ratio in metric["ratios"].items():
        num, den = key.split("/")
        if ratio is None:  # only where the ratio means nothing: a zero denominator
            assert metric["median"][den] <= 0 or metric["median"][num] < 0, (name, key)
        else:
            assert _finite(ratio) and ratio >= 0, (name, key, ratio)
            assert ratio == pytest.approx(metric["median"][num] / metric["median"][den]), name


@pytest.mark.timeout(150)  # about 20 s on a quiet 2-core machine
def test_bench_smoke_tiny(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLCP_")}
    env.update(HOME=str(home), PYTHONIOENCODING="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "run.py"),
            "--sizes",
            "tiny",
            "--reps",
            "1",
            "--json",
            str(out / "latest.json"),
            "--png",
            str(out / "latest.png"),
        ],
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=140,
        check=False,
    )
    stdout = result.stdout.decode("utf-8", "replace")
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr

    # The printed table: every implementation and both ratios.
    header = stdout.splitlines()[0]
    for column in ("callcp", "ssl TLS1.3", "raw TCP", "callcp/ssl", "callcp/raw"):
        assert column in header, header

    data = json.loads((out / "latest.json").read_text(encoding="utf-8"))
    assert data["sizes"]["name"] == "tiny" and data["sizes"]["reps"] == 1
    assert data["table"] in stdout
    expected = [s for s in bench.SCENARIOS if s != "concurrency"]
    expected += [f"concurrency_{n}" for n in data["sizes"]["concurrency"]]
    assert sorted(data["scenarios"]) == sorted(expected)
    assert bench.CALLCP_ONLY == CALLCP_ONLY
    for name, scenario in data["scenarios"].items():
        if name in CALLCP_ONLY:  # checked below
            continue
        assert scenario["supported"] is True, name
        assert scenario["metrics"], name
        for metric_name, metric in scenario["metrics"].items():
            _check_metric(f"{name}.{metric_name}", metric, list(IMPLEMENTATIONS))
            assert set(metric["ratios"]) == {"callcp/ssl", "callcp/raw"}
    concurrency = data["scenarios"][f"concurrency_{data['sizes']['concurrency'][0]}"]
    assert set(concurrency["metrics"]) == {
        "rate",
        "p50",
        "p99",
        "server_rss_per_conn",
        "open_seconds",
    }
    # CPU per round trip, each side measured in its own process.
    rtt_cpu = data["scenarios"]["rtt_cpu"]
    assert set(rtt_cpu["metrics"]) == {
        f"{flavour}_{what}"
        for flavour in ("sync", "aio")
        for what in ("rate", "client_cpu", "server_cpu")
    }
    assert rtt_cpu["extra"]["round_trips"] == data["sizes"]["rtt_count"] == 200
    for flavour, runs in rtt_cpu["extra"]["runs"].items():
        for impl in IMPLEMENTATIONS:
            (run,) = runs[impl]
            assert run["client"]["n"] == 200, (flavour, impl)
            for side in ("client", "server"):
                assert all(_finite(run[side][k]) for k in ("user", "sys")), (flavour, impl, side)
    # pool: a warm callcp pool vs one bare connection, callcp only, both flavours.
    pool = data["scenarios"]["pool"]
    assert pool["supported"] is True
    assert set(pool["metrics"]) == {
        f"{flavour}_{what}" for flavour in ("sync", "aio") for what in ("rate", "client_cpu")
    }
    for metric_name, metric in pool["metrics"].items():
        _check_metric(f"pool.{metric_name}", metric, CALLCP_ONLY["pool"])
        assert set(metric["samples"]) == {"bare", "pool"}, metric_name
        assert set(metric["ratios"]) == {"pool/bare"}, metric_name
        assert f"{metric['label']}: bare " in stdout, metric_name
    assert pool["extra"]["round_trips"] == 200
    assert set(pool["extra"]["runs"]) == {"sync", "aio"}
    for flavour, runs in pool["extra"]["runs"].items():
        (run,) = runs
        for variant in ("bare", "pool"):
            timing = run[variant]
            assert timing["n"] == 200 and timing["blocks"] == bench.POOL_BLOCKS, (flavour, run)
            assert all(_finite(timing[k]) for k in ("seconds", "user", "sys")), (flavour, run)
        # Warm: the pool's one connection served every request (and the warm-up).
        assert run["pool_stats"]["created"] == 1, (flavour, run)
        assert run["pool_stats"]["failed"] == 0, (flavour, run)
        pairs = pool["extra"]["paired_ratios"][flavour]
        assert len(pairs["rate"]) == 1 and all(_finite(v) for v in pairs["rate"])
    notes = [line for line in stdout.splitlines() if line.startswith("note (pool):")]
    assert len(notes) == 2 and all("Pool.request on a warm pool" in n for n in notes), notes
    assert "pool/bare" in stdout
    assert set(data["scenarios"]["stream"]["metrics"]) == {
        "throughput",
        "sender_peak_rss",
        "receiver_peak_rss",
    }

    # workers=N: measured where the build has it, else said so (no numbers).
    workers = data["scenarios"]["workers"]
    if bench.workers_support() is None:
        assert workers["supported"] is False and not workers["metrics"]
        assert bench.WORKERS_UNSUPPORTED in stdout
    else:
        assert workers["supported"] is True
        _check_metric("workers.rate", workers["metrics"]["rate"], CALLCP_ONLY["workers"])

    machine = (out / "machine.md").read_text(encoding="utf-8")
    for field in ("cpu", "cores", "memory", "kernel", "python", "cryptography", "date"):
        assert f"| {field} |" in machine, machine
    png = out / "latest.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists() and "matplotlib is not installed" in stderr
    assert not (home / ".callcp").exists(), "the benchmark touched ~/.callcp"


# ------------------------------------------------------------ pure helpers


def _metric(samples: Dict[str, List[float]], higher: bool = True) -> bench.Metric:
    m = bench.Metric("m", "a metric", "req/s", higher)
    for impl, values in samples.items():
        for v in values:
            m.add(impl, v)
    return m


def test_medians_and_ratios() -> None:
    m = _metric({"callcp": [3.0, 1.0, 2.0], "ssl": [4.0, 4.0], "raw": [0.0]})
    assert m.median("callcp") == 2.0
    assert m.median("ssl") == 4.0
    assert m.ratio("callcp", "ssl") == 0.5
    assert m.ratio("callcp", "raw") is None  # no ratio to a zero
    assert m.median("nobody") is None
    data = m.to_json()
    assert data["samples"]["callcp"] == [3.0, 1.0, 2.0]
    assert data["ratios"] == {"callcp/ssl": 0.5, "callcp/raw": None}
    assert data["min"]["callcp"] == 1.0 and data["max"]["callcp"] == 3.0


def test_percentile() -> None:
    values = [float(i) for i in range(101)]
    assert bench._percentile(values, 50) == 50.0
    assert bench._percentile(values, 99) == 99.0
    assert bench._percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(bench.BenchError):
        bench._percentile([], 50)


def test_table_shows_medians_ranges_and_ratios() -> None:
    report = bench.Report(bench.SIZES["tiny"], [], {}, "2026-01-01T00:00:00+00:00")
    scenario = bench.ScenarioResult("rtt_sync", "round trips")
    metric = scenario.metric("rate", "64 B round trips", "req/s", True)
    for impl, values in {"callcp": [900.0, 1000.0, 1100.0], "ssl": [2000.0], "raw": [0.0]}.items():
        for v in values:
            metric.add(impl, v)
    workers = bench.ScenarioResult("workers", "workers=1 vs 2", supported=False)
    workers.extra["note"] = bench.WORKERS_UNSUPPORTED
    report.scenarios = [scenario, workers]
    table = report.table()
    row = next(line for line in table.splitlines() if line.startswith("64 B round trips"))
    assert "1,000 [900-1,100]" in row
    assert "0.50x" in row and row.rstrip().endswith("-")
    assert f"workers=1 vs 2: {bench.WORKERS_UNSUPPORTED}" in table


def test_callcp_only_scenarios_are_one_line_per_metric_with_their_ratio() -> None:
    report = bench.Report(bench.SIZES["tiny"], [], {}, "2026-01-01T00:00:00+00:00")
    pool = bench.ScenarioResult("pool", "pool vs bare")
    ratios = (("pool", "bare"),)
    rate = pool.metric("sync_rate", "callcp.Pool vs bare conn: rt", "rt/s", True, ratios=ratios)
    cpu = pool.metric(
        "sync_client_cpu", "callcp.Pool vs bare conn: cpu", "us", False, ratios=ratios
    )
    for v in (9000.0, 10000.0, 11000.0):
        rate.add("bare", v)
        rate.add("pool", v * 0.95)
    for v in (40.0, 41.0, 42.0):
        cpu.add("bare", v)
        cpu.add("pool", v + 2.0)
    report.scenarios = [pool]
    assert rate.to_json()["ratios"] == {"pool/bare": pytest.approx(0.95)}
    lines = report.table().splitlines()
    assert lines[0].startswith("callcp.Pool vs bare conn")  # (no ssl/raw header over them)
    assert (
        "callcp.Pool vs bare conn: rt: bare 10,000 [9,000-11,000], pool 9,500 [8,550-10,450] "
        "rt/s; pool/bare 0.95x" in lines
    )
    assert (
        "callcp.Pool vs bare conn: cpu: bare 41.0 [40.0-42.0], pool 43.0 [42.0-44.0] us; "
        "pool/bare 1.05x (lower is better)" in lines
    )
    assert any(line.startswith("callcp-only lines") for line in lines)

    # The note: ratios of the medians, the range of the per-repetition
    # ratios, and the verdicts.
    run = {
        "bare": {"n": 100, "seconds": 0.010, "user": 0.004, "sys": 0.0},
        "pool": {"n": 100, "seconds": 0.012, "user": 0.004, "sys": 0.001},
    }
    pairs = bench._paired_ratios([run, run])
    assert pairs["rate"] == [pytest.approx(10 / 12)] * 2
    assert pairs["client_cpu"] == [pytest.approx(1.25)] * 2
    note = bench._pool_verdict("callcp.Pool", "blocking", rate, cpu, pairs)
    assert "round trips/s 0.95x [reps 0.83-0.83] (within 10%)" in note
    assert "client CPU per request 1.05x [reps 1.25-1.25], +2.0 us (within 10%)" in note
    slow = bench.Metric("r", "r", "rt/s", True, ratios=ratios)
    slow.add("bare", 100.0)
    slow.add("pool", 80.0)
    note = bench._pool_verdict("p", "blocking", slow, cpu, pairs)
    assert "round trips/s 0.80x [reps 0.83-0.83] (NOT within 10%)" in note


def test_the_pool_scenario_alternates_its_blocks() -> None:
    blocks = bench._pool_blocks(205, "bare")
    assert len(blocks) == 2 * bench.POOL_BLOCKS
    for variant in ("bare", "pool"):
        assert sum(size for v, size in blocks if v == variant) == 205
    firsts = [blocks[i][0] for i in range(0, len(blocks), 2)]
    assert firsts[:4] == ["bare", "pool", "bare", "pool"]  # ABBA
    assert [blocks[i] for i in (0, 1)] == [("bare", 11), ("pool", 11)]
    assert bench._pool_blocks(205, "pool")[0] == ("pool", 11)
    assert len(bench._pool_blocks(3, "bare")) == 6  # (no empty blocks)


def test_workers_support_follows_the_signatures() -> None:
    def takes_workers(fn: Any) -> bool:
        try:
            return "workers" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return False

    expected: Optional[str] = None
    options = getattr(callcp, "ServerOptions", None)
    if options is not None and "workers" in {f.name for f in dataclasses.fields(options)}:
        expected = "sync"  # the options as one typed object (serve() takes **options)
    elif takes_workers(sync.serve) or takes_workers(sync.Server):
        expected = "sync"
    elif takes_workers(aio.serve) or takes_workers(aio.Server):
        expected = "aio"
    assert bench.workers_support() == expected


def test_unknown_scenario_and_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(bench.BenchError, match="unknown scenario"):
        bench.run(bench.Options(only=["nope"], json_path=tmp_path / "x.json", png_path=None))
    with pytest.raises(bench.BenchError, match="unknown sizes"):
        bench.run(bench.Options(sizes="huge", json_path=tmp_path / "x.json", png_path=None))
    assert not (tmp_path / "x.json").exists()


def test_scenarios_are_named_with_underscores_or_dashes() -> None:
    args = bench.build_parser().parse_args(["--only", "rtt-cpu", "rtt_sync", "--rtt-count", "50"])
    assert args.only == ["rtt_cpu", "rtt_sync"]
    options = bench.options_for(args)
    assert options.rtt_count == 50 and options.only == ["rtt_cpu", "rtt_sync"]


def test_results_go_to_the_local_directory_unless_saved(tmp_path: Path) -> None:
    parse = bench.build_parser().parse_args
    local = bench.options_for(parse([]))
    assert local.json_path == BENCHMARKS / "results" / "local" / "latest.json"
    assert local.png_path == BENCHMARKS / "results" / "local" / "latest.png"
    saved = bench.options_for(parse(["--save", "--quick"]))
    assert saved.json_path == BENCHMARKS / "results" / "latest.json"
    assert saved.png_path == BENCHMARKS / "results" / "latest.png"
    assert saved.command.endswith("--sizes quick --save")
    chosen = bench.options_for(parse(["--json", str(tmp_path / "a.json"), "--save"]))
    assert chosen.json_path == tmp_path / "a.json"
    # A partial run never replaces the committed (full) results.
    with pytest.raises(SystemExit) as refused:
        bench.main(["--save", "--only", "rtt_cpu"])
    assert refused.value.code == 2
    ignored = (BENCHMARKS / ".gitignore").read_text(encoding="utf-8").split()
    assert "/results/local/" in ignored


def test_the_package_does_not_import_the_harness() -> None:
    code = "import sys, callcp.cli; print(sorted(m for m in sys.modules if 'bench' in m))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
    assert importlib.util.find_spec("callcp.bench") is None
