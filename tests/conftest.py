import os
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Tests never touch the network, and torch must not oversubscribe the 2 CI cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from picorl.models import load_tokenizer
    return load_tokenizer("tiny-random-llama")


@pytest.fixture
def tiny_model(tokenizer):
    """A 2-layer random Llama with the embedded tokenizer, built in memory."""
    from picorl.models import tiny_llama
    return tiny_llama(len(tokenizer)).eval()


def trainer_logprobs(model, tok, completions) -> list[list[float]]:
    """The trainer's log-probs of each completion's tokens given its prompt (what engines must report)."""
    import torch

    from picorl.batching import pad_batch
    from picorl.grpo import token_logprobs
    seqs = [c.prompt_ids + c.token_ids for c in completions]
    masks = [[0] * len(c.prompt_ids) + [1] * len(c.token_ids) for c in completions]
    with torch.no_grad():
        lp, m = token_logprobs(model, *pad_batch(seqs, masks, tok.pad_token_id, next(model.parameters()).device))
    return [lp[j][m[j].bool()].tolist() for j in range(len(completions))]


def kill_session(p) -> None:
    """SIGKILL a process started with start_new_session=True and everything it started (e.g. a Prefect server)."""
    import signal
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, log: Path, timeout_s: float = 120) -> None:
    """Wait until a server we started answers `url`; on timeout, fail with the tail of its log."""
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert time.time() < deadline, Path(log).read_text()[-2000:]
            time.sleep(0.5)
