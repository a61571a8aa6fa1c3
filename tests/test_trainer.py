"""GRPO updates on a tiny random Llama: learning, skipping, micro-batching, checkpoints."""
import math
import os
import random
import re

import pytest
import torch

from picorl import checkpoint, data
from picorl.batching import chat_prompt_ids
from picorl.config import load_config
from picorl.data import messages_of
from picorl.models import add_lora, tiny_llama
from picorl.rollout.hf import HFEngine
from picorl.grpo import group_advantages
from picorl.rollout import Sampling
from picorl.trainer import GRPOTrainer, Scored, rollout_diagnostics

RECORDS = data.train_records(1, 1, seed=0)


# Toy task, one prompt: the reward is 1 when the first generated token is one of the 10
# tokens the initial model finds likeliest after it. A random Llama with a wide init puts
# ~15-25% on them, so groups have variance and GRPO has something to push up.
def make(tokenizer, *overrides, lora=True, seed=0, records=RECORDS, ranks=range(10)):
    cfg = load_config(None, ["rollout.max_tokens=3", "rollout.temperature=1.0", "grpo.tasks_per_update=4",
                             "grpo.group_size=8", "grpo.lr=0.003", "grpo.micro_batch_size=8",
                             "model.lora.rank=8", "model.lora.alpha=16", *overrides])
    model = tiny_llama(len(tokenizer), seed=seed, initializer_range=0.3)
    favourites = {}
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([chat_prompt_ids(tokenizer, messages_of(r))])
            top = model(ids).logits[0, -1].topk(10).indices.tolist()
            favourites[r["string"]] = {top[i] for i in ranks}

    def reward(c, record):
        ok = bool(c.token_ids) and c.token_ids[0] in favourites[record["string"]]
        return float(ok), ok, True
    if lora:
        model = add_lora(model, rank=8, alpha=16)
    engine = HFEngine(model, tokenizer, progress=False)
    return GRPOTrainer(model, tokenizer, engine, cfg, reward_fn=reward), cfg


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "dapo", "reinforce"])
def test_a_few_updates_raise_the_reward(tokenizer, algorithm):
    trainer, _ = make(tokenizer, f"grpo.algorithm={algorithm}")
    rewards = [trainer.update(RECORDS)["reward_mean"] for _ in range(8)]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    assert trainer.step == 8


def test_ppo_epochs_and_full_finetuning_learn(tokenizer):
    trainer, _ = make(tokenizer, "grpo.algorithm=ppo", "grpo.epochs=2", "grpo.lr=0.0003", lora=False)
    rewards = [trainer.update(RECORDS)["reward_mean"] for _ in range(8)]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards


def test_update_reports_every_metric(tokenizer):
    trainer, _ = make(tokenizer, "grpo.kl_coef=0.1")
    m = trainer.update(RECORDS)
    for key in ("reward_mean", "reward_std", "frac_correct", "reward_std_in_group", "frac_zero_var_groups",
                "loss", "grad_norm", "kl", "completion_len", "rollout_tokens_per_s", "update_s", "skipped"):
        assert key in m and math.isfinite(m[key]), key
    # The timing split covers the update: its parts are disjoint and add up to at most the whole.
    parts = [m[k] for k in ("rollout_s", "reward_s", "loss_backward_s", "optimizer_s", "sync_s")]
    assert all(p >= 0 for p in parts) and m["loss_backward_s"] > 0
    assert sum(parts) <= m["update_s"] + 1e-6
    assert len(m["task_correct"]) == 4 and m["skipped"] == 0.0
    assert 1 <= m["completion_len"] <= 3


def test_the_greedy_member_joins_each_group_after_the_samples_it_leaves_alone(tokenizer):
    plain, _ = make(tokenizer)
    with_greedy, _ = make(tokenizer, "grpo.greedy_member=true")
    a, b = plain.collect(RECORDS), with_greedy.collect(RECORDS)
    prompts = [messages_of(r) for r in b.tasks]
    greedy = with_greedy.engine.generate(prompts, 1, Sampling(temperature=0.0, max_tokens=3))
    assert len(b.first_round) == 4 * 9
    for ga, gb, one in zip(a.groups, b.groups, greedy):
        assert len(gb) == 9
        assert [c.token_ids for c in gb[:8]] == [c.token_ids for c in ga]  # the same samples
        assert gb[8].token_ids == one[0].token_ids


