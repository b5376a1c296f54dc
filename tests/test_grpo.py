"""grpo.py and rewards.py: the loss against a hand computation, advantages, reward parsing, batched sampling, exact
resume (sampling included), 2-process gloo equals 1 process, and bad flags refused in one line."""
import json
import math
import os
import random

import pytest
import torch
from conftest import ROOT, refused, sharpened_tiny_model, torchrun, write_jsonl
from torch.nn.utils.rnn import pad_sequence

import eval_bench
import grpo
import rewards
from checkpoint import load_model, save_final
from Config import LLMConfig
from dataset import encode_chat, load_tokenizer
from inference import cut_at_stop, encode_prompt, generate_group, stop_ids
from model import Transformer
from rewards import Completion

TOKENIZER = os.path.join(ROOT, "tokenizer")
RUN = ["--num_generations", "4", "--max_new_tokens", "12", "--learning_rate", "3e-3", "--warmup_steps", "1",
       "--log_interval", "1000", "--tokenizer_path", TOKENIZER]


def problem(rng):
    a, b = rng.randint(1, 4), rng.randint(1, 4)
    return {"conversations": [{"role": "user", "content": f"{a} + {b}?"},
                              {"role": "assistant", "content": f"<think>{a} + {b}</think><answer>{a + b}</answer>"}]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny addition problems and a 2-layer, 32-wide policy taught their format for a moment: its sampled replies
    are short and mostly well-formed, and right or wrong by chance, so every reward varies within a group."""
    root = tmp_path_factory.mktemp("grpo")
    rng = random.Random(0)
    records = [problem(rng) for _ in range(48)]
    tokenizer = load_tokenizer(TOKENIZER)
    torch.manual_seed(0)
    config = LLMConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=len(tokenizer), max_seq_len=64)
    model = Transformer(config)
    encoded = [encode_chat(tokenizer, r["conversations"]) for r in records]
    batch = pad_sequence([torch.tensor(ids) for ids, _ in encoded], batch_first=True,
                         padding_value=tokenizer.pad_token_id)
    masks = pad_sequence([torch.tensor(mask) for _, mask in encoded], batch_first=True).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(batch[:, :-1], targets=batch[:, 1:], loss_mask=masks[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_final(model, config, str(root / "policy"), "distill", TOKENIZER)
    return {"data": write_jsonl(root / "train.jsonl", records[:40]),
            "eval": write_jsonl(root / "eval.jsonl", records[40:]),
            "policy": str(root / "policy" / "distill_final.pth")}


def args_for(setup, save_dir, *extra):
    return ["--data_path", setup["data"], "--sft_path", setup["policy"], "--save_dir", str(save_dir), *RUN, *extra]


def latest(save_dir):
    return torch.load(os.path.join(save_dir, "latest_checkpoint.pth"), map_location="cpu", weights_only=True)


def without_speed(history):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in history]


# ------------------------------------------------------------------------------------------------------ rewards

@pytest.mark.parametrize("reply, reference, right", [
    ("<think>2 + 3</think><answer>5</answer>", "<think>…</think><answer>5</answer>", True),
    ("<think>…</think><answer> 1,234. </answer>", "<answer>1234</answer>", True),  # normalised as eval_bench
    ("<think>…</think><answer>5.0</answer>", "5", True),
    ("so 2 + 3 = 5", "<answer>5</answer>", True),                                   # no tag: the last number
    ("<think>…</think><answer>6</answer>", "<answer>5</answer>", False),
    ("<think>the answer is 5</think>", "<answer>5</answer>", True),
    ("", "<answer>5</answer>", False),
])
def test_accuracy_reward_reads_the_answer_like_eval_bench(reply, reference, right):
    assert rewards.accuracy_reward(Completion(reply, reference, 5, 10)) == float(right)


def test_eval_bench_scores_with_the_same_answer_matching():
    assert eval_bench.extract_answer is rewards.extract_answer
    assert eval_bench.normalize_answer is rewards.normalize_answer


@pytest.mark.parametrize("reply, well_formed", [
    ("<think>count</think><answer>5</answer>", True),
    (" <think>count</think>\n<answer>5</answer> ", True),
    ("<think>count</think><answer>5</answer> and more", False),
    ("<answer>5</answer>", False),
    ("<think></think><answer>5</answer>", False),
    ("<think>a <answer>4</answer></think><answer>5</answer>", False),
    ("<think>count</think><answer>5", False),
])
def test_format_reward(reply, well_formed):
    assert rewards.format_reward(Completion(reply, "", 5, 10)) == float(well_formed)


@pytest.mark.parametrize("n_tokens, penalty", [(1, 0.0), (75, 0.0), (80, -0.2), (90, -0.6), (100, -1.0)])
def test_length_penalty_ramps_over_the_last_quarter(n_tokens, penalty):
    assert rewards.length_reward(Completion("", "", n_tokens, 100)) == pytest.approx(penalty)


# ----------------------------------------------------------------------------------------------------- the loss

def test_advantages_are_centred_per_group_and_zero_for_equal_rewards():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1, 2.0, 0.5, 0.5, 0.5])
    advantages, flat = grpo.group_advantages(r, 4, scale=False)
    assert flat.tolist() == [False, True, False]
    assert advantages[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert advantages[4:8].tolist() == [0.0] * 4          # 0.1 · 4 / 4 is not exactly 0.1 in floats; still 0
    assert advantages[8:].tolist() == pytest.approx([1.125, -0.375, -0.375, -0.375])
    scaled, _ = grpo.group_advantages(r, 4, scale=True)
    assert scaled[4:8].tolist() == [0.0] * 4
    assert scaled[8:].tolist() == pytest.approx([1.125 / 0.75, -0.375 / 0.75, -0.375 / 0.75, -0.375 / 0.75])


# Two replies: 3 tokens and 2 (+1 padding). Ratios ρ = π/π_old cover every case of the clip with ε = 0.2,
# ε_high = 0.28: A > 0 with ρ = 1, ρ > 1.28 (clipped) and ρ < 0.8 (not clipped: min takes ρ·A);
# A < 0 with ρ < 0.8 (clipped) and ρ = 1.1 (not clipped).
LOGP = [[-1.0, -2.0, -0.5], [-1.5, -0.3, 0.0]]
RATIO = [[1.0, 1.5, 0.5], [0.5, 1.1, 1.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -0.5]
REF_SHIFT = [[0.1, -0.2, 0.0], [0.3, -0.1, 0.0]]  # log ref − log π


def hand_token_loss(t, r, k, loss_type, beta):
    """ℓ_t and dℓ_t/dlog π_t, one token at a time, from the formulas in grpo.py's docstring."""
    logp, rho, adv, d = LOGP[r][k], RATIO[r][k], ADV[r], REF_SHIFT[r][k]
    if loss_type == "grpo":
        clipped_rho = min(max(rho, 0.8), 1.28)
        loss = -min(rho * adv, clipped_rho * adv)
        grad = 0.0 if clipped_rho * adv < rho * adv else -rho * adv  # the min picks the constant clipped term
    else:
        weight = min(rho, 1.28)
        loss, grad = -weight * adv * logp, -weight * adv
    kl = math.exp(d) - d - 1
    return loss + beta * kl, grad + beta * (1 - math.exp(d))


@pytest.mark.parametrize("beta", [0.0, 0.1], ids=["no-kl", "kl"])
@pytest.mark.parametrize("agg", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_loss_and_gradient_equal_a_hand_computation(loss_type, agg, beta):
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    old = torch.tensor(LOGP, dtype=torch.float64) - torch.tensor(RATIO, dtype=torch.float64).log()
    ref = torch.tensor(LOGP, dtype=torch.float64) + torch.tensor(REF_SHIFT, dtype=torch.float64)
    mask = torch.tensor(MASK, dtype=torch.float64)
    per_token, clipped, kl = grpo.token_losses(logp, old, torch.tensor(ADV, dtype=torch.float64), loss_type, 0.2,
                                               0.28, ref, beta)
    loss = grpo.aggregate(per_token, mask, agg, total_tokens=5, total_replies=2)
    loss.backward()
    tokens = [(r, k) for r in range(2) for k in range(3) if MASK[r][k]]
    hand = {t: hand_token_loss(t, *t, loss_type, beta) for t in tokens}
    share = {t: 1 / 5 if agg == "token" else 1 / (2 * sum(MASK[t[0]])) for t in tokens}
    assert loss.item() == pytest.approx(sum(hand[t][0] * share[t] for t in tokens), abs=1e-12)
    expected_grad = [[hand[(r, k)][1] * share[(r, k)] if MASK[r][k] else 0.0 for k in range(3)] for r in range(2)]
    assert logp.grad.tolist() == [pytest.approx(row, abs=1e-12) for row in expected_grad]
    expected_clip = [[False, True, False], [loss_type == "grpo", False]]
    assert [clipped[r, :2 + (r == 0)].tolist() for r in range(2)] == expected_clip
    assert (kl is None) == (beta == 0)


def test_first_update_has_ratio_one_and_clips_nothing():
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, clipped, _ = grpo.token_losses(logp, logp.detach(), torch.tensor(ADV), "grpo", 0.2, 0.28)
    assert not clipped.any()
    assert loss.tolist() == [[-1.0, -1.0, -1.0], [0.5, 0.5, 0.5]]  # −A: the plain policy gradient


# ------------------------------------------------------------------------------------------------- sampling

def test_batched_sampling_equals_one_prompt_at_a_time_with_the_same_streams():
    model = sharpened_tiny_model(vocab_size=97, max_seq_len=48, sharpen=3)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    stops = [1, 2]

    def streams(p):
        return [random.Random(f"{p}-{g}") for g in range(3)]

    batched = generate_group(model, prompts, 3, 20, stops, 1.0, [s for p in range(3) for s in streams(p)])
    alone = [r for p in range(3) for r in generate_group(model, prompts[p:p + 1], 3, 20, stops, 1.0, streams(p))]
    assert batched == alone
    assert len({tuple(r) for r in batched}) > 3  # sampled, not all alike
    greedy = generate_group(model, prompts[:1], 1, 20, stops)
    reference = model.generate(torch.tensor(prompts[:1]), 20, temperature=0.0, stop_ids=stops)[0].tolist()
    assert greedy[0] == cut_at_stop(reference, stops)


# ----------------------------------------------------------------------------------------------- the stage

def test_stopped_and_resumed_run_is_bitwise_identical_including_sampling(setup, tmp_path):
    run = ["--max_steps", "4", "--batch_size", "2", "--accumulation_steps", "2", "--ppo_epochs", "2", "--beta",
           "0.1", "--save_step", "2", "--eval_data", setup["eval"], "--eval_interval", "2"]
    grpo.main(args_for(setup, tmp_path / "full", *run))
    grpo.main(args_for(setup, tmp_path / "split", *run, "--stop_step", "2"))
    assert latest(tmp_path / "split")["step"] == 2
    grpo.main(args_for(setup, tmp_path / "split", *run, "--resume_from", "auto"))
    full, split = latest(tmp_path / "full"), latest(tmp_path / "split")
    assert without_speed(full["history"]["train"]) == without_speed(split["history"]["train"])
    assert full["history"]["eval"] == split["history"]["eval"]
    for key, tensor in full["model"].items():
        assert torch.equal(tensor, split["model"][key]), key
    logged = full["history"]["train"][-1]
    for key in ("reward", "accuracy", "reward_format", "reward_length", "kl", "clip_frac", "completion_len",
                "zero_signal"):
        assert key in logged
    assert 0 < logged["completion_len"] <= 12 and logged["kl"] > 0
    assert any(r["clip_frac"] > 0 for r in full["history"]["train"])  # the second update of a batch clips
    assert {"val_accuracy", "val_format", "val_sampled_accuracy"} <= set(full["history"]["eval"][0])
    assert os.path.exists(tmp_path / "full" / "grpo_curves.png")
    assert os.path.exists(tmp_path / "full" / "grpo_final.pth")


def test_held_out_sampled_accuracy_counts_the_replies_of_the_documented_streams(setup, tmp_path):
    grpo.main(args_for(setup, tmp_path, "--max_steps", "1", "--batch_size", "4", "--eval_data", setup["eval"],
                       "--eval_samples", "3", "--seed", "7"))
    logged = latest(tmp_path)["history"]["eval"][-1]
    model, _ = load_model(str(tmp_path / "grpo_final.pth"))
    tokenizer = load_tokenizer(TOKENIZER)
    records = [json.loads(line) for line in open(setup["eval"])]
    prompts = [encode_prompt(tokenizer, r["conversations"][:-1]) for r in records]
    right = 0
    for i, (prompt, record) in enumerate(zip(prompts, records)):  # one problem at a time, by hand
        streams = [random.Random(f"grpo-eval-7-{i}-{k}") for k in range(3)]
        replies = generate_group(model, [prompt], 3, 12, stop_ids(tokenizer, raw=False), 1.0, streams)
        texts = tokenizer.batch_decode([r[:-1] if r[-1] in stop_ids(tokenizer, raw=False) else r for r in replies],
                                       skip_special_tokens=False)
        right += sum(rewards.same_answer(t, record["conversations"][-1]["content"]) for t in texts)
    assert 0 < right < 3 * len(records)
    assert logged["val_sampled_accuracy"] == pytest.approx(right / (3 * len(records)))


def test_rewards_vary_within_groups_and_the_policy_moves(setup, tmp_path):
    grpo.main(args_for(setup, tmp_path, "--max_steps", "2", "--batch_size", "4"))
    ckpt = latest(tmp_path)
    assert all(r["zero_signal"] < 1 for r in ckpt["history"]["train"])
    start = torch.load(setup["policy"], map_location="cpu", weights_only=True)["model"]
    assert any(not torch.equal(ckpt["model"][k], start[k]) for k in start)


def test_two_process_gloo_run_equals_one_process_with_the_global_batch(setup, tmp_path):
    run = ["--max_steps", "2", "--ppo_epochs", "2", "--loss_agg", "token"]
    grpo.main(args_for(setup, tmp_path / "one", *run, "--batch_size", "4"))
    torchrun("grpo.py", args_for(setup, tmp_path / "two", *run, "--batch_size", "2"))
    one, two = latest(tmp_path / "one"), latest(tmp_path / "two")
    assert two["world_size"] == 2
    for a, b in zip(one["history"]["train"], two["history"]["train"]):
        for key in ("reward", "accuracy", "completion_len", "zero_signal"):  # the same replies were sampled
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
    for key in one["model"]:
        assert torch.allclose(one["model"][key], two["model"][key], atol=1e-5), key


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("extra, message", [
    (["--num_generations", "1"], "--num_generations: must be >= 2"),
    (["--temperature", "0"], "--temperature: must be > 0"),
    (["--epsilon", "1"], "--epsilon: must be < 1"),
    (["--epsilon_high", "-0.1"], "--epsilon_high: must be >= 0"),
    (["--beta", "-1"], "--beta: must be >= 0"),
    (["--ppo_epochs", "0"], "--ppo_epochs: must be >= 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens: must be >= 1"),
    (["--rewards", "accuracy", "speed"], "unknown reward 'speed'"),
    (["--rewards", "accuracy=high"], "--rewards: expected a number, got 'high'"),
    (["--rewards", "accuracy", "accuracy=2"], "a reward is named twice"),
    (["--loss_type", "ppo"], "--loss_type: invalid choice"),
    (["--loss_agg", "batch"], "--loss_agg: invalid choice"),
    (["--ref_path", "x.pth"], "--ref_path is the KL reference: it needs --beta > 0"),
    (["--eval_samples", "4"], "--eval_samples samples replies to the held-out problems: it needs --eval_data"),
    (["--eval_samples", "-1"], "--eval_samples: must be >= 0"),
    (["--max_new_tokens", "64"], "--max_new_tokens 64 leaves no room for a prompt"),
    (["--max_new_tokens", "60"], "no prompt fits in 4 tokens"),
])
def test_bad_flags_are_refused_in_one_line(setup, tmp_path, capsys, extra, message):
    status, line = refused(grpo.main, args_for(setup, tmp_path, *extra), capsys)
    assert status == 2 and message in line, line
