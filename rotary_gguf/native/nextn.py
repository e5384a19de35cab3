"""llama.cpp's staging API for multi-token prediction (src/llama-ext.h): the hidden states a
context hands to a model's NextN (MTP) head. libllama exports these as C++ symbols, so they are
bound here by their mangled names."""

from __future__ import annotations

import ctypes
import functools

import llama_cpp

_SYMBOLS = {
    # void llama_set_embeddings_nextn(llama_context *, bool value, bool masked)
    "set_embeddings_nextn": ("_Z26llama_set_embeddings_nextnP13llama_contextbb",
                             [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool], None),
    # float * llama_get_embeddings_nextn(llama_context *)
    "get_embeddings_nextn": ("_Z26llama_get_embeddings_nextnP13llama_context",
                             [ctypes.c_void_p], ctypes.POINTER(ctypes.c_float)),
    # float * llama_get_embeddings_nextn_ith(llama_context *, int32_t i)
    "get_embeddings_nextn_ith": ("_Z30llama_get_embeddings_nextn_ithP13llama_contexti",
                                 [ctypes.c_void_p, ctypes.c_int32], ctypes.POINTER(ctypes.c_float)),
}


@functools.cache
def _function(name: str):
    symbol, argtypes, restype = _SYMBOLS[name]
    fn = getattr(llama_cpp.llama_cpp._lib, symbol)
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def nextn_available() -> bool:
    """Whether this libllama exports the NextN hidden-state functions."""
    try:
        for name in _SYMBOLS:
            _function(name)
    except AttributeError:
        return False
    return True


def set_embeddings_nextn(ctx, value: bool, masked: bool) -> None:
    """Make `ctx` keep the hidden state its NextN head reads: for every token of a batch
    (`masked` False) or only for the tokens whose logits are kept."""
    _function("set_embeddings_nextn")(ctx, value, masked)


def embeddings_nextn(ctx):
    """The hidden states of the last batch, one row of n_embd floats per batch token (unmasked)."""
    return _function("get_embeddings_nextn")(ctx)


def embeddings_nextn_ith(ctx, i: int):
    """The hidden state of output `i` of the last batch (masked contexts: as for logits)."""
    return _function("get_embeddings_nextn_ith")(ctx, i)