def test_the_greedy_member_takes_its_place_in_the_advantages_and_is_pushed_off_a_wrong_answer(tokenizer):
    """Reward 1 for a first token among the initial model's 2nd-10th likeliest: the greedy
    answer (the likeliest) is wrong, so every group where a sample is right pushes it down."""
    trainer, _ = make(tokenizer, "grpo.greedy_member=true", ranks=range(1, 10))
    seen = {}
    optimise = trainer._optimise

    def spy(completions, group_of, adv, carries_loss=None):
        seen.update(completions=completions, adv=adv.clone())
        return optimise(completions, group_of, adv, carries_loss)
    trainer._optimise = spy
    rollout = trainer.collect

    def keep(records):
        seen["got"] = rollout(records)
        return seen["got"]
    trainer.collect = keep
    m = trainer.update(RECORDS)
    got = seen["got"]
    rewards = torch.tensor([x.reward for s in got.scored for x in s])
    want, _ = group_advantages(rewards, 9, scale="group")
    assert len(seen["completions"]) == 36 and torch.equal(seen["adv"], want)
    assert m["greedy_correct"] == 0.0
    samples = [x for s in got.scored for x in s[:8]]
    assert m["frac_correct"] == sum(x.correct for x in samples) / 32
    assert len(m["task_correct"]) == 4
    # Where a group has a right sample, its greedy member's advantage is negative.
    for i, s in enumerate(got.scored):
        if any(x.correct for x in s[:8]):
            assert seen["adv"][i * 9 + 8] < 0
    # The toy's greedy token holds 8% of the mass and the rewarded ones 6%: a few updates flip it.
    greedy = [trainer.update(RECORDS)["greedy_correct"] for _ in range(4)]
    assert greedy[-1] == 1.0, greedy


def test_kl_grows_as_the_policy_leaves_the_reference(tokenizer):
    trainer, _ = make(tokenizer, "grpo.kl_coef=0.01")
    kls = [trainer.update(RECORDS)["kl"] for _ in range(5)]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # fresh LoRA: B=0, policy == reference
    assert kls[-1] > 1e-4


def _trained_adapter(tokenizer, std=0.1):
    """A float64 LoRA model whose adapter is not zero, as after SFT: adapter off != adapter on."""
    model = add_lora(float64_norms(tiny_llama(len(tokenizer), initializer_range=0.3)), rank=4, alpha=8).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)
    return model


def _kl_only(trainer, completions):
    """_optimise with every advantage zero: what it returns and leaves in .grad is the KL term's alone."""
    trainer.model.zero_grad(set_to_none=True)
    adv = torch.zeros(len(completions), dtype=torch.float64)
    _, kl, _ = trainer._optimise(completions, [0] * len(completions), adv)
    return kl, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.params]


