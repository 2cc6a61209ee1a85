"""SliceGPT's rotate-and-slice, written for slicebridge (no slicegpt import), for every family it slices.

``slice_model(dense_dir, out_dir, sparsity=...)`` writes exactly what the official
``experiments/run_slicegpt.py --model-path dense_dir --save-dir out_dir`` writes for a local
model of a family the official slicegpt slices (microsoft/TransformerCompression,
``ConstSlicingScheduler``): Llama-2/3, OPT, Phi-2 or Phi-3 (``families``). ``slice_llama`` is
its Llama case. ``slice_dense(dense, out_dir, ...)`` is the same from a ``DenseCheckpoint``
(``DenseCheckpoint.load`` reads the weights into memory once, to be sliced many times); it
returns the sliced state dict, SlicingConfig and parameter counts (``SliceOutcome``) and writes
only when given an ``out_dir``. ``dense_model`` builds the dense transformers model from a
``DenseCheckpoint``'s tensors (for its baseline perplexity).

- ``{basename(model_name)}_{sparsity}.pt``: the sliced state dict, official key names and order
  (per layer the shortcut matrices, then the linears in the order the official model holds
  them; no norm weights), in the dense model's dtype;
- ``{basename(model_name)}_{sparsity}.json``: the ``SlicingConfig``;
- the dense model's ``*.json`` files (config, generation config, tokenizer), ``*token*.model``
  and ``merges.txt``, copied as run_slicegpt does for a local model.

This module holds what does not depend on the family: reading the dense model, norm fusion,
PCA, rotating and slicing a residual block, the embeddings and the head, the calibration data
and the save directory. What a family adds (its norms' names, the official order of a sliced
layer's tensors, and its blocks' arithmetic for the calibration forward pass) is a
``FamilySlicer`` in ``slicing_<family>.py``; the linears' names come from ``families``.

The maths, with row vectors (``y = x @ W.T``) and ``Q[:, :d]`` the first ``d`` principal axes:

1. Fusion. Every norm's weight is multiplied into the columns of the linear layers that read
   its output (attention and MLP inputs; ``lm_head`` for the final norm), and a LayerNorm's bias
   ``beta`` into their biases (``b + W @ beta``; a linear without a bias gains one, as OPT's
   ``lm_head`` does). The norms become SliceGPT's weightless ``RMSN``:
   ``x / sqrt(sum(x**2) / hidden + 1e-5)``, the mean over the ORIGINAL width and eps 1e-5
   whatever the model's epsilon. A tied head is untied first.
   - LayerNorm families (OPT, Phi-2): RMSN is LayerNorm on a stream of zero mean, so the mean
     is taken out where the stream is written: every embedding row is centred, and the linears
     that write the stream (attention and MLP outputs) lose their mean over output rows, weight
     and bias (the official ``bake_mean_into_linear``). The stream stays centred, and this is
     exact: LayerNorm removed the mean anyway.
   - RMSNorm families (Llama, Phi-3): the official fusion centres the embeddings too, which an
     RMSNorm does not undo, so the official result is not the dense model's function even at
     sparsity 0. ``center_embeddings=True`` does it as the official does; the default (False)
     keeps the rotation exact.
2. Rotation and slicing, one residual block at a time, with calibration activations (float32
   forward, covariance and eigendecomposition in float64, eigenvectors by decreasing
   eigenvalue, 1 % mean-diagonal damping as the official ``pca_calc``):
   - ``Q0`` = PCA of the stream entering layer 0 (token embeddings, plus OPT's learned
     positions); every embedding matrix ``E <- (E @ Q0)[:, :d]``.
   - a block ``x -> x @ shortcut + writers(f(readers(rmsn(x))))`` whose input stream has the
     basis ``Q_in``: ``readers <- W @ Q_in[:, :d_in]``; the block runs on the sliced stream (its
     residual through ``Q_in[:, :d_in].T``) with the dense writers, ``Q_out`` = PCA of its output,
     ``writers <- Q_out[:, :d_out].T @ W`` (biases ``Q_out[:, :d_out].T @ b``), the shortcut is
     ``Q_in[:, :d_in].T @ Q_out[:, :d_out]``, and ``Q_out`` is the next block's ``Q_in``.
   - A sequential layer (Llama, OPT, Phi-3) is two blocks: attention (``attn_shortcut_Q``; its
     ``Q_out`` is the PCA of the stream entering the MLP's norm), then MLP (``mlp_shortcut_Q``;
     the PCA of the layer's output). A parallel layer (Phi-2: attention and MLP read one
     normalised stream and both write the layer's output) is one block: the attention's and
     the MLP's input linears read, ``dense`` and ``fc2`` write, one ``attn_shortcut_Q``, and
     ``Q_out`` is the PCA of the layer's output (what the official parallel path measures).
   - ``lm_head <- W @ Q_last``. Unless ``do_slice_head`` the head and the last layer's output
     keep the full width (run_slicegpt never slices the head).
   ``d = int((1 - sparsity) * hidden)`` rounded down to a multiple of ``round_interval``.
   ``final_orientation="random"`` (the default, as run_slicegpt's ``--final-orientation``; the
   official fixtures were made so) turns the kept block of every basis by a seeded random
   rotation; ``"pca"`` keeps the principal axes in order. The model computes the same function
   either way.

Precision: rotations run in float64 for 32-bit outputs and in float32 for 16-bit outputs (whose
rounding dominates), then each tensor is cast once. When the calibration has fewer tokens than
the hidden size the covariance is rank-deficient; its eigenbasis is then taken from the small
Gram matrix and completed with an orthonormal complement (same eigenpairs, much faster than a
full ``eigh``). At sparsity 0 (without ``center_embeddings``) and for a model whose norm
epsilon is 1e-5 the result computes exactly the dense model's function.

Memory: the dense weights are read tensor by tensor from safetensors (or taken from a loaded
``DenseCheckpoint``, never changed); only one layer's weights in float32/float64, the
calibration activations and the sliced output are held at a time besides.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slicebridge.dtypes import dtype_name

from .atomic import atomic_file
from .checkpoint import SlicedWidths, sliced_width
from .configuration_sliced import SLICEGPT_FUSED_NORM_EPS, SlicedConfig
from .dense import TIED_BY_DEFAULT, embedded_text, resolve_dtype
from .families import SUPPORTED, Family, family_of_config, official_model_name
from .sliced_decoder import apply_rotary_pos_emb, attend, causal_attention_mask, count_sliced_parameters, split_heads

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]

# SliceGPT's pca_calc adds this fraction of the mean diagonal to the covariance's diagonal.
PCA_DAMPING = 0.01
# Rows of the embedding / head matrices rotated per step (bounds the float64 working set).
VOCAB_CHUNK_ROWS = 4096
ORIENTATIONS = ("pca", "random")


# --------------------------------------------------------------------------------------------
# Weights as the slicing handles them
# --------------------------------------------------------------------------------------------


def as_computed(stored: torch.Tensor) -> torch.Tensor:
    """A stored (model-dtype) tensor as the calibration forward uses it (float32)."""
    return stored.to(torch.float32)


@dataclass
class Linear:
    """A linear layer's weight ``[out, in]`` and bias ``[out]`` (None: it has none)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """The layer applied to float32 ``inputs``, its tensors as the calibration forward uses them."""
        return F.linear(inputs, as_computed(self.weight), None if self.bias is None else as_computed(self.bias))

    def rows(self, start: int, stop: int) -> Linear:
        """Output rows ``start:stop`` (a chunk of a vocab-sized matrix)."""
        return Linear(self.weight[start:stop], None if self.bias is None else self.bias[start:stop])


