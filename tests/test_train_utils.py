"""Shared plumbing: boolean flags, atomic checkpoint writes, strict loading, the LR schedule, the batch plan and
the logger. Bad inputs to the stage scripts are in test_bad_inputs.py."""
import argparse
import os
import pickle
import random
import struct
import zipfile

import pytest
import torch

import train_utils as tu
from checkpoint import CheckpointError, atomic_torch_save, load_file, load_model, load_state_strict, rng_state, set_rng_state
from Config import LLMConfig
from model import Transformer


@pytest.mark.parametrize("argv, expected", [
    ([], False), (["--flag"], True), (["--flag=True"], True), (["--flag=False"], False),
    (["--flag", "1"], True), (["--flag", "0"], False), (["--flag", "no"], False), (["--flag=yes"], True),
])
def test_bool_flags_parse_every_spelling(argv, expected):
    parser = argparse.ArgumentParser()
    tu.add_bool_flag(parser, "--flag")
    assert parser.parse_args(argv).flag is expected


def test_bool_flag_rejects_nonsense():
    parser = argparse.ArgumentParser()
    tu.add_bool_flag(parser, "--flag")
    with pytest.raises(SystemExit):
        parser.parse_args(["--flag=maybe"])


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # a failure in the middle of writing the file


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "latest_checkpoint.pth"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, str(path))
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"step": 2, "w": torch.zeros(1000), "bad": Unpicklable()}, str(path))
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["latest_checkpoint.pth"]  # no temporary file left behind


def tiny_model(**kw):
    return Transformer(LLMConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=50, max_seq_len=16, **kw))


