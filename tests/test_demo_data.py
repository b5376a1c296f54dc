"""demo_data: deterministic files in the pipeline's formats, held-out evals, and scorers that can fail."""
import json
import re

import pytest

import demo_data
from dataset import record_problem, tool_call_text
from demo_data import (
    ATTRIBUTES,
    CALCULATOR,
    LOOKUP,
    NO_THINK_SHARE,
    PEOPLE,
    TABLES,
    TERSE_SHARE,
    TOOLS_IN_WORDS,
    TOWNS,
    demo_toolbox,
    generate_demo,
    is_terse,
    parse_reasoning,
    prompt_turns,
    score_direct,
    score_reasoning,
    score_sft,
    score_tool_answer,
    score_tool_call,
    split_tool_calls,
)
from tools import parse_tool_call

SCALE = 0.1  # ~10x smaller than the default files; every code path still runs
REASONING = re.compile(r"<think>[^<]+</think><answer>-?\d+</answer>")
NO_THINK = re.compile(r"<think></think><answer>-?\d+</answer>")
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return generate_demo(str(out), seed=0, scale=SCALE)


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_chat_texts(demo):
    """Every string a model trains on: pretraining text and every turn of every training conversation."""
    texts = [r["text"] for r in read(demo["pretrain"])]
    for name in ("sft", "reasoning"):
        texts += [t["content"] or "" for r in read(demo[name]) for t in r["conversations"]]
        texts += [tool_call_text(c) for r in read(demo[name]) for t in r["conversations"] for c in t.get("tool_calls", [])]
    texts += [t["content"] for r in read(demo["dpo"]) for side in ("chosen", "rejected") for t in r[side]]
    return texts


def test_writes_every_file_with_records(demo):
    assert set(demo) == {"pretrain", "pretrain_eval", "sft", "sft_eval", "reasoning", "reasoning_eval", "dpo",
                         "dpo_eval", "tools_eval"}
    for name, path in demo.items():
        assert path.endswith(f"{name}.jsonl")
        assert len(read(path)) > 0, name


def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path):
    again = generate_demo(str(tmp_path / "again"), seed=0, scale=SCALE)
    other = generate_demo(str(tmp_path / "other"), seed=1, scale=SCALE)
    for name in demo:
        first = open(demo[name], "rb").read()
        assert open(again[name], "rb").read() == first, name
        assert open(other[name], "rb").read() != first, name


@pytest.mark.parametrize("name,kind", [("pretrain", "pretrain"), ("pretrain_eval", "pretrain"), ("sft", "chat"),
                                       ("sft_eval", "chat"), ("reasoning", "chat"), ("reasoning_eval", "chat"),
                                       ("dpo", "dpo"), ("dpo_eval", "dpo"), ("tools_eval", "chat")])
def test_records_are_valid_for_the_pipeline(demo, name, kind):
    for record in read(demo[name]):
        assert record_problem(record, kind) is None, record


def test_conversations_end_with_assistant_and_use_known_roles(demo):
    for name in ("sft", "sft_eval", "reasoning", "reasoning_eval", "tools_eval"):
        for record in read(demo[name]):
            roles = [t["role"] for t in record["conversations"]]
            assert roles[-1] == "assistant" and set(roles) <= {"system", "user", "assistant", "tool"}
            assert "system" not in roles[1:]
            assert ("tool" in roles) <= offers_tools(record), "tool turns only where tools are offered"
    sft = [[t["role"] for t in r["conversations"]] for r in read(demo["sft"])]
    assert any(roles[0] == "system" for roles in sft), "some SFT conversations have a system prompt"
    assert any(roles.count("assistant") > 1 for roles in sft), "some SFT conversations are multi-turn"


