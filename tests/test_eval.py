"""eval_model.py (chat CLI and its reusable pieces), eval_ppl.py (sliding-window perplexity, bits per byte) and
eval_bench.py (multiple choice by log-likelihood, exact match) on a tiny random model saved like a trained one."""
import copy
import io
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, sample_sentence, sharpened_tiny_model, write_jsonl

import eval_bench
import eval_model
import eval_ppl
from dataset import DataError, encode_chat
from lora import apply_lora, merge_lora, save_lora
from model import Transformer
from train_utils import save_final

CONTEXT = 128
SHARPEN = 20


def tiny_model(vocab_size, seed=0):
    return sharpened_tiny_model(vocab_size, CONTEXT, seed, SHARPEN)


@pytest.fixture(scope="module")
def saved(tokenizer_dir, tokenizer, tmp_path_factory):
    """The tiny model saved as both a pretrain and an SFT stage output."""
    save_dir = tmp_path_factory.mktemp("eval_ckpt")
    model = tiny_model(len(tokenizer))
    for stage in ("pretrain", "sft"):
        save_final(model, model.config, str(save_dir), stage, tokenizer_dir)
    return {"dir": str(save_dir), "model": model, "tok_dir": tokenizer_dir}


def stops(tokenizer):
    return tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])


def greedy(model, ids, max_new_tokens, stop_ids):
    """model.generate's greedy ids, cut after the first stop id."""
    out = model.generate(torch.tensor([ids]), max_new_tokens, temperature=0.0, stop_ids=stop_ids)[0].tolist()
    end = next((i + 1 for i, t in enumerate(out) if t in stop_ids), len(out))
    return out[:end]


def chat_ids(tokenizer, messages):
    return encode_chat(tokenizer, messages, add_generation_prompt=True)[0].tolist()


def reply_text(tokenizer, ids, stop_ids):
    return tokenizer.decode(ids[:-1] if ids and ids[-1] in stop_ids else ids, skip_special_tokens=False)


def greedy_args(saved, *extra):
    """eval_model flags for the saved tiny model: greedy, on the CPU even where a GPU is present."""
    return ["--device", "cpu", "--save_dir", saved["dir"], "--tokenizer_path", saved["tok_dir"], "--temperature", "0",
            *extra]


