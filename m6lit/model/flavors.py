"""Named model flavors: the architectures of m6lit's shipped recipes by name, like litgpt's `name_to_config`.

`M6Config.from_name("p2r-giant")` builds one in Python; a recipe selects one with the top-level key
`flavor: p2r-giant` (the CLI makes its values the `model.config` defaults, so any `model.config` key in the YAML or on
the command line still overrides it). Only sizes and switches of the network live here; tokenizer-linked ids
(`vocab_size`, `pad_token_id`, ...) come from the data. The CPU demo's model is not a flavor: its values stay in
configs/demo.yaml, next to the training settings tuned with them.
"""

from __future__ import annotations

from typing import Any

#: flavor name -> M6Config keys (missing keys take M6Config's defaults)
FLAVORS: dict[str, dict[str, Any]] = {
    # configs/p2r-giant.yaml: 24 layers, d_model 1024, MoE on every other layer (8 experts, top-2); the Pseudo Giant
    # runs the 24 layers on 2 shared blocks (cycle: one dense, one MoE)
    "p2r-giant": {"d_model": 1024, "n_heads": 16, "d_ff": 4096, "num_layers": 24, "num_unique_blocks": 2,
                  "sharing_layout": "cycle", "moe_layers": 2, "num_experts": 8, "top_k": 2, "expert_d_ff": 2048,
                  "image_size": 224, "patch_size": 16, "max_seq_len": 512},
    # configs/m6-10t.yaml: M6-10T-like, 48 layers of 10,240 experts (k-top-1 prototype routing), all on one shared
    # block as the Pseudo Giant
    "m6-10t": {"d_model": 1024, "n_heads": 16, "d_ff": 4096, "num_layers": 48, "num_unique_blocks": 1,
               "sharing_layout": "cycle", "moe_layers": "all", "num_experts": 10240, "top_k": 4, "router": "prototype",
               "expert_d_ff": 6656, "capacity_factor": 1.25, "image_size": 224, "patch_size": 16, "max_seq_len": 512},
    # configs/offload-12b.yaml: a 12.07 B dense model, every block's activations checkpointed
    "offload-12b": {"d_model": 5120, "n_heads": 40, "d_ff": 13824, "num_layers": 38, "moe_layers": "none",
                    "image_size": 224, "patch_size": 16, "max_seq_len": 2048, "activation_checkpointing": "all"},
}


def flavor_values(name: str) -> dict[str, Any]:
    """A copy of flavor `name`'s M6Config keys; an unknown name is a `ValueError` listing the known ones."""
    if name not in FLAVORS:
        raise ValueError(f"flavor={name!r}: no such model flavor; known flavors are {sorted(FLAVORS)}")
    return {k: list(v) if isinstance(v, list) else v for k, v in FLAVORS[name].items()}


__all__ = ["FLAVORS", "flavor_values"]
