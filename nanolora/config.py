"""ModelConfig: one dataclass for every supported family, read from HF `config.json`; and
LoRAConfig, what LoRA adds to a model (and what a PEFT adapter_config.json records).

Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 are the same decoder; they differ only in
the fields below (q/k/v bias, per-head q/k RMSNorm, sliding window, tied head, rope scaling,
and Gemma's norms, scaled embeddings, soft-capping and per-layer attention kinds). A fork for
a new architecture adds its fields here and their use in model.py.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
GEMMA = ("gemma2", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # bias on q, k and v (Qwen2 always; Llama/Qwen3 when attention_bias)
    o_bias: bool = False  # bias on o as well (Llama/Qwen3 with attention_bias; never Qwen2/Mistral)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each query and key head
    sliding_window: int | None = None  # Mistral: a token sees at most this many (itself included)
    tie_word_embeddings: bool = False
    # --- Gemma 2 / 3
    hidden_act: str = "silu"  # the MLP's gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    norm_plus_one: bool = False  # RMSNorm weights are stored as w - 1: norms multiply by (1 + w)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size), rounded to the model dtype
    sandwich_norms: bool = False  # also a norm after attention and after the MLP, before the residual add
    query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5 instead of head_dim ** -0.5
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) before softmax
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)
    layer_types: list[str] | None = None  # per layer "sliding_attention" | "full_attention"; None: all
    # the same (sliding when sliding_window is set)
    rope_local_theta: float | None = None  # Gemma 3: sliding layers' RoPE base (no scaling); None: rope_theta
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hf_config: dict = field(default_factory=dict, repr=False)  # the config.json as read, for export

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Build from the dict in an HF config.json; `source` names it in errors."""
        if not isinstance(hf, dict):
            raise ValueError(f"{source}: expected a JSON object of model settings, got a {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        check = _Checker(hf, source)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            check.positive_int(key, required=True)
        for key in ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window"):
            check.positive_int(key)
        for key in ("tie_word_embeddings", "attention_bias", "use_sliding_window", "mlp_bias"):
            check.boolean(key)
        for key in ("rope_scaling", "rope_parameters", "quantization_config"):
            check.object(key)
        check.number("rms_norm_eps", low=0.0)
        check.number("rope_theta", low=0.0, low_inclusive=False)
        gemma = model_type in GEMMA
        if model_type == "gemma3_text" and hf.get("use_bidirectional_attention"):
            raise ValueError(f"{source}: use_bidirectional_attention=true is not supported (supported: false)")
        n_heads = hf["num_attention_heads"]
        if hf.get("head_dim") is None and hf["hidden_size"] % n_heads:
            raise ValueError(f"{source}: hidden_size ({hf['hidden_size']}) is not a multiple of "
                             f"num_attention_heads ({n_heads}), and head_dim is not given")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        n_kv_heads = hf.get("num_key_value_heads") or n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"{source}: num_attention_heads ({n_heads}) must be a multiple of "
                             f"num_key_value_heads ({n_kv_heads})")

        # transformers >= 5 moves rope_theta / rope_scaling into `rope_parameters`, per layer
        # type for Gemma 3 ({"full_attention": {...}, "sliding_attention": {...}}); before it,
        # Gemma 3 had rope_theta for global layers and rope_local_base_freq for sliding ones.
        rope_params = dict(hf.get("rope_parameters") or {})
        local_params = {}
        if "full_attention" in rope_params:
            local_params = dict(rope_params.get("sliding_attention") or {})
            rope_params = dict(rope_params["full_attention"] or {})
        if local_params.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_parameters.sliding_attention rope_type "
                             f"{local_params['rope_type']!r} is not supported (supported: default)")
        rope_scaling = hf.get("rope_scaling") or None
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        default_theta = 1_000_000.0 if model_type == "gemma3_text" else 10000.0
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:
            _Checker(rope_params, f"{source}: rope_parameters").number("rope_theta", low=0.0, low_inclusive=False)
            rope_theta = rope_params.get("rope_theta") or default_theta
        rope_local_theta = None
        if model_type == "gemma3_text":
            rope_local_theta = float(local_params.get("rope_theta") or hf.get("rope_local_base_freq") or 10000.0)
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"{source}: rope_scaling type {rope_type!r} is not supported "
                                 f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
            needed = {"linear": ["factor"],
                      "llama3": ["factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings"]}.get(rope_type, [])
            scaling_check = _Checker(rope_scaling, f"{source}: rope_scaling")
            for key in needed:
                if key not in rope_scaling:
                    raise ValueError(f"{source}: rope_scaling of type {rope_type!r} needs {key!r}")
                scaling_check.number(key, low=0.0, low_inclusive=False)
            if rope_type == "llama3" and rope_scaling["low_freq_factor"] == rope_scaling["high_freq_factor"]:
                raise ValueError(f"{source}: rope_scaling low_freq_factor and high_freq_factor must differ")
            rope_scaling = None if rope_type == "default" else {**rope_scaling, "rope_type": rope_type}

        # Mistral has `sliding_window`; Qwen2/3 carry one too but only use it when
        # `use_sliding_window` is true (and then only above max_window_layers: unsupported).
        sliding_window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3"):
            if hf.get("use_sliding_window"):
                raise ValueError(f"{source}: use_sliding_window=true is not supported for "
                                 f"{model_type} (supported: false)")
            sliding_window = None
        # Gemma names it hidden_activation (older configs: hidden_act); its GeGLU is tanh-approximated
        act_key = "hidden_activation" if "hidden_activation" in hf else "hidden_act"
        act = hf.get(act_key) or ("gelu_pytorch_tanh" if gemma else "silu")
        hidden_act = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
        if hidden_act is None:
            raise ValueError(f"{source}: {act_key} {act!r} is not supported (supported: silu, gelu_pytorch_tanh)")
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported (supported: false)")

        layer_types = None
        if gemma:  # HF's defaults: Gemma 2 alternates sliding/full; Gemma 3 has one full layer in 6
            sliding_window = hf.get("sliding_window", 4096)
            pattern = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", 6)
            layer_types = hf.get("layer_types") or [
                "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(hf["num_hidden_layers"])]
            if len(layer_types) != hf["num_hidden_layers"] or \
                    not set(layer_types) <= {"sliding_attention", "full_attention"}:
                raise ValueError(f"{source}: layer_types must list 'sliding_attention' or 'full_attention' "
                                 f"for each of the {hf['num_hidden_layers']} layers, got {layer_types!r}")
            if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
                raise ValueError(f"{source}: sliding_window must be a positive integer, got {sliding_window!r}")

        def gemma_value(key, default):  # HF's default where config.json leaves the key out
            return hf.get(key, default) if gemma else None

        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(_given(hf.get("rms_norm_eps"), 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=_given(hf.get("max_position_embeddings"), 2048),
            attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias")),
            o_bias=model_type in ("llama", "qwen3", *GEMMA) and bool(hf.get("attention_bias")),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            sliding_window=sliding_window,
            # transformers leaves tie_word_embeddings out of config.json when it is the default:
            # True for Gemma
            tie_word_embeddings=_given(hf.get("tie_word_embeddings"), gemma),
            hidden_act=hidden_act,
            norm_plus_one=gemma,
            scale_embeddings=gemma,
            sandwich_norms=gemma,
            query_pre_attn_scalar=gemma_value("query_pre_attn_scalar", 256),
            # Gemma 3's attention ignores attn_logit_softcapping (as transformers does)
            attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0) if model_type == "gemma2" else None,
            final_logit_softcapping=gemma_value("final_logit_softcapping",
                                                30.0 if model_type == "gemma2" else None),
            layer_types=layer_types,
            rope_local_theta=rope_local_theta,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            hf_config=dict(hf),
        )

    @classmethod
    def from_json(cls, path) -> "ModelConfig":
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json (expected an HF checkpoint folder)") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except IsADirectoryError:
            raise ValueError(f"{path}: expected a file, found a folder") from None
        return cls.from_hf(hf, source=str(path))


@dataclass
class LoRAConfig:
    """The LoRA on a model: which projections (full leaf names, e.g. ["q_proj", "v_proj"]),
    rank r, alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA) and dropout on the
    LoRA input. lora.attach_lora builds one; peft.py writes and reads it as adapter_config.json."""
    targets: list[str]
    r: int = 16
    alpha: float = 16
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")


def _given(value, default):
    return default if value is None else value


class _Checker:
    """Type and range checks of config.json values, each error naming the file and the key.
    A missing or null key passes unless `required` (the dataclass default applies)."""

    def __init__(self, values: dict, source: str):
        self.values, self.source = values, source

    def _fail(self, key, expected):
        raise ValueError(f"{self.source}: {key} must be {expected}, got {self.values.get(key)!r}")

    def positive_int(self, key, required=False):
        value = self.values.get(key)
        if value is None and not required:
            return
        # bool is an int in Python; `true` where a size belongs is a mistake, not 1
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            self._fail(key, "a positive integer")

    def boolean(self, key):
        if self.values.get(key) is not None and not isinstance(self.values[key], bool):
            self._fail(key, "true or false")  # "no" is a truthy string

    def object(self, key):
        if self.values.get(key) is not None and not isinstance(self.values[key], dict):
            self._fail(key, "a JSON object or null")

    def number(self, key, low, low_inclusive=True):
        value = self.values.get(key)
        if value is None:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (value == low and not low_inclusive):
            self._fail(key, f"a finite number {'>=' if low_inclusive else '>'} {low:g}")
