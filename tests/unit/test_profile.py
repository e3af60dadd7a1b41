"""The arithmetic of `make profile` and `make bench-colocated`: where a step's time goes from Horovod's
timeline and TensorFlow's trace, each thread's CPU by role, and the colocated comparison. Pure
functions on made-up traces; nothing here runs a job or asserts a speed."""

from __future__ import annotations

import json

import pytest

from benchmarks import colocated, threads
from benchmarks.profile import BUCKETS, RankTrace, attribute, intersect, parse_cycles, parse_timeline, subtract, union

MS = 1e-3


def test_interval_arithmetic():
    assert union([(3, 4), (0, 1), (0.5, 2), (4, 5), (6, 6)]) == [(0, 2), (3, 5)]
    assert intersect([(0, 2), (3, 5)], [(1, 4)]) == [(1, 2), (3, 4)]
    assert subtract([(0, 10)], [(1, 2), (5, 12)]) == [(0, 1), (2, 5)]
    assert subtract([(0, 1)], []) == [(0, 1)]


def _timeline(origin_us: int = 1_000_000) -> str:
    events = [
        {"name": "process_name", "ph": "M", "pid": 0, "args": {"start_time_since_epoch_in_micros": origin_us}},
        {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "grad_0"}},
        {"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": 5000, "pid": 1},
        {"ph": "X", "name": "1", "ts": 5100, "pid": 1, "dur": 0},
        {"ph": "E", "ts": 6500, "pid": 1},
        {"ph": "B", "name": "ALLREDUCE", "ts": 6600, "pid": 1},
        {"ph": "B", "name": "MEMCPY_IN_FUSION_BUFFER", "ts": 6700, "pid": 1},
        {"ph": "E", "ts": 7000, "pid": 1},
        {"ph": "B", "name": "MPI_ALLREDUCE", "ts": 7000, "pid": 1},
        {"ph": "E", "ts": 8500, "pid": 1},
        {"ph": "B", "name": "MEMCPY_OUT_FUSION_BUFFER", "ts": 8500, "pid": 1},
        {"ph": "E", "ts": 8800, "pid": 1},
        {"ph": "E", "ts": 9000, "pid": 1, "args": {"dtype": "float32"}},
    ]
    # Cycle marks (HOROVOD_TIMELINE_MARK_CYCLES=1) carry no pid.
    events += [{"ph": "i", "name": "CYCLE_START", "ts": ts, "s": "g"} for ts in (4000, 5000, 6000, 6600, 12000)]
    # Horovod writes the closing bracket only when it shuts down cleanly.
    return "[\n" + ",\n".join(json.dumps(e) for e in events) + ","


def test_timeline_spans_are_nested_phases_on_the_unix_clock():
    spans = parse_timeline(_timeline())
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"NEGOTIATE_ALLREDUCE", "ALLREDUCE", "MEMCPY_IN_FUSION_BUFFER", "MPI_ALLREDUCE", "MEMCPY_OUT_FUSION_BUFFER"}
    assert by_name["NEGOTIATE_ALLREDUCE"].tensor == "grad_0" and by_name["NEGOTIATE_ALLREDUCE"].top_level
    assert (by_name["MPI_ALLREDUCE"].start, by_name["MPI_ALLREDUCE"].end) == pytest.approx((1.007, 1.0085))
    assert not by_name["MPI_ALLREDUCE"].top_level and by_name["ALLREDUCE"].top_level


def test_each_instant_of_a_step_goes_to_one_bucket():
    # Rank 0 computes 5 ms and hands its gradient over; rank 1 computes 6 ms. Then the cycle ends
    # at 6.5 ms, the allreduce runs 6.6-9.0 ms, and Horovod calls back at 9.2 and 9.1 ms.
    t0 = 1.0
    spans = parse_timeline(_timeline())
    rank0 = RankTrace(steps=[(t0, t0 + 10 * MS)], ops=[(t0, t0 + 5 * MS)], enqueued=[t0 + 5 * MS], done=[t0 + 9.2 * MS])
    rank1 = RankTrace(steps=[(t0, t0 + 10 * MS)], ops=[(t0, t0 + 6 * MS)], enqueued=[t0 + 6 * MS], done=[t0 + 9.1 * MS])
    [zero, one] = attribute([rank0, rank1], spans, parse_cycles(_timeline()))
    assert zero["cycles_per_step"] == one["cycles_per_step"] == 4  # at 4, 5, 6 and 6.6 ms; 12 ms is after the step
    expected0 = {"compute": 5, "transport": 1.5, "fusion-buffer copies": 0.6, "Horovod bookkeeping": 0.3,
                 "waiting for the other rank": 1.0, "negotiation": 0.5, "hand-back": 0.2, "host, other": 0.9}  # fmt: skip
    assert zero["buckets_ms"] == pytest.approx(expected0)
    expected1 = {**expected0, "compute": 6, "waiting for the other rank": 0.0, "hand-back": 0.1, "host, other": 1.0}
    assert one["buckets_ms"] == pytest.approx(expected1)
    for row in (zero, one):
        assert sum(row["buckets_ms"].values()) == pytest.approx(row["step_ms"]) == pytest.approx(10.0)
        assert list(row["buckets_ms"]) == list(BUCKETS)