def test_the_kl_reference_is_the_policy_grpo_started_from_not_the_adapter_off(tokenizer):
    """kl_reference=start: the KL is 0 (and its gradient too) until the weights move, and after
    they move it equals the k3 KL against a frozen copy of the start, gradient included (the
    swap of reference weights leaves the policy's graph alone). base: the adapter off, which
    a trained adapter is already far from."""
    import copy
    from picorl.grpo import kl_penalty, token_logprobs
    from picorl.batching import pad_batch
    from picorl.rollout import Completion
    prompt = [5, 6, 7, 8]
    comps = [Completion("", [20, 21, 22], prompt), Completion("", [23, 24], prompt), Completion("", [29], prompt)]
    model = _trained_adapter(tokenizer)
    start = copy.deepcopy(model)
    cfg = load_config(None, ["grpo.kl_coef=0.5", "grpo.micro_batch_size=2", "rollout.max_tokens=3"])
    trainer = GRPOTrainer(model, tokenizer, None, cfg)
    kl, grads = _kl_only(trainer, comps)
    assert kl == 0.0 and all(bool((g == 0).all()) for g in grads)

    base = GRPOTrainer(model, tokenizer, None, load_config(None, ["grpo.kl_coef=0.5", "grpo.kl_reference=base",
                                                                  "grpo.micro_batch_size=2", "rollout.max_tokens=3"]))
    assert _kl_only(base, comps)[0] > 1e-4

    with torch.no_grad():  # the policy moves away from its start
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.add_(torch.randn_like(p) * 0.05)
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    kl, grads = _kl_only(trainer, comps)
    assert all(torch.equal(p, moved[n]) for n, p in model.named_parameters())  # the start was swapped back out

    # By hand: the full batch at once, the reference a separate frozen model.
    seqs = [c.prompt_ids + c.token_ids for c in comps]
    masks = [[0] * len(c.prompt_ids) + [1] * len(c.token_ids) for c in comps]
    batch = pad_batch(seqs, masks, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        ref_lp, _ = token_logprobs(start.eval(), *batch)
    model.zero_grad(set_to_none=True)
    model.train()
    lp, cm = token_logprobs(model, *batch)
    want = kl_penalty(lp, ref_lp, cm)
    (0.5 * want).backward()  # grpo.kl_coef
    want_grads = [p.grad for p in trainer.params]
    assert kl == pytest.approx(want.item(), rel=1e-10) and want.item() > 0
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-14) for a, b in zip(grads, want_grads))


def test_reference_from_a_checkpoint_leaves_the_weights_in_memory(tokenizer, tmp_path):
    """A resumed run holds step N; its KL reference is step_0's weights, read from disk."""
    model = _trained_adapter(tokenizer)
    trainer = GRPOTrainer(model, tokenizer, None, load_config(None, ["grpo.kl_coef=0.1"]))
    folder = checkpoint.save_checkpoint(tmp_path, 0, model, trainer.state_dict())
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in trainer.params:
            p.add_(1.0)
    later = GRPOTrainer(model, tokenizer, None, trainer.cfg)  # as after a restore of step N
    assert not torch.equal(later.reference[next(iter(saved))], saved[next(iter(saved))])
    now = {n: p.detach().clone() for n, p in model.named_parameters()}
    later.reference_from(folder)
    assert set(later.reference) == set(saved)
    assert all(torch.equal(later.reference[n], saved[n]) for n in saved)
    assert all(torch.equal(p, now[n]) for n, p in model.named_parameters())


def test_micro_batches_and_shared_prefixes_give_the_full_batch_gradient(tokenizer):
    from picorl.grpo import group_advantages
    for algorithm in ("grpo", "dapo", "dr_grpo"):
        per = []
        for mb, shared in ((32, "false"), (5, "false"), (32, "true"), (5, "true")):
            trainer, _ = make(tokenizer, f"grpo.algorithm={algorithm}", f"grpo.micro_batch_size={mb}",
                              "grpo.max_resample_rounds=0", f"grpo.shared_prefix={shared}")
            got = trainer.collect(RECORDS)
            groups, scored = got.groups, got.scored
            rewards = torch.tensor([x.reward for s in scored for x in s])
            adv, _ = group_advantages(rewards, 8, scale=trainer.algo["scale"])
            completions = [c for g in groups for c in g]
            group_of = [i for i, g in enumerate(groups) for _ in g]
            loss, _, _ = trainer._optimise(completions, group_of, adv)
            per.append((loss, torch.cat([p.grad.flatten() for p in trainer.params])))
        for loss, grad in per[1:]:
            assert loss == pytest.approx(per[0][0], rel=1e-5, abs=1e-7)
            err = ((grad - per[0][1]).norm() / per[0][1].norm()).item()
            assert err < 1e-5, (algorithm, err)


def test_non_finite_loss_skips_the_step_and_keeps_weights(tokenizer):
    trainer, _ = make(tokenizer)
    before = [p.detach().clone() for p in trainer.params]
    trainer._optimise = lambda *a: (float("nan"), 0.0, 0.0)
    m = trainer.update(RECORDS)
    assert m["skipped"] == 1.0 and "non-finite" in m["skip_reason"]
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert trainer.step == 1 and trainer.skipped_in_a_row == 1 and m["skipped_updates"] == 1.0


