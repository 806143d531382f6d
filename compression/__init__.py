"""edgesplit.compression: adaptive compression at split points (Mudvari et al., TOIT 2024).

Codecs for the activation at a cut (feature maps, token sequences, or a plain fp16/int8
pass-through), their validated wire format, the budget policy, and the deprune/prune
split-training schedules. The runtime needs only::

    codec = create_codec("fmap", channels=256, r=1)          # or load_codec(store, desc)
    header, frames = codec.encode(x, budget=8, wire_dtype="int8")
    x_hat = codec.decode(header, frames)                      # raises WireFormatError on bad input
    budget = choose_budget(rate_bytes_per_s, time_share_s, [*codec.budgets, None],
                           codec.bytes_per_budget(x.shape, "int8"))

See README.md in this folder for the interface and the budget policy.
"""
from .codecs import (
    Codec,
    FeatureMapCodec,
    FilteredCodec,
    IdentityCodec,
    TokenCodec,
    create_codec,
    decode_activation,
    encode_activation,
    list_codecs,
    nested_budgets,
    register_codec,
)
from .errors import CodecError, WireFormatError
from .filters import budget_mask, budget_penalty, channel_order, kept_channels, reset_deprune, reset_prune
from .policy import BudgetChoice, choose_budget, plan_transfer, split_time_share
from .storage import load_codec, load_splitnet, save_codec, save_splitnet
from .wire import DEFAULT_LIMITS, WIRE_DTYPES, WireHeader, WireLimits, message_nbytes, payload_nbytes

__all__ = [
    "BudgetChoice", "Codec", "CodecError", "DEFAULT_LIMITS", "FeatureMapCodec", "FilteredCodec", "IdentityCodec",
    "TokenCodec", "WIRE_DTYPES", "WireFormatError", "WireHeader", "WireLimits", "budget_mask", "budget_penalty",
    "channel_order", "choose_budget", "create_codec", "decode_activation", "encode_activation", "kept_channels",
    "list_codecs", "load_codec", "load_splitnet", "message_nbytes", "nested_budgets", "payload_nbytes",
    "plan_transfer", "register_codec", "reset_deprune", "reset_prune", "save_codec", "save_splitnet",
    "split_time_share",
]
