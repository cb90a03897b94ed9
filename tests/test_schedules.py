"""λ schedules hit their end points; warm-up gates; config validation names the field."""
import dataclasses

import pytest

from mirai.foresight import EncoderConfig, ForesightConfig, coefficients
from mirai.foresight.config import default_layer
from mirai.foresight.schedules import schedule_value


@dataclasses.dataclass
class M:
    dim: int = 768
    n_layer: int = 12
    block_size: int = 256
    vocab_size: int = 16384


def test_const_schedule_every_step():
    cfg = ForesightConfig(mode="encoder", lambdas=2.0)                # Mirai-I: K=1, no warm-up
    assert coefficients(cfg, 0, 1000, 0) == [2.0]
    assert coefficients(cfg, 999, 1000, 299) == [2.0]


def test_step_schedule_paper_mirai_e_2_to_1_halfway():
    cfg = ForesightConfig(mode="ema", schedule="step", lambdas=2.0, lambda_end=1.0, switch_frac=0.5, warmup_epochs=0)
    assert coefficients(cfg, 0, 1000, 0) == [2.0, 2.0, 2.0]
    assert coefficients(cfg, 499, 1000, 0) == [2.0, 2.0, 2.0]
    assert coefficients(cfg, 500, 1000, 0) == [1.0, 1.0, 1.0]
    assert coefficients(cfg, 1000, 1000, 0) == [1.0, 1.0, 1.0]


def test_cosine_schedule_end_points_and_midpoint_per_head():
    cfg = ForesightConfig(mode="ema", k=2, schedule="cosine", lambdas=[2.0, 4.0], lambda_end=[1.0, 0.0],
                          warmup_epochs=0)
    assert coefficients(cfg, 0, 100, 0) == [2.0, 4.0]
    assert coefficients(cfg, 100, 100, 0) == pytest.approx([1.0, 0.0], abs=1e-12)
    assert coefficients(cfg, 50, 100, 0) == pytest.approx([1.5, 2.0])
    assert coefficients(cfg, 500, 100, 0) == pytest.approx([1.0, 0.0], abs=1e-12)   # clipped past the end
    assert schedule_value(3.0, 1.0, "cosine", 0.25) > schedule_value(3.0, 1.0, "cosine", 0.75)


def test_warmup_gate_mirai_e_default_15_epochs():
    cfg = ForesightConfig(mode="ema")
    assert coefficients(cfg, 10, 1000, 14) == [0.0, 0.0, 0.0]
    assert coefficients(cfg, 10, 1000, 15) == [2.0, 2.0, 2.0]
    assert coefficients(ForesightConfig(mode="ema", warmup_epochs=0), 0, 10, 0) == [2.0, 2.0, 2.0]
    assert coefficients(ForesightConfig(mode="none"), 5, 10, 100) == [0.0, 0.0, 0.0]


def test_resolve_mode_defaults():
    e = ForesightConfig(mode="ema").resolve(M())
    assert (e.k, e.layer, e.teacher_layer, e.head_out, e.warmup_epochs, e.lambdas) == (3, 8, 8, 768, 15, [2.0] * 3)
    i = ForesightConfig(mode="encoder", encoder=EncoderConfig(name="dinov2_vitl14"),
                        use_precomputed_features=True).resolve(M(dim=1024, n_layer=24))
    assert (i.k, i.layer, i.head_out, i.warmup_epochs) == (1, 16, 1024, 0)
    assert [default_layer(n) for n in (12, 24, 36, 48)] == [8, 16, 24, 32]
    xxl = ForesightConfig(mode="ema").resolve(M(dim=1536, n_layer=48))
    assert (xxl.layer, xxl.head_out) == (32, 1536)                      # heads sized to the model width


@pytest.mark.parametrize("kwargs,field", [
    (dict(mode="ema", k=0), "foresight.k"),
    (dict(mode="ema", layer=13), "foresight.layer"),
    (dict(mode="ema", layout="hex"), "foresight.layout"),
    (dict(mode="teacher"), "foresight.mode"),
    (dict(mode="ema", schedule="linear"), "foresight.schedule"),
    (dict(mode="ema", k=3, lambdas=[1.0, 2.0]), "foresight.lambdas"),
    (dict(mode="ema", teacher="static"), "foresight.static_teacher_ckpt"),
    (dict(mode="ema", teacher="static", static_teacher_ckpt="/nonexistent/ema.pt"), "foresight.static_teacher_ckpt"),
    (dict(mode="encoder"), "foresight.encoder.weights"),
    (dict(mode="ema", injection="lm_head"), "foresight.injection"),
    (dict(mode="ema", backend="triton"), "foresight.backend"),
    (dict(mode="ema", switch_frac=1.5), "foresight.switch_frac"),
])
def test_validate_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ForesightConfig(**kwargs).validate(M())


def test_validate_encoder_missing_weights_file_and_grid(tmp_path):
    enc = dict(name="dinov2_vitb14", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match=r"foresight\.encoder\.weights.*missing\.pth"):
        ForesightConfig(mode="encoder", encoder=EncoderConfig(**enc)).validate(M())
    w = tmp_path / "w.pth"
    w.write_bytes(b"")
    bad = EncoderConfig(name="dinov2_vitb14", weights=str(w), image_size=256)
    with pytest.raises(ValueError, match=r"foresight\.encoder\.image_size.*224"):
        ForesightConfig(mode="encoder", encoder=bad).validate(M())
    ok = EncoderConfig(name="dinov2_vitb14", weights=str(w), image_size=336)
    ForesightConfig(mode="encoder", encoder=ok).validate(M(block_size=576))   # 384 px: 24x24 grid