def test_reasoning_answers_are_think_then_answer_some_with_thinking_off(demo):
    """Eval references always reason; a NO_THINK_SHARE of training replies close an empty think at once (what
    the model says when the prompt switches thinking off)."""
    for record in read(demo["reasoning_eval"]):
        assert REASONING.fullmatch(record["conversations"][-1]["content"]), record
    replies = [r["conversations"][-1]["content"] for r in read(demo["reasoning"])]
    assert all(REASONING.fullmatch(reply) or NO_THINK.fullmatch(reply) for reply in replies)
    share = sum(bool(NO_THINK.fullmatch(reply)) for reply in replies) / len(replies)
    assert abs(share - NO_THINK_SHARE) < 0.06, share


def test_arithmetic_in_the_data_is_right(demo):
    """Every "a op b = c", every counting run and every reasoning answer in every file is correct."""
    text = "".join(open(path, encoding="utf-8").read() for path in demo.values())
    sums = re.findall(r"(\d+) ([-+×]) (\d+) = (\d+)", text)
    assert len(sums) > 100
    for a, op, b, c in sums:
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op] == int(c), (a, op, b, c)
    counts = re.findall(r"Count (up|down) (\d+) from (\d+): ([^.]*)\.", text)
    counts += re.findall(r"从(\d+)往([上下])数(\d+)个：([^。]*)。", text)
    assert len(counts) > 100
    for count in counts:
        if count[0] in ("up", "down"):
            way, k, x, seq = count
        else:
            x, way, k, seq = count
        step = 1 if way in ("up", "上") else -1
        expected = ", ".join(f"({i}) {int(x) + step * i}" for i in range(1, int(k) + 1))
        assert seq == expected, count
    for name in ("reasoning", "reasoning_eval"):
        for record in read(demo[name]):
            parsed = parse_reasoning(record["conversations"][-1]["content"])
            if parsed is not None:  # None: thinking off, nothing worked out
                assert re.findall(r"= (\d+)", parsed[0])[-1] == parsed[1]


def test_dpo_pairs_share_the_prompt_and_differ_at_the_end(demo):
    for name in ("dpo", "dpo_eval"):
        for record in read(demo[name]):
            chosen, rejected = record["chosen"], record["rejected"]
            assert chosen[:-1] == rejected[:-1] and chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
            assert chosen[-1]["content"] != rejected[-1]["content"]
    kinds = {r["kind"] for r in read(demo["dpo_eval"])}
    assert {"wrong_fact", "rude", "reasoning", "terse"} <= kinds


def test_sft_replies_mix_bare_values_and_sentences_and_dpo_prefers_sentences(demo):
    values = {v for rows in TABLES.values() for row in rows for v in row[:2]} | {str(a) for a in range(1, 100)}
    names = [n for p in PEOPLE for n in p[:2]]
    finals = [r["conversations"][-1]["content"] for r in read(demo["sft"]) if not offers_tools(r)]
    bare = [reply for reply in finals if reply in values]
    sentences = [reply for reply in finals if any(n in reply for n in names)]
    assert abs(len(bare) / (len(bare) + len(sentences)) - TERSE_SHARE) < 0.05, (len(bare), len(sentences))
    for record in read(demo["dpo_eval"]):
        if record["kind"] == "terse":
            value = record["rejected"][-1]["content"]
            assert is_terse({"answer": value}, value) and value in record["chosen"][-1]["content"]
            assert not is_terse({"answer": value}, record["chosen"][-1]["content"])


def test_both_languages_in_every_file(demo):
    for name, path in demo.items():
        text = open(path, encoding="utf-8").read()
        assert CJK.search(text), f"{name} has no Chinese"
        assert re.search(r"\b(the|is|has|does)\b", text), f"{name} has no English"


def test_eval_items_never_appear_in_training_files(demo):
    train_docs = {r["text"] for r in read(demo["pretrain"])}
    assert not train_docs & {r["text"] for r in read(demo["pretrain_eval"])}
    train_texts = train_chat_texts(demo)
    questions = {prompt_turns(r)[-1]["content"] for name in ("sft_eval", "reasoning_eval", "tools_eval")
                 for r in read(demo[name])}
    questions |= {r["chosen"][-2]["content"] for r in read(demo["dpo_eval"])}
    corpus = "\n".join(train_texts)
    leaked = [q for q in questions if q in corpus]
    assert not leaked, leaked[:5]


