"""SDM model (user and item towers, all variants) and its training losses."""

from sdm.model.attention import UserAttention
from sdm.model.baselines import DNNEncoder
from sdm.model.config import Variant
from sdm.model.embeddings import EmbeddingBank
from sdm.model.encoders import GatedFusion, LongTermEncoder, ShortTermEncoder
from sdm.model.loss import (
    NegativeSampler,
    full_softmax_loss,
    inbatch_softmax_loss,
    sampled_softmax_logits,
    sampled_softmax_loss,
    sdm_loss,
    target_pairs,
)
from sdm.model.sdm import SDM, ModelConfig

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
