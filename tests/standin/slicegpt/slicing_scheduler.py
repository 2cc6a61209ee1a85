"""Test stand-in for the official ``slicegpt.slicing_scheduler`` (microsoft/TransformerCompression).

Reproduces the two schedulers that ``slice_rotated_model`` uses when a sliced model is
loaded: ``ConfigSlicingScheduler`` (widths from the saved ``SlicingConfig``) and
``ConstSlicingScheduler`` (one width everywhere, used when no ``.json`` sits next to the
``.pt``). Quirks kept: the LAST layer's MLP output width is the head width, which is the full
hidden size unless ``do_slice_head``; the attention output of the last layer only follows the
head width when ``match_head_dim`` is asked for (the parallel-block case).
"""

from __future__ import annotations

from collections import defaultdict

from slicegpt.model_adapter import SlicingConfig


class SlicingScheduler:
    def __init__(self, *, do_slice_head: bool = False):
        self.slicing_conf = SlicingConfig(do_slice_head=do_slice_head)

    do_slice_head = property(lambda self: self.slicing_conf.do_slice_head)
    hidden_size = property(lambda self: self.slicing_conf.hidden_size)
    layers_num = property(lambda self: self.slicing_conf.layers_num)
    parallel_blocks = property(lambda self: self.slicing_conf.parallel_blocks)

    def setup(self, *, hidden_size: int, layers_num: int, parallel_blocks: bool) -> None:
        self.slicing_conf.hidden_size = hidden_size
        self.slicing_conf.layers_num = layers_num
        self.slicing_conf.parallel_blocks = parallel_blocks

    def _width(self, kind: str, idx: int | None = None) -> int:  # overridden by subclasses
        raise NotImplementedError

    def get_embedding_dimensions(self) -> dict[int, int]:
        dims = self._embedding_dimensions()
        self.slicing_conf.embedding_dimensions = dims
        return dims

    def get_head_dimension(self) -> int:
        val = self._width("head") if self.do_slice_head else self.hidden_size
        self.slicing_conf.head_dimension = val
        return val

    def get_attention_input_dimension(self, idx: int) -> int:
        val = self._width("attention_input", idx)
        self.slicing_conf.attention_input_dimensions[idx] = val
        return val

    def get_attention_output_dimension(self, idx: int, match_head_dim: bool) -> int:
        if self.parallel_blocks:
            return self.get_mlp_output_dimension(idx)
        last = match_head_dim and idx == self.layers_num - 1
        val = self.get_head_dimension() if last else self._width("attention_output", idx)
        self.slicing_conf.attention_output_dimensions[idx] = val
        return val

    def get_mlp_input_dimension(self, idx: int) -> int:
        if self.parallel_blocks:
            return self.get_attention_input_dimension(idx)
        val = self._width("mlp_input", idx)
        self.slicing_conf.mlp_input_dimensions[idx] = val
        return val

    def get_mlp_output_dimension(self, idx: int) -> int:
        val = self.get_head_dimension() if idx == self.layers_num - 1 else self._width("mlp_output", idx)
        self.slicing_conf.mlp_output_dimensions[idx] = val
        return val


class ConfigSlicingScheduler(SlicingScheduler):
    """Widths read from a saved ``SlicingConfig``."""

    def __init__(self, config: SlicingConfig):
        super().__init__()
        self.slicing_conf = config

    def _embedding_dimensions(self) -> dict[int, int]:
        return self.slicing_conf.embedding_dimensions

    def _width(self, kind: str, idx: int | None = None) -> int:
        if kind == "head":
            return self.slicing_conf.head_dimension
        return getattr(self.slicing_conf, f"{kind}_dimensions")[idx]


class ConstSlicingScheduler(SlicingScheduler):
    """The same width for every sliced dimension."""

    def __init__(self, dimension: int, *, do_slice_head: bool = False):
        super().__init__(do_slice_head=do_slice_head)
        self.dimension = dimension

    def _embedding_dimensions(self) -> dict[int, int]:
        return defaultdict(lambda: self.dimension)

    def _width(self, kind: str, idx: int | None = None) -> int:
        return self.dimension
