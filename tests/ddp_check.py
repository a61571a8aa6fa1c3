"""One GRPO gradient of a fixed batch, and one SFT step's, computed data parallel: `torchrun
--nproc-per-node N tests/ddp_check.py OUT` writes rank 0's summed gradients per algorithm (and
for SFT) to OUT; tests/test_distributed.py compares them with one process's gradient of the
whole batch."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from picorl import data, distributed, models, sft  # noqa: E402
from picorl.batching import chat_prompt_ids  # noqa: E402
from picorl.config import load_config  # noqa: E402
from picorl.rollout import Completion  # noqa: E402
from picorl.trainer import GRPOTrainer  # noqa: E402
from test_trainer import float64_norms  # noqa: E402

ALGORITHMS = ("grpo", "dapo", "dr_grpo")
GROUPS, K = 6, 4


def fixed_batch(tokenizer):
    """GROUPS tasks x K completions of random tokens and lengths, and one advantage each."""
    g = torch.Generator().manual_seed(0)
    groups = []
    for r in data.train_records(2, GROUPS):
        prompt = chat_prompt_ids(tokenizer, r["messages"])
        groups.append([Completion(text="", prompt_ids=prompt, token_ids=torch.randint(
            10, 1000, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()) for _ in range(K)])
    return groups, torch.randn(GROUPS * K, generator=g, dtype=torch.float64)


def gradients(algorithm: str, rank: int, world: int) -> torch.Tensor:
    """This rank's share (groups rank::world) through the trainer's loss, gradients summed over ranks."""
    tok = models.load_tokenizer(models.TINY)
    model = models.add_lora(float64_norms(models.tiny_llama(len(tok), initializer_range=0.3)), rank=4, alpha=8).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) * 0.1)
    cfg = load_config(None, [f"grpo.algorithm={algorithm}", "grpo.micro_batch_size=5", "rollout.max_tokens=8"])
    trainer = GRPOTrainer(model, tok, None, cfg)
    groups, adv = fixed_batch(tok)
    mine = list(range(rank, GROUPS, world))
    completions = [c for i in mine for c in groups[i]]
    group_of = [j for j, i in enumerate(mine) for _ in groups[i]]
    trainer._optimise(completions, group_of, torch.cat([adv[i * K:(i + 1) * K] for i in mine]))
    distributed.sum_gradients(trainer.params)
    return torch.cat([p.grad.flatten() for p in trainer.params])


def sft_gradients() -> torch.Tensor:
    """One SFT step's gradient of 7 demonstrations (an odd count: the ranks hold 4 and 3 rows
    of different lengths), summed over ranks by picorl.sft.batch_gradients."""
    tok = models.load_tokenizer(models.TINY)
    model = models.add_lora(float64_norms(models.tiny_llama(len(tok), initializer_range=0.3)), rank=4, alpha=8).double()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = sft.encode_records(tok, data.train_records(3, 7), "cot", progress=False)
    sft.batch_gradients(model, params, batch, tok.pad_token_id)
    return torch.cat([p.grad.flatten() for p in params])


if __name__ == "__main__":
    rank, world = distributed.init_from_env()
    out = {a: gradients(a, rank, world) for a in ALGORITHMS}
    out["sft"] = sft_gradients()
    if rank == 0:
        torch.save(out, sys.argv[1])