def test_dynamic_sampling_drops_zero_variance_groups(tokenizer):
    calls = {"n": 0}

    def first_task_always_right(c, record):
        calls["n"] += 1
        r = 1.0 if record["string"] == RECORDS[0]["string"] else float(c.token_ids[0] % 2 == 0)
        return r, r == 1.0, True
    trainer, _ = make(tokenizer, "grpo.algorithm=dapo")
    trainer.reward_fn = first_task_always_right
    m = trainer.update([RECORDS[0]])  # every group has zero variance: nothing to learn
    assert m["skipped"] == 1.0 and m["frac_zero_var_groups"] == 1.0
    assert m["rollout_groups"] == 4 * (1 + trainer.cfg.grpo.max_resample_rounds)


def test_checkpoint_round_trip_gives_bit_identical_next_steps(tokenizer, tmp_path):
    trainer, cfg = make(tokenizer, "grpo.warmup_updates=3")
    for _ in range(2):
        trainer.update(RECORDS)
    checkpoint.save_checkpoint(tmp_path, trainer.step, trainer.model, trainer.state_dict(),
                               info={"phase": "grpo"})
    straight = [trainer.update(RECORDS) for _ in range(2)]
    weights_straight = [p.detach().clone() for p in trainer.params]

    resumed, _ = make(tokenizer, "grpo.warmup_updates=3")
    with torch.no_grad():  # scramble the adapter: every trained weight must come from disk
        for p in resumed.params:
            p.normal_()
    torch.manual_seed(123)  # and the RNG: its state must come from disk too
    state, info = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path), resumed.model)
    resumed.load_state_dict(state)
    assert info["phase"] == "grpo" and resumed.step == 2
    again = [resumed.update(RECORDS) for _ in range(2)]
    for a, b in zip(straight, again):
        assert a["reward_mean"] == b["reward_mean"] and a["loss"] == b["loss"] and a["lr"] == b["lr"]
    assert all(torch.equal(a, b) for a, b in zip(weights_straight, resumed.params))


def test_grpo_lr_schedule_decays_over_every_stages_updates(tokenizer):
    """grpo.lr_schedule takes SFT's shape over all stages' updates (3 + 2 here), after the warmup:
    warmup 1 -> the full rate at update 1, then cosine over the 4 left, progress 0, 1/4, 1/2, 3/4."""
    trainer, _ = make(tokenizer, "grpo.lr_schedule=cosine", "grpo.warmup_updates=1",
                      "stages=[{difficulty: 1, updates: 3}, {difficulty: 2, updates: 2}]")
    rates = []
    for _ in range(5):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.update(RECORDS)
    half = 0.003 / 2
    assert rates == pytest.approx([0.003, 0.003, half * (1 + math.cos(math.pi / 4)), half,
                                   half * (1 + math.cos(3 * math.pi / 4))])
    for _ in range(2):  # past the stages' budget the rate stays the last update's (cosine would turn back up)
        trainer.update(RECORDS)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(rates[-1])
    constant, _ = make(tokenizer)  # the default: the same rate at every update
    assert [constant.update(RECORDS)["lr"] for _ in range(3)] == [0.003] * 3


def test_checkpoints_are_atomic_and_pruned(tokenizer, tmp_path, monkeypatch):
    trainer, _ = make(tokenizer)
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, step, trainer.model, trainer.state_dict(), keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_2", "step_3"]

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save_checkpoint(tmp_path, 4, trainer.model, trainer.state_dict(), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_3"]
    monkeypatch.undo()
    state, info = checkpoint.load_checkpoint(tmp_path / "step_3", trainer.model)
    assert info["step"] == 3 and "optimizer" in state


def test_a_checkpoint_reads_as_plain_folders_and_files_would(tokenizer, tmp_path):
    """Private temporaries (mkdtemp's 0700, safetensors' 0600) must not leak into the finished
    checkpoint: under umask 022 a team on shared storage reads every folder and file of it."""
    import os
    import stat
    trainer, _ = make(tokenizer)
    old = os.umask(0o022)
    try:
        ckpt = checkpoint.save_checkpoint(tmp_path, 1, trainer.model, trainer.state_dict())
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode))
             for p in [ckpt, *ckpt.rglob("*")]}
    assert {p: m for p, m in modes.items() if m != (oct(0o755) if (tmp_path / p).is_dir() else oct(0o644))} == {}
    assert "step_1/adapter/adapter_model.safetensors" in modes


