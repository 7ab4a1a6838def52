"""Network architectures shared by the recipes (registered in ``modelstore.NETWORKS`` on import)."""

from .unet2d import ATTENTION_VARIANTS, BoxAttention, BoxAttentionUNet2D, LocalizationBranch

__all__ = ["ATTENTION_VARIANTS", "BoxAttention", "BoxAttentionUNet2D", "LocalizationBranch"]
