"""Train the byte-level BPE tokenizer with single-id special tokens and a ChatML chat template.

    python train_tokenizer.py --data_path data/pretrain.jsonl data/sft.jsonl --vocab_size 6400 --out_dir tokenizer

Reads JSONL files as a stream (pretraining `text` and `conversations` records alike), so a multi-GB corpus never
sits in memory. The output folder loads with `transformers.AutoTokenizer.from_pretrained(out_dir)`.
"""
import argparse
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Order fixes the ids: <|endoftext|> is 0, <|im_start|> 1, <|im_end|> 2, ... <|pad|> 7.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>",
                  "<|pad|>"]
REASONING_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]

# ChatML. dataset.render_chat builds exactly this string; a test holds the two together.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def iter_texts(paths):
    """Yield every text of pretraining records and every turn of conversation/DPO records, one line at a time."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
                if "text" in record:
                    yield record["text"]
                for key in ("conversations", "chosen", "rejected"):
                    for turn in record.get(key, []):
                        yield turn["content"]


def build_tokenizer(texts, vocab_size):
    """Train byte-level BPE on an iterator of strings; returns a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, f"special token {token} got id {tok.token_to_id(token)}, expected {i}"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|pad|>")],
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=1 << 30)
