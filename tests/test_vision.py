"""CLIP backbone and few-shot vision data: exact attention split, zero-shot head, sampler, configs."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import OmegaConf, open_dict

from partial_lora.adapters import count_parameters
from partial_lora.backbones import build_backbone
from partial_lora.backbones.clip import SplitAttention, class_text_embeddings, split_attention
from partial_lora.cli import expand_ranges
from partial_lora.data import VisionDataModule, few_shot_split
from partial_lora.errors import DataError
from partial_lora.pipeline import run
from partial_lora.settings import adapt
from tests.conftest import compose_config

TORCHVISION_CLASSES = {"pets": "OxfordIIITPet", "flowers": "Flowers102", "cifar10": "CIFAR10", "cifar100": "CIFAR100",
                       "fer2013": "FER2013", "gtsrb": "GTSRB", "fgvc": "FGVCAircraft", "imagenet": "ImageNet"}
VISION_DATASETS = list(TORCHVISION_CLASSES)
TEST_SPLITS = {"pets": {"split": "test"}, "flowers": {"split": "test"}, "cifar10": {"train": False},
               "cifar100": {"train": False}, "fer2013": {"split": "test"}, "gtsrb": {"split": "test"},
               "fgvc": {"split": "test"}, "imagenet": {"split": "val"}}


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_matches_multihead_attention(batch_first):
    torch.manual_seed(0)
    fused = torch.nn.MultiheadAttention(48, 4, batch_first=batch_first).eval()
    split = SplitAttention(fused).eval()
    x = torch.randn(3, 7, 48) if batch_first else torch.randn(7, 3, 48)
    mask = torch.triu(torch.full((7, 7), float("-inf")), diagonal=1)
    for attn_mask in (None, mask):
        expected = fused(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        assert torch.allclose(split(x, x, x, need_weights=False, attn_mask=attn_mask)[0], expected, atol=1e-5)


def tiny_clip_spec() -> dict:
    return OmegaConf.to_container(compose_config("backbone=clip_tiny").backbone.model_config, resolve=True)


def test_head_starts_as_clip_zero_shot_classifier():
    names = ["cat", "dog", "ship"]
    torch.manual_seed(0)
    built = build_backbone(compose_config("backbone=clip_tiny").backbone, 3, names)
    torch.manual_seed(0)
    clip = open_clip.CLIP(**tiny_clip_spec()).eval()
    text = class_text_embeddings(clip, open_clip.get_tokenizer("ViT-B-16"), names)
    text = text / text.norm(dim=-1, keepdim=True)
    assert torch.allclose(built.model.head.weight, text, atol=1e-6)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        features = clip.encode_image(images, normalize=True)
        zero_shot = clip.logit_scale.exp() * features @ text.T
        assert torch.allclose(built.model.eval()(images).logits, zero_shot, atol=1e-4)
    assert split_attention(clip.visual) == 2  # the tiny model has two visual blocks


def test_vit_b16_lora_rank4_count_matches_the_paper():
    cfg = compose_config("backbone=clip_vit_b16", "backbone.pretrained=null", "rank=4", "dataset=cifar10")
    built = build_backbone(cfg.backbone, 2, ["cat", "dog"])
    counts = count_parameters(adapt(built.model, cfg), built.head_modules)
    assert counts.adapter == 12 * (4 * 4 * (768 + 768) + 2 * 4 * (768 + 3072)) == 663_552  # paper: 0.67M
    assert counts.head == 2 * 512


def test_few_shot_split_draws_k_per_class_disjoint_and_reproducibly():
    labels = np.repeat(np.arange(5), 40)
    train, val = few_shot_split(labels, 16, seed=3)
    assert len(train) == len(val) == 80 and not set(train) & set(val)
    assert np.all(np.bincount(labels[train]) == 16) and np.all(np.bincount(labels[val]) == 16)
    assert few_shot_split(labels, 16, seed=3) == (train, val)
    assert few_shot_split(labels, 16, seed=4)[0] != train
    with pytest.raises(DataError, match="fewer than the 42 needed"):
        few_shot_split(labels, 21, seed=0)


@pytest.mark.parametrize("name", VISION_DATASETS)
def test_torchvision_dataset_configs_fit_their_class(name):
    cfg = compose_config(f"dataset={name}", "backbone=clip_tiny").dataset
    cls = get_class(cfg.torchvision_class)
    assert cls.__name__ == TORCHVISION_CLASSES[name]
    test_args = OmegaConf.to_container(cfg.test_args, resolve=True)
    assert {key: test_args[key] for key in TEST_SPLITS[name]} == TEST_SPLITS[name]
    for split in ("train", "val", "test"):
        if cfg.get(f"{split}_args") is not None:
            inspect.signature(cls).bind(root="unused", **OmegaConf.to_container(cfg[f"{split}_args"], resolve=True))
    if cfg.class_names is not None:
        assert len(cfg.class_names) == cfg.num_labels
    assert cfg.shots == (6 if name == "flowers" else 16)


def test_missing_vision_data_names_the_folder(tmp_path: Path):
    cfg = compose_config("dataset=pets", "backbone=clip_tiny").dataset
    module = VisionDataModule(cfg, 32, str(tmp_path), batch_size=4, data_seed=0)
    with pytest.raises(DataError, match=r"could not be read from .*vision/pets.*download=true"):
        module.class_names()
    with pytest.raises(DataError, match="needs a data directory"):
        VisionDataModule(cfg, 32, None, batch_size=4, data_seed=0).class_names()


def test_fgvc_seed_sweep_composes_twenty_jobs():
    overrides = expand_ranges(["dataset=fgvc", "backbone=clip_vit_b16", "method=partial_lora", "importance=svd",
                               "rank=16", "seed=0..19"])
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), max_batch_size=None)[0]
    assert len(jobs) == 20
    seeds = []
    for job in jobs:
        cfg = compose_config(*job)
        assert cfg.dataset.name == "fgvc" and cfg.method.mask.mode == "partial" and cfg.rank == 16
        seeds.append(cfg.seed)
    assert seeds == list(range(20))


@pytest.fixture
def fewshot_npz_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, per_class in (("train", 4), ("val", 4), ("test", 6)):
        arrays[f"{split}_x"] = rng.integers(0, 255, (3 * per_class, 32, 32, 3), dtype=np.uint8)
        arrays[f"{split}_y"] = np.repeat(np.arange(3), per_class)
    arrays["classes"] = np.array(["cat", "dog", "ship"])
    (tmp_path / "vision").mkdir()
    np.savez_compressed(tmp_path / "vision" / "tiny.npz", **arrays)
    return tmp_path


def test_tiny_clip_partial_lora_runs_end_to_end(fewshot_npz_dir: Path, tmp_path: Path):
    cfg = compose_config("dataset=cifar10_fewshot", "backbone=clip_tiny", "method=partial_lora", "importance=svd",
                         f"data_dir={fewshot_npz_dir}", "dataset.file=tiny.npz", "dataset.num_labels=3",
                         "dataset.shots=4", "train.batch_size=4", "train.epochs=1", "logger=none",
                         "trainer.enable_progress_bar=false", "ratios.progress=false",
                         f"results_dir={tmp_path / 'runs'}", f"ratios.cache_dir={tmp_path / 'ratios'}",
                         f"checkpoint.dir={tmp_path / 'checkpoints'}")
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "out")
    record = run(cfg)
    assert record["dataset"] == "cifar10_fewshot" and record["steps"] == 3
    assert record["masks"]["mode"] == "partial" and "baseline_accuracy" in record["masks"]
    assert record["params"]["unmasked_adapter"] == 2 * 8 * (4 * 128 + 2 * (64 + 256))


def test_language_and_vision_cannot_be_mixed(tiny_cfg):
    from partial_lora.errors import ConfigError

    with open_dict(tiny_cfg):
        tiny_cfg.backbone = compose_config("backbone=clip_tiny").backbone
    with pytest.raises(ConfigError, match="pick a matching pair"):
        run(tiny_cfg)



def test_whole_training_set_keeps_the_same_validation_shots():
    """Table 3 trains on every image: shots=None keeps the few-shot run's validation set, trains on the rest."""
    labels = [label for label in range(5) for _ in range(40)]
    few_train, few_val = few_shot_split(labels, 16, seed=3)
    all_train, all_val = few_shot_split(labels, None, seed=3, val_shots=16)
    assert all_val == few_val and set(few_train) < set(all_train)
    assert len(all_train) == 5 * (40 - 16) and not set(all_train) & set(all_val)
    with pytest.raises(DataError, match="val_shots must be >= 1"):
        few_shot_split(labels, None, seed=3, val_shots=None)
