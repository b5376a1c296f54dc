"""pretrain.py end to end: exact resume (stopped or SIGKILLed), 2-process gloo DDP equals 1 process, NaN stop,
schedule by optimizer steps across an epoch boundary, and clear errors."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, sample_sentence, torchrun, write_jsonl

import pretrain
from checkpoint import load_model
from cli import UserError
from train_utils import lr_at

SMALL = ["--preset", "tiny", "--dim", "32", "--n_layers", "2", "--n_heads", "2", "--n_kv_heads", "1",
         "--max_seq_len", "32", "--batch_size", "4", "--learning_rate", "3e-3", "--warmup_steps", "2",
         "--log_interval", "1000"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(1)
    d = tmp_path_factory.mktemp("corpus")
    texts = [" ".join(sample_sentence(rng, rng.randint(4, 20)) for _ in range(2)) for _ in range(120)]
    return {"train": write_jsonl(d / "train.jsonl", [{"text": t} for t in texts[:100]]),
            "eval": write_jsonl(d / "eval.jsonl", [{"text": t} for t in texts[100:]]),
            "cache": str(d / "cache")}


def args_for(corpus, tokenizer_dir, save_dir, *extra):
    return ["--data_path", corpus["train"], "--tokenizer_path", tokenizer_dir, "--save_dir", str(save_dir),
            "--cache_dir", corpus["cache"], *SMALL, *extra]


def checkpoint(save_dir, name="latest_checkpoint.pth"):
    return torch.load(os.path.join(save_dir, name), map_location="cpu", weights_only=True)


def assert_same_run(a, b):
    """Bitwise-equal weights and the same loss at every step."""
    assert [r["loss"] for r in a["history"]["train"]] == [r["loss"] for r in b["history"]["train"]]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key


def test_stopped_and_resumed_run_is_bitwise_identical(corpus, tokenizer_dir, tmp_path):
    # ~24 windows per epoch / batch 4 = 6 micro-batches; accumulation 4 makes steps straddle the epoch boundary.
    common = ["--epochs", "3", "--accumulation_steps", "4", "--save_step", "2", "--eval_data", corpus["eval"],
              "--eval_interval", "2"]
    pretrain.main(args_for(corpus, tokenizer_dir, tmp_path / "full", *common))
    full = checkpoint(tmp_path / "full")
    per_epoch_micro = full["micro_step"] // 3
    assert full["step"] == -(-full["micro_step"] // 4)  # the last, shorter step keeps the leftover micro-batches
    assert per_epoch_micro % 4 != 0, "the test needs a step that spans an epoch boundary"

    pretrain.main(args_for(corpus, tokenizer_dir, tmp_path / "split", *common, "--stop_step", "3"))
    stopped = checkpoint(tmp_path / "split")
    assert stopped["step"] == 3 and not os.path.exists(tmp_path / "split" / "pretrain_final.pth")
    pretrain.main(args_for(corpus, tokenizer_dir, tmp_path / "split", *common, "--resume_from", "auto"))
    resumed = checkpoint(tmp_path / "split")
    assert_same_run(full, resumed)
    assert [r["step"] for r in resumed["history"]["train"]] == list(range(1, full["step"] + 1))  # no repeat/skip
    assert full["history"]["eval"] == resumed["history"]["eval"]
    final_a, final_b = checkpoint(tmp_path / "full", "pretrain_final.pth"), checkpoint(tmp_path / "split",
                                                                                         "pretrain_final.pth")
    assert all(torch.equal(final_a["model"][k], final_b["model"][k]) for k in final_a["model"])


def test_sigkill_right_after_a_save_then_resume_is_bitwise_identical(corpus, tokenizer_dir, tmp_path):
    common = ["--epochs", "8", "--accumulation_steps", "2", "--save_step", "3"]
    pretrain.main(args_for(corpus, tokenizer_dir, tmp_path / "full", *common))
    save_dir = tmp_path / "killed"
    latest = save_dir / "latest_checkpoint.pth"
    proc = subprocess.Popen([sys.executable, "pretrain.py", *args_for(corpus, tokenizer_dir, save_dir, *common)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = checkpoint(save_dir)["step"]
    assert killed_at < checkpoint(tmp_path / "full")["step"]
    pretrain.main(args_for(corpus, tokenizer_dir, save_dir, *common, "--resume_from", str(latest)))
    assert_same_run(checkpoint(tmp_path / "full"), checkpoint(save_dir))


def test_two_process_gloo_ddp_matches_one_process(corpus, tokenizer_dir, tmp_path):
    common = ["--epochs", "1", "--accumulation_steps", "2", "--max_steps", "4", "--eval_data", corpus["eval"],
              "--eval_interval", "4"]
    one = args_for(corpus, tokenizer_dir, tmp_path / "one", *common)
    one[one.index("--batch_size") + 1] = "8"
    pretrain.main(one)
    two = args_for(corpus, tokenizer_dir, tmp_path / "two", *common)  # batch 4 per process × 2 processes
    torchrun("pretrain.py", two)
    a, b = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two")
    assert b["world_size"] == 2
    losses_a = [r["loss"] for r in a["history"]["train"]]
    losses_b = [r["loss"] for r in b["history"]["train"]]
    assert len(losses_a) == len(losses_b) == 4
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    assert a["history"]["eval"][0]["val_loss"] == pytest.approx(b["history"]["eval"][0]["val_loss"], rel=1e-5)
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-5), key


def test_lr_schedule_counts_optimizer_steps(corpus, tokenizer_dir, tmp_path):
    pretrain.main(args_for(corpus, tokenizer_dir, tmp_path, "--epochs", "2", "--accumulation_steps", "3",
                           "--min_lr", "1e-4"))
    ckpt = checkpoint(tmp_path)
    steps = ckpt["step"]
    logged = [r["lr"] for r in ckpt["history"]["train"]]
    assert logged == [pytest.approx(lr_at(s, steps, 2, 3e-3, 1e-4)) for s in range(steps)]
    assert logged[-1] == pytest.approx(1e-4)  # the cosine reaches its floor at the last optimizer step


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tokenizer_dir, tmp_path, monkeypatch):
    from model import Transformer
    forward, calls = Transformer.forward, {"n": 0}

    def poisoned(self, *a, **kw):
        out = forward(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] > 6 and self.training:  # step 4 of 2 micro-batches each
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned)
    with pytest.raises(SystemExit, match="loss is nan at step 4.*last good state"):
        pretrain.main(args_for(corpus, tokenizer_dir, tmp_path, "--epochs", "3", "--accumulation_steps", "2",
                               "--save_step", "2"))
    ckpt = checkpoint(tmp_path)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not os.path.exists(tmp_path / "pretrain_final.pth")


def test_final_weights_load_for_inference(corpus, tokenizer_dir, tmp_path):
    pretrain.main(args_for(corpus, tokenizer_dir, tmp_path, "--max_steps", "2"))
    model, meta = load_model(str(tmp_path / "pretrain_final.pth"))
    folder_model, _ = load_model(str(tmp_path / "pretrain_final"))
    assert meta["stage"] == "pretrain" and model.config.dim == 32
    ids = torch.randint(0, 512, (1, 10))
    assert torch.equal(model(ids).logits, folder_model(ids).logits)
    assert os.path.exists(tmp_path / "pretrain_curves.png")


def test_missing_data_explains_where_to_get_it(tmp_path):
    with pytest.raises(UserError, match=r"(?s)no pretraining data at .*nothing\.jsonl.*modelscope download.*demo"):
        pretrain.main(["--data_path", str(tmp_path / "nothing.jsonl")])


def test_resume_refuses_changed_batch_size(corpus, tokenizer_dir, tmp_path):
    pretrain.main(args_for(corpus, tokenizer_dir, tmp_path, "--max_steps", "2"))
    changed = args_for(corpus, tokenizer_dir, tmp_path, "--max_steps", "4", "--resume_from", "auto")
    changed[changed.index("--batch_size") + 1] = "2"
    with pytest.raises(UserError, match=r"--batch_size 2 \(the run has 4\); --max_steps 4 \(the run has 2\)"):
        pretrain.main(changed)
