"""Network architectures shared by several recipes: unet2d (BoxAttentionUNet2D: o2l, couinaud, acol),
vnet3d (VNet / residual VNet: sdnet, and the liver model the others read).

Each class is registered in ``learn.modelstore`` when its module is imported; nothing is imported
here eagerly (a model loads only the module of its own networks).  May import learn.modelstore.
"""

__all__ = ["ATTENTION_VARIANTS", "BoxAttention", "BoxAttentionUNet2D", "LocalizationBranch"]


def __getattr__(name):  # the former eager re-exports of unet2d, now imported on first use
    if name in __all__:
        from . import unet2d

        return getattr(unet2d, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
