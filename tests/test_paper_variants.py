"""The rest of the paper at debug size on CPU, reached from shipped configs: 384 px (24x24 grid),
LlamaGen-S, every foresight encoder family, the block-causal encoder, the static EMA teacher, and Mirai-I
with the encoder run online on crops re-created from the images the store was prepared from."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mirai.config import ConfigError, load_config, validate

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
# GPT-debug sized, single CPU process, one step (applied after a shipped config)
DEBUG_RUN = ["model.name=GPT-debug", "model.vocab_size=64", "model.num_classes=10", "model.image_size=64",
             "model.dim=none", "model.n_layer=none", "model.n_head=none", "data.num_workers=0",
             "data.pin_memory=false", "train.global_batch=8", "train.micro_batch=4", "train.max_steps=1",
             "train.precision=fp32", "train.zero_stage=0", "train.backend=single", "train.compile=false",
             "train.progress=false", "train.tensorboard=false", "train.log_every=1", "optim.lr=1e-2",
             "foresight.head_hidden=64", "foresight.layer=1", "foresight.warmup_epochs=0", "ema.decay=0.99"]


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def _model_cfg(cfg):
    from mirai.config import model_gpt_config
    return model_gpt_config(cfg.model)


def _one_step(run) -> dict:
    """Optimizer step 0 of a built run; the logged losses."""
    run.loader.start(0)
    it = iter(run.loader)
    run.runner.run(0, 0, [next(it) for _ in range(run.accum)])
    return run.runner.meter.read()


# ------------------------------------------------------------------ 384 px


def test_384px_trains_on_a_24x24_grid(tmp_path):
    from mirai.foresight.neighbours import neighbour_table
    from mirai.models.rope import rope_2d_table
    from mirai.trainer.run import build_run
    from mirai.data.synthetic import write_synthetic_store
    store = write_synthetic_store(tmp_path / "codes384", num_images=8, grid_size=24, vocab_size=64, num_classes=10,
                                  num_aug=1, image_size=384)
    cfg = load_config(CONFIGS / "debug.yaml", [f"data.codes={store}", f"out_dir={tmp_path / 'run'}",
                                               "model.image_size=384", "foresight.mode=ema", "train.backend=single",
                                               "train.progress=false", "train.tensorboard=false", "train.max_steps=1"])
    validate(cfg)
    run = build_run(cfg)
    assert (run.gpt.config.grid_size, run.gpt.config.block_size) == (24, 576)
    torch.testing.assert_close(run.gpt.freqs_cis, rope_2d_table(24, run.gpt.config.head_dim), rtol=0, atol=0)
    table = run.runner.engine.module.objective.table.cpu()
    assert torch.equal(table, neighbour_table(24, 3, "2d", "ema"))
    assert table[1, 24] == -1 and table[1, 25] == 26                   # cell 23 ends row 0: no wrap to row 1
    assert table[2, 1] == 25                                           # below cell 0 is cell 24 (row 24 + 1)
    losses = _one_step(run)
    assert math.isfinite(losses["loss"]) and all(math.isfinite(h) and h != 0 for h in losses["head_loss"])
    # shipped 384 configs: the encoder runs at 336 px for DINOv2's patch 14 (24x24 patches = the token grid)
    i384 = load_config(CONFIGS / "gpt-b_mirai_i_384.yaml")
    validate(i384, world_size=8, check_data=False)
    assert (i384.model.grid_size, i384.foresight.encoder.image_size) == (24, 336)
    bad = load_config(CONFIGS / "gpt-b_mirai_i_384.yaml", ["foresight.encoder.image_size=224"])
    assert _error(validate, bad, world_size=8, check_data=False).startswith("foresight.encoder.image_size:")
    par = load_config(CONFIGS / "par-b_mirai_e.yaml", ["model.image_size=384", "model.num_regions=16"])
    validate(par, world_size=8, check_data=False)                      # 24 = 4 x 6: PAR-16x regions of 6x6


# ------------------------------------------------------------------ LlamaGen-S


def test_llamagen_s_configs_build_with_the_stated_parameter_count():
    from mirai.config import model_gpt_config
    from mirai.models.gpt import build_gpt
    text = (CONFIGS / "gpt-s_baseline.yaml").read_text()
    stated = float(re.search(r"([\d.]+)M parameters", text).group(1))
    for name in ("gpt-s_baseline", "gpt-s_mirai_e", "gpt-s_mirai_i"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        validate(cfg, world_size=1, check_data=False)
        c = model_gpt_config(cfg.model)
        assert (c.dim, c.n_layer, c.n_head) == (512, 12, 8), name
    with torch.device("meta"):
        model = build_gpt(cfg.model.name, **cfg.model.gpt_overrides())
    n = sum(p.numel() for p in model.parameters())
    assert n == 58_196_992 and round(n / 1e6, 1) == stated
    assert cfg.foresight.layer == 8 and cfg.foresight.resolve(c).head_out == 768   # Mirai-I: DINOv2-B width


# ------------------------------------------------------------------ foresight encoders


def test_every_encoder_family_has_a_config_and_needs_weights(tmp_path):
    from mirai.foresight.encoders import ENCODERS
    shipped = {load_config(p).foresight.encoder.name for p in CONFIGS.glob("*mirai_i*.yaml")}
    families = {"dinov2_vitb14", "dinov2_vitl14", "dinov2_vitb14_reg", "dinov3_vitb16", "mae_vitb16"}
    assert families <= shipped, families - shipped
    weights = tmp_path / "encoder.pth"
    weights.write_bytes(b"")                                           # validation checks the path only
    online = ["foresight.use_precomputed_features=false", f"data.images={tmp_path}"]
    for name, spec in ENCODERS.items():
        base = [f"foresight.encoder.name={name}", *online]
        msg = _error(validate, load_config(CONFIGS / "gpt-b_mirai_i.yaml", base), world_size=8, check_data=False)
        assert msg.startswith("foresight.encoder.weights:") and "local weights" in msg, (name, msg)
        cfg = load_config(CONFIGS / "gpt-b_mirai_i.yaml", [*base, f"foresight.encoder.weights={weights}"])
        validate(cfg, world_size=8, check_data=False)
        assert cfg.foresight.resolve(_model_cfg(cfg)).head_out == spec.dim, name
        wrong = 16 * spec.patch + spec.patch                           # a 17x17 patch grid
        bad = load_config(CONFIGS / "gpt-b_mirai_i.yaml", [*base, f"foresight.encoder.weights={weights}",
                                                            f"foresight.encoder.image_size={wrong}"])
        assert _error(validate, bad, world_size=8, check_data=False).startswith("foresight.encoder.image_size:")
    # Mirai-I without features and without images: the message names both ways
    msg = _error(validate, load_config(CONFIGS / "gpt-b_mirai_i.yaml", ["foresight.use_precomputed_features=false",
                                                                       f"foresight.encoder.weights={weights}"]),
                 world_size=8, check_data=False)
    assert msg.startswith("foresight.use_precomputed_features:") and "data.images" in msg


def test_block_causal_from_config_must_match_precomputed_features(code_store, tmp_path):
    cfg = load_config(CONFIGS / "gpt-b_mirai_i_block_causal.yaml")
    assert cfg.foresight.encoder.block_causal == 64
    validate(cfg, world_size=8, check_data=False)
    # the tests' store holds features of an unmasked encoder: a block-causal run must not read them
    overrides = [*DEBUG_RUN, f"data.codes={code_store}", f"out_dir={tmp_path}", "foresight.head_out=32",
                 "foresight.encoder.name=dinov2_vitb14"]
    msg = _error(validate, load_config(CONFIGS / "gpt-b_mirai_i_block_causal.yaml", overrides))
    assert msg.startswith("foresight.encoder.block_causal:") and "block_causal=0" in msg
    validate(load_config(CONFIGS / "gpt-b_mirai_i_block_causal.yaml", [*overrides, "foresight.encoder.block_causal=0"]))


# ------------------------------------------------------------------ static EMA teacher


def test_static_ema_k9_config_trains_one_step_with_a_frozen_teacher(code_store, tmp_path):
    from mirai.models.gpt import build_gpt
    from mirai.trainer.run import build_run
    torch.manual_seed(123)
    pre = build_gpt("GPT-debug", vocab_size=64, num_classes=10, block_size=16)
    ckpt = tmp_path / "pretrained.pt"
    torch.save({"ema": pre.state_dict(), "model_name": "GPT-debug"}, ckpt)
    cfg = load_config(CONFIGS / "gpt-b_mirai_e_static_k9.yaml",
                      [*DEBUG_RUN, f"data.codes={code_store}", f"out_dir={tmp_path / 'run'}",
                       f"foresight.static_teacher_ckpt={ckpt}"])
    validate(cfg)
    assert (cfg.foresight.k, cfg.foresight.teacher) == (9, "static")
    run = build_run(cfg)
    assert run.ema_state is not None and run.ema_state.teacher is None   # never refreshed by the EMA
    teacher = dict(run.source.module.named_parameters())
    before = {n: p.detach().clone() for n, p in teacher.items()}
    w = "layers.0.attention.wqkv.weight"
    assert before[w].dtype == torch.float32                              # foresight.target_dtype fp32
    assert torch.equal(before[w], pre.state_dict()[w])
    assert not torch.equal(before[w], dict(run.gpt.named_parameters())[w].detach())
    losses = _one_step(run)
    assert len(losses["head_loss"]) == 9 and all(math.isfinite(h) and h != 0 for h in losses["head_loss"])
    assert math.isfinite(losses["loss"]) and losses["loss"] != losses["ntp_loss"]
    assert all(torch.equal(before[n], p) for n, p in teacher.items())   # frozen after the step


# ------------------------------------------------------------------ online Mirai-I encoder on image crops


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    """(image folder, code store made from it by `mirai prepare`, tiny timm ViT weights file)."""
    import timm
    from mirai.models.vq import build_vq
    from mirai.commands.prepare import main as prepare_main
    root = tmp_path_factory.mktemp("online")
    rng = np.random.default_rng(0)
    for cls, shapes in {"ant": [(70, 90), (64, 64), (100, 72)], "bee": [(80, 80), (66, 120), (90, 71)]}.items():
        (root / "imgs" / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "imgs" / cls / f"{i}.png")
    torch.manual_seed(0)
    torch.save({"model": build_vq("VQ-debug").state_dict()}, root / "vq.pt")
    rc = prepare_main(["--images", str(root / "imgs"), "--out", str(root / "store"), "--vq", str(root / "vq.pt"),
                       "--vq-model", "VQ-debug", "--image-size", "64", "--num-workers", "0", "--no-progress"])
    assert rc == 0
    enc = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=64)   # patch 16: 4x4 at 64 px
    torch.save(enc.state_dict(), root / "enc.pth")
    return root / "imgs", root / "store", root / "enc.pth"


def _online_cfg(image_store, out: Path, *extra: str):
    imgs, store, enc = image_store
    return load_config(CONFIGS / "gpt-b_mirai_i.yaml", [
        *DEBUG_RUN, f"data.codes={store}", f"out_dir={out}", "train.global_batch=4", "train.micro_batch=2",
        "foresight.use_precomputed_features=false", f"data.images={imgs}",
        "foresight.encoder.name=test_vit", f"foresight.encoder.weights={enc}", "foresight.head_out=64", *extra])


def test_online_encoder_reads_the_prepared_crops_and_trains(image_store, tmp_path):
    from mirai.data.format import CodeStore
    from mirai.foresight.encoders import EncoderTeacher
    from mirai.data.images import code_crops, read_rgb
    from mirai.trainer.run import build_run
    imgs, store_dir, enc = image_store
    cfg = _online_cfg(image_store, tmp_path / "run")
    validate(cfg)
    run = build_run(cfg)
    assert isinstance(run.source, EncoderTeacher) and run.accum == 2
    run.loader.start(0)
    batch = next(iter(run.loader))
    images = batch["images"]
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 64, 64)
    files = (store_dir / "files.txt").read_text().split()
    for img, i, a in zip(images, batch["index"].tolist(), batch["aug"].tolist()):
        want = code_crops(read_rgb(imgs / files[i]), 64, ten_crop=True, crop_range=1.1)[a]   # what prepare encoded
        assert torch.equal(img.float().div(255.0).sub(0.5).div(0.5), want), (i, a)
    # every augmentation index of a row (ten-crop: 5 crops, then the mirrored 5), and the centre crop + flip
    from mirai.data.store_images import StoreImages, crop_variant
    every = StoreImages(imgs, CodeStore(store_dir)).load(np.full(10, 4), np.arange(10))           # [10, 3, S, S]
    pil = read_rgb(imgs / files[4])
    assert torch.equal(every.float().div(255.0).sub(0.5).div(0.5), code_crops(pil, 64, ten_crop=True))
    two = torch.stack([torch.from_numpy(crop_variant(pil, 48, a, ten_crop=False)).permute(2, 0, 1) for a in (0, 1)])
    assert torch.equal(two.float().div(255.0).sub(0.5).div(0.5), code_crops(pil, 48, ten_crop=False))
    # the crops re-create the codes' pixels: the store's codes of (i, a) are the tokenizer's codes of the crop
    from mirai.models.vq import load_vq
    vq = load_vq(store_dir.parent / "vq.pt", "VQ-debug")
    codes = vq.encode(images.float().div(255.0).sub(0.5).div(0.5))
    assert torch.equal(codes, batch["codes"])
    # the trainer's targets are the encoder's targets on the same crops
    ref = EncoderTeacher("test_vit", enc, grid_size=4, dtype=torch.float32)   # foresight.target_dtype fp32
    got = run.runner.teacher_targets(batch)
    assert got.shape == (2, 16, 64) and got.dtype == torch.float32
    assert torch.equal(got, ref.targets(images))
    # worker processes give the same crops
    from mirai.data.loader import TrainLoader
    workers = TrainLoader(str(store_dir), run.loader.shard, cfg.train.seed, num_workers=1, images=str(imgs))
    workers.start(0)
    assert torch.equal(next(iter(workers))["images"], images)
    losses = _one_step(run)
    assert math.isfinite(losses["loss"]) and math.isfinite(losses["head_loss"][0]) and losses["head_loss"][0] != 0


def test_online_block_causal_encoder_and_image_folder_errors(image_store, tmp_path):
    from mirai.trainer.run import build_run, train
    cfg = _online_cfg(image_store, tmp_path / "bc", "foresight.encoder.block_causal=4")   # one token row per block
    validate(cfg)
    run = build_run(cfg)
    assert run.source.block_causal == 4
    assert all(type(b.attn).__name__ == "_MaskedAttention" for b in run.source.model.blocks)
    res = train(cfg)                                                   # the whole loop: log, checkpoint
    (m,) = res.metrics
    assert math.isfinite(m["loss"]) and math.isfinite(m["head_loss"][0]) and m["head_loss"][0] != 0
    assert (res.checkpoint / "meta.json").is_file()
    msg = _error(validate, _online_cfg(image_store, tmp_path / "x", f"data.images={tmp_path / 'nowhere'}"))
    assert msg.startswith("data.images:") and "nowhere" in msg
    (tmp_path / "other").mkdir()
    msg = _error(validate, _online_cfg(image_store, tmp_path / "x", f"data.images={tmp_path / 'other'}"))
    assert msg.startswith("data.images:") and "files.txt" in msg


def test_online_encoder_is_compiled_with_the_model_and_gives_the_same_targets(image_store, tmp_path):
    from mirai.foresight.encoders import EncoderTeacher
    from mirai.trainer.run import build_run
    _, _, enc = image_store
    cfg = _online_cfg(image_store, tmp_path / "run", "train.compile=true")
    validate(cfg)
    run = build_run(cfg)
    assert run.source._compiled_call_impl is not None           # train.compile covers the frozen encoder
    run.loader.start(0)
    batch = next(iter(run.loader))
    got = run.runner.teacher_targets(batch)                      # through the compiled graph
    want = EncoderTeacher("test_vit", enc, grid_size=4, dtype=torch.float32).targets(batch["images"])   # eager
    assert got.shape == want.shape == (2, 16, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)