def test_compute_takes_precedence_over_communication():
    # An op still running while the allreduce moves bytes counts as compute, once.
    spans = parse_timeline(_timeline())
    rank = RankTrace(steps=[(1.0, 1.01)], ops=[(1.0, 1.008)], enqueued=[1.005], done=[1.0092])
    [row] = attribute([rank], spans)
    assert row["buckets_ms"]["compute"] == pytest.approx(8.0)
    assert row["buckets_ms"]["transport"] == pytest.approx(0.5)  # 8.0-8.5 ms: the rest ran under compute
    assert row["buckets_ms"]["fusion-buffer copies"] == pytest.approx(0.3)  # 8.5-8.8 ms only
    assert sum(row["buckets_ms"].values()) == pytest.approx(10.0)


def test_colocated_ratios_are_against_the_independent_jobs_of_the_same_loop():
    samples = {
        "independent_handwritten": [{"step_ms": 10.0, "cpu_ms": 9.0}, {"step_ms": 12.0, "cpu_ms": 9.5}, {"step_ms": 11.0, "cpu_ms": 9.2}],
        "stock": [{"step_ms": 30.0, "cpu_ms": 20.0}, {"step_ms": 28.0, "cpu_ms": 21.0}, {"step_ms": 35.0, "cpu_ms": 22.0}],
        "hvdclip_run_handwritten": [{"step_ms": 15.0, "cpu_ms": 12.0}, {"step_ms": 16.0, "cpu_ms": 12.0}, {"step_ms": 17.0, "cpu_ms": 12.0}],
        "hvdclip_run": [{"step_ms": 15.0, "cpu_ms": 12.0}],  # its reference did not run
    }
    rows = colocated.summarize(samples)
    assert rows["stock"]["vs_independent"] == pytest.approx(30.0 / 11.0) and rows["stock"]["met"] is False
    assert rows["hvdclip_run_handwritten"]["vs_independent"] == pytest.approx(16.0 / 11.0)
    assert rows["hvdclip_run_handwritten"]["met"] is True
    assert rows["hvdclip_run"]["vs_independent"] is None and rows["independent_handwritten"]["met"] is None
    assert (rows["stock"]["step_ms_min"], rows["stock"]["step_ms_max"], rows["stock"]["cpu_ms"]) == (28.0, 35.0, 21.0)
    table = colocated.to_markdown(rows, {"load": "0.1"})
    assert "| stock horovodrun, hand-written loop (the anchor) | 2 | 30.00 (28.00–35.00) | 21.00 | 2.73× | **missed** |" in table
    assert "| two independent 1-rank jobs, hand-written loop | 2 × 1 |" in table


def test_every_two_rank_variant_has_an_independent_reference_with_the_same_loop():
    for variant in colocated.VARIANTS.values():
        if variant.ranks == 2:
            reference = colocated.VARIANTS[variant.reference]
            assert (reference.loop, reference.ranks, reference.jobs) == (variant.loop, 1, 2)


@pytest.mark.parametrize(
    "stack, name, main, role",
    [
        ("#3 horovod::common::TimelineWriter::WriterLoop()", "python", False, "Horovod timeline writer"),
        ("#21 horovod::common::(anonymous namespace)::BackgroundThreadLoop(...)", "python", False, "Horovod background thread"),
        ("#1 gloo::transport::tcp::Loop::run()", "python", False, "Gloo TCP transport loop"),
        ("#8 Eigen::ThreadPoolTempl<tsl::thread::EigenEnvironment>::WorkerLoop(int)", "tf_Compute", False, "TensorFlow compute pool"),
        ("", "tf_Compute", False, "TensorFlow compute pool"),
        ("#0 epoll_wait", "python", True, "Python main thread"),
        ("#0 epoll_wait", "python", False, "other"),
    ],
)
def test_threads_are_named_by_their_stacks(stack, name, main, role):
    assert threads.role_of(stack, name, main) == role


