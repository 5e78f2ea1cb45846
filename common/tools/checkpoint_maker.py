"""Build a real LeRobot checkpoint (untrained weights) for a deployment's task layout.

The result is the ``pretrained_model/`` directory ``save_pretrained`` and ``lerobot-train`` write:
``config.json`` + ``model.safetensors`` from the policy, and the pre-/post-processor pipelines
(``policy_preprocessor.json``, ``policy_postprocessor.json`` and their ``*.safetensors`` state with the
normalisation stats). Next to them ``armpipe.json`` labels the weights as untrained and records the
task, joint names and fps, so the policy node can show "untrained" wherever the policy is named.

Normalisation stats come from a local LeRobot v3 dataset's ``meta/stats.json`` when one is given;
otherwise they are synthesised: state and action from the config's joint limits (min/max = limits,
mean = mid-range, std = range / 4) and images from the ImageNet channel statistics.

Sizes:
- ``tiny``: small enough for CPU tests and the demo (DiffusionPolicy: images resized to 60x80 inside the
  model, a 2-level 32/64 UNet, horizon 16, 8 actions per chunk, DDIM with 10 steps, n_obs_steps 2;
  ACT: 64-wide transformer, chunk of 20; SmolVLA: a 4-layer 64-wide SmolVLM with a 1-layer vision tower on
  64x64 images, chunk of 50, 4 flow-matching steps; pi0 / pi0.5: the Gemma variants ``armpipe_tiny`` (64 wide) and
  ``armpipe_tiny_expert`` (32 wide), 2 layers, a 1-layer 32-wide SigLIP on 64x64 images and a 512-token vocabulary,
  chunk of 50, 4 flow-matching steps, float32). LeRobot 0.6.1 hard-codes pi0 / pi0.5's sizes, so the small ones
  are registered with it by ``common.lerobot_pi_sizes`` (the one place; the policy node registers them too before
  it loads a checkpoint); the checkpoint's ``config.json`` names the variants, so plain LeRobot refuses it.
- ``default``: LeRobot's default configuration for the policy type (the benchmark configuration),
  only without pretrained weights (ImageNet backbones, the VLM), which would need a download.

Language policies (SmolVLA, pi0, pi0.5) also need a tokenizer (and SmolVLA its VLM's config and processor),
which LeRobot would fetch from the hub. The maker makes them here, offline: a byte-level BPE tokenizer trained
with the ``tokenizers`` library on a few task sentences (with the special tokens the model looks up), saved
with ``transformers`` under ``pretrained_model/vlm/`` (SmolVLA: with its SmolVLM config and processor) or
``pretrained_model/tokenizer/`` (pi0, pi0.5), and named by absolute path in ``config.json``
(``vlm_model_name``) and in the preprocessor's tokenizer step, which is where LeRobot's own loader reads them.

CLI::

    python -m common.tools.checkpoint_maker --config configs/lift.yaml --policy-type diffusion --size tiny \\
        --output checkpoints/lift-tiny [--dataset data/lift-demo] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from common.config import DeploymentConfig, load_config
from common.lerobot_guard import guard_lerobot_imports
from common.wire.contract import ACTION_KEY, STATE_KEY, image_key

log = logging.getLogger(__name__)

POLICY_TYPES = ("diffusion", "act", "smolvla", "pi0", "pi05")
LANGUAGE_TYPES = ("smolvla", "pi0", "pi05")
# SmolVLM2-500M-Video-Instruct's published architecture (its config.json), written out so that a default-size
# SmolVLA is built without a download; the weights are random either way.
SMOLVLM2_500M = {
    "text_config": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
                    "num_key_value_heads": 5, "head_dim": 64, "vocab_size": 49280, "rms_norm_eps": 1e-5,
                    "rope_theta": 100000.0, "max_position_embeddings": 8192},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "image_size": 512, "patch_size": 16},
    "scale_factor": 4,
}
TINY_SMOLVLM = {
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 64, "patch_size": 16},
    "scale_factor": 2,
}
# The PaliGemma tokenizer LeRobot 0.6.1's pi0 / pi0.5 processors name (and load when they are built).
PALIGEMMA_TOKENIZER = "google/paligemma-3b-pt-224"
# Special tokens the SmolVLM processor and LeRobot's SmolVLA look up on the tokenizer (fake_image_token_id, ...).
SMOLVLM_SPECIAL = {"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
                   "image_token": "<image>", "video_token": "<video>", "end_of_utterance_token": "<end_of_utterance>"}
TOKENIZER_CORPUS = (
    "pick up the red cube and put it in the box", "stack the blue cube on the green cube",
    "sort the parts: left arm takes the red ones, right arm the blue ones", "lift the cube", "place it on top",
    "grasp the object and move it to the left", "open the gripper, close the gripper, move up, move down",
)
SIZES = ("tiny", "default")
SIDECAR_NAME = "armpipe.json"

# ImageNet channel statistics (RGB, pixel values in [0, 1]): a sensible prior for camera images when no
# dataset stats exist, and what LeRobot's pretrained ResNet backbones expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def policy_features(config: DeploymentConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """LeRobot input/output features for the task layout: one VISUAL feature per camera (3, H, W)."""
    guard_lerobot_imports()
    from lerobot.configs.types import FeatureType, PolicyFeature

    inputs: dict[str, Any] = {
        image_key(name): PolicyFeature(type=FeatureType.VISUAL, shape=(3, cam.height, cam.width))
        for name, cam in config.cameras.items()
    }
    inputs[STATE_KEY] = PolicyFeature(type=FeatureType.STATE, shape=(len(config.state_names()),))
    outputs = {ACTION_KEY: PolicyFeature(type=FeatureType.ACTION, shape=(len(config.action_names()),))}
    return inputs, outputs


def synthesised_stats(config: DeploymentConfig) -> dict[str, dict[str, np.ndarray]]:
    """Stats from joint limits (state, action) and ImageNet channel stats (images)."""
    lower = np.asarray(config.lower_limits(), dtype=np.float32)
    upper = np.asarray(config.upper_limits(), dtype=np.float32)
    joint_stats = {
        "min": lower,
        "max": upper,
        "mean": (lower + upper) / 2,
        "std": (upper - lower) / 4,
        "count": np.asarray([1], dtype=np.int64),
    }
    stats: dict[str, dict[str, np.ndarray]] = {
        STATE_KEY: {k: v.copy() for k, v in joint_stats.items()},
        ACTION_KEY: {k: v.copy() for k, v in joint_stats.items()},
    }
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    for name in config.cameras:
        stats[image_key(name)] = {
            "min": np.zeros((3, 1, 1), np.float32),
            "max": np.ones((3, 1, 1), np.float32),
            "mean": mean.copy(),
            "std": std.copy(),
            "count": np.asarray([1], dtype=np.int64),
        }
    return stats


def dataset_stats(config: DeploymentConfig, dataset_root: Path) -> dict[str, dict[str, np.ndarray]]:
    """The stats of a local LeRobot v3 dataset, checked to cover every feature the policy uses."""
    from lerobot.datasets.io_utils import load_stats

    stats = load_stats(Path(dataset_root))
    if stats is None:
        raise FileNotFoundError(f"--dataset: no meta/stats.json under {dataset_root}")
    needed = {STATE_KEY: len(config.state_names()), ACTION_KEY: len(config.action_names())}
    for key, size in needed.items():
        if key not in stats:
            raise ValueError(f"--dataset: meta/stats.json has no `{key}` (has {sorted(stats)})")
        got = np.asarray(stats[key]["mean"]).reshape(-1).shape[0]
        if got != size:
            raise ValueError(f"--dataset: `{key}` has {got} values in meta/stats.json, the config needs {size}")
    for name in config.cameras:
        if image_key(name) not in stats:
            raise ValueError(f"--dataset: meta/stats.json has no `{image_key(name)}` for camera '{name}' "
                             f"(has {sorted(stats)})")
    # Keep only what the policy uses, and only the stat kinds LeRobot's normaliser understands.
    keys = [*needed, *(image_key(name) for name in config.cameras)]
    return {key: {kind: np.asarray(value) for kind, value in stats[key].items()} for key in keys}


def make_tokenizer(folder: Path, vocab_size: int, special: dict[str, str] | None = None) -> Any:
    """A byte-level BPE tokenizer trained on a few task sentences (any UTF-8 text encodes), saved to ``folder``
    with ``transformers`` (tokenizer.json + tokenizer_config.json); ``special`` names extra special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra = dict(special or {})
    base = ["<pad>", "<unk>", "<bos>", "<eos>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*base, *extra.values()],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", extra_special_tokens=extra)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def make_smolvlm(folder: Path, size: str) -> None:
    """SmolVLA's VLM, as ``vlm_model_name`` names it: SmolVLM config, processor and tokenizer in ``folder``."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    arch = TINY_SMOLVLM if size == "tiny" else SMOLVLM2_500M
    tokenizer = make_tokenizer(folder, 512 if size == "tiny" else 2048, SMOLVLM_SPECIAL)
    text = {**arch["text_config"], "pad_token_id": tokenizer.pad_token_id}  # type: ignore[dict-item]
    vision: dict[str, Any] = dict(arch["vision_config"])  # type: ignore[call-overload]
    vlm = SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=arch["scale_factor"],
                        image_token_id=tokenizer.convert_tokens_to_ids(SMOLVLM_SPECIAL["image_token"]))
    vlm.save_pretrained(folder)
    image_size = int(vision["image_size"])
    image_seq_len = (image_size // int(vision["patch_size"])) ** 2 // int(arch["scale_factor"]) ** 2  # type: ignore[call-overload]
    processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(max_image_size={"longest_edge": image_size}),
                                 tokenizer=tokenizer, video_processor=SmolVLMVideoProcessor(),
                                 image_seq_len=image_seq_len)
    processor.save_pretrained(folder)


@contextmanager
def hub_name_resolves_to(name: str, folder: Path) -> Iterator[None]:
    """While LeRobot 0.6.1 builds pi0 / pi0.5 processors: their tokenizer step names the PaliGemma tokenizer by
    hub id and loads it at once, and transformers loads a name that is an existing relative directory from
    there. So the processors are built in a scratch working directory where ``<org>/<name>`` links to the
    local tokenizer; afterwards the step names the local folder (``local_tokenizer_steps``)."""
    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="armpipe-hub-name-") as scratch:
        link = Path(scratch) / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(folder.resolve(), target_is_directory=True)
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(previous)


def local_tokenizer_steps(preprocessor: Any, folder: Path) -> None:
    """Make the preprocessor's tokenizer step name the local folder (saved in policy_preprocessor.json)."""
    for step in preprocessor.steps:
        if type(step).__name__ == "TokenizerProcessorStep":
            step.tokenizer_name = str(folder.resolve())