def run_cli(args, stdin=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval_model.py"), *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


# ----------------------------------------------------------------------------------------------- eval_model CLI

def test_cli_jsonl_greedy_equals_generate(saved, tokenizer):
    prompts = ["Cats and dogs read stories.", "模型学习阅读小故事"]
    result = run_cli(greedy_args(saved, "--model_mode", "1", "--max_new_tokens", "12", "--output_format", "jsonl",
                                 "--show_speed", *[x for p in prompts for x in ("--prompt", p)]))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and "prefill" in result.stderr and "tok/s" in result.stderr
    for prompt, row in zip(prompts, rows):
        assert set(row) == {"prompt", "answer", "reasoning", "text", "tokens", "prompt_tokens", "finish_reason"}
        ids = chat_ids(tokenizer, [{"role": "user", "content": prompt}])
        expected = greedy(saved["model"], ids, 12, stops(tokenizer))
        assert row["prompt"] == prompt and row["prompt_tokens"] == len(ids)
        assert row["text"] == reply_text(tokenizer, expected, stops(tokenizer))
        assert row["tokens"] == len(expected) <= 12
        assert row["finish_reason"] == ("stop" if expected[-1] in stops(tokenizer) else "length")
        assert (row["reasoning"], row["answer"]) == eval_model.split_reasoning(row["text"])


def test_cli_interactive_two_turns_and_reset(saved, tokenizer):
    lines = ["hello there", "and the cat", "/reset", "stars", "/exit"]
    result = run_cli(greedy_args(saved, "--max_new_tokens", "6"), stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    stop_ids = stops(tokenizer)

    def reply(messages):
        return reply_text(tokenizer, greedy(saved["model"], chat_ids(tokenizer, messages), 6, stop_ids), stop_ids)

    first = reply([{"role": "user", "content": "hello there"}])
    second = reply([{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "and the cat"}])
    third = reply([{"role": "user", "content": "stars"}])  # after /reset: no history
    assert not any(tag in first + second + third for tag in ("<think>", "</think>", "<answer>", "</answer>"))
    expected = (f"user> assistant> {first}\nuser> assistant> {second}\nuser> (conversation cleared)\n"
                f"user> assistant> {third}\nuser> ")
    assert result.stdout == expected


def test_raw_mode_continues_text_without_template(saved, tokenizer, capsys):
    eval_model.main(greedy_args(saved, "--model_mode", "0", "--max_new_tokens", "9", "--output_format", "jsonl",
                                "--prompt", "The model learns"))
    row = json.loads(capsys.readouterr().out)
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>"]) + tokenizer.encode("The model learns",
                                                                                add_special_tokens=False)
    expected = greedy(saved["model"], ids, 9, tokenizer.convert_tokens_to_ids(["<|endoftext|>"]))
    assert row["prompt_tokens"] == len(ids)
    assert row["text"] == reply_text(tokenizer, expected, [0]) and row["tokens"] == len(expected) <= 9


def test_prompts_file_conversations_and_errors(saved, tokenizer, tmp_path, capsys):
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the river"},
             {"role": "assistant", "content": "reference"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a star"}, {"conversations": turns}])
    eval_model.main(greedy_args(saved, "--max_new_tokens", "5", "--output_format", "jsonl", "--prompts_file", path))
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ids = chat_ids(tokenizer, turns[:2])  # the final assistant turn is the reference, not the prompt
    assert rows[1]["prompt_tokens"] == len(ids)
    assert rows[1]["text"] == reply_text(tokenizer, greedy(saved["model"], ids, 5, stops(tokenizer)), stops(tokenizer))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"conversations": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(DataError, match=f"{bad}:2: .*user turn"):
        eval_model.read_prompts(str(bad))


def test_missing_checkpoint_names_path_and_stage(tmp_path):
    with pytest.raises(SystemExit, match=f"no distill checkpoint at {tmp_path}/distill_final.pth.*distill.py"):
        eval_model.main(["--save_dir", str(tmp_path), "--model_mode", "2", "--prompt", "hi"])


def test_lora_adapters_are_applied(saved, tokenizer, tmp_path, capsys):
    adapted = tiny_model(len(tokenizer))
    apply_lora(adapted, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    path = save_lora(adapted, str(tmp_path / "lora.pth"))
    merged = merge_lora(adapted).eval()
    eval_model.main(greedy_args(saved, "--lora_path", path, "--max_new_tokens", "8", "--output_format", "jsonl",
                                "--prompt", "cats"))
    row = json.loads(capsys.readouterr().out)
    ids = chat_ids(tokenizer, [{"role": "user", "content": "cats"}])
    with_lora = greedy(merged, ids, 8, stops(tokenizer))
    assert with_lora != greedy(saved["model"], ids, 8, stops(tokenizer))  # the adapters change the answer
    assert row["text"] == reply_text(tokenizer, with_lora, stops(tokenizer))


def test_quantize_flag_runs_the_quantized_model(saved, tokenizer, capsys, monkeypatch):
    import quantize
    calls = []

    def spy(model, mode):
        calls.append(mode)
        return quantize_model(model, mode)

    quantize_model = quantize.quantize_model
    monkeypatch.setattr(quantize, "quantize_model", spy)
    eval_model.main(greedy_args(saved, "--quantize", "int4", "--max_new_tokens", "8", "--output_format", "jsonl",
                                "--prompt", "cats"))
    row = json.loads(capsys.readouterr().out)
    ids = chat_ids(tokenizer, [{"role": "user", "content": "cats"}])
    expected = greedy(quantize_model(copy.deepcopy(saved["model"]), "int4"), ids, 8, stops(tokenizer))
    assert calls == ["int4"] and row["text"] == reply_text(tokenizer, expected, stops(tokenizer))


def test_compile_flag_compiles_the_served_model(saved, tokenizer, capsys, monkeypatch):
    """The wiring only: compiled generation itself is tested against eager in test_model.py."""
    compiled = []
    monkeypatch.setattr(eval_model, "compile_for_decoding", compiled.append)
    eval_model.main(greedy_args(saved, "--compile", "--max_new_tokens", "8", "--output_format", "jsonl",
                                "--prompt", "cats"))
    row = json.loads(capsys.readouterr().out)
    assert len(compiled) == 1 and isinstance(compiled[0], Transformer)
    ids = chat_ids(tokenizer, [{"role": "user", "content": "cats"}])
    assert row["text"] == reply_text(tokenizer, greedy(saved["model"], ids, 8, stops(tokenizer)), stops(tokenizer))


# --------------------------------------------------------------------------------------------- reusable pieces

def conversation(n_turns):
    rng = random.Random(1)
    messages = [{"role": "system", "content": "You are a careful assistant."}]
    for i in range(n_turns):
        messages.append({"role": "user", "content": f"question {i}: " + sample_sentence(rng, 6)})
        messages.append({"role": "assistant", "content": f"answer {i}: " + sample_sentence(rng, 6)})
    return messages + [{"role": "user", "content": "the newest question"}]


def test_trim_history_keeps_system_and_newest_turns_within_budget(tokenizer):
    messages = conversation(6)
    size = len(eval_model.encode_prompt(tokenizer, messages[:1] + messages[-5:]))  # system + 2 past turns + newest
    kept = eval_model.trim_history(tokenizer, messages, size)
    assert kept == messages[:1] + messages[-5:]
    assert len(chat_ids(tokenizer, kept)) <= size
    assert len(chat_ids(tokenizer, messages[:1] + messages[-7:])) > size  # one more turn would not fit
    assert eval_model.trim_history(tokenizer, messages, 10_000, max_turns=1) == messages[:1] + messages[-3:]
    assert eval_model.trim_history(tokenizer, messages, 10_000, max_turns=0) == messages[:1] + messages[-1:]
    with pytest.raises(eval_model.PromptTooLong, match="tokens but only 5 fit"):
        eval_model.trim_history(tokenizer, messages, 5)


def test_incremental_decoding_never_splits_characters(tokenizer):
    text = "模型学习 😀🎉 naïve café，天地人 👩‍👩‍👧 end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = eval_model.IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # some bytes were held back until their character was complete


def test_reply_stream_splits_think_and_answer(tokenizer):
    stop_ids = stops(tokenizer)
    text = "<think>想一想 😀 2+2</think>\n<answer>4 🎉</answer>"
    reply = eval_model.Reply(tokenizer, stop_ids, prompt_tokens=3)
    pieces = [p for i in tokenizer.encode(text, add_special_tokens=False) + stop_ids[:1] for p in reply.push(i)]
    assert reply.finish_reason == "stop" and reply.text == text
    assert (reply.reasoning, reply.answer) == ("想一想 😀 2+2", "4 🎉") == eval_model.split_reasoning(text)
    assert "".join(t for s, t in pieces if s == "reasoning") == "想一想 😀 2+2"
    assert "".join(t for s, t in pieces if s == "answer").strip() == "4 🎉"
    out = io.StringIO()
    printer = eval_model.Printer(out)
    for section, piece in pieces:
        printer.write(section, piece)
    printer.end()
    assert out.getvalue() == "[think]想一想 😀 2+2[/think]\n4 🎉\n"


@pytest.mark.parametrize("text, expected", [
    ("plain reply", ("", "plain reply")),
    ("<think>still thinking", ("still thinking", "")),
    ("<think>a</think> b ", ("a", "b")),
    ("<answer>7</answer>", ("", "7")),
])
def test_split_reasoning(text, expected):
    assert eval_model.split_reasoning(text) == expected


# ---------------------------------------------------------------------------------------------------- eval_ppl

@torch.no_grad()
def full_nll(model, ids, mask):
    """Summed NLL of the masked targets from one forward pass over the whole sequence."""
    logits = model(torch.tensor([ids[:-1]])).logits[0]
    nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    return float((nll * torch.tensor(mask[1:], dtype=torch.float32)).sum()), int(np.sum(mask[1:]))


def test_ppl_matches_hand_computation_when_texts_fit(saved, tokenizer, tmp_path):
    texts = ["Cats read stories.", "模型学习阅读和写作 😀"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    m = eval_ppl.evaluate_file(saved["model"], tokenizer, path, batch_size=1)
    per_sample = [full_nll(saved["model"], eval_model.encode_raw(tokenizer, t),
                           [0] + [1] * len(tokenizer.encode(t, add_special_tokens=False))) for t in texts]
    total, tokens = sum(s for s, _ in per_sample), sum(n for _, n in per_sample)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert m["format"] == "text" and m["samples"] == 2 and m["tokens"] == tokens and m["bytes"] == n_bytes
    assert m["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-4)
    sample_ppl = [math.exp(s / n) for s, n in per_sample]
    assert m["sample_perplexity"]["mean"] == pytest.approx(np.mean(sample_ppl), rel=1e-4)
    assert m["sample_perplexity"]["median"] == pytest.approx(np.median(sample_ppl), rel=1e-4)


@pytest.mark.parametrize("n_tokens, context, stride", [(200, 64, 32), (65, 64, 64), (130, 64, 1), (10, 64, 32)])
def test_windows_score_every_token_once_with_context(n_tokens, context, stride):
    scored = []
    for start, end, first in eval_ppl.windows(n_tokens, context, stride):
        assert end - 1 - start <= context and start < first
        assert all(p - start >= min(p, context - stride + 1) for p in range(first, end))
        scored += range(first, end)
    assert scored == list(range(1, n_tokens))


def test_ppl_long_text_sliding_window(saved, tokenizer, tmp_path):
    rng = random.Random(3)
    text = " ".join(sample_sentence(rng, 25) for _ in range(20))
    ids = eval_model.encode_raw(tokenizer, text)
    assert len(ids) > 3 * CONTEXT
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": text}])
    m = eval_ppl.evaluate_file(saved["model"], tokenizer, path, stride=48, batch_size=3)
    assert m["tokens"] == len(ids) - 1  # every text token once (the first predicted from the document boundary)
    total = 0.0
    with torch.no_grad():  # unbatched: each window's new positions, from a forward pass over the window alone
        for start, end, first in eval_ppl.windows(len(ids), CONTEXT, 48):
            logp = saved["model"](torch.tensor([ids[start:end - 1]])).logits[0].log_softmax(-1)
            total -= sum(float(logp[p - start - 1, ids[p]]) for p in range(first, end))
    assert m["loss"] == pytest.approx(total / (len(ids) - 1), rel=1e-5)
    truncated, _ = full_nll(saved["model"], ids[:CONTEXT + 1], [0] + [1] * CONTEXT)
    assert m["loss"] != pytest.approx(truncated / CONTEXT, rel=1e-3)


def test_ppl_chat_scores_only_assistant_tokens(saved, tokenizer, tmp_path):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "猫？"},
             {"role": "assistant", "content": "河边。"}, {"role": "user", "content": "The dog?"},
             {"role": "assistant", "content": "By the stars."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"conversations": turns}])
    m = eval_ppl.evaluate_file(saved["model"], tokenizer, path)
    ids, mask = encode_chat(tokenizer, turns)
    total, tokens = full_nll(saved["model"], ids.tolist(), mask.tolist())
    assert m["format"] == "chat" and m["tokens"] == tokens == mask.sum() < len(ids) - 10
    assert m["loss"] == pytest.approx(total / tokens, rel=1e-4)
    assert m["bytes"] == len("河边。".encode()) + len("By the stars.")


def test_ppl_malformed_line_names_file_and_line(saved, tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": 3}\n')
    with pytest.raises(DataError, match=f"{path}:3: "):
        eval_ppl.evaluate_file(saved["model"], tokenizer, str(path))


def test_ppl_cli_writes_json(saved, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat reads"}, {"text": "天地人"}])
    out = tmp_path / "out" / "ppl.json"
    eval_ppl.main(["--model_path", os.path.join(saved["dir"], "pretrain_final.pth"), "--dataset_path", path,
                   "--tokenizer_path", saved["tok_dir"], "--output_file", str(out), "--device", "cpu"])
    m = json.loads(out.read_text())
    assert m["samples"] == 2 and m["perplexity"] > 1 and m["bits_per_byte"] > 0


# -------------------------------------------------------------------------------------------------- eval_bench

@torch.no_grad()
def choice_scores(model, tokenizer, question, texts):
    """Summed log-likelihood of each choice, one unbatched forward pass per choice."""
    ctx = eval_bench.question_ids(tokenizer, [{"role": "user", "content": question}], "chat")
    sums = []
    for text in texts:
        cont = eval_bench.choice_ids(tokenizer, text, "chat")
        logp = model(torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1:].log_softmax(-1)
        sums.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
    return sums


def choice_items(model, tokenizer, pick):
    """(question, choices, index) items whose index is the choice `pick(sums, texts)` selects."""
    rng, items = random.Random(7), []
    for _ in range(6):
        question = sample_sentence(rng, 8)
        texts = [sample_sentence(rng, rng.randint(1, 6)) for _ in range(4)]
        items.append((question, texts, pick(choice_scores(model, tokenizer, question, texts), texts)))
    return items


def as_records(items, shift=0):
    """The items in the three accepted layouts (a list, a label dict, C-Eval's top-level letters); shift != 0
    keys a wrong choice."""
    layouts = [lambda q, t, k: {"question": q, "choices": t, "answer": "ABCD"[k]},
               lambda q, t, k: {"question": q, "choices": dict(zip("ABCD", t)), "answer": k},
               lambda q, t, k: {"question": q, **dict(zip("ABCD", t)), "answer": "ABCD"[k]}]
    return [layouts[i % 3](q, t, (k + shift) % 4) for i, (q, t, k) in enumerate(items)]


def test_multiple_choice_accuracy(saved, tokenizer, tmp_path):
    model = saved["model"]
    by_sum = choice_items(model, tokenizer, lambda s, t: max(range(4), key=lambda i: s[i]))
    by_norm = choice_items(model, tokenizer, lambda s, t: max(range(4), key=lambda i: s[i] / len(t[i])))
    m = eval_bench.evaluate_file(model, tokenizer, write_jsonl(tmp_path / "a.jsonl", as_records(by_sum)),
                                 batch_size=3)
    assert (m["kind"], m["items"], m["accuracy"]) == ("choice", 6, 1.0)
    m = eval_bench.evaluate_file(model, tokenizer, write_jsonl(tmp_path / "b.jsonl", as_records(by_norm)),
                                 batch_size=5)
    assert m["accuracy_norm"] == 1.0
    m = eval_bench.evaluate_file(model, tokenizer, write_jsonl(tmp_path / "w.jsonl", as_records(by_sum, shift=1)),
                                 batch_size=3)
    assert m["accuracy"] == 0.0


def test_multiple_choice_bad_answer_names_line(saved, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": "A"},
                                                {"question": "q", "choices": ["a", "b"], "answer": "C"}])
    with pytest.raises(DataError, match=f"{path}:2: 'answer' must be one of the labels"):
        eval_bench.evaluate_file(saved["model"], tokenizer, path)


@pytest.mark.parametrize("raw, normalized", [
    (" 1,234 ", "1234"), ("18.0", "18"), ("18.50", "18.5"), ("$5", "5"), ("50%", "50"), ("Paris.", "paris"),
    ("７２", "72"), ("  New   York ", "new york"), ("7。", "7"), ("100", "100"), ("-3.000", "-3"),
])
def test_normalize_answer(raw, normalized):
    assert eval_bench.normalize_answer(raw) == normalized


@pytest.mark.parametrize("text, answer", [
    ("<think>3 + 4 = 7, then 8</think><answer> 1,234 </answer>", " 1,234 "),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", " 72"),
    ("So 3 + 4 = 7 apples, and 10 - 3 = 7.", "7"),
    ("<think>3 + 4</think><answer>12", "12"),
    ("Paris", "Paris"),
])
def test_extract_answer(text, answer):
    assert eval_bench.extract_answer(text) == answer


def test_exact_match_batched_generation(saved, tokenizer, tmp_path):
    model, rng, records = saved["model"], random.Random(5), []
    for i in range(5):
        question = sample_sentence(rng, rng.randint(2, 12))  # different lengths: left padding in the batch
        ids = chat_ids(tokenizer, [{"role": "user", "content": question}])
        reply = reply_text(tokenizer, greedy(model, ids, 8, stops(tokenizer)), stops(tokenizer))
        records.append({"question": question, "answer": eval_bench.extract_answer(reply)} if i % 2 else
                       {"conversations": [{"role": "user", "content": question},
                                          {"role": "assistant",
                                           "content": f"<think>…</think><answer>{eval_bench.extract_answer(reply)}"
                                                      f"</answer>"}]})
    predictions = []
    m = eval_bench.evaluate_file(model, tokenizer, write_jsonl(tmp_path / "qa.jsonl", records), batch_size=4,
                                 max_new_tokens=8, predictions=predictions)
    assert (m["kind"], m["items"], m["accuracy"]) == ("exact", 5, 1.0), predictions
    wrong = [{"question": r.get("question", "x"), "answer": "no such answer"} for r in records]
    m = eval_bench.evaluate_file(model, tokenizer, write_jsonl(tmp_path / "w.jsonl", wrong), max_new_tokens=8)
    assert m["accuracy"] == 0.0
