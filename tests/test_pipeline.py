"""pipeline.py: the README's main command, end to end on a small demo corpus, and its scoreboard."""
import json
import os
import shlex
from types import SimpleNamespace

import pytest

import eval_model
import pipeline
from cli import UserError
from dataset import load_tokenizer
from conftest import sharpened_tiny_model
from demo_data import TOOLS, demo_toolbox, generate_demo


def test_pipeline_runs_every_stage_and_writes_the_scoreboard(tmp_path, capsys):
    data = tmp_path / "data"
    generate_demo(str(data), scale=0.03)
    pipeline.main(["--data_dir", str(data), "--out_dir", str(tmp_path / "run"), "--pretrain_epochs", "1",
                   "--sft_epochs", "1", "--distill_epochs", "1", "--grpo_steps", "2", "--eval_items", "8",
                   "--tool_items", "6"])
    out = capsys.readouterr().out
    assert "=== stage 1/6: pretrain ===" in out and "=== stage 4/6: grpo ===" in out
    assert "=== stage 6/6: evaluation ===" in out and "evaluating dpo (5/5)" in out
    chat = next(line for line in out.splitlines() if "python eval_model.py" in line)
    argv = shlex.split(chat.split("#")[0])[2:]  # the printed next step works as printed (no dead end)
    eval_model.main([*argv, "--prompt", "Hello", "--max_new_tokens", "3", "--temperature", "0"])
    assert capsys.readouterr().out.strip()
    argv[argv.index("--model_mode") + 1] = "4"  # the GRPO model
    eval_model.main([*argv, "--prompt", "What is 2 + 3?", "--max_new_tokens", "3", "--temperature", "0"])
    assert capsys.readouterr().out.strip()
    board = json.load(open(tmp_path / "run" / "scoreboard.json"))
    assert [r["stage"] for r in board["rows"]] == ["unigram", "pretrain", "sft", "distill", "grpo", "dpo"]
    for row in board["rows"][1:]:
        assert {"text_ppl", "chat_ppl", "sft_acc", "full_answers", "think_format", "reasoning_acc", "sampled_acc",
                "no_think_acc", "pref_acc", "tool_parses", "tool_right_tool", "tool_right_args", "tool_acc"} <= set(row)
    for stage in pipeline.STAGES:
        assert os.path.exists(tmp_path / "run" / "checkpoints" / f"{stage}_final.pth")
    table = open(tmp_path / "run" / "scoreboard.md").read()
    assert table.startswith("| stage | held-out text ppl") and "| dpo |" in table
    assert "reasoning acc, sampled" in table and "reasoning acc, thinking off" in table and "right arguments" in table and "tool answer acc" in table


def test_sampled_answers_are_the_same_in_any_batch(tokenizer_dir):
    """The scoreboard's sampled replies come from streams keyed by (seed, problem, sample), so the batching does
    not change them, and another seed draws others."""
    tokenizer = load_tokenizer(tokenizer_dir)
    model = sharpened_tiny_model(len(tokenizer), 96, sharpen=2)
    conversations = [[{"role": "user", "content": f"What is {a} + {a}?"}] for a in range(5)]
    batched = pipeline.sampled_answers(model, tokenizer, conversations, 3, seed=1, max_new_tokens=6, batch_size=4)
    assert batched == pipeline.sampled_answers(model, tokenizer, conversations, 3, seed=1, max_new_tokens=6,
                                               batch_size=1)
    assert len(batched) == 5 and all(len(texts) == 3 for texts in batched)
    assert batched != pipeline.sampled_answers(model, tokenizer, conversations, 3, seed=2, max_new_tokens=6)
    assert len({t for texts in batched for t in texts}) > 5  # sampled, not all alike


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


def scripted_replies(conversations):
    """What a well-trained model would say next in each conversation (tools.tool_turns feeds results back)."""
    replies = []
    for turns in conversations:
        last = turns[-1]
        if last["role"] == "user":
            replies.append({
                "How many months old is Anna?":
                    '<tool_call>{"name": "lookup", "arguments": {"person": "Anna", "attribute": "age"}}</tool_call>',
                "Ask forever":
                    '<tool_call>{"name": "lookup", "arguments": {"person": "Ben", "attribute": "age"}}</tool_call>',
                "Break it": '<tool_call>{"name": lookup}</tool_call>',
                "What is Redhill famous for?": "Redhill is famous for its silk.",
            }[last["content"]])
        elif turns[0]["content"] == "Ask forever":
            replies.append(scripted_replies([turns[:1]])[0])
        elif len(turns) == 3:  # the age came back: months by the calculator
            replies.append(f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{last["content"]} * 12"}}}}'
                           "</tool_call>")
        else:
            replies.append(f"Anna is {last['content']} months old.")
    return replies


def test_tool_dialogues_execute_calls_feed_results_back_and_stop(monkeypatch):
    batches = []

    def answer(model, tokenizer, conversations, max_new_tokens, tools=None):
        assert tools == [TOOLS] * len(conversations)
        batches.append([[dict(t) for t in turns] for turns in conversations])
        return scripted_replies(conversations)

    monkeypatch.setattr(pipeline, "answer", answer)
    questions = ["How many months old is Anna?", "What is Redhill famous for?", "Break it", "Ask forever",
                 "too long " * 1000]
    records = [{"tools": TOOLS, "conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": "."}]}
               for q in questions]
    model = SimpleNamespace(config=SimpleNamespace(max_seq_len=1024))
    toolbox = demo_toolbox(seed=0)
    first, final, n_calls = pipeline.tool_dialogues(model, load_tokenizer(pipeline.tu.ROOT + "/tokenizer"), records,
                                                    toolbox, max_replies=4)
    age = toolbox.call("lookup", {"person": "Anna", "attribute": "age"})
    assert final[0] == f"Anna is {int(age) * 12} months old." and n_calls[0] == 2
    months = next(turns for turns in batches[1] if turns[0]["content"] == questions[0])
    assert [t["role"] for t in months] == ["user", "assistant", "tool"] and months[2]["content"] == age
    assert final[1] == "Redhill is famous for its silk." and n_calls[1] == 0
    assert final[2] == first[2] == '<tool_call>{"name": lookup}</tool_call>' and n_calls[2] == 0  # stands as text
    assert final[3] == "" and n_calls[3] == 4  # still calling after max_replies replies: no answer
    assert first[4] == final[4] == "" and n_calls[4] == 0  # does not fit the context: never asked
    assert [len(b) for b in batches] == [4, 2, 2, 1]  # each round batches only the conversations still going
