"""pipeline.py: the README's main command, end to end on a small demo corpus, and its scoreboard."""
import json
import os
import shlex

import pytest

import eval_model
import pipeline
from cli import UserError
from demo_data import generate_demo


def test_pipeline_runs_every_stage_and_writes_the_scoreboard(tmp_path, capsys):
    data = tmp_path / "data"
    generate_demo(str(data), scale=0.03)
    pipeline.main(["--data_dir", str(data), "--out_dir", str(tmp_path / "run"), "--pretrain_epochs", "1",
                   "--sft_epochs", "1", "--distill_epochs", "1", "--eval_items", "8"])
    out = capsys.readouterr().out
    assert "=== stage 1/5: pretrain ===" in out and "=== stage 5/5: evaluation ===" in out
    assert "evaluating dpo (4/4)" in out
    chat = next(line for line in out.splitlines() if "python eval_model.py" in line)
    argv = shlex.split(chat.split("#")[0])[2:]  # the printed next step works as printed (no dead end)
    eval_model.main([*argv, "--prompt", "Hello", "--max_new_tokens", "3", "--temperature", "0"])
    assert capsys.readouterr().out.strip()
    board = json.load(open(tmp_path / "run" / "scoreboard.json"))
    assert [r["stage"] for r in board["rows"]] == ["unigram", "pretrain", "sft", "distill", "dpo"]
    for row in board["rows"][1:]:
        assert {"text_ppl", "chat_ppl", "sft_acc", "full_answers", "think_format", "reasoning_acc", "pref_acc"} <= set(row)
    for stage in pipeline.STAGES:
        assert os.path.exists(tmp_path / "run" / "checkpoints" / f"{stage}_final.pth")
    table = open(tmp_path / "run" / "scoreboard.md").read()
    assert table.startswith("| stage | held-out text ppl") and "| dpo |" in table


def test_data_dir_must_hold_every_training_file(tmp_path):
    (tmp_path / "pretrain.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(UserError, match=r"sft\.jsonl is missing"):
        pipeline.main(["--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "run")])


def test_unigram_perplexity_is_the_smoothed_frequency_model():
    # counts + 1 = [3, 2, 1] over 6: p(token 0) = 1/2, p(token 2) = 1/6
    assert pipeline.unigram_perplexity([0, 0, 1], [0], 3) == pytest.approx(2.0)
    assert pipeline.unigram_perplexity([0, 0, 1], [0, 2], 3) == pytest.approx((2 * 6) ** 0.5)


def test_scoreboard_table_formats_only_present_columns():
    table = pipeline.format_scoreboard([{"stage": "unigram", "text_ppl": 12.345},
                                        {"stage": "sft", "text_ppl": 3.0, "sft_acc": 0.5}])
    assert table.splitlines()[0] == "| stage | held-out text ppl | answer acc |"
    assert "| sft | 3.00 | 50.0% |" in table