@dataclass
class Norm:
    """A norm's weight and (LayerNorm) bias, to be fused into the linears that read its output."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class Rotator:
    """Applies fusions and rotations in ``compute_dtype`` and casts results to ``out_dtype``."""

    compute_dtype: torch.dtype
    out_dtype: torch.dtype

    def store(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as it is saved: ``out_dtype``, contiguous, owning its storage."""
        return tensor.to(dtype=self.out_dtype, memory_format=torch.contiguous_format, copy=True)

    def _computed(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(self.compute_dtype)

    def reading(self, linear: Linear, norm: Norm | None, basis: torch.Tensor) -> Linear:
        """A layer reading the rotated stream: ``(W * norm.weight) @ basis`` (columns scaled by the
        norm), bias ``b + W @ norm.bias`` (the norm's bias through the unscaled weight)."""
        weight, bias = self._computed(linear.weight), self._computed(linear.bias)
        if norm is not None and norm.bias is not None:
            shift = weight @ self._computed(norm.bias)
            bias = shift if bias is None else bias + shift
        if norm is not None:
            weight = weight * self._computed(norm.weight)
        return Linear(self.store(weight @ self._computed(basis)), None if bias is None else self.store(bias))

    def writing(self, linear: Linear, basis: torch.Tensor) -> Linear:
        """A layer writing into the rotated stream: ``basis.T @ W`` and ``basis.T @ b``."""
        basis = self._computed(basis)
        bias = None if linear.bias is None else self.store(basis.T @ self._computed(linear.bias))
        return Linear(self.store(basis.T @ self._computed(linear.weight)), bias)

    def centred(self, linear: Linear) -> Linear:
        """The layer minus its mean over output rows (weight and bias), so that what it writes has
        zero mean: the official ``bake_mean_into_linear``."""
        weight, bias = self._computed(linear.weight), self._computed(linear.bias)
        return Linear(weight - weight.mean(dim=0, keepdim=True), None if bias is None else bias - bias.mean())


# --------------------------------------------------------------------------------------------
# What each family adds (subclassed in slicing_<family>.py)
# --------------------------------------------------------------------------------------------


@dataclass
class CausalSelfAttention:
    """Causal self-attention over calibration sequences, from projected queries, keys and values
    ([batch, seq, heads * head_dim]): RoPE first when ``rotary`` is given (a portable model's
    rotary module, ``(like, position_ids) -> (cos, sin)``), a window when ``sliding_window`` is."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary: nn.Module | None = None
    sliding_window: int | None = None

    @classmethod
    def of_config(
        cls, sliced: SlicedConfig, rotary: nn.Module | None = None, sliding_window: int | None = None
    ) -> CausalSelfAttention:
        """The attention a family's sliced config describes (its heads, key/value heads and head size)."""
        return cls(sliced.num_attention_heads, sliced.num_key_value_heads, sliced.head_dim, rotary, sliding_window)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        seq_len = query.shape[1]
        query = split_heads(query, self.num_heads, self.head_dim)
        key = split_heads(key, self.num_kv_heads, self.head_dim)
        value = split_heads(value, self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), torch.arange(seq_len).unsqueeze(0))
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
        mask = causal_attention_mask(None, 0, seq_len, query.device, self.sliding_window)
        return attend(query, key, value, mask, self.head_dim**-0.5)


