"""The export benchmark's head-to-head on the tiny export: every label path timed, CTranslate2's score_batch among
them with how often it decides as the label path does (one timed round per batch size: seconds, no figures)."""

from __future__ import annotations

from benchmarks import export as bench


def test_the_head_to_head_times_ct2_scoring_beside_the_label_path(tiny_student_dir, tiny_export_dir, tmp_path):
    from ctranslate2.converters import TransformersConverter

    ct2_dir = tmp_path / "ct2"
    TransformersConverter(str(tiny_student_dir)).convert(str(ct2_dir), quantization="int8")
    duel = bench.head_to_head(
        {"ort-int8": str(tiny_export_dir), "ct2-int8": str(ct2_dir)},
        label_tokens=4,
        threads=1,
        rounds_batch1=3,
        rounds_batch16=3,
    )
    for batch in ("batch1", "batch16"):
        assert set(duel[batch]["p50_ms"]) >= {bench.LABEL_PATH, bench.CT2_SCORE, "ct2-int8 greedy"}
        same = duel[batch]["same_decision_as_label_path"]
        assert same[bench.LABEL_PATH] == 1.0 and 0.0 <= same[bench.CT2_SCORE] <= 1.0
        assert "ct2-int8 encoder + 1 step" not in same  # a one-token label is no decision
    targets = bench.issue_targets(duel)
    assert targets["speedup_vs_ct2_int8_score_batch16"] > 0
    table = bench.render_head_to_head({"tiny": duel}, {"tiny": targets})
    assert f"| tiny | {bench.CT2_SCORE} |" in table and "speedup_vs_ct2_int8_score_batch16" in table


def test_ct2_scoring_makes_the_label_paths_decision(tiny_student_dir, tiny_export_dir, tmp_path):
    """fp32 on both sides: summed log-probs over the same candidates pick the same label."""
    from ctranslate2.converters import TransformersConverter
    from transformers import AutoTokenizer

    from stepwise import tasks
    from stepwise.export.runtime import load_runtime, predict

    ct2_dir = tmp_path / "ct2"
    TransformersConverter(str(tiny_student_dir)).convert(str(ct2_dir))
    runtime = load_runtime(tiny_export_dir, threads=1)
    examples = tasks.load_split(runtime.task, "valid")[:32]
    ours = [p.label for p in predict(runtime, examples)]
    theirs = bench.ct2_score_labels(
        bench.ct2_translator(ct2_dir, 1, compute_type="float32"),
        AutoTokenizer.from_pretrained(tiny_student_dir),
        runtime.task,
        examples,
    )
    assert theirs == ours


def test_the_thread_comparison_times_every_thread_count_with_and_without_length_groups(tiny_export_dir):
    shapes = bench.thread_shapes(str(tiny_export_dir), thread_counts=[1, 2], rounds_batch1=3, rounds_batch16=3)
    names = {f"{t} thread(s), {how}" for t in (1, 2) for how in ("length groups", "one encoder call")}
    for batch in ("batch1", "batch16"):
        assert set(shapes[batch]["p50_ms"]) == names and shapes[batch]["rounds"] == 1
        # the encoder is part of the path's time, and it ran
        assert all(0 < shapes[batch]["encoder_p50_ms"][n] < shapes[batch]["p50_ms"][n] for n in names)
    assert set(shapes["cost_per_example_batch16_over_batch1"]) == names
    table = bench.render_thread_shapes({"tiny": shapes})
    assert table.count("| tiny |") == 4 and "goal <= 0.333" in table
