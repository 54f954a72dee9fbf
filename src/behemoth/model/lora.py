"""LoRA adapters (Hu et al., 2021) on a `Transformer`, in the model and nothing else: which
modules take one, the adapter modules, their tensors, and merging them into the weights.

A target projection W gets a trainable low-rank term: y = x W^T + dropout(x) A^T B^T * scale, with
A [rank, in] random (PEFT's kaiming-uniform), B [out, rank] zero, so an adapted model starts equal
to its base. scale = alpha / rank, or alpha / sqrt(rank) with rsLoRA (Kalajdzievski, 2023). Routed
experts are stacks [E, in, out] used as x @ W[e]; each expert gets its own factors A [E, in, rank],
B [E, rank, out], applied to the rows routed to it (`moe.grouped_experts`' low-rank terms), so no
dense [E, in, out] delta is formed while training. Every base weight is frozen.

Targets are named by group ("all", "attention", "mlp" for dense layers' feed-forward, "shared_expert",
"experts", "router") or by a dotted suffix of a site ("q_proj", "experts.down_proj",
"layers.3.self_attn.o_proj"). "all" is every site but the router: the router decides which experts
a token sees, and only moves when asked for by name.

Adapter tensors are named `<site>.lora_A.weight` / `<site>.lora_B.weight` with the site's own name
(`model.layers.0.self_attn.q_proj`, `model.layers.1.feed_forward.experts.gate_up_proj`), PEFT's
names without its `base_model.model.` prefix; a Linear's factors have PEFT's shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from behemoth.errors import ConfigError
from behemoth.model.int8 import FrozenLinear, float_state_dict, is_quantized
from behemoth.model.moe import MLP, Experts, LowRankTerm, MoE
from behemoth.model.transformer import Transformer

GROUPS = ("attention", "mlp", "shared_expert", "experts", "router")
# Where an Experts module keeps the adapter of each stack (moe.Experts' optional attributes)
EXPERT_ADAPTERS = {"gate_up_proj": "lora_gate_up", "down_proj": "lora_down"}


class LoraSettings(Protocol):
    """What `apply_lora` reads (train.config.LoraConfig, or an adapter directory's config)."""

    rank: int
    alpha: float
    targets: list[str]
    use_rslora: bool
    dropout: float


@dataclass(frozen=True)
class Site:
    """A weight that can take an adapter: a Linear (`attr` None) or a stack `attr` of an Experts."""

    name: str  # the module's name, or the stack's parameter name
    group: str
    owner: nn.Module  # the Linear's parent, or the Experts module
    attr: str  # the Linear's attribute in its parent, or the stack's name


@dataclass
class LoraCoverage:
    """What `apply_lora` adapted: for the start-of-run line and the adapter's config."""

    rank: int
    scale: float
    sites: list[str]  # adapted weights' names, in model order
    groups: list[str]  # the group of each site
    trained: int  # parameters that train (the adapters')
    total: int  # parameters of the adapted model, adapters included

    def line(self) -> str:
        """`lora: rank 8, scale 2, 22 modules: attention 16 (q_proj, k_proj, v_proj, o_proj), ...`"""
        parts = []
        for group in GROUPS:
            names = [site.rsplit(".", 1)[1] for site, g in zip(self.sites, self.groups) if g == group]
            if names:
                parts.append(f"{group} {len(names)} ({', '.join(dict.fromkeys(names))})")
        share = 100 * self.trained / max(self.total, 1)
        return (f"lora: rank {self.rank}, scale {self.scale:g}, {len(self.sites)} modules: {'; '.join(parts)}; "
                f"training {self.trained:,} of {self.total:,} parameters ({share:.2f}%), the base frozen")


def scale_of(settings: LoraSettings) -> float:
    return settings.alpha / (math.sqrt(settings.rank) if settings.use_rslora else settings.rank)


class LoRALinear(FrozenLinear):
    """A Linear with a low-rank term. It keeps the base Linear's own weight (and bias) parameters
    under the same names, so the model's state dict still holds every base tensor where it was;
    that weight may be held as int8 (`FrozenLinear.quantize_`)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float,
                 generator: torch.Generator | None = None):
        super().__init__(base)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale
        with torch.no_grad():
            self.lora_A.weight.copy_(_kaiming_uniform(self.lora_A.weight.shape, base.in_features, generator))
            self.lora_B.weight.zero_()

    def lora_term(self, x: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the output for input `x` (in the factors' dtype, as computed)."""
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return self.lora_B(self.lora_A(x)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        return out + self.lora_term(x).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """The adapter as a change of `weight` [out, in] (computed in at least float32)."""
        wide = torch.promote_types(self.lora_A.weight.dtype, torch.float32)
        return (self.lora_B.weight.to(wide) @ self.lora_A.weight.to(wide)) * self.scale

    def plain(self) -> nn.Linear:
        """A plain Linear holding this module's (base, not int8) weight and bias."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = self.weight
        linear.bias = self.bias
        return linear


class ExpertLoRA(nn.Module):
    """Per-expert factors of one expert stack [E, in, out]: lora_A [E, in, rank], lora_B [E, rank, out]."""

    def __init__(self, stack: torch.Tensor, rank: int, scale: float, dropout: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        experts, fan_in, fan_out = stack.shape
        factory = dict(device=stack.device, dtype=stack.dtype)
        self.lora_A = nn.Parameter(_kaiming_uniform((experts, fan_in, rank), fan_in, generator).to(**factory))
        self.lora_B = nn.Parameter(torch.zeros(experts, rank, fan_out, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale

    def bind(self, *_) -> LowRankTerm:
        """The term x @ A[e] @ B[e] * scale for one forward; the factors are unbound once, as the
        expert weights are (indexing each would allocate a full [E, ...] gradient per expert)."""
        a, b = self.lora_A.unbind(0), self.lora_B.unbind(0)

        def term(expert: int, x: torch.Tensor) -> torch.Tensor:
            return (self.lora_dropout(x) @ a[expert] @ b[expert]) * self.scale

        return term

    def delta(self) -> torch.Tensor:
        """The adapter as a change of the stack [E, in, out] (computed in at least float32)."""
        wide = torch.promote_types(self.lora_A.dtype, torch.float32)
        return torch.bmm(self.lora_A.to(wide), self.lora_B.to(wide)) * self.scale


def _kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator | None) -> torch.Tensor:
    """PEFT's A: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), in float32."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


# -- sites and targets ----------------------------------------------------------------------------

def lora_sites(model: Transformer) -> list[Site]:
    """Every weight of `model` that can take an adapter, in layer order."""
    sites = []
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sites.append(Site(f"{prefix}.self_attn.{proj}", "attention", layer.self_attn, proj))
        ff = layer.feed_forward
        if isinstance(ff, MoE):
            sites += _mlp_sites(f"{prefix}.feed_forward.shared_expert", "shared_expert", ff.shared_expert)
            for stack in ("gate_up_proj", "down_proj"):
                sites.append(Site(f"{prefix}.feed_forward.experts.{stack}", "experts", ff.experts, stack))
            sites.append(Site(f"{prefix}.feed_forward.router", "router", ff, "router"))
        elif isinstance(ff, MLP):
            sites += _mlp_sites(f"{prefix}.feed_forward", "mlp", ff)
    return sites


def factor_shapes(site: Site, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of a rank-`rank` adapter's A and B at `site`."""
    weight = getattr(site.owner, site.attr)
    if isinstance(site.owner, Experts):  # a stack [E, in, out]
        experts, fan_in, fan_out = weight.shape
        return (experts, fan_in, rank), (experts, rank, fan_out)
    fan_out, fan_in = weight.weight.shape
    return (rank, fan_in), (fan_out, rank)


def _mlp_sites(prefix: str, group: str, mlp: MLP) -> list[Site]:
    return [Site(f"{prefix}.{proj}", group, mlp, proj) for proj in ("gate_proj", "up_proj", "down_proj")]


def select_sites(sites: list[Site], targets: list[str]) -> list[Site]:
    """The sites any target names; a target naming none is refused (one line naming it)."""
    if not targets:
        raise ConfigError("lora.targets is empty: name what to adapt, e.g. [\"all\"] or [\"attention\"]")
    chosen: dict[str, Site] = {}
    for target in targets:
        matched = [site for site in sites if _matches(site, target)]
        if not matched:
            raise ConfigError(f"lora.targets: {target!r} matches nothing in this model (groups: all, "
                              f"{', '.join(GROUPS)}; or a name's ending such as \"q_proj\" or "
                              "\"experts.down_proj\")")
        chosen.update((site.name, site) for site in matched)
    return [site for site in sites if site.name in chosen]  # in model order


def _matches(site: Site, target: str) -> bool:
    if target == "all":
        return site.group != "router"
    if target in GROUPS:
        return site.group == target
    return site.name == target or site.name.endswith("." + target)


# -- applying, reading, merging -------------------------------------------------------------------

def apply_lora(model: Transformer, settings: LoraSettings, seed: int = 0) -> LoraCoverage:
    """Freeze every weight of `model` and give each targeted site an adapter (in place). Factors are
    drawn from their own generator, so the run's random stream is untouched."""
    if settings.rank <= 0:
        raise ConfigError(f"lora.rank must be positive to apply adapters, got {settings.rank}")
    if adapter_modules(model):
        raise ConfigError("this model already carries LoRA adapters")
    if is_quantized(model):
        raise ConfigError("adapters go on the float base; hold it as int8 after attaching them")
    sites = select_sites(lora_sites(model), settings.targets)
    scale = scale_of(settings)
    generator = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    for site in sites:
        if isinstance(site.owner, Experts):
            stack = getattr(site.owner, site.attr)
            lora = ExpertLoRA(stack, settings.rank, scale, settings.dropout, generator)
            setattr(site.owner, EXPERT_ADAPTERS[site.attr], lora)
        else:
            linear = getattr(site.owner, site.attr)
            setattr(site.owner, site.attr, LoRALinear(linear, settings.rank, scale, settings.dropout, generator))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoraCoverage(settings.rank, scale, [site.name for site in sites], [site.group for site in sites],
                        trained, sum(p.numel() for p in model.parameters()))


def adapter_modules(model: Transformer) -> dict[str, LoRALinear | ExpertLoRA]:
    """The adapters of `model` by site name, in model order (empty: no adapters)."""
    found: dict[str, LoRALinear | ExpertLoRA] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            found[name] = module
        elif isinstance(module, Experts):
            for stack, attr in EXPERT_ADAPTERS.items():
                if getattr(module, attr) is not None:
                    found[f"{name}.{stack}"] = getattr(module, attr)
    return found


def _factors(module: LoRALinear | ExpertLoRA) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(module, LoRALinear):
        return module.lora_A.weight, module.lora_B.weight
    return module.lora_A, module.lora_B


def lora_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapter tensors, named `<site>.lora_A.weight` / `<site>.lora_B.weight` (module notes)."""
    tensors = {}
    for site, module in adapter_modules(model).items():
        a, b = _factors(module)
        tensors[f"{site}.lora_A.weight"] = a
        tensors[f"{site}.lora_B.weight"] = b
    return tensors


@torch.no_grad()
def load_lora_state_dict(model: Transformer, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy adapter tensors into the adapters of `model`: the same names and shapes, or one line
    naming the first that differs."""
    own = lora_state_dict(model)
    for name in own.keys() - tensors.keys():
        raise ConfigError(f"{source}: has no tensor {name!r}, which this model's adapters need")
    for name in tensors.keys() - own.keys():
        raise ConfigError(f"{source}: tensor {name!r} has no place in this model's adapters")
    for name, tensor in own.items():
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise ConfigError(f"{source}: tensor {name!r} has shape {list(tensors[name].shape)}, this model's "
                              f"adapter needs {list(tensor.shape)}")
        tensor.copy_(tensors[name])


def is_adapter_key(name: str) -> bool:
    """Whether a name of the model's own state dict belongs to an adapter, not to the base."""
    return any(part.startswith("lora_") for part in name.split("."))


def _weight_name(site: str, module: LoRALinear | ExpertLoRA) -> str:
    return f"{site}.weight" if isinstance(module, LoRALinear) else site


def merged_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The base's state dict with every adapter added into its weight: what the model computes
    (dropout aside), as a plain model's tensors. Only adapted weights are copied."""
    state = base_state_dict(model)
    with torch.no_grad():
        for site, module in adapter_modules(model).items():
            name = _weight_name(site, module)
            state[name] = (state[name] + module.delta()).to(state[name].dtype)
    return state


def base_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The base's tensors alone, adapters left out (an int8 base dequantised: model.int8)."""
    return {name: t for name, t in float_state_dict(model).items() if not is_adapter_key(name)}


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Add every adapter into its weight and remove the adapters: a plain model again (in place).
    The base must be float (an int8 base merges through `merged_state_dict`)."""
    if is_quantized(model):
        raise ConfigError("merging into an int8 base would round the adapters away; merge into the float "
                          "base (behemoth merge), or take merged_state_dict")
    for site, module in adapter_modules(model).items():
        owner_name, _, attr = site.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(module, LoRALinear):
            module.weight.add_(module.delta().to(module.weight.dtype))
            setattr(owner, attr, module.plain())
        else:
            stack = getattr(owner, attr)
            stack.add_(module.delta().to(stack.dtype))
            setattr(owner, EXPERT_ADAPTERS[attr], None)
    return model



# -- several adapters over one base, each batch row with its own (serving) ------------------------

class RowAdapters:
    """Which adapter each batch row of the next forward uses (0: none, k: `names[k - 1]`): one object
    shared by every bank of a model (`attach_adapter_bank`), set around a forward with `use`."""

    def __init__(self, names: list[str]):
        self.names = names
        self.ids: torch.Tensor | None = None

    @contextmanager
    def use(self, ids: list[int]) -> Iterator[None]:
        self.ids = torch.tensor(ids) if any(ids) else None  # all rows on the base: no adapter work
        try:
            yield
        finally:
            self.ids = None

    def per_token(self, tokens: int) -> torch.Tensor | None:
        """The adapter of each of `tokens` flattened rows (a batch row's over all its positions)."""
        return None if self.ids is None else self.ids.repeat_interleave(tokens // self.ids.numel())


def _per_row(x: torch.Tensor, ids: torch.Tensor, width: int, term: Callable[[int, torch.Tensor], torch.Tensor]
             ) -> torch.Tensor:
    """`term(k, rows)` for the rows of x [N, in] whose adapter is k, for each k in `ids` but 0."""
    out = x.new_zeros(x.shape[0], width)
    for k in ids.unique().tolist():
        if k:
            rows = (ids == k).nonzero().squeeze(1).to(x.device)
            out.index_copy_(0, rows, term(k, x[rows]).to(out.dtype))
    return out


class BankedLinear(FrozenLinear):
    """A Linear with K stacked adapters, a [K + 1, r, in] and b [K + 1, out, r] (scale folded into b,
    slot 0 empty); each row takes its own from `rows`. Keeps the base's weight, as LoRALinear."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, rows: RowAdapters):
        super().__init__(base)
        self.register_buffer("bank_a", a, persistent=False)
        self.register_buffer("bank_b", b, persistent=False)
        self.rows = rows

    def lora_term(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        ids = self.rows.per_token(flat.shape[0])
        if ids is None:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        delta = _per_row(flat.to(self.bank_a.dtype), ids, self.out_features,
                         lambda k, rows: rows @ self.bank_a[k].T @ self.bank_b[k].T)
        return delta.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        return out if self.rows.ids is None else out + self.lora_term(x).to(out.dtype)


class ExpertBank(nn.Module):
    """K stacked adapters of one expert stack: a [K + 1, E, in, r], b [K + 1, E, r, out] (scale in b)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, rows: RowAdapters):
        super().__init__()
        self.register_buffer("bank_a", a, persistent=False)
        self.register_buffer("bank_b", b, persistent=False)
        self.rows = rows

    def bind(self, tokens: int, token_of_slot: torch.Tensor | None, counts: list[int] | None
             ) -> LowRankTerm | None:
        per_token = self.rows.per_token(tokens)
        if per_token is None:
            return None
        # each expert's rows come in its slots' order; a single token is every expert's one row
        per_expert = None if token_of_slot is None else per_token[token_of_slot.cpu()].split(counts)

        def term(expert: int, x: torch.Tensor) -> torch.Tensor:
            ids = per_token if per_expert is None else per_expert[expert]
            return _per_row(x.to(self.bank_a.dtype), ids, self.bank_b.shape[-1],
                            lambda k, rows: rows @ self.bank_a[k, expert] @ self.bank_b[k, expert]).to(x.dtype)

        return term


def carries_adapters(model: Transformer) -> bool:
    """Whether any module of `model` adds an adapter (trained, or banks for serving)."""
    return any(isinstance(m, (LoRALinear, ExpertLoRA, BankedLinear, ExpertBank)) for m in model.modules())


def attach_adapter_bank(model: Transformer, adapters: dict[str, tuple[dict[str, torch.Tensor], float]]
                        ) -> RowAdapters:
    """Give `model` the adapters `{name: (tensors in model.lora's names, scale)}` side by side (in
    place, inference only): every site any adapter touches gets a bank of all of them, zero where an
    adapter leaves the site alone and zero-padded to the largest rank. Returns the row selector."""
    if adapter_modules(model):
        raise ConfigError("this model already carries LoRA adapters; banks go on a plain base")
    rows = RowAdapters(list(adapters))
    device = next(model.parameters()).device
    by_name = {site.name: site for site in lora_sites(model)}
    touched = [site for site in by_name if any(f"{site}.lora_A.weight" in t for t, _ in adapters.values())]
    for site_name in touched:
        site = by_name[site_name]
        factors = [(t.get(f"{site_name}.lora_A.weight"), t.get(f"{site_name}.lora_B.weight"), scale)
                   for t, scale in adapters.values()]
        if isinstance(site.owner, Experts):
            a, b = (bank.to(device) for bank in _stack_factors(factors, rank_dim=-1))
            setattr(site.owner, EXPERT_ADAPTERS[site.attr], ExpertBank(a, b, rows))
        else:
            a, b = (bank.to(device) for bank in _stack_factors(factors, rank_dim=0))
            setattr(site.owner, site.attr, BankedLinear(getattr(site.owner, site.attr), a, b, rows))
    return rows


def _stack_factors(factors: list[tuple[torch.Tensor | None, torch.Tensor | None, float]], rank_dim: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (A, B, scale) per adapter into banks with an empty slot 0, ranks padded with zeros.
    Linears: A [r, in], B [out, r] (rank_dim 0); experts: A [E, in, r], B [E, r, out] (rank_dim -1)."""
    present = [(a, b) for a, b, _ in factors if a is not None]
    rank = max(a.shape[rank_dim] for a, _ in present)
    a_shape, b_shape = list(present[0][0].shape), list(present[0][1].shape)
    a_shape[rank_dim] = rank
    b_rank_dim = -1 if rank_dim == 0 else -2
    b_shape[b_rank_dim] = rank
    bank_a = torch.zeros(len(factors) + 1, *a_shape)
    bank_b = torch.zeros(len(factors) + 1, *b_shape)
    for k, (a, b, scale) in enumerate(factors, start=1):
        if a is not None:
            bank_a[k].narrow(rank_dim, 0, a.shape[rank_dim]).copy_(a)
            bank_b[k].narrow(b_rank_dim, 0, b.shape[b_rank_dim]).copy_(b.float() * scale)
    return bank_a, bank_b
