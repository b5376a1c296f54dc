"""train_tokenizer.py: single-id special tokens, lossless byte-level BPE, ChatML template, CLI, shipped tokenizer/."""
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
from cli import UserError
from conftest import ROOT, sample_sentence, write_jsonl
from transformers import AutoTokenizer

from train_tokenizer import (
    CHAT_TEMPLATE,
    REASONING_TAGS,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    TOOL_TAGS,
    DataError,
    build_tokenizer,
    bytes_per_token,
    iter_texts,
    main,
)

SHIPPED = os.path.join(ROOT, "tokenizer")
MIXED = ("Hello, 世界! The model 学习 reads 🐱🐶 and writes.\n\n  Tabs\tand  spaces   數學 café naïve ½ 😀👍🏽 "
         "«quotes» “引号” 12345 + 0.5 = ?\r\nend <think>想一想</think><answer>42</answer>")
CHAT = [{"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "2+2=?"},
        {"role": "assistant", "content": "<think>2 plus 2</think><answer>4</answer>"},
        {"role": "user", "content": "谢谢！"}]
CHATML = ("<|im_start|>system\nYou are helpful.<|im_end|>\n"
          "<|im_start|>user\n2+2=?<|im_end|>\n"
          "<|im_start|>assistant\n<think>2 plus 2</think><answer>4</answer><|im_end|>\n"
          "<|im_start|>user\n谢谢！<|im_end|>\n")


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def shipped():
    if not os.path.isdir(SHIPPED):
        pytest.fail(f"the shipped tokenizer folder {SHIPPED} is missing")
    return AutoTokenizer.from_pretrained(SHIPPED)


# ---- special tokens --------------------------------------------------------------------------------------------

def test_special_tokens_have_fixed_single_ids(tokenizer):
    assert SPECIAL_TOKENS[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and SPECIAL_TOKENS[7] == "<|pad|>"
    assert REASONING_TAGS == SPECIAL_TOKENS[3:7]
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == i
        assert encode(tokenizer, token) == [i], token
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad|>", 7)


def test_special_tokens_inside_text(tokenizer):
    assert encode(tokenizer, "a<think>b</think>") == encode(tokenizer, "a") + [3] + encode(tokenizer, "b") + [4]
    for i, token in enumerate(SPECIAL_TOKENS):
        ids = encode(tokenizer, f"模型{token}the cat")
        assert ids.count(i) == 1, (token, ids)
        assert ids == encode(tokenizer, "模型") + [i] + encode(tokenizer, "the cat")


@pytest.mark.parametrize("context", ["", " ", "x", "好", "\n", "<", ">", "think", "</", "<think", "the "])
def test_reasoning_and_tool_tags_never_split_into_subwords(tokenizer, context):
    for tag in REASONING_TAGS + TOOL_TAGS:
        text = f"{context}{tag}{context}"
        ids, tag_id = encode(tokenizer, text), SPECIAL_TOKENS.index(tag)
        assert ids.count(tag_id) == 1, (text, ids)
        at = ids.index(tag_id)  # no other token carries a piece of the tag
        assert (tokenizer.decode(ids[:at]), tokenizer.decode(ids[at + 1:])) == (context, context), (text, ids)


def test_tags_from_training_text_do_not_become_merges():
    """Tags in the corpus are cut out before BPE: no learned token contains 'think>' or '<answer'."""
    rng = random.Random(1)
    texts = [f"<think>{sample_sentence(rng)}</think><answer>{sample_sentence(rng, 3)}</answer>" for _ in range(500)]
    tok = build_tokenizer(iter(texts), vocab_size=400)
    learned = [tok.decode([i]) for i in range(len(SPECIAL_TOKENS), len(tok))]
    assert not [t for t in learned if "think>" in t or "<answer" in t or "<th" in t or "</" in t]
    assert encode(tok, texts[0]).count(3) == 1


def test_pre_tokenizer_splits_words_digits_and_punctuation(tokenizer):
    pre, dec = tokenizer.backend_tokenizer.pre_tokenizer, tokenizer.backend_tokenizer.decoder
    pieces = [dec.decode([p]) for p, _ in pre.pre_tokenize_str("He's paid 1234 元，好的!\n\n  ok")]
    assert pieces == ["He", "'s", " paid", " 1", "2", "3", "4", " 元", "，好的", "!\n\n", " ", " ok"]


def test_numbers_are_learned_digit_by_digit():
    tok = build_tokenizer(iter(["in 2024 we paid 1234 dollars, 2024 and 1234"] * 200), vocab_size=256 + len(SPECIAL_TOKENS) + 36)
    learned = [tok.decode([i]) for i in range(len(SPECIAL_TOKENS), len(tok))]
    assert " dollars" in learned  # words merge ...
    assert all(sum(c.isdigit() for c in t) <= 1 for t in learned)  # ... digits never do
    assert not [t for t in learned if " " in t.strip()]  # nor does anything across a space


# ---- round trip and compression ---------------------------------------------------------------------------------

def test_round_trip_is_lossless(tokenizer):
    rng = random.Random(2)
    texts = [MIXED, "", " ", "\n\n\n", "  leading and trailing  ", "🙂" * 5, "中文，English；混合。"]
    texts += [" ".join(sample_sentence(rng) for _ in range(3)) + rng.choice(["🐱", "…", "\t", "é"])
              for _ in range(50)]
    for text in texts:
        assert tokenizer.decode(encode(tokenizer, text)) == text, text


def test_bytes_per_token_counts_utf8_bytes_and_streams(tokenizer):
    texts = [MIXED, "好好学习", "the cat", ""]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(encode(tokenizer, t)) for t in texts)
    assert bytes_per_token(tokenizer, texts) == pytest.approx(n_bytes / n_tokens)
    assert bytes_per_token(tokenizer, iter(texts), batch_size=1) == pytest.approx(n_bytes / n_tokens)
    assert bytes_per_token(tokenizer.backend_tokenizer, texts) == pytest.approx(n_bytes / n_tokens)
    assert math.isnan(bytes_per_token(tokenizer, []))


# ---- saved folder and chat template -----------------------------------------------------------------------------

def test_saved_folder_loads_and_chat_template_is_chatml(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.apply_chat_template(CHAT, tokenize=False) == CHATML
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        CHATML + "<|im_start|>assistant\n"
    assert tok.apply_chat_template(CHAT[:1], tokenize=False) == "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    ids = tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == encode(tok, CHATML + "<|im_start|>assistant\n")
    assert ids[:1] == [1] and ids.count(2) == len(CHAT)  # <|im_start|>, one <|im_end|> per turn: single ids


# ---- data reading -----------------------------------------------------------------------------------------------

def test_iter_texts_reads_all_formats_and_holds_out_every_nth(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "t0"},
        {"conversations": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}]},
        {"chosen": [{"role": "user", "content": "c2"}], "rejected": [{"role": "user", "content": "r2"}]},
        {"text": "t3"}, {"text": "t4"}, {"text": "t5"}])
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")  # blank lines are skipped and not counted
    assert list(iter_texts([path])) == ["t0", "u1", "a1", "c2", "r2", "t3", "t4", "t5"]
    assert list(iter_texts([path], holdout_every=3, held_out=True)) == ["c2", "r2", "t5"]
    assert list(iter_texts([path], holdout_every=3)) == ["t0", "u1", "a1", "t3", "t4"]
    assert list(iter_texts([path, path], holdout_every=4, held_out=True)) == ["t3", "t3"]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"\n', "invalid JSON"),
    ('["not", "an", "object"]\n', "expected a JSON object"),
    ('{"title": "no text field"}\n', "expected a 'text' or 'conversations'"),
    ('{"text": 3}\n', "'text' must be a string"),
    ('{"conversations": [{"role": "user"}]}\n', "'conversations' must be a list"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: {message}")):
        list(iter_texts([str(path)]))


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=re.escape(missing) + r".*expected a JSONL file"):
        list(iter_texts([missing]))
    with pytest.raises(DataError, match=re.escape(str(tmp_path)) + r": not a regular file"):
        list(iter_texts([str(tmp_path)]))