def test_thread_usage_over_a_window_summed_by_role():
    before = {1: threads.ThreadUsage("python", 1.0, 10, 5), 2: threads.ThreadUsage("tf_Compute", 2.0, 0, 0)}
    after = {1: threads.ThreadUsage("python", 1.5, 30, 6), 2: threads.ThreadUsage("tf_Compute", 3.0, 4, 8),
             3: threads.ThreadUsage("tf_Compute", 0.5, 2, 2)}  # fmt: skip
    usage = threads.delta(before, after)
    assert usage[1] == threads.ThreadUsage("python", 0.5, 20, 1) and usage[3].cpu_s == 0.5
    rows = threads.summarize(usage, {1: "Horovod background thread", 2: "TensorFlow compute pool", 3: "TensorFlow compute pool"}, steps=100)
    assert list(rows) == ["TensorFlow compute pool", "Horovod background thread"]  # most CPU first
    assert rows["TensorFlow compute pool"] == {"cpu_ms_per_step": pytest.approx(15.0), "threads": 2, "busy_threads": 2,
                                               "voluntary_switches_per_step": 0.06, "involuntary_switches_per_step": 0.1}  # fmt: skip
    assert rows["Horovod background thread"]["voluntary_switches_per_step"] == 0.2
    # Without stacks, threads are grouped by name.
    assert set(threads.summarize(usage, None, steps=100)) == {"thread 'python'", "TensorFlow compute pool"}


def test_doors_are_judged_on_the_slower_ranks_windows_in_one_job():
    from benchmarks import doors

    rank0 = {"hvdclip": [0.010, 0.012, 0.011], "hvdclip_noclip": [0.0100, 0.0118, 0.0109], "handwritten": [0.0105, 0.0110, 0.0108],
             "own_loop": [0.010, 0.010, 0.010], "keras_fit": [0.012, 0.013, 0.012]}  # fmt: skip
    rank1 = {name: [w + (0.002 if (name, i) == ("handwritten", 0) else 0.0) for i, w in enumerate(ws)] for name, ws in rank0.items()}
    result = doors.judge([rank0, rank1])
    assert result["step_ms"]["hvdclip"] == pytest.approx(11.0)
    assert result["step_ms"]["handwritten"] == pytest.approx(11.0)  # windows 12.5, 11.0, 10.8: the slower rank's
    by_goal = {t["goal"]: t for t in result["targets"]}
    assert by_goal["clip-stage overhead ≤ 2 % of step time"]["ratio"] == pytest.approx(10.9 / 11.0)
    assert by_goal["clip-stage overhead ≤ 2 % of step time"]["met"] is True
    assert by_goal["Keras-fit door ≥ 0.97× the hand-written loop"]["ratio"] == pytest.approx(11.0 / 12.0)
    assert by_goal["Keras-fit door ≥ 0.97× the hand-written loop"]["met"] is False
    table = doors.to_markdown({"small": result}, {"load": "0"})
    assert "| Keras-fit door ≥ 0.97× the hand-written loop | ≥ 0.97 | 0.917× **missed** |" in table


def test_docs_performance_shows_the_last_results(tmp_path):
    from benchmarks import results_doc

    document = results_doc.DOC.read_text()
    assert results_doc.render(document) == document, (
        "docs/performance.md does not show benchmarks/results/*.md: run `make performance-doc`"
    )
    (tmp_path / "profile.md").write_text("### a heading\n\n| a |\n")
    page = "x\n<!-- results:profile -->\nold\n<!-- /results -->\n<!-- results:doors -->\n<!-- /results -->\n"
    assert results_doc.render(page, tmp_path) == (
        "x\n<!-- results:profile -->\n**a heading**\n\n| a |\n<!-- /results -->\n"
        "<!-- results:doors -->\n(No `benchmarks/results/doors.md` yet: run `make bench-doors`.)\n<!-- /results -->\n"
    )
