"""Named model flavors: each builds a valid config of the size its recipe states, changes apply over it, the
registry cannot be changed through a returned copy, and an unknown name lists the known ones."""

from __future__ import annotations

import pytest
import torch

from m6lit.model import M6Config, M6Model
from m6lit.model.flavors import FLAVORS, flavor_values


def _count(config: M6Config) -> int:
    with torch.device("meta"):
        return M6Model(config).num_parameters(unique=True)


@pytest.mark.parametrize("name,real_params", [("p2r-giant", (0.85e9, 0.87e9)), ("m6-10t", (10.0e12, 10.1e12)),
                                              ("offload-12b", (12.0e9, 12.1e9))])
def test_each_flavor_is_a_valid_model_of_its_recipes_size(name: str, real_params: tuple[float, float]) -> None:
    config = M6Config.from_name(name)
    assert {k: getattr(config, k) for k in FLAVORS[name]} == FLAVORS[name]
    low, high = real_params
    assert low < _count(config.replace(num_unique_blocks=config.num_layers)) < high


def test_changes_apply_over_the_flavor_and_the_registry_stays_as_it_is() -> None:
    config = M6Config.from_name("p2r-giant", num_unique_blocks=None, d_model=512, n_heads=8)
    assert (config.num_unique_blocks, config.d_model, config.num_layers) == (24, 512, 24)
    values = flavor_values("offload-12b")
    values["num_layers"] = 1
    assert FLAVORS["offload-12b"]["num_layers"] == 38
    with pytest.raises(ValueError, match=r"flavor='demo': no such model flavor; known flavors are \['m6-10t'"):
        M6Config.from_name("demo")
    with pytest.raises(ValueError, match="num_unique_blocks"):
        M6Config.from_name("p2r-giant", num_unique_blocks=5)
