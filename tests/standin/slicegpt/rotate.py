"""Test stand-in for the official ``slicegpt.rotate`` (microsoft/TransformerCompression).

Reproduces ``rotate_and_slice(model_adapter, dataloader, slicing_scheduler, apply_mask=True,
final_orientation="pca")`` on a fused model (``layernorm_fusion``), with the official order of
operations and precisions, and ``slice_rotated_model`` (how a loader cuts a fresh model to a
saved ``SlicingConfig``).

Calibration: the dataloader is ITERATED once (a ``SubsetRandomSampler`` draws its order from
torch's global RNG there), each batch through ``get_layer0_inputs``; with ``apply_mask`` the
batches' attention masks mark padding. ``pca_calc``: per batch ``sum_b X_b.T @ X_b`` in float64
(padded positions zeroed IN PLACE in the caller's tensors first), damped by 1 % of the mean
diagonal, ``eigh``, eigenvectors by descending eigenvalue. Every rotation multiplies in float64
on ``config.device`` and stores the result on the CPU in the weight's dtype; inputs to a layer
are rotated and the shortcut matrices built in the MODEL's dtype. With
``final_orientation="random"`` the kept block of each basis is turned by
``random_orthogonal_upper_left``, which draws from NUMPY's global RNG (``np.random.rand`` then
QR), so ``np.random.seed`` makes a run reproducible.

- Sequential layers (Llama, OPT, Phi-3): the attention inputs read the stream through ``Q``
  (sliced to the attention input width); the layer runs (its ``mlp_shortcut_Q`` still None, a
  plain residual, on the first pass) and the PCA of the second norm's input gives the basis that
  the attention output writes and the MLP inputs read; the layer runs again and the PCA of its
  output gives the basis the MLP output writes, which is the next layer's ``Q``.
- Parallel layers (Phi-2): attention and MLP inputs read through ``Q``; one run of the layer,
  the PCA of its output gives the basis both outputs write; one shortcut, ``attn_shortcut_Q``.
- The head reads the last basis (sliced only with ``do_slice_head``); progress is a ``tqdm`` over
  ``get_layers()``; at the end ``model_adapter.slicing_conf`` is a clone of the scheduler's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import Module, Parameter
from tqdm import tqdm

from slicegpt.config import config
from slicegpt.model_adapter import LayerAdapter, ModelAdapter
from slicegpt.model_utils import get_layer0_inputs, get_signals
from slicegpt.slicing_scheduler import ConfigSlicingScheduler, ConstSlicingScheduler, SlicingScheduler
from slicegpt.utils import cleanup_memory, map_tensors

log = logging.getLogger(__name__)


# --- rotating and slicing weights -------------------------------------------------------------


def _rotate_reader(module: Module, Q: torch.Tensor) -> None:
    """A weight whose columns are the stream's axes (a linear reading it, an embedding, the head) in basis ``Q``."""
    dtype = module.weight.dtype
    weight = module.weight.data.to(device=config.device, dtype=torch.float64)
    module.weight.data = (weight @ Q).to(device="cpu", dtype=dtype)


def _rotate_writer(linear: Module, Q: torch.Tensor) -> None:
    """A linear writing the stream (its weight's rows and its bias are the stream's axes) in basis ``Q``."""
    dtype = linear.weight.dtype
    weight = linear.weight.data.to(device=config.device, dtype=torch.float64)
    linear.weight.data = (Q.T @ weight).to(device="cpu", dtype=dtype)
    if linear.bias is not None:
        bias = linear.bias.data.to(device=config.device, dtype=torch.float64)
        linear.bias.data = (Q.T @ bias).to(device="cpu", dtype=dtype)


def _keep_inputs(linear: Module, width: int) -> None:
    linear.weight.data = linear.weight.data[:, :width]
    linear.in_features = width


def _keep_outputs(linear: Module, width: int) -> None:
    linear.weight.data = linear.weight.data[:width, :]
    if linear.bias is not None:
        linear.bias.data = linear.bias.data[:width]
    linear.out_features = width


def _slice_attention_inputs(layer_adapter: LayerAdapter, width: int) -> None:
    for linear in layer_adapter.get_attention_inputs():
        _keep_inputs(linear, width)
    layer = layer_adapter.layer
    layer.attn_shortcut_Q = Parameter(layer.attn_shortcut_Q[:width, :])


