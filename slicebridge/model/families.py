"""The model families SliceGPT slices, as data: one row per family, the only place that knows them.

The official slicegpt (microsoft/TransformerCompression) has an adapter per family: Llama-2 /
Llama-3, OPT, Phi-2 and Phi-3. What differs between them, for reading, rebuilding and
describing a sliced checkpoint, is recorded here: how the base config names the family, where
the tensors live in the state dict, which linears read and write the residual stream (so the
sliced widths can be read off their shapes), whether attention and MLP run in parallel (Phi-2:
one shortcut per layer), how many parameters the dense model has, and which model name the
official adapter accepts. Everything else (the portable model of each family) lives in the
``configuration_sliced_<key>`` / ``modeling_sliced_<key>`` modules this table names.

Stdlib only: the checkpoint reader, the seed ``.bin`` scanner and the server import it cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Config = Mapping[str, Any]


def _int(config: Config, *keys: str, default: int | None = None) -> int:
    """The first of ``keys`` the config has (a None value counts as absent)."""
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    if default is None:
        raise KeyError(keys[0])
    return default


def _head_dim(config: Config) -> int:
    return _int(config, "head_dim", default=int(config["hidden_size"]) // int(config["num_attention_heads"]))


def _kv_heads(config: Config) -> int:
    return _int(config, "num_key_value_heads", default=int(config["num_attention_heads"]))


# --------------------------------------------------------------------------------------------
# Dense parameter counts (what ``actual_ratio`` is measured against)
# --------------------------------------------------------------------------------------------


def _llama_dense_parameters(config: Config) -> int:
    hidden, vocab, layers = int(config["hidden_size"]), int(config["vocab_size"]), int(config["num_hidden_layers"])
    heads, kv_heads, head_dim = int(config["num_attention_heads"]), _kv_heads(config), _head_dim(config)
    intermediate = int(config["intermediate_size"])
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    if config.get("attention_bias"):
        attention += heads * head_dim + 2 * kv_heads * head_dim + hidden
    mlp = 3 * hidden * intermediate + ((2 * intermediate + hidden) if config.get("mlp_bias") else 0)
    per_layer = attention + mlp + 2 * hidden  # two RMSNorm weights
    lm_head = 0 if config.get("tie_word_embeddings", False) else vocab * hidden
    return vocab * hidden + layers * per_layer + hidden + lm_head


def _opt_dense_parameters(config: Config) -> int:
    hidden, vocab, layers = int(config["hidden_size"]), int(config["vocab_size"]), int(config["num_hidden_layers"])
    ffn = int(config["ffn_dim"])
    bias = bool(config.get("enable_bias", True))
    positions = (int(config.get("max_position_embeddings", 2048)) + 2) * hidden  # OPT's offset of 2
    attention = 4 * hidden * hidden + (4 * hidden if bias else 0)
    mlp = 2 * hidden * ffn + ((ffn + hidden) if bias else 0)
    per_layer = attention + mlp + 4 * hidden  # two LayerNorms, weight and bias
    lm_head = 0 if config.get("tie_word_embeddings", True) else vocab * hidden
    return vocab * hidden + positions + layers * per_layer + 2 * hidden + lm_head


def _phi2_dense_parameters(config: Config) -> int:
    hidden, vocab, layers = int(config["hidden_size"]), int(config["vocab_size"]), int(config["num_hidden_layers"])
    heads, kv_heads, head_dim = int(config["num_attention_heads"]), _kv_heads(config), _head_dim(config)
    intermediate = int(config["intermediate_size"])
    attention = hidden * (heads + 2 * kv_heads) * head_dim + (heads + 2 * kv_heads) * head_dim
    attention += heads * head_dim * hidden + hidden
    mlp = 2 * hidden * intermediate + intermediate + hidden
    per_layer = attention + mlp + 2 * hidden  # one LayerNorm, weight and bias
    lm_head = 0 if config.get("tie_word_embeddings", False) else vocab * hidden
    return vocab * hidden + layers * per_layer + 2 * hidden + lm_head + vocab  # lm_head has a bias


def _phi3_dense_parameters(config: Config) -> int:
    hidden, vocab, layers = int(config["hidden_size"]), int(config["vocab_size"]), int(config["num_hidden_layers"])
    heads, kv_heads, head_dim = int(config["num_attention_heads"]), _kv_heads(config), _head_dim(config)
    intermediate = int(config["intermediate_size"])
    attention = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * intermediate
    per_layer = attention + mlp + 2 * hidden  # two RMSNorm weights
    lm_head = 0 if config.get("tie_word_embeddings", False) else vocab * hidden
    return vocab * hidden + layers * per_layer + hidden + lm_head


# --------------------------------------------------------------------------------------------
# Rows the base config fixes (a checkpoint of another model fails these)
# --------------------------------------------------------------------------------------------


def _attention_rows(config: Config) -> tuple[int, str, int, str]:
    heads, kv_heads, head_dim = int(config["num_attention_heads"]), _kv_heads(config), _head_dim(config)
    return (
        heads * head_dim,
        f"num_attention_heads {heads} x head_dim {head_dim}",
        kv_heads * head_dim,
        f"num_key_value_heads {kv_heads} x head_dim {head_dim}",
    )


def _separate_qkv_rows(intermediate_key: str, factor: int = 1) -> Callable[[Config], dict[str, tuple[int, str]]]:
    def rows(config: Config) -> dict[str, tuple[int, str]]:
        q_rows, q_meaning, kv_rows, kv_meaning = _attention_rows(config)
        return {
            "q": (q_rows, q_meaning),
            "k": (kv_rows, kv_meaning),
            "mlp": (factor * int(config[intermediate_key]), intermediate_key),
        }

    return rows


def _phi3_rows(config: Config) -> dict[str, tuple[int, str]]:
    q_rows, q_meaning, kv_rows, kv_meaning = _attention_rows(config)
    return {
        "q": (q_rows + 2 * kv_rows, f"{q_meaning} + 2 x {kv_meaning} (fused qkv_proj)"),
        "mlp": (2 * int(config["intermediate_size"]), "2 x intermediate_size (fused gate_up_proj)"),
    }


# --------------------------------------------------------------------------------------------
# Model names the official adapters accept
# --------------------------------------------------------------------------------------------


def _llama_official_name(config: Config, stem: str) -> str:
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    is_llama3 = float(rope_theta) >= 500000.0 or int(config.get("vocab_size", 0)) >= 128000
    family = "Meta-Llama-3" if is_llama3 else "Llama-2"
    return f"meta-llama/{stem if stem.startswith(family) else f'{family}-{stem}'}"


def _opt_official_name(config: Config, stem: str) -> str:
    return f"facebook/{stem if stem.startswith('opt') else f'opt-{stem}'}"


def _phi3_official_name(config: Config, stem: str) -> str:
    accepted = "Phi-3-mini-4k-instruct"
    return f"microsoft/{stem if stem.startswith(accepted) else accepted}"


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


LLAMA_STYLE_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
REQUIRED_CONFIG = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")


@dataclass(frozen=True)
class Family:
    """One model family SliceGPT slices, as slicebridge reads, rebuilds and names it.

    Tensor names are relative to ``layers`` (e.g. ``self_attn.q_proj``); a Linear's weight is
    ``[out, in]``, so the widths are the columns of ``attention_inputs[0]`` / ``mlp_inputs[0]``
    and the rows of ``attention_output`` / ``mlp_output``. With ``parallel_blocks`` attention
    and MLP read the same normalised stream and their outputs are summed with one shortcut
    (``attn_shortcut_Q``), so the MLP's input width is the attention's and the attention's
    output width is the MLP's. ``class_name`` names the portable classes (``Sliced<name>Config``,
    ``Sliced<name>ForCausalLM``); ``official_names`` says which names the official adapter accepts.
    """

    key: str
    title: str
    releases: str
    class_name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    official_names: str
    official_name: Callable[[Config, str], str]
    attention_output: str
    mlp_inputs: tuple[str, ...]
    mlp_output: str
    dense_parameters: Callable[[Config], int]
    base_rows: Callable[[Config], dict[str, tuple[int, str]]]
    attention_inputs: tuple[str, ...] = LLAMA_STYLE_ATTENTION
    layers: str = "model.layers"
    embeddings: tuple[str, ...] = ("model.embed_tokens.weight",)
    parallel_blocks: bool = False
    required_config: tuple[str, ...] = REQUIRED_CONFIG

    @property
    def sliced_model_type(self) -> str:
        return f"sliced_{self.key}"

    @property
    def config_module(self) -> str:
        return f"configuration_sliced_{self.key}"

    @property
    def modeling_module(self) -> str:
        return f"modeling_sliced_{self.key}"

    @property
    def config_class(self) -> str:
        return f"Sliced{self.class_name}Config"

    @property
    def model_class(self) -> str:
        return f"Sliced{self.class_name}ForCausalLM"

    @property
    def token_embedding(self) -> str:
        return self.embeddings[0]

    @property
    def shortcuts(self) -> tuple[str, ...]:
        return ("attn_shortcut_Q",) if self.parallel_blocks else ("attn_shortcut_Q", "mlp_shortcut_Q")

    def layer(self, index: int) -> str:
        """The prefix of layer ``index``'s tensors (``model.layers.3.``)."""
        return f"{self.layers}.{index}."

    def layer_weights(self) -> tuple[str, ...]:
        """The tensors every sliced layer has (relative names)."""
        linears = (*self.attention_inputs, self.attention_output, *self.mlp_inputs, self.mlp_output)
        return (*(f"{name}.weight" for name in linears), *self.shortcuts)

    def row_tensors(self) -> dict[str, str]:
        """Which layer tensor carries each row count of ``base_rows`` (relative names)."""
        rows = {"q": f"{self.attention_inputs[0]}.weight", "mlp": f"{self.mlp_inputs[0]}.weight"}
        if len(self.attention_inputs) > 1:
            rows["k"] = f"{self.attention_inputs[1]}.weight"
        return rows


