from stabletrain.models.transformer import Transformer, flops_per_token, param_count

__all__ = ["Transformer", "build_model", "flops_per_token", "param_count"]


def build_model(cfg):
    """The model named by a ModelConfig (the registry grows with the residual-stream and MoE variants)."""
    return Transformer(cfg)
