"""SDM model (user and item towers, all variants) and its training losses."""

from sdm.model.loss import (
    NegativeSampler,
    full_softmax_loss,
    inbatch_softmax_loss,
    sampled_softmax_logits,
    sampled_softmax_loss,
    sdm_loss,
    target_pairs,
)
from sdm.model.sdm import (
    SDM,
    DNNEncoder,
    EmbeddingBank,
    GatedFusion,
    LongTermEncoder,
    ModelConfig,
    ShortTermEncoder,
    UserAttention,
    Variant,
)

__all__ = [
    "SDM",
    "DNNEncoder",
    "EmbeddingBank",
    "GatedFusion",
    "LongTermEncoder",
    "ModelConfig",
    "NegativeSampler",
    "ShortTermEncoder",
    "UserAttention",
    "Variant",
    "full_softmax_loss",
    "inbatch_softmax_loss",
    "sampled_softmax_logits",
    "sampled_softmax_loss",
    "sdm_loss",
    "target_pairs",
]