FAMILIES: tuple[Family, ...] = (
    Family(
        key="llama",
        title="Llama",
        releases="Llama-2/Llama-3",
        class_name="Llama",
        model_types=("llama",),
        architectures=("LlamaForCausalLM",),
        official_names="meta-llama/Llama-2… or meta-llama/Meta-Llama-3…",
        official_name=_llama_official_name,
        attention_output="self_attn.o_proj",
        mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
        mlp_output="mlp.down_proj",
        dense_parameters=_llama_dense_parameters,
        base_rows=_separate_qkv_rows("intermediate_size"),
    ),
    Family(
        key="opt",
        title="OPT",
        releases="OPT",
        class_name="OPT",
        model_types=("opt",),
        architectures=("OPTForCausalLM",),
        official_names="facebook/opt…",
        official_name=_opt_official_name,
        attention_output="self_attn.out_proj",
        mlp_inputs=("fc1",),
        mlp_output="fc2",
        dense_parameters=_opt_dense_parameters,
        base_rows=_separate_qkv_rows("ffn_dim"),
        layers="model.decoder.layers",
        embeddings=("model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"),
        required_config=(*REQUIRED_CONFIG[:-1], "ffn_dim"),
    ),
    Family(
        key="phi2",
        title="Phi-2",
        releases="Phi-2",
        class_name="Phi2",
        model_types=("phi",),
        architectures=("PhiForCausalLM",),
        official_names="exactly microsoft/phi-2",
        official_name=lambda config, stem: "microsoft/phi-2",
        attention_output="self_attn.dense",
        mlp_inputs=("mlp.fc1",),
        mlp_output="mlp.fc2",
        dense_parameters=_phi2_dense_parameters,
        base_rows=_separate_qkv_rows("intermediate_size"),
        parallel_blocks=True,
    ),
    Family(
        key="phi3",
        title="Phi-3",
        releases="Phi-3",
        class_name="Phi3",
        model_types=("phi3",),
        architectures=("Phi3ForCausalLM",),
        official_names="microsoft/Phi-3-mini-4k-instruct…",
        official_name=_phi3_official_name,
        attention_output="self_attn.o_proj",
        mlp_inputs=("mlp.gate_up_proj",),
        mlp_output="mlp.down_proj",
        dense_parameters=_phi3_dense_parameters,
        base_rows=_phi3_rows,
        attention_inputs=("self_attn.qkv_proj",),
    ),
)

