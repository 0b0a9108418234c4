"""The planner's roofline (mugv/roofline.py) for the one 10B-width step measured on hardware.

    python bench/roofline_check.py

The step: 4 layers of 10B width (hidden 3456, 48 heads of 72) at the 720p × 5 s token count
(latent 14×90×160 → 50,402 tokens), batch 1, 300 caption tokens, bf16, remat "full", cuDNN
attention, AdamW; one H200 (bench/device_check.sh, 2026-12-04; docs/benchmarks.md). One device,
so no collectives. Prints the prediction per op class, the measurement, and their ratio.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mugv import flops, roofline  # noqa: E402
from mugv.config import get_config  # noqa: E402
from mugv.geometry import num_video_tokens  # noqa: E402
from mugv.schema import num_params, release_schema  # noqa: E402

LATENT_720P = (14, 90, 160)
TEXT = 300
# docs/benchmarks.md, "Device check on one H200": JAX with cuDNN flash attention, median of 3 steps.
MEASURED = {"device": "h200", "seconds": 2.989, "mfu": 0.212, "date": "2026-12-04"}


def predict(layers: int = 4, kind: str = "h200", kernel: str = "cudnn", remat: str = "full"):
    cfg = get_config("10b").replace(depth=layers)
    n = num_video_tokens(LATENT_720P, cfg)
    dev = roofline.DEVICES[kind]
    factor = roofline.hardware_factor(kernel, cfg.head_dim, dev.platform)
    cost = roofline.step_cost(cfg, 1, n, TEXT, remat, factor, params=num_params(release_schema(cfg)))
    model = flops.step_flops(cfg, 1, n, TEXT).train
    return roofline.predict(cost, dev, model), model, dev


def main():
    p, model, dev = predict()
    print(
        f"one {MEASURED['device']}, 4 layers of 10B width, 720p × 5 s (50,402 tokens), batch 1, bf16, remat full, "
        f"cuDNN; {model / 1e12:.1f} model TFLOP per step"
    )
    print(
        f"predicted (mugv/roofline.py): matmul {p.matmul:.3f} s + attention {p.attention:.3f} s + elementwise "
        f"{p.elementwise:.3f} s = {p.seconds:.3f} s, MFU {p.mfu(dev.peak):.1%}"
    )
    print(f"measured ({MEASURED['date']}, docs/benchmarks.md): {MEASURED['seconds']:.3f} s, MFU {MEASURED['mfu']:.1%}")
    print(f"measured / predicted: {MEASURED['seconds'] / p.seconds:.2f}")


if __name__ == "__main__":
    main()
