"""Beyond one GPU's memory: activation checkpointing, FSDP2 (on CPU gloo), resume on another number of processes,
and the memory estimate printed before training."""
import pytest
import test_grpo
import test_pretrain
import test_stages
import torch
from conftest import refused, torchrun
from test_pretrain import args_for, assert_same_run, checkpoint
from test_stages import sft_args

import grpo
import pretrain
import SFT
import train_utils as tu
from checkpoint import CheckpointError, load_model
from Config import LLMConfig
from model import Transformer


corpus = test_pretrain.corpus  # the fixtures the end-to-end tests share with those modules
setup = test_stages.setup
grpo_setup = test_grpo.setup


def gradients(config, checkpointing, seed=0):
    torch.manual_seed(seed)
    model = Transformer(config)
    model.grad_checkpointing = checkpointing
    ids = torch.randint(0, config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout masks in both runs
    out = model(ids, targets=ids)
    (out.loss + out.aux_loss).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_grad_checkpointing_gives_the_plain_gradients(moe):
    config = LLMConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=32, dropout=0.1,
                       use_moe=moe)
    plain, recomputed = gradients(config, False), gradients(config, True)
    assert plain.keys() == recomputed.keys()
    for name, grad in plain.items():
        assert torch.allclose(grad, recomputed[name], rtol=0, atol=1e-6), name


# ------------------------------------------------------------------------------------------- memory estimate

