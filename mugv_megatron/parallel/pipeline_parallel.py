"""Forward + backward of a list of micro-batches through megatron's schedules (any TP/CP/PP).

    stage = dit.build_model(config)                      # this rank's stage (after parallel.setup)
    pipeline.load_release_state(stage, release_state)    # optional: its slice of a checkpoint
    model = pipeline.wrap_ddp(stage)
    loss = pipeline.forward_backward(model, micro_batches, loss_fn)
    grads = pipeline.gradients(model)                    # p.main_grad, fully reduced

Two schedules. On a GPU, megatron's own (`get_forward_backward_func`: no pipelining for
PP = 1, the non-interleaved 1F1B schedule otherwise; stages exchange the hidden state
[S_local, B, C] whose length depends on the clip, so shapes are communicated per micro-batch,
`variable_seq_lengths`). megatron's schedules allocate a counter with device="cuda", which the
CPU shim cannot redirect, so on CPU (and on request) a minimal schedule runs instead: every
micro-batch forward through the stages with torch.distributed send/recv, then every backward.
Both scale each loss the same way, so they give the same grads.

Gradient reduction is megatron's `finalize_model_grads` (the config's
`finalize_model_grads_func` under megatron's schedule, called directly after the minimal one):
DDP all-reduces every grad over the data-parallel-with-context-parallel group (averaging,
which with the loss × CP gives the CP sum the context-parallel layout needs); the replicated
embedders, flagged `pipeline_parallel`, are summed over the pipeline group
(config.has_cond_embedder); sequence-parallel and q/k-norm grads are summed over TP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from mugv.layouts import megatron as layout
from mugv.schema import check_state_dict_shapes, release_schema

MODEL_INPUTS = ("x", "timestep", "y", "mask", "x_mask", "fps", "frame_indice")
_KEYWORD_INPUTS = MODEL_INPUTS[3:]


def _unwrap(model):
    return getattr(model, "module", model)


def wrap_ddp(model, *, grad_reduce_in_fp32: bool = True):
    """megatron's DistributedDataParallel around a MUG-DiT stage (plain all-reduce, no overlap;
    the distributed optimizer needs CUDA, see docs/megatron.md)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def padded_sequence_length(model, x_shape: Sequence[int]) -> int:
    """Tokens of one clip's sequence (start + video + end), padded as the model pads it."""
    module = _unwrap(model)
    cfg, tc = module.dit_config, module.config
    _, _, t, h, w = x_shape
    pt, ph, pw = cfg.patch_size
    length = -(-t // pt) * -(-h // ph) * -(-w // pw) + 2
    multiple = tc.context_parallel_size * (tc.tensor_model_parallel_size if tc.sequence_parallel else 1)
    return -(-length // multiple) * multiple


def _local_hidden_shape(module, batch) -> tuple[int, int, int]:
    """[S_local, B, C] of the hidden state a stage sends for this micro-batch."""
    tc = module.config
    split = tc.context_parallel_size * (tc.tensor_model_parallel_size if tc.sequence_parallel else 1)
    return (padded_sequence_length(module, batch["x"].shape) // split, batch["x"].shape[0], tc.hidden_size)


def _run_stage(stage, batch):
    kwargs = {k: batch[k] for k in _KEYWORD_INPUTS if k in batch}
    return stage(batch["x"], batch["timestep"], batch["y"], **kwargs)


def _sequential_schedule(model, micro_batches, loss_fn, forward_only: bool) -> list[torch.Tensor]:
    """All forwards (activations sent stage to stage), then all backwards (grads sent back).

    The pipeline fill/drain costs the same bubble as 1F1B but every micro-batch's activations
    stay alive until its backward; fine for the few micro-batches of a test or a small run.
    Received tensors need no shape exchange: both sides derive [S_local, B, C] from the batch.
    Each loss is scaled as megatron's schedule scales it (× CP size / micro-batches), so the
    same DDP reduction gives the same grads.
    """
    from megatron.core import parallel_state

    module = _unwrap(model)
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    prev_rank = None if first else parallel_state.get_pipeline_model_parallel_prev_rank()
    next_rank = None if last else parallel_state.get_pipeline_model_parallel_next_rank()
    device, dtype = module.start_token.device, module.config.params_dtype
    scale = module.config.context_parallel_size / len(micro_batches)
    grad_context = torch.no_grad() if forward_only else torch.enable_grad()

    saved, losses = [], []
    with grad_context:
        for batch in micro_batches:
            received = None
            if not first:
                received = torch.empty(_local_hidden_shape(module, batch), dtype=dtype, device=device)
                dist.recv(received, src=prev_rank)
                received.requires_grad_(not forward_only)
            module.set_input_tensor(received)
            output = _run_stage(model, batch)
            if last:
                loss = loss_fn(output, batch)
                losses.append(loss.detach().float())
                output = loss * scale
            else:
                # Under bf16 autocast the stage output is bf16; the wire carries the
                # params dtype both ways, which the receiver allocates without a handshake.
                dist.send(output.detach().to(dtype).contiguous(), dst=next_rank)
            saved.append((received, output))
    module.set_input_tensor(None)
    if forward_only:
        return losses
    for _batch, (received, output) in zip(micro_batches, saved):
        if last:
            output.backward()
        else:
            grad = torch.empty(output.shape, dtype=dtype, device=device)
            dist.recv(grad, src=next_rank)
            output.backward(grad.to(output.dtype))
        if not first:
            dist.send(received.grad.contiguous(), dst=prev_rank)
    return losses


def _megatron_schedule(model, micro_batches, loss_fn, forward_only: bool) -> list[torch.Tensor]:
    """megatron's get_forward_backward_func (1F1B for PP > 1). It allocates a token counter
    with device="cuda", so it only runs on a GPU (untested here: no GPU on the dev machines)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    module = _unwrap(model)
    batch_size = micro_batches[0]["x"].shape[0]

    def forward_step(data_iterator, stage):
        batch = next(data_iterator)
        output = _run_stage(stage, batch)

        def loss_func(out):
            loss = loss_fn(out, batch)
            return loss, {"loss": loss.detach().float()}

        return output, loss_func

    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=padded_sequence_length(module, micro_batches[0]["x"].shape),
        micro_batch_size=batch_size,
        forward_only=forward_only,
    )
    return [r["loss"] for r in reports] if reports else []


def forward_backward(
    model,
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, Mapping], torch.Tensor],
    *,
    forward_only: bool = False,
    schedule: str | None = None,
) -> torch.Tensor:
    """Mean of `loss_fn(output, micro_batch)` over the micro-batches; grads of that mean.

    `model` is this rank's stage wrapped by `wrap_ddp` (grads land in `p.main_grad`, reduced
    over data/context parallel ranks, pipeline stages and TP as megatron's finalize_model_grads
    does; call `model.zero_grad_buffer()` before a new step). Each micro-batch maps the model's
    input names (MODEL_INPUTS; x, timestep, y, fps required) to tensors, plus whatever
    `loss_fn` reads; every stage and every context-parallel rank gets the same micro-batches,
    each data-parallel replica its own. `schedule`: "megatron" (megatron's 1F1B, needs CUDA)
    or "sequential" (all forwards, then all backwards; any device); default megatron's on a
    GPU. The returned loss (float32 scalar) is the same on every rank of the pipeline.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    if not micro_batches:
        raise ValueError("forward_backward: no micro-batches")
    schedule = schedule or ("megatron" if torch.cuda.is_available() else "sequential")
    if schedule not in ("megatron", "sequential"):
        raise ValueError(f"forward_backward: schedule must be 'megatron' or 'sequential', got {schedule!r}")
    module = _unwrap(model)
    if not forward_only and not hasattr(model, "finish_grad_sync"):
        raise TypeError(
            "forward_backward needs the model wrapped by pipeline.wrap_ddp "
            "(megatron's DDP reduces the grads over data/context parallel ranks)"
        )
    batch_sizes = {mb["x"].shape[0] for mb in micro_batches}
    if len(batch_sizes) != 1:
        raise ValueError(f"forward_backward: micro-batches must share a batch size, got {sorted(batch_sizes)}")

    if schedule == "megatron":
        module.config.finalize_model_grads_func = None if forward_only else finalize_model_grads
        losses = _megatron_schedule(model, micro_batches, loss_fn, forward_only)
    else:
        losses = _sequential_schedule(model, micro_batches, loss_fn, forward_only)
        if not forward_only:
            finalize_model_grads([model])

    loss = torch.zeros((), dtype=torch.float32, device=module.start_token.device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        loss = torch.stack(losses).mean()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if pp_group.size() > 1:
        dist.broadcast(loss, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=pp_group)
    return loss


def stage_state(
    model, release_state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """This rank's shard of a release-layout state dict: its TP shard, its pipeline stage's layers
    renumbered from 0, the final layer only on the last stage.

    The full checkpoint is checked against the release schema first, so a missing or misshapen
    tensor anywhere is named even when it belongs to another stage.
    """
    from megatron.core import parallel_state

    module = _unwrap(model)
    config = module.dit_config
    check_state_dict_shapes({k: tuple(v.shape) for k, v in release_state.items()}, release_schema(config), source)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    first = module.decoder.layer_offset
    count = len(module.decoder.layers)
    prefix = "decoder.layers."
    out = {}
    # One release tensor at a time: another stage's tensors are dropped as soon as they are read.
    megatron_tensors = (pair for n, t in release_state.items() for pair in layout.release_to_megatron(n, t, config))
    for name, full in megatron_tensors:
        tensor = layout.tp_shard(name, full, rank, tp)
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            local = int(index) - first
            if 0 <= local < count:
                out[f"{prefix}{local}.{rest}"] = tensor
        elif name.startswith("final_layer.") and not module.post_process:
            continue
        else:
            out[name] = tensor
    return out


def load_release_state(model, release_state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Strictly load this rank's stage (and TP shard) of a release-layout state dict."""
    from megatron.core import parallel_state

    module = _unwrap(model)
    shard = stage_state(module, release_state, source)
    own = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith(layout.EXTRA_STATE_SUFFIX)}
    first = module.decoder.layer_offset
    where = (
        f"{source} (as Megatron TP rank {parallel_state.get_tensor_model_parallel_rank()}, "
        f"pipeline stage {parallel_state.get_pipeline_model_parallel_rank()} holding layers "
        f"{first}..{first + len(module.decoder.layers) - 1})"
    )
    check_state_dict_shapes({k: tuple(v.shape) for k, v in shard.items()}, own, where)
    dtype = module.config.params_dtype
    module.load_state_dict({k: v.to(dtype) for k, v in shard.items()}, strict=True)


def gradients(model) -> dict[str, torch.Tensor | None]:
    """{parameter name: reduced grad} of a `wrap_ddp` model (megatron keeps them in main_grad)."""
    return {name: getattr(p, "main_grad", p.grad) for name, p in _unwrap(model).named_parameters()}