BY_KEY = {family.key: family for family in FAMILIES}
SUPPORTED = ", ".join(f"{family.releases} ({', '.join(family.architectures)})" for family in FAMILIES)


def family_named(key: str) -> Family:
    """The family with this key (``llama``, ``opt``, ``phi2``, ``phi3``) or sliced model_type."""
    family = BY_KEY.get(key.removeprefix("sliced_"))
    if family is None:
        raise KeyError(f"no model family {key!r}; slicebridge knows {', '.join(BY_KEY)}")
    return family


def family_of_config(config: Config) -> Family | None:
    """The family a dense model's ``config.json`` dict describes (by model_type, else architectures)."""
    model_type = config.get("model_type")
    if model_type is not None:
        return next((family for family in FAMILIES if model_type in family.model_types), None)
    architectures = config.get("architectures") or []
    return next((family for family in FAMILIES if set(architectures) & set(family.architectures)), None)


def family_of_tensors(names: Any) -> Family | None:
    """The family whose layout a sliced state dict's names follow, or None."""
    names = set(names)
    for family in FAMILIES:
        first = family.layer(0)
        if family.token_embedding in names and all(first + weight in names for weight in family.layer_weights()):
            return family
    return None


# How each official adapter decides by a model name alone (its ``accepts`` test), as ``official_names`` says.
_OFFICIAL_NAME_TESTS: dict[str, Callable[[str], bool]] = {
    "llama": lambda name: name.startswith(("meta-llama/Llama-2", "meta-llama/Meta-Llama-3")),
    "opt": lambda name: name.startswith("facebook/opt"),
    "phi2": lambda name: name == "microsoft/phi-2",
    "phi3": lambda name: name.startswith("microsoft/Phi-3"),
}


def family_of_official_name(name: str) -> Family | None:
    """The family whose official adapter accepts the model name ``name``, or None."""
    return next((family for family in FAMILIES if _OFFICIAL_NAME_TESTS[family.key](name)), None)


# Longest file stem kept in an official model name: the staged file names derive from it, and with the
# family prefix and the sparsity they must stay under the file system's 255 bytes.
_OFFICIAL_STEM_CHARS = 120


def official_model_name(family: Family, base_config: Config, stem: str) -> str:
    """A model name the family's official adapter accepts for a checkpoint whose file stem is ``stem``."""
    return family.official_name(base_config, Path(stem).name[:_OFFICIAL_STEM_CHARS])
