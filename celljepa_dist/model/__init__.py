"""The model library: scGPT encoder with known/unknown attention backends, Cell-JEPA heads and
losses, EMA teacher, save/load.

    cfg = ModelConfig(vocab_size=len(vocab), attention_backend="sdpa")
    model = CellJEPA(cfg); teacher = make_teacher(model.student)
    out = model.forward_student(batch)
    losses = celljepa_loss(out, batch, LossConfig(), teacher_embedding(teacher, batch))
    losses["loss"].backward(); optimizer.step()
    ema_update_(encoder_params(teacher), encoder_params(model.student), momentum_at(step, total))
"""
from .attention import AttentionMask, KnownUnknownAttention, allowed_keys, build_attention_mask
from .cell_jepa import CellJEPA, StudentOutput, celljepa_loss, teacher_embedding, teacher_values
from .config import LossConfig, ModelConfig
from .ema import EMAConfig, ema_update_, encoder_params, make_teacher, momentum_at, momentum_schedule
from .encoder import CellEncoder
from .heads import JEPAPredictor, MVCHead, ValueHead
from .losses import ecs_scgpt_loss, ecs_supcon_loss, jepa_cosine_loss, masked_mse, mse
from .pretrained import from_pretrained, load_encoder, save_pretrained

__all__ = [
    "AttentionMask", "KnownUnknownAttention", "allowed_keys", "build_attention_mask",
    "CellJEPA", "StudentOutput", "celljepa_loss", "teacher_embedding", "teacher_values",
    "LossConfig", "ModelConfig", "EMAConfig", "ema_update_", "encoder_params", "make_teacher",
    "momentum_at", "momentum_schedule", "CellEncoder", "JEPAPredictor", "MVCHead", "ValueHead",
    "ecs_scgpt_loss", "ecs_supcon_loss", "jepa_cosine_loss", "masked_mse", "mse",
    "from_pretrained", "load_encoder", "save_pretrained",
]