def test_score_sft_accepts_references_and_rejects_wrong_facts(demo):
    records = read(demo["sft_eval"])
    assert {r["attribute"] for r in records} == set(ATTRIBUTES)
    for record in records:
        reference = record["conversations"][-1]["content"]
        assert score_sft(record, reference), (record, reference)
        answer = record["answer"]
        if record["attribute"] == "age":
            wrong = reference.replace(answer, str(int(answer) + 1))
        else:
            row = next(row for row in TABLES[record["attribute"]] if answer in row[:2])
            other = next(r for r in TABLES[record["attribute"]] if r is not row)
            wrong = reference.replace(answer, other[row.index(answer)])
        assert not score_sft(record, wrong), wrong
        assert not score_sft(record, "")
        assert not score_sft(record, "I don't know.")


def test_score_sft_rejects_listing_every_candidate():
    record = {"answer": "Redhill", "attribute": "city"}
    assert score_sft(record, "Anna lives in Redhill.")
    assert score_sft(record, "anna lives in redhill")
    assert not score_sft(record, "Anna lives in Redhill or Stonebridge.")
    assert not score_sft({"answer": "red", "attribute": "color"}, "Anna lives in Redhill.")  # whole words only
    assert score_sft({"answer": "红色", "attribute": "color", "lang": "zh"}, "安娜最喜欢红色。")
    assert not score_sft({"answer": "红色", "attribute": "color", "lang": "zh"}, "安娜最喜欢蓝色。")


def test_scoring_values_do_not_overlap():
    """No value matches inside another value of its attribute or inside a name, so scoring is unambiguous."""
    names = [n for en, zh, _ in PEOPLE for n in (en, zh)] + [n for row in TOWNS for n in row]
    for attr, table in TABLES.items():
        values = [v for row in table for v in row[:2]]
        assert len(set(values)) == len(values), attr
        for v in values:
            assert not any(v != w and demo_data._contains(w, v) for w in values), (attr, v)
            if attr != "city":
                assert not any(demo_data._contains(n, v) for n in names), (attr, v)


def test_parse_and_score_reasoning(demo):
    records = read(demo["reasoning_eval"])
    for record in records:
        reference = record["conversations"][-1]["content"]
        assert parse_reasoning(reference) is not None
        assert score_reasoning(record, reference)
        assert score_reasoning(record, reference + "<|im_end|>")
        wrong = re.sub(r"<answer>-?\d+</answer>", f"<answer>{int(record['answer']) + 1}</answer>", reference)
        assert not score_reasoning(record, wrong)
        assert not score_reasoning(record, f"<answer>{record['answer']}</answer>")  # no think
        assert not score_reasoning(record, record["answer"])  # no tags at all
        assert not score_reasoning(record, "Sure! " + reference)  # text outside the tags
    assert parse_reasoning("<think>2 + 2 = 4.</think><answer>4</answer>") == ("2 + 2 = 4.", "4")
    assert parse_reasoning("<think></think><answer>4</answer>") is None
    assert parse_reasoning("<think>a<think>b</think><answer>4</answer>") is None
    assert parse_reasoning("<think>a</think>") is None


def test_prompt_turns_drop_only_the_reference(demo):
    record = read(demo["sft_eval"])[0]
    assert prompt_turns(record) == record["conversations"][:-1]
    assert prompt_turns(record)[-1]["role"] == "user"


def offers_tools(record):
    """Tools offered as schemas (the record's "tools") or in words (the system line TOOLS_IN_WORDS)."""
    return "tools" in record or record["conversations"][0]["content"] in TOOLS_IN_WORDS.values()


def tool_records(demo):
    return [r for name in ("sft", "tools_eval") for r in read(demo[name]) if offers_tools(r)]


def rounds_of_calls(turns):
    """[[{"name", "arguments"}, ...] per assistant turn that calls tools]."""
    return [[parse_tool_call(tool_call_text(c))[0] for c in t["tool_calls"]] for t in turns if t.get("tool_calls")]


