"""gpu_bench's report rows say what was measured: the bare loop apart from the make_trainer path, a cut
7B named as cut, and an MFU refused (with its reason) rather than computed against another device's peak."""

from __future__ import annotations

from benchmarks.gpu_bench import parse_args, to_protocol


def training_row(**over) -> dict:
    row = {"shape": "0.5b", "llm_layers": 24, "llm_layers_full_model": 24, "model_flops_per_s": 2e14,
           "tokens_per_s": 9000.0, "mfu": 0.2, "peak_flops": 989e12, "mfu_refused": None, "peak_memory_gb": 30.1}
    return {**row, **over}


def raw(training: list[dict]) -> dict:
    return {"device": "NVIDIA H100 80GB HBM3", "matmul_flops_per_s": 7e14, "training": training, "serving": None}


def test_rows_name_the_path_the_cut_and_the_refused_mfu() -> None:
    rows = to_protocol(raw([
        training_row(),
        training_row(path="make_trainer", zero_stage=3, tokens_per_s=6000.0, ratio_vs_bare_loop=0.667),
        training_row(shape="7b", llm_layers=8, llm_layers_full_model=28, mfu=None, peak_flops=None,
                     mfu_refused="no dense bf16 peak known for 'NVIDIA Mystery'"),
    ]))["rows"]
    labels = [r["label"] for r in rows]
    assert labels == ["train 0.5b, bare fwd/bwd loop", "train 0.5b, make_trainer (ZeRO-3, data pipeline)",
                      "train 7b, bare fwd/bwd loop (LLM cut to 8 of 28 layers)"]
    assert "MFU 0.200 of the 989 TFLOP/s spec peak" in rows[0]["notes"]
    assert "0.67x the bare loop's tokens/s" in rows[1]["notes"]
    assert "MFU refused: no dense bf16 peak known for 'NVIDIA Mystery'" in rows[2]["notes"]
    assert all(r["baseline"] == 700.0 for r in rows)  # every row against the same run's matmul


def test_trainer_rows_default_to_the_small_shape_and_can_be_turned_off() -> None:
    assert parse_args([]).trainer_shapes == ["0.5b"]
    assert parse_args(["--trainer-shapes"]).trainer_shapes == []