def test_invalid_utf8_line_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid UTF-8")):
        list(iter_texts([str(path)]))


# ---- command line -----------------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_tokenizer.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_end_to_end(tmp_path):
    rng = random.Random(3)
    records, secret = [], "qzxjk" * 3
    for i in range(300):
        if i % 5 == 4:  # the held-out slice (--holdout_every 5): a word seen nowhere else
            records.append({"text": " ".join([secret] * 50)})
        elif i % 2:
            records.append({"text": sample_sentence(rng, 20)})
        else:
            records.append({"conversations": [{"role": "user", "content": sample_sentence(rng)},
                                              {"role": "assistant", "content": f"<think>{sample_sentence(rng)}"
                                                                               f"</think><answer>好</answer>"}]})
    data = write_jsonl(tmp_path / "mixed.jsonl", records)
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"text": sample_sentence(rng)} for _ in range(20)])
    evalf = write_jsonl(tmp_path / "eval.jsonl", [{"text": sample_sentence(rng)} for _ in range(20)])
    out_dir = tmp_path / "tok"
    proc = run_cli("--data_path", data, extra, "--weights", "2", "1", "--vocab_size", "400",
                   "--out_dir", str(out_dir), "--holdout_every", "5", "--eval_path", evalf)
    assert proc.returncode == 0, proc.stderr
    assert f"saved {out_dir}" in proc.stdout
    per_pass = sum(1 if "text" in r else 2 for i, r in enumerate(records) if i % 5 != 4)
    texts_trained = 2 * per_pass + 16  # mixed.jsonl read twice (--weights 2), 16 of 20 records of extra.jsonl
    assert f"on {texts_trained:,} texts" in proc.stdout, proc.stdout
    for label in (f"held-out 1/5 of {data}", f"held-out 1/5 of {extra}", "held-out 1/5 of all", f"eval {evalf}"):
        assert re.search(r"\d\.\d{3}  " + re.escape(label), proc.stdout), (label, proc.stdout)

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    assert len(tok) == 400 and tok.convert_tokens_to_ids("<think>") == 3
    assert tok.apply_chat_template(CHAT, tokenize=False) == CHATML
    assert len(encode(tok, " " + secret)) >= 10  # held-out records were really not trained on
    held = float(re.search(r"(\d\.\d{3})  held-out 1/5 of " + re.escape(data), proc.stdout).group(1))
    assert held < 2.0  # ... so the unseen word compresses badly there
    assert sorted(os.listdir(out_dir)) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]


