"""Verifiable rewards for grpo.py, and the answer matching eval_bench.py scores with (one implementation of both).

    from rewards import REWARDS, Completion, accuracy_reward, extract_answer, normalize_answer

A reward function takes a Completion (the sampled reply's text, the reference reply, its length in tokens and the
length cap) and returns a float. REWARDS maps the names grpo.py's --rewards flag takes to these functions; add a
function there to make it available.

    accuracy   1 when the reply's answer equals the reference's after normalisation, else 0. The answer is the
               <answer>…</answer> content, else the text after "####", else the last number (as eval_bench).
    format     1 when the reply is exactly <think>…</think><answer>…</answer> (both parts non-empty, no tag inside
               either), else 0.
    length     DAPO's soft overlong penalty: 0 up to the last quarter of the cap, then falling linearly to -1 at
               the cap (a reply cut off by the cap gets -1), so replies learn to finish with room to spare.
"""
if __name__ == "__main__":  # before the imports: a library module answers at once, not after torch loads
    raise SystemExit("rewards.py is a library module, not a script: "
                     "train with rewards through grpo.py (see README.md)")
import re
import unicodedata
from typing import NamedTuple

from inference import split_reasoning

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
REASONING = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


# ------------------------------------------------------------------------------------------ answer matching

def extract_answer(text):
    """The answer in a reply or reference: <answer> content, else after "####", else the last number, else the
    reply without its <think> part."""
    tagged = ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1]
    if "####" in text:
        return text.rsplit("####", 1)[1]
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else split_reasoning(text)[1]


def normalize_answer(text):
    """Comparable form: NFKC (full-width → ASCII), lowercase, single spaces, no thousands commas, "$", "%" or final
    punctuation; a number loses trailing decimal zeros ("18.50" → "18.5", "18.0" → "18")."""
    text = unicodedata.normalize("NFKC", text).lower().replace(",", "")
    text = " ".join(text.split()).strip()
    text = text.removeprefix("$").removesuffix("%").rstrip(".。!！").strip()
    if re.fullmatch(r"-?\d+\.\d+", text):
        text = text.rstrip("0").rstrip(".")
    return text


def same_answer(reply, reference):
    """Whether a reply's answer matches the reference reply's (both extracted and normalised)."""
    return normalize_answer(extract_answer(reply)) == normalize_answer(extract_answer(reference))


# ---------------------------------------------------------------------------------------------------- rewards

class Completion(NamedTuple):
    text: str          # the sampled reply, decoded with its special tokens, without the stop token
    reference: str     # the reference reply (the record's final assistant turn)
    n_tokens: int      # tokens sampled, the stop token included
    max_tokens: int    # the length cap (--max_new_tokens)


def accuracy_reward(c):
    return float(same_answer(c.text, c.reference))


def format_reward(c):
    match = REASONING.fullmatch(c.text)
    if match is None:
        return 0.0
    think, answer = match.group(1).strip(), match.group(2).strip()
    return float(bool(think and answer) and not any(tag in think + answer for tag in TAGS))


def length_reward(c):
    """0 for n <= cap − buffer, then (cap − buffer − n) / buffer down to −1 at the cap; buffer = cap / 4."""
    buffer = max(c.max_tokens // 4, 1)
    return max(min(0.0, (c.max_tokens - buffer - c.n_tokens) / buffer), -1.0)


REWARDS = {"accuracy": accuracy_reward, "format": format_reward, "length": length_reward}
