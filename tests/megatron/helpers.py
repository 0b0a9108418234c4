"""Pieces the Megatron trainer tests share: a one-process trainer, steps, its whole state."""


def make_trainer(cfg, optim, objective, seed=0):
    from mugv_megatron.parallel import state as parallel
    from mugv_megatron.train.step import Trainer

    parallel.setup(1)
    return Trainer(cfg, optim, objective, seed=seed, use_megatron_optimizer=False)


def run(trainer, it, steps):
    for _ in range(steps):
        batch = next(it)
        batch.pop("prompt_id")
        trainer.train_step(batch)


def full_state(trainer, null_text: bool = True) -> dict:
    """Weights, EMA, Adam moments (and the null caption) as cloned tensors, by name."""
    out = {f"param.{n}": p.detach().clone() for n, p in trainer.module.named_parameters()}
    out.update({f"ema.{n}": t.clone() for n, t in trainer.ema.shadow.items()})
    for n, p in trainer.module.named_parameters():
        for k, t in trainer.optimizer.moments(p).items():
            out[f"{k}.{n}"] = t.clone()
    if null_text:
        out["null_text"] = trainer.null_text.clone()
    return out
