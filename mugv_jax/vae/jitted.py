"""`JittedVAE`: a `VideoVAE` whose four networks are compiled per chunk shape, driven from Python.

The release runs its networks chunk by chunk (4 frames per 2D call, one temporal-encode call per
`micro_frame_size` frames, one decode window at a time). Compiling each network for its chunk
shape, rather than each whole encode/decode, means clips of any length reuse the same few
executables, and memory is bounded by one chunk. The glue between chunks (gathers, crops,
concatenation, normalisation) runs eagerly. The networks hold their own copy of the conv kernels,
laid out for the convolution (`layers.spatial_kernels`): the model's weights are not read again,
and changing them later does not change this JittedVAE.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from mugv.vae_config import PIPELINE_FIELDS
from mugv_jax.backend_options import convolution_options
from mugv_jax.vae.layers import spatial_kernels
from mugv_jax.vae.model import NETWORK_METHODS, VideoVAE
from mugv_jax.vae.orchestration import Pipeline


class JittedVAE(Pipeline):
    """encode / decode / posterior / spatial_* / temporal_* of a `VideoVAE`, network-compiled.

    `compiler_options` go to XLA, e.g. {"xla_backend_optimization_level": 0} for much faster
    compiles of small CPU jobs, over the backend's defaults for convolutions
    (mugv_jax/backend_options.py).
    """

    def __init__(self, model: VideoVAE, compiler_options: dict | None = None):
        self.model = model
        self.config = model.config
        self.compute_dtype = model.compute_dtype
        # Kernels laid out once for channels-last convolution, not transposed on every call, and
        # on a CPU 3D convolutions tap by tap (mugv_jax/vae/layers.py): the networks run on a copy
        # of the conv weights.
        cpu = jax.default_backend() == "cpu"
        self._parts = {
            part: nnx.split(spatial_kernels(getattr(model, part), conv3d_by_taps=cpu))
            for part in ("spatial_vae", "temporal_vae")
        }
        self._options = convolution_options(compiler_options)
        self._compiled: dict[tuple[str, bool], Callable] = {}
        self._recording: dict[str, list] | None = None
        # progress(network, chunks done, chunks of this call): called as each chunk finishes, so
        # a long video shows where it is (the command line's bars).
        self.progress: Callable[[str, int, int], None] | None = None

    def with_pipeline(self, **changes) -> JittedVAE:
        """The same networks (and compiled executables) under other chunking settings.

        Only `PIPELINE_FIELDS` may change: they steer the orchestration, never a network.
        """
        bad = set(changes) - set(PIPELINE_FIELDS)
        if bad:
            raise ValueError(f"with_pipeline can only change {PIPELINE_FIELDS}, not {sorted(bad)}")
        other = object.__new__(JittedVAE)
        other.__dict__.update(self.__dict__)
        other.config = self.config.replace(**changes)
        other._recording = None
        return other

    def _latent_buffers(self):
        return self.model.shift[...], self.model.scale[...]

    def _network(self, network: str, capture: bool) -> Callable:
        if (network, capture) not in self._compiled:
            part, method = NETWORK_METHODS[network]
            graphdef = self._parts[part][0]

            def call(state, x):
                fn = getattr(nnx.merge(graphdef, state), method)
                if capture:
                    # Every module's __call__ output, like forward hooks on the release modules.
                    return nnx.capture(fn, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
                return fn(x)

            self._compiled[network, capture] = jax.jit(call, compiler_options=self._options)
        return self._compiled[network, capture]

    def _run(self, network, inputs):
        part = NETWORK_METHODS[network][0]
        state = self._parts[part][1]
        if self._recording is None:
            fn = self._network(network, capture=False)
            if self.progress is None:
                return [fn(state, x) for x in inputs]
            outs = []
            for x in inputs:
                outs.append(jax.block_until_ready(fn(state, x)))
                self.progress(network, len(outs), len(inputs))
            return outs
        fn = self._network(network, capture=True)
        outs = []
        for x in inputs:
            out, acts = fn(state, x)
            for path, var in nnx.to_flat_state(acts):
                if path[-1] == "__call__":
                    name = ".".join((part, *(str(p) for p in path[:-1])))
                    self._recording.setdefault(name, []).extend(var.get_value())
            outs.append(out)
        return outs

    def activations(self, method: str, *args, **kwargs) -> tuple[object, dict[str, list[jax.Array]]]:
        """(result of `method`, {release module name: its outputs, one per call, in call order})."""
        self._recording = {}
        try:
            out = getattr(self, method)(*args, **kwargs)
            return out, self._recording
        finally:
            self._recording = None


def jit(model: VideoVAE, compiler_options: dict | None = None) -> JittedVAE:
    return JittedVAE(model, compiler_options)
