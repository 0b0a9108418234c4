"""The planner's memory figures equal what a real sharded run allocates."""
import os

import jax

from mugv_jax import plan as plan_lib
from mugv.data.synthetic import Bucket
from mugv_jax.train import backend as train_lib
from tests.trainer_helpers import host_batch, make_source

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import tiny as tiny_config


def _device0_bytes(tree):
    dev = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
               if s.device == dev)


def test_planner_memory_matches_a_real_step():
    c = tiny_config.get_config()
    c.mesh.ici = dict(data=2, fsdp=4, tensor=1, context=1)
    c.data.buckets = ((3, 4, 6, 8),)
    c.optim.warmup_steps = 0
    p = plan_lib.plan_step(c)  # abstract: nothing allocated
    assert p.mesh == {"data": 2, "fsdp": 4, "tensor": 1, "context": 1} and p.bucket == (3, 4, 6, 8)

    # The real thing on the same mesh: state after one step, and the compiled step's own analysis.
    trainer = train_lib.build_trainer(c)
    state = trainer.init_state(0)
    batch = trainer.put_batch(host_batch(make_source(8, [Bucket(3, 4, 6, 8)])))
    batch_bytes = _device0_bytes(batch)
    new_state, metrics = trainer.train_step(state, batch)
    assert bool(metrics["finite"])
    assert p.params_bytes == _device0_bytes(new_state["params"])
    assert p.optimizer_bytes == _device0_bytes(new_state["opt_state"])
    assert p.ema_bytes == _device0_bytes(new_state["ema"])
    assert p.state_bytes == _device0_bytes(new_state)
    assert p.batch_bytes == batch_bytes
    # fsdp=4 really divides the big tensors: the per-device parameters are far below the total.
    total_params = sum(x.nbytes for x in jax.tree.leaves(jax.device_get(new_state["params"])))
    assert p.params_bytes < 0.5 * total_params
    # XLA's arguments are exactly the state and the batch held by one device.
    assert p.xla_argument_bytes == p.state_bytes + p.batch_bytes
    key = next(iter(trainer._steps))
    compiled = trainer._steps[key].lower(new_state, batch).compile()
    assert p.temp_bytes == compiled.memory_analysis().temp_size_in_bytes > 0
    assert p.analytic_flops > 0 and p.xla_flops > 0


def test_report_says_whether_it_fits():
    p = plan_lib.Plan(mesh={"data": 1, "fsdp": 4, "tensor": 1, "context": 1}, bucket=(1, 2, 2, 4),
                      params_bytes=10, optimizer_bytes=20, ema_bytes=10, other_state_bytes=1, batch_bytes=1,
                      temp_bytes=40 * plan_lib.GiB, xla_argument_bytes=42, xla_output_bytes=42,
                      xla_alias_bytes=41, analytic_flops=4 * 459e12 * 0.4, xla_flops=1.0, compile_seconds=1)
    assert "DOES NOT FIT" in plan_lib.report(p, "tpu-v6e", 0.4)  # 40 GiB of temporaries > 32 GiB
    text = plan_lib.report(p, "tpu-v5p", 0.4)
    assert text.split("HBM: ")[1].startswith("fits") and "0.4 MFU" not in text and "1.00 s" in text
