"""Test stand-in for the official ``slicegpt.adapters`` package (microsoft/TransformerCompression).

Only the Llama adapter is reproduced (``adapters.llama_adapter``); the official OPT, Phi-2 and
Phi-3 adapters are absent, so their model names raise ``NotImplementedError`` here.
"""