class FamilySlicer:
    """One family's part of the slicing: its norms, the official order of a sliced layer's
    tensors, and its blocks' arithmetic for the calibration forward pass.

    Norm names are relative to a layer (``input_layernorm``), the final norm's absolute; the
    defaults are transformers' usual names (Llama's, Phi-3's). The linears' names are
    ``family``'s. A subclass's ``__init__`` refuses (``ValueError``) a variant of the family that
    the official slicegpt cannot slice, and sets ``norm_eps`` (the epsilon of the dense model's
    norms), ``attend`` (its attention over projected queries, keys and values) and
    ``activation`` (its MLP's), which the default ``attention`` and ``mlp`` use.
    """

    family: ClassVar[Family]
    first_norm: ClassVar[str] = "input_layernorm"
    # None with parallel blocks: one norm feeds attention and MLP.
    second_norm: ClassVar[str | None] = "post_attention_layernorm"
    final_norm: ClassVar[str] = "model.norm"
    # The linears of a sliced layer as the official model holds them, where that is not the
    # family's order (attention inputs, attention output, MLP inputs, MLP output).
    official_linear_order: ClassVar[tuple[str, ...] | None] = None
    # LayerNorm (with a bias): the embeddings are always centred and the writers' mean is baked in.
    layer_norm: ClassVar[bool] = False

    attend: CausalSelfAttention
    activation: Callable[[torch.Tensor], torch.Tensor]

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.norm_eps = SLICEGPT_FUSED_NORM_EPS

    @property
    def layer_order(self) -> tuple[str, ...]:
        """A sliced layer's shortcuts and linears in the order the official model holds them
        (each linear stands for its weight, then its bias if it has one): the shortcuts, the
        MLP's first, then the linears."""
        family = self.family
        linears = (*family.attention_inputs, family.attention_output, *family.mlp_inputs, family.mlp_output)
        return (*reversed(family.shortcuts), *(self.official_linear_order or linears))

    def default_model_name(self, directory_name: str) -> str:
        """The model name run_slicegpt would be given for a local model in ``directory_name``
        (one the official adapter accepts)."""
        return official_model_name(self.family, self.config, directory_name)

    def layer_input(self, embeddings: list[torch.Tensor], token_ids: torch.Tensor) -> torch.Tensor:
        """The stream entering layer 0 for ``token_ids`` [samples, seq_len], from the fused
        embedding matrices (in ``family.embeddings``' order)."""
        return embeddings[0][token_ids]

    def attention(self, normed: torch.Tensor, readers: list[Linear], writer: Linear) -> torch.Tensor:
        """The attention's output for the normalised stream ``normed`` (float32), through
        ``readers`` (``family.attention_inputs``) and ``writer`` (``family.attention_output``).
        Here: separate query, key and value projections."""
        q_proj, k_proj, v_proj = readers
        return writer(self.attend(q_proj(normed), k_proj(normed), v_proj(normed)))

    def mlp(self, normed: torch.Tensor, readers: list[Linear], writer: Linear) -> torch.Tensor:
        """The MLP's output for ``normed``, through ``readers`` (``family.mlp_inputs``) and
        ``writer``. Here: one input linear, the activation, the output linear."""
        (fc1,) = readers
        return writer(self.activation(fc1(normed)))


def family_slicer(family: Family) -> type[FamilySlicer]:
    """The ``FamilySlicer`` subclass of ``family`` (``slicing_<key>.SLICER``)."""
    return importlib.import_module(f"{__package__}.slicing_{family.key}").SLICER


# --------------------------------------------------------------------------------------------
# The dense model on disk
# --------------------------------------------------------------------------------------------


