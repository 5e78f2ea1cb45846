"""armpipe's small pi0 / pi0.5 sizes, registered with LeRobot 0.6.1: the ONE place armpipe changes LeRobot's code.

Why: LeRobot 0.6.1 builds pi0 and pi0.5 from sizes written into its modules, not its config. The Gemma widths come
from ``get_gemma_config(variant)`` (only ``gemma_300m`` and ``gemma_2b``, and ``PI0Config`` / ``PI05Config``'s
``__post_init__`` refuses any other name), and ``PaliGemmaWithExpertModel.__init__`` writes the SigLIP So400m tower
and the 257152-token vocabulary as literals. The smallest buildable pi0 has ~1.8 B parameters, too big for CPU
tests. ``register(policy_type)`` adds the variants named in ``VARIANTS`` to that type's modules:

- ``get_gemma_config`` returns a registered variant's widths (LeRobot's own ``GemmaConfig`` class); any other name
  goes to LeRobot's function unchanged.
- the config's ``__post_init__`` accepts a registered name (LeRobot's checks run on the rest as before).
- ``PaliGemmaWithExpertModel.__init__``, when its VLM variant is registered, builds the PaliGemma model and the
  action expert with the variant's vocabulary and vision tower (``PaliGemmaExtras``); for a stock variant it is
  LeRobot's ``__init__`` untouched.

A stock checkpoint (``gemma_2b`` / ``gemma_300m``) therefore loads exactly as LeRobot loads it, with or without the
registration (tests/test_vla.py compares the modules LeRobot builds for the default sizes before and after). A
checkpoint built with a registered variant names it in its ``config.json`` (``paligemma_variant``,
``action_expert_variant``), so plain LeRobot refuses it at the config (``Invalid paligemma_variant:
armpipe_tiny``) rather than building something else. Who registers: the checkpoint maker before it builds one and
the policy node before it reads a checkpoint's config (``nodes/policy/checkpoint.py``); both call ``register`` with
the checkpoint's policy type. The sizes of a registered variant are part of the checkpoints built with it: change
them only together with a new name.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import threading
from dataclasses import dataclass
from typing import Any

# Policy types whose sizes this module registers, and their LeRobot modules and config classes.
PI_TYPES = {"pi0": ("lerobot.policies.pi0.modeling_pi0", "lerobot.policies.pi0.configuration_pi0", "PI0Config"),
            "pi05": ("lerobot.policies.pi05.modeling_pi05", "lerobot.policies.pi05.configuration_pi05", "PI05Config")}


@dataclass(frozen=True)
class GemmaSize:
    """The fields of LeRobot's ``GemmaConfig`` (openpi's gemma.Config)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class PaliGemmaExtras:
    """What LeRobot writes as literals for the PaliGemma side: the vocabulary (text model and action expert) and
    the SigLIP vision tower (its input size stays the config's ``image_resolution``; its projection is the VLM
    width, as LeRobot's 2048 is gemma_2b's)."""

    vocab_size: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    patch_size: int


TINY_VLM = "armpipe_tiny"
TINY_EXPERT = "armpipe_tiny_expert"
# The VLM and the action expert attend together layer by layer: same depth, heads and head_dim (as LeRobot's
# gemma_2b and gemma_300m), only the width and MLP differ.
VARIANTS: dict[str, GemmaSize] = {
    TINY_VLM: GemmaSize(width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=16),
    TINY_EXPERT: GemmaSize(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16),
}
# Registered VLM variants (paligemma_variant) with their vocabulary and vision tower.
VLM_EXTRAS: dict[str, PaliGemmaExtras] = {
    TINY_VLM: PaliGemmaExtras(vocab_size=512, vision_hidden_size=32, vision_intermediate_size=64, vision_layers=1,
                              vision_heads=2, patch_size=16),
}

_lock = threading.Lock()
_build_lock = threading.Lock()
_registered: set[str] = set()
_building: contextvars.ContextVar[PaliGemmaExtras | None] = contextvars.ContextVar("armpipe_pi_extras", default=None)