def make_policy_config(config: DeploymentConfig, policy_type: str, size: str, chunk: int = 0,
                       assets: Path | None = None) -> Any:
    """The LeRobot policy config for this layout; never asks for downloadable backbone weights.

    ``chunk`` > 0 sets the rows per reply of a tiny policy (DiffusionPolicy's ``n_action_steps`` with a
    horizon to match, ACT's chunk). A chunk must outlast the policy's round trip, or every row is already
    past when it arrives: on a 2-core CPU the demo uses 48 rows (1.6 s at 30 fps).
    """
    inputs, outputs = policy_features(config)
    common: dict[str, Any] = {
        "input_features": inputs,
        "output_features": outputs,
        "device": "cpu",
        "push_to_hub": False,
        "pretrained_backbone_weights": None,
    }
    if policy_type == "diffusion":
        from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

        if size == "tiny":
            n_action_steps = chunk or 8
            # The UNet halves the horizon once per down block: keep it a multiple of 4 covering the rows.
            horizon = max(16, -(-(n_action_steps + 1) // 4) * 4)
            return DiffusionConfig(
                **common,
                n_obs_steps=2,
                horizon=horizon,
                n_action_steps=n_action_steps,
                # Resize inside the model: full 480x640 frames on the wire, a 60x80 ResNet input.
                resize_shape=(60, 80),
                crop_ratio=1.0,
                spatial_softmax_num_keypoints=16,
                down_dims=(32, 64),
                kernel_size=3,
                diffusion_step_embed_dim=32,
                noise_scheduler_type="DDIM",
                num_inference_steps=10,
            )
        return DiffusionConfig(**common)
    if policy_type == "act":
        from lerobot.policies.act.configuration_act import ACTConfig

        if size == "tiny":
            return ACTConfig(
                **common,
                chunk_size=chunk or 20,
                n_action_steps=chunk or 20,
                dim_model=64,
                n_heads=2,
                dim_feedforward=128,
                n_encoder_layers=1,
                n_decoder_layers=1,
                n_vae_encoder_layers=1,
                latent_dim=8,
            )
        return ACTConfig(**common)
    language: dict[str, Any] = {key: value for key, value in common.items() if key != "pretrained_backbone_weights"}
    if chunk:
        language.update(chunk_size=chunk, n_action_steps=chunk)
    if policy_type == "smolvla":
        from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

        vlm = {"vlm_model_name": str(assets.resolve()) if assets else "", "load_vlm_weights": False}
        if size == "tiny":
            return SmolVLAConfig(**language, **vlm, resize_imgs_with_padding=(64, 64), num_vlm_layers=4,
                                 num_expert_layers=2, self_attn_every_n_layers=2, expert_width_multiplier=0.5,
                                 num_steps=4)
        return SmolVLAConfig(**language, **vlm)
    if policy_type in ("pi0", "pi05"):
        from common import lerobot_pi_sizes

        lerobot_pi_sizes.register(policy_type)  # before the config: its __post_init__ checks the variant names
        if size == "tiny":
            # The variants common.lerobot_pi_sizes registers; float32 (bf16 matmuls are slow on a CPU).
            sizes: dict[str, Any] = {"paligemma_variant": lerobot_pi_sizes.TINY_VLM,
                                     "action_expert_variant": lerobot_pi_sizes.TINY_EXPERT,
                                     "image_resolution": (64, 64), "num_inference_steps": 4, "dtype": "float32"}
        else:
            # bf16 weights (LeRobot's dtype option for these models; the vision tower and norms stay fp32): a 4 B
            # model is 8 GB on disk instead of 16.
            sizes = {"dtype": "bfloat16"}
        if policy_type == "pi0":
            from lerobot.policies.pi0.configuration_pi0 import PI0Config

            return PI0Config(**language, **sizes)
        from lerobot.policies.pi05.configuration_pi05 import PI05Config

        return PI05Config(**language, **sizes)
    raise ValueError(f"--policy-type: expected one of {list(POLICY_TYPES)}, got {policy_type!r}")


def build_checkpoint(config: DeploymentConfig, output: Path, *, policy_type: str = "diffusion", size: str = "tiny",
                     dataset_root: Path | None = None, seed: int = 0, chunk: int = 0, device: str = "cpu") -> Path:
    """Write ``<output>/pretrained_model`` (a LeRobot checkpoint with untrained weights) and return it.
    ``device``: where the random weights are made (``cuda`` builds a 4 B-parameter pi0 in seconds, not minutes);
    the checkpoint is the same."""
    guard_lerobot_imports()
    import torch
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    if policy_type not in POLICY_TYPES:
        raise ValueError(f"policy_type: expected one of {list(POLICY_TYPES)}, got {policy_type!r}")
    if size not in SIZES:
        raise ValueError(f"size: expected one of {list(SIZES)}, got {size!r}")
    if not config.cameras:
        raise ValueError("cameras: the checkpoint maker needs at least one camera in the config")
    shapes = {tuple(shape) for shape in config.image_shapes().values()}
    if len(shapes) > 1:
        # LeRobot's DiffusionPolicy requires every camera to have the same shape.
        raise ValueError(f"cameras: expected one image shape for all cameras, got {sorted(shapes)}")

    torch.manual_seed(seed)
    if chunk and size != "tiny":
        raise ValueError("chunk: only tiny checkpoints take a chunk length; default ones keep LeRobot's")
    target = Path(output) / "pretrained_model"
    target.mkdir(parents=True, exist_ok=True)
    assets: Path | None = None
    if policy_type == "smolvla":
        assets = target / "vlm"
        make_smolvlm(assets, size)
    elif policy_type in LANGUAGE_TYPES:
        from common.lerobot_pi_sizes import TINY_VLM, VLM_EXTRAS

        assets = target / "tokenizer"
        make_tokenizer(assets, VLM_EXTRAS[TINY_VLM].vocab_size if size == "tiny" else 2048)
    policy_config = make_policy_config(config, policy_type, size, chunk, assets)
    if dataset_root is not None:
        stats = dataset_stats(config, Path(dataset_root))
        stats_source = f"dataset {Path(dataset_root).resolve()}"
    else:
        stats = synthesised_stats(config)
        stats_source = "synthesised from the config's joint limits (images: ImageNet channel stats)"
    if policy_type == "pi05":  # pi0.5 normalises state and action by quantiles
        for key in (STATE_KEY, ACTION_KEY):
            stats[key].setdefault("q01", stats[key]["min"].copy())
            stats[key].setdefault("q99", stats[key]["max"].copy())
    with torch.device(device):
        policy = get_policy_class(policy_type)(policy_config)
    if policy_type in ("pi0", "pi05") and assets is not None:
        with hub_name_resolves_to(PALIGEMMA_TOKENIZER, assets):
            preprocessor, postprocessor = make_pre_post_processors(policy_config, dataset_stats=stats)
        local_tokenizer_steps(preprocessor, assets)
    else:
        preprocessor, postprocessor = make_pre_post_processors(policy_config, dataset_stats=stats)

    policy.save_pretrained(target)
    preprocessor.save_pretrained(target)
    postprocessor.save_pretrained(target)
    sidecar = {
        "untrained": True,
        "task": config.task,
        "policy_type": policy_type,
        "size": size,
        "seed": seed,
        "state_names": config.state_names(),
        "action_names": config.action_names(),
        "cameras": {name: shape for name, shape in config.image_shapes().items()},
        "fps": config.fps,
        "stats_source": stats_source,
    }
    (target / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2))
    log.info("wrote %s %s checkpoint (untrained) for task %s to %s; stats %s", size, policy_type, config.task,
             target, stats_source)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a LeRobot checkpoint with untrained weights for a task layout.")
    parser.add_argument("--config", required=True, help="deployment YAML, e.g. configs/lift.yaml")
    parser.add_argument("--policy-type", default="diffusion", choices=POLICY_TYPES)
    parser.add_argument("--size", default="tiny", choices=SIZES)
    parser.add_argument("--output", required=True, help="folder; the checkpoint goes to <output>/pretrained_model")
    parser.add_argument("--dataset", default=None, help="local LeRobot v3 dataset root whose meta/stats.json to use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the random weights are made (cuda: fast for pi0)")
    parser.add_argument("--chunk", type=int, default=0,
                        help="tiny only: rows per reply (default 8 diffusion, 20 ACT, 50 SmolVLA)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s checkpoint_maker: %(message)s")
    config = load_config(args.config)
    path = build_checkpoint(config, Path(args.output), policy_type=args.policy_type, size=args.size,
                            dataset_root=Path(args.dataset) if args.dataset else None, seed=args.seed,
                            chunk=args.chunk, device=args.device)
    log.info("checkpoint: %s", path)


if __name__ == "__main__":
    main()
