"""Models: LlamaGen's class-conditional GPT family (gpt.py, with attention.py and rope.py), the PAR
variant (par.py), KV-cache sampling with classifier-free guidance (generation.py); the VQ tokenizer
lives in vq.py (import it from there). ``build_gpt(name, **overrides)`` builds GPT-* and PAR-* models."""
from mirai.models.gpt import GPT_models, GPTConfig, GPTOutput, Transformer, build_gpt, gpt_config
from mirai.models.par import PAR_models, PARConfig, PARTransformer, par_config

__all__ = ["GPT_models", "GPTConfig", "GPTOutput", "Transformer", "build_gpt", "gpt_config",
           "PAR_models", "PARConfig", "PARTransformer", "par_config"]
