"""Bad input to the training scripts: every case ends with a non-zero status and one line that names the flag (or
the file) and what to do, never a traceback and never a run that silently trains something else. Then the things
that must not be lost: checkpoints under signals, kills, full disks, NaNs and a second run in the same save_dir."""
import errno
import fcntl
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, refused, sample_sentence, write_jsonl

import distill
import dpo
import pretrain
import SFT
import train_utils as tu
from checkpoint import CheckpointError, load_state_strict, read_weights, release_save_dir, tokenizer_fingerprint
from cli import UserError

MODEL = ["--preset", "tiny", "--dim", "32", "--n_layers", "2", "--n_heads", "2", "--n_kv_heads", "1",
         "--max_seq_len", "32"]
TRAIN = ["--batch_size", "4", "--learning_rate", "3e-3", "--log_interval", "1000"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    """Small data of every format, a finished 2-step pretraining run and an unfinished one."""
    rng = random.Random(3)
    d = tmp_path_factory.mktemp("bad_inputs")
    texts = [" ".join(sample_sentence(rng, rng.randint(4, 20)) for _ in range(2)) for _ in range(80)]
    chats = [{"conversations": [{"role": "user", "content": sample_sentence(rng, 5)},
                                {"role": "assistant", "content": sample_sentence(rng, 6)}]} for _ in range(40)]
    pairs = [{"chosen": c["conversations"], "rejected": [c["conversations"][0], {"role": "assistant",
                                                                                 "content": "no."}]} for c in chats]
    w = {"d": d, "tok": tokenizer_dir, "cache": str(d / "cache"),
         "text": write_jsonl(d / "text.jsonl", [{"text": t} for t in texts]),
         "chat": write_jsonl(d / "chat.jsonl", chats), "dpo": write_jsonl(d / "dpo.jsonl", pairs)}
    w["done"], w["half"] = str(d / "done"), str(d / "half")
    pretrain.main(pretrain_args(w, w["done"], "--max_steps", "2"))
    pretrain.main(pretrain_args(w, w["half"], "--max_steps", "4", "--stop_step", "1"))
    return w


def pretrain_args(w, save_dir, *extra):
    return ["--data_path", w["text"], "--tokenizer_path", w["tok"], "--cache_dir", w["cache"], "--save_dir",
            str(save_dir), *MODEL, *TRAIN, *extra]


def chat_args(w, save_dir, *extra, data="chat", start="--pretrained_path"):
    return ["--data_path", w[data], "--tokenizer_path", w["tok"], "--cache_dir", w["cache"], "--save_dir",
            str(save_dir), start, os.path.join(w["done"], "pretrain_final.pth"), *TRAIN, *extra]


def damaged(w, kind):
    path = w["d"] / f"{kind}.pth"
    good = open(os.path.join(w["done"], "latest_checkpoint.pth"), "rb").read()
    path.write_bytes({"empty": b"", "truncated": good[:len(good) // 2], "garbage": random.Random(0).randbytes(4096),
                      "text": b"hello, I am not a checkpoint"}[kind])
    return str(path)


# (script, argv builder, what the one-line error must say)
CASES = {
    "grad_clip negative": (pretrain, lambda w, o: pretrain_args(w, o, "--grad_clip", "-1"),
                           "--grad_clip: must be >= 0"),
    "zero epochs": (pretrain, lambda w, o: pretrain_args(w, o, "--epochs", "0"), "--epochs: must be >= 1"),
    "negative max_steps": (pretrain, lambda w, o: pretrain_args(w, o, "--max_steps", "-1"), "--max_steps: must be"),
    "infinite lr": (pretrain, lambda w, o: pretrain_args(w, o, "--learning_rate", "inf"), "--learning_rate: must be "
                    "a finite number"),
    "nan lr": (pretrain, lambda w, o: pretrain_args(w, o, "--learning_rate", "nan"), "--learning_rate: must be a "
               "finite"),
    "zero lr": (pretrain, lambda w, o: pretrain_args(w, o, "--learning_rate", "0"), "--learning_rate: must be > 0"),
    "word for a number": (pretrain, lambda w, o: pretrain_args(w, o, "--batch_size", "four"),
                          "--batch_size: expected an integer"),
    "zero batch": (pretrain, lambda w, o: pretrain_args(w, o, "--batch_size", "0"), "--batch_size: must be >= 1"),
    "zero accumulation": (pretrain, lambda w, o: pretrain_args(w, o, "--accumulation_steps", "0"),
                          "--accumulation_steps"),
    "floor above peak": (pretrain, lambda w, o: pretrain_args(w, o, "--min_lr", "1"), "--min_lr 1.0 is above"),
    "negative seed": (pretrain, lambda w, o: pretrain_args(w, o, "--seed", "-1"), "--seed: must be >= 0"),
    "negative warmup": (pretrain, lambda w, o: pretrain_args(w, o, "--warmup_steps", "-3"), "--warmup_steps"),
    "warmup longer than the run": (pretrain, lambda w, o: pretrain_args(w, o, "--max_steps", "3",
                                                                        "--warmup_steps", "5"),
                                   "--warmup_steps 5 is longer than the run"),
    "zero save_step": (pretrain, lambda w, o: pretrain_args(w, o, "--save_step", "0"), "--save_step"),
    "zero eval_interval": (pretrain, lambda w, o: pretrain_args(w, o, "--eval_interval", "0"), "--eval_interval"),
    "zero workers": (pretrain, lambda w, o: pretrain_args(w, o, "--num_workers", "0"), "--num_workers"),
    "context of one": (pretrain, lambda w, o: pretrain_args(w, o, "--max_seq_len", "1"), "--max_seq_len: must be"),
    "stop after the end": (pretrain, lambda w, o: pretrain_args(w, o, "--max_steps", "3", "--stop_step", "5"),
                           "--stop_step 5 is after the last step"),
    "epochs too few for max_steps": (pretrain, lambda w, o: pretrain_args(w, o, "--epochs", "1", "--max_steps", "500"),
                                     "--max_steps 500 needs"),
    "heads do not divide dim": (pretrain, lambda w, o: pretrain_args(w, o, "--n_heads", "3"),
                                "dim=32 is not divisible by n_heads=3"),
    "unknown preset": (pretrain, lambda w, o: pretrain_args(w, o, "--preset", "huge"), "--preset: invalid choice"),
    "cuda without a GPU": (pretrain, lambda w, o: pretrain_args(w, o, "--device", "cuda"), "CUDA is not available"),
    "fp16 on CPU": (pretrain, lambda w, o: pretrain_args(w, o, "--dtype", "float16", "--device", "cpu"),
                    "--dtype float16 needs CUDA"),
    "bad bool": (pretrain, lambda w, o: pretrain_args(w, o, "--compile=maybe"), "--compile: expected a boolean"),
    "missing tokenizer": (pretrain, lambda w, o: pretrain_args(w, o, "--tokenizer_path", str(o / "no_tok")),
                          "no_tok: no such tokenizer folder"),
    "empty tokenizer folder": (pretrain, lambda w, o: (os.makedirs(o / "empty_tok"), pretrain_args(
        w, o, "--tokenizer_path", str(o / "empty_tok")))[1], "empty_tok: no tokenizer.json in this folder"),
    "resume from an empty file": (pretrain, lambda w, o: pretrain_args(w, o, "--resume_from", damaged(w, "empty")),
                                  "empty.pth: the file is empty or truncated"),
    "resume from a truncated file": (pretrain, lambda w, o: pretrain_args(w, o, "--resume_from",
                                                                          damaged(w, "truncated")),
                                     "truncated.pth: corrupt or truncated checkpoint"),
    "resume from garbage": (pretrain, lambda w, o: pretrain_args(w, o, "--resume_from", damaged(w, "garbage")),
                            "garbage.pth:"),
    "resume from text": (pretrain, lambda w, o: pretrain_args(w, o, "--resume_from", damaged(w, "text")), "text.pth:"),
    "resume from a missing file": (pretrain, lambda w, o: pretrain_args(w, o, "--resume_from", str(o / "x.pth")),
                                   "x.pth: no such checkpoint file"),
    "resume from final weights": (pretrain, lambda w, o: pretrain_args(
        w, o, "--resume_from", os.path.join(w["done"], "pretrain_final.pth")), "final weights, not a training"),
    "resume another stage's run": (SFT, lambda w, o: chat_args(w, o, "--resume_from", os.path.join(
        w["half"], "latest_checkpoint.pth")), "is a checkpoint of a pretrain run: resume it with pretrain.py"),
    "resume with another preset": (pretrain, lambda w, o: ["--resume_from", os.path.join(w["half"],
                                                                                         "latest_checkpoint.pth"),
                                                           "--preset", "small"], "--preset small (the run has tiny)"),
    "resume with more epochs": (pretrain, lambda w, o: ["--resume_from", os.path.join(w["half"],
                                                                                      "latest_checkpoint.pth"),
                                                        "--epochs", "7"], "--epochs 7 (the run has"),
    "resume with another context": (pretrain, lambda w, o: ["--resume_from", os.path.join(
        w["half"], "latest_checkpoint.pth"), "--max_seq_len", "64"], "--max_seq_len 64 (the run has 32)"),
    "fresh run over an unfinished one": (pretrain, lambda w, o: pretrain_args(w, w["half"], "--max_steps", "2"),
                                         "holds an unfinished pretrain run (step 1/4): continue it"),
    "fresh run over a finished one of this stage": (pretrain, lambda w, o: pretrain_args(w, w["done"]),
                                                    "holds a finished pretrain run (step 2/2)"),
    "output overwrites the input": (SFT, lambda w, o: (shutil.copy(os.path.join(w["done"], "pretrain_final.pth"),
                                                                   o / "sft_final.pth"),
                                                       chat_args(w, o, "--pretrained_path", str(o / "sft_final.pth"))
                                                       )[1], "would be overwritten by this run's output"),
    "missing start weights": (SFT, lambda w, o: chat_args(w, o, "--pretrained_path", str(o / "none.pth")),
                              "none.pth: no such checkpoint"),
    "corrupt start weights": (SFT, lambda w, o: chat_args(w, o, "--pretrained_path", damaged(w, "truncated")),
                              "corrupt or truncated checkpoint"),
    "lora dropout of one": (SFT, lambda w, o: chat_args(w, o, "--lora_dropout", "1"), "--lora_dropout: must be < 1"),
    "unknown lora target": (SFT, lambda w, o: chat_args(w, o, "--lora_targets", "q_proj", "wq"),
                            "--lora_targets: invalid choice: 'wq'"),
    "rope scaling without a longer context": (SFT, lambda w, o: chat_args(w, o, "--rope_scaling", "yarn"),
                                              "--rope_scaling yarn stretches RoPE"),
    "pretraining text to SFT": (SFT, lambda w, o: chat_args(w, o, data="text"), "text.jsonl:1:"),
    "alpha above one": (distill, lambda w, o: chat_args(w, o, "--alpha", "2", start="--sft_path"), "--alpha: must "
                        "be <= 1"),
    "zero temperature": (distill, lambda w, o: chat_args(w, o, "--temperature", "0", start="--sft_path"),
                         "--temperature: must be > 0"),
    "KL settings without a teacher": (distill, lambda w, o: chat_args(w, o, "--alpha", "0.3", start="--sft_path"),
                                      "need --teacher_path"),
    "zero beta": (dpo, lambda w, o: chat_args(w, o, "--beta", "0", data="dpo", start="--sft_path"),
                  "--beta: must be > 0"),
    "conversations to DPO": (dpo, lambda w, o: chat_args(w, o, data="chat", start="--sft_path"), "chat.jsonl:1:"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_in_one_line(case, world, tmp_path, capsys):
    module, make_argv, expected = CASES[case]
    before = sorted(os.listdir(world["done"])), sorted(os.listdir(world["half"]))
    code, line = refused(module.main, make_argv(world, tmp_path), capsys)
    assert code not in (0, None)
    assert expected in line, line
    assert line.startswith(f"{os.path.basename(sys.argv[0])}: error:"), line
    assert (sorted(os.listdir(world["done"])), sorted(os.listdir(world["half"]))) == before  # nothing written there


# ------------------------------------------------------------------------------------------- the settings of a run

def latest(save_dir):
    return torch.load(os.path.join(save_dir, "latest_checkpoint.pth"), map_location="cpu", weights_only=True)


def test_resume_from_path_alone_continues_the_run_with_its_own_settings(world, tmp_path):
    run = ["--max_steps", "6", "--accumulation_steps", "2", "--save_step", "2", "--warmup_steps", "2", "--seed", "7"]
    pretrain.main(pretrain_args(world, tmp_path / "full", *run))
    pretrain.main(pretrain_args(world, tmp_path / "split", *run, "--stop_step", "3"))
    os.chdir(tmp_path)  # another working directory, and no flag but the checkpoint: everything comes from it
    try:
        pretrain.main(["--resume_from", os.path.join("split", "latest_checkpoint.pth")])
    finally:
        os.chdir(ROOT)
    full, resumed = latest(tmp_path / "full"), latest(tmp_path / "split")
    assert [r["loss"] for r in full["history"]["train"]] == [r["loss"] for r in resumed["history"]["train"]]
    assert all(torch.equal(v, resumed["model"][k]) for k, v in full["model"].items())
    assert os.path.exists(tmp_path / "split" / "pretrain_final.pth")


def test_the_same_file_spelled_differently_is_the_same_data(world, tmp_path):
    pretrain.main(pretrain_args(world, tmp_path, "--max_steps", "3", "--stop_step", "1"))
    spelled = os.path.join(os.path.dirname(world["text"]), ".", os.path.basename(world["text"]))
    argv = pretrain_args(world, tmp_path, "--max_steps", "3", "--resume_from", "auto")
    argv[argv.index("--data_path") + 1] = spelled
    pretrain.main(argv)
    assert latest(tmp_path)["step"] == 3


def test_resume_refuses_other_data_at_the_same_path(world, tmp_path):
    data = tmp_path / "text.jsonl"
    shutil.copy(world["text"], data)
    argv = pretrain_args(world, tmp_path / "run", "--max_steps", "3")
    argv[argv.index("--data_path") + 1] = str(data)
    pretrain.main([*argv, "--stop_step", "1"])
    stat = os.stat(data)
    text = data.read_text().replace("the", "thy")  # same size
    data.write_text(text)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    with pytest.raises(CheckpointError, match="the data differs from the run's"):
        pretrain.main([*argv, "--resume_from", "auto"])


def test_max_steps_is_honoured_with_more_epochs_and_warmup_defaults_to_one_percent(world, tmp_path):
    pretrain.main(pretrain_args(world, tmp_path, "--max_steps", "150", "--save_step", "1000", "--log_interval",
                                "1000"))
    ckpt = latest(tmp_path)
    per_epoch = ckpt["micro_step"] // ckpt["args"]["epochs"]
    assert ckpt["step"] == 150 and ckpt["args"]["epochs"] > 1 and per_epoch < 150
    lrs = [r["lr"] for r in ckpt["history"]["train"]]
    assert lrs[0] == pytest.approx(3e-3 / 2) and lrs[1] == pytest.approx(3e-3)  # ceil(1% of 150) = 2 warmup steps


def test_a_finished_run_of_another_stage_gives_way_to_the_next_stage(world, tmp_path):
    shutil.copytree(world["done"], tmp_path / "run")
    SFT.main(chat_args(world, tmp_path / "run", "--max_steps", "1", "--pretrained_path",
                       str(tmp_path / "run" / "pretrain_final.pth")))
    assert latest(tmp_path / "run")["meta"]["stage"] == "sft"
    pretrain.main(pretrain_args(world, tmp_path / "run", "--max_steps", "1", "--overwrite"))  # pretrain's is gone
    assert latest(tmp_path / "run")["meta"] == {"stage": "pretrain", "tokenizer": tokenizer_fingerprint(
        world["tok"]), "total_steps": 1}


# ---------------------------------------------------------------------------------------- checkpoint metadata

def test_every_checkpoint_form_carries_stage_and_tokenizer(world):
    fingerprint = tokenizer_fingerprint(world["tok"])
    for name in ("latest_checkpoint.pth", "pretrain_final.pth", "pretrain_final"):
        _, _, meta = read_weights(os.path.join(world["done"], name))
        assert meta["stage"] == "pretrain" and meta["tokenizer"] == fingerprint, name


def test_a_folder_of_another_tokenizer_is_refused(world, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "other_final"
    shutil.copytree(os.path.join(world["done"], "pretrain_final"), folder)
    save_file(load_file(folder / "model.safetensors"), folder / "model.safetensors",
              metadata={"stage": "pretrain", "tokenizer": "0123456789abcdef"})
    code, line = refused(SFT.main, chat_args(world, tmp_path / "run", "--pretrained_path", str(folder)), capsys)
    assert code == 2 and "was trained with another tokenizer" in line


def test_a_tied_checkpoint_whose_head_differs_from_the_embedding_is_an_error(world):
    config, state, _ = read_weights(os.path.join(world["done"], "pretrain_final.pth"))
    state = {**state, "lm_head.weight": state["lm_head.weight"] + 1}
    from model import Transformer
    with pytest.raises(CheckpointError, match="ties lm_head to embed_tokens but the checkpoint's two tensors differ"):
        load_state_strict(Transformer(config), state, "x.pth")


# ------------------------------------------------------------------------------------------------ nothing lost

def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(world, tmp_path, monkeypatch):
    argv = pretrain_args(world, tmp_path, "--max_steps", "4", "--save_step", "2")
    pretrain.main([*argv, "--stop_step", "2"])
    before = latest(tmp_path)
    os.symlink("/dev/full", tmp_path / f"latest_checkpoint.pth.tmp-{os.getpid()}")  # the next write hits ENOSPC
    with pytest.raises(UserError, match=f"no space left on device: {tmp_path}/latest_checkpoint.pth"):
        pretrain.main([*argv, "--resume_from", "auto"])
    assert latest(tmp_path)["step"] == before["step"] == 2
    assert not any(".tmp-" in name for name in os.listdir(tmp_path))
    release_save_dir(str(tmp_path))

    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_model", full_disk)
    with pytest.raises(UserError, match="no space left on device: .*pretrain_final"):
        pretrain.main([*argv, "--resume_from", "auto"])
    assert not os.path.exists(tmp_path / "pretrain_final") and not any(".tmp-" in n for n in os.listdir(tmp_path))


def test_non_finite_weights_are_never_saved(world, tmp_path, monkeypatch):
    step = torch.optim.AdamW.step

    def poisoning_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        self.poisoned = getattr(self, "poisoned", 0) + 1
        if self.poisoned == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(SystemExit, match="weights are not finite after step 4: stopping without saving"):
        pretrain.main(pretrain_args(world, tmp_path, "--max_steps", "6", "--save_step", "2"))
    assert latest(tmp_path)["step"] == 2


def test_a_non_finite_gradient_stops_before_the_update(world, tmp_path, monkeypatch):
    clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def exploding(params, max_norm):
        calls["n"] += 1
        return clip(params, max_norm) * (float("inf") if calls["n"] == 3 else 1.0)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", exploding)
    with pytest.raises(SystemExit, match="gradient norm is inf at step 3: stopping before the update"):
        pretrain.main(pretrain_args(world, tmp_path, "--max_steps", "6", "--save_step", "2"))
    assert latest(tmp_path)["step"] == 2


def test_two_runs_cannot_share_a_save_dir(world, tmp_path, capsys):
    with open(tmp_path / ".lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("pid 4242, pretrain")
        holder.flush()
        code, line = refused(pretrain.main, pretrain_args(world, tmp_path, "--max_steps", "1"), capsys)
    assert code == 2 and "is in use by another run (pid 4242, pretrain)" in line
    pretrain.main(pretrain_args(world, tmp_path, "--max_steps", "1"))  # free again once the holder is gone


def test_leftovers_of_a_killed_save_are_removed_at_the_next_start(world, tmp_path, capsys):
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    (tmp_path / f"latest_checkpoint.pth.tmp-{dead}").write_bytes(b"half a checkpoint")
    (tmp_path / f"pretrain_final.tmp-{dead}").mkdir()
    pretrain.main(pretrain_args(world, tmp_path, "--max_steps", "1"))
    assert "removed 2 leftover file(s) of an interrupted save" in capsys.readouterr().out
    assert not any(".tmp-" in name for name in os.listdir(tmp_path))


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "ctrl-c"])
def test_a_signal_saves_at_the_next_step_then_resume_is_exact(sig, status, world, tmp_path):
    run = ["--max_steps", "400", "--save_step", "1000", "--log_interval", "1"]
    proc = subprocess.Popen([sys.executable, "pretrain.py", *pretrain_args(world, tmp_path / "sig", *run)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait for the training loop itself
        if "pretrain step 3/400" in line:
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "saving a checkpoint after this step" in err and "Traceback" not in err
    stopped = latest(tmp_path / "sig")
    assert 3 <= stopped["step"] < 400 and f"saved {tmp_path / 'sig'}/latest_checkpoint.pth" in out
    assert f"continue with --resume_from {tmp_path / 'sig'}/latest_checkpoint.pth" in out
    until = ["--max_steps", "400", "--save_step", "1000", "--stop_step", str(stopped["step"] + 2)]
    pretrain.main(pretrain_args(world, tmp_path / "full", *until))
    pretrain.main(["--resume_from", str(tmp_path / "sig" / "latest_checkpoint.pth"), *until[-2:]])
    full, resumed = latest(tmp_path / "full"), latest(tmp_path / "sig")
    assert [r["loss"] for r in full["history"]["train"]] == [r["loss"] for r in resumed["history"]["train"]]
    assert all(torch.equal(v, resumed["model"][k]) for k, v in full["model"].items())


def test_saves_are_logged_and_the_bar_fits_80_columns(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda: os.terminal_size((200, 50)))
    logger = tu.TrainLogger(argparse_namespace(tmp_path), tu.Runtime(torch.device("cpu"), "float32"), "dpo", 1000, 0)
    logger.log(1, {"loss": 0.693123, "lr": 1e-4, "grad_norm": 12.5, "reward_acc": 0.5, "margin": 0.01,
                   "chosen_reward": -0.2, "rejected_reward": -0.3, "tokens_per_s": 123456.0, "mfu": 0.45})
    assert len(str(logger.bar)) <= 80 and "loss 0.6931" in str(logger.bar)
    logger.close()
    assert "Traceback" not in capsys.readouterr().err


def argparse_namespace(tmp_path):
    import argparse
    return argparse.Namespace(save_dir=str(tmp_path), log_interval=10, use_wandb=False, use_swanlab=False,
                              logger="none", project="t")


def test_curves_show_a_stage_s_own_metrics(tmp_path):
    from PIL import Image
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "tokens_per_s": 10.0} for s in range(1, 4)]
    plain = tu.plot_curves({"train": rows, "eval": []}, str(tmp_path / "a.png"), "sft")
    with_dpo = tu.plot_curves({"train": [{**r, "reward_acc": 0.6, "margin": 0.2} for r in rows], "eval": []},
                              str(tmp_path / "b.png"), "dpo")
    assert Image.open(with_dpo).width > Image.open(plain).width  # a fourth panel: reward accuracy and margin


def test_pretraining_on_cpu_says_how_long_it_will_take():
    import argparse

    from Config import get_config
    config = get_config("small")
    args = argparse.Namespace(batch_size=32, accumulation_steps=1, preset="small")
    plan, schedule = argparse.Namespace(per_epoch=2000), argparse.Namespace(steps=2000)
    flops = tu.flops_per_token(config, config.max_seq_len)
    line = pretrain.cpu_estimate(config, args, flops, 250e9, schedule, plan)  # a 2-core CPU's fp32 matmul rate
    assert line.startswith("on CPU: about 19.7 s per optimizer step, 10h56m per epoch")
    assert line.endswith("use --preset tiny")
    tiny = get_config("tiny")
    assert pretrain.cpu_estimate(tiny, args, tu.flops_per_token(tiny, 256), 250e9, argparse.Namespace(steps=20),
                                 plan) is None  # a run of seconds needs no warning


@pytest.mark.parametrize("module", ["train_utils.py", "checkpoint.py", "dataset.py", "model.py", "lora.py", "cli.py",
                                    "serving.py"])
def test_library_modules_say_they_are_not_scripts(module):
    result = subprocess.run([sys.executable, module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    assert result.returncode == 1 and "is a library module, not a script" in result.stderr
