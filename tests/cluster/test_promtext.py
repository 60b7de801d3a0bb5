"""merge_expositions: real prometheus_client renderings in, prometheus_client's parser out."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tidegate.cluster.promtext import ExpositionError, merge_expositions

TRICKY = 'say "hi", {x}\\ and\nmore = a}b,c=\u2028'
REPLICA_A = 'SERVE_REPLICA::tidegate#bge#"abc123"\\'
REPLICA_B = "SERVE_REPLICA::tidegate#bge#def456"


def replica_text(requests: dict[str, int], latencies: list[float], loaded: float) -> str:
    registry = CollectorRegistry()
    counter = Counter("tidegate_requests", "Requests by model", ["model"], registry=registry)
    for model, count in requests.items():
        counter.labels(model).inc(count)
    histogram = Histogram("tidegate_latency_seconds", "Latency", registry=registry,
                          buckets=(0.1, 1.0))
    for latency in latencies:
        histogram.observe(latency)
    Gauge("tidegate_model_loaded", "1 if loaded", registry=registry).set(loaded)
    return generate_latest(registry).decode()


def ingress_text() -> str:
    registry = CollectorRegistry()
    Counter("tidegate_requests", "Requests by model", ["model"], registry=registry).labels(
        "ingress").inc(7)
    Gauge("tidegate_ingress_open", "Open connections", registry=registry).set(3)
    return generate_latest(registry).decode()


def parse(text: str) -> dict[str, Metric]:
    families = list(text_string_to_metric_families(text))
    names = [family.name for family in families]
    # The parser yields a family again when its samples are split: names must be unique.
    assert len(names) == len(set(names)), names
    return {family.name: family for family in families}


def values(family: Metric) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


@pytest.fixture
def merged() -> str:
    return merge_expositions([
        ("ingress", ingress_text()),
        (REPLICA_A, replica_text({"bge": 2, TRICKY: 5}, [0.05, 0.5, 3.0], 1.0)),
        (REPLICA_B, replica_text({"bge": 4}, [0.5], 0.0)),
    ])


def test_each_family_is_one_block_with_one_help_and_type(merged: str) -> None:
    lines = merged.splitlines()
    for name in ("tidegate_requests_total", "tidegate_latency_seconds",
                 "tidegate_model_loaded", "tidegate_ingress_open"):
        assert lines.count(f"# TYPE {name} " + {"tidegate_requests_total": "counter",
                                                 "tidegate_latency_seconds": "histogram"}
                           .get(name, "gauge")) == 1
        assert sum(line.startswith(f"# HELP {name} ") for line in lines) == 1
    assert merged.endswith("\n")
    families = parse(merged)
    # First appearance: the ingress's families, then the replicas' own.
    assert list(families) == [
        "tidegate_requests", "tidegate_requests_created", "tidegate_ingress_open",
        "tidegate_latency_seconds", "tidegate_latency_seconds_created", "tidegate_model_loaded",
    ]
    assert [families[name].type for name in families] == [
        "counter", "gauge", "gauge", "histogram", "gauge", "gauge"]
    assert families["tidegate_requests"].documentation == "Requests by model"


def test_every_sample_is_labelled_with_its_source(merged: str) -> None:
    families = parse(merged)
    assert values(families["tidegate_requests"]) == {
        ("tidegate_requests_total", (("model", "ingress"), ("replica", "ingress"))): 7.0,
        ("tidegate_requests_total", (("model", "bge"), ("replica", REPLICA_A))): 2.0,
        ("tidegate_requests_total", (("model", TRICKY), ("replica", REPLICA_A))): 5.0,
        ("tidegate_requests_total", (("model", "bge"), ("replica", REPLICA_B))): 4.0,
    }
    assert values(families["tidegate_ingress_open"]) == {
        ("tidegate_ingress_open", (("replica", "ingress"),)): 3.0}
    assert values(families["tidegate_model_loaded"]) == {
        ("tidegate_model_loaded", (("replica", REPLICA_A),)): 1.0,
        ("tidegate_model_loaded", (("replica", REPLICA_B),)): 0.0,
    }
    created = families["tidegate_requests_created"].samples
    assert sorted(s.labels["replica"] for s in created) == sorted(
        ["ingress", REPLICA_A, REPLICA_A, REPLICA_B])


def test_histograms_keep_their_buckets_per_replica(merged: str) -> None:
    histogram = values(parse(merged)["tidegate_latency_seconds"])
    a, b = (("replica", REPLICA_A),), (("replica", REPLICA_B),)
    assert histogram == {
        ("tidegate_latency_seconds_bucket", (("le", "0.1"), *a)): 1.0,
        ("tidegate_latency_seconds_bucket", (("le", "1.0"), *a)): 2.0,
        ("tidegate_latency_seconds_bucket", (("le", "+Inf"), *a)): 3.0,
        ("tidegate_latency_seconds_count", a): 3.0,
        ("tidegate_latency_seconds_sum", a): 3.55,
        ("tidegate_latency_seconds_bucket", (("le", "0.1"), *b)): 0.0,
        ("tidegate_latency_seconds_bucket", (("le", "1.0"), *b)): 1.0,
        ("tidegate_latency_seconds_bucket", (("le", "+Inf"), *b)): 1.0,
        ("tidegate_latency_seconds_count", b): 1.0,
        ("tidegate_latency_seconds_sum", b): 0.5,
    }


def test_the_source_label_comes_first_and_escaped() -> None:
    merged = merge_expositions([('a"b\\c\nd', 'x{k="v"} 1\n')], label="pod")
    assert merged == 'x{pod="a\\"b\\\\c\\nd",k="v"} 1\n'


def test_values_timestamps_and_spacing_are_kept() -> None:
    text = (
        "# A free comment\n"
        "#  TYPE  t  gauge\n"
        "t 1.0\n"
        't{a="1"} +Inf 1700000000000\n'
        't{ a = "2" , } NaN -5\n'
        't {a="3"}\t-1e-05\n'
        't{}   0\n'
        "\n"
    )
    merged = merge_expositions([("r", text)])
    assert merged == (
        "# TYPE t gauge\n"
        't{replica="r"} 1.0\n'
        't{replica="r",a="1"} +Inf 1700000000000\n'
        't{replica="r",a="2"} NaN -5\n'
        't{replica="r",a="3"} -1e-05\n'
        't{replica="r"} 0\n'
    )
    samples = parse(merged)["t"].samples
    assert [s.value for s in samples][1:] == [math.inf, pytest.approx(math.nan, nan_ok=True),
                                              -1e-05, 0]
    assert [s.timestamp for s in samples] == [None, 1700000000, -0.005, None, None]


def test_samples_belong_to_the_family_open_in_their_part() -> None:
    part_a = (
        "orphan 1\n"
        "# HELP h Some \\\\ doc\n"
        "# TYPE h histogram\n"
        'h_bucket{le="+Inf"} 2\n'
        "h_sum 3\n"
        "h_count 2\n"
        "stray_count 9\n"
        "h_sum 4\n"
    )
    # Part b declares h as a gauge and has no HELP: part a's HELP and TYPE win.
    part_b = "# TYPE h gauge\nh_count 1\norphan 2\n"
    merged = merge_expositions([("a", part_a), ("b", part_b)])
    assert merged == (
        'orphan{replica="a"} 1\n'
        'orphan{replica="b"} 2\n'
        "# HELP h Some \\\\ doc\n"
        "# TYPE h histogram\n"
        'h_bucket{replica="a",le="+Inf"} 2\n'
        'h_sum{replica="a"} 3\n'
        'h_count{replica="a"} 2\n'
        'h_count{replica="b"} 1\n'
        'stray_count{replica="a"} 9\n'
        'h_sum{replica="a"} 4\n'
    )


def test_an_existing_source_label_is_exported_as_prometheus_does() -> None:
    text = 'x{replica="mine",exported_replica="old",z="1"} 5\n'
    assert merge_expositions([("r1", text)]) == (
        'x{replica="r1",exported_exported_replica="mine",exported_replica="old",z="1"} 5\n')
    sample = parse(merge_expositions([("r1", 'x{replica="mine"} 5\n')]))["x"].samples[0]
    assert sample.labels == {"replica": "r1", "exported_replica": "mine"}


def test_empty_parts() -> None:
    assert merge_expositions([]) == ""
    assert merge_expositions([("a", ""), ("b", "\n# just a comment\n")]) == ""
    assert merge_expositions([("a", ""), ("b", "y 2")]) == 'y{replica="b"} 2\n'


@pytest.mark.parametrize(("line", "reason"), [
    ("x 1_000", "not a number"),
    ("x one", "not a number"),
    ("x 1 12.5", "not integer milliseconds"),
    ('x{a="1" b="2"} 1', "bad label list"),
    ('x{a="1",,} 1', "bad label list"),
    ('x{a="1} 1', "not a sample"),
    ('x{a="1",a="2"} 1', "appears twice"),
    ('{"x.y"} 1', "not a sample"),
    ('# TYPE "x.y" gauge', "not supported"),
    ("# HELP", "needs a metric name"),
    ("# TYPE x", "TYPE needs one type"),
    ("# TYPE x not a type", "TYPE needs one type"),
    ("x", "not a sample"),
])
def test_a_bad_line_names_its_part_and_line(line: str, reason: str) -> None:
    with pytest.raises(ExpositionError, match=reason) as caught:
        merge_expositions([("good", "ok 1\n"), ("bad", f"# HELP x doc\n\n{line}\n")])
    assert (caught.value.source, caught.value.line_number, caught.value.line) == (
        "bad", 3, line)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="given twice"):
        merge_expositions([("a", "x 1"), ("a", "x 2")])
    with pytest.raises(ValueError, match="empty source"):
        merge_expositions([("", "x 1")])
    for label in ("__replica", "re-plica", "1replica", ""):
        with pytest.raises(ValueError, match="not a Prometheus label name"):
            merge_expositions([("a", "x 1")], label=label)
