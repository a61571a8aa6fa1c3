"""picorl/session.py: one loaded model per process, kept while the model does not change."""
from pathlib import Path

from picorl import session
from picorl.config import load_config

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def test_a_config_with_the_same_model_keeps_the_weights_and_gets_its_own_trainer():
    session.clear_sessions()
    cfg = load_config(SMOKE, [])
    sess = session.session_for(cfg)
    sess.fresh()  # the tiny model, its adapter and an hf engine
    model, engine = sess.model, sess.engine
    trainer = sess.get_trainer()
    sess.saved(Path("ckpt/step_2"))

    other = load_config(SMOKE, ["grpo.lr=0.5", "eval.size=2"])  # not what loading the model reads
    assert session.session_for(other) is sess
    assert sess.cfg is other and sess.model is model and sess.engine is engine  # same rollout: same engine
    assert sess.trainer is None and not sess.holds(Path("ckpt/step_2"))  # the next step restores its checkpoint
    assert sess.get_trainer() is not trainer and sess.trainer.cfg.grpo.lr == 0.5

    graph = load_config(SMOKE, ["rollout.engine=graph"])
    assert session.session_for(graph) is sess and type(sess.engine).__name__ == "GraphEngine"

    assert session.session_for(load_config(SMOKE, ["model.lora.rank=2"])) is not sess  # another model: reloaded
    assert session.session_for(load_config(SMOKE, ["run.seed=7"])) is not sess  # another adapter draw
    session.clear_sessions()


def test_evals_beside_bf16_rollouts_get_a_model_dtype_engine_synced_to_the_weights():
    import torch

    from picorl.rollout.decoder import Decoder
    session.clear_sessions()
    sess = session.session_for(load_config(SMOKE, ["rollout.engine=graph", "rollout.dtype=bfloat16"]))
    sess.fresh()
    assert sess.engine.dec.dtype == torch.bfloat16
    evals = sess.eval_engine(progress=False)
    assert evals is not sess.engine and evals.dec.dtype == torch.float32
    lora_b = next(p for n, p in sess.model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.add_(0.25)  # a training step the eval engine has not seen
    again = sess.eval_engine(progress=False)
    assert again is evals  # built once per loaded model
    now = Decoder(sess.model).w  # what an engine built from the weights as they are holds
    assert all(torch.equal(again.dec.w[k], now[k]) for k in now)
    sess.cfg = load_config(SMOKE, ["rollout.engine=graph"])  # rollouts in the model's dtype: one engine serves both
    sess.engine = session.engine_for_config(sess.cfg, sess.model, sess.tokenizer, progress=False)
    assert sess.eval_engine(progress=False) is sess.engine
    session.clear_sessions()
