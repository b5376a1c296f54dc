"""Shared fixtures: every test makes its own small data and tokenizer; nothing reads ../shared or the network."""
import json
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS_EN = ("the model learns to read and write small stories about cats dogs rivers and stars while "
            "every token counts toward the loss of a careful training run").split()
WORDS_ZH = list("模型学习阅读和写作关于猫狗河流与星星的小故事每个词都计入训练损失中天地人你我他山水花")


def sample_sentence(rng, n=12):
    if rng.random() < 0.5:
        return " ".join(rng.choice(WORDS_EN) for _ in range(n)).capitalize() + "."
    return "".join(rng.choice(WORDS_ZH) for _ in range(n)) + "。"


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def torchrun(script, argv, timeout=600):
    """Run `script` under a 2-process CPU torchrun (gloo); a failure shows the processes' stderr, and a run that
    hangs fails after `timeout` seconds instead of holding up the suite."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", script, *argv, "--device", "cpu"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{script} under torchrun did not finish in {timeout} s; its stderr:\n"
                             f"{(e.stderr or b'').decode(errors='replace')[-3000:]}") from None
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A 512-token byte-level BPE trained on generated bilingual text by train_tokenizer.build_tokenizer."""
    from train_tokenizer import build_tokenizer
    rng = random.Random(0)
    texts = [sample_sentence(rng, rng.randint(5, 30)) for _ in range(2000)]
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(iter(texts), vocab_size=512).save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def trained_tiny_model(tokenizer, config, steps=60):
    """A model of `config` after a few AdamW steps on generated text, so greedy decoding follows real preferences
    (a random model repeats one token)."""
    import torch

    from model import Transformer
    torch.manual_seed(0)
    model = Transformer(config)
    rng = random.Random(0)
    ids = tokenizer(" ".join(sample_sentence(rng, 20) for _ in range(60)))["input_ids"]
    data = torch.tensor(ids[: len(ids) // 65 * 65]).view(-1, 65)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = data[step % len(data):][:8]
        loss = model(batch[:, :-1], targets=batch[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def sharpened_tiny_model(vocab_size, max_seq_len, seed=0, sharpen=20):
    """A random model with sharpened logits: greedy choices are far from ties, so batched and unbatched paths agree."""
    import torch

    from Config import LLMConfig
    from model import Transformer
    torch.manual_seed(seed)
    config = LLMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=max_seq_len,
                       tie_word_embeddings=False)
    model = Transformer(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model.eval()


def refused(main, argv, capsys):
    """(exit status, the one stderr line that says "error:") of running a script's main as its command line would;
    asserts there was no traceback."""
    from cli import run_main
    with pytest.raises(SystemExit) as stopped:
        run_main(main, argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return stopped.value.code, errors[0]