def questions(record):
    """The conversation cut before each user message: one list of turns per question (no system turn)."""
    cuts = [i for i, t in enumerate(record["conversations"]) if t["role"] == "user"] + [None]
    return [record["conversations"][a:b] for a, b in zip(cuts, cuts[1:])]


def test_tool_conversations_offer_the_demo_tools_and_cover_every_kind(demo):
    sft = read(demo["sft"])
    offering = [r for r in sft if offers_tools(r)]
    assert 0.12 < len(offering) / len(sft) < 0.32, len(offering) / len(sft)
    in_words = sum("tools" not in r for r in offering) / len(offering)
    assert abs(in_words - demo_data.SHORT_TOOLS_SHARE) < 0.1, in_words
    for record in tool_records(demo):
        if "tools" in record:
            assert record["tools"] == [LOOKUP, CALCULATOR] and record["conversations"][0]["role"] == "user"
    assert all("tools" in r for r in read(demo["tools_eval"])), "the eval offers the schemas, as the API does"
    counts = {len(questions(r)) for r in offering}
    assert counts == set(range(1, demo_data.MAX_TOOL_QUESTIONS + 1)), "several questions share the tools"
    shapes = {tuple(tuple(c["name"] for c in calls) for calls in rounds_of_calls(q))
              for r in tool_records(demo) for q in questions(r)}
    # no call (small talk, a town, a small sum), one lookup, the calculator, a lookup and then the calculator
    assert shapes == {(), (("lookup",),), (("calculator",),), (("lookup",), ("calculator",))}, shapes
    evals = read(demo["tools_eval"])
    assert {r["kind"] for r in evals} == {"lookup", "months", "calc", "direct"}
    assert {r["lang"] for r in evals} == {"en", "zh"}


def test_tool_results_in_the_data_are_what_executing_the_calls_returns(demo):
    """Every tool turn holds the demo toolbox's answer to the call it answers (matched by id), never an error."""
    toolbox = demo_toolbox(seed=0)
    checked = 0
    for record in tool_records(demo):
        calls = {}
        for turn in record["conversations"]:
            for call in turn.get("tool_calls") or []:
                calls[call["id"]] = parse_tool_call(tool_call_text(call))[0]
            if turn["role"] == "tool":
                call = calls.pop(turn["tool_call_id"])
                assert turn["content"] == toolbox.call(call["name"], call["arguments"]), (call, turn)
                assert not turn["content"].startswith("error")
                checked += 1
        assert not calls, "every call is answered"
    assert checked > 50


def test_tool_calls_follow_their_lead_in_and_answers_use_the_results(demo):
    """A lookup's lead-in names the attribute (in the question's language) and the call puts it first; a
    calculator's lead-in holds the expression; the final reply states the last result; Chinese names get Chinese
    values and Chinese replies."""
    zh_names, toolbox = {zh for _, zh, _ in PEOPLE}, demo_toolbox()
    for turns in (q for record in tool_records(demo) for q in questions(record)):
        results = [t["content"] for t in turns if t["role"] == "tool"]
        if results:
            assert results[-1] in turns[-1]["content"], turns
        for turn, calls in zip([t for t in turns if t.get("tool_calls")], rounds_of_calls(turns)):
            for call in calls:
                args = call["arguments"]
                if call["name"] == "calculator":
                    assert args["expression"] in turn["content"]
                    continue
                lang = "zh" if args["person"] in zh_names else "en"
                assert list(args) == ["attribute", "person"]
                assert demo_data.ATTRIBUTE_WORDS[lang][args["attribute"]] in turn["content"]
                if lang == "zh":
                    answer = toolbox.call("lookup", args)
                    assert CJK.search(answer) or answer.isdigit(), answer
                    assert CJK.search(turns[-1]["content"])