def test_a_checkpoint_that_fills_the_disk_says_so_and_names_the_folder(tokenizer, tmp_path, monkeypatch):
    # What torch.save raises when the disk fills mid-write names neither the cause nor the folder.
    import collections
    trainer, _ = make(tokenizer)
    checkpoint.save_checkpoint(tmp_path, 1, trainer.model, trainer.state_dict())

    def torn_write(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 5120 vs 5014")
    monkeypatch.setattr(checkpoint.torch, "save", torn_write)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 4096))
    with pytest.raises(OSError, match=rf"No space left on the disk of {re.escape(str(tmp_path))} for checkpoint "
                                      r"step_2 \(0.0 MiB free; the write said: \[enforce fail.*unexpected pos"):
        checkpoint.save_checkpoint(tmp_path, 2, trainer.model, trainer.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["step_1"]
    # With room on the disk the same error is what it is, not a full disk.
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10 << 30, 0, 10 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        checkpoint.save_checkpoint(tmp_path, 2, trainer.model, trainer.state_dict())


def _damage_truncate(f):
    os.truncate(f, 100)


def _damage_random_bytes(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = random.Random(0).randbytes(64)
    f.write_bytes(bytes(data))


def _damage_tear(f):
    f.write_bytes(f.read_bytes()[:-7])


@pytest.mark.parametrize("name,damage,says", [
    ("adapter/adapter_model.safetensors", _damage_truncate, "header length"),
    ("trainer_state.pt", _damage_random_bytes, "CRC"),
    ("trainer_state.pt", _damage_truncate, "not a readable torch.save archive"),
    ("state.json", _damage_tear, "not JSON"),
    ("history.jsonl", _damage_tear, "line 3: not JSON"),
])
def test_a_damaged_checkpoint_is_skipped_naming_its_file(tokenizer, tmp_path, capsys, name, damage, says):
    trainer, _ = make(tokenizer)
    history = [{"step": i} for i in range(3)]
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, trainer.model, trainer.state_dict(), history=history)
    assert checkpoint.checkpoint_damage(tmp_path / "step_2") is None
    damage(tmp_path / "step_2" / name)
    why = checkpoint.checkpoint_damage(tmp_path / "step_2")
    assert name in why and says in why, why
    # The resume point falls back to step_1, and the warning (once) names the bad file.
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step_1"
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step_1"
    err = capsys.readouterr().err
    assert err.count("is damaged and skipped") == 1 and name in err
    with pytest.raises(checkpoint.CheckpointDamaged, match=re.escape(name)):
        checkpoint.load_checkpoint(tmp_path / "step_2", trainer.model)
    checkpoint.load_checkpoint(tmp_path / "step_1", trainer.model)
    # Writing step 2 again replaces the damaged copy.
    checkpoint.save_checkpoint(tmp_path, 2, trainer.model, trainer.state_dict(), history=history)
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step_2"


def test_a_pickled_trainer_state_is_refused_as_unsafe_not_as_damage(tokenizer, tmp_path):
    trainer, _ = make(tokenizer)
    folder = checkpoint.save_checkpoint(tmp_path, 1, trainer.model, {"obj": PickledThing()})
    assert checkpoint.checkpoint_damage(folder) is None  # a sound archive
    with pytest.raises(RuntimeError, match="needs unpickling arbitrary objects"):
        checkpoint.load_checkpoint(folder, trainer.model)


class PickledThing:
    pass


def test_a_checkpoint_of_another_adapter_is_refused_not_half_loaded(tokenizer, tmp_path):
    """peft loads the adapter weights that match and only reports the rest: a checkpoint saved
    with adapters on q_proj and v_proj alone, loaded into a model with them on every module,
    would leave the others at their seeded init and train on. Resuming from it fails instead,
    naming the file."""
    saved = add_lora(tiny_llama(len(tokenizer), seed=3), rank=8, alpha=16, target_modules=["q_proj", "v_proj"])
    checkpoint.save_checkpoint(tmp_path, 1, saved, {})
    trainer, _ = make(tokenizer)
    with pytest.raises(checkpoint.AdapterMismatch, match=r"step_1/adapter/adapter_model.safetensors is not this "
                                                         r"model's adapter: 0 weights .* \d+ of its weights not in"):
        checkpoint.load_checkpoint(tmp_path / "step_1", trainer.model)
    # The same modules load every tensor, as before.
    same, _ = make(tokenizer, seed=4)
    same.update(RECORDS)  # off the seeded init, whose lora_B is zero in both
    checkpoint.save_checkpoint(tmp_path, 2, same.model, same.state_dict())
    checkpoint.load_checkpoint(tmp_path / "step_2", trainer.model)
    want, got = checkpoint.trained_weights(same.model), checkpoint.trained_weights(trainer.model)
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)


