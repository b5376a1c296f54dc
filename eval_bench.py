"""Benchmarks from local files: multiple choice by log-likelihood, exact-match answers by greedy generation.

    python eval_bench.py --model_mode 1 --data_path ceval_val.jsonl gsm8k_test.jsonl --output_file results/bench.json
    python eval_bench.py --model_path results/distill_final.pth --data_path gsm8k_test.jsonl --max_new_tokens 256

Multiple choice (C-Eval, CMMLU, ARC style), one item per line:
    {"question": str, "choices": ["...", "..."] or {"A": "...", "B": "..."}, "answer": "B" or 1}
  also accepted: C-Eval's top-level "A".."D" fields, ARC's "choices": {"text": [...], "label": [...]} and "answerKey".
Every choice is scored by its log-likelihood given the question prompt. accuracy picks the highest sum,
accuracy_norm the highest sum per character of the choice (lm-evaluation-harness's acc_norm, which does not favour
short choices). The choices of several items run in one padded batch.

Exact match (GSM8K style): {"question": str, "answer": str} or {"conversations": [..., user turn, reference
assistant turn]} (a top-level "answer" field, if present, is the reference instead). The model answers greedily;
the <answer>…</answer> content (else the text after "####", else the last number, else the reply) is compared with
the reference's after normalisation (NFKC, strip, lowercase, no thousands commas, no "$", "%" or final ".",
numbers canonical: "18.0" → "18"). --samples K also samples K replies per item at --temperature and reports
sampled_accuracy (the share of all K·items replies that are right: what a user sampling at that temperature gets,
and the expected reward RL maximises) and pass_at_k (the share of items with at least one right reply). Each
sampled reply draws from its own random stream keyed by (--seed, file line, sample number), so the figures do not
depend on --batch_size.

    python eval_bench.py --model_path results/grpo_final.pth --data_path reasoning_eval.jsonl --samples 8

Prompts: chat models (every stage but pretrain) get the question as a user message in the ChatML template; a
pretrained model gets "Question: …\\nAnswer:" (--template overrides). The task kind is read off each file's first
record. evaluate_file() and the functions below run the same in-process.
"""
import json
import os

import torch
import torch.nn.functional as F

from checkpoint import check_tokenizer
from cli import NONNEG_INT, POSITIVE, POSITIVE_INT, ArgumentParser, UserError, run_main
from dataset import DataError, encode_text, load_tokenizer
from inference import (DTYPES, MODES, checkpoint_path, device_flag, encode_prompt, encode_raw, generate_batch,
                       inference_device, inference_dtype, load_for_inference, sample_batch, stop_ids)
from rewards import extract_answer, normalize_answer
from train_utils import ROOT

LETTERS = "ABCDEFGHIJ"


# --------------------------------------------------------------------------------------------------- reading items