def test_tool_eval_records_carry_their_calls_and_score_their_own_reference(demo):
    for record in read(demo["tools_eval"]):
        assert record["calls"] == rounds_of_calls(record["conversations"])
        assert prompt_turns(record)[-1]["role"] == "user" and len(prompt_turns(record)) == 1
        turns = record["conversations"]
        n_calls = sum(len(t.get("tool_calls") or []) for t in turns)
        assert score_tool_answer(record, turns[-1]["content"], n_calls), record
        if record["calls"]:
            first = turns[1]["content"] + "".join(f"\n<tool_call>{tool_call_text(c)}</tool_call>"
                                                  for c in turns[1]["tool_calls"])
            assert score_tool_call(record, first) == {"parses": True, "right_tool": True, "right_args": True}
            assert not score_tool_answer(record, turns[-1]["content"], 0)  # right answer, but no tool was called
        else:
            assert not score_tool_answer(record, turns[-1]["content"], 1)  # a needless call


LOOKUP_RECORD = {"calls": [[{"name": "lookup", "arguments": {"person": "Anna", "attribute": "age"}}],
                           [{"name": "calculator", "arguments": {"expression": "34 * 12"}}]],
                 "answer": "408", "attribute": "number"}


@pytest.mark.parametrize("reply, expected", [
    ('<tool_call>{"name": "lookup", "arguments": {"person": "Anna", "attribute": "age"}}</tool_call>', (1, 1, 1)),
    ('<tool_call>{"name": "lookup", "arguments": {"person": " Anna ", "attribute": "age"}}</tool_call>', (1, 1, 1)),
    ('<tool_call>{"name": "lookup", "arguments": "{\\"person\\": \\"Anna\\", \\"attribute\\": \\"age\\"}"}'
     '</tool_call>', (1, 1, 1)),  # arguments as a JSON string, as OpenAI writes them
    ('<tool_call>{"name": "lookup", "arguments": {"person": "Anna", "attribute": "age"}}', (1, 1, 1)),  # no close
    ('<tool_call>{"name": "lookup", "arguments": {"person": "Anna", "attribute": "age"</tool_call>', (0, 0, 0)),
    ('<tool_call>lookup(Anna, age)</tool_call>', (0, 0, 0)),
    ('<tool_call>{"arguments": {"person": "Anna"}}</tool_call>', (0, 0, 0)),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "34 * 12"}}</tool_call>', (1, 0, 0)),
    ('<tool_call>{"name": "lookup", "arguments": {"person": "Ben", "attribute": "age"}}</tool_call>', (1, 1, 0)),
    ('<tool_call>{"name": "lookup", "arguments": {"person": "Anna"}}</tool_call>', (1, 1, 0)),
    ('<tool_call>{"name": "lookup", "arguments": {"person": "Anna", "attribute": "age", "x": 1}}</tool_call>',
     (1, 1, 0)),
    ("Anna is 34 years old.", (0, 0, 0)),  # no call at all
    ("", (0, 0, 0)),
])
def test_score_tool_call_cases(reply, expected):
    scores = score_tool_call(LOOKUP_RECORD, reply)
    assert (scores["parses"], scores["right_tool"], scores["right_args"]) == tuple(map(bool, expected))


def test_score_tool_call_compares_calculator_expressions_without_spaces():
    record = {"calls": [[{"name": "calculator", "arguments": {"expression": "347 * 29"}}]]}
    for expression, right in [("347 * 29", True), ("347*29", True), ("347 × 29", True), ("347 * 28", False),
                              ("10063", False)]:
        reply = f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>'
        assert score_tool_call(record, reply)["right_args"] is right, expression