def test_full_weights_checkpoint_round_trip(tokenizer, tmp_path):
    trainer, _ = make(tokenizer, lora=False)
    trainer.update(RECORDS)
    checkpoint.save_checkpoint(tmp_path, 1, trainer.model, trainer.state_dict())
    assert (tmp_path / "step_1" / "model.safetensors").is_file()
    other = tiny_llama(len(tokenizer), seed=5)
    checkpoint.load_checkpoint(tmp_path / "step_1", other)
    for (n, a), b in zip(trainer.model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n


def test_token_logprobs_of_a_padded_batch_match_each_sequence_alone(tokenizer):
    from picorl.grpo import token_logprobs
    from picorl.batching import pad_batch
    model = tiny_llama(len(tokenizer), initializer_range=0.3).eval()
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    masks = [[0, 0, 0, 1, 1, 1], [0, 1, 1], [0, 0, 0, 1]]
    ids, attn, cm = pad_batch(seqs, masks, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        lp, m = token_logprobs(model, ids, attn, cm)
        assert m.shape == (3, 3)
        for j, (s, mk) in enumerate(zip(seqs, masks)):
            full = torch.log_softmax(model(torch.tensor([s])).logits[0, :-1].float(), -1)
            want = [full[t - 1, s[t]].item() for t in range(len(s)) if mk[t]]
            assert lp[j][m[j].bool()].tolist() == pytest.approx(want, abs=1e-5)


def test_stale_gradients_never_leak_into_an_update(tokenizer):
    trainer, _ = make(tokenizer)
    for p in trainer.params:  # e.g. left over from SFT's last backward
        p.grad = torch.ones_like(p)
    trainer.reward_fn = lambda c, r: (0.0, False, True)  # every group zero-variance: no policy gradient
    before = [p.detach().clone() for p in trainer.params]
    m = trainer.update(RECORDS)
    assert m["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))


def float64_norms(model):
    """Every RMSNorm computes in its input's dtype (transformers' casts to float32 and back)."""
    import types

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(forward, m)
    return model


def test_shared_prefix_logprobs_and_gradients_equal_the_full_sequences(tokenizer):
    from picorl.batching import pad_batch
    from picorl.grpo import shared_prefix_logprobs, token_logprobs
    # In float64: the two paths sum the same terms in different orders (another attention
    # kernel, other GEMM blockings, a thread count), and a sum of n terms reordered moves by
    # at most about n x eps relative. In float32 (eps 6e-8) n = 49,152 vocabulary terms
    # already allow 3e-3, so no tight float32 bound holds on every machine; in float64
    # (eps 1.1e-16) the same sum allows 5e-12, and 1e-9 relative leaves a wide margin.
    # transformers' RMSNorm computes in float32 whatever the model's dtype (its backward too),
    # so the norms are swapped for the same formula in the input's dtype.
    model = add_lora(float64_norms(tiny_llama(len(tokenizer), initializer_range=0.3)), rank=4, alpha=8).double()
    with torch.no_grad():  # a non-zero adapter, so its gradients depend on the prompt's keys/values
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [14, 15, 16]]
    completions = [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29], [30, 31]]
    owner = [0, 0, 1, 2, 2]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    lp, m = shared_prefix_logprobs(model, prompts, completions, owner, tokenizer.pad_token_id)
    assert m.shape == (5, 4) and m.sum().item() == sum(map(len, completions))
    g_shared = grads((lp * torch.arange(1.0, 6.0)[:, None]).sum())
    seqs = [prompts[o] + c for c, o in zip(completions, owner)]
    masks = [[0] * len(prompts[o]) + [1] * len(c) for c, o in zip(completions, owner)]
    ids, attn, cm = pad_batch(seqs, masks, tokenizer.pad_token_id, "cpu")
    ref, rm = token_logprobs(model, ids, attn, cm)
    g_full = grads((ref * torch.arange(1.0, 6.0)[:, None]).sum())
    assert lp.dtype == torch.float64 and ref.dtype == torch.float64
    for j in range(5):
        assert lp[j][m[j].bool()].tolist() == pytest.approx(ref[j][rm[j].bool()].tolist(), abs=1e-9)
    for a, b in zip(g_shared, g_full):  # equal up to float64 summation order
        assert (a - b).norm() <= 1e-9 * b.norm() + 1e-12
    assert any(a.abs().sum() > 0 for a in g_shared)


def test_rollout_diagnostics_on_a_hand_made_rollout():
    scored = [Scored(1.0, True, True, 20, False), Scored(0.0, False, True, 30, False),
              Scored(0.0, False, False, 96, True), Scored(0.0, False, False, 96, True)]
    d = rollout_diagnostics(scored)
    assert d == {"frac_truncated": 0.5, "frac_formatted": 0.5, "len_right": 20.0, "len_wrong": 74.0}
    # No right answer: its mean length is left out rather than reported as 0.
    assert "len_right" not in rollout_diagnostics(scored[1:])


def test_overlong_filter_gives_a_truncated_completion_no_loss_and_no_gradient(tokenizer):
    """A filtered completion's loss and gradient are those of the batch without it; all filtered: zero."""
    from picorl.rollout import Completion
    model = add_lora(float64_norms(tiny_llama(len(tokenizer), initializer_range=0.3)), rank=4, alpha=8).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    prompt = [5, 6, 7, 8]
    comps = [Completion("", [20, 21, 22], prompt), Completion("", [23, 24], prompt),
             Completion("", [25, 26, 27, 28], prompt, finished=False), Completion("", [29], prompt)]
    adv = torch.tensor([1.0, -0.5, -1.0, 0.5], dtype=torch.float64)
    for algorithm in ("grpo", "dapo", "dr_grpo"):
        cfg = load_config(None, [f"grpo.algorithm={algorithm}", "rollout.max_tokens=4", "grpo.micro_batch_size=2"])
        trainer = GRPOTrainer(model, tokenizer, None, cfg)

        def run(completions, a, keep=None):
            model.zero_grad(set_to_none=True)
            loss, _, _ = trainer._optimise(completions, [0] * len(completions), a, keep)
            return loss, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.params]

        loss_f, grads_f = run(comps, adv, [True, True, False, True])
        loss_w, grads_w = run([comps[i] for i in (0, 1, 3)], adv[[0, 1, 3]])
        assert loss_f == pytest.approx(loss_w, rel=1e-12, abs=1e-15), algorithm
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(grads_f, grads_w)), algorithm
        loss_0, grads_0 = run(comps, adv, [False] * 4)
        assert loss_0 == 0.0 and all(bool((g == 0).all()) for g in grads_0), algorithm


