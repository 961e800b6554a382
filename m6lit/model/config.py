"""M6Config: every size and switch of the model in one validated dataclass.

The config is plain data (it round-trips through a dict for YAML and checkpoints) and its field names are the
words the rest of m6lit uses. `validate()` fails with a `ValueError` that names the key and the rule it broke.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional, Union

SHARING_LAYOUTS = ("cycle", "stack")
ROUTERS = ("topk", "prototype")
EXPERT_OVERRIDE_KEYS = ("block", "num_experts", "top_k", "expert_d_ff", "segments")


EXPERT_OPS = ("segment", "split", "merge")
MERGE_HOW = ("auto", "concat", "average")


class ExpertShape(NamedTuple):
    """The expert shape of one MoE block, and the one statement of which shapes are valid and what an expert op
    makes of them. `segments`: how many segment pieces each of the original experts is now cut into (1 unless
    `segment_experts` ran), so that `merge_experts` can undo a segmentation exactly.

    `check` (used by `M6Config.validate` and `MoELayer`), `after` (used by the ops in `m6lit.model.experts` and by
    `ExpertSplitMerge`'s dry run) and `merge_how` raise `ValueError` with the same messages wherever they run; the
    callers prefix them with where (a config key, a layer name, a schedule entry).
    """

    num_experts: int
    top_k: int
    expert_d_ff: int
    segments: int = 1

    def check(self, router: str = "topk") -> "ExpertShape":
        """Raise ValueError unless an MoE layer with `router` ("topk" | "prototype") can have this shape."""
        for key, value in self._asdict().items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if router == "prototype" and self.num_experts % self.top_k:
            raise ValueError(f"router 'prototype' needs num_experts={self.num_experts} divisible by "
                             f"top_k={self.top_k} (k groups of experts)")
        if self.top_k % self.segments or self.num_experts % self.segments:
            raise ValueError(f"segments={self.segments} must divide top_k={self.top_k} and num_experts="
                             f"{self.num_experts} (every piece of a chosen expert is chosen)")
        return self

    def merge_how(self, factor: int, how: str = "auto") -> str:
        """"concat" or "average": what a merge by `factor` does ("auto" concatenates segment pieces when the
        experts' `segments` count is divisible by `factor`, else averages split copies)."""
        if how not in MERGE_HOW:
            raise ValueError(f"how={how!r} must be one of {MERGE_HOW}")
        if how == "auto":
            return "concat" if self.segments % factor == 0 else "average"
        return how

    def after(self, op: str, factor: int, router: str = "topk", how: str = "auto") -> "ExpertShape":
        """The shape `op` ("segment" | "split" | "merge") by `factor` leaves, or ValueError saying why it cannot run.

        segment: each expert's hidden units cut into `factor` experts, top_k × factor. split: `factor` copies of each
        expert, top_k unchanged. merge: "concat" joins segment pieces back (top_k / factor), "average" averages the
        copies a split made (top_k unchanged; whole experts within each routing group).
        """
        if op not in EXPERT_OPS:
            raise ValueError(f"op={op!r} must be one of {EXPERT_OPS}")
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ValueError(f"factor={factor!r} must be an integer >= 2")
        n = factor
        if op == "segment":
            if self.expert_d_ff % n:
                raise ValueError(f"expert_d_ff={self.expert_d_ff} is not divisible by factor={n}")
            return self._replace(num_experts=self.num_experts * n, top_k=self.top_k * n,
                                 expert_d_ff=self.expert_d_ff // n, segments=self.segments * n)
        if op == "split":
            return self._replace(num_experts=self.num_experts * n)
        if self.merge_how(n, how) == "concat":
            if self.segments % n:
                raise ValueError(f"how='concat' joins segment pieces, but the experts are {self.segments} "
                                 f"piece(s) each — not divisible by factor={n}")
            return self._replace(num_experts=self.num_experts // n, top_k=self.top_k // n,
                                 expert_d_ff=self.expert_d_ff * n, segments=self.segments // n)
        if self.top_k * n > self.num_experts:
            raise ValueError(f"top_k={self.top_k} × factor={n} exceeds num_experts={self.num_experts}; the merged "
                             f"layer would have fewer experts than each token picks")
        per_group = self.num_experts // (self.top_k if router == "prototype" else 1)
        unit = self.segments if router == "topk" else 1
        if per_group % (n * unit):
            whole = f" whole experts of {self.segments} segment pieces" if unit > 1 else ""
            raise ValueError(f"{per_group} experts per routing group cannot be merged in groups of factor={n}"
                             f"{whole}")
        return self._replace(num_experts=self.num_experts // n)


@dataclass
class M6Config:
    """Sizes, sharing, MoE and image settings of an M6 model.

    Image generation: with `image_codebook_size` K > 0 the last K + 2 ids of `vocab_size` are begin-of-image,
    end-of-image and the K image codes (see `m6lit.model.image_vocab`); a generated image is an
    `image_grid_size` x `image_grid_size` grid of codes in raster order. K = 0: text only.
    Sharing: `num_layers` logical layers run on `num_unique_blocks` physical blocks (default: one per layer);
    `sharing_layout` "cycle" maps layer i to block i mod K, "stack" to block i div (L/K).
    MoE: `moe_layers` is "all", "none", an int n (every n-th layer: n-1, 2n-1, ...) or an explicit list of layers.
    `router` "topk" is softmax over all experts then top-k (renormalised when `router_norm_topk`); "prototype" is
    M6-T's k-top-1: the experts form `top_k` groups of `num_experts / top_k` and each token takes the top-1 of every
    group, gated by that group's softmax probability. `capacity_factor` None means dropless.
    Expert split/merge: `expert_overrides` lists the physical blocks whose expert shape differs from the global
    `num_experts` / `top_k` / `expert_d_ff`, one `{block, num_experts, top_k, expert_d_ff, segments}` entry each
    (missing keys take the global value). `m6lit.model.experts` writes them; they are structural state, so a
    checkpoint rebuilds the right shapes, and `delink` gives each cloned block its source block's entry.

    Attributes:
        vocab_size: embedding rows (the CLI sets it from the tokenizer).
        d_model: hidden size.
        n_heads: attention heads (divide d_model).
        d_ff: hidden size of the dense feed-forward layers.
        num_layers: logical transformer layers.
        num_unique_blocks: physical blocks the layers share (Pseudo Giant); null = one per layer (real model).
        sharing_layout: how layers map to shared blocks: "cycle" (i mod K) or "stack" (i div L/K).
        moe_layers: which layers are MoE: "all", "none", every n-th (an int), or a list of layers.
        num_experts: experts per MoE layer.
        top_k: experts each token is routed to.
        router: "topk" (softmax then top-k) or "prototype" (M6-T k-top-1 over top_k expert groups).
        router_norm_topk: renormalise the top-k gate weights to sum to 1.
        expert_d_ff: hidden size of each expert; null = d_ff.
        capacity_factor: expert capacity as a multiple of the even share; null = dropless.
        balance_loss_coef: weight of the load-balancing auxiliary loss.
        z_loss_coef: weight of the router z-loss.
        image_size: square image side in pixels.
        patch_size: image patch side in pixels (image_size must be a multiple).
        in_channels: image channels.
        patch_centered: embed each image patch's channel means apart from the rest of the patch (the same linear
            map, parameterised so that a uniform background does not swamp the objects: see ImagePatchEmbed).
        max_seq_len: longest sequence (image patches + text tokens).
        qk_norm: RMS-normalise each attention head's queries and keys (learned gains) before the scores.
        dropout: dropout probability.
        tie_embeddings: share the token embedding with the LM head.
        norm_eps: epsilon of the RMS norms.
        init_std: standard deviation of the weight initialisation.
        pad_token_id: padding id (the CLI sets it from the tokenizer).
        eos_token_id: end-of-sequence id (the CLI sets it from the tokenizer).
        expert_overrides: per-block expert shapes written by expert split/merge (structural state; not set by hand).
        activation_checkpointing: null (off), "all" or a list of logical layers whose block activations are
            recomputed in backward instead of saved (logical layers, so a delink or expert split keeps it).
        image_codebook_size: image-code vocabulary size (0 = no image generation; set from data.image_tokenizer).
        image_grid_size: side of the image-code grid (codes per image = its square).
    """

    vocab_size: int = 384
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    num_layers: int = 4
    num_unique_blocks: Optional[int] = None
    sharing_layout: Literal["cycle", "stack"] = "cycle"
    moe_layers: Union[Literal["all", "none"], int, list[int]] = "none"
    num_experts: int = 8
    top_k: int = 2
    router: Literal["topk", "prototype"] = "topk"
    router_norm_topk: bool = True
    expert_d_ff: Optional[int] = None
    capacity_factor: Optional[float] = None
    balance_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    image_size: int = 32
    patch_size: int = 8
    in_channels: int = 3
    patch_centered: bool = False
    max_seq_len: int = 256
    qk_norm: bool = False
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    pad_token_id: int = 0
    eos_token_id: int = 1
    expert_overrides: list[dict[str, int]] | None = None
    activation_checkpointing: Union[Literal["all"], list[int], None] = None
    image_codebook_size: int = 0
    image_grid_size: int = 0

    def __post_init__(self) -> None:
        if self.num_unique_blocks is None:
            self.num_unique_blocks = self.num_layers
        if isinstance(self.moe_layers, tuple):
            self.moe_layers = list(self.moe_layers)
        if isinstance(self.activation_checkpointing, tuple):
            self.activation_checkpointing = list(self.activation_checkpointing)

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def expert_hidden(self) -> int:
        return self.expert_d_ff if self.expert_d_ff is not None else self.d_ff

    def expert_shape(self, block: int) -> ExpertShape:
        """Expert shape of physical block `block`: the global one, with that block's override applied."""
        shape = ExpertShape(self.num_experts, self.top_k, self.expert_hidden)
        for entry in self.expert_overrides or []:
            if entry.get("block") == block:
                return shape._replace(**{k: v for k, v in entry.items() if k != "block"})
        return shape

    def set_expert_shape(self, block: int, shape: ExpertShape) -> None:
        """Record block `block`'s expert shape (an override entry; none when it equals the global shape)."""
        entries = [dict(e) for e in self.expert_overrides or [] if e.get("block") != block]
        if shape != ExpertShape(self.num_experts, self.top_k, self.expert_hidden):
            entries.append({"block": block, **shape._asdict()})
        entries.sort(key=lambda e: e["block"])
        self.expert_overrides = entries or None

    def is_moe_layer(self, layer: int) -> bool:
        """Whether logical layer `layer` uses an MoE FFN."""
        spec = self.moe_layers
        if spec == "all":
            return True
        if spec == "none":
            return False
        if isinstance(spec, int):
            return layer % spec == spec - 1
        return layer in spec

    def is_checkpointed_layer(self, layer: int) -> bool:
        """Whether logical layer `layer` recomputes its block's activations in backward (`activation_checkpointing`)."""
        spec = self.activation_checkpointing
        return spec == "all" or (isinstance(spec, list) and layer in spec)

    def layer_to_block(self) -> list[int]:
        """Physical block used by each logical layer, per `sharing_layout`."""
        from .sharing import layer_to_block

        return layer_to_block(self.num_layers, int(self.num_unique_blocks), self.sharing_layout)

    def block_is_moe(self) -> list[bool]:
        """Whether each physical block is an MoE block (all layers using a block agree; `validate` checks it)."""
        kinds: list[bool] = [False] * int(self.num_unique_blocks)
        for layer, block in enumerate(self.layer_to_block()):
            kinds[block] = self.is_moe_layer(layer)
        return kinds

    # ------------------------------------------------------------------ validation
    def validate(self) -> "M6Config":
        """Check every rule; raise ValueError naming the offending key. Returns self for chaining."""

        def need(ok: bool, key: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"M6Config.{key}={getattr(self, key)!r}: {rule}")

        for key in ("vocab_size", "d_model", "n_heads", "d_ff", "num_layers", "num_experts", "top_k",
                    "image_size", "patch_size", "in_channels", "max_seq_len"):
            value = getattr(self, key)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
                 "must be a positive integer")
        need(self.d_model % self.n_heads == 0, "d_model", f"must be divisible by n_heads={self.n_heads}")
        need(self.head_dim % 2 == 0, "n_heads", "d_model / n_heads must be even")
        K = self.num_unique_blocks
        need(isinstance(K, int) and 1 <= K <= self.num_layers, "num_unique_blocks",
             f"must be an integer in [1, num_layers={self.num_layers}]")
        need(self.sharing_layout in SHARING_LAYOUTS, "sharing_layout", f"must be one of {SHARING_LAYOUTS}")
        if self.sharing_layout == "stack":
            need(self.num_layers % K == 0, "num_unique_blocks",
                 f"layout 'stack' needs num_layers={self.num_layers} divisible by num_unique_blocks")
        spec = self.moe_layers
        if isinstance(spec, str):
            need(spec in ("all", "none"), "moe_layers", "must be 'all', 'none', an int n (every n-th layer) "
                 "or a list of layer indices")
        elif isinstance(spec, bool) or not isinstance(spec, (int, list)):
            need(False, "moe_layers", "must be 'all', 'none', an int n or a list of layer indices")
        elif isinstance(spec, int):
            need(1 <= spec <= self.num_layers, "moe_layers", f"every-n must be in [1, num_layers={self.num_layers}]")
        else:
            need(all(isinstance(i, int) and 0 <= i < self.num_layers for i in spec) and len(set(spec)) == len(spec),
                 "moe_layers", f"list entries must be distinct layer indices in [0, {self.num_layers})")
        need(self.router in ROUTERS, "router", f"must be one of {ROUTERS}")
        need(self.top_k <= self.num_experts, "top_k", f"must be <= num_experts={self.num_experts}")
        if self.router == "prototype":
            need(self.num_experts % self.top_k == 0, "num_experts",
                 f"router 'prototype' needs num_experts divisible by top_k={self.top_k} (k groups of experts)")
        if self.expert_d_ff is not None:
            need(isinstance(self.expert_d_ff, int) and self.expert_d_ff > 0, "expert_d_ff",
                 "must be a positive integer or None (= d_ff)")
        if self.capacity_factor is not None:
            need(self.capacity_factor > 0, "capacity_factor", "must be > 0, or None for dropless routing")
        need(self.balance_loss_coef >= 0, "balance_loss_coef", "must be >= 0")
        need(self.z_loss_coef >= 0, "z_loss_coef", "must be >= 0")
        need(isinstance(self.patch_centered, bool), "patch_centered", "must be true or false")
        need(isinstance(self.qk_norm, bool), "qk_norm", "must be true or false")
        need(self.image_size % self.patch_size == 0, "image_size",
             f"must be divisible by patch_size={self.patch_size}")
        need(self.max_seq_len > self.num_patches, "max_seq_len",
             f"must exceed the {self.num_patches} image patches so text fits")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.norm_eps > 0, "norm_eps", "must be > 0")
        need(self.init_std > 0, "init_std", "must be > 0")
        need(0 <= self.pad_token_id < self.vocab_size, "pad_token_id", "must be a token id < vocab_size")
        need(0 <= self.eos_token_id < self.vocab_size, "eos_token_id", "must be a token id < vocab_size")
        self._validate_image_vocab()
        self._validate_expert_overrides()
        self._validate_activation_checkpointing()
        kinds: dict[int, tuple[bool, int]] = {}
        for layer, block in enumerate(self.layer_to_block()):
            moe = self.is_moe_layer(layer)
            if block in kinds and kinds[block][0] != moe:
                other = kinds[block][1]
                need(False, "moe_layers",
                     f"layers {other} and {layer} share block {block} (sharing_layout={self.sharing_layout!r}, "
                     f"num_unique_blocks={K}) but only one of them is MoE; a block is either dense or MoE — "
                     f"choose a sharing that keeps MoE and dense layers on separate blocks (e.g. 'cycle' with an "
                     f"even num_unique_blocks for moe_layers=2)")
            kinds.setdefault(block, (moe, layer))
        return self

    def _validate_activation_checkpointing(self) -> None:
        spec = self.activation_checkpointing
        where = f"M6Config.activation_checkpointing={spec!r}"
        if spec is None or spec == "all":
            return
        if not isinstance(spec, list):
            raise ValueError(f"{where}: must be None (off), 'all' or a list of logical layer indices")
        seen: set[int] = set()
        for i, layer in enumerate(spec):
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
                raise ValueError(f"{where}: entry {i} ({layer!r}) is not a logical layer index in [0, num_layers="
                                 f"{self.num_layers})")
            if layer in seen:
                raise ValueError(f"{where}: layer {layer} is listed more than once")
            seen.add(layer)

    def _validate_image_vocab(self) -> None:
        k, g = self.image_codebook_size, self.image_grid_size
        for key, value in (("image_codebook_size", k), ("image_grid_size", g)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"M6Config.{key}={value!r}: must be a non-negative integer (0 = no image codes)")
        if (k == 0) != (g == 0):
            raise ValueError(f"M6Config.image_codebook_size={k}, image_grid_size={g}: set both (image generation) "
                             f"or neither")
        if k and self.vocab_size <= k + 2:
            raise ValueError(f"M6Config.vocab_size={self.vocab_size}: must exceed image_codebook_size + 2 = {k + 2} "
                             f"(text ids, then begin/end-of-image, then the codes)")
        if k and self.max_seq_len <= g * g + 2:
            raise ValueError(f"M6Config.max_seq_len={self.max_seq_len}: must exceed the {g * g} image codes + "
                             f"begin/end-of-image so a prompt fits")
        if k and max(self.pad_token_id, self.eos_token_id) >= self.vocab_size - k - 2:
            raise ValueError(f"M6Config.pad_token_id/eos_token_id must be text ids (< {self.vocab_size - k - 2}, "
                             f"below the image ids)")

    def _validate_expert_overrides(self) -> None:
        overrides = self.expert_overrides
        if overrides is None:
            return
        if not isinstance(overrides, list):
            raise ValueError(  # noqa: TRY004 - validate() reports every rule as a ValueError
                f"M6Config.expert_overrides={overrides!r}: must be a list of per-block entries or None")
        moe_blocks = self.block_is_moe()
        seen: set[int] = set()
        for i, entry in enumerate(overrides):
            where = f"M6Config.expert_overrides[{i}]={entry!r}"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: must be a dict with keys from {EXPERT_OVERRIDE_KEYS}")  # noqa: TRY004
            unknown = sorted(set(entry) - set(EXPERT_OVERRIDE_KEYS))
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {EXPERT_OVERRIDE_KEYS}")
            for key, value in entry.items():
                low = 0 if key == "block" else 1
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    raise ValueError(f"{where}: {key} must be a {'non-negative' if key == 'block' else 'positive'} "
                                     f"integer")
            block = entry.get("block")
            if block is None or not block < len(moe_blocks):
                raise ValueError(f"{where}: block must be a physical block index in [0, num_unique_blocks="
                                 f"{len(moe_blocks)})")
            if not moe_blocks[block]:
                raise ValueError(f"{where}: block {block} is a dense block (see moe_layers); only MoE blocks have "
                                 f"experts")
            if block in seen:
                raise ValueError(f"{where}: block {block} has more than one entry")
            seen.add(block)
            try:
                self.expert_shape(block).check(self.router)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None

    # ------------------------------------------------------------------ dict round trip
    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy (lists and scalars only) for YAML and checkpoints."""
        out = dataclasses.asdict(self)
        if isinstance(out["moe_layers"], tuple):
            out["moe_layers"] = list(out["moe_layers"])
        if isinstance(out["activation_checkpointing"], tuple):
            out["activation_checkpointing"] = list(out["activation_checkpointing"])
        if out["expert_overrides"] is not None:
            out["expert_overrides"] = [dict(e) for e in out["expert_overrides"]]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "M6Config":
        """Inverse of `to_dict`; unknown keys are an error naming them (never silently dropped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"M6Config: unknown key(s) {unknown}; valid keys are {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "M6Config":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes).validate()

    @classmethod
    def from_name(cls, name: str, **changes: Any) -> "M6Config":
        """The named flavor `name` (`m6lit.model.flavors`) with `changes` applied, validated."""
        from .flavors import flavor_values

        return cls.from_dict({**flavor_values(name), **changes}).validate()
