"""Which Vowpal Wabbit options Loopwise lets through: learning options only.

Checked before VW parses anything, wherever arguments come from (``vw_args``,
``LOOPWISE_VW_ARGS``, a replay's ``vw:ARGS``, a snapshot's header, the option
string VW keeps inside a saved model). Kept free of VW imports so that settings
validation can use it.
"""

from __future__ import annotations

import re
import shlex
from typing import Final

__all__ = ["ALLOWED_OPTIONS", "check_vw_args", "model_options"]

# VW options that only shape learning: nothing here reads or writes a file, opens a socket or
# prints to a chosen place (-f, -i, -d, -c, -p, -r, --cache_file, --readable_model,
# --invert_hash, --audit_regressor, --daemon, --sendto, --feature_mask, ... are all refused).
ALLOWED_OPTIONS: Final = frozenset(
    [
        "cb_explore_adf",
        "cb_adf",
        "cb_type",
        "csoaa_ldf",
        "csoaa_rank",
        "quiet",
        "no_stdin",
        "bit_precision",
        "b",
        "interactions",
        "quadratic",
        "q",
        "cubic",
        "learning_rate",
        "l",
        "power_t",
        "initial_t",
        "decay_learning_rate",
        "l1",
        "l2",
        "squarecb",
        "gamma_scale",
        "gamma_exponent",
        "epsilon",
        "epsilon_decay",
        "first",
        "first_only",
        "bag",
        "cover",
        "psi",
        "nounif",
        "softmax",
        "lambda",
        "elim",
        "regcb",
        "regcbopt",
        "mellowness",
        "synthcover",
        "synthcoverpsi",
        "synthcoversize",
        "rnd",
        "rnd_alpha",
        "rnd_lambda",
        "random_seed",
        "loss_function",
        "quantile_tau",
        "link",
        "lrq",
        "lrqfa",
        "lrqdropout",
        "ignore",
        "ignore_linear",
        "keep",
        "noconstant",
        "holdout_off",
        "adaptive",
        "normalized",
        "invariant",
        "sgd",
        "coin",
        "ftrl",
        "ftrl_alpha",
        "ftrl_beta",
        "pistol",
        "hash",
        "hash_seed",
        "clip_p",
        "min_cb_cost",
        "max_cb_cost",
        "cb_min_cost",
        "cb_max_cost",
        "initial_weight",
        "random_weights",
        "sparse_weights",
        "large_action_space",
        "max_actions",
        "save_resume",
        "predict_only_model",
    ]
)
_NUMBER: Final = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def check_vw_args(args: str, where: str = "VW arguments") -> None:
    """Raise ``ValueError`` naming the first option of ``args`` outside :data:`ALLOWED_OPTIONS`."""
    try:
        tokens = shlex.split(args)
    except ValueError as exc:
        raise ValueError(f"{where}: cannot be parsed ({exc})") from None
    for token in tokens:
        if not token.startswith("-") or _NUMBER.match(token):
            continue  # a value (numbers may be negative)
        name = token[2:].split("=", 1)[0] if token.startswith("--") else token[1:2]
        if name not in ALLOWED_OPTIONS:
            raise ValueError(
                f"{where}: option {token!r} is not allowed (only learning options are: no "
                "option that reads or writes files, opens sockets or loads models; "
                "see loopwise.learners.vw_policy.ALLOWED_OPTIONS)"
            )


def model_options(model: bytes) -> str:
    """The option string VW keeps inside a saved model (a length-prefixed string in the
    model's header, e.g. `` --cb_adf --cb_explore_adf ...``), for :func:`check_vw_args`."""
    start = model.find(b" --", 0, 4096)
    if start < 4:
        raise ValueError("VW model: no option string found in its header")
    length = int.from_bytes(model[start - 4 : start], "little")
    end = start + length - 1
    if length < 4 or end >= len(model) or model[end] != 0:
        raise ValueError("VW model: its option string is malformed")
    try:
        return model[start:end].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("VW model: its option string is not ASCII") from None