def test_strict_load_names_missing_unexpected_and_mismatched_keys():
    model = tiny_model()
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["norm.weight"]
    state["layers.0.self_attn.q_proj.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError) as err:
        load_state_strict(model, state, "ckpt.pth")
    message = str(err.value)
    assert "ckpt.pth" in message and "norm.weight" in message and "extra.weight" in message
    assert "layers.0.self_attn.q_proj.weight: checkpoint (5, 5) vs model (32, 32)" in message


def test_load_model_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    model = tiny_model()
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, tmp_path / "m.pth")
    loaded, _ = load_model(str(tmp_path / "m.pth"))
    ids = torch.randint(0, 50, (1, 8))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    longer, _ = load_model(str(tmp_path / "m.pth"), max_seq_len=32)
    assert longer.config.max_seq_len == 32
    with pytest.raises(CheckpointError, match="nope.pth: no such checkpoint"):
        load_model(str(tmp_path / "nope.pth"))
    torch.save({"weights": 1}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project .missing model, config"):
        load_model(str(tmp_path / "other.pth"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(str(tmp_path / "folder"))


def pickle_span(path):
    """Where data.pkl's bytes lie in a torch.save archive (after its local header and torch's alignment padding)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    raw = open(path, "rb").read()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


def test_every_damaged_checkpoint_is_a_checkpoint_error(tmp_path):
    """A training checkpoint damaged at random (seeded), never a stray IndexError or TypeError from the unpickler.
    Any damage to the pickle is caught; damage to tensor bytes may load (torch keeps no checksum of them)."""
    torch.manual_seed(0)
    good_path = tmp_path / "good.pth"
    torch.save({"model": tiny_model().state_dict(), "step": 3, "meta": {"stage": "pretrain"}}, good_path)
    good = good_path.read_bytes()
    pkl_start, pkl_end = pickle_span(good_path)
    rng = random.Random(0)
    damages = {
        "random bytes": lambda b: bytearray(rng.randbytes(rng.choice([1, 30, 4096]))),
        "truncated": lambda b: b[:rng.randrange(1, len(b))],
        "pickle bytes changed": lambda b: flip(b, rng, pkl_start, pkl_end),
        "bytes changed anywhere": lambda b: flip(b, rng, 0, len(b)),
    }
    loaded = 0
    for name, damage in damages.items():
        for trial in range(150):
            bad = tmp_path / "bad.pth"
            bad.write_bytes(bytes(damage(bytearray(good))))
            try:
                load_file(str(bad), mmap=trial % 2 == 1)
                assert name == "bytes changed anywhere", f"{name}, trial {trial}: the damaged file loaded"
                loaded += 1
            except CheckpointError as e:
                assert str(e).startswith(f"{bad}: ") and "\n" not in str(e)
    assert loaded < 150


def flip(data, rng, start, end):
    for _ in range(rng.choice([1, 2, 8])):
        data[rng.randrange(start, end)] ^= rng.randrange(1, 256)
    return data


def test_lr_warmup_then_cosine_to_floor():
    lrs = [tu.lr_at(s, 10, 2, 1.0, 0.1) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_batch_plan_numbers_micro_batches_across_epochs():
    rt = tu.Runtime(torch.device("cpu"), "float32")
    plan = tu.BatchPlan(tu.shuffled_batches(10, 3, seed=0, rt=rt), epochs=2)
    everything = list(plan.micro_batches(0))
    assert plan.per_epoch == 3 and len(everything) == 6
    assert [e for e, _ in everything] == [0, 0, 0, 1, 1, 1]
    assert all(len(b) == 3 for _, b in everything)
    resumed = list(plan.micro_batches(4))
    assert [b.tolist() for _, b in resumed] == [b.tolist() for _, b in everything[4:]]
    assert [b.tolist() for _, b in everything[:3]] != [b.tolist() for _, b in everything[3:]]  # reshuffled


def test_ranks_split_each_global_batch():
    one = tu.shuffled_batches(20, 4, seed=3, rt=tu.Runtime(torch.device("cpu"), "float32"))(1)
    ranks = [tu.shuffled_batches(20, 2, seed=3, rt=tu.Runtime(torch.device("cpu"), "float32", rank=r,
                                                                world_size=2))(1) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for step, batch in enumerate(one):
        assert batch.tolist() == ranks[0][step].tolist() + ranks[1][step].tolist()


def test_rng_state_round_trips_through_pickle_and_weights_only(tmp_path):
    tu.seed_everything(5)
    state = rng_state()
    expected = torch.rand(3)
    torch.save({"rng": pickle.loads(pickle.dumps(state))}, tmp_path / "r.pth")
    torch.rand(10)
    set_rng_state(torch.load(tmp_path / "r.pth", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_flops_per_token_follows_the_guide():
    config = LLMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100)
    n = config.param_counts()[1]
    assert tu.flops_per_token(config, 128) == 6 * n + 12 * 2 * 64 * 128


def test_cuda_device_always_gets_an_index(monkeypatch):
    """torch.cuda.set_device refuses a bare "cuda" (found on an H200); each process names its own GPU."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(device))
    monkeypatch.setenv("LOCAL_RANK", "0")
    rt = tu.setup_runtime(argparse.Namespace(device=None, dtype=None))
    assert rt.device == torch.device("cuda:0") and rt.dtype == "bfloat16"
    assert chosen == [torch.device("cuda:0")]
    monkeypatch.setenv("LOCAL_RANK", "1")  # one process of a 2-GPU torchrun (process group not joined here)
    assert tu.setup_runtime(argparse.Namespace(device="cuda", dtype=None)).device == torch.device("cuda:1")


def logger_args(tmp_path, **kw):
    return argparse.Namespace(**{"save_dir": str(tmp_path), "log_interval": 2, "use_wandb": False,
                                 "use_swanlab": False, "logger": "none", "project": "tests", **kw})


def test_logger_prints_plain_lines_off_a_terminal_and_draws_curves(tmp_path, capsys):
    logger = tu.TrainLogger(logger_args(tmp_path), tu.Runtime(torch.device("cpu"), "float32"), "sft", 4, 0)
    for step in range(1, 5):
        logger.log(step, {"loss": 3.0 / step, "lr": 1e-3, "tokens_per_s": 1000.0})
    logger.log_eval(4, {"val_loss": 1.0, "val_ppl": 2.718})
    path = logger.close()
    out = capsys.readouterr().out
    assert "sft step 2/4 | loss 1.5000 | lr 1.00e-03 | 1,000 tok/s" in out and "step 1/4" not in out
    assert "sft step 4/4 | val_loss 1.0000 | val_ppl 2.7180" in out
    assert open(path, "rb").read(4) == b"\x89PNG" and path.endswith("sft_curves.png")


def test_swanlab_logs_offline_without_a_login(tmp_path, monkeypatch):
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.delenv("SWANLAB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no saved login
    args = logger_args(tmp_path, use_wandb=True)
    logger = tu.TrainLogger(args, tu.Runtime(torch.device("cpu"), "float32"), "pretrain", 2, 0)
    logger.log(1, {"loss": 2.0, "lr": 1e-3})
    logger.close()
    runs = os.listdir(tmp_path / "swanlog")
    assert any(name.startswith("run-") for name in runs)