class DenseCheckpoint:
    """A dense Hugging Face model directory (``config.json`` + safetensors), its family
    (``family``) and how to slice it (``slicer``).

    ``DenseCheckpoint(directory)`` reads the tensors from the files when they are asked for, one
    at a time; ``DenseCheckpoint.load(directory)`` reads them all into host memory once, after
    which ``tensor()`` never touches the disk. The maker never changes the tensors it is given,
    so one loaded checkpoint can be sliced many times.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser().absolute()
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{self.directory} holds no config.json; pass a Hugging Face model directory")
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        family = family_of_config(self.config)
        if family is None:
            raise ValueError(
                f"{self.directory} holds a {self.config.get('model_type')!r} model; SliceGPT slices {SUPPORTED}"
            )
        self.family = family
        self.slicer = family_slicer(family)(self.config)
        self.hidden_size = int(self.config["hidden_size"])
        self.num_layers = int(self.config["num_hidden_layers"])
        self.vocab_size = int(self.config["vocab_size"])
        self.tied_head = bool(self.config.get("tie_word_embeddings", family.key in TIED_BY_DEFAULT))
        self.tensor_files = self._tensor_files()
        self._held: dict[str, torch.Tensor] | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DenseCheckpoint:
        """The checkpoint with every tensor read into host memory, each safetensors file once.
        The tensors are copies: safetensors' own are views of the file mapped into memory, whose
        pages would be read from disk when first touched (and again after being evicted)."""
        from safetensors.torch import load_file

        dense = cls(directory)
        held: dict[str, torch.Tensor] = {}
        for path in sorted(set(dense.tensor_files.values())):
            mapped = load_file(str(path))
            held.update(
                (name, tensor.clone()) for name, tensor in mapped.items() if dense.tensor_files.get(name) == path
            )
            del mapped  # unmaps the file
        dense._held = held
        logger.info("read %d tensors (%d bytes) of %s into memory", len(held), dense.nbytes, dense.directory)
        return dense

    @property
    def nbytes(self) -> int:
        """The bytes of the tensors held in host memory (0 when they are read from the files on demand)."""
        return sum(tensor.nbytes for tensor in (self._held or {}).values())

    def _tensor_files(self) -> dict[str, Path]:
        index_path = self.directory / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            return {name: self.directory / file_name for name, file_name in weight_map.items()}
        single = self.directory / "model.safetensors"
        if not single.is_file():
            raise FileNotFoundError(
                f"{self.directory} holds no model.safetensors (or sharded index); save the model "
                "with save_pretrained(safe_serialization=True)"
            )
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), single)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor (optionally cast); from a loaded checkpoint, the held tensor itself when no
        cast is needed: read it, never change it."""
        from safetensors import safe_open

        if name == "lm_head.weight" and name not in self.tensor_files and self.tied_head:
            name = self.family.token_embedding  # a tied head is the embedding matrix
        if name not in self.tensor_files:
            raise KeyError(f"{self.directory} has no tensor {name}")
        if self._held is not None:
            tensor = self._held[name]
        else:
            with safe_open(str(self.tensor_files[name]), framework="pt") as handle:
                tensor = handle.get_tensor(name)
        return tensor if dtype is None else tensor.to(dtype)

    def _bias(self, name: str) -> torch.Tensor | None:
        return self.tensor(f"{name}.bias") if f"{name}.bias" in self.tensor_files else None

    def linear(self, name: str) -> Linear:
        """The linear layer ``name`` (``model.layers.0.self_attn.q_proj``), its bias if it has one."""
        return Linear(self.tensor(f"{name}.weight"), self._bias(name))

    def norm(self, name: str) -> Norm:
        """The norm ``name``'s weight, and its bias if it has one (LayerNorm)."""
        return Norm(self.tensor(f"{name}.weight"), self._bias(name))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (read off the final norm's weight, a small tensor)."""
        return self.tensor(f"{self.slicer.final_norm}.weight").dtype


# --------------------------------------------------------------------------------------------
# File names (the widths are checkpoint.SlicedWidths)
# --------------------------------------------------------------------------------------------


def sliced_file_stem(model_name: str, sparsity: float) -> str:
    """``meta-llama/Meta-Llama-3-8B``, 0.25 -> ``Meta-Llama-3-8B_0.25`` (run_slicegpt's naming;
    the sparsity is printed as the float argparse would have parsed)."""
    return f"{Path(model_name).name}_{float(sparsity)}"


def constant_widths(dense: DenseCheckpoint, sparsity: float, round_interval: int, do_slice_head: bool) -> SlicedWidths:
    """The widths of run_slicegpt's constant-sparsity run."""
    hidden = dense.hidden_size
    width = sliced_width(hidden, sparsity, round_interval)
    if width < 1:
        raise ValueError(
            f"sparsity {sparsity} with round_interval {round_interval} leaves no width of hidden size {hidden}"
        )
    head = width if do_slice_head else hidden
    family = dense.family
    return SlicedWidths.constant(
        dense.num_layers, width, head, parallel_blocks=family.parallel_blocks, embedding_count=len(family.embeddings)
    )


# --------------------------------------------------------------------------------------------
# PCA
# --------------------------------------------------------------------------------------------


def principal_basis(signals: torch.Tensor) -> torch.Tensor:
    """Eigenvectors (float64, columns, by decreasing eigenvalue) of the damped covariance
    ``X.T @ X + 0.01 * mean(diag) * I`` of ``signals`` [..., hidden], as SliceGPT's ``pca_calc``."""
    rows = signals.reshape(-1, signals.shape[-1]).to(torch.float64)
    if rows.shape[0] < rows.shape[1]:
        return _principal_basis_low_rank(rows)
    covariance = rows.T @ rows
    damping = PCA_DAMPING * covariance.diagonal().mean()
    covariance.diagonal().add_(damping)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    order = torch.argsort(eigenvalues, descending=True)
    return eigenvectors[:, order]


def _principal_basis_low_rank(rows: torch.Tensor) -> torch.Tensor:
    """The same eigenbasis when there are fewer samples (n) than dimensions (D).

    The covariance then has rank r <= n: its top eigenvectors come from the n x n Gram matrix
    (``X.T @ u / s``), and every other eigenvalue equals the damping, so any orthonormal
    complement completes the eigenbasis. Costs O(n^2 D + n D^2) instead of ``eigh``'s O(D^3).
    """
    gram = rows @ rows.T
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    if eigenvalues[0] <= 0:
        return torch.eye(rows.shape[1], dtype=torch.float64)
    rank = int((eigenvalues > eigenvalues[0] * 1e-12).sum())
    top = rows.T @ eigenvectors[:, :rank] / eigenvalues[:rank].sqrt()
    # Orthonormalise (the top columns barely move) and complete to a full orthogonal basis.
    basis, triangular = torch.linalg.qr(top, mode="complete")
    signs = torch.sign(triangular.diagonal())
    signs[signs == 0] = 1
    basis[:, :rank] *= signs
    return basis


def random_orientation(basis: torch.Tensor, kept: int, generator: torch.Generator) -> torch.Tensor:
    """``basis`` with its first ``kept`` columns turned by a random rotation (run_slicegpt's
    ``--final-orientation random``: the kept subspace is unchanged, its axes are not PCA's)."""
    rotation, _ = torch.linalg.qr(torch.rand(kept, kept, generator=generator, dtype=torch.float64))
    turned = basis.clone()
    turned[:, :kept] = basis[:, :kept] @ rotation
    return turned


# --------------------------------------------------------------------------------------------
# Rotating and slicing one residual block
# --------------------------------------------------------------------------------------------


def fused_rms_norm(hidden_states: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """SliceGPT's ``RMSN``: weightless, mean over the ORIGINAL width, eps 1e-5."""
    mean_square = hidden_states.pow(2).sum(-1, keepdim=True) / hidden_size
    return hidden_states * torch.rsqrt(mean_square + SLICEGPT_FUSED_NORM_EPS)


# (normalised stream, rotated input linears, dense output linear) -> the branch's output
BranchFunction = Callable[[torch.Tensor, list[Linear], Linear], torch.Tensor]


@dataclass
class Branch:
    """A layer's attention or MLP as the slicing sees it: the norm before it, its input linears
    and its output linear (by relative name), and its arithmetic (``FamilySlicer.attention`` /
    ``FamilySlicer.mlp``)."""

    norm: Norm | None
    readers: dict[str, Linear]
    writer_name: str
    writer: Linear
    function: BranchFunction


@dataclass
class ResidualBlock:
    """``x -> x @ shortcut + sum(branch(norm(x)))``: branches that read one normalised stream and
    whose outputs are summed (one in a sequential layer, attention and MLP in a parallel one)."""

    shortcut: str  # the shortcut matrix's name
    widths: tuple[int, int]  # (d_in, d_out)
    branches: tuple[Branch, ...]


@dataclass
class BlockResult:
    """One residual block rotated and sliced, and its effect on the calibration stream."""

    linears: dict[str, Linear]  # the readers of the rotated, sliced stream and the writers of the next one
    shortcut: torch.Tensor  # the residual's change of basis, [d_in, d_out]
    output: torch.Tensor  # the stream after the block (float32, dense basis)
    output_basis: torch.Tensor  # its principal basis (float64)


def rotate_block(
    stream: torch.Tensor,
    basis: torch.Tensor,
    block: ResidualBlock,
    rotator: Rotator,
    orient: Callable[[torch.Tensor, int], torch.Tensor],
) -> BlockResult:
    """SliceGPT's step for one residual ``block``.

    ``stream`` is the block's calibration input in the dense basis and ``basis`` its principal
    basis. The readers get the (first branch's) norm fused in and read ``basis[:, :d_in]``; the
    block runs on the sliced stream with the dense writers (its residual through
    ``basis[:, :d_in].T``), the output's principal basis is computed, and the writers and the
    shortcut are rotated into its first ``d_out`` axes.
    """
    d_in, d_out = block.widths
    kept_input = basis[:, :d_in]
    norm = block.branches[0].norm
    readers = [
        {name: rotator.reading(linear, norm, kept_input) for name, linear in branch.readers.items()}
        for branch in block.branches
    ]
    sliced = stream @ kept_input.to(torch.float32)
    normed = fused_rms_norm(sliced, basis.shape[0])
    updates = [
        branch.function(normed, list(rotated.values()), branch.writer)
        for branch, rotated in zip(block.branches, readers, strict=True)
    ]
    output = sliced @ as_computed(rotator.store(kept_input.T)) + sum(updates[1:], start=updates[0])
    output_basis = orient(principal_basis(output), d_out)
    kept_output = output_basis[:, :d_out]
    linears = {name: linear for rotated in readers for name, linear in rotated.items()}
    linears.update((branch.writer_name, rotator.writing(branch.writer, kept_output)) for branch in block.branches)
    return BlockResult(
        linears=linears,
        shortcut=rotator.store(kept_input.T @ kept_output),
        output=output,
        output_basis=output_basis,
    )


# --------------------------------------------------------------------------------------------
# Rotating and slicing one decoder layer
# --------------------------------------------------------------------------------------------


@dataclass
class DenseLayer:
    """A dense decoder layer's attention and MLP, as the slicing reads them (the writers already
    centred in a LayerNorm family), and whether they run in parallel."""

    attention: Branch
    mlp: Branch
    parallel: bool

    @classmethod
    def read(cls, dense: DenseCheckpoint, idx: int, rotator: Rotator) -> DenseLayer:
        family, slicer, prefix = dense.family, dense.slicer, dense.family.layer(idx)

        def branch(norm: str | None, inputs: Sequence[str], output: str, function: BranchFunction) -> Branch:
            writer = dense.linear(prefix + output)
            return Branch(
                norm=dense.norm(prefix + norm) if norm else None,
                readers={name: dense.linear(prefix + name) for name in inputs},
                writer_name=output,
                writer=rotator.centred(writer) if slicer.layer_norm else writer,
                function=function,
            )

        return cls(
            attention=branch(slicer.first_norm, family.attention_inputs, family.attention_output, slicer.attention),
            mlp=branch(slicer.second_norm, family.mlp_inputs, family.mlp_output, slicer.mlp),
            parallel=family.parallel_blocks,
        )

    def blocks(self, idx: int, widths: SlicedWidths) -> list[ResidualBlock]:
        """The residual blocks of this layer (layer ``idx``): attention, then MLP, or, in a
        parallel layer, one block of both (one shortcut)."""
        if self.parallel:
            both = (widths.attention_input[idx], widths.mlp_output[idx])
            return [ResidualBlock("attn_shortcut_Q", both, (self.attention, self.mlp))]
        attention = (widths.attention_input[idx], widths.attention_output[idx])
        mlp = (widths.mlp_input[idx], widths.mlp_output[idx])
        return [
            ResidualBlock("attn_shortcut_Q", attention, (self.attention,)),
            ResidualBlock("mlp_shortcut_Q", mlp, (self.mlp,)),
        ]


@dataclass
class SlicedLayer:
    """A decoder layer's sliced tensors (relative names) and its output on the calibration data."""

    tensors: dict[str, Linear | torch.Tensor]
    output: torch.Tensor  # float32, dense basis
    output_basis: torch.Tensor  # its principal basis (float64): the next layer's input basis


def slice_layer(
    idx: int,
    layer: DenseLayer,
    stream: torch.Tensor,
    basis: torch.Tensor,
    widths: SlicedWidths,
    rotator: Rotator,
    orient: Callable[[torch.Tensor, int], torch.Tensor],
) -> SlicedLayer:
    """Fuse, rotate and slice decoder layer ``idx``, block by block, given its calibration input
    (dense basis) and that stream's principal basis."""
    tensors: dict[str, Linear | torch.Tensor] = {}
    for block in layer.blocks(idx, widths):
        result = rotate_block(stream, basis, block, rotator, orient)
        tensors[block.shortcut] = result.shortcut
        tensors.update(result.linears)
        stream, basis = result.output, result.output_basis
    return SlicedLayer(tensors=tensors, output=stream, output_basis=basis)


def state_entries(
    prefix: str, tensors: Mapping[str, Linear | torch.Tensor], order: Sequence[str]
) -> dict[str, torch.Tensor]:
    """``tensors`` as state-dict entries in ``order``: ``prefix + name`` for a tensor, and
    ``.weight`` then ``.bias`` (if any) for a linear."""
    entries: dict[str, torch.Tensor] = {}
    for name in order:
        item = tensors[name]
        if isinstance(item, Linear):
            entries[f"{prefix}{name}.weight"] = item.weight
            if item.bias is not None:
                entries[f"{prefix}{name}.bias"] = item.bias
        else:
            entries[prefix + name] = item
    return entries


# --------------------------------------------------------------------------------------------
# Embeddings, head, calibration data
# --------------------------------------------------------------------------------------------


def fused_embeddings(dense: DenseCheckpoint, center: bool, dtype: torch.dtype) -> list[torch.Tensor]:
    """The embedding matrices (in ``dtype``, ``family.embeddings``' order) after SliceGPT's fusion
    step (row means removed if ``center``)."""
    matrices = [dense.tensor(name, dtype) for name in dense.family.embeddings]
    return [matrix - matrix.mean(dim=-1, keepdim=True) for matrix in matrices] if center else matrices


def rotate_vocab_matrix(matrix: Linear, basis: torch.Tensor, rotator: Rotator, norm: Norm | None = None) -> Linear:
    """A vocab x hidden matrix (an embedding, or the head with the final ``norm`` fused in) read
    through ``basis``, in row chunks."""
    chunks = [
        rotator.reading(matrix.rows(start, start + VOCAB_CHUNK_ROWS), norm, basis)
        for start in range(0, matrix.weight.shape[0], VOCAB_CHUNK_ROWS)
    ]
    bias = None if chunks[0].bias is None else torch.cat([chunk.bias for chunk in chunks])
    return Linear(torch.cat([chunk.weight for chunk in chunks]).contiguous(), bias)


def calibration_token_ids(
    dense: DenseCheckpoint,
    calibration_ids: torch.Tensor | Sequence[Sequence[int]] | None,
    num_samples: int,
    seq_len: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """[num_samples, seq_len] token ids: the given ones, else windows of ``embedded_text()``
    through the model's ``tokenizer.json``, else uniformly random ids."""
    vocab = dense.vocab_size
    if calibration_ids is not None:
        ids = torch.as_tensor(calibration_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"calibration_ids must be [samples, seq_len] token ids, got shape {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"calibration_ids must lie in [0, {vocab}) (the model's vocab_size)")
        return ids
    if num_samples < 1 or seq_len < 1:
        raise ValueError("num_calibration_samples and calibration_seq_len must be positive")
    text_ids = _embedded_text_ids(dense)
    if text_ids is None:
        logger.info("no usable tokenizer.json in %s: calibrating on random token ids", dense.directory)
        return torch.randint(0, vocab, (num_samples, seq_len), generator=generator)
    while text_ids.numel() < seq_len:
        text_ids = torch.cat([text_ids, text_ids])
    starts = torch.randint(0, text_ids.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([text_ids[start : start + seq_len] for start in starts.tolist()])


def _embedded_text_ids(dense: DenseCheckpoint) -> torch.Tensor | None:
    tokenizer_path = dense.directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        ids = Tokenizer.from_file(str(tokenizer_path)).encode(embedded_text()).ids
    except Exception as exc:  # noqa: BLE001 - any unreadable tokenizer means: fall back to random ids
        logger.warning("cannot use %s (%s): calibrating on random token ids", tokenizer_path, exc)
        return None
    ids = [token for token in ids if token < dense.vocab_size]
    return torch.tensor(ids, dtype=torch.long) if ids else None


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------


def _report(progress: ProgressCallback | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def rotate_and_slice(
    dense: DenseCheckpoint,
    token_ids: torch.Tensor,
    widths: SlicedWidths,
    rotator: Rotator,
    orient: Callable[[torch.Tensor, int], torch.Tensor],
    center_embeddings: bool,
    progress: ProgressCallback | None,
) -> dict[str, torch.Tensor]:
    """The sliced state dict (official names and order) of ``dense``, calibrated on ``token_ids``."""
    family, slicer = dense.family, dense.slicer
    total_steps = dense.num_layers + 2
    embeddings = fused_embeddings(dense, center_embeddings or slicer.layer_norm, rotator.compute_dtype)
    stream = slicer.layer_input(embeddings, token_ids).to(torch.float32)
    basis = orient(principal_basis(stream), widths.embedding)
    tensors = {
        name: rotate_vocab_matrix(Linear(matrix), basis[:, : widths.embedding], rotator).weight
        for name, matrix in zip(family.embeddings, embeddings, strict=True)
    }
    del embeddings
    _report(progress, "embeddings", 1, total_steps)

    for idx in range(dense.num_layers):
        layer = DenseLayer.read(dense, idx, rotator)
        result = slice_layer(idx, layer, stream, basis, widths, rotator, orient)
        tensors.update(state_entries(family.layer(idx), result.tensors, slicer.layer_order))
        stream, basis = result.output, result.output_basis
        logger.debug("layer %d/%d rotated and sliced", idx + 1, dense.num_layers)
        _report(progress, "layers", idx + 2, total_steps)

    final_norm = dense.norm(slicer.final_norm)
    head = rotate_vocab_matrix(dense.linear("lm_head"), basis[:, : widths.lm_head], rotator, final_norm)
    tensors.update(state_entries("", {"lm_head": head}, ("lm_head",)))
    return tensors


# --------------------------------------------------------------------------------------------
# Writing the save directory
# --------------------------------------------------------------------------------------------


def base_files(dense_dir: Path) -> list[Path]:
    """What run_slicegpt copies for a local model: ``*.json`` (not safetensors indexes), ``*token*.model``
    and ``merges.txt`` (the files among them)."""
    sources = [path for path in sorted(dense_dir.glob("*.json")) if "safetensors" not in path.name]
    sources += sorted(dense_dir.glob("*token*.model")) + sorted(dense_dir.glob("merges.txt"))
    return [path for path in sources if path.is_file()]


def copy_base_files(dense_dir: Path, out_dir: Path) -> list[str]:
    """Copy ``base_files(dense_dir)`` into ``out_dir`` (nothing when it is ``dense_dir``); their names."""
    if dense_dir.resolve() == out_dir.resolve():
        return []
    sources = base_files(dense_dir)
    for source in sources:
        with atomic_file(out_dir / source.name, overwrite=True) as tmp:
            shutil.copyfile(source, tmp)
    return [source.name for source in sources]


def save_sliced(out_dir: Path, stem: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write ``{stem}.pt`` (torch.save of the state dict) and ``{stem}.json`` (the SlicingConfig)."""
    with atomic_file(out_dir / f"{stem}.pt", overwrite=True) as tmp:
        torch.save(tensors, tmp)
    with atomic_file(out_dir / f"{stem}.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(config))


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _check_options(sparsity: float, round_interval: int, final_orientation: str) -> None:
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1) (run_slicegpt's range), got {sparsity}")
    if round_interval < 1:
        raise ValueError(f"round_interval must be a positive integer, got {round_interval}")
    if final_orientation not in ORIENTATIONS:
        raise ValueError(f"final_orientation must be one of {ORIENTATIONS}, got {final_orientation!r}")


def _log_plan(dense: DenseCheckpoint, widths: SlicedWidths, out_dtype: torch.dtype, token_ids: torch.Tensor) -> None:
    hidden = dense.hidden_size
    if dense.slicer.norm_eps != SLICEGPT_FUSED_NORM_EPS:
        logger.warning(
            "the dense model's norm epsilon is %g; SliceGPT's fused norm uses %g, so even at sparsity 0 "
            "the sliced model differs slightly from the dense one",
            dense.slicer.norm_eps,
            SLICEGPT_FUSED_NORM_EPS,
        )
    if token_ids.numel() < hidden:
        logger.warning(
            "%d calibration tokens for hidden size %d: the covariances are rank-deficient, so the kept "
            "directions beyond their rank are arbitrary",
            token_ids.numel(),
            hidden,
        )
    logger.info(
        "slicing %s (%s, %d layers, hidden %d -> %d, %s) with %d x %d calibration tokens",
        dense.directory,
        dense.family.title,
        dense.num_layers,
        hidden,
        widths.embedding,
        dtype_name(out_dtype),
        token_ids.shape[0],
        token_ids.shape[1],
    )


@dataclass
class SliceOutcome:
    """One slice of a dense model: the sliced state dict (official names and order, output dtype),
    its SlicingConfig and widths, the files' stem, the parameter counts, and where it was written."""

    tensors: dict[str, torch.Tensor]
    slicing_config: dict[str, Any]
    widths: SlicedWidths
    stem: str  # {basename(model_name)}_{sparsity}: the .pt and .json are named by it
    params: dict[str, int]  # dense (the base model's), sliced (shortcut Qs included), shortcut_q
    out_dir: Path | None = None  # None: nothing was written
    copied: list[str] = field(default_factory=list)  # the base-model files copied into out_dir

    @property
    def checkpoint(self) -> Path | None:
        """The ``.pt`` written (None when nothing was)."""
        return None if self.out_dir is None else self.out_dir / f"{self.stem}.pt"


def _prepared_out_dir(out_dir: str | os.PathLike[str] | None) -> Path | None:
    """``out_dir`` made absolute and created (before any work: a bad one fails at once)."""
    if out_dir is None:
        return None
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    return out


@torch.no_grad()
def slice_dense(
    dense: DenseCheckpoint,
    out_dir: str | os.PathLike[str] | None,
    *,
    sparsity: float,
    round_interval: int = 8,
    model_name: str | None = None,
    calibration_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
    num_calibration_samples: int = 8,
    calibration_seq_len: int = 64,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    progress: ProgressCallback | None = None,
    center_embeddings: bool = False,
    final_orientation: str = "random",
    do_slice_head: bool = False,
) -> SliceOutcome:
    """Rotate and slice ``dense`` as SliceGPT does (the options are ``slice_model``'s) and, unless
    ``out_dir`` is None, write run_slicegpt's save directory there. ``dense`` is left as it was:
    a loaded checkpoint gives the same slice however many times it is sliced."""
    _check_options(sparsity, round_interval, final_orientation)
    out = _prepared_out_dir(out_dir)
    model_name = model_name or dense.slicer.default_model_name(dense.directory.name)
    out_dtype = resolve_dtype(dtype) if dtype is not None else dense.dtype
    rotator = Rotator(compute_dtype=torch.float64 if out_dtype.itemsize >= 4 else torch.float32, out_dtype=out_dtype)
    widths = constant_widths(dense, sparsity, round_interval, do_slice_head)

    generator = torch.Generator().manual_seed(seed)
    token_ids = calibration_token_ids(dense, calibration_ids, num_calibration_samples, calibration_seq_len, generator)
    _log_plan(dense, widths, out_dtype, token_ids)

    def orient(basis: torch.Tensor, kept: int) -> torch.Tensor:
        return random_orientation(basis, kept, generator) if final_orientation == "random" else basis

    tensors = rotate_and_slice(dense, token_ids, widths, rotator, orient, center_embeddings, progress)
    counted = count_sliced_parameters(tensors)
    outcome = SliceOutcome(
        tensors=tensors,
        slicing_config=widths.as_slicing_config(dense.hidden_size, do_slice_head=do_slice_head),
        widths=widths,
        stem=sliced_file_stem(model_name, sparsity),
        params={
            "dense": dense.family.dense_parameters(dense.config),
            "sliced": counted.total,
            "shortcut_q": counted.shortcut,
        },
    )
    if out is not None:
        save_sliced(out, outcome.stem, tensors, outcome.slicing_config)
        outcome.out_dir, outcome.copied = out, copy_base_files(dense.directory, out)
        logger.info("wrote %s.pt / %s.json (+ %s) to %s", outcome.stem, outcome.stem, ", ".join(outcome.copied), out)
    total_steps = dense.num_layers + 2
    _report(progress, "sliced" if out is None else "saved", total_steps, total_steps)
    return outcome


def slice_model(
    dense_dir: str | os.PathLike[str] | DenseCheckpoint,
    out_dir: str | os.PathLike[str],
    *,
    sparsity: float,
    family: str | None = None,
    **options: Any,
) -> Path:
    """Rotate and slice the dense model in ``dense_dir`` (Llama, OPT, Phi-2 or Phi-3, by its
    ``config.json``; or a ``DenseCheckpoint``, loaded or not) as SliceGPT does; write
    run_slicegpt's save-directory layout into ``out_dir`` (created if needed) and return ``out_dir``.

    The checkpoint is ``out_dir / f"{sliced_file_stem(model_name, sparsity)}.pt"`` (plus ``.json``).
    Options (``slice_dense``'s): ``model_name`` defaults to a name the family's official adapter
    accepts, made from the name of ``dense_dir`` (``meta-llama/Meta-Llama-3-<dir>``,
    ``facebook/opt-<dir>``, ``microsoft/phi-2``, ``microsoft/Phi-3-mini-4k-instruct``).
    Calibration: ``calibration_ids`` [samples, seq_len] if given, else ``num_calibration_samples``
    (8) windows of ``calibration_seq_len`` (64) tokens of ``embedded_text()`` (random ids if the
    model has no ``tokenizer.json``), chosen with ``seed`` (0). ``dtype`` casts the output
    (default: the dense weights' dtype). ``progress(stage, done, total)`` is called as work
    advances. ``center_embeddings`` (False) matters for the RMSNorm families only (the LayerNorm
    families are always centred, which is exact); ``round_interval`` (8), ``final_orientation``
    ("random" or "pca") and ``do_slice_head`` (False) are run_slicegpt's. ``family`` ("llama",
    ...), if given, is the family the dense model must be. See the module docstring for the maths.
    """
    dense = dense_dir if isinstance(dense_dir, DenseCheckpoint) else DenseCheckpoint(dense_dir)
    if family is not None and dense.family.key != family:
        raise ValueError(f"{dense.directory} holds a {dense.family.title} model, not a {family} one")
    out = Path(out_dir).expanduser().absolute()
    slice_dense(dense, out, sparsity=sparsity, **options)
    return out


def slice_llama(
    dense_dir: str | os.PathLike[str] | DenseCheckpoint, out_dir: str | os.PathLike[str], **options: Any
) -> Path:
    """``slice_model(dense_dir, out_dir, family="llama", **options)``: a dense Llama is sliced, any
    other family refused. ``model_name`` defaults to ``meta-llama/Meta-Llama-3-<name of dense_dir>``."""
    return slice_model(dense_dir, out_dir, family="llama", **options)


# --------------------------------------------------------------------------------------------
# The dense model as transformers builds it
# --------------------------------------------------------------------------------------------


def dense_model(dense: DenseCheckpoint, dtype: str | torch.dtype | None = None) -> PreTrainedModel:
    """The dense model as transformers builds it (``AutoModelForCausalLM`` of its config) with
    ``dense``'s weights, in ``dtype`` (default: the stored one), on the CPU, in eval mode: what
    the baseline perplexity is measured on.

    It is built without random initialisation and filled from ``dense.tensor()`` (no disk read
    when ``dense`` is loaded). The model owns copies of the tensors (a tied head shares its
    embedding's), so changing it, as slicegpt's fusion does, leaves ``dense`` as it was.
    """
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    out_dtype = resolve_dtype(dtype) if dtype is not None else dense.dtype
    model_type = dense.config.get("model_type") or dense.family.model_types[0]
    config = CONFIG_MAPPING[model_type].from_dict(dict(dense.config))
    with _without_weight_init():
        model = AutoModelForCausalLM.from_config(config, **_dtype_keyword(out_dtype))
    state = {name: dense.tensor(name) for name in dense.tensor_files}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - ({"lm_head.weight"} if dense.tied_head else set()))
    if missing:
        raise ValueError(f"{dense.directory} lacks tensors its {dense.family.title} model needs: {missing}")
    if unexpected:
        logger.warning(
            "%s: tensors its %s model has no place for, left out: %s", dense.directory, model_type, unexpected
        )
    if dense.tied_head:
        model.tie_weights()
    return model.eval()


def _without_weight_init() -> contextlib.AbstractContextManager[None]:
    """transformers' context in which a model is built without random initialisation (its
    parameters are then filled): ``transformers.initialization`` in 5.x, ``modeling_utils`` in 4.x."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _dtype_keyword(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_config``'s dtype argument: ``dtype`` in transformers 5.x, ``torch_dtype`` in 4.x."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}