def read_records(path, max_samples=None):
    """Yield (line_no, dict) from a JSONL file; bad JSON raises DataError naming path:line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; expected a JSONL file of benchmark items")
    with open(path, "rb") as f:
        count = 0
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if max_samples is not None and count >= max_samples:
                return
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e})") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            count += 1
            yield line_no, record


def task_kind(record):
    """"choice" for multiple-choice items, "exact" for question/answer items."""
    return "choice" if "choices" in record or "A" in record else "exact"


def choice_lists(record):
    """(labels, texts) of a multiple-choice record, whichever of the accepted layouts it uses."""
    choices = record.get("choices")
    if choices is None:  # C-Eval / CMMLU rows: the choices are top-level A, B, C, ... fields
        labels = [letter for letter in LETTERS if letter in record]
        return labels, [record[letter] for letter in labels]
    if isinstance(choices, list):
        return list(LETTERS[:len(choices)]), choices
    if isinstance(choices, dict) and set(choices) == {"text", "label"}:  # ARC on the Hugging Face hub
        return list(choices["label"]), list(choices["text"])
    if isinstance(choices, dict):
        return list(choices), list(choices.values())
    raise ValueError("'choices' must be a list or an object of label -> text")


def choice_item(record):
    """(question, choice texts, index of the right one); ValueError says what is wrong."""
    if not isinstance(record.get("question"), str):
        raise ValueError("missing or non-string field 'question'")
    labels, texts = choice_lists(record)
    if len(texts) < 2 or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("expected at least two non-empty string choices")
    if len(texts) > len(LETTERS) or len(labels) != len(texts):
        raise ValueError(f"expected 2 to {len(LETTERS)} choices, each with one label")
    key = record.get("answer", record.get("answerKey"))
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(texts):
        return record["question"], texts, key
    if isinstance(key, str) and key.strip() in labels:
        return record["question"], texts, labels.index(key.strip())
    raise ValueError(f"'answer' must be one of the labels {labels} or an index below {len(texts)}, got {key!r}")


def exact_item(record):
    """(messages to answer, reference text); ValueError says what is wrong."""
    if "conversations" in record:
        turns = record["conversations"]
        if not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns)
                and turns[-1].get("role") == "assistant" and turns[-2].get("role") == "user"):
            raise ValueError("'conversations' must end with a user turn and the reference assistant turn")
        reference = record.get("answer", turns[-1].get("content"))
        messages = turns[:-1]
    else:
        if not isinstance(record.get("question"), str):
            raise ValueError("expected a 'question' and an 'answer', or 'conversations'")
        reference, messages = record.get("answer"), [{"role": "user", "content": record["question"]}]
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        reference = str(reference)
    if not isinstance(reference, str) or not reference.strip():
        raise ValueError("missing or empty reference answer")
    return messages, reference


def items(path, parse, max_samples=None):
    """[(line_no, parsed item)] with parse(record); a bad record raises DataError naming path:line."""
    parsed = []
    for line_no, record in read_records(path, max_samples):
        try:
            parsed.append((line_no, parse(record)))
        except ValueError as e:
            raise DataError(f"{path}:{line_no}: {e}") from e
    return parsed


# --------------------------------------------------------------------------------------------------------- prompts

def question_ids(tokenizer, messages, template):
    """Prompt ids: the ChatML generation prompt ("chat"), or "Question: …\\nAnswer:" after a document boundary."""
    if template == "chat":
        return encode_prompt(tokenizer, messages)
    return encode_raw(tokenizer, f"Question: {messages[-1]['content']}\nAnswer:")


def choice_ids(tokenizer, text, template):
    """A choice's ids, tokenized on its own so every choice shares the exact question ids before it; plain text
    (a choice that reads "<|im_end|>" is those characters)."""
    return encode_text(tokenizer, text if template == "chat" else " " + text)


# ------------------------------------------------------------------------------------------------ multiple choice

@torch.no_grad()
def continuation_logprobs(model, pairs, batch_size=16):
    """Σ log P(continuation | context) for each (context ids, continuation ids) pair, batch_size pairs per forward.

    A context too long for the model loses its oldest tokens; the continuation is always scored whole."""
    device, context = model.embed_tokens.weight.device, model.config.max_seq_len
    scores = []
    for start in range(0, len(pairs), batch_size):
        rows = []
        for ctx, cont in pairs[start:start + batch_size]:
            if len(cont) > context:
                raise ValueError(f"a choice of {len(cont)} tokens does not fit in max_seq_len {context}")
            ids = (list(ctx) + list(cont))[-(context + 1):]
            rows.append((ids, len(cont)))
        length = max(len(ids) for ids, _ in rows) - 1
        inputs = torch.zeros(len(rows), length, dtype=torch.long)
        targets = torch.full((len(rows), length), -100, dtype=torch.long)
        for r, (ids, n_cont) in enumerate(rows):  # right padding; only the continuation's tokens are targets
            inputs[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            targets[r, len(ids) - 1 - n_cont:len(ids) - 1] = torch.tensor(ids[-n_cont:])
        logits = model(inputs.to(device)).logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), targets.to(device), ignore_index=-100, reduction="none")
        scores += (-nll.sum(dim=1)).tolist()
    return scores


def evaluate_choice(model, tokenizer, path, template="chat", batch_size=16, max_samples=None, predictions=None):
    """accuracy (highest summed log-likelihood) and accuracy_norm (highest per character) over a choice file."""
    parsed = items(path, choice_item, max_samples)
    pairs = []
    for _, (question, texts, _) in parsed:
        context = question_ids(tokenizer, [{"role": "user", "content": question}], template)
        pairs += [(context, choice_ids(tokenizer, text, template)) for text in texts]
    scores = iter(continuation_logprobs(model, pairs, batch_size))
    correct = correct_norm = 0
    for line_no, (_, texts, answer) in parsed:
        sums = [next(scores) for _ in texts]
        pred = max(range(len(texts)), key=lambda i: sums[i])
        pred_norm = max(range(len(texts)), key=lambda i: sums[i] / len(texts[i]))
        correct, correct_norm = correct + (pred == answer), correct_norm + (pred_norm == answer)
        if predictions is not None:
            predictions.append({"file": path, "line": line_no, "answer": answer, "prediction": pred,
                                "prediction_norm": pred_norm, "logprobs": sums})
    n = len(parsed)
    return {"file": path, "kind": "choice", "items": n, "accuracy": correct / max(n, 1),
            "accuracy_norm": correct_norm / max(n, 1)}


# ---------------------------------------------------------------------------------------------------- exact match

def evaluate_exact(model, tokenizer, path, template="chat", batch_size=16, max_samples=None, max_new_tokens=256,
                   predictions=None, samples=0, temperature=1.0, seed=0):
    """Exact-match accuracy of greedy answers over a question/answer file; with samples > 0 also the accuracy of
    that many sampled replies per item at temperature (sampled_accuracy) and pass_at_k."""
    parsed = items(path, exact_item, max_samples)
    prompts = [question_ids(tokenizer, messages, template) for _, (messages, _) in parsed]
    order = sorted(range(len(parsed)), key=lambda i: len(prompts[i]))  # similar lengths batch with little padding
    replies, sampled = [""] * len(parsed), [[] for _ in parsed]
    stops = stop_ids(tokenizer, raw=template == "raw")
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        batch_prompts = [prompts[i] for i in batch]
        for i, reply in zip(batch, generate_batch(model, tokenizer, batch_prompts, max_new_tokens, stops)):
            replies[i] = reply
        if samples:
            keys = [f"eval_bench-{seed}-{parsed[i][0]}" for i in batch]
            for i, texts in zip(batch, sample_batch(model, tokenizer, batch_prompts, max_new_tokens, stops, samples,
                                                    temperature, keys)):
                sampled[i] = texts
    correct, sampled_right, any_right = 0, 0, 0
    for (line_no, (_, reference)), reply, texts in zip(parsed, replies, sampled):
        expected, got = normalize_answer(extract_answer(reference)), normalize_answer(extract_answer(reply))
        right = sum(normalize_answer(extract_answer(t)) == expected for t in texts)
        correct += expected == got
        sampled_right += right
        any_right += right > 0
        if predictions is not None:
            predictions.append({"file": path, "line": line_no, "reference": expected, "prediction": got,
                                "reply": reply, "correct": expected == got,
                                **({"samples_right": right} if samples else {})})
    n = len(parsed)
    metrics = {"file": path, "kind": "exact", "items": n, "accuracy": correct / max(n, 1)}
    if samples:
        metrics.update(samples=samples, temperature=temperature, sampled_accuracy=sampled_right / max(n * samples, 1),
                       pass_at_k=any_right / max(n, 1))
    return metrics


def evaluate_file(model, tokenizer, path, kind="auto", template="chat", batch_size=16, max_samples=None,
                  max_new_tokens=256, predictions=None, samples=0, temperature=1.0, seed=0):
    """Metrics of one benchmark file; kind "auto" reads it off the first record. predictions (a list) collects one
    dict per item. samples > 0 (exact-match files only) adds the sampled metrics."""
    if kind == "auto":
        first = next(read_records(path), None)
        if first is None:
            raise DataError(f"{path}: no records")
        kind = task_kind(first[1])
    if kind == "choice":
        if samples:
            raise UserError(f"{path} is multiple choice, scored by likelihood: --samples applies to exact-match "
                            f"files only; leave it out for this file")
        return evaluate_choice(model, tokenizer, path, template, batch_size, max_samples, predictions)
    return evaluate_exact(model, tokenizer, path, template, batch_size, max_samples, max_new_tokens, predictions,
                          samples, temperature, seed)


# -------------------------------------------------------------------------------------------------------- the CLI

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    a = p.add_argument
    a("--data_path", nargs="+", required=True, help="benchmark JSONL file(s)")
    a("--model_mode", type=int, choices=sorted(MODES), default=None,
      help="evaluate save_dir/{stage}_final.pth: " + ", ".join(f"{k} {v}" for k, v in MODES.items()) + " (default: 1)")
    a("--save_dir", default="results", help="where the stage scripts wrote their weights")
    a("--model_path", default=None, help="evaluate this checkpoint instead of the --model_mode one")
    a("--kind", choices=["auto", "choice", "exact"], default="auto", help="task kind (auto: by the first record)")
    a("--template", choices=["auto", "chat", "raw"], default="auto",
      help="prompt format (auto: raw for a pretrained model, chat otherwise)")
    a("--batch_size", type=POSITIVE_INT, default=16, help="sequences per forward pass / prompts per generation batch")
    a("--max_samples", type=POSITIVE_INT, default=None,
      help="evaluate only the first N items of each file (default: all)")
    a("--max_new_tokens", type=POSITIVE_INT, default=256, help="exact-match answer length cap")
    a("--samples", type=NONNEG_INT, default=0,
      help="exact match: also sample this many replies per item and report sampled_accuracy and pass_at_k")
    a("--temperature", type=POSITIVE, default=None, help="the sampling temperature of --samples (default 1)")
    a("--seed", type=NONNEG_INT, default=None, help="keys the random streams of --samples (default 0)")
    a("--output_file", default=None, help="write all metrics here as JSON")
    a("--predictions_file", default=None, help="write one JSON line per item (what the model picked or said)")
    a("--tokenizer_path", default=os.path.join(ROOT, "tokenizer"), help="the tokenizer the model was trained with")
    a("--device", type=device_flag, default=None, help="cuda, cuda:1, cpu, mps (default: cuda when available)")
    a("--dtype", choices=DTYPES, default="auto", help="weights' dtype (auto: float32 on CPU, bfloat16 on GPU)")
    args = p.parse_args(argv)
    for flag in ("temperature", "seed"):
        if getattr(args, flag) is not None and not args.samples:
            p.error(f"--{flag} applies to sampled replies: add --samples K (greedy answers use neither)")
    args.temperature = 1.0 if args.temperature is None else args.temperature
    args.seed = 0 if args.seed is None else args.seed
    for path in args.data_path:
        if not os.path.isfile(path):
            p.error(f"--data_path {path}: no such file; expected a JSONL file of benchmark items")
    for flag in ("output_file", "predictions_file"):
        if getattr(args, flag) and os.path.isdir(getattr(args, flag)):
            p.error(f"--{flag} {getattr(args, flag)} is a folder; name a file")
    return args


def write_json(path, obj, lines=False):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if lines:
            f.writelines(json.dumps(o, ensure_ascii=False) + "\n" for o in obj)
        else:
            json.dump(obj, f, indent=2, ensure_ascii=False)


def evaluate_all(model, tokenizer, args, template, predictions):
    """The metrics of every --data_path file, each printed as it finishes."""
    results = []
    for data_path in args.data_path:
        try:
            metrics = evaluate_file(model, tokenizer, data_path, args.kind, template, args.batch_size,
                                    args.max_samples, args.max_new_tokens, predictions, args.samples,
                                    args.temperature, args.seed)
        except DataError:  # already names the file and line
            raise
        except ValueError as e:  # an item that does not fit the model (a choice or prompt too long)
            raise UserError(f"{data_path}: {e}") from None
        results.append(metrics)
        norm = f", accuracy_norm {metrics['accuracy_norm']:.4f}" if "accuracy_norm" in metrics else ""
        if "sampled_accuracy" in metrics:
            norm += (f", sampled_accuracy {metrics['sampled_accuracy']:.4f} and pass@{args.samples} "
                     f"{metrics['pass_at_k']:.4f} ({args.samples} replies per item at temperature "
                     f"{args.temperature:g})")
        print(f"{data_path} ({metrics['kind']}, {metrics['items']} items): accuracy {metrics['accuracy']:.4f}{norm}")
    return results


def main(argv=None):
    args = parse_args(argv)
    path = checkpoint_path(args)
    tokenizer = load_tokenizer(args.tokenizer_path)
    device = inference_device(args.device)
    model, meta = load_for_inference(path, device, inference_dtype(args.dtype, device))
    check_tokenizer(meta, args.tokenizer_path, path)
    pretrained = args.model_mode == 0 if args.model_mode is not None else meta.get("stage") == "pretrain"
    template = ("raw" if pretrained else "chat") if args.template == "auto" else args.template
    predictions = [] if args.predictions_file else None
    results = evaluate_all(model, tokenizer, args, template, predictions)
    if args.output_file:
        write_json(args.output_file, {"model": path, "template": template, "results": results})
    if args.predictions_file:
        write_json(args.predictions_file, predictions, lines=True)


if __name__ == "__main__":
    run_main(main)