def test_cli_missing_file_fails_with_its_name(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    proc = run_cli("--data_path", missing, "--out_dir", str(tmp_path / "tok"))
    assert proc.returncode != 0
    assert missing in proc.stderr and "expected a JSONL file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "tok").exists()


def test_cli_malformed_line_and_bad_flags(tmp_path, capsys):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: invalid JSON")):
        main(["--data_path", str(path), "--out_dir", str(tmp_path / "tok"), "--vocab_size", "400"])
    evalf = write_jsonl(tmp_path / "ok.jsonl", [{"text": "fine"}])
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file")):
        main(["--data_path", evalf, "--eval_path", str(tmp_path / "nope.jsonl"), "--out_dir", str(tmp_path / "t")])
    assert not (tmp_path / "t").exists()  # checked before training, nothing written
    with pytest.raises(SystemExit):
        main(["--data_path", evalf, "--weights", "1", "2"])
    assert "--weights needs one integer" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--vocab_size", "100"], "argument --vocab_size: must be >= 320, got 100"),
    (["--vocab_size", "1e9"], "argument --vocab_size: expected an integer, got '1e9'"),
    (["--vocab_size", "999999999"], "argument --vocab_size: must be <= 262144, got 999999999"),
    (["--weights", "0"], "argument --weights: must be >= 1, got 0"),
    (["--weights", "1.5"], "argument --weights: expected an integer, got '1.5'"),
    (["--holdout_every", "-1"], "argument --holdout_every: must be >= 0, got -1"),
    (["--holdout_every", "1"], "argument --holdout_every: must be 0 (off) or >= 2, got 1"),
    (["--holdout_every", "nan"], "argument --holdout_every: expected an integer, got 'nan'"),
    (["--overwrite", "maybe"], "argument --overwrite: expected a boolean"),
])
def test_bad_numbers_are_refused_naming_the_flag(tmp_path, capsys, flags, message):
    data = write_jsonl(tmp_path / "ok.jsonl", [{"text": "fine"}])
    with pytest.raises(SystemExit) as e:
        main(["--data_path", data, "--out_dir", str(tmp_path / "tok"), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def trained_folder(tmp_path):
    out_dir = tmp_path / "tok"
    out_dir.mkdir()
    (out_dir / "tokenizer.json").write_text("{}", encoding="utf-8")  # stands for the shipped tokenizer/
    return out_dir


def test_existing_tokenizer_is_not_overwritten_without_overwrite(tmp_path):
    out_dir = trained_folder(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": sample_sentence(random.Random(i))} for i in range(50)])
    proc = run_cli("--data_path", data, "--out_dir", str(out_dir), "--vocab_size", "400")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert f"--out_dir {out_dir} already holds a tokenizer (tokenizer.json); pass --overwrite" in proc.stderr
    assert (out_dir / "tokenizer.json").read_text(encoding="utf-8") == "{}"
    main(["--data_path", data, "--out_dir", str(out_dir), "--vocab_size", "400", "--overwrite", "--holdout_every",
          "0"])
    assert len(AutoTokenizer.from_pretrained(str(out_dir))) == 400


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}])
    with pytest.raises(UserError, match=re.escape(f"--out_dir {data}: exists and is not a folder")):
        main(["--data_path", data, "--out_dir", data, "--overwrite"])


