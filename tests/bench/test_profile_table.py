"""bench/profile_table.py on hand-written traces named like real GPU ones: every category, the
overlap rule, the step windows and host gaps, JAX (XLA ops + HLO) and torch (kernels, CPU ops)."""

import gzip
import json
import os

import pytest

from bench import profile_table as pt

# An optimized HLO module as XLA prints it (abridged), with the source tables of newer XLA: the
# instruction names are those the trace's kernels carry as hlo_op.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "profile_fixture.hlo")) as _fh:
    HLO = _fh.read()

GPU, HOST = 1, 2
COMPUTE, NCCL, XLA_OPS, MODULES = 7, 20, 2, 3


def _meta():
    return [
        {"ph": "M", "pid": GPU, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": GPU, "tid": COMPUTE, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": GPU, "tid": NCCL, "name": "thread_name", "args": {"name": "Stream #20(Nccl)"}},
        {"ph": "M", "pid": GPU, "tid": XLA_OPS, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": GPU, "tid": MODULES, "name": "thread_name", "args": {"name": "XLA Modules"}},
        {"ph": "M", "pid": HOST, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": HOST, "tid": 1, "name": "thread_name", "args": {"name": "python"}},
    ]


def _x(name, ts, dur, tid=COMPUTE, pid=GPU, hlo_op=None):
    e = {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}
    if hlo_op:
        e["args"] = {"hlo_op": hlo_op, "hlo_module": "jit__step_fn"}
    return e


def _jax_trace():
    """Two steps of 1000 µs; the kernels' names are what XLA GPU, cuDNN, cuBLAS and NCCL launch."""
    ev = _meta()
    for base in (0, 10_000):
        ev.append(_x(pt.STEP_MARK, base, 1000, tid=1, pid=HOST))
        ev += [
            # cuDNN flash attention, forward then backward (their HLO custom calls name them too)
            _x(
                "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64",
                base + 0,
                100,
                hlo_op="custom-call.3",
            ),
            _x(
                "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_5_64x128x64",
                base + 100,
                200,
                hlo_op="custom-call.4",
            ),
            # a cuBLAS GEMM and an XLA GEMM fusion
            _x(
                "cutlass3x_sm90_tensorop_s64x128x16gemm_bf16_bf16_f32_bf16_bf16_128x256x64_1x2x1",
                base + 300,
                50,
                hlo_op="custom-call.7",
            ),
            _x("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", base + 350, 50, hlo_op="gemm_fusion.1"),
            # XLA attention ops (traced from mugv_jax/parallel/attention.py): scores dot, the
            # recomputed softmax (forward), the softmax's backward
            _x("loop_scores_fusion", base + 400, 30, hlo_op="loop_scores_fusion"),
            _x("loop_exp_fusion", base + 430, 20, hlo_op="loop_exp_fusion"),
            _x("loop_multiply_fusion", base + 450, 40, hlo_op="loop_multiply_fusion"),
            # a norm (ops.py) and a device copy
            _x("input_reduce_fusion", base + 490, 60, hlo_op="input_reduce_fusion"),
            _x("MemcpyD2D", base + 550, 10),
            # an all-gather on its own stream: 60 µs under the norm and the copy, 30 µs exposed
            _x(
                "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
                base + 500,
                90,
                tid=NCCL,
                hlo_op="all-gather-start.1",
            ),
            # lines that summarise the kernels, not device work of their own
            _x("while.1", base + 0, 700, tid=XLA_OPS, hlo_op="while.1"),
            _x("jit__step_fn", base + 0, 700, tid=MODULES),
        ]
    ev.append(_x("loop_exp_fusion", 5000, 500, hlo_op="loop_exp_fusion"))  # between the steps: left out
    return ev


def test_jax_gpu_trace_buckets_each_kernel_to_its_category_and_sums_to_busy():
    prof = pt.bucket(_jax_trace(), pt.parse_hlo(HLO))
    per_step = {c: v / 2 for c, v in prof.buckets_us.items()}
    assert per_step == {
        "attention fwd": 100 + 30 + 20,  # cuDNN forward, XLA scores, recomputed softmax
        "attention bwd": 200 + 40,  # cuDNN backward, softmax backward
        "matmuls": 50 + 50,
        "norms/elementwise": 60,
        "other": 10,  # the device copy
        "collectives": 30,  # only the part no kernel hides
    }
    assert prof.steps == 2 and prof.wall_us == 2000
    assert prof.busy_us == sum(prof.buckets_us.values()) == 2 * 590
    assert prof.host_gap_us == 2000 - 2 * 590
    table = pt.format_table("variant", prof)
    assert "attention bwd" in table and "host gaps" in table and "(2 profiled)" in table
    assert pt.as_dict(prof)["buckets_ms"]["matmuls"] == pytest.approx(0.1)


def test_the_extract_rebuckets_to_the_same_profile():
    events, hlo = _jax_trace(), pt.parse_hlo(HLO)
    data = json.loads(json.dumps(pt.extract(events, hlo)))  # through JSON, as it comes back
    assert pt.bucket_extract(data) == pt.bucket(events, hlo)
    assert len(data["ops"]) == 2 * 10 and "while.1" not in data["hlo"]  # stream ops in the windows only


def test_kernel_names_alone_classify_like_the_hlo_does():
    """Without the module's HLO (a torch trace, an unknown op), names decide."""
    assert pt.classify("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention fwd"
    assert pt.classify("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16") == "attention bwd"
    assert pt.classify("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<72>>") == "attention fwd"
    assert pt.classify("void flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<>") == "attention bwd"
    assert pt.classify("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmuls"
    assert pt.classify("nvjet_tst_192x192_64x4_1x2_h_bz_coopB_NNT") == "matmuls"
    assert pt.classify("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL") == "collectives"
    assert pt.classify("all-reduce-start.2") == "collectives"
    assert pt.classify("loop_add_fusion") == "norms/elementwise"
    assert pt.classify("void at::native::vectorized_elementwise_kernel<4>") == "norms/elementwise"
    assert pt.classify("void transformer_engine::rmsnorm_fwd_tuned_kernel<>") == "norms/elementwise"
    assert pt.classify("Memcpy DtoD (Device -> Device)") == "other"
    # The HLO decides where a name cannot: a fusion holding a dot is a matmul.
    ops = pt.parse_hlo(HLO)
    assert pt.classify("input_fusion", ops["gemm_fusion.1"]) == "matmuls"
    assert pt.classify("loop_fusion", ops["input_reduce_fusion"]) == "norms/elementwise"
    assert pt.classify("custom-call.4", ops["custom-call.4"]) == "attention bwd"
    # A cuBLAS GEMM traced from the attention code (XLA attention's scores) is attention's.
    assert pt.classify("sm90_xmma_gemm_bf16bf16", ops["custom-call.7"]) == "matmuls"
    assert pt.classify("sm90_xmma_gemm_bf16bf16", ops["custom-call.8"]) == "attention bwd"


def test_torch_trace_kernels_and_nested_cpu_ops(tmp_path):
    ev = [
        {"ph": "X", "cat": "user_annotation", "name": pt.STEP_MARK, "pid": 0, "tid": 1, "ts": 0, "dur": 1000},
        {"ph": "X", "cat": "gpu_user_annotation", "name": pt.STEP_MARK, "pid": 0, "tid": 7, "ts": 0, "dur": 5000},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 0, "tid": 1, "ts": 10, "dur": 900},
        {
            "ph": "X",
            "cat": "kernel",
            "name": "pytorch_flash::flash_fwd_kernel",
            "pid": 0,
            "tid": 7,
            "ts": 100,
            "dur": 100,
        },
        {
            "ph": "X",
            "cat": "kernel",
            "name": "flash_bwd_dq_dk_dv_loop_kernel",
            "pid": 0,
            "tid": 7,
            "ts": 200,
            "dur": 300,
        },
        {
            "ph": "X",
            "cat": "kernel",
            "name": "ampere_bf16_s16816gemm_bf16_128x128",
            "pid": 0,
            "tid": 7,
            "ts": 500,
            "dur": 100,
        },
        {
            "ph": "X",
            "cat": "gpu_memcpy",
            "name": "Memcpy HtoD (Pageable -> Device)",
            "pid": 0,
            "tid": 8,
            "ts": 550,
            "dur": 100,
        },
    ]
    path = tmp_path / "t.pt.trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": ev}, fh)
    prof, ops = pt.profile_dir(str(tmp_path))
    assert pt.bucket_extract(json.loads(json.dumps(ops))) == prof  # what comes back re-buckets alike
    # kernels only (the CPU op is the launch side); the host window, not the device-side copy
    assert prof.buckets_us == {
        "attention fwd": 100,
        "attention bwd": 300,
        "matmuls": 100,
        "norms/elementwise": 0,
        "other": 50,  # the copy's part outside the GEMM
        "collectives": 0,
    }
    assert prof.wall_us == 1000 and prof.host_gap_us == 450
    # A CPU-only trace: nested op events count as their own (innermost) time.
    cpu = [
        {"ph": "X", "cat": "user_annotation", "name": pt.STEP_MARK, "pid": 0, "tid": 1, "ts": 0, "dur": 100},
        {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "pid": 0, "tid": 1, "ts": 0, "dur": 50},
        {"ph": "X", "cat": "cpu_op", "name": "aten::addmm", "pid": 0, "tid": 1, "ts": 10, "dur": 30},
        {"ph": "X", "cat": "cpu_op", "name": "MulBackward0", "pid": 0, "tid": 1, "ts": 50, "dur": 40},
        {
            "ph": "X",
            "cat": "cpu_op",
            "name": "aten::scaled_dot_product_attention",
            "pid": 0,
            "tid": 1,
            "ts": 60,
            "dur": 20,
        },
    ]
    prof = pt.bucket(cpu)
    assert prof.buckets_us["matmuls"] == 50
    assert prof.buckets_us["attention fwd"] == 20
    assert prof.buckets_us["norms/elementwise"] == 20  # MulBackward0's own time around the attention
    assert prof.busy_us == 90 and prof.host_gap_us == 10


def test_a_trace_without_step_marks_is_refused_naming_the_mark():
    with pytest.raises(ValueError, match=pt.STEP_MARK):
        pt.bucket(_meta())
