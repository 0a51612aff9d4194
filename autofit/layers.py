"""Find a transformer's three parts — embeddings, the stack of identical layers, everything else (head).

One routine serves the profiler (which measures each part), freezing and checkpointing (which change them).
It works structurally, so bert, roberta, electra, xlm-roberta, distilbert, deberta-v2/v3, gpt2 and
llama/qwen-style models all map without a per-family table.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D


class UnmappableModelError(ValueError):
    """The model has no recognisable stack of transformer layers or no input embeddings."""


@dataclass
class ModelLayout:
    """Where the parts of a model are."""

    layers: nn.ModuleList
    """The transformer layers, bottom first (e.g. `bert.encoder.layer`, `model.layers`, `transformer.h`)."""
    layers_path: str
    """Dotted name of `layers` inside the model."""
    embedding_modules: list[nn.Module]
    """Modules that turn ids into the first hidden state (token, position, type embeddings and their norm),
    and modules outside the layers that carry it to layer 0 (ELECTRA's `embeddings_project`)."""
    embedding_params: list[nn.Parameter]
    """Parameters of the embedding modules, deduplicated (a tied LM head shares the token embedding)."""
    head_params: list[nn.Parameter]
    """Every parameter that is neither an embedding nor in a layer: pooler, classifier, final norm, lm head."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The largest ModuleList whose children all share one class (the repeated transformer block)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > sum(p.numel() for p in best[1].parameters()):
            best = (name, module)
    if best is None:
        raise UnmappableModelError(
            f"cannot find a stack of transformer layers in {type(model).__name__}; "
            "autofit supports bert/roberta/electra/xlm-roberta/distilbert/deberta/gpt2/llama-style models"
        )
    return best


def _find_embedding_modules(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    get = getattr(model, "get_input_embeddings", None)
    token_embedding = get() if callable(get) else None
    if token_embedding is None:
        token_embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if token_embedding is None:
        raise UnmappableModelError(f"cannot find input embeddings in {type(model).__name__}")
    # BERT-like models group token/position/type embeddings and their LayerNorm in one `embeddings`
    # module: freeze it whole. Otherwise (gpt2, llama) take every nn.Embedding outside the layers.
    in_layers = {id(m) for m in layers.modules()}
    modules = next(([m] for name, m in model.named_modules()
                    if name.split(".")[-1] == "embeddings" and any(x is token_embedding for x in m.modules())),
                   [])
    grouped = {id(x) for m in modules for x in m.modules()}
    # Embedding tables outside that group feed the layers too (DeBERTa's relative-position table in the
    # encoder): left trainable, they would make every frozen layer record its graph for their gradient.
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Embedding) and id(child) not in in_layers | grouped:
                modules.append(child)
                grouped.add(id(child))
                if name == "rel_embeddings" and isinstance(getattr(parent, "LayerNorm", None), nn.LayerNorm):
                    modules.append(parent.LayerNorm)  # DeBERTa normalises that table before the layers use it
                    grouped.add(id(parent.LayerNorm))
    for module in _embedding_glue(model, layers, grouped):
        modules.append(module)
        grouped |= {id(x) for x in module.modules()}
    return modules


def _embedding_glue(model: nn.Module, layers: nn.ModuleList, taken: set[int]) -> list[nn.Module]:
    """Parameterised modules outside the layers that carry the embeddings up to layer 0.

    ELECTRA's `embeddings_project` and ALBERT's `embedding_hidden_mapping_in` map the embedding width to the
    hidden size after the embeddings module, before the first layer. Counted as head, they stayed trainable
    under frozen embeddings, and every frozen layer then recorded its graph for their gradient. Found by
    name: a module whose own name says embedding ("embed"), that does not contain the layers or the modules
    already taken, and that is not the output embedding (GPT-NeoX's `embed_out` is its LM head)."""
    get = getattr(model, "get_output_embeddings", None)
    output = get() if callable(get) else None
    output_params = {id(p) for p in output.parameters()} if output is not None else set()
    skip = taken | {id(m) for m in layers.modules()}
    found: list[nn.Module] = []
    for name, module in model.named_modules():  # parents come before their children
        if "embed" not in name.split(".")[-1].lower() or module is output:
            continue
        inside = {id(x) for x in module.modules()}
        if inside & skip:
            continue  # taken already, inside a module taken, or a parent of the layers or the embeddings
        params = list(module.parameters())
        if params and not any(id(p) in output_params for p in params):
            found.append(module)
            skip |= inside
    return found


def find_layout(model: nn.Module) -> ModelLayout:
    """Map `model` to embeddings / layers / head, or raise UnmappableModelError with a one-line reason."""
    layers_path, layers = _find_layer_stack(model)
    embedding_modules = _find_embedding_modules(model, layers)
    seen: set[int] = set()
    embedding_params = []
    for module in embedding_modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                embedding_params.append(p)
    seen |= {id(p) for p in layers.parameters()}
    head_params = [p for p in model.parameters() if id(p) not in seen]
    return ModelLayout(layers, layers_path, embedding_modules, embedding_params, head_params)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) features of a linear layer: nn.Linear and its subclasses (bitsandbytes' Linear4bit), or
    GPT-2's Conv1D; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    return None


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linear layers inside the transformer blocks, by qualified name: what 4-bit storage quantizes and
    LoRA adapts."""
    prefix = find_layout(model).layers_path + "."
    return [(name, module) for name, module in model.named_modules()
            if name.startswith(prefix) and linear_shape(module) is not None]


ATTENTION_WORDS = ("attn", "attention")
"""A linear layer belongs to attention when a module on its path is named like this: `self_attn.q_proj`
(llama), `attention.self.query` (bert), `attn.c_attn` (gpt2), `attention.q_lin` (distilbert)."""


def is_attention(name: str) -> bool:
    """Whether the linear layer at qualified `name` sits inside an attention module."""
    return any(word in part.lower() for part in name.split(".")[:-1] for word in ATTENTION_WORDS)


TASK_HEAD_NAMES = ("classifier", "score")
"""The task layer of a classification model (bert's `classifier`, llama's `score`): peft's names for what
trains in full, as a copy, under LoRA (`peft.utils.constants.SEQ_CLS_HEAD_NAMES`)."""


def task_head_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the outermost modules peft trains in full as the task head; none for an LM head. peft
    matches a module whose whole name ends with a head name, so distilbert's `pre_classifier` trains too."""
    found: dict[int, nn.Parameter] = {}
    taken: list[str] = []
    for name, module in model.named_modules():
        if name and name.endswith(TASK_HEAD_NAMES) and not any(name.startswith(t + ".") for t in taken):
            taken.append(name)
            found.update({id(p): p for p in module.parameters()})
    return list(found.values())
