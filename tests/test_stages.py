"""SFT.py, distill.py and dpo.py end to end on a small generated corpus: exact resume, torchrun, LoRA, long
context, the losses' definitions and clear errors."""
import os

import pytest
import torch
from conftest import ROOT, torchrun

import distill
import dpo
import pretrain
import SFT
from checkpoint import load_model, read_weights, tokenizer_fingerprint
from cli import UserError
from dataset import encode_chat
from demo_data import generate_demo
from model import Transformer

MODEL = ["--preset", "tiny", "--dim", "32", "--n_layers", "2", "--n_heads", "2", "--n_kv_heads", "1",
         "--max_seq_len", "128"]
TRAIN = ["--batch_size", "4", "--learning_rate", "1e-3", "--warmup_steps", "1", "--log_interval", "1000"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Demo data at 4% size, the shipped tokenizer and a briefly pretrained 128-token model."""
    tokenizer_dir = os.path.join(ROOT, "tokenizer")
    root = tmp_path_factory.mktemp("stages")
    data = generate_demo(str(root / "data"), scale=0.04)
    base = root / "base"
    pretrain.main(["--data_path", data["pretrain"], "--tokenizer_path", tokenizer_dir, "--save_dir", str(base),
                   "--cache_dir", str(root / "cache"), "--max_steps", "3", *MODEL, *TRAIN])
    return {"data": data, "base": str(base / "pretrain_final.pth"), "tok": tokenizer_dir,
            "cache": str(root / "cache")}


def common(setup, save_dir, *extra):
    return ["--tokenizer_path", setup["tok"], "--cache_dir", setup["cache"], "--save_dir", str(save_dir), *TRAIN,
            *extra]


def sft_args(setup, save_dir, *extra):
    return ["--data_path", setup["data"]["sft"], "--pretrained_path", setup["base"], *common(setup, save_dir, *extra)]


def distill_args(setup, save_dir, *extra):
    return ["--data_path", setup["data"]["reasoning"], "--sft_path", setup["base"],
            *common(setup, save_dir, *extra)]


def dpo_args(setup, save_dir, *extra):
    return ["--data_path", setup["data"]["dpo"], "--sft_path", setup["base"], "--learning_rate", "1e-3",
            *common(setup, save_dir, *extra)]


def latest(save_dir):
    return torch.load(os.path.join(save_dir, "latest_checkpoint.pth"), map_location="cpu", weights_only=True)


def assert_same_run(a, b):
    assert [r["loss"] for r in a["history"]["train"]] == [r["loss"] for r in b["history"]["train"]]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key


STAGES = [(SFT, sft_args), (distill, distill_args), (dpo, dpo_args)]


@pytest.mark.parametrize("stage, make_args", STAGES, ids=["sft", "distill", "dpo"])
def test_stopped_and_resumed_stage_is_bitwise_identical(stage, make_args, setup, tmp_path):
    run = ["--max_steps", "6", "--accumulation_steps", "2", "--save_step", "2"]
    stage.main(make_args(setup, tmp_path / "full", *run))
    stage.main(make_args(setup, tmp_path / "split", *run, "--stop_step", "3"))
    assert latest(tmp_path / "split")["step"] == 3
    stage.main(make_args(setup, tmp_path / "split", *run, "--resume_from", "auto"))
    assert_same_run(latest(tmp_path / "full"), latest(tmp_path / "split"))


def test_sft_under_two_process_torchrun_resumes_exactly(setup, tmp_path):
    run = ["--max_steps", "4", "--save_step", "2"]
    torchrun("SFT.py", sft_args(setup, tmp_path / "full", *run))
    torchrun("SFT.py", sft_args(setup, tmp_path / "split", *run, "--stop_step", "2"))
    torchrun("SFT.py", sft_args(setup, tmp_path / "split", *run, "--resume_from", "auto"))
    full = latest(tmp_path / "full")
    assert full["world_size"] == 2 and len(full["history"]["train"]) == 4
    assert_same_run(full, latest(tmp_path / "split"))


@pytest.mark.parametrize("script, make_args", [("distill.py", distill_args), ("dpo.py", dpo_args)])
def test_distill_and_dpo_run_under_two_process_torchrun(script, make_args, setup, tmp_path):
    torchrun(script, make_args(setup, tmp_path, "--max_steps", "2"))
    ckpt = latest(tmp_path)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in ckpt["history"]["train"])


def test_sft_lora_freezes_base_and_merges_into_the_final_checkpoint(setup, tmp_path):
    from lora import load_lora
    SFT.main(sft_args(setup, tmp_path, "--max_steps", "3", "--lora_rank", "4", "--lora_targets", "q_proj",
                      "v_proj", "down_proj", "--learning_rate", "1e-2"))
    base, _ = load_model(setup["base"])
    final, _ = load_model(str(tmp_path / "sft_final.pth"))
    adapted, meta = load_lora(load_model(setup["base"])[0], str(tmp_path / "lora_sft.pth"))
    assert meta["base"] == setup["base"]
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, final(ids).logits, atol=1e-5)
        assert not torch.allclose(base(ids).logits, final(ids).logits, atol=1e-3)
    changed = {k for k, v in final.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in changed)


def test_sft_long_context_continues_at_a_longer_length(setup, tmp_path):
    SFT.main(sft_args(setup, tmp_path, "--max_steps", "2", "--max_seq_len", "256", "--rope_scaling", "yarn"))
    config, _, _ = read_weights(str(tmp_path / "sft_final.pth"))
    assert config.max_seq_len == 256
    assert config.rope_scaling == {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128}
    model, _ = load_model(str(tmp_path / "sft_final.pth"))
    assert model(torch.zeros(1, 256, dtype=torch.long)).logits.shape == (1, 256, 6464)


def test_sft_refuses_a_checkpoint_of_another_tokenizer(setup, tmp_path):
    ckpt = torch.load(setup["base"], weights_only=True)
    ckpt["meta"]["tokenizer"] = "0123456789abcdef"
    torch.save(ckpt, tmp_path / "other.pth")
    args = sft_args(setup, tmp_path, "--max_steps", "1")
    args[args.index("--pretrained_path") + 1] = str(tmp_path / "other.pth")
    with pytest.raises(UserError, match="another tokenizer"):
        SFT.main(args)


def test_missing_data_explains_where_to_get_it(tmp_path):
    for stage in (SFT, distill, dpo):
        with pytest.raises(UserError, match=r"(?s)no .*data at .*missing\.jsonl.*demo_data\.py"):
            stage.main(["--data_path", str(tmp_path / "missing.jsonl")])


def test_tag_weights_only_on_assistant_tag_targets(tokenizer):
    messages = [{"role": "user", "content": "why <think> and </answer> here?"},
                {"role": "assistant", "content": "<think>two plus two</think><answer>four</answer>"}]
    ids, mask = encode_chat(tokenizer, messages)
    targets, loss_mask = torch.from_numpy(ids[1:])[None], torch.from_numpy(mask[1:]).float()[None]
    weights = distill.target_weights(targets, loss_mask, 5.0)
    heavy = [tokenizer.convert_ids_to_tokens(int(t)) for t in targets[weights == 5.0]]
    assert heavy == ["<think>", "</think>", "<answer>", "</answer>"]  # the prompt's tags stay at weight 0
    assert set(weights[(weights != 5.0)].tolist()) == {0.0, 1.0}
    assert torch.equal(weights > 0, loss_mask > 0)


def test_kl_term_is_zero_for_an_identical_teacher_and_matches_the_definition():
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    weights = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0.0]])
    assert distill.kl_to_teacher(student, student, weights, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    p_t, log_p_s = (teacher / 2).softmax(-1), (student / 2).log_softmax(-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1)
    expected = 4 * (kl * weights).sum() / weights.sum()
    assert distill.kl_to_teacher(student, teacher, weights, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_distillation_keeps_teacher_frozen_and_checks_vocab(setup, tmp_path):
    distill.main(distill_args(setup, tmp_path / "t", "--max_steps", "3", "--teacher_path", setup["base"],
                              "--alpha", "0.7"))
    assert os.path.exists(tmp_path / "t" / "distill_final.pth")
    teacher_after, _ = load_model(setup["base"])
    original = torch.load(setup["base"], weights_only=True)["model"]
    assert all(torch.equal(v, original[k]) for k, v in teacher_after.state_dict().items())
    other = Transformer(teacher_after.config.__class__(**{**teacher_after.config.to_dict(), "vocab_size": 600}))
    torch.save({"model": other.state_dict(), "config": other.config.to_dict(),
                "meta": {"stage": "sft", "tokenizer": tokenizer_fingerprint(setup["tok"])}}, tmp_path / "wide.pth")
    with pytest.raises(UserError, match="must share the tokenizer"):
        distill.main(distill_args(setup, tmp_path / "w", "--max_steps", "1", "--teacher_path",
                                  str(tmp_path / "wide.pth")))


def test_dpo_loss_definition():
    policy = torch.tensor([[-3.0, -5.0], [-4.0, -2.0]])
    losses, stats = dpo.dpo_loss(policy, policy.clone(), beta=0.1)
    assert torch.allclose(losses, torch.full((2,), 0.6931), atol=1e-4)  # log 2 when policy == reference
    reference = torch.tensor([[-4.0, -4.0], [-4.0, -4.0]])
    losses, stats = dpo.dpo_loss(policy, reference, beta=0.5)
    margins = torch.tensor([0.5 * (1 - -1), 0.5 * (0 - 2)])
    assert torch.allclose(losses, -torch.nn.functional.logsigmoid(margins))
    assert stats["reward_acc"].tolist() == [1.0, 0.0]


def test_reply_logps_sums_only_masked_targets():
    logits = torch.randn(1, 4, 7)
    targets = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 1, 1, 0.0]])
    logp = logits.log_softmax(-1)
    assert dpo.reply_logps(logits, targets, mask).item() == pytest.approx((logp[0, 1, 2] + logp[0, 2, 3]).item())


def test_dpo_precomputed_reference_equals_live_reference(setup, tmp_path):
    run = ["--max_steps", "3", "--eval_data", setup["data"]["dpo_eval"], "--eval_interval", "3"]
    dpo.main(dpo_args(setup, tmp_path / "pre", *run))
    dpo.main(dpo_args(setup, tmp_path / "live", *run, "--precompute_ref", "false"))
    a, b = latest(tmp_path / "pre"), latest(tmp_path / "live")
    assert [r["loss"] for r in a["history"]["train"]] == pytest.approx([r["loss"] for r in b["history"]["train"]],
                                                                       rel=1e-5)
    assert a["history"]["train"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # starts at log 2
    assert a["history"]["eval"][0]["val_reward_acc"] == pytest.approx(b["history"]["eval"][0]["val_reward_acc"])