def test_cli_data_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"title": "x"}\n', encoding="utf-8")
    proc = run_cli("--data_path", str(bad), "--out_dir", str(tmp_path / "tok"), "--vocab_size", "400")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == f"train_tokenizer.py: error: {bad}:2: expected a 'text' or 'conversations' " \
                          f"(or 'chosen'/'rejected') field\n"


def test_small_corpus_says_the_vocabulary_is_smaller_than_asked(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "abab cdcd"}] * 3)
    main(["--data_path", data, "--out_dir", str(tmp_path / "tok"), "--vocab_size", "5000", "--holdout_every", "0"])
    assert "note: the training text supports only" in capsys.readouterr().err


# ---- the shipped tokenizer/ ---------------------------------------------------------------------------------------

def test_shipped_tokenizer(shipped):
    assert len(shipped) == 6464
    assert SPECIAL_TOKENS[:8] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>",
                                  "</answer>", "<|pad|>"]  # ids 0-7 never move: checkpoints and data depend on them
    assert SPECIAL_TOKENS[8:12] == ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
    assert SPECIAL_TOKENS[12:] == [f"<|reserved_{i}|>" for i in range(52)]
    for i, token in enumerate(SPECIAL_TOKENS):
        assert shipped.convert_tokens_to_ids(token) == i and encode(shipped, token) == [i]
    assert (shipped.eos_token_id, shipped.pad_token_id) == (2, 7)
    assert shipped.chat_template == CHAT_TEMPLATE
    assert shipped.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        CHATML + "<|im_start|>assistant\n"
    assert shipped.decode(encode(shipped, MIXED)) == MIXED
    assert sorted(os.listdir(SHIPPED)) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]


def test_shipped_tokenizer_matches_script_settings(shipped):
    """tokenizer/ was built by this script's pre-tokenizer: digits split one by one, common words whole."""
    with open(os.path.join(SHIPPED, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    assert spec["model"]["type"] == "BPE"
    assert spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == SPLIT_PATTERN
    assert [shipped.decode([i]) for i in encode(shipped, "12345")] == list("12345")
    for word in (" the", " and", "的", "我们", "，"):
        assert len(encode(shipped, word)) == 1, word