def _slice_embeddings(model_adapter: ModelAdapter, widths: dict[int, int]) -> None:
    for i, embedding in enumerate(model_adapter.get_embeddings()):
        embedding.weight.data = embedding.weight.data[:, : widths[i]]
        embedding.embedding_dim = widths[i]


def _slice_head(model_adapter: ModelAdapter, width: int) -> None:
    _keep_inputs(model_adapter.get_lm_head(), width)


# --- PCA and orientation ----------------------------------------------------------------------


def random_orthogonal_upper_left(total_dim: int, upper_block_dim: int) -> torch.Tensor:
    """Identity of size ``total_dim`` whose upper-left block is a random orthogonal matrix (numpy's global RNG)."""
    block, _ = np.linalg.qr(np.random.rand(upper_block_dim, upper_block_dim))
    rotation = np.eye(total_dim)
    rotation[:upper_block_dim, :upper_block_dim] = block
    return torch.from_numpy(rotation)


@torch.no_grad()
def pca_calc(
    X: list[torch.Tensor], ignore_masks: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors (columns), by descending eigenvalue, of the damped covariance of ``X``."""
    cleanup_memory()
    H = None
    for i, batch in enumerate(X):
        if ignore_masks:
            batch[ignore_masks[i] == 0] = 0
        batch = batch.double().to(device=config.device)
        H_batch = torch.sum(batch.mT @ batch, dim=0)
        H = H_batch if H is None else H + H_batch
    damp = 0.01 * torch.mean(torch.diag(H))
    diagonal = torch.arange(H.shape[-1]).to(device=config.device)
    H[diagonal, diagonal] = H[diagonal, diagonal] + damp
    eigenvalues, eigenvectors = torch.linalg.eigh(H)
    order = torch.argsort(eigenvalues, descending=True)
    return eigenvalues[order], eigenvectors[:, order]


# --- the calibration stream -------------------------------------------------------------------


@dataclass
class _Calibration:
    """The stream entering the next layer, per batch, and how it is rotated and sliced."""

    inps: list[torch.Tensor]  # the hidden states (dense basis; padding zeroed by pca_calc)
    args: list[tuple]  # each batch's positional args to a layer
    kwargs: list[dict[str, Any]]  # each batch's keyword args (the same for every layer)
    masks: list[torch.Tensor]  # the batches' attention masks (empty without apply_mask)
    scheduler: SlicingScheduler
    orientation: str  # "pca" | "random"
    dtype: torch.dtype  # the model's

    def basis(self, signals: list[torch.Tensor], kept: int) -> torch.Tensor:
        """The PCA basis of ``signals`` (float64, on ``config.device``); its first ``kept`` axes turned if random."""
        _, Q = pca_calc(signals, self.masks)
        Q = Q.to(device=config.device, dtype=torch.float64)
        if self.orientation == "random":
            Q = Q @ random_orthogonal_upper_left(Q.shape[0], kept).to(Q.device)
        return Q

    def feed(self, layer_adapter: LayerAdapter, Q: torch.Tensor, width: int) -> None:
        """Give the layer the stream rotated by ``Q`` (in the model's dtype) and sliced to ``width``."""
        for i, inp in enumerate(self.inps):
            rotated = (inp.to(device=config.device) @ Q.to(dtype=self.dtype))[:, :, :width].cpu()
            self.args[i] = layer_adapter.get_updated_args(rotated, self.args[i])


def _calibration(model_adapter: ModelAdapter, dataloader, apply_mask: bool, **how: Any) -> _Calibration:
    """Layer 0's inputs, args and kwargs for every batch of ``dataloader`` (iterated once)."""
    calibration = _Calibration([], [], [], [], **how)
    for batch in dataloader:
        inp, args, kwargs = get_layer0_inputs(model_adapter, batch)
        calibration.inps.append(inp)
        calibration.args.append(args)
        calibration.kwargs.append(kwargs)
        if apply_mask:
            calibration.masks.append(batch["attention_mask"])
    return calibration


def _layer_outputs(layer_adapter: LayerAdapter, args: list[tuple], kwargs: list[dict]) -> list[torch.Tensor]:
    """The layer's output hidden states per batch (the parallel path's simpler ``get_signals``)."""
    layer = layer_adapter.layer.to(config.device)
    outputs = []
    for layer_args, layer_kwargs in zip(args, kwargs, strict=True):
        layer_args, layer_kwargs = map_tensors([layer_args, layer_kwargs], device=config.device)
        out = layer(*layer_args, **layer_kwargs)
        if isinstance(out, tuple):
            out = out[layer_adapter.hidden_states_output_position]
        outputs.append(out.cpu())
    return outputs


# --- rotate and slice ---------------------------------------------------------------------------


def _embeddings_step(model_adapter: ModelAdapter, calibration: _Calibration) -> torch.Tensor:
    scheduler = calibration.scheduler
    kept = scheduler.get_embedding_dimensions()[0] if calibration.orientation == "random" else 0
    Q = calibration.basis(calibration.inps, kept)
    for embedding in model_adapter.get_embeddings():
        _rotate_reader(embedding, Q)
    cleanup_memory()
    _slice_embeddings(model_adapter, scheduler.get_embedding_dimensions())
    return Q


def _sequential_layer(idx: int, layer_adapter: LayerAdapter, Q: torch.Tensor, cal: _Calibration) -> torch.Tensor:
    """Rotate and slice one sequential layer (attention, then MLP); returns its output basis."""
    layer, scheduler, dtype = layer_adapter.layer, cal.scheduler, cal.dtype
    layer.attn_shortcut_Q = Parameter(Q.T.clone().to(dtype=dtype))
    for linear in layer_adapter.get_attention_inputs():
        _rotate_reader(linear, Q)
    _slice_attention_inputs(layer_adapter, scheduler.get_attention_input_dimension(idx))
    cal.feed(layer_adapter, Q, scheduler.get_attention_input_dimension(idx))

    mlp_ln_inputs, _ = get_signals(layer_adapter, cal.args, cal.kwargs)
    d_attn_out = scheduler.get_attention_output_dimension(idx, match_head_dim=False)
    Q = cal.basis(mlp_ln_inputs, d_attn_out)
    layer.attn_shortcut_Q = Parameter(layer.attn_shortcut_Q @ Q.to(dtype=dtype)[:, :d_attn_out])
    _rotate_writer(layer_adapter.get_attention_output(), Q)
    _keep_outputs(layer_adapter.get_attention_output(), d_attn_out)
    d_mlp_in = scheduler.get_mlp_input_dimension(idx)
    layer.mlp_shortcut_Q = Parameter(Q.T.clone().to(dtype=dtype)[:d_mlp_in, :])
    for linear in layer_adapter.get_mlp_inputs():
        _rotate_reader(linear, Q)
        _keep_inputs(linear, d_mlp_in)
    cleanup_memory()

    _, cal.inps = get_signals(layer_adapter, cal.args, cal.kwargs)
    d_mlp_out = scheduler.get_mlp_output_dimension(idx)
    Q = cal.basis(cal.inps, d_mlp_out)
    layer.mlp_shortcut_Q = Parameter(layer.mlp_shortcut_Q @ Q.to(dtype=dtype))
    _rotate_writer(layer_adapter.get_mlp_output(), Q)
    _keep_outputs(layer_adapter.get_mlp_output(), d_mlp_out)
    layer.mlp_shortcut_Q = Parameter(layer.mlp_shortcut_Q[:, :d_mlp_out])
    return Q


def _parallel_layer(idx: int, layer_adapter: LayerAdapter, Q: torch.Tensor, cal: _Calibration) -> torch.Tensor:
    """Rotate and slice one parallel layer (attention and MLP side by side, one shortcut); returns its output basis."""
    layer, scheduler, dtype = layer_adapter.layer, cal.scheduler, cal.dtype
    layer.attn_shortcut_Q = Parameter(Q.T.clone().to(dtype=dtype))
    d_in = scheduler.get_attention_input_dimension(idx)
    for linear in layer_adapter.get_attention_inputs() + layer_adapter.get_mlp_inputs():
        _rotate_reader(linear, Q)
    _slice_attention_inputs(layer_adapter, d_in)
    for linear in layer_adapter.get_mlp_inputs():
        _keep_inputs(linear, d_in)
    cal.feed(layer_adapter, Q, d_in)

    cal.inps = _layer_outputs(layer_adapter, cal.args, cal.kwargs)
    d_out = scheduler.get_mlp_output_dimension(idx)
    Q = cal.basis(cal.inps, d_out)
    layer.attn_shortcut_Q = Parameter(layer.attn_shortcut_Q @ Q.to(dtype=dtype))
    writers = (layer_adapter.get_mlp_output(), layer_adapter.get_attention_output())
    for writer in writers:
        _rotate_writer(writer, Q)
    for writer in writers:
        _keep_outputs(writer, d_out)
    layer.attn_shortcut_Q = Parameter(layer.attn_shortcut_Q[:, :d_out])
    return Q


@torch.no_grad()
def rotate_and_slice(
    model_adapter: ModelAdapter,
    dataloader,
    slicing_scheduler: SlicingScheduler,
    apply_mask: bool = True,
    final_orientation: str = "pca",
) -> None:
    """Rotate the fused model into the PCA bases of its calibration activations and slice it, layer by layer."""
    model_adapter.model.eval()
    dtype = next(iter(model_adapter.model.parameters())).dtype
    calibration = _calibration(
        model_adapter, dataloader, apply_mask, scheduler=slicing_scheduler, orientation=final_orientation, dtype=dtype
    )
    layers = model_adapter.get_layers()
    parallel = model_adapter.parallel_blocks
    slicing_scheduler.setup(hidden_size=model_adapter.hidden_size, layers_num=len(layers), parallel_blocks=parallel)
    Q = _embeddings_step(model_adapter, calibration)
    rotate_layer = _parallel_layer if parallel else _sequential_layer

    log.info("Rotate and slice layers")
    for idx, layer_adapter in enumerate(tqdm(layers, unit="layer", desc="Rotating and slicing")):
        Q = rotate_layer(idx, layer_adapter, Q, calibration)
        layer_adapter.layer.to("cpu")
        cleanup_memory()

    _rotate_reader(model_adapter.get_lm_head(), Q)
    if slicing_scheduler.do_slice_head:
        _slice_head(model_adapter, slicing_scheduler.get_head_dimension())
    model_adapter.slicing_conf = slicing_scheduler.slicing_conf.clone()
    log.info("Rotate and slice layers done")


def slice_rotated_model(model_adapter: ModelAdapter, slicing_scheduler: SlicingScheduler | None = None) -> None:
    """Cut every weight and shortcut_Q to the widths of the slicing config (or of its constant width)."""
    model_adapter.model.eval()
    layers = model_adapter.get_layers()
    scheduler = slicing_scheduler
    if not scheduler:
        conf = model_adapter.slicing_conf
        if conf.const_dimension is not None:  # a checkpoint saved without its .json
            scheduler = ConstSlicingScheduler(conf.const_dimension)
            scheduler.setup(
                hidden_size=model_adapter.hidden_size,
                layers_num=len(layers),
                parallel_blocks=model_adapter.parallel_blocks,
            )
        else:
            scheduler = ConfigSlicingScheduler(conf)
    _slice_embeddings(model_adapter, scheduler.get_embedding_dimensions())
    for i, layer_adapter in enumerate(layers):
        layer = layer_adapter.layer
        _slice_attention_inputs(layer_adapter, scheduler.get_attention_input_dimension(i))
        for linear in layer_adapter.get_mlp_inputs():
            _keep_inputs(linear, scheduler.get_mlp_input_dimension(i))
        if not model_adapter.parallel_blocks:
            layer.mlp_shortcut_Q = Parameter(layer.mlp_shortcut_Q[: scheduler.get_mlp_input_dimension(i), :])
        _keep_outputs(layer_adapter.get_mlp_output(), scheduler.get_mlp_output_dimension(i))
        d_attn_out = scheduler.get_attention_output_dimension(i, match_head_dim=model_adapter.parallel_blocks)
        layer.attn_shortcut_Q = Parameter(layer.attn_shortcut_Q[:, :d_attn_out])
        if not model_adapter.parallel_blocks:
            layer.mlp_shortcut_Q = Parameter(layer.mlp_shortcut_Q[:, : scheduler.get_mlp_output_dimension(i)])
        _keep_outputs(layer_adapter.get_attention_output(), d_attn_out)
    if scheduler.do_slice_head:
        _slice_head(model_adapter, scheduler.get_head_dimension())