def test_overlong_filter_and_penalty_reach_the_update(tokenizer):
    """At max_tokens=3 a random model rarely stops by itself: the filter drops exactly the
    truncated completions, and the penalty (buffer 3) takes -1/3 a token off each reward."""
    trainer, _ = make(tokenizer, "grpo.overlong_filter=true")
    m = trainer.update(RECORDS)
    assert m["frac_truncated"] > 0 and m["frac_filtered"] == pytest.approx(m["frac_truncated"])
    trainer, _ = make(tokenizer, "reward.overlong_buffer=3")
    got = trainer.collect(RECORDS)
    for grp, s in zip(got.groups, got.scored):
        for c, x in zip(grp, s):
            assert x.truncated == (not c.finished)
            assert x.length == len(c.token_ids)
            assert x.reward == pytest.approx((1.0 if x.correct else 0.0) - len(c.token_ids) / 3)


@pytest.mark.parametrize("shared", [False, True])
def test_chunked_head_logprobs_and_gradients_equal_the_whole_logits(tokenizer, shared):
    # grpo.logprob_chunk: the completion positions go through the output head 3 at a time (a
    # chunk that divides nothing here) and no (positions x vocab) logits are held. In float64
    # the two ways differ only in summation order: the bound of the test above (1e-9 relative)
    # holds with the same margin. The head is the tied embedding, so its gradient (none under
    # LoRA) is checked too with every weight trainable.
    from picorl.batching import pad_batch
    from picorl.grpo import shared_prefix_logprobs, token_logprobs
    model = add_lora(float64_norms(tiny_llama(len(tokenizer), initializer_range=0.3)), rank=4, alpha=8).double()
    for p in model.parameters():
        p.requires_grad_(True)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [14, 15, 16]]
    completions = [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29], [30, 31]]
    owner = [0, 0, 1, 2, 2]
    seqs = [prompts[o] + c for c, o in zip(completions, owner)]
    masks = [[0] * len(prompts[o]) + [1] * len(c) for c, o in zip(completions, owner)]

    def run(chunk):
        model.zero_grad()
        if shared:
            lp, m = shared_prefix_logprobs(model, prompts, completions, owner, tokenizer.pad_token_id, chunk=chunk)
        else:
            lp, m = token_logprobs(model, *pad_batch(seqs, masks, tokenizer.pad_token_id, "cpu"), chunk=chunk)
        (lp * torch.arange(1.0, 6.0, dtype=torch.float64)[:, None]).sum().backward()
        return lp.detach(), m, [p.grad.clone() for p in model.parameters()]

    whole, m_whole, g_whole = run(0)
    chunked, m_chunked, g_chunked = run(3)
    assert torch.equal(m_whole.float(), m_chunked.float()) and chunked.dtype == torch.float64
    assert (chunked - whole).abs().max() <= 1e-9 * whole.abs().max()
    assert ((chunked == 0) == (m_whole == 0)).all()  # padding is 0, as the whole-logits path gives
    for a, b in zip(g_chunked, g_whole):
        assert (a - b).norm() <= 1e-9 * b.norm() + 1e-12
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_chunked_head_logprobs_match_gradcheck_and_repeat_bit_for_bit():
    from picorl.head_logprobs import selected_logprobs
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=g)
    ref = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(selected_logprobs(hidden, weight, targets, 2), ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h, w: selected_logprobs(h, w, targets, 3), (hidden, weight))
    # float32, twice: the same bits (chunks run in a fixed order), so a resumed run stays exact.
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    outs = []
    for _ in range(2):
        h32.grad = w32.grad = None
        out = selected_logprobs(h32, w32, targets, 3)
        out.sum().backward()
        outs.append((out.detach(), h32.grad.clone(), w32.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        selected_logprobs(hidden, weight, targets, 0)


def test_a_head_that_is_not_a_plain_matrix_takes_the_whole_logits(tokenizer):
    from picorl.head_logprobs import plain_head
    model = tiny_llama(len(tokenizer))
    assert plain_head(model) is model.get_output_embeddings().weight
    model.lm_head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    assert plain_head(model) is None
    model = tiny_llama(len(tokenizer))
    model.config.final_logit_softcapping = 30.0
    assert plain_head(model) is None