def test_score_tool_answer_needs_the_answer_and_calls_exactly_when_needed():
    assert score_tool_answer(LOOKUP_RECORD, "Anna is 408 months old.", 2)
    assert score_tool_answer(LOOKUP_RECORD, "安娜已经408个月大了。<|im_end|>", 2)
    assert not score_tool_answer(LOOKUP_RECORD, "Anna is 407 months old.", 2)
    assert not score_tool_answer(LOOKUP_RECORD, "Anna is 408 months old.", 0)  # guessed, no tool
    assert not score_tool_answer(LOOKUP_RECORD, "", 2)  # never ended (the loop ran out of rounds)
    town = {"calls": [], "answer": "silk", "attribute": "specialty"}
    assert score_tool_answer(town, "Redhill is famous for its silk.", 0)
    assert not score_tool_answer(town, "Redhill is famous for its silk.", 1)  # a needless call
    assert not score_tool_answer(town, "Redhill is famous for its tea.", 0)
    fact = {"calls": [[{"name": "lookup", "arguments": {"person": "Anna", "attribute": "city"}}]],
            "answer": "Redhill", "attribute": "city"}
    assert score_tool_answer(fact, "Anna lives in Redhill.", 1)
    assert not score_tool_answer(fact, "Anna lives in Redhill or Stonebridge.", 1)


def test_split_tool_calls():
    assert split_tool_calls("Anna is 34.") == ("Anna is 34.", [])
    assert split_tool_calls('Let me check.\n<tool_call>{"a": 1}</tool_call>\n<tool_call>{"b": 2}</tool_call>'
                            "<|im_end|>") == ("Let me check.", ['{"a": 1}', '{"b": 2}'])
    assert split_tool_calls('<tool_call>{"a": 1') == ("", ['{"a": 1'])  # the reply ended inside the call


def test_score_direct_is_the_bare_answer_after_an_empty_think():
    record = {"answer": "7"}
    assert score_direct(record, "<answer>7</answer>")
    assert score_direct(record, "<answer>7</answer><|im_end|>")
    assert not score_direct(record, "<answer>8</answer>")
    assert not score_direct(record, "<answer>7 or 8</answer>")
    assert not score_direct(record, "7")  # no tags
    assert not score_direct(record, "Count up 2 from 5: (1) 6, (2) 7.</think><answer>7</answer>")  # it reasoned
    assert not score_direct(record, "<answer>7</answer><answer>7</answer>")


def test_default_sizes_and_speed(tmp_path):
    """The defaults give ~1-3 MB of pretraining text and a few thousand conversations, in a few seconds."""
    import time
    start = time.perf_counter()
    paths = generate_demo(str(tmp_path), seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 15, elapsed
    import os
    assert 1e6 < os.path.getsize(paths["pretrain"]) < 3e6
    counts = {name: len(read(path)) for name, path in paths.items()}
    assert counts["sft"] >= 2000 and 1000 <= counts["reasoning"] <= 2000 and counts["dpo"] >= 1000
    assert all(counts[n] >= 200 for n in ("pretrain_eval", "sft_eval", "reasoning_eval", "dpo_eval"))


def test_cli_prints_counts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["demo_data.py", "--out_dir", str(tmp_path), "--scale", "0.02"])
    demo_data.main()
    out = capsys.readouterr().out
    assert "sft.jsonl" in out and "records" in out and "MB" in out
    assert (tmp_path / "dpo_eval.jsonl").exists()


@pytest.mark.parametrize("flags, message", [
    (["--scale", "0"], "argument --scale: must be > 0, got 0"),
    (["--scale", "nan"], "argument --scale: must be a finite number, got 'nan'"),
    (["--scale", "1e9"], "argument --scale: must be <= 1000, got 1e9"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["--seed", "0.5"], "argument --seed: expected an integer, got '0.5'"),
])
def test_bad_flags_are_refused_naming_the_flag(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        demo_data.main(["--out_dir", str(tmp_path / "out"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        demo_data.main(["--out_dir", str(taken)])
    assert e.value.code == 2 and f"argument --out_dir: {taken} exists and is not a folder" in capsys.readouterr().err


def test_unwritable_out_dir_is_one_line(tmp_path):
    import subprocess
    import sys
    blocked = tmp_path / "file"
    blocked.write_text("x", encoding="utf-8")
    proc = subprocess.run([sys.executable, demo_data.__file__, "--out_dir", str(blocked / "sub"), "--scale", "0.01"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"demo_data.py: error: --out_dir {blocked / 'sub'}: ")