def register(policy_type: str) -> bool:
    """Add ``VARIANTS`` to LeRobot's ``policy_type`` modules (pi0, pi05; idempotent). False for any other type."""
    if policy_type not in PI_TYPES:
        return False
    with _lock:
        if policy_type in _registered:
            return True
        modeling_name, configuration_name, config_class_name = PI_TYPES[policy_type]
        modeling = importlib.import_module(modeling_name)
        config_class = getattr(importlib.import_module(configuration_name), config_class_name)
        _register_gemma_sizes(modeling)
        _register_config_names(config_class)
        _register_paligemma_extras(modeling)
        _registered.add(policy_type)
    return True


def _register_gemma_sizes(modeling: Any) -> None:
    stock = modeling.get_gemma_config

    @functools.wraps(stock)
    def get_gemma_config(variant: str) -> Any:
        size = VARIANTS.get(variant)
        if size is None:
            return stock(variant)
        config = modeling.GemmaConfig(width=size.width, depth=size.depth, mlp_dim=size.mlp_dim,
                                      num_heads=size.num_heads, num_kv_heads=size.num_kv_heads,
                                      head_dim=size.head_dim)
        config.armpipe_variant = variant
        return config

    modeling.get_gemma_config = get_gemma_config


def _register_config_names(config_class: Any) -> None:
    stock = config_class.__post_init__

    @functools.wraps(stock)
    def __post_init__(self: Any) -> None:
        names = (self.paligemma_variant, self.action_expert_variant)
        if not any(name in VARIANTS for name in names):
            stock(self)
            return
        # LeRobot's checks (a literal list of its two names) run on a stock name standing in for ours.
        self.paligemma_variant, self.action_expert_variant = (
            "gemma_300m" if name in VARIANTS else name for name in names)
        try:
            stock(self)
        finally:
            self.paligemma_variant, self.action_expert_variant = names

    config_class.__post_init__ = __post_init__


def _register_paligemma_extras(modeling: Any) -> None:
    wrapper = modeling.PaliGemmaWithExpertModel
    stock_init = wrapper.__init__
    stock_vlm = modeling.PaliGemmaForConditionalGenerationWithPiGemma
    stock_expert = modeling.PiGemmaForCausalLM

    def sized_vlm(config: Any) -> Any:
        extras = _building.get()
        if extras is not None:
            config._vocab_size = extras.vocab_size
            config.image_token_index = extras.vocab_size
            config.text_config.vocab_size = extras.vocab_size
            vision = config.vision_config
            vision.hidden_size = extras.vision_hidden_size
            vision.intermediate_size = extras.vision_intermediate_size
            vision.num_hidden_layers = extras.vision_layers
            vision.num_attention_heads = extras.vision_heads
            vision.patch_size = extras.patch_size
            vision.projection_dim = config.text_config.hidden_size
            config.text_config.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
        return stock_vlm(config=config)

    def sized_expert(config: Any) -> Any:
        extras = _building.get()
        if extras is not None:
            config.vocab_size = extras.vocab_size
        return stock_expert(config=config)

    @functools.wraps(stock_init)
    def __init__(self: Any, vlm_config: Any, action_expert_config: Any, *args: Any, **kwargs: Any) -> None:
        extras = VLM_EXTRAS.get(getattr(vlm_config, "armpipe_variant", ""))
        if extras is None:
            stock_init(self, vlm_config, action_expert_config, *args, **kwargs)
            return
        # LeRobot's __init__ builds both models through these two module names: for the duration of this one
        # build they size the configs first. Only in this thread (the context variable): a stock build in another
        # thread meanwhile gets LeRobot's classes with its config as it is.
        with _build_lock:
            token = _building.set(extras)
            modeling.PaliGemmaForConditionalGenerationWithPiGemma = sized_vlm
            modeling.PiGemmaForCausalLM = sized_expert
            try:
                stock_init(self, vlm_config, action_expert_config, *args, **kwargs)
            finally:
                modeling.PaliGemmaForConditionalGenerationWithPiGemma = stock_vlm
                modeling.PiGemmaForCausalLM = stock_expert
                _building.reset(token)

    wrapper.__init__ = __init__
