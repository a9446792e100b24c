"""The model's config: the variant of the paper (SPEC section 7) and every size and switch needed to
rebuild an `SDM` (stored in checkpoints).

`ModelConfig` is also importable from `sdm.model.sdm`, next to the model it builds.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

Variant = Literal["SDMMA", "PSDMMA", "PSDMMAL", "PSDMMAL-N", "PSDMMAL-NoS", "DNN", "SASRec"]


class ModelConfig(BaseModel):
    """Everything needed to rebuild an `SDM` (stored in checkpoints).

    Vocabulary sizes come from the data manifest and include padding (0) and OOV (1).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Variant = "PSDMMAL-N"
    item_vocab: dict[str, int]
    """Item feature name -> vocabulary size; "item" (the item id) first and required."""
    user_vocab: dict[str, int] = {}
    """User feature name -> vocabulary size; "user" is the user id. May be empty."""
    embedding_dim: int = 64
    lstm_layers: int = 1
    num_heads: int = 2
    num_blocks: int = 2
    """Transformer blocks of the SASRec variant."""
    dropout: float = 0.2
    num_targets: int = 5
    """N of PSDMMAL-N; the loss uses it, the model does not."""
    max_session_len: int = 50
    max_long_len: int = 50
    user_residual: bool = False
    """Short-term output s_p = h_p + user attention (instead of the attention alone): keeps the
    position's own state, which pure attention pooling over h_0..h_p dilutes."""
    state_query: bool = False
    """User attention's query at position p is W e_u + W_h h_p (the user and where the session
    is now) instead of W e_u alone, whose attention weights are the same at every position."""
    repeat: bool = False
    """Add the repeat (copy) head: items of the session prefix and of the long-term window
    get a learned extra score (`RepeatHead`); off = the paper's model."""
    repeat_prior: float = 0.0
    """Initial copy bonus of the session's last item (`RepeatHead`); 0 = start neutral."""
    id_dropout: float = 0.0
    """Training only: probability that an item occurrence of the item tower (a target or a
    negative of the loss) loses its id embedding (index 0, a zero row), so its vector must also
    work from side features alone, as a cold item's does (`SDM.cold_item_vectors`); 0 = off."""
    multi_valued: list[str] = []
    """Features of `item_vocab` or `user_vocab` that hold several values ('Comedy|Romance'): an
    item's (a user's) embedding of such a feature is the mean of its values' embeddings
    (`ValueLists`) instead of one value's. Empty = every feature single-valued (checkpoints
    before it)."""

    @field_validator("embedding_dim", "lstm_layers", "num_heads", "num_blocks", "num_targets", "max_session_len", "max_long_len")
    @classmethod
    def _positive(cls, v: int, info) -> int:  # noqa: ANN001 (pydantic's ValidationInfo)
        # upper bounds: the same as (or wider than) TrainConfig's and SessionizeConfig's
        top = {"embedding_dim": 16_384, "lstm_layers": 64, "num_heads": 1024, "num_blocks": 64, "num_targets": 1000,
               "max_session_len": 100_000, "max_long_len": 100_000}[info.field_name]  # fmt: skip
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        if v > top:
            raise ValueError(f"must be <= {top}, got {v}")
        return v

    @field_validator("dropout", "id_dropout")
    @classmethod
    def _probability(cls, v: float, info) -> float:  # noqa: ANN001 (pydantic's ValidationInfo)
        if not 0.0 <= v < 1.0:  # nan fails too
            raise ValueError(f"{info.field_name} must be in [0, 1), got {v}")
        return v

    @field_validator("repeat_prior")
    @classmethod
    def _prior(cls, v: float) -> float:
        if not (0.0 <= v and math.isfinite(v)):
            raise ValueError(f"repeat_prior must be a finite number >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _check_dims(self) -> ModelConfig:
        if self.embedding_dim % self.num_heads:
            raise ValueError(
                f"embedding_dim ({self.embedding_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if "item" not in self.item_vocab:
            raise ValueError(f"item_vocab must contain 'item' (the item id), got {sorted(self.item_vocab)}")
        if next(iter(self.item_vocab)) != "item":
            # item_table column 0 is the item id, and columns follow item_vocab's order.
            raise ValueError(f"'item' must be the first key of item_vocab, got {list(self.item_vocab)}")
        if self.item_vocab["item"] < 3:
            raise ValueError(f"item_vocab['item'] must be >= 3 (padding, OOV and one item), got {self.item_vocab['item']}")
        for kind, vocab in (("item_vocab", self.item_vocab), ("user_vocab", self.user_vocab)):
            for name, size in vocab.items():
                if not name:
                    raise ValueError(f"{kind} has an empty feature name")
                if size < 2:
                    raise ValueError(f"{kind}[{name!r}] must be >= 2 (padding and OOV included), got {size}")
        wrong = [f for f in self.multi_valued if f in ("item", "user") or f not in {**self.item_vocab, **self.user_vocab}]
        if wrong or len(set(self.multi_valued)) != len(self.multi_valued):
            raise ValueError(
                f"multi_valued must name distinct side features of item_vocab or user_vocab, got {self.multi_valued}"
            )
        return self

    @property
    def item_features(self) -> list[str]:
        """Item features the variant reads (NoS: the item id only)."""
        return ["item"] if self.variant == "PSDMMAL-NoS" else list(self.item_vocab)

    @property
    def user_features(self) -> list[str]:
        """User features the variant reads (NoS: the user id only, when known; SDMMA, SASRec: none)."""
        if self.variant in ("SDMMA", "SASRec"):
            return []
        if self.variant == "PSDMMAL-NoS":
            return [f for f in self.user_vocab if f == "user"]
        return list(self.user_vocab)
