"""SliceGPT's rotate-and-slice for a dense Llama, written for slicebridge (no slicegpt import).

``slice_llama(dense_dir, out_dir, sparsity=...)`` writes exactly what the official
``experiments/run_slicegpt.py --model-path dense_dir --save-dir out_dir`` writes for a local
Llama (microsoft/TransformerCompression, sequential blocks, ``ConstSlicingScheduler``):

- ``{basename(model_name)}_{sparsity}.pt``: the sliced state dict, official key names and order
  (per layer ``mlp_shortcut_Q``, ``attn_shortcut_Q``, q/k/v/o, gate/up/down; no norm weights),
  in the dense model's dtype;
- ``{basename(model_name)}_{sparsity}.json``: the ``SlicingConfig``;
- the dense model's ``*.json`` files (config, generation config, tokenizer), ``*token*.model``
  and ``merges.txt``, copied as run_slicegpt does for a local model.

The maths, with row vectors (``y = x @ W.T``) and ``Q[:, :d]`` the first ``d`` principal axes:

1. Fusion. Every RMSNorm weight is multiplied into the columns of the linear layers that read
   its output (q/k/v, gate/up, and ``lm_head`` for the final norm); the norms become SliceGPT's
   weightless ``RMSN``: ``x / sqrt(sum(x**2) / hidden + 1e-5)``, the mean over the ORIGINAL
   width and eps 1e-5 whatever the model's ``rms_norm_eps``. A tied head is untied first.
   The official fusion also subtracts each embedding row's mean (``fuse_modules``), which a
   Llama's RMSNorm does not undo, so the official result is not the dense model's function even
   at sparsity 0. ``center_embeddings=True`` does it as the official does; the default (False)
   keeps the rotation exact, so that at sparsity 0 the sliced model computes the dense one.
2. Rotation and slicing, one layer at a time, with calibration activations (float32 forward,
   covariance and eigendecomposition in float64, eigenvectors by decreasing eigenvalue,
   1 % mean-diagonal damping as the official ``pca_calc``):
   - ``Q0`` = PCA of the embeddings' output; ``embed <- (embed @ Q0)[:, :d]``.
   - layer i, with ``Q_in`` the basis of its input stream: ``q/k/v <- W @ Q_in[:, :d]``; the
     attention half runs on the sliced input (its residual goes through ``Q_in[:, :d].T``) and
     ``Q_mid`` = PCA of the stream entering the MLP norm; ``o_proj <- Q_mid[:, :d].T @ W``,
     ``attn_shortcut_Q = Q_in[:, :d].T @ Q_mid[:, :d]``; ``gate/up <- W @ Q_mid[:, :d]``. The MLP
     half then runs on the sliced stream and ``Q_out`` = PCA of the layer's output;
     ``down_proj <- Q_out[:, :d_out].T @ W``, ``mlp_shortcut_Q = Q_mid[:, :d].T @ Q_out[:, :d_out]``,
     and ``Q_out`` is the next layer's ``Q_in``.
   - ``lm_head <- W @ Q_last``. Unless ``do_slice_head`` the head and the last layer's MLP
     output keep the full width (run_slicegpt never slices the head).
   ``d = int((1 - sparsity) * hidden)`` rounded down to a multiple of ``round_interval``.
   ``final_orientation="random"`` (the default, as run_slicegpt's ``--final-orientation``; the
   official fixture was made so) turns the kept block of every basis by a seeded random rotation;
   ``"pca"`` keeps the principal axes in order. The model computes the same function either way.

Precision: rotations run in float64 for 32-bit outputs and in float32 for 16-bit outputs (whose
rounding dominates), then each tensor is cast once. When the calibration has fewer tokens than
the hidden size the covariance is rank-deficient; its eigenbasis is then taken from the small
Gram matrix and completed with an orthonormal complement (same eigenpairs, much faster than a
full ``eigh``). At sparsity 0 (without ``center_embeddings``) and for a model whose
``rms_norm_eps`` is 1e-5 the result computes exactly the dense model's function.

Memory: the dense weights are read tensor by tensor from safetensors; only one layer's weights
(in float32/float64), the calibration activations and the sliced output are held at a time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slicebridge.dtypes import dtype_name

from .atomic import atomic_file
from .checkpoint import SlicedWidths, sliced_width
from .configuration_sliced_llama import SLICEGPT_FUSED_NORM_EPS, SlicedLlamaConfig
from .dense import embedded_text, resolve_dtype
from .modeling_sliced_llama import SlicedLlamaRotaryEmbedding
from .sliced_decoder import apply_rotary_pos_emb, repeat_kv

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]

# SliceGPT's pca_calc adds this fraction of the mean diagonal to the covariance's diagonal.
PCA_DAMPING = 0.01
# Rows of the embedding / head matrices rotated per step (bounds the float64 working set).
VOCAB_CHUNK_ROWS = 4096
ORIENTATIONS = ("pca", "random")


# --------------------------------------------------------------------------------------------
# The dense model on disk
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters of the dense Llama that the slicing needs."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    rms_norm_eps: float
    hidden_act: str

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LlamaShape:
        model_type = config.get("model_type")
        if model_type != "llama":
            raise ValueError(f"slice_llama slices Llama models (model_type 'llama'), not {model_type!r}")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ValueError("slice_llama supports Llamas without biases (attention_bias/mlp_bias false) only")
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        return cls(
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            hidden_act=str(config.get("hidden_act", "silu")),
        )


class DenseCheckpoint:
    """Reads a dense Hugging Face Llama directory (``config.json`` + safetensors) tensor by tensor."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser().absolute()
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{self.directory} holds no config.json; pass a Hugging Face model directory")
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        self.shape = LlamaShape.from_config(self.config)
        self.tensor_files = self._tensor_files()

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
        """Load one tensor (optionally cast)."""
        from safetensors import safe_open

        if name == "lm_head.weight" and name not in self.tensor_files and self.shape.tie_word_embeddings:
            name = "model.embed_tokens.weight"  # a tied head is the embedding matrix
        if name not in self.tensor_files:
            raise KeyError(f"{self.directory} has no tensor {name}")
        with safe_open(str(self.tensor_files[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        return tensor if dtype is None else tensor.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (read off the final norm's weight, a small tensor)."""
        return self.tensor("model.norm.weight").dtype


# --------------------------------------------------------------------------------------------
# File names (the widths are checkpoint.SlicedWidths)
# --------------------------------------------------------------------------------------------


def sliced_file_stem(model_name: str, sparsity: float) -> str:
    """``meta-llama/Meta-Llama-3-8B``, 0.25 -> ``Meta-Llama-3-8B_0.25`` (run_slicegpt's naming;
    the sparsity is printed as the float argparse would have parsed)."""
    return f"{Path(model_name).name}_{float(sparsity)}"


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
# The forward pass of one layer on calibration activations (float32)
# --------------------------------------------------------------------------------------------


def fused_rms_norm(hidden_states: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """SliceGPT's ``RMSN``: weightless, mean over the ORIGINAL width, eps 1e-5."""
    mean_square = hidden_states.pow(2).sum(-1, keepdim=True) / hidden_size
    return hidden_states * torch.rsqrt(mean_square + SLICEGPT_FUSED_NORM_EPS)


@dataclass
class CalibrationContext:
    """What every layer's forward pass shares: the model's shape and the RoPE tables."""

    shape: LlamaShape
    cos: torch.Tensor
    sin: torch.Tensor
    activation: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def build(cls, config: dict[str, Any], shape: LlamaShape, seq_len: int) -> CalibrationContext:
        from transformers.activations import ACT2FN

        rotary = SlicedLlamaRotaryEmbedding(SlicedLlamaConfig.from_base_and_slicing(config, {}))
        probe = torch.zeros(1, dtype=torch.float32)
        cos, sin = rotary(probe, torch.arange(seq_len).unsqueeze(0))
        return cls(shape=shape, cos=cos, sin=sin, activation=ACT2FN[shape.hidden_act])


def attention_output(
    normed: torch.Tensor,
    q_proj: torch.Tensor,
    k_proj: torch.Tensor,
    v_proj: torch.Tensor,
    o_proj: torch.Tensor,
    context: CalibrationContext,
) -> torch.Tensor:
    """Causal grouped-query self-attention of ``normed`` [batch, seq, width] through the given weights."""
    shape = context.shape
    batch, seq_len, _ = normed.shape

    def heads(weight: torch.Tensor, count: int) -> torch.Tensor:
        return F.linear(normed, weight).view(batch, seq_len, count, shape.head_dim).transpose(1, 2)

    query, key = apply_rotary_pos_emb(
        heads(q_proj, shape.num_heads), heads(k_proj, shape.num_kv_heads), context.cos, context.sin
    )
    value = heads(v_proj, shape.num_kv_heads)
    groups = shape.num_heads // shape.num_kv_heads
    attended = F.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), is_causal=True, scale=shape.head_dim**-0.5
    )
    return F.linear(attended.transpose(1, 2).reshape(batch, seq_len, -1), o_proj)


def mlp_output(
    normed: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    context: CalibrationContext,
) -> torch.Tensor:
    """The gated MLP: ``down(act(gate(x)) * up(x))``."""
    return F.linear(context.activation(F.linear(normed, gate_proj)) * F.linear(normed, up_proj), down_proj)


# --------------------------------------------------------------------------------------------
# Rotating one layer
# --------------------------------------------------------------------------------------------


@dataclass
class Rotator:
    """Applies rotations in ``compute_dtype`` and casts results to ``out_dtype``."""

    compute_dtype: torch.dtype
    out_dtype: torch.dtype

    def store(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as it is saved: ``out_dtype``, contiguous, owning its storage."""
        return tensor.to(dtype=self.out_dtype, memory_format=torch.contiguous_format, copy=True)

    def reading(self, weight: torch.Tensor, norm_weight: torch.Tensor | None, basis: torch.Tensor) -> torch.Tensor:
        """A layer reading the rotated stream: ``(W * norm_weight) @ basis`` (columns scaled by the norm)."""
        weight = weight.to(self.compute_dtype)
        if norm_weight is not None:
            weight = weight * norm_weight.to(self.compute_dtype)
        return self.store(weight @ basis.to(self.compute_dtype))

    def writing(self, weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """A layer writing into the rotated stream: ``basis.T @ W``."""
        return self.store(basis.to(self.compute_dtype).T @ weight.to(self.compute_dtype))


def as_computed(stored: torch.Tensor) -> torch.Tensor:
    """A stored (model-dtype) tensor as the calibration forward uses it (float32)."""
    return stored.to(torch.float32)


BlockFunction = Callable[[torch.Tensor, list[torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass
class BlockResult:
    """One residual block (attention or MLP) rotated and sliced, and its effect on the calibration stream."""

    readers: list[torch.Tensor]  # the input projections, reading the rotated, sliced stream
    writer: torch.Tensor  # the output projection, writing into the next rotated, sliced stream
    shortcut: torch.Tensor  # the residual's change of basis, [d_in, d_out]
    output: torch.Tensor  # the stream after the block (float32, dense basis)
    output_basis: torch.Tensor  # its principal basis (float64)


def rotate_block(
    stream: torch.Tensor,
    basis: torch.Tensor,
    widths: tuple[int, int],
    norm_weight: torch.Tensor,
    readers: list[torch.Tensor],
    writer: torch.Tensor,
    block: BlockFunction,
    rotator: Rotator,
    orient: Callable[[torch.Tensor, int], torch.Tensor],
) -> BlockResult:
    """SliceGPT's step for one block ``x -> x + writer(block(readers(norm(x))))``.

    ``stream`` is the block's calibration input in the dense basis and ``basis`` its principal
    basis; ``widths`` = (d_in, d_out). The readers get the norm weight fused in and read
    ``basis[:, :d_in]``; the block runs on the sliced stream with the dense writer (its residual
    through ``basis[:, :d_in].T``), the output's principal basis is computed, and the writer and
    the shortcut are rotated into its first ``d_out`` axes.
    """
    d_in, d_out = widths
    kept_input = basis[:, :d_in]
    rotated_readers = [rotator.reading(weight, norm_weight, kept_input) for weight in readers]
    sliced = stream @ kept_input.to(torch.float32)
    update = block(
        fused_rms_norm(sliced, basis.shape[0]), [as_computed(w) for w in rotated_readers], as_computed(writer)
    )
    output = sliced @ as_computed(rotator.store(kept_input.T)) + update
    output_basis = orient(principal_basis(output), d_out)
    kept_output = output_basis[:, :d_out]
    return BlockResult(
        readers=rotated_readers,
        writer=rotator.writing(writer, kept_output),
        shortcut=rotator.store(kept_input.T @ kept_output),
        output=output,
        output_basis=output_basis,
    )


@dataclass
class SlicedLayer:
    """A decoder layer's sliced tensors (official order) and its output on the calibration data."""

    tensors: dict[str, torch.Tensor]
    output: torch.Tensor  # float32, dense basis
    output_basis: torch.Tensor  # its principal basis (float64): the next layer's input basis


def slice_layer(
    idx: int,
    dense: DenseCheckpoint,
    layer_input: torch.Tensor,
    input_basis: torch.Tensor,
    widths: SlicedWidths,
    rotator: Rotator,
    context: CalibrationContext,
    orient: Callable[[torch.Tensor, int], torch.Tensor],
) -> SlicedLayer:
    """Fuse, rotate and slice decoder layer ``idx`` (attention block, then MLP block) given its
    calibration input (dense basis) and that stream's principal basis."""
    prefix = f"model.layers.{idx}."

    def weight(name: str) -> torch.Tensor:
        return dense.tensor(prefix + name)

    attention = rotate_block(
        layer_input,
        input_basis,
        (widths.attention_input[idx], widths.attention_output[idx]),
        weight("input_layernorm.weight"),
        [weight(f"self_attn.{name}_proj.weight") for name in ("q", "k", "v")],
        weight("self_attn.o_proj.weight"),
        lambda normed, readers, writer: attention_output(normed, *readers, writer, context),
        rotator,
        orient,
    )
    mlp = rotate_block(
        attention.output,
        attention.output_basis,
        (widths.mlp_input[idx], widths.mlp_output[idx]),
        weight("post_attention_layernorm.weight"),
        [weight("mlp.gate_proj.weight"), weight("mlp.up_proj.weight")],
        weight("mlp.down_proj.weight"),
        lambda normed, readers, writer: mlp_output(normed, *readers, writer, context),
        rotator,
        orient,
    )
    q_proj, k_proj, v_proj = attention.readers
    gate_proj, up_proj = mlp.readers
    return SlicedLayer(
        tensors={
            prefix + "mlp_shortcut_Q": mlp.shortcut,
            prefix + "attn_shortcut_Q": attention.shortcut,
            prefix + "self_attn.q_proj.weight": q_proj,
            prefix + "self_attn.k_proj.weight": k_proj,
            prefix + "self_attn.v_proj.weight": v_proj,
            prefix + "self_attn.o_proj.weight": attention.writer,
            prefix + "mlp.gate_proj.weight": gate_proj,
            prefix + "mlp.up_proj.weight": up_proj,
            prefix + "mlp.down_proj.weight": mlp.writer,
        },
        output=mlp.output,
        output_basis=mlp.output_basis,
    )


# --------------------------------------------------------------------------------------------
# Embeddings, head, calibration data
# --------------------------------------------------------------------------------------------


def fused_embeddings(dense: DenseCheckpoint, center: bool, dtype: torch.dtype) -> torch.Tensor:
    """The embedding matrix (in ``dtype``) after SliceGPT's fusion step (row means removed if ``center``)."""
    embeddings = dense.tensor("model.embed_tokens.weight", dtype)
    return embeddings - embeddings.mean(dim=-1, keepdim=True) if center else embeddings


def rotate_vocab_matrix(
    matrix: torch.Tensor, basis: torch.Tensor, rotator: Rotator, column_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``(matrix * column_scale) @ basis`` for a vocab x hidden matrix, in row chunks."""
    rows = [
        rotator.reading(matrix[start : start + VOCAB_CHUNK_ROWS], column_scale, basis)
        for start in range(0, matrix.shape[0], VOCAB_CHUNK_ROWS)
    ]
    return torch.cat(rows).contiguous()


def calibration_token_ids(
    dense: DenseCheckpoint,
    calibration_ids: torch.Tensor | Sequence[Sequence[int]] | None,
    num_samples: int,
    seq_len: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """[num_samples, seq_len] token ids: the given ones, else windows of ``embedded_text()``
    through the model's ``tokenizer.json``, else uniformly random ids."""
    vocab = dense.shape.vocab_size
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
    ids = [token for token in ids if token < dense.shape.vocab_size]
    return torch.tensor(ids, dtype=torch.long) if ids else None


# --------------------------------------------------------------------------------------------
# Writing the save directory
# --------------------------------------------------------------------------------------------


def copy_base_files(dense_dir: Path, out_dir: Path) -> list[str]:
    """Copy what run_slicegpt copies for a local model: ``*.json`` (not safetensors indexes),
    ``*token*.model`` and ``merges.txt``. Returns the names copied."""
    if dense_dir.resolve() == out_dir.resolve():
        return []
    sources = [path for path in sorted(dense_dir.glob("*.json")) if "safetensors" not in path.name]
    sources += sorted(dense_dir.glob("*token*.model")) + sorted(dense_dir.glob("merges.txt"))
    for source in sources:
        with atomic_file(out_dir / source.name, overwrite=True) as tmp:
            shutil.copyfile(source, tmp)
    return [source.name for source in sources]


def save_sliced(
    out_dir: Path,
    stem: str,
    tensors: dict[str, torch.Tensor],
    widths: SlicedWidths,
    hidden_size: int,
    do_slice_head: bool,
) -> None:
    """Write ``{stem}.pt`` (torch.save of the state dict) and ``{stem}.json`` (the SlicingConfig)."""
    with atomic_file(out_dir / f"{stem}.pt", overwrite=True) as tmp:
        torch.save(tensors, tmp)
    with atomic_file(out_dir / f"{stem}.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(widths.as_slicing_config(hidden_size, do_slice_head=do_slice_head)))


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _report(progress: ProgressCallback | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


@torch.no_grad()
def slice_llama(
    dense_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
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
) -> Path:
    """Rotate and slice the dense Llama in ``dense_dir`` as SliceGPT does; write run_slicegpt's
    save-directory layout into ``out_dir`` (created if needed) and return ``out_dir``.

    The checkpoint is ``out_dir / f"{sliced_file_stem(model_name, sparsity)}.pt"`` (plus ``.json``).
    ``model_name`` defaults to ``meta-llama/Meta-Llama-3-<name of dense_dir>`` (the official loader
    wants a Llama-2 / Meta-Llama-3 name). Calibration: ``calibration_ids`` [samples, seq_len] if
    given, else ``num_calibration_samples`` windows of ``calibration_seq_len`` tokens of
    ``embedded_text()`` (random ids if the model has no ``tokenizer.json``), chosen with ``seed``.
    ``dtype`` casts the output (default: the dense weights' dtype). ``progress(stage, done, total)``
    is called as work advances. See the module docstring for the maths and the options.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1) (run_slicegpt's range), got {sparsity}")
    if round_interval < 1:
        raise ValueError(f"round_interval must be a positive integer, got {round_interval}")
    if final_orientation not in ORIENTATIONS:
        raise ValueError(f"final_orientation must be one of {ORIENTATIONS}, got {final_orientation!r}")

    dense = DenseCheckpoint(dense_dir)
    shape = dense.shape
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    model_name = model_name or f"meta-llama/Meta-Llama-3-{dense.directory.name}"
    out_dtype = resolve_dtype(dtype) if dtype is not None else dense.dtype
    rotator = Rotator(compute_dtype=torch.float64 if out_dtype.itemsize >= 4 else torch.float32, out_dtype=out_dtype)

    width = sliced_width(shape.hidden_size, sparsity, round_interval)
    if width < 1:
        raise ValueError(
            f"sparsity {sparsity} with round_interval {round_interval} leaves no width "
            f"of hidden size {shape.hidden_size}"
        )
    widths = SlicedWidths.constant(shape.num_layers, width, head=width if do_slice_head else shape.hidden_size)
    if shape.rms_norm_eps != SLICEGPT_FUSED_NORM_EPS:
        logger.warning(
            "the dense model's rms_norm_eps is %g; SliceGPT's fused norm uses %g, so even at sparsity 0 "
            "the sliced model differs slightly from the dense one",
            shape.rms_norm_eps,
            SLICEGPT_FUSED_NORM_EPS,
        )

    generator = torch.Generator().manual_seed(seed)
    token_ids = calibration_token_ids(dense, calibration_ids, num_calibration_samples, calibration_seq_len, generator)
    if token_ids.numel() < shape.hidden_size:
        logger.warning(
            "%d calibration tokens for hidden size %d: the covariances are rank-deficient, so the kept "
            "directions beyond their rank are arbitrary",
            token_ids.numel(),
            shape.hidden_size,
        )
    logger.info(
        "slicing %s (%d layers, hidden %d -> %d, %s) with %d x %d calibration tokens",
        dense.directory,
        shape.num_layers,
        shape.hidden_size,
        width,
        dtype_name(out_dtype),
        token_ids.shape[0],
        token_ids.shape[1],
    )

    def orient(basis: torch.Tensor, kept: int) -> torch.Tensor:
        return random_orientation(basis, kept, generator) if final_orientation == "random" else basis

    context = CalibrationContext.build(dense.config, shape, token_ids.shape[1])
    total_steps = shape.num_layers + 2

    embeddings = fused_embeddings(dense, center_embeddings, rotator.compute_dtype)
    stream = embeddings[token_ids].to(torch.float32)
    basis = orient(principal_basis(stream), widths.embedding)
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": rotate_vocab_matrix(embeddings, basis[:, : widths.embedding], rotator)
    }
    del embeddings
    _report(progress, "embeddings", 1, total_steps)

    for idx in range(shape.num_layers):
        result = slice_layer(idx, dense, stream, basis, widths, rotator, context, orient)
        tensors.update(result.tensors)
        stream, basis = result.output, result.output_basis
        logger.debug("layer %d/%d rotated and sliced", idx + 1, shape.num_layers)
        _report(progress, "layers", idx + 2, total_steps)

    final_norm = dense.tensor("model.norm.weight")
    head = dense.tensor("lm_head.weight")
    tensors["lm_head.weight"] = rotate_vocab_matrix(head, basis[:, : widths.lm_head], rotator, column_scale=final_norm)
    del head

    stem = sliced_file_stem(model_name, sparsity)
    save_sliced(out, stem, tensors, widths, shape.hidden_size, do_slice_head)
    copied = copy_base_files(dense.directory, out)
    _report(progress, "saved", total_steps, total_steps)
    logger.info("wrote %s.pt / %s.json (+ %s) to %s", stem, stem, ", ".join(copied) or "no base files", out)
    return out
