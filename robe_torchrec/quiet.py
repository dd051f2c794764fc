"""Silence one known-harmless torch log line at the entry points (train, evaluate, quickstart, benchmarks).

torch 2.13's fx ``ProxyableClassMeta.__call__`` calls the deprecated ``torch.fx.is_fx_tracing()``
whenever a torchrec ``KeyedJaggedTensor`` or ``KeyedTensor`` is constructed, which logs once per
process: "is_fx_tracing will return true for both fx.symbolic_trace and torch.export ...". The call
is inside torch itself, not in this project or torchrec, so the cause cannot be fixed here; this
filter drops exactly that record and nothing else. Library code never installs it: only commands.
"""

from __future__ import annotations

import logging

_LOGGER = "torch.fx._symbolic_trace"
_MESSAGE_PREFIX = "is_fx_tracing will return true"


class _DropFxTracingNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_MESSAGE_PREFIX)


def silence_fx_tracing_notice() -> None:
    """Install the filter once (idempotent)."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _DropFxTracingNotice) for f in logger.filters):
        logger.addFilter(_DropFxTracingNotice())
