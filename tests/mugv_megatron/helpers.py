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


def layer_saved_bytes(model, index: int, forward) -> int:
    """Bytes of the distinct storages autograd saves inside decoder layer `index` while
    `forward()` runs with grad: parameters excluded, and so is what an earlier layer saved too
    (the RoPE tables, the text: shared by every layer). `forward` must return the output, which is
    kept alive until the count is taken (saved tensors live as long as the graph)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    earlier, mine, where = set(), {}, {"layer": None}

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if where["layer"] is not None and st.nbytes() and key not in params:
            if where["layer"] < index:
                earlier.add(key)
            elif where["layer"] == index and key not in earlier:
                mine[key] = st.nbytes()
        return t

    handles = []
    for i, layer in enumerate(model.decoder.layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: where.update(layer=i)))
        handles.append(layer.register_forward_hook(lambda m, a, o: where.update(layer=None)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()  # noqa: F841 -- holds the graph (and the saved tensors) until counted
        return sum(mine.values())
    finally:
        for h in handles:
            h.remove()