def tracked_step(model, ids, dtype):
    """Forward and backward under PyTorch's own tracker of live tensors by kind (parameters, gradients,
    activations), then an optimizer step: ({kind: bytes} at the end of forward, {kind: bytes} at the peak of
    forward and backward, the optimizer)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    def snapshot(kind):
        by_kind = tracker.get_tracker_snapshot(kind)[torch.device("cpu")]
        return {str(k).rpartition(".")[2]: v for k, v in by_kind.items()}
    optimizer = tu.build_optimizer(model, 1e-3, 0.1)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        out = model(ids, targets=ids)
        after_forward = snapshot("current")
        (out.loss + out.aux_loss).backward()
    optimizer.step()
    return after_forward, snapshot("peak"), optimizer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_memory_estimate_matches_what_pytorch_allocates(dtype, moe):
    config = LLMConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64, use_moe=moe)
    torch.manual_seed(0)
    model = Transformer(config)
    ids = torch.randint(0, 300, (4, 64))
    after_forward, _, optimizer = tracked_step(model, ids, dtype)
    estimate = tu.memory_estimate(config, 4, 64, dtype)
    params = list(model.parameters())
    assert estimate["weights"] == sum(p.numel() * p.element_size() for p in params)
    assert estimate["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in params)
    moments = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    assert estimate["AdamW"] == sum(t.numel() * t.element_size() for t in moments)
    # The tracker counts autocast's bf16 weight copies (kept for backward) as activations too.
    assert estimate["activations"] + estimate.get("bf16 copies", 0) == pytest.approx(after_forward["ACT"], rel=0.02)


def test_grad_checkpointing_estimate_bounds_the_measured_activations():
    config = LLMConfig(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(config)
    model.grad_checkpointing = True
    _, peak, _ = tracked_step(model, torch.randint(0, 300, (8, 64)), "float32")
    plain = tu.memory_estimate(config, 8, 64)["activations"]
    estimate = tu.memory_estimate(config, 8, 64, grad_checkpointing=True)["activations"]
    assert peak["ACT"] <= estimate <= 2 * peak["ACT"]  # an upper bound: one block rebuilt at a time
    assert estimate < plain / 3


def test_fsdp_and_ddp_shares_of_the_estimate():
    config = LLMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100)
    one = tu.memory_estimate(config, 2, 32, "bfloat16")
    ddp = tu.memory_estimate(config, 2, 32, "bfloat16", processes=4)
    fsdp = tu.memory_estimate(config, 2, 32, "bfloat16", processes=4, fsdp=True)
    assert ddp["DDP buckets"] == one["gradients"] and ddp["weights"] == one["weights"]
    for part in ("weights", "gradients", "AdamW"):
        assert fsdp[part] == one[part] / 4
    assert "bf16 copies" in one and "bf16 copies" not in fsdp and fsdp["activations"] == one["activations"]
    lora = tu.memory_estimate(config, 2, 32, trainable=1000)
    assert lora["gradients"] == 4000 and lora["AdamW"] == 8000 and lora["weights"] == one["weights"]


# --------------------------------------------------------------------------------------------- end to end

RUN = ["--epochs", "1", "--max_steps", "4", "--accumulation_steps", "2", "--save_step", "2"]


def with_batch(argv, batch_size):
    argv = list(argv)
    argv[argv.index("--batch_size") + 1] = str(batch_size)
    return argv


def assert_close_runs(a, b):
    """The same losses and weights up to fp32 rounding (the processes sum gradients in another order)."""
    assert [r["loss"] for r in a["history"]["train"]] == pytest.approx([r["loss"] for r in b["history"]["train"]],
                                                                      rel=1e-5)
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-5), key


def test_fsdp_on_two_processes_matches_one_and_resumes_on_another_number(corpus, tokenizer_dir, tmp_path, capsys):
    """One process with batch 8 is the reference. 2 -> 1: two FSDP processes (batch 4 each) stop at step 2, one
    process continues. 1 -> 2: one process stops at step 2, two FSDP processes continue. Both equal the reference."""
    base = with_batch(args_for(corpus, tokenizer_dir, tmp_path / "one", *RUN), 8)
    pretrain.main(base)
    reference = checkpoint(tmp_path / "one")

    two_to_one = args_for(corpus, tokenizer_dir, tmp_path / "two_to_one", *RUN)
    torchrun("pretrain.py", [*two_to_one, "--fsdp", "--stop_step", "2"])
    stopped = checkpoint(tmp_path / "two_to_one")
    assert stopped["world_size"] == 2 and stopped["args"]["batch_size"] == 4 and stopped["args"]["fsdp"]
    capsys.readouterr()
    pretrain.main([*two_to_one, "--resume_from", "auto"])  # --batch_size 4 and --fsdp come from the checkpoint
    assert "--batch_size 4 -> 8 per process" in capsys.readouterr().out
    assert_close_runs(reference, checkpoint(tmp_path / "two_to_one"))

    one_to_two = with_batch(args_for(corpus, tokenizer_dir, tmp_path / "one_to_two", *RUN), 8)
    pretrain.main([*one_to_two, "--stop_step", "2"])
    torchrun("pretrain.py", [*one_to_two, "--resume_from", "auto", "--fsdp"])
    resumed = checkpoint(tmp_path / "one_to_two")
    assert resumed["world_size"] == 2 and resumed["args"]["batch_size"] == 4
    assert_close_runs(reference, resumed)
    final = load_model(str(tmp_path / "one_to_two" / "pretrain_final.pth"))[0]  # today's format, strictly loaded
    assert torch.allclose(final.embed_tokens.weight, reference["model"]["embed_tokens.weight"], atol=1e-5)


def test_fsdp_moe_stop_and_resume_is_bitwise_identical(corpus, tokenizer_dir, tmp_path, capsys):
    """FSDP over one process (the same code path: sharded parameters, gathered checkpoints); the resumed half
    also switches activation checkpointing on, which changes no bit."""
    run = [*RUN, "--fsdp", "--use_moe"]
    pretrain.main(args_for(corpus, tokenizer_dir, tmp_path / "full", *run))
    assert "memory estimate per process (float32, micro-batch 4 × 32 tokens, FSDP over 1)" in capsys.readouterr().out
    pretrain.main(args_for(corpus, tokenizer_dir, tmp_path / "split", *run, "--stop_step", "2"))
    pretrain.main(args_for(corpus, tokenizer_dir, tmp_path / "split", *run, "--resume_from", "auto",
                           "--grad_checkpointing"))
    full, split = checkpoint(tmp_path / "full"), checkpoint(tmp_path / "split")
    assert full["config"]["use_moe"] and isinstance(next(iter(full["optimizer"]["state"])), int)
    assert_same_run(full, split)
    plain = load_model(str(tmp_path / "full" / "pretrain_final.pth"))[0]
    assert plain.lm_head.weight is plain.embed_tokens.weight


def test_sft_lora_under_fsdp_equals_the_plain_run(setup, tmp_path):
    lora = ["--max_steps", "3", "--lora_rank", "4", "--learning_rate", "1e-2"]
    SFT.main(sft_args(setup, tmp_path / "plain", *lora))
    SFT.main(sft_args(setup, tmp_path / "fsdp", *lora, "--fsdp", "--grad_checkpointing"))
    for name in ("sft_final.pth", "lora_sft.pth"):
        a, b = (torch.load(tmp_path / d / name, weights_only=True) for d in ("plain", "fsdp"))
        key = "model" if "model" in a else "lora"
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.allclose(a[key][k], b[key][k], atol=1e-6), k


def test_grpo_under_two_process_fsdp_equals_one_process(grpo_setup, tmp_path):
    """Generation stops when a process's own rows stop: under FSDP it runs on gathered weights (no collectives), in
    the rollouts and in the held-out evaluation."""
    run = ["--max_steps", "2", "--ppo_epochs", "2", "--loss_agg", "token", "--eval_data", grpo_setup["eval"],
           "--eval_interval", "2", "--eval_batches", "2"]
    grpo.main(test_grpo.args_for(grpo_setup, tmp_path / "one", *run, "--batch_size", "4"))
    torchrun("grpo.py", test_grpo.args_for(grpo_setup, tmp_path / "two", *run, "--batch_size", "2", "--fsdp"))
    one, two = test_grpo.latest(tmp_path / "one"), test_grpo.latest(tmp_path / "two")
    assert two["world_size"] == 2 and two["args"]["fsdp"]
    for a, b in zip(one["history"]["train"], two["history"]["train"]):
        for key in ("reward", "accuracy", "completion_len"):  # the same replies were sampled
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
    assert one["history"]["eval"] == two["history"]["eval"]
    for key in one["model"]:
        assert torch.allclose(one["model"][key], two["model"][key], atol=1e-5), key


# --------------------------------------------------------------------------------------------- bad inputs

def test_fsdp_with_compile_is_refused_in_one_line(corpus, tokenizer_dir, tmp_path, capsys):
    code, line = refused(pretrain.main, args_for(corpus, tokenizer_dir, tmp_path, "--fsdp", "--compile"), capsys)
    assert code == 2 and "--fsdp and --compile together are not supported" in line


def test_a_global_batch_that_the_new_processes_cannot_share_is_refused():
    args = type("Args", (), {"batch_size": 3, "accumulation_steps": 1})()
    rt = tu.Runtime(torch.device("cpu"), "float32", rank=0, world_size=2)
    with pytest.raises(CheckpointError, match=r"micro-batches of 3 sequences \(1 processes × --batch_size 3\), "
                                              r"which 2 processes cannot share evenly"):
        tu.fit_world_size(args, {"world_size": 1}, "run/latest_checkpoint.pth", rt)
    tu.fit_world_size(args, {"world_size": 4}, "run/latest_checkpoint.pth", rt)
    assert args.batch_size == 6


def test_bucketed_batches_of_n_processes_are_one_process_batches_split():
    lengths = torch.randint(5, 100, (203,), generator=torch.Generator().manual_seed(0)).tolist()
    data = type("Data", (), {"lengths": lengths})()

    def plan(batch_size, rank, world):
        args = type("Args", (), {"batch_size": batch_size, "seed": 3, "epochs": 2})()
        rt = tu.Runtime(torch.device("cpu"), "float32", rank=rank, world_size=world)
        return [list(b) for _, b in tu.bucketed_plan(data, args, rt).micro_batches(0)]
    one = plan(8, 0, 1)
    ranks = [plan(4, r, 2) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 2 * (203 // 8)
    assert one == [a + b for a, b in zip(*ranks)]
