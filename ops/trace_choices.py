"""Choices the ops make while torch.compile traces them, and their place in torch.compile's cache keys.

A compiled graph keeps what was chosen when it was traced: which kernel serves ``dcp::sparse_mla_attn``
(``use_attention_kernel``), whether a Hopper prefill takes the warp-specialised indexer
(``DCP_PREFILL_INDEXER``), whether a decode indexer call is a dependent launch (``DCP_DECODE_INDEXER_PDL``).
torch.compile's caches (AOTAutograd's, Inductor's FX graph cache, in memory and on disk) key a graph by
Dynamo's graph, where each dcp op is one node whatever it traces to, so without more they would hand a graph
traced under one choice to a process or a compile under another. Hence:

- each choice is read from the environment once, at import, and changed in a process only by ``set`` (which
  checks the value);
- the current choices and a hash of ops/'s sources (an edit of a kernel or a host wrapper, which the caches do
  not see either) are kept in ``torch.compiler.config.cache_key_tag`` (appended to any tag the user set).

A function already compiled in this process keeps its graph after ``set`` (Dynamo does not guard on these)
until ``torch._dynamo.reset()``; the next compile then traces under the new choice, and no cache returns the
old one.
"""
from __future__ import annotations

import hashlib
import os
import pathlib

import torch

# name -> (environment variable or None, default, allowed values or None: checked by the setter's caller)
_SPECS = {
    "attention_kernel": (None, "triton", None),          # values: ops.ATTENTION_KERNELS' names (checked there)
    "prefill_indexer": ("DCP_PREFILL_INDEXER", "auto", ("auto", "triton")),
    "decode_indexer_pdl": ("DCP_DECODE_INDEXER_PDL", "off", ("off", "on")),
}


def _known(name: str) -> str:
    if name not in _SPECS:
        raise KeyError(f"unknown trace choice {name!r}; known: {sorted(_SPECS)}")
    return name


def _check(name: str, value: str) -> str:
    env, _, allowed = _SPECS[_known(name)]
    if allowed is not None and value not in allowed:
        source = f"{env}={value!r}" if env else repr(value)
        raise ValueError(f"{source}: {name} must be one of {', '.join(allowed)}")
    return value


_choices = {name: _check(name, os.environ.get(env, default) if env else default)
            for name, (env, default, _) in _SPECS.items()}


def get(name: str) -> str:
    return _choices[_known(name)]


def set(name: str, value: str) -> None:  # noqa: A001 - the module is used as trace_choices.set
    """Change a choice for this process's next compiles (and eager calls), and the cache key with it."""
    _choices[name] = _check(name, str(value))
    _sync_cache_key_tag()


def _sources_digest() -> str:
    root = pathlib.Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


_SOURCES = _sources_digest()
_PREFIX = "dcp-ops-"


def _sync_cache_key_tag() -> None:
    """Our part of ``cache_key_tag``: replaced in place, the user's part kept (torch without the key: none)."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return
    ours = _PREFIX + _SOURCES + "".join(f"-{k}={v}" for k, v in sorted(_choices.items()))
    kept = [part for part in config.cache_key_tag.split("+") if part and not part.startswith(_PREFIX)]
    config.cache_key_tag = "+".join(kept + [ours])


_sync_cache_key_tag()
