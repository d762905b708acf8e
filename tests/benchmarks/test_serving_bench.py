"""A smoke run of the serving benchmark harness on the tiny fixture: the report's shape, not speed
(nothing here may depend on how fast the machine is, or how answers are chunked)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import mlflow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serving_bench.py"
SYSTEMS = ["ceiling", "engine", "slmflow-serve", "tutorial-mlflow", "flavor-mlflow"]


def load_harness():
    spec = importlib.util.spec_from_file_location("serving_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serving_bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_every_system_and_level(tiny_checkpoint: Path, tmp_path: Path) -> None:
    report = load_harness().main(["--size", "tiny", "--quick", "--systems", ",".join(SYSTEMS), "--out", str(tmp_path)])
    points = report["points"]
    assert [(p["system"], p["concurrency"]) for p in points] == [(s, c) for s in SYSTEMS for c in (1, 2)]
    for point in points:
        assert point["tokens_per_s"] > 0 and 0 < point["ttft_p50"] <= point["ttft_p95"]
        assert point["peak_rss_mb"] > 0
        assert point["ratios"]["vs ceiling"] > 0 and point["ratios"]["vs tutorial-mlflow"] > 0
        assert point["ratios"]["vs engine"] > 0
    for point in points:
        # Inter-chunk gaps exist only when an answer arrives in more than one piece, which on a fast
        # machine a whole 64-token answer may not (the server sends what piled up as one chunk).
        # The ceiling times every decoded token itself, so it always has them.
        if point["system"] == "ceiling" or point["itl_p50"] is not None:
            assert 0 <= point["itl_p50"] <= point["itl_p95"]
        else:
            assert point["itl_p95"] is None
    assert report["bandwidth"]["gbs"] > 0 and report["bandwidth"]["bytes_per_token"] > 0
    table = (tmp_path / "serving.md").read_text()
    assert table.count("\n| ") == 1 + len(points)  # header + one row per point
    assert (tmp_path / "serving.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "serving.json").read_text()) == json.loads(json.dumps(report))
    run = mlflow.search_runs(
        search_all_experiments=True, filter_string="attributes.run_name = 'bench-serving'", output_format="list"
    )[0]
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)} >= {"serving.md", "serving.png"}


def test_slmflow_bench_refuses_an_unknown_benchmark() -> None:
    from click.testing import CliRunner

    from slmflow.cli import main

    run = CliRunner().invoke(main, ["bench", "nosuch"])
    assert run.exit_code == 1 and run.stderr.startswith("error: no benchmark 'nosuch'")
